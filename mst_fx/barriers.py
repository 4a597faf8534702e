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
Installed as Inductor's post_grad_custom_post_pass for graphs that mst_fx rewrote.

(Tried and dropped: the same barrier on each chunk's incoming-gradient copy; no change in
peak on the H100 benchmark, so not worth the code.)
"""

from __future__ import annotations

import functools
import operator
import pathlib

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx import Graph, GraphModule, Node

from mst_fx import dead_forwards

INVOKE = torch.ops.higher_order.invoke_subgraph
ADD = torch.ops.aten.add.Tensor
BODY_PREFIX = "partitioned_bw_mst_"


def custom_passes(value) -> tuple:
    """An Inductor custom-pass config value (None, one pass, or a list of them) as a tuple."""
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def chained_uuid(mine, chained: tuple):
    """``mine`` with the uuids of the user's own passes that run before ours."""
    if not chained:
        return mine
    return (mine, *(p.uuid() if hasattr(p, "uuid") else repr(p) for p in chained))


class ChunkBarriers(CustomGraphPass):
    """Inductor custom pass; ``chained`` is a user's own post_grad_custom_post_pass (one or a
    list), run first.
    Then mst_fx.dead_forwards' pass, then the barriers.

    ``identity`` names the rewrite that made the graph (mst_fx's code and the MSTConfig, see
    ``rewrite_identity``). Inductor puts ``uuid()`` in its FX graph and AOTAutograd cache
    keys, so an artifact compiled under another config or another version of the passes is
    never reused, and the same config in a second process hits the cache.
    """

    def __init__(self, chained=None, identity: str = ""):
        self.chained = custom_passes(chained)
        self.identity = identity

    def __call__(self, graph: Graph) -> None:
        for p in self.chained:
            p(graph)
        dead_forwards.drop_dead_forwards(graph)
        add_barriers(graph)

    def uuid(self):
        # identity hashes these files too
        return chained_uuid(self.identity or get_hash_for_files((__file__, dead_forwards.__file__)),
                            self.chained)


@functools.cache
def code_hash() -> str:
    """Hash of every source file of mst_fx and its passes."""
    import mst_fx
    import mst_fx.passes

    files = sorted(str(p) for m in (mst_fx, mst_fx.passes)
                   for p in pathlib.Path(m.__file__).parent.glob("*.py"))
    return get_hash_for_files(tuple(files)).hex()


def rewrite_identity(config) -> str:
    """What a rewritten graph depends on besides itself: the code and the config."""
    return f"{code_hash()}|{config!r}"


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
    return isinstance(node, Node) and node.target is INVOKE and \
        isinstance(node.args[1], str) and node.args[1].startswith(BODY_PREFIX)


def _behind_barrier(gm: GraphModule, graph: Graph, op: Node, bodies: dict[tuple, str]) -> Node:
    """Replace ``op`` (a call on tensors and constants) by invoke_subgraph of a one-op body."""
    tensors = [a for a in op.args if isinstance(a, Node)]
    vals = [a.meta["val"] for a in tensors]
    vout = op.meta["val"]
    key = (op.target, tuple(a if not isinstance(a, Node) else None for a in op.args),
           tuple((tuple(v.shape), tuple(v.stride()), v.dtype) for v in vals + [vout]))
    if key not in bodies:
        name = f"mst_barrier_{len(bodies)}"
        while hasattr(gm, name):
            name += "_"
        gm.register_module(name, _one_op_module(op, vals, vout))
        bodies[key] = name
    name = bodies[key]
    with graph.inserting_before(op):
        call = graph.call_function(INVOKE, (graph.get_attr(name), name, *tensors))
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
