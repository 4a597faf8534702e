"""Rewrite the partitioned forward and backward graphs so that the chosen saved tensors
(select.py) live in host memory between the two (the ops: transfer.py).

Forward, for each chosen tensor x:

    x = ...                              (its producer)
    host = mst_fx.offload(x)             right after it: the copy starts at once
    ...                                  x's forward users
    host = mst_fx.transfer_wait(host, x) after the last of them (x's memory is then free)
    return ..., host, ...                saved for the backward in x's place

and first of all ``mst_fx.reserve_host(sizes)``, the chosen tensors' bytes (expressions of
the graph's symbols in a symbolic graph), which fails before anything is copied if the host
has no room for them.

Backward, the chosen placeholders in the order the graph first reads them; the k-th is
brought back while the (k-1)-th is still in use, one checkpointed layer ahead:

    x = mst_fx.reload(host_k, device)    issued just before the wait of host_{k-1} (the
                                         first: at the top of the graph)
    x = mst_fx.transfer_wait(x, host_k)  just before x's first user

Values and gradients are those of the graph before: only where the saved tensors are
between forward and backward changes.
"""

from __future__ import annotations

import operator

import sympy
import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.shape_prop import _extract_tensor_metadata

import mst_fx.passes.partition.transfer  # noqa: F401 - registers the ops

OFFLOAD = torch.ops.mst_fx.offload.default
RELOAD = torch.ops.mst_fx.reload.default
WAIT = torch.ops.mst_fx.transfer_wait.default
RESERVE = torch.ops.mst_fx.reserve_host.default


def _set_val(node: Node, val) -> None:
    node.meta["val"] = val
    if isinstance(val, torch.Tensor):
        node.meta["tensor_meta"] = _extract_tensor_metadata(val)


def _last_forward_use(node: Node, order: dict) -> Node:
    """The last node that reads ``node`` or a view of it (the output excluded)."""
    last, stack = node, [node]
    while stack:
        for user in stack.pop().users:
            if user.op == "output":
                continue
            if order[user] > order[last]:
                last = user
            if isinstance(user.target, torch._ops.OpOverload) and user.target.is_view:
                stack.append(user)
    return last


def offload_forward(fw: GraphModule, names: set[str], num_fwd_outputs: int) -> dict[str, Node]:
    """Copy the saved tensors named ``names`` to host memory in ``fw`` (see the module).
    Returns each one's node (its device value) by name."""
    graph = fw.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    output = graph.find_nodes(op="output")[0]
    outputs = list(output.args[0])
    on_host: dict[Node, Node] = {}
    for node in outputs[num_fwd_outputs:]:
        if not isinstance(node, Node) or node.name not in names or node in on_host:
            continue
        last = _last_forward_use(node, order)
        with graph.inserting_after(node):
            host = graph.call_function(OFFLOAD, (node,))
        _set_val(host, node.meta["val"].to("cpu"))
        with graph.inserting_after(last if last is not node else host):
            done = graph.call_function(WAIT, (host, node))
        _set_val(done, host.meta["val"])
        on_host[node] = done
    outputs[num_fwd_outputs:] = [on_host.get(n, n) for n in outputs[num_fwd_outputs:]]
    output.update_arg(0, tuple(outputs))
    return {n.name: n for n in on_host}


def reload_backward(bw: GraphModule, offloaded: dict[str, Node]) -> None:
    """Bring the placeholders of the tensors ``offload_forward`` offloaded (``offloaded``,
    its result) back from host memory in ``bw`` (see the module)."""
    graph = bw.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    chosen = [p for p in graph.find_nodes(op="placeholder") if p.name in offloaded and p.users]
    chosen.sort(key=lambda p: min(order[u] for u in p.users))
    top = next(n for n in graph.nodes if n.op != "placeholder")
    previous_wait = None
    for p in chosen:
        device_val = p.meta["val"]
        first_user = min(p.users, key=lambda u: order[u])
        _set_val(p, device_val.to("cpu"))
        with graph.inserting_before(previous_wait if previous_wait is not None else top):
            back = graph.call_function(RELOAD, (p, device_val.device))
        _set_val(back, device_val)
        with graph.inserting_before(first_user):
            ready = graph.call_function(WAIT, (back, p))
        _set_val(ready, device_val)
        p.replace_all_uses_with(ready, delete_user_cb=lambda u: u not in (back, ready))
        previous_wait = ready


def reserve_host(graph, vals) -> None:
    """``mst_fx.reserve_host`` with the bytes of ``vals`` (the offloaded tensors' device
    values) at the top of the forward graph. Raises ValueError if a size is an expression
    that cannot be written as graph nodes (the graph is then as before)."""
    if not vals:
        return
    pinned = any(v.is_cuda for v in vals)
    top = next(n for n in graph.nodes if n.op != "placeholder")
    symbols = _symbol_nodes(graph)
    with graph.inserting_before(top):
        sizes = [_emit(graph, sympy.sympify(_expr(v.numel() * v.element_size())), symbols)
                 for v in vals]  # nodes left by a failure have no users: dead code
        graph.call_function(RESERVE, (sizes, pinned))


def _expr(n):
    return n.node.expr if isinstance(n, torch.SymInt) else int(n)


def _symbol_nodes(graph) -> dict:
    """Each free symbol of the graph's inputs -> a node of its value (a SymInt input, or a
    size of a tensor input, read with sym_size when first needed)."""
    found: dict = {}
    for p in graph.find_nodes(op="placeholder"):
        val = p.meta.get("val")
        if isinstance(val, torch.SymInt) and isinstance(val.node.expr, sympy.Symbol):
            found.setdefault(val.node.expr, p)
    for p in graph.find_nodes(op="placeholder"):
        val = p.meta.get("val")
        if isinstance(val, torch.Tensor):
            for dim, s in enumerate(val.shape):
                if isinstance(s, torch.SymInt) and isinstance(s.node.expr, sympy.Symbol):
                    found.setdefault(s.node.expr, (p, dim, s))
    return found


def _emit(graph, expr, symbols: dict):
    """``expr`` (sums and products of the graph's symbols and integers) as graph nodes, or an
    int. Raises ValueError for anything else (floor divisions, ...)."""
    if expr.is_Integer:
        return int(expr)
    if expr.is_Symbol:
        if expr not in symbols:
            raise ValueError(f"no input gives the value of {expr}")
        where = symbols[expr]
        if isinstance(where, tuple):
            p, dim, s = where
            node = graph.call_function(torch.ops.aten.sym_size.int, (p, dim))
            _set_val(node, s)
            symbols[expr] = where = node
        return where
    if expr.is_Add or expr.is_Mul:
        op = operator.add if expr.is_Add else operator.mul
        terms = [_emit(graph, a, symbols) for a in expr.args]
        acc = terms[0]
        for t in terms[1:]:
            acc = _apply(graph, op, acc, t)
        return acc
    if expr.is_Pow and expr.exp.is_Integer and int(expr.exp) > 0:
        base = _emit(graph, expr.base, symbols)
        acc = base
        for _ in range(int(expr.exp) - 1):
            acc = _apply(graph, operator.mul, acc, base)
        return acc
    raise ValueError(f"cannot emit {expr}")


def _apply(graph, op, a, b):
    if not isinstance(a, Node) and not isinstance(b, Node):
        return op(a, b)
    node = graph.call_function(op, (a, b))
    vals = [x.meta["val"] if isinstance(x, Node) else x for x in (a, b)]
    _set_val(node, op(*vals))
    return node
