"""Projections as the passes see them: a plain linear, or one with low-rank updates added.

PEFT's LoRA layer computes ``base(x) + B(A(dropout(x))) * scaling`` (once per active
adapter, then casts back to the base's dtype). To the MLP and vocabulary-projection
passes that whole expression is one projection of ``x``: the same input, the same output
width, token-wise throughout. ``find`` groups such nodes into one ``Projection`` so the
passes chunk the adapter together with its base (and its gradients come out of the same
chunk body), instead of mistaking the rank-r ``A`` for a contracting projection that ends
a block and ``B`` for an expansion that starts one.

Matched structurally, with no PEFT classes: an ``add`` of
  - a projection of x (a plain linear, or an already matched projection of x: stacked
    adapters), used only by that add, and
  - ``B(A(x'))`` optionally multiplied by a number (either side), where x' is x or x
    through dropout and dtype casts, every node on the way used only by the next, and the
    rank of A smaller than both widths of the base.
A merged LoRA is a plain linear already. Anything else is left as it is (the passes then
treat its linears one by one, as before).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from mst_fx.passes.graph.tokenwise import classify

ADD = {operator.add, torch.add}
MUL = {operator.mul, torch.mul}
# Ops allowed between x and the adapter's A: its dropout and PEFT's cast to A's dtype.
CASTS = {"to", "float", "half", "bfloat16", "type_as"}


@dataclass(frozen=True)
class Projection:
    out: Node  # the node whose value is the projection's output
    data: Node  # its token input x, [*tokens, in_width]
    nodes: tuple[Node, ...]  # every node of the projection, graph order, ``out`` last
    base: Node  # the plain linear under it (``out`` itself when there is no adapter)
    in_width: int
    out_width: int
    ranks: tuple[int, ...] = ()  # the low-rank updates' ranks (LoRA adapters), if any

    @property
    def low_rank(self) -> bool:
        return bool(self.ranks)


def find(graph: Graph) -> dict[Node, Projection]:
    """Every projection of ``graph``, keyed by each of its nodes."""
    units: dict[Node, Projection] = {}
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in graph.nodes:
        info = classify(n)
        if info is not None and info.kind == "linear" and isinstance(info.data, Node):
            units[n] = Projection(n, info.data, (n,), n, info.in_width, info.out_width)
    for n in graph.nodes:  # graph order: an inner add is matched before an outer one
        p = _low_rank_sum(n, units)
        if p is not None:
            nodes = tuple(sorted(p.nodes, key=order.__getitem__))
            p = Projection(p.out, p.data, nodes, p.base, p.in_width, p.out_width, p.ranks)
            for m in p.nodes:
                units[m] = p
    return units


def _low_rank_sum(n: Node, units: dict[Node, Projection]) -> Projection | None:
    if n.op != "call_function" or n.target not in ADD or len(n.args) != 2 or n.kwargs:
        return None
    for base_side, update_side in (n.args, reversed(n.args)):
        base = units.get(base_side) if isinstance(base_side, Node) else None
        if base is None or base.out is not base_side or list(base_side.users) != [n]:
            continue
        update = _update(update_side, base)
        if update is not None:
            nodes, rank = update
            return Projection(n, base.data, base.nodes + tuple(nodes) + (n,), base.base,
                              base.in_width, base.out_width, base.ranks + (rank,))
    return None


def _update(node, base: Projection):
    """(nodes, rank) when ``node`` computes ``B(A(x')) [* s]`` of ``base``'s input."""
    nodes = []
    if _only_user(node) and node.op == "call_function" and node.target in MUL and len(node.args) == 2:
        a, b = node.args
        number = b if isinstance(a, Node) else a
        if isinstance(number, (int, float)):
            nodes.append(node)
            node = a if isinstance(a, Node) else b
    up = _linear(node)
    if up is None or not _only_user(node):
        return None
    down = _linear(up.data)
    if down is None or not _only_user(up.data) or down.out_width != up.in_width:
        return None
    rank = down.out_width
    if up.out_width != base.out_width or down.in_width != base.in_width \
            or rank >= min(base.in_width, base.out_width):
        return None
    nodes += [node, up.data]
    x = down.data
    while x is not base.data:  # dropout and casts of x, each used only by the next
        info = classify(x) if isinstance(x, Node) else None
        if info is None or not _only_user(x) or not (
                info.kind == "dropout" or (x.op == "call_method" and x.target in CASTS)):
            return None
        nodes.append(x)
        x = x.args[0]
    return nodes, rank


def _linear(node):
    info = classify(node) if isinstance(node, Node) else None
    return info if info is not None and info.kind == "linear" and isinstance(info.data, Node) else None


def _only_user(node) -> bool:
    return isinstance(node, Node) and len(node.users) == 1
