"""Every graph pass of mst_fx, grouped by the stage it runs at; installed as
``mst_fx.passes``. Read passes/README.md first.

    graph/      the Dynamo graph, before AOTAutograd: mlp, lm_head, attention (the registry)
    joint/      the joint forward-backward graph, before partitioning: embedding recompute
    partition/  the partitioned forward and backward graphs: offload to host memory
    post_grad/  Inductor's post-grad graph: dead forwards, barriers

Every graph-stage pass module has the same surface:
    KIND: the region kind and the name used in MSTConfig.passes;
    detect(gm, config, checkpointed, where) -> Report   (never mutates the graph);
    rewrite(gm, region, names) -> None                  (applies one detected Region);
    optional wrap_compiled(compiled, gm) -> compiled    (a run-time wrapper of a graph it
                                                         rewrote, e.g. lm_head's logits guard).
"""

from mst_fx.passes.graph import attention, lm_head, mlp

PASSES = {mlp.KIND: mlp, lm_head.KIND: lm_head, attention.KIND: attention}
