"""lm_head, chunk bodies: the graphs one chunk runs. ``full_body``: projection and rest of
the head, for the recompute mode (AOTAutograd differentiates it). ``grad_body``: one chunk's
loss and gradients, traced with make_fx from autograd, for the forward mode."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import Graph, GraphModule

from mst_fx.passes.graph.lm_head.detect import HeadPlan, whole_inputs
from mst_fx.passes.graph.tokenwise import (
    value,
)


def project(h, w, matmul: bool):
    return h @ w if matmul else F.linear(h, w)


def full_body(owner: GraphModule, plan: HeadPlan, rest: GraphModule, n_sizes: int = 0) -> GraphModule:
    """Projection and rest in one graph, for the recompute mode; ``n_sizes`` unused size
    inputs last (symbolic token counts, see mst_fx.passes.graph.chunking.build_body)."""
    g = Graph()
    h = g.placeholder("h")
    ws = [g.placeholder(f"w_{i}") for i in range(len(plan.proj_inputs()))]
    others = [g.placeholder(f"x_{i}") for i in range(len(whole_inputs(plan)) + len(plan.per_token))]
    for i in range(n_sizes):
        g.placeholder(f"size_{i}")
    root = torch.nn.Module()
    root.rest = rest
    if plan.adapted is not None:  # base + adapters, as the model wrote them
        root.proj = plan.adapted.module
        z = g.call_function(operator.getitem, (g.call_module("proj", (h, *ws)), 0))
    else:
        z = g.call_function(torch.matmul if plan.matmul else F.linear, (h, *ws))
    g.output(g.call_module("rest", (z, *others)))
    return GraphModule(root, g)


def grad_body(plan: HeadPlan, rest: GraphModule, rows, need_h: bool, need_w: bool,
               grad_whole: list[int], sizes: list = ()) -> GraphModule:
    """make_fx graph of one chunk's loss and gradients (see the module docstring). ``rows``:
    the chunk's row count; when symbolic, the body is traced at that count in the graph's
    own shape environment, and takes the SymInts ``sizes`` as unused inputs last (see
    mst_fx.passes.graph.chunking.size_inputs)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    whole = whole_inputs(plan)
    n_logits = sum(e.kind == "logits" for e in plan.exits)
    matmul = plan.matmul
    n_others = len(whole) + len(plan.per_token)

    def body(h, w, *rest_inputs):
        others = rest_inputs[:n_others]
        z = project(h, w, matmul)
        with torch.enable_grad():
            zz = z.detach().requires_grad_(need_h or need_w)
            xs = list(others)
            for i in grad_whole:
                xs[i] = xs[i].detach().requires_grad_()
            outs = rest(zz, *xs)
            wrt = ([zz] if need_h or need_w else []) + [xs[i] for i in grad_whole]
            grads = torch.autograd.grad(outs[0], wrt, allow_unused=True) if wrt else []
        grads = [torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, wrt)]
        result = [outs[0].detach()]
        if need_h or need_w:
            dz = grads[0]
            if need_h:
                result.append(dz @ w.t() if matmul else dz @ w)
            if need_w:
                result.append(dz)
            grads = grads[1:]
        result += [gr.float() if gr.dtype in (torch.bfloat16, torch.float16) else gr for gr in grads]
        result += [o.detach() for o in outs[len(outs) - n_logits:]]
        return tuple(result)

    examples = []
    dv = value(plan.data)
    fake_mode = dv.fake_mode
    with fake_mode:
        examples.append(torch.empty((rows, plan.width), dtype=dv.dtype, device=dv.device))
        for a in [plan.weight] + whole:
            v = value(a)
            examples.append(torch.empty(tuple(v.shape), dtype=v.dtype, device=v.device))
        for t in plan.per_token:
            v = value(t)
            examples.append(torch.empty((rows,), dtype=v.dtype, device=v.device))
        examples += list(sizes)
        gm = make_fx(body, tracing_mode="symbolic" if plan.symbolic else "real")(*examples)
    return gm
