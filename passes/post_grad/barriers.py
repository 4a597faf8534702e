"""Post-grad pass: sum the chunks' weight gradients as they arrive.

The chunk loop's backward graph is already in the right order (chunk k's backward body,
the sums that use its outputs, then chunk k+1), but Inductor's fusion undid it: every
chunk's backward body returns its own partial gradient of each weight, autograd sums them
(``g = g1 + g2``, ``g = g + g3``, ...), and Inductor fused that chain of adds into one
kernel after the last chunk, so all M partials were alive at once (H100, 64k tokens,
Llama-3-8B MLP, M=16: 7.06 GB extra instead of 2.13 GB).

This pass puts each add of the chain behind its own one-op ``invoke_subgraph`` call, a
fusion barrier, so it runs where the graph places it and frees the partial there. It
touches only adds whose operands come from mst_fx chunk bodies (or from such adds).
Run by the post-grad pipeline (pipeline.py) for graphs that mst_fx rewrote.

(Tried and dropped: the same barrier on each chunk's incoming-gradient copy; no change in
peak on the H100 benchmark, so not worth the code.)
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, GraphModule, Node

from mst_fx import fx

ADD = torch.ops.aten.add.Tensor


def add_barriers(graph: Graph) -> int:
    """Wrap every sum of chunk partial gradients in a barrier; returns how many."""
    gm = graph.owning_module
    partial: set[Node] = set()
    bodies: dict[tuple, str] = {}
    count = 0
    for n in list(graph.nodes):
        if n.op != "call_function":
            continue
        if n.target is operator.getitem and _is_chunk_backward(n.args[0]):
            partial.add(n)
        elif n.target is ADD and len(n.args) == 2 and not n.kwargs \
                and all(a in partial for a in n.args):
            partial.add(_behind_barrier(gm, graph, n, bodies))
            count += 1
    return count


def _is_chunk_backward(node) -> bool:
    return isinstance(node, Node) and node.target is fx.INVOKE and fx.is_backward_body(node.args[1])


def _behind_barrier(gm: GraphModule, graph: Graph, op: Node, bodies: dict[tuple, str]) -> Node:
    """Replace ``op`` (a call on tensors and constants) by invoke_subgraph of a one-op body."""
    tensors = [a for a in op.args if isinstance(a, Node)]
    vals = [a.meta["val"] for a in tensors]
    vout = op.meta["val"]
    key = (op.target, tuple(a if not isinstance(a, Node) else None for a in op.args),
           tuple((tuple(v.shape), tuple(v.stride()), v.dtype) for v in vals + [vout]))
    if key not in bodies:
        name = fx.barrier_name(len(bodies))
        while hasattr(gm, name):
            name += "_"
        gm.register_module(name, _one_op_module(op, vals, vout))
        bodies[key] = name
    name = bodies[key]
    with graph.inserting_before(op):
        call = graph.call_function(fx.INVOKE, (graph.get_attr(name), name, *tensors))
        call.meta["val"] = (vout,)
        out = graph.call_function(operator.getitem, (call, 0))
        out.meta["val"] = vout
    op.replace_all_uses_with(out)
    graph.erase_node(op)
    return out


def _one_op_module(op: Node, vals, vout) -> GraphModule:
    g = Graph()
    inputs = [g.placeholder(f"x{i}") for i in range(len(vals))]
    for p, v in zip(inputs, vals):
        p.meta["val"] = v
    feed = iter(inputs)
    args = tuple(next(feed) if isinstance(a, Node) else a for a in op.args)
    result = g.call_function(op.target, args)
    result.meta["val"] = vout
    g.output((result,))
    return GraphModule(torch.nn.Module(), g)
