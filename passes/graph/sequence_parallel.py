"""Sequence-parallel pass: every attention call over the whole sequence of the group's ranks.

With ``MSTConfig.sequence_parallel`` set, each rank's graph sees its piece of the tokens
(mst_fx.sequence_parallel.shard). Everything else in the graph is token-wise, so only
attention must change: each scaled_dot_product_attention call becomes
mst_fx.sequence_parallel.attention (all-to-all to head groups, SDPA over all tokens,
all-to-all back). It runs after the other passes (the attention pass has already dropped
the masks it proved causal or always true, and left every other mask in place: under
sequence parallelism it does not make flex calls), so what it meets is:

- no mask (is_causal or full attention): the call moves as it is;
- a mask built in the graph: read back as a mask_mod (attention.masks.extract) over the
  local pieces; proved causal or full, it is dropped; otherwise its per-token inputs
  (position ids of packed documents, a padding mask) are gathered from every rank at the
  graph inputs they come from and the ops between are repeated on the gathered values, so
  the mask is the whole sequence's. It is then built as flex_attention's block mask where
  ``MSTConfig.flex_attention`` allows flex on the device, else as a boolean
  [B, 1, S, S] mask for SDPA.

What it cannot make right raises SequenceParallelError instead of leaving the graph
unchanged: unchanged, attention would see only the rank's own tokens. That is a mask given
as a graph input with no reading from the graph that built it (attention/crossing.py), one
that depends on the head, per-token values computed from the local length, written-out
attention (softmax of q @ k^T), a flex_attention call of the model's own, cross-attention
(queries and keys of different lengths), or a head count the group's size does not divide.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node
from torch.utils._pytree import tree_leaves

from mst_fx import fx
from mst_fx import sequence_parallel as sp
from mst_fx.config import MSTConfig
from mst_fx.passes.graph import attention
from mst_fx.passes.graph.attention import flex
from mst_fx.passes.graph.attention.masks import MaskMod, mask_sizes
from mst_fx.passes.graph.tokenwise import arg_of, hint, same_size, size_node, value
from mst_fx.report import Region, Report, Skip

KIND = "sequence_parallel"


class SequenceParallelError(RuntimeError):
    """An attention call the pass cannot run over the whole sequence."""


@dataclass
class SPPlan:
    call: Node
    owner: GraphModule
    path: list  # checkpoint steps from the mask's module down to owner
    args: dict
    mask: Node | None = None  # the local mask, in path[0].parent (or owner)
    mask_mod: MaskMod | None = None  # set when the mask is built for the whole sequence
    is_causal: bool = False
    flex: bool = False
    assumes: tuple = ()  # graph inputs whose mask an earlier graph read (attention/crossing.py)


@dataclass
class _Shared:
    gathered: dict = field(default_factory=dict)  # (module, local node) -> whole-sequence node
    masks: dict = field(default_factory=dict)  # (module, local mask) -> built mask nodes
    attention: attention.Shared = field(default_factory=attention.Shared)


def apply(gm: GraphModule, config: MSTConfig, where) -> Report:
    """Rewrite every attention call of ``gm`` and its checkpointed bodies; raises
    SequenceParallelError (the graph then partly rewritten: the caller gives up on it)."""
    name = config.sequence_parallel
    P = sp.world(name)
    shared, report = _Shared(), Report()
    plans = []
    for owner, steps in fx.checkpoint_bodies(gm):
        for n in list(owner.graph.nodes):
            if n.op == "call_function" and n.target in attention.SDPA:
                plans.append(_plan(n, owner, list(steps), P, config, where))
            elif _is_other_attention(n):
                raise SequenceParallelError(
                    f"{where([n])}: {fx.op_name(n)} mixes tokens outside scaled_dot_product_attention "
                    f"(written-out attention or the model's own flex_attention); under sequence "
                    f"parallelism it would see only this rank's tokens")
    for plan in plans:
        detail = _rewrite(plan, P, name, shared)
        v = value(plan.args["query"])
        report.regions.append(Region(kind=KIND, where=where([plan.call]), tokens=hint(v.shape[2]) * P,
                                     chunks=P, bytes_saved=0, detail=detail, applied=True,
                                     flex=plan.flex, assumes=plan.assumes))
    for mod, _ in {id(m): (m, 0) for m, _ in fx.checkpoint_bodies(gm)}.values():
        mod.graph.lint()
        mod.recompile()
    return report


def _is_other_attention(n: Node) -> bool:
    if n.op == "call_function" and n.target is torch.ops.higher_order.flex_attention:
        return True
    if attention._is_softmax(n):
        try:
            return attention.match_eager(n) is not None
        except Skip:
            return True
    return False


def _plan(n: Node, owner: GraphModule, path: list, P: int, config: MSTConfig, where) -> SPPlan:
    args = {k: arg_of(n, i, k) for i, k in enumerate(attention.SDPA_ARGS)}
    q, k = value(args["query"]), value(args["key"])
    here = where([n])
    if q is None or k is None or q.dim() != 4 or k.dim() != 4:
        raise SequenceParallelError(f"{here}: attention inputs are not 4-D [batch, heads, tokens, dim]")
    if not same_size(q.shape[2], k.shape[2]):
        raise SequenceParallelError(f"{here}: queries and keys of different lengths (cross-attention "
                                    f"or a cache) cannot be split over the sequence")
    H, Hkv = q.shape[1], k.shape[1]
    if H % P or (Hkv % P and H % Hkv):
        raise SequenceParallelError(f"{here}: {H} query heads do not divide over {P} ranks")
    plan = SPPlan(n, owner, path, args, is_causal=bool(args["is_causal"]))
    mask = args["attn_mask"]
    if mask is None:
        return plan
    if _mask_input(mask, path) and not _carried(mask, path):
        raise SequenceParallelError(
            f"{here}: the attention mask is an input of this graph, computed from this rank's tokens by "
            f"the code before it (a graph break: FSDP2's per-layer hooks, or an eager module); it cannot "
            f"be built for the whole sequence here. Compile the mask's code in the same graph (FSDP2 at "
            f"the root only, or a model call without a mask)")
    try:
        if not isinstance(mask, Node):
            raise Skip(attention.Reason.MASK, "the mask is not a graph value")
        outer, plan.path = attention._outer(mask, path)
        sizes = mask_sizes(args["query"], args["key"])
        mm, verdict, plan.assumes = attention.read_mask(outer, sizes)
    except Skip as e:
        raise SequenceParallelError(f"{here}: its mask cannot be built for the whole sequence: {e}") from None
    plan.mask = outer
    if verdict.kind in ("causal", "full"):
        plan.is_causal = verdict.kind == "causal"
        return plan
    if "h" in mm.uses:
        raise SequenceParallelError(f"{here}: the mask depends on the head, which the ranks split")
    plan.mask_mod = mm
    plan.flex = attention._flex_allowed(config, q) and args["dropout_p"] in (None, 0, 0.0)
    return plan


def _rewrite(plan: SPPlan, P: int, name: str, shared: _Shared) -> str:
    a, n, g = plan.args, plan.call, plan.owner.graph
    if plan.mask_mod is None:
        kwargs = dict(attn_mask=None, dropout_p=a["dropout_p"] or 0.0, is_causal=plan.is_causal,
                      scale=a["scale"], enable_gqa=bool(a["enable_gqa"]), group=name)
        with g.inserting_before(n):
            new = g.call_function(sp.attention, (a["query"], a["key"], a["value"]), kwargs)
        what = "causal" if plan.is_causal else "no mask"
    elif not plan.flex:
        (dense,) = _built_mask(plan, P, name, shared, dense=True)
        kwargs = dict(attn_mask=attention._thread(dense, plan.path, shared.attention),
                      dropout_p=a["dropout_p"] or 0.0, scale=a["scale"], enable_gqa=bool(a["enable_gqa"]),
                      group=name)
        with g.inserting_before(n):
            new = g.call_function(sp.attention, (a["query"], a["key"], a["value"]), kwargs)
        what = "mask built for the whole sequence (boolean)"
    else:
        parts, lay, bufs = _built_mask(plan, P, name, shared, dense=False)
        inner = [attention._thread(x, plan.path, shared.attention) for x in parts + bufs]
        with g.inserting_before(n):
            mm = g.get_attr(attention._attr(plan.owner, plan.mask_mod.module, shared.attention))
            new = g.call_function(sp.flex, (a["query"], a["key"], a["value"], mm, lay, a["scale"],
                                            len(parts), *inner), {"group": name})
        what = "mask built for the whole sequence (flex block mask)"
    new.meta["example_value"] = n.meta.get("example_value")
    n.replace_all_uses_with(new)
    g.erase_node(n)
    if plan.mask is not None:
        local = a["attn_mask"]
        if not local.users:
            attention._release(plan, local)
    return f"all-to-all over {P} ranks; {what}"


def _built_mask(plan: SPPlan, P: int, name: str, shared: _Shared, dense: bool):
    """The whole sequence's mask in the mask's own module, built once per mask: (dense,) or
    (block-mask parts, their layout, the mask_mod's gathered buffers)."""
    home = plan.path[0].parent if plan.path else plan.owner
    q = value(plan.args["query"])
    return _whole_mask(home, plan.mask, plan.mask_mod, q.shape[0], q.shape[2], q, P, name, shared, dense)


def _whole_mask(home: GraphModule, mask: Node, mm: MaskMod, batch, s, like: torch.Tensor, P: int,
                name: str, shared: _Shared, dense: bool):
    key = (id(home), mask, dense)
    if key in shared.masks:
        return shared.masks[key]
    bufs = [_whole(b, home, s, P, name, shared) for b in mm.buffers]
    B = batch if "b" in mm.uses else 1
    g = home.graph
    with attention.insertion_point(home, mask, None):
        attr = g.get_attr(attention._attr(home, mm.module, shared.attention))
    b_arg = size_node(home, B, attr)
    s_arg = size_node(home, s, attr)
    with g.inserting_after(attr):
        S = g.call_function(operator.mul, (s_arg, P)) if isinstance(s_arg, Node) else s_arg * P
    after = S if isinstance(S, Node) else attr
    with g.inserting_after(after):
        if dense:
            out = (g.call_function(sp.dense_mask, (attr, b_arg, S, like.device, *bufs)),)
        else:
            lay = _layout(mm, B, P, like)
            call = g.call_function(flex.block_mask, (attr, b_arg, 1, S, S, like.device, *bufs))
    if not dense:
        parts, last = [], call
        for i, p in enumerate(lay):
            if p == flex.TENSOR:
                with g.inserting_after(last):
                    last = g.call_function(operator.getitem, (call, i))
                parts.append(last)
        out = (parts, lay, bufs)
    shared.masks[key] = out
    return out


def _mask_input(mask, path: list) -> bool:
    """Whether ``mask`` reaches the graph as one of its inputs (through the checkpoint
    bodies on ``path``)."""
    node, k = mask, len(path)
    while isinstance(node, Node) and node.op == "placeholder" and k:
        step = path[k - 1]
        i = [p for p in step.body.graph.nodes if p.op == "placeholder"].index(node)
        node, k = step.call.args[1 + i], k - 1
    return isinstance(node, Node) and node.op == "placeholder"


def _carried(mask, path: list) -> bool:
    """Whether the graph input ``mask`` comes from has a reading of an earlier graph."""
    try:
        attention._outer(mask, path)
    except Skip:
        return False
    return True


def _whole(node: Node, home: GraphModule, s, P: int, name: str, shared: _Shared):
    """``node``, a per-token value the mask reads, as the whole sequence's: graph inputs
    with a dim of the local length gathered along it, the ops after them repeated on the
    gathered values. Raises SequenceParallelError for values computed from the local length."""
    key = (id(home), node)
    if key in shared.gathered:
        return shared.gathered[key]
    v = value(node)
    tokens = [d for d, x in enumerate(v.shape) if same_size(x, s)] if v is not None else []
    if node.op == "placeholder":
        if len(tokens) > 1:
            raise SequenceParallelError(f"the mask reads {node.name}, which has several dims of the local length")
        out = node
        if tokens:
            first = next(n for n in home.graph.nodes if n.op != "placeholder")
            with home.graph.inserting_before(first):
                out = home.graph.call_function(sp.gather, (node, tokens[0]), {"group": name})
    elif node.op in ("call_function", "call_method"):
        leaves = tree_leaves((node.args, node.kwargs))
        if any(isinstance(x, Node) and isinstance(x.meta.get("example_value"), torch.SymInt) or
               type(x) is int and hint(s) > 1 and x == hint(s) for x in leaves):
            raise SequenceParallelError(f"the mask reads {node.name}, computed with the local length")
        env = {a: _whole(a, home, s, P, name, shared) for a in node.all_input_nodes}
        if all(env[a] is a for a in env):
            out = node
        else:
            with home.graph.inserting_after(node):
                out = home.graph.node_copy(node, lambda a: env[a])
            out.meta.pop("example_value", None)
    else:
        out = node
    if out is node and tokens:
        raise SequenceParallelError(
            f"the mask reads {node.name}, a per-token value computed inside the graph from this rank's "
            f"tokens alone (pass position_ids: mst_fx.sequence_parallel.shard gives them)")
    shared.gathered[key] = out
    return out


def _layout(mm: MaskMod, B, P: int, q: torch.Tensor) -> tuple:
    """The block mask's layout at the whole sequence's length, from a run on fake tensors."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch._subclasses.fake_tensor import FakeTensor

    mode = q.fake_mode if isinstance(q, FakeTensor) else None
    if mode is None:
        raise SequenceParallelError("the attention inputs have no fake values to plan the block mask with")
    s = q.shape[2]
    S = s * P
    fakes = []
    with mode:
        for local in mm.buffers:
            lv = value(local)
            shape = [x * P if same_size(x, s) else x for x in lv.shape]
            fakes.append(torch.zeros(shape, dtype=lv.dtype, device=lv.device))
        with enable_python_dispatcher():
            parts = flex.block_mask(mm.module, B, 1, S, S, q.device, *fakes)
    return flex.layout(parts, S, S)
