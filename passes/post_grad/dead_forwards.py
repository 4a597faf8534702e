"""Post-grad pass: drop a chunk body's forward call that only passes its inputs through.

A chunk body that runs under its own checkpoint inside a layer the model checkpoints too
(MSTConfig.recompute_in_checkpoint) saves nothing of its own for backward: AOTAutograd's
partitioned forward body returns its chunk and weights as the "saved" values. When the
outer checkpoint recomputes the layer in the backward graph, the partitioner keeps that
forward call for those saved values, although they are its own inputs and its real output
(the chunk's result, needed only by the next layer) is unused there. The call then runs
every GEMM of the block once more for nothing: a third forward of the MLP per layer
(Llama-3.2-1B, 32k tokens: 3 x 16 x 1.1 TFLOP).

This pass, run on every graph Inductor compiles for a rewritten graph, finds the calls of
mst_fx forward bodies whose used outputs are all inputs passed through, gives those users
the inputs themselves and erases the call. Bodies that draw random numbers are left alone
(erasing one would move the random stream of what follows).
"""

from __future__ import annotations

import operator

import torch
from torch._dynamo.utils import counters
from torch.fx import Graph, GraphModule, Node

from mst_fx import fx


def drop_dead_forwards(graph: Graph) -> int:
    """Erase every mst_fx forward body call whose used outputs are pass-through inputs;
    returns how many (also counted in ``counters["mst_fx_inductor"]["dead_forward_calls"]``)."""
    gm = graph.owning_module
    dropped = 0
    for call in list(graph.nodes):
        if not _is_mst_forward(call):
            continue
        body = getattr(gm, call.args[0].target, None)
        sources = _passed_through(body) if isinstance(body, GraphModule) else None
        if sources is None:
            continue
        operands = call.args[2:]
        users = list(call.users)
        if not all(u.target is operator.getitem and u.args[1] in sources
                   and isinstance(operands[sources[u.args[1]]], Node) for u in users):
            continue
        for u in users:
            u.replace_all_uses_with(operands[sources[u.args[1]]])
            graph.erase_node(u)
        body_ref = call.args[0]
        graph.erase_node(call)
        if not body_ref.users:
            graph.erase_node(body_ref)
        dropped += 1
    if dropped:
        counters["mst_fx_inductor"]["dead_forward_calls"] += dropped
    return dropped


def _is_mst_forward(node: Node) -> bool:
    return node.op == "call_function" and node.target is fx.INVOKE and fx.is_forward_body(node.args[1]) \
        and isinstance(node.args[0], Node) and node.args[0].op == "get_attr"


def _passed_through(body: GraphModule) -> dict[int, int] | None:
    """Output index -> operand index for the outputs of ``body`` that are its inputs;
    None when the body has random or side-effecting operations."""
    placeholders = {}
    for n in body.graph.nodes:
        if n.op == "placeholder":
            placeholders[n] = len(placeholders)
        elif n.op == "call_function" and _impure(n):
            return None
        elif n.op == "call_module":
            return None
    (out,) = [n for n in body.graph.nodes if n.op == "output"]
    values = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    return {i: placeholders[v] for i, v in enumerate(values) if v in placeholders}


def _impure(n: Node) -> bool:
    tags = getattr(n.target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags or n.is_impure() \
        or isinstance(n.target, torch._ops.HigherOrderOperator)
