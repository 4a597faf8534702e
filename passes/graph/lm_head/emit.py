"""lm_head, rewriting: replace a detected head by its chunk loop in the graph (forward mode:
gradients computed per chunk in the forward and accumulated into buffers; recompute mode:
checkpointed chunk bodies), with the bodies from bodies.py."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg

from mst_fx import fx
from mst_fx.passes.graph.chunking import (
    checkpoint_wrapped,
    chunk_rows,
    fresh,
    size_inputs,
    split_tokens,
    symbolic_rows,
)
from mst_fx.passes.graph.lm_head.bodies import full_body, grad_body
from mst_fx.passes.graph.lm_head.detect import (
    KIND,
    LOSS_PARAMS,
    Exit,
    HeadPlan,
    is_rowwise,
    needs_grad,
    shape_dims,
    whole_inputs,
)
from mst_fx.passes.graph.tokenwise import (
    LOSS_FUNCTIONS,
    chunk_call,
    classify,
    numel,
    value,
)
from mst_fx.report import Region


def rewrite(gm: GraphModule, region: Region, names: dict) -> None:
    plan: HeadPlan = region.plan
    rows = _symbolic_counts(plan, region.chunks) if plan.symbolic else chunk_rows(plan.tokens, region.chunks)
    rest, outs = _rest_module(gm, plan)
    if plan.mode == "forward":
        new = _emit_forward(gm, plan, rest, rows, names)
    else:
        new = _emit_recompute(gm, plan, rest, rows, names)
    for e, n in zip(plan.exits, new):
        if e.kind == "logits":
            n.meta[fx.LOGITS_META] = True
        for u in list(e.node.users):
            if u not in plan.nodes:
                u.replace_input_with(e.node, n)
    for n in reversed(plan.proj_nodes + plan.nodes):
        gm.graph.erase_node(n)


def _exit_order(plan: HeadPlan) -> list[Exit]:
    """Body outputs: scalars, then per-token values, then logits."""
    rank = {"scalar": 0, "tokens": 1, "logits": 2}
    return sorted(plan.exits, key=lambda e: rank[e.kind])


def _rest_module(owner: GraphModule, plan: HeadPlan) -> tuple[GraphModule, list[Exit]]:
    """Everything after the projection, on one chunk: inputs (z [n, V], *whole,
    *per-token chunks), outputs the exits in _exit_order (scalar exits as chunk sums)."""
    g = Graph()
    env: dict[Node, Node] = {plan.proj: g.placeholder("z")}
    extra = [plan.bias] if plan.bias is not None else []
    for i, e in enumerate(extra + plan.whole):
        env[e] = g.placeholder(f"w_{i}")
    for i, e in enumerate(plan.per_token):
        env[e] = g.placeholder(f"t_{i}")
    if plan.bias is not None:
        env[plan.proj] = g.call_function(operator.add, (env[plan.proj], env[plan.bias]))
    scalar_exits = {e.node for e in plan.exits if e.kind == "scalar"}
    for n in plan.nodes:
        env[n] = _chunk_node(g, n, env, n in scalar_exits)
    outs = _exit_order(plan)
    g.output(tuple(env[e.node] for e in outs))
    return GraphModule(owner, g), outs


def _chunk_node(g: Graph, n: Node, env: dict, scalar_exit: bool) -> Node:
    m = lambda a: map_arg(a, env.__getitem__)  # noqa: E731
    if n.op == "call_function" and n.target in LOSS_FUNCTIONS:
        kwargs = dict(n.kwargs)
        for k, a in zip(LOSS_PARAMS[2:], n.args[2:]):
            kwargs[k] = a
        kwargs["reduction"] = "sum" if scalar_exit else "none"
        return g.call_function(n.target, (m(n.args[0]), m(n.args[1])), m(kwargs))
    if scalar_exit:  # .sum() / .mean() of everything: the chunk's sum
        return g.call_function(torch.sum, (m(n.args[0]),))
    if is_rowwise(n):
        kwargs = {k: v for k, v in n.kwargs.items() if k != "dim"}
        return g.call_function(F.log_softmax if "log" in fx.target_name(n) else F.softmax,
                               (m(n.args[0]),), {"dim": -1, **m(kwargs)})
    if fx.target_name(n) == "logsumexp":
        return g.call_function(torch.logsumexp, (m(n.args[0]), -1))
    info = classify(n)
    call = chunk_call(n, info)
    if call is None or info.kind == "view":  # regrouping tokens: identity on a chunk
        return env[n.args[0]]
    op, target, args, kwargs = call
    return g.create_node(op, target, m(args), m(kwargs))


def _emit_forward(gm: GraphModule, plan: HeadPlan, rest: GraphModule, rows: list[int],
                  names: dict) -> list[Node]:
    from mst_fx import ops  # noqa: F401  (registers torch.ops.mst_fx)

    g = gm.graph
    whole = whole_inputs(plan)
    need_h, need_w = needs_grad(plan.data), needs_grad(plan.weight)
    grad_whole = [i for i, w in enumerate(whole) if needs_grad(w) and value(w).is_floating_point()]
    wv = value(plan.weight)
    low = wv.dtype in (torch.bfloat16, torch.float16)
    acc_dtype = torch.float32 if low and plan.fp32_weight_grad else wv.dtype
    outs = _exit_order(plan)
    logits = [e for e in outs if e.kind == "logits"]
    zdtype = value(plan.proj).dtype

    with g.inserting_before(plan.after.next):
        cursor = _Cursor(g)
        flat = cursor.method("reshape", plan.data, (-1, plan.width))
        hd = cursor.method("detach", flat)
        wd = cursor.method("detach", plan.weight)
        whole_d = [cursor.method("detach", w) for w in whole]
        split, sizes, n_tokens, body_sizes = _splitter(gm, cursor, plan, flat, len(rows))
        parts = split(hd)
        tok_parts = [split(cursor.method("reshape", cursor.method("detach", t), (-1,))) for t in plan.per_token]
        acc = None  # the weight gradient: the first chunk's product, then added into
        gh = cursor.fn(torch.empty_like, hd) if need_h else None
        bufs = [None if plan.drop_logits else
                cursor.method("new_empty", hd, (n_tokens, plan.vocab), dtype=zdtype) for _ in logits]
        sums, whole_grads = [], [None] * len(grad_whole)
        start = 0
        for k, n in enumerate(rows):
            if plan.symbolic:
                start = cursor.fn(operator.mul, sizes[0], k)
            attr, ident = _body_name(gm, plan, rest, names, n, "forward", need_h, need_w, grad_whole,
                                     [v for _, v in body_sizes])
            piece = cursor.fn(operator.getitem, parts, k)
            toks = [cursor.fn(operator.getitem, p, k) for p in tok_parts]
            call = cursor.fn(fx.INVOKE, cursor.get_attr(attr), ident, piece, wd, *whole_d, *toks,
                             *(x for x, _ in body_sizes))
            n_out = 1 + need_h + need_w + len(grad_whole) + len(bufs)
            got = [cursor.fn(operator.getitem, call, i) for i in range(n_out)]  # body outputs
            sums.append(got.pop(0))
            if need_h:
                cursor.fn(torch.ops.mst_fx.write_rows, gh, start, got.pop(0))
            if need_w:
                dz = got.pop(0)
                # W [H, V]: dW += h^T dz; W [V, H]: dW += dz^T h
                a, b = (cursor.method("t", piece), dz) if plan.matmul else (cursor.method("t", dz), piece)
                if acc is None:
                    acc = cursor.fn(torch.ops.mst_fx.mm_acc, a, b, acc_dtype)
                else:
                    cursor.fn(torch.ops.mst_fx.addmm_into, acc, a, b)
            for j in range(len(grad_whole)):
                gpart = got.pop(0)
                whole_grads[j] = gpart if whole_grads[j] is None else cursor.fn(operator.add, whole_grads[j], gpart)
            for b in bufs:
                lg = got.pop(0)
                if b is not None:
                    cursor.fn(torch.ops.mst_fx.write_rows, b, start, lg)
            if not plan.symbolic:
                start += n
        total = cursor.method("sum", cursor.fn(torch.stack, sums))
        terms = []
        if need_h:
            terms.append(cursor.method("sum", cursor.fn(operator.mul, flat, gh), dtype=torch.float32))
        for j, i in enumerate(grad_whole):
            terms.append(cursor.method("sum", cursor.fn(operator.mul, whole[i], whole_grads[j]),
                                       dtype=torch.float32))
        loss_dtype = value(outs[0].node).dtype
        zero = None  # an exactly zero term that carries the gradients (docstring)
        if terms:
            s = terms[0]
            for t in terms[1:]:
                s = cursor.fn(operator.add, s, t)
            zero = cursor.method("to", cursor.fn(operator.sub, s, cursor.method("detach", s)), loss_dtype)
        if need_w:
            # Autograd keeps the weight gradient from the forward to the backward (for a tied
            # weight, to the end of it): in the weight's dtype, the fp32 accumulator rounded
            # once here (see mst_fx.ops).
            dw = acc if acc_dtype == wv.dtype else cursor.method("to", acc, wv.dtype)
            if zero is None:
                zero = cursor.method("to", cursor.fn(torch.zeros_like, total), loss_dtype)
            zero = cursor.fn(torch.ops.mst_fx.with_grad, zero, plan.weight, dw)
        new = {outs[0].node: _mean(cursor, plan, outs[0], total, zero)}
        for e, b in zip(logits, bufs):
            new[e.node] = _logits_value(cursor, plan, e, b, hd)
    return [new[e.node] for e in plan.exits]


def _emit_recompute(gm: GraphModule, plan: HeadPlan, rest: GraphModule, rows: list[int],
                    names: dict) -> list[Node]:
    from mst_fx import ops  # noqa: F401

    g = gm.graph
    whole = whole_inputs(plan)
    outs = _exit_order(plan)
    zdtype = value(plan.proj).dtype
    with g.inserting_before(plan.after.next):
        cursor = _Cursor(g)
        flat = cursor.method("reshape", plan.data, (-1, plan.width))
        split, sizes, n_tokens, body_sizes = _splitter(gm, cursor, plan, flat, len(rows))
        parts = split(flat)
        tok_parts = [split(cursor.method("reshape", t, (-1,))) for t in plan.per_token]
        logit_exits = [e for e in outs if e.kind == "logits"]
        bufs = [None if plan.drop_logits else
                cursor.method("new_empty", flat, (n_tokens, plan.vocab), dtype=zdtype)
                for _ in logit_exits]
        collected: list[list[Node]] = [[] for _ in outs]
        start = 0
        for k, n in enumerate(rows):
            if plan.symbolic:
                start = cursor.fn(operator.mul, sizes[0], k)
            attr, ident = _body_name(gm, plan, rest, names, n, "recompute", True, True, [],
                                     [v for _, v in body_sizes])
            piece = cursor.fn(operator.getitem, parts, k)
            toks = [cursor.fn(operator.getitem, p, k) for p in tok_parts]
            call = cursor.fn(fx.INVOKE, cursor.get_attr(attr), ident, piece, *plan.proj_inputs(), *whole, *toks,
                             *(x for x, _ in body_sizes))
            for i, e in enumerate(outs):
                y = cursor.fn(operator.getitem, call, i)
                if e.kind == "logits":
                    b = bufs[logit_exits.index(e)]
                    if b is not None:
                        cursor.fn(torch.ops.mst_fx.write_rows, b, start, cursor.method("detach", y))
                else:
                    collected[i].append(fresh(g, y))
            if not plan.symbolic:
                start += n
        new = {}
        for i, e in enumerate(outs):
            if e.kind == "scalar":
                new[e.node] = _mean(cursor, plan, e, cursor.method("sum", cursor.fn(torch.stack, collected[i])))
            elif e.kind == "tokens":
                joined = cursor.fn(torch.cat, collected[i])
                new[e.node] = cursor.method("reshape", joined, _shape_of(cursor, plan, e.node, flat))
            else:
                new[e.node] = _logits_value(cursor, plan, e, bufs[logit_exits.index(e)], flat)
    return [new[e.node] for e in plan.exits]


def _splitter(gm: GraphModule, cursor, plan: HeadPlan, flat: Node, chunks: int):
    """How the loop cuts the tokens: (split function, row-count nodes or None, token count,
    (node, example) of the sizes passed to every body). Symbolic token counts: see
    mst_fx.passes.graph.chunking (no guard on n; the bodies take the symbolic sizes so that
    Inductor can bind their shapes: chunking.size_inputs)."""
    g = gm.graph
    if not plan.symbolic:
        return (lambda t: split_tokens(g, t, chunks, False)), None, plan.tokens, []
    sizes = symbolic_rows(g, flat, chunks)
    body_sizes = size_inputs(gm, plan.data, value(plan.data).shape[:-1])
    return (lambda t: split_tokens(g, t, chunks, True, sizes)), sizes, cursor.method("size", flat, 0), body_sizes


def _mean(cursor, plan: HeadPlan, e: Exit, total: Node, zero: Node | None = None) -> Node:
    """The exit's value from the sum of its chunks; ``zero`` (forward mode) is the exactly
    zero term that carries the gradients."""
    if e.mean is None or isinstance(e.mean, int):
        value_ = total if zero is None else cursor.fn(operator.add, total, zero)
        return value_ if e.mean is None else cursor.fn(operator.truediv, value_, e.mean)
    _, target, ignore = e.mean
    count = cursor.method("sum", cursor.fn(operator.ne, target, ignore))
    mean = cursor.fn(operator.truediv, total, count)
    if zero is None:
        return mean
    # With every label ignored the mean is 0/0 = nan and eager's gradients are zero; the
    # stored gradients are zero then, and dividing them by 1 keeps them zero (1/0 would
    # make them nan).
    return cursor.fn(operator.add, mean,
                     cursor.fn(operator.truediv, zero, cursor.method("clamp", count, min=1)))


def _logits_value(cursor, plan: HeadPlan, e: Exit, buf: Node | None, like: Node) -> Node:
    if buf is None:
        return cursor.method("new_empty", like, (0,), dtype=value(e.node).dtype)
    return cursor.method("reshape", buf, _shape_of(cursor, plan, e.node, like))


def _shape_of(cursor, plan: HeadPlan, node: Node, flat: Node) -> tuple:
    """``node``'s shape as reshape arguments; symbolic dims read at run time."""
    if not plan.symbolic:
        return tuple(value(node).shape)
    data_shape = value(plan.data).shape
    dims = shape_dims(value(node).shape, data_shape, numel(tuple(data_shape[:-1])))
    return tuple(d if isinstance(d, int) else cursor.method("size", plan.data, d[1]) if d[0] == "data"
                 else cursor.method("size", flat, 0) for d in dims)


class _Cursor:
    """Appends nodes one after another at the graph's insertion point."""

    def __init__(self, g: Graph):
        self.g = g

    def fn(self, target, *args, **kwargs) -> Node:
        return self.g.call_function(target, args, kwargs)

    def method(self, name, *args, **kwargs) -> Node:
        return self.g.call_method(name, args, kwargs)

    def get_attr(self, name) -> Node:
        return self.g.get_attr(name)


def _body_name(gm: GraphModule, plan: HeadPlan, rest: GraphModule, names: dict, rows: int,
               mode: str, need_h: bool, need_w: bool, grad_whole: list[int], sizes: list = ()) -> tuple[str, str]:
    """The attribute and invoke_subgraph identifier of the body for chunks of ``rows``
    tokens, built on first use; equal heads (same code, shapes, dtypes) share one."""
    whole = whole_inputs(plan)
    sig = [(tuple(value(a).shape), str(value(a).dtype))
           for a in [plan.data] + plan.proj_inputs() + whole + plan.per_token]
    proj = plan.adapted.key if plan.adapted is not None else plan.matmul
    key = (f"{KIND}|{rest.code}|{mode}|{proj}|{need_h}|{need_w}|{grad_whole}|{sig}|rows={rows}"
           f"|sizes={[str(x) for x in sizes]}")
    if key not in names:
        i = len(names)
        attr, ident = fx.body_names(KIND, i)
        if mode == "forward":
            body = grad_body(plan, rest, rows, need_h, need_w, grad_whole, list(sizes))
        else:
            n_in = 1 + len(plan.proj_inputs()) + len(whole) + len(plan.per_token) + len(sizes)
            body = checkpoint_wrapped(full_body(gm, plan, rest, len(sizes)), n_in, len(plan.exits))
        names[key] = (attr, ident, body)
    attr, ident, body = names[key]
    if not hasattr(gm, attr):
        gm.add_submodule(attr, body)
    return attr, ident


def _symbolic_counts(plan: HeadPlan, chunks: int) -> list:
    """symbolic_rows' row counts as SymInts of the graph's token count (M-1 of n // M, then
    the rest): a chunk body's shape, and in its name, two bodies per head as for static n."""
    n = numel(tuple(value(plan.data).shape[:-1]))
    q = n // chunks
    return [q] * (chunks - 1) + [n - q * (chunks - 1)]
