"""Masks built in one compiled graph and used in another.

A graph break between the code that builds the attention mask and the layers that use it
(FSDP2's per-layer hooks, an eager module, a ``torch._dynamo.graph_break()``) makes the
mask an output of one graph and an input of the next, where the attention pass cannot
read how it was computed. This file carries what the first graph proved to the second:

- compile time, the graph that builds it: ``marks`` reads each 4-D boolean output back as
  a mask (masks.extract over the output's own shape) and keeps those proved causal or
  always true, or read as a function of the indices alone (a sliding window);
- run time, that graph: ``tagging`` records each such output tensor with its reading in
  ``LEDGER`` (weakly, by identity: a tensor freed is forgotten, a new one at the same
  address is not mistaken for it);
- compile time, a graph that receives it: ``annotate`` finds each placeholder's tensor
  (Dynamo's GraphArg example, held while the backend compiles) in the ledger and puts its
  reading in ``node.meta[READING]``; the attention and sequence-parallel passes take such
  a mask as that reading (``of``) and say which inputs they relied on (Region.assumes);
- run time, that graph: ``guarded`` checks each relied-on input against the ledger (a
  dictionary look-up per call). A mask from anywhere else (the user's own, one changed in
  place is not detected) runs the graph as it was before the rewrite, eagerly: exact and
  slower, logged once and counted in ``counters["mst_fx_run"]["mask_unproved"]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch._dynamo.utils import counters
from torch.fx import GraphModule, Node
from torch.utils.weak import WeakIdKeyDictionary

from mst_fx.passes.graph.attention.masks import MaskMod, extract
from mst_fx.passes.graph.attention.prover import prove
from mst_fx.passes.graph.tokenwise import same_size, value
from mst_fx.report import Reason, Skip

log = logging.getLogger("mst_fx")

READING = "mst_fx_mask_reading"  # placeholder meta key: the Reading of the tensor it receives
LEDGER: WeakIdKeyDictionary = WeakIdKeyDictionary()  # mask tensor -> Reading


@dataclass(frozen=True)
class Reading:
    """What a mask tensor is, element by element: ``kind`` "causal" (kv <= q), "full"
    (always true) or "index" (``mask_mod`` of the indices b, h, q, kv alone, no buffers);
    ``shape`` the tensor's; ``key`` equal for equal readings."""

    kind: str
    shape: tuple
    key: str
    mask_mod: MaskMod | None = None
    reason: str = ""


def marks(gm: GraphModule) -> list[tuple[int, Reading]]:
    """(output position, reading) for each output of ``gm`` that is a mask it can carry."""
    out = gm.graph.output_node().args[0]
    if not isinstance(out, (tuple, list)):
        return []
    found = []
    for i, node in enumerate(out):
        r = read(node) if isinstance(node, Node) else None
        if r is not None:
            found.append((i, r))
    return found


def read(node: Node) -> Reading | None:
    """The reading of a [B, H, Q, KV] boolean ``node`` computed in its graph, or None."""
    v = value(node)
    if node.op not in ("call_function", "call_method") or v is None or v.dtype != torch.bool or v.dim() != 4:
        return None
    sizes = dict(zip("b h q kv".split(), v.shape))
    try:
        mm = extract(node, sizes)
    except Skip:
        return None
    verdict = prove(mm, sizes)
    shape = tuple(v.shape)
    if verdict.kind in ("causal", "full"):
        return Reading(verdict.kind, shape, verdict.kind, reason=verdict.reason)
    if mm.buffers or not _concrete(mm.module):
        return None  # reads this graph's tensors, or its symbols: not meaningful elsewhere
    return Reading("index", shape, "index:" + mm.module.code, mm, verdict.reason)


def _concrete(module: GraphModule) -> bool:
    """Whether a mask_mod holds no symbolic size (a symbol of one graph means nothing in
    another)."""
    def plain(a) -> bool:
        if isinstance(a, (tuple, list)):
            return all(plain(x) for x in a)
        return not isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool))
    return all(plain(n.args) and plain(tuple(n.kwargs.values())) for n in module.graph.nodes)


def tagging(compiled, found: list[tuple[int, Reading]]):
    """``compiled`` recording its mask outputs in LEDGER each time it runs."""
    if not found:
        return compiled

    def run(*args):
        out = compiled(*args)
        for i, r in found:
            t = out[i]
            if isinstance(t, torch.Tensor) and (_symbolic(r.shape) or tuple(t.shape) == r.shape):
                LEDGER[t] = r
        return out

    run._boxed_call = getattr(compiled, "_boxed_call", False)
    return run


def _symbolic(shape: tuple) -> bool:
    return any(not isinstance(d, int) for d in shape)


def annotate(gm: GraphModule) -> bool:
    """Put the ledger's reading on each placeholder of ``gm`` whose tensor has one; returns
    whether any has."""
    any_ = False
    for n in gm.graph.find_nodes(op="placeholder"):
        n.meta.pop(READING, None)
        arg = n.meta.get("grapharg")
        try:
            t = arg.example if arg is not None else None
        except Exception:  # noqa: BLE001 - an example Dynamo no longer holds
            t = None
        if isinstance(t, torch.Tensor) and t in LEDGER:
            n.meta[READING] = LEDGER[t]
            any_ = True
    return any_


def of(mask: Node, q_len, kv_len) -> Reading:
    """The reading of placeholder ``mask`` for attention of ``q_len`` queries over
    ``kv_len`` keys; raises Skip when it has none or its shape does not match."""
    r = mask.meta.get(READING) if mask.op == "placeholder" else None
    if r is None:
        raise Skip(Reason.MASK, "the mask is a graph input (computed outside the compiled graph)")
    v = value(mask)
    if v is None or v.dim() != 4 or not (same_size(v.shape[2], q_len) and same_size(v.shape[3], kv_len)):
        raise Skip(Reason.MASK, "the mask is a graph input whose shape does not match its attention")
    return r


def guarded(compiled, original: GraphModule, assumed: list[tuple[int, str]]):
    """``compiled`` checking, each call, that input i still carries the reading ``key`` for
    every (i, key) of ``assumed``; otherwise ``original`` runs instead."""
    if not assumed:
        return compiled
    warned = []

    def run(*args):  # Dynamo calls a backend's function with the inputs unboxed
        if all(_carries(args[i], key) for i, key in assumed):
            return compiled(*args)
        counters["mst_fx_run"]["mask_unproved"] += 1
        if not warned:
            warned.append(True)
            log.warning("mst_fx: an attention mask reached a compiled graph without the reading it "
                        "was compiled for; running that graph unchanged and eagerly (exact, slower)")
        return original(*args)

    run._boxed_call = getattr(compiled, "_boxed_call", False)
    return run


def _carries(t, key: str) -> bool:
    r = LEDGER.get(t) if isinstance(t, torch.Tensor) else None
    return r is not None and r.key == key
