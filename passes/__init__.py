"""Graph passes of mst_fx, one module per pass family; installed as ``mst_fx.passes``.

Every pass module has the same surface:
    KIND: the region kind and the name used in MSTConfig.passes;
    detect(gm, config, checkpointed, where) -> Report   (never mutates the graph);
    rewrite(gm, region, names) -> None                  (applies one detected Region).
"""

from mst_fx.passes import attention, lm_head, mlp

PASSES = {mlp.KIND: mlp, lm_head.KIND: lm_head, attention.KIND: attention}
