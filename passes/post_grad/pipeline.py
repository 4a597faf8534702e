"""The post-grad stage: what runs on Inductor's post-grad graphs of a graph mst_fx rewrote,
installed as Inductor's ``post_grad_custom_post_pass``.

    the user's own post-grad passes (if any) -> dead_forwards -> barriers
"""

from __future__ import annotations

from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx import Graph

from mst_fx.identity import chained_uuid, custom_passes
from mst_fx.passes.post_grad import barriers, dead_forwards


class PostGradPasses(CustomGraphPass):
    """Inductor custom pass; ``chained`` is a user's own post_grad_custom_post_pass (one or a
    list), run first.

    ``identity`` names the rewrite that made the graph (mst_fx's code and the MSTConfig, see
    mst_fx.identity); it is this pass's ``uuid()`` in Inductor's cache keys.
    """

    def __init__(self, chained=None, identity: str = ""):
        self.chained = custom_passes(chained)
        self.identity = identity

    def __call__(self, graph: Graph) -> None:
        for p in self.chained:
            p(graph)
        dead_forwards.drop_dead_forwards(graph)
        barriers.add_barriers(graph)

    def uuid(self):
        files = (__file__, dead_forwards.__file__, barriers.__file__)
        return chained_uuid(self.identity or get_hash_for_files(files), self.chained)
