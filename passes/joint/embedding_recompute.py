"""Joint-graph pass: under activation checkpointing, rebuild the token embeddings in the
backward instead of saving them for it.

With gradient checkpointing each layer saves only its input. The first layer's input is
the embedding lookup's output, a [tokens, hidden] tensor that AOTAutograd's partitioner
saves from the forward to the end of the backward: ``aten.embedding`` is not on its list
of ops it may recompute. Its inputs are already kept (the token ids, a few bytes per token,
and the weight, a parameter), and the lookup is a gather that reads [tokens, hidden] once.
This pass marks the lookup as recomputable (``CheckpointPolicy.PREFER_RECOMPUTE``, the
tag checkpointed regions carry), so the partitioner keeps only the ids and the weight and
repeats the lookup where the first layer's backward needs it: one [tokens, hidden] tensor
less wherever every layer's checkpoint is alive, as at the step's peak in the last layer's
backward (CPU test: exactly that; Llama-3.2-1B on an H200 at 64k: 0.27 GB, RESULTS.md).

It changes only what is saved, never a value or a gradient. It touches a graph only if the
graph already has recompute tags (a checkpointed model): in any other graph one tag would
switch the partitioner to its activation-checkpointing mode. Only lookups whose weight is a
graph input are marked, so that recomputing never makes the partitioner save a computed
[vocab, hidden] weight. Installed as Inductor's joint_custom_post_pass.
"""

from __future__ import annotations

import torch
from torch._functorch.partitioners import must_recompute
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx import Graph
from torch.utils.checkpoint import CheckpointPolicy

from mst_fx.identity import chained_uuid, custom_passes

EMBEDDING = torch.ops.aten.embedding.default


def mark_embeddings(graph: Graph) -> int:
    """Tag every embedding lookup whose weight is a graph input (a parameter) for recompute
    in the backward, if the joint graph is checkpointed. Returns how many were tagged."""
    if not any(must_recompute(n) for n in graph.nodes):
        return 0
    marked = 0
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not EMBEDDING or "recompute" in node.meta:
            continue
        weight = node.args[0]
        if isinstance(weight, torch.fx.Node) and weight.op == "placeholder":
            node.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
            marked += 1
    return marked


class RecomputeEmbeddings(CustomGraphPass):
    """Inductor joint custom pass; ``chained`` is a user's own joint_custom_post_pass (one or
    a list), run first. ``uuid()`` enters Inductor's cache keys (see mst_fx.identity)."""

    def __init__(self, chained=None):
        self.chained = custom_passes(chained)

    def __call__(self, graph: Graph) -> None:
        for p in self.chained:
            p(graph)
        mark_embeddings(graph)

    def uuid(self):
        return chained_uuid(get_hash_for_files((__file__,)), self.chained)
