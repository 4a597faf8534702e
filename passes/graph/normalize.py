"""Graph-stage normalization, before detection: a loss the model's code already split over
tokens is joined back, so that the lm_head pass sees one head and chunks it with its own M.

Training libraries write cross-entropy over long sequences as pieces: the flattened logits
and targets split along the tokens (``logits.split(128)``), a per-token loss per piece
(``reduction="none"``), the pieces concatenated and summed, or each piece summed and the
sums added. An order-preserving split of the token dim whose pieces go through the same
row-wise ops and meet again in a ``cat`` along that dim is the identity:
``cat([f(x_k, y_k) for k]) == f(x, y)`` row by row, so the joined graph computes the same
values (each row's ops are the same ops on the same inputs). Pieces that end in a sum over
all their elements and meet in additions give the sum over all tokens: the same terms,
added in another order (equal within rounding).

    merge_token_splits(gm) -> int: joins every such split -> pieces -> cat (or -> sums ->
        additions); returns how many.

Only row-wise ops are joined: a per-token loss with reduction "none" (no class weights),
elementwise ops whose other inputs are scalars or per-class vectors, softmax / log_softmax
over the last dim. A piece used by anything but its own chain, a split not along dim 0, or
pieces that differ in any op leave the graph as it is.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from mst_fx.passes.graph.tokenwise import LOSS_FUNCTIONS, arg_of, classify, value

SPLITS = {torch.split, torch.Tensor.split, "split"}
ROWWISE = {F.log_softmax, F.softmax, torch.log_softmax, torch.softmax, "log_softmax", "softmax"}


def merge_token_splits(gm: GraphModule) -> int:
    """Join each split -> row-wise pieces -> cat of ``gm`` into the ops on the whole input."""
    merged, erased = 0, set()
    for n in list(gm.graph.nodes):
        if n in erased:
            continue
        if _is_row_cat(n):
            meet, pieces = {n}, list(n.args[0])
        else:
            found = _sum_tree(n)
            if found is None:
                continue
            meet, pieces = found
        plan = _match(meet, pieces)
        if plan is not None:
            erased |= _join(gm, n, meet, *plan)
            merged += 1
    return merged


def _is_add(n) -> bool:
    return isinstance(n, Node) and n.op == "call_function" and n.target in (operator.add, torch.add) \
        and len(n.args) == 2 and not n.kwargs


def _sum_tree(root: Node) -> tuple[set[Node], list[Node]] | None:
    """(the additions, the added terms in order) if ``root`` is the last of a chain of
    additions of two or more full sums (``sum(piece_loss.sum() for ...)``; a constant 0
    term, as Python's sum starts with, is dropped)."""
    if not _is_add(root) or any(_is_add(u) for u in root.users):
        return None
    adds, terms = set(), []

    def walk(x):
        if _is_add(x) and (x is root or len(x.users) == 1):
            adds.add(x)
            walk(x.args[0])
            walk(x.args[1])
        elif not (isinstance(x, (int, float)) and x == 0):
            terms.append(x)

    walk(root)
    if len(terms) < 2 or not all(isinstance(t, Node) and _is_full_sum(t) for t in terms):
        return None
    return adds, terms


def _is_full_sum(n: Node) -> bool:
    """A sum over every element: ``x.sum()``, ``torch.sum(x)``, a loss with reduction "sum"."""
    if (n.op == "call_method" and n.target == "sum") or (n.op == "call_function" and n.target is torch.sum):
        return len(n.args) == 1 and not n.kwargs
    if n.op == "call_function" and n.target in LOSS_FUNCTIONS:
        v = value(n.args[0])
        return arg_of(n, 2, "weight") is None and n.kwargs.get("reduction") == "sum" \
            and len(n.args) <= 2 and v is not None and v.dim() == 2
    return False


def _is_row_cat(n: Node) -> bool:
    if not (n.op == "call_function" and n.target is torch.cat and n.args):
        return False
    pieces = n.args[0]
    return isinstance(pieces, (list, tuple)) and len(pieces) >= 2 and \
        all(isinstance(p, Node) for p in pieces) and arg_of(n, 1, "dim", 0) == 0


def _split_piece(n: Node) -> tuple[Node, int] | None:
    """(split node, index) if ``n`` is ``split(x, size)[i]`` along dim 0."""
    if not (n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[1], int)):
        return None
    s = n.args[0]
    if not (isinstance(s, Node) and s.op in ("call_function", "call_method") and s.target in SPLITS):
        return None
    if arg_of(s, 2, "dim", 0) != 0 or not isinstance(arg_of(s, 1, "split_size_or_sections",
                                                             arg_of(s, 1, "split_size")), int):
        return None
    return s, n.args[1]


def _chain(end: Node, k: int) -> tuple[list[Node], dict[Node, Node]] | None:
    """The nodes from ``end`` back to its split pieces (all of index ``k``), in graph order,
    and the pieces by split node; None if a node on the way is not row-wise."""
    nodes: list[Node] = []
    leaves: dict[Node, Node] = {}
    stack, seen = [end], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        piece = _split_piece(n)
        if piece is not None:
            if piece[1] != k:
                return None
            leaves[piece[0]] = n
            continue
        if not (_rowwise(n) or (n is end and _is_full_sum(n))):
            return None
        nodes.append(n)
        for a in n.all_input_nodes:
            if _depends_on_split(a):
                stack.append(a)
            elif not _shared_ok(a, n):
                return None
    order = {n: i for i, n in enumerate(end.graph.nodes)}
    return sorted(nodes, key=order.__getitem__), leaves


def _rowwise(n: Node) -> bool:
    if n.op == "call_function" and n.target in LOSS_FUNCTIONS:
        v = value(n.args[0])
        return arg_of(n, 2, "weight") is None and n.kwargs.get("reduction", "mean") == "none" \
            and len(n.args) <= 2 and v is not None and v.dim() == 2
    if n.target in ROWWISE:
        v = value(n.args[0])
        return v is not None and arg_of(n, 1, "dim") in (-1, v.dim() - 1)
    info = classify(n)
    return info is not None and info.kind == "pointwise"


def _depends_on_split(a: Node, limit: int = 32) -> bool:
    """Whether ``a`` is computed from a split piece (a few nodes back at most)."""
    stack, seen = [a], set()
    while stack and len(seen) < limit:
        n = stack.pop()
        if _split_piece(n) is not None:
            return True
        seen.add(n)
        stack += [x for x in n.all_input_nodes if x not in seen]
    return False


def _shared_ok(a: Node, user: Node) -> bool:
    """An input every piece reads whole: a scalar, or a per-class vector over rows."""
    v, out = value(a), value(user)
    if v is None:
        return False
    return v.numel() == 1 or (v.dim() == 1 and out is not None and out.dim() >= 2 and v.shape[0] == out.shape[-1])


def _match(meet: set[Node], pieces: list[Node]):
    """(the first piece's chain, its split pieces by split node, every chain) when the
    pieces can be joined; ``meet``: the nodes where they meet (the cat, or the additions)."""
    chains = [_chain(p, k) for k, p in enumerate(pieces)]
    if any(c is None for c in chains):
        return None
    template, leaves = chains[0]
    if not leaves or not template:
        return None
    for split in leaves:
        parts = [u for u in split.users]
        sv = split.meta.get("example_value")
        if not isinstance(sv, (tuple, list)) or len(sv) != len(pieces) or len(parts) != len(pieces):
            return None
        if [t.shape[0] for t in sv] != _piece_rows(leaves, chains):
            return None
    members = set()
    for k, (nodes, lv) in enumerate(chains):
        if set(lv) != set(leaves) or len(nodes) != len(template) or not _same_ops(template, nodes, leaves, lv):
            return None
        members.update(nodes)
        members.update(lv.values())
    ends = set(pieces)
    for n in members:  # no piece is used outside its chain
        if any(u not in members and not (u in meet and n in ends) for u in n.users):
            return None
    return template, leaves, chains


def _piece_rows(leaves: dict, chains) -> list:
    """The row counts of the pieces in cat order (of the first split; every split must
    cut the same rows)."""
    first = next(iter(leaves))
    return [value(lv[first]).shape[0] for _, lv in chains]


def _same_ops(a: list[Node], b: list[Node], la: dict, lb: dict) -> bool:
    pair = {la[s]: lb[s] for s in la}
    pair.update(zip(a, b))
    for x, y in zip(a, b):
        if (x.op, x.target) != (y.op, y.target) or x.kwargs.keys() != y.kwargs.keys() \
                or len(x.args) != len(y.args):
            return False
        for u, w in zip(list(x.args) + list(x.kwargs.values()), list(y.args) + list(y.kwargs.values())):
            if isinstance(u, Node):
                if pair.get(u, u) is not w:
                    return False
            elif u != w:
                return False
    return True


def _join(gm: GraphModule, root: Node, meet: set[Node], template: list[Node], leaves: dict[Node, Node],
          chains) -> set[Node]:
    """Replace ``root`` by the template chain on the whole inputs; returns the erased nodes."""
    g = gm.graph
    env = {leaf: split.args[0] for split, leaf in leaves.items()}
    with g.inserting_before(root):
        for n in template:
            env[n] = g.node_copy(n, lambda a: env.get(a, a))
            env[n].meta.pop("example_value", None)
    whole = env[template[-1]]
    root.replace_all_uses_with(whole)
    order = {n: i for i, n in enumerate(g.nodes)}
    erased = set(meet)
    for n in sorted(meet, key=order.__getitem__, reverse=True):
        g.erase_node(n)
    for nodes, lv in reversed(chains):
        for n in reversed(nodes):
            g.erase_node(n)
        for leaf in lv.values():
            g.erase_node(leaf)
        erased.update(nodes, lv.values())
    for split in leaves:
        if not split.users:
            g.erase_node(split)
            erased.add(split)
    return erased
