"""FX helpers every stage shares: the higher-order ops mst_fx emits and reads, the one walker
over activation-checkpointed bodies, the one readable name of a node's target, and the names
mst_fx gives what it generates.

Generated names are a protocol between stages: the graph passes name their chunk bodies
``mst_<kind>_<i>``; invoke_subgraph's autograd names the graphs it derives from a body
``partitioned_fw_<id>`` / ``partitioned_bw_<id>`` (and ``fw_``/``bw_`` in schemas); the
post-grad passes find mst_fx's bodies by these names. They are made and read only here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.fx import GraphModule, Node

INVOKE = torch.ops.higher_order.invoke_subgraph
CHECKPOINT = torch.ops.higher_order.tag_activation_checkpoint

PREFIX = "mst_"
LOGITS_META = "mst_fx_logits"  # node.meta key: a graph output the head pass made gradient-free
_FORWARD = "partitioned_fw_" + PREFIX
_BACKWARD = "partitioned_bw_" + PREFIX
_SCHEMA = re.compile(r"((fw|bw)_)?" + PREFIX)


@dataclass(frozen=True)
class Step:
    """One activation-checkpoint level: ``call`` (a tag_activation_checkpoint node in
    ``parent``) runs ``body``."""

    parent: GraphModule
    call: Node
    body: GraphModule


def checkpoint_bodies(gm: GraphModule, path: tuple[Step, ...] = ()) -> Iterator[tuple[GraphModule, tuple[Step, ...]]]:
    """``gm`` and every activation-checkpointed body under it, depth first, each with the
    steps that lead to it from ``gm`` (a body called twice comes twice)."""
    yield gm, path
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is CHECKPOINT and n.args[0].op == "get_attr":
            body = getattr(gm, n.args[0].target)
            if isinstance(body, GraphModule):
                yield from checkpoint_bodies(body, path + (Step(gm, n, body),))


def target_name(node: Node) -> str:
    """The target's name: a method's name, a function's ``__name__``, else its text."""
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def op_name(node: Node) -> str:
    """A short readable name for reasons in reports: "mul_3 (mul)"."""
    return f"{node.name} ({target_name(node)})"


def body_names(kind: str, i: int) -> tuple[str, str]:
    """The attribute and invoke_subgraph identifier of a graph pass's i-th chunk body."""
    return f"{PREFIX}{kind}_body_{i}", f"{PREFIX}{kind}_{i}"


def attr_name(what: str) -> str:
    """The name of another generated attribute or placeholder (a mask function, a threaded
    input)."""
    return PREFIX + what


def barrier_name(i: int) -> str:
    return f"{PREFIX}barrier_{i}"


def is_forward_body(identifier) -> bool:
    """An invoke_subgraph identifier of the forward graph autograd derived from our body."""
    return isinstance(identifier, str) and identifier.startswith(_FORWARD)


def is_backward_body(identifier) -> bool:
    return isinstance(identifier, str) and identifier.startswith(_BACKWARD)


def is_ours(identifier: str) -> bool:
    """An identifier of one of our bodies, or of a graph invoke_subgraph derived from one."""
    return bool(_SCHEMA.match(identifier))
