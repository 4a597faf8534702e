"""Projections by a frozen, stored-compressed weight, written as a ``torch.autograd.Function``:
opened into the weight's decompression and a plain linear, so the passes see a projection.

Quantized linears are written this way by the two common stacks: torchao's NF4 tensor
(``LinearNF4``: forward ``linear(x, w.to(x.dtype))``, backward ``g @ w.to(g.dtype)``, no
gradient for ``w``; torchtune's QLoRA) and bitsandbytes' ``MatMul4Bit`` (the same with
``dequantize_4bit``). Dynamo traces such a call to ``autograd_function_apply(fwd, bwd, *ops)``.
The MLP and head passes cannot look inside it; opened, it is ``W = f(w)`` (the
decompression, read from the forward body) followed by ``linear(x, W.detach(), b)``, which
they chunk like any linear, with ``W`` computed once and handed whole to every chunk.

    open_frozen_linears(gm) -> int: opens every such call of ``gm``; returns how many.

It is opened only when that is provably the same function with the same gradients:
  - the forward body is ``linear(x, f(...), bias?)`` with ``x`` one operand and ``f`` a chain
    of ops on the other operands only (no read of ``x``, nothing in place or random), its one
    output that linear;
  - the backward body returns ``g @ f'(...)`` for ``x``, where ``f'`` is the forward's weight
    expression, op for op, over the values the forward saved, and None for every other
    operand: exactly the derivative of the linear in ``x``, and no gradient elsewhere, as
    ``detach`` gives.
Anything else (a weight gradient, a backward that is not that product, an output besides the
linear) leaves the call as it is: the passes then report it as not token-wise.

What the opened form keeps for backward (tests/test_quantized.py): inside a checkpointed
region, the codes, as the unmodified model does (the region's recompute repeats the
decompression before its backward). Outside one, the dequantized weight, as plain
torch.compile keeps it too (its partitioner does not recompute the decompression, and a
chunk body's inputs are saved whole); eager keeps the codes there.
"""

from __future__ import annotations

import operator

from torch.fx import Graph, GraphModule, Node

from mst_fx.passes.graph.tokenwise import _SET_GRAD, AUTOGRAD_FUNCTION, LINEAR_FUNCTIONS, MATMUL_FUNCTIONS

RANDOM = ("dropout", "rand", "bernoulli", "normal", "uniform", "multinomial")


def open_frozen_linears(gm: GraphModule) -> int:
    """Open each frozen-weight linear autograd.Function call of ``gm``; returns how many."""
    opened, bodies = 0, set()
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target is AUTOGRAD_FUNCTION:
            attrs = [a.target for a in n.args[:2] if isinstance(a, Node) and a.op == "get_attr"]
            if _open(gm, n):
                opened += 1
                bodies.update(attrs)
    if opened:
        gm.graph.eliminate_dead_code()
        # Only the opened calls' bodies: a checkpointed region's body module keeps its own
        # submodules, which this graph's get_attr nodes do not show as used.
        used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for name in bodies - used:
            delattr(gm, name)
    return opened


def _bodies(gm: GraphModule, n: Node) -> tuple[GraphModule, GraphModule] | None:
    got = [getattr(gm, a.target, None) if isinstance(a, Node) and a.op == "get_attr" else None
           for a in n.args[:2]]
    return tuple(got) if all(isinstance(b, GraphModule) for b in got) else None


def _open(gm: GraphModule, n: Node) -> bool:
    bodies = _bodies(gm, n)
    users = list(n.users)
    if bodies is None or not users or any(
            u.target is not operator.getitem or u.args[1] != 0 for u in users):
        return False
    fwd, bwd = bodies
    match = _forward(fwd.graph)
    if match is None or not _backward(bwd.graph, match):
        return False
    lin, data_pos, places = match
    operands = n.args[2:]
    if len(operands) != len(places) or not isinstance(operands[data_pos], Node):
        return False
    env = {p: operands[i] for i, p in enumerate(places)}
    with gm.graph.inserting_before(n):
        copied = {}

        def copy(a):
            if not isinstance(a, Node):
                return a
            if a in env:
                return env[a]
            if a not in copied:
                m = gm.graph.node_copy(a, copy)
                m.meta = {k: v for k, v in a.meta.items() if k != "example_value"}
                copied[a] = m
            return copied[a]

        weight = gm.graph.call_method("detach", (copy(lin.args[1]),))
        args = [env[lin.args[0]], weight]
        if len(lin.args) > 2 and lin.args[2] is not None:
            args.append(gm.graph.call_method("detach", (copy(lin.args[2]),)))
        out = gm.graph.call_function(lin.target, tuple(args))
    out.meta = {k: v for k, v in users[0].meta.items()}
    for u in users:
        u.replace_all_uses_with(out)
        gm.graph.erase_node(u)
    gm.graph.erase_node(n)
    return True


def _forward(g: Graph):
    """(the linear node, the data operand's position, the body's placeholders) when the
    forward body is one linear of an operand by a weight expression of the others."""
    places = [m for m in g.nodes if m.op == "placeholder"]
    out = next(m for m in g.nodes if m.op == "output")
    result = out.args[0]
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], tuple)
            and len(result[0]) == 1 and isinstance(result[0][0], Node)):
        return None
    lin = result[0][0]
    if lin.op != "call_function" or lin.target not in LINEAR_FUNCTIONS or lin.kwargs:
        return None
    data = lin.args[0]
    if data not in places:
        return None
    for a in lin.args[1:]:
        if isinstance(a, Node) and not _pure_of(a, data):
            return None
    if set(data.users) != {lin}:
        return None  # the data is used by anything but the linear
    return lin, places.index(data), places


def _pure_of(a: Node, data: Node) -> bool:
    """``a`` is computed from placeholders other than ``data`` by pure, deterministic ops."""
    seen, todo = set(), [a]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        if m is data:
            return False
        if m.op == "placeholder":
            continue
        if m.op not in ("call_function", "call_method"):
            return False
        name = m.target if isinstance(m.target, str) else getattr(m.target, "__name__", "")
        if name.endswith("_") or any(r in name for r in RANDOM):
            return False
        todo.extend(x for x in m.all_input_nodes)
    return True


def _backward(g: Graph, match) -> bool:
    """The backward body returns ``g @ W`` for the data operand, with ``W`` the forward's
    weight expression over the saved values, and None for every other operand."""
    lin, data_pos, fplaces = match
    fwd_out = next(m for m in lin.graph.nodes if m.op == "output").args[0]
    saved = fwd_out[1]
    places = [m for m in g.nodes if m.op == "placeholder"]
    if len(places) != 1 + len(saved) or not all(isinstance(s, Node) for s in saved):
        return False
    grad, rest = places[0], places[1:]
    out = next(m for m in g.nodes if m.op == "output").args[0]
    if not isinstance(out, tuple) or len(out) != len(fplaces):
        return False
    if any(v is not None for i, v in enumerate(out) if i != data_pos):
        return False
    dx = out[data_pos]
    if not (isinstance(dx, Node) and dx.op == "call_function" and dx.target in MATMUL_FUNCTIONS
            and len(dx.args) == 2 and not dx.kwargs and dx.args[0] is grad):
        return False
    env = dict(zip(rest, saved))
    return _same(dx.args[1], lin.args[1], env, grad)


def _same(b, f, env: dict, grad: Node) -> bool:
    """Backward node ``b`` computes what forward node ``f`` does, op for op, with the saved
    values mapped to what they were in the forward; nothing read from the gradient."""
    if isinstance(b, Node) and b in env:
        return env[b] is f
    if isinstance(b, Node) != isinstance(f, Node):
        return False
    if not isinstance(b, Node):
        if isinstance(b, (tuple, list)) and isinstance(f, (tuple, list)):
            return len(b) == len(f) and all(_same(x, y, env, grad) for x, y in zip(b, f))
        return b == f
    if b is grad or b.op != f.op or b.target != f.target or b.op == "placeholder":
        return False
    if b.target is _SET_GRAD or set(b.kwargs) != set(f.kwargs) or len(b.args) != len(f.args):
        return False
    return (all(_same(x, y, env, grad) for x, y in zip(b.args, f.args))
            and all(_same(b.kwargs[k], f.kwargs[k], env, grad) for k in b.kwargs))
