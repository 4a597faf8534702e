"""The partition stage: what runs on AOTAutograd's partitioned forward and backward graphs,
installed as Inductor's ``custom_partitioner_fn`` when ``MSTConfig.offload`` is on.

    the user's own partitioner, or Inductor's (min-cut rematerialization)
      -> select.choose        which saved tensors go to host memory, and why not the others
      -> offload.offload_forward / offload.reload_backward   the copies, in both graphs

Only the graph's own partition is changed: AOTAutograd also partitions the bodies of
``invoke_subgraph`` calls (mst_fx's chunk bodies), with no inputs given; what those save
stays inside the call.
"""

from __future__ import annotations

from torch._inductor.custom_graph_pass import CustomPartitionerFn, get_hash_for_files

from mst_fx.passes.partition import host_memory, offload, select, transfer


class OffloadingPartitioner(CustomPartitionerFn):
    """Partition as ``chained`` (or Inductor's min-cut partitioner) would, then offload the
    saved tensors select.py chooses. ``plans`` gets, per graph partitioned, the list of its
    saved tensors (select.Saved) and a note ("" or why the host memory is not checked)."""

    def __init__(self, min_bytes: int, chained=None):
        self.min_bytes = min_bytes
        self.chained = chained
        self.plans: list[tuple[list[select.Saved], str]] = []

    def __call__(self, gm, joint_inputs, **kwargs):
        if self.chained is not None:
            fw, bw = self.chained(gm, joint_inputs, **kwargs)
        else:
            from torch._functorch.partitioners import min_cut_rematerialization_partition

            fw, bw = min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)
        if not joint_inputs:  # an invoke_subgraph body (see the module docstring)
            return fw, bw
        num_fwd_outputs = kwargs["num_fwd_outputs"]
        found = select.choose(fw, bw, num_fwd_outputs, self.min_bytes)
        names = {s.name for s in found if s.offloaded}
        note = ""
        if names:
            offloaded = offload.offload_forward(fw, names, num_fwd_outputs)
            offload.reload_backward(bw, offloaded)
            try:
                offload.reserve_host(fw.graph, [n.meta["val"] for n in offloaded.values()])
            except ValueError as e:
                note = f"host memory not checked before the step: {e}"
            fw.graph.eliminate_dead_code()
            fw.graph.lint()
            bw.graph.lint()
            fw.recompile()
            bw.recompile()
        self.plans.append((found, note))
        return fw, bw

    def uuid(self):
        files = (__file__, select.__file__, offload.__file__, transfer.__file__, host_memory.__file__)
        mine = (get_hash_for_files(files), self.min_bytes)
        return mine if self.chained is None else (mine, getattr(self.chained, "uuid", lambda: repr(self.chained))())
