"""Which saved activations the offload pass moves to host memory (detection: reads the
partitioned forward and backward graphs, changes nothing).

The partitioner's forward graph returns the model's outputs, then the tensors saved for the
backward; the backward graph takes those as placeholders of the same names. A saved tensor
is offloaded if it is

- a checkpoint boundary: a tensor a recomputed region of the backward starts from (a
  checkpointed layer's input, under HF gradient checkpointing or ``torch.utils.checkpoint``),
  of any size; or any other saved tensor of at least ``min_bytes`` (at the size the graph
  was compiled for: the first length, or the hint of a symbolic one);
- and one the copies can take: computed in the graph (the graph's inputs, the weights and
  the token ids, are kept by its caller anyway, and not listed), not a model output, not a view or one output of a
  multi-output op (its memory is another tensor's), contiguous, on a CUDA device (or the
  CPU, where the tests run the same graph with plain copies).

Every saved tensor not taken gets the reason, for explain().
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node
from torch.utils.checkpoint import CheckpointPolicy

RECOMPUTED = (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_RECOMPUTE)


@dataclass
class Saved:
    """One tensor the forward saves for the backward. ``nbytes`` at the compiled size;
    ``size`` the byte count as the graph states it (an expression in a symbolic graph);
    ``reason`` why it stays on the device (None: offloaded)."""

    name: str
    nbytes: int
    size: str
    boundary: bool
    reason: str | None = None

    @property
    def offloaded(self) -> bool:
        return self.reason is None


def hint(n) -> int:
    """An int, or a SymInt's value at the size the graph was compiled for."""
    if isinstance(n, torch.SymInt):
        return int(n.node.shape_env.optimization_hint(n.node.expr)) \
            if hasattr(n.node.shape_env, "optimization_hint") else int(n.node.shape_env.size_hint(n.node.expr))
    return int(n)


def saved_tensors(fw: GraphModule, num_fwd_outputs: int) -> list[Node]:
    """The forward's outputs that are tensors saved for the backward, in order."""
    outputs = fw.graph.find_nodes(op="output")[0].args[0]
    return [n for n in outputs[num_fwd_outputs:]
            if isinstance(n, Node) and isinstance(n.meta.get("val"), torch.Tensor)]


def is_boundary(placeholder: Node) -> bool:
    """Whether a recomputed region of the backward reads this saved tensor."""
    return any(u.meta.get("recompute") in RECOMPUTED for u in placeholder.users)


def choose(fw: GraphModule, bw: GraphModule, num_fwd_outputs: int, min_bytes: int) -> list[Saved]:
    """A Saved for every tensor the forward computes and saves (the graph's inputs, which
    its caller keeps anyway, are not listed); the offloaded ones have no reason."""
    outputs = fw.graph.find_nodes(op="output")[0].args[0]
    model_outputs = {n for n in outputs[:num_fwd_outputs] if isinstance(n, Node)}
    bw_inputs = {n.name: n for n in bw.graph.find_nodes(op="placeholder")}
    found = []
    seen = set()
    for node in saved_tensors(fw, num_fwd_outputs):
        if node in seen or node.op == "placeholder":
            continue
        seen.add(node)
        val = node.meta["val"]
        size = val.numel() * val.element_size()
        placeholder = bw_inputs.get(node.name)
        saved = Saved(node.name, hint(size), str(size), placeholder is not None and is_boundary(placeholder))
        saved.reason = why_kept(node, val, saved, placeholder, model_outputs, min_bytes)
        found.append(saved)
    return found


def why_kept(node: Node, val: torch.Tensor, saved: Saved, placeholder: Node | None,
             model_outputs: set, min_bytes: int) -> str | None:
    """Why ``node`` (computed by the forward) is not offloaded, or None."""
    if node in model_outputs:
        return "also an output of the model"
    if placeholder is None or not placeholder.users:
        return "no backward placeholder reads it"
    if node.target is operator.getitem or _is_view(node):
        return "a view or one output of a multi-output op"
    if val.device.type not in ("cuda", "cpu"):
        return f"on {val.device.type}, not CUDA"
    if not val.is_contiguous():
        return "not contiguous"
    if not saved.boundary and saved.nbytes < min_bytes:
        return f"{saved.nbytes} bytes, under offload_min_bytes and not a checkpoint boundary"
    return None


def _is_view(node: Node) -> bool:
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and target.is_view
