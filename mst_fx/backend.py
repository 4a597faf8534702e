"""The torch.compile backend and ``explain``.

    gm (Dynamo graph) -> engine.rewrite (passes) -> Inductor's compile_fx -> compiled fn

Inductor does the rest as for plain torch.compile: AOTAutograd with its min-cut
partitioner, then Triton (GPU) or C++ (CPU) kernels, including for the chunk bodies.
If anything fails after a rewrite, the backend restores the unchanged graph, logs why,
and compiles that: an unsupported graph never breaks torch.compile.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging

import torch
from torch._dynamo.exc import RestartAnalysis
from torch._dynamo.utils import counters

from mst_fx import engine
from mst_fx.config import MSTConfig
from mst_fx.distributed import note_ddp_pieces
from mst_fx.identity import rewrite_identity
from mst_fx.passes import PASSES
from mst_fx.passes.graph.attention import crossing
from mst_fx.passes.joint.embedding_recompute import RecomputeEmbeddings
from mst_fx.passes.partition import OffloadingPartitioner
from mst_fx.passes.post_grad.pipeline import PostGradPasses
from mst_fx.report import Reason, Report, Skipped
from mst_fx.schemas import cached_chunk_schemas

log = logging.getLogger("mst_fx.backend")

# Inductor (2.11 to 2.13) does not know that an invoke_subgraph output can alias one of its
# inputs. A chunk body under checkpointing returns its chunk input as the value saved for
# backward, so reusing the chunk's source buffer for a later result corrupts what backward
# reads (wrong gradients, seen in tests/test_mlp.py). Buffers are still freed at last use.
# For the same reason no kernel may write its result in place into such a buffer
# (inplace_buffers; BERT's residual over the MLP input gave wrong gradients, test_models.py).
# Bodies that autograd does not differentiate (the lm_head pass's "forward" mode: they get
# detached inputs and return fresh tensors) have no such alias, and the attention pass adds
# no chunk bodies, so a graph with only those keeps Inductor's buffer reuse.
#
# PostGradPasses (mst_fx.passes.post_grad) keep Inductor from summing the chunks' weight
# gradients in one kernel after the last chunk, and drop forward calls nothing reads.
#
# RecomputeEmbeddings (mst_fx.passes.joint) lets the partitioner repeat a checkpointed
# model's embedding lookup in the backward instead of saving its output.
#
# OffloadingPartitioner (mst_fx.passes.partition) moves saved tensors to host memory
# (MSTConfig.offload).
def rewrite_inductor_config(regions=None, identity: str = "", recompute_embedding: bool = False,
                            offload: OffloadingPartitioner | None = None) -> dict:
    """Inductor config patches for a rewritten graph; ``identity`` goes into the cache keys
    (see mst_fx.identity)."""
    from torch._inductor import config

    patches = {"post_grad_custom_post_pass": PostGradPasses(config.post_grad_custom_post_pass, identity)}
    if recompute_embedding:
        patches["joint_custom_post_pass"] = RecomputeEmbeddings(config.joint_custom_post_pass)
    if offload is not None:
        # Inductor's reordering for peak memory counts host buffers as device memory, and
        # moves each offload (a host allocation) down to its wait: the copy would no
        # longer overlap the layer's compute (seen in the generated code).
        patches.update(custom_partitioner_fn=offload, reorder_for_peak_memory=False)
    if regions is None or any(r.aliases_inputs for r in regions):
        patches.update(allow_buffer_reuse=False, inplace_buffers=False)
    return patches


class DecompositionTable(dict):
    """Inductor's decomposition table as changed by ``inductor_decompositions``. It pickles
    as the call that rebuilds it: Inductor pickles the table into its FX graph cache key,
    and the functions in it do not pickle (the cache would be bypassed)."""

    def __reduce__(self):
        return inductor_decompositions, ()


def inductor_decompositions() -> DecompositionTable:
    """Inductor's decomposition table with one change: on CUDA and CPU, a bf16/fp16
    embedding's backward becomes ``mst_fx::embedding_dense_backward`` (an opaque call for
    Inductor) instead of the fp32 [V, H] buffer Inductor's decomposition builds (see
    mst_fx.ops). Other dtypes and devices decompose as before."""
    from torch._inductor.decomposition import select_decomp_table

    import mst_fx.ops  # noqa: F401 - registers the op

    table = dict(select_decomp_table())
    aten = torch.ops.aten
    default = table[aten.embedding_dense_backward.default]

    def embedding_dense_backward(grad, indices, num_weights, padding_idx, scale_grad_by_freq):
        if grad.device.type in ("cuda", "cpu") and grad.dtype in (torch.bfloat16, torch.float16):
            return torch.ops.mst_fx.embedding_dense_backward(grad, indices, num_weights, padding_idx,
                                                             scale_grad_by_freq)
        return default(grad, indices, num_weights, padding_idx, scale_grad_by_freq)

    table[aten.embedding_dense_backward.default] = embedding_dense_backward
    return DecompositionTable(table)


class MSTBackend:
    """A torch.compile backend for one MSTConfig. ``reports`` holds one Report per graph
    compiled, in order (a model with graph breaks gives several).

    ``compiler`` is what the rewritten graph goes to: Inductor's compile_fx by default;
    ``aot_eager_compiler`` runs it through AOTAutograd with eager kernels instead (for
    debugging a rewrite apart from Inductor's kernels; the tests use it to check the
    flex_attention rewrite on CPU, where Inductor has no flex backward).
    """

    def __init__(self, config: MSTConfig | None = None, compiler=None):
        self.config = config if config is not None else MSTConfig()
        self.compiler = compiler
        self.reports: list[Report] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        # Masks that cross graph breaks (passes/graph/attention/crossing.py): the readings
        # of this graph's mask outputs are recorded when it runs, and the inputs that carry
        # one are checked against it before the rewrite that relied on it runs.
        found = crossing.marks(gm)
        inputs = [n.name for n in gm.graph.find_nodes(op="placeholder")]
        original = None
        if crossing.annotate(gm):
            original = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
        compiled = self._compile(gm, example_inputs)
        assumed = {(inputs.index(name), gm.graph.find_nodes(op="placeholder")[inputs.index(name)]
                    .meta[crossing.READING].key)
                   for r in self.reports[-1].regions if r.applied for name in r.assumes}
        if assumed:
            compiled = crossing.guarded(compiled, original, sorted(assumed))
        return crossing.tagging(compiled, found)

    def _compile(self, gm: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx as inductor

        plain = self.compiler or inductor
        compile_fx = plain
        if self.compiler is None and self.config.native_embedding_backward:
            compile_fx = functools.partial(inductor, decompositions=inductor_decompositions())
        saved = engine.snapshot(gm)
        try:
            with outside_autograd_hooks():
                report = engine.rewrite(gm, self._pass_config())
        except RestartAnalysis:
            raise
        except Exception as e:  # noqa: BLE001 - a pass bug must not break the user's compile
            log.warning("mst_fx: rewrite failed, compiling the graph unchanged: %r", e)
            engine.restore(saved)
            report = engine_failure(gm, self.config, f"rewrite failed: {e!r}")
        if self.config.sequence_parallel is not None:
            report.extend(self._sequence_parallel(gm))
        report.symbols = symbols_of(example_inputs)
        note_ddp_pieces(report)
        self.reports.append(report)
        applied = [r for r in report.regions if r.applied]
        # Patches even without a rewrite: their uuid keeps the artifacts compiled with our
        # decompositions apart from plain torch.compile's in the caches.
        offload = self._partitioner()
        patches = rewrite_inductor_config(applied, rewrite_identity(self.config),
                                          self.config.recompute_embedding, offload)
        try:
            with cached_chunk_schemas():
                compiled = compile_fx(gm, example_inputs, config_patches=patches)
        except RestartAnalysis:
            # Dynamo's signal to trace the frame again (e.g. Inductor asking for a float
            # to be specialized under dynamic shapes), not a failure: the next trace comes
            # back here and is rewritten.
            engine.restore(saved)
            self.reports.pop()
            raise
        except Exception as e:  # noqa: BLE001
            engine.restore(saved)
            why = repr(e)
            why = why if len(why) <= 300 else why[:300] + " ..."
            flex = [r for r in applied if r.flex]
            if flex:
                return self._without_flex(gm, example_inputs, flex, why)
            log.warning("mst_fx: Inductor failed on the graph as mst_fx changed it, compiling it "
                        "unchanged with plain Inductor: %r", e)
            sp = Report()
            if self.config.sequence_parallel is not None:  # unchanged but for attention
                sp = self._sequence_parallel(gm)
                report.extend(sp)
            for r in applied:
                r.applied = False
                report.skipped.append(Skipped(r.kind, r.where, f"Inductor failed on the rewrite: {why}", Reason.FAILED))
            if not applied:
                report.skipped.append(Skipped("backend", "<graph>", f"Inductor failed with mst_fx's "
                                              f"decompositions, compiled as plain torch.compile: {why}",
                                              Reason.FAILED))
            for r in sp.regions:
                counters["mst_fx"][r.kind] += 1
            return count_runs(plain(gm, example_inputs), sp.regions)
        if offload is not None:
            report.note_offload(offload.plans, "no plan: the graph has no backward, or its compiled "
                                "form came from Inductor's cache (explain() derives it again)")
        for r in applied:
            counters["mst_fx"][r.kind] += 1
            if report.symbols:  # the rewrites of graphs that serve every length
                counters["mst_fx_symbolic"][r.kind] += 1
        log.debug("mst_fx: %s", report)
        compiled = count_runs(compiled, applied)
        for kind, graph_pass in PASSES.items():  # run-time wrappers of the passes that applied
            if hasattr(graph_pass, "wrap_compiled") and any(r.kind == kind for r in applied):
                compiled = graph_pass.wrap_compiled(compiled, gm)
        return compiled

    def _pass_config(self) -> MSTConfig:
        """The config the graph passes get: under sequence parallelism the attention pass
        makes no flex calls, so the masks it does not drop stay for the sequence-parallel
        pass to build over the whole sequence."""
        if self.config.sequence_parallel is None:
            return self.config
        return self.config.replace(flex_attention="off")

    def _sequence_parallel(self, gm) -> Report:
        """Every attention call of ``gm`` run over the whole sequence of the group's ranks
        (passes/graph/sequence_parallel.py); raises SequenceParallelError where it cannot be."""
        from mst_fx.passes.graph import sequence_parallel

        report = sequence_parallel.apply(gm, self.config, engine.module_path)
        for mod, _ in engine.graph_modules(gm):
            engine.fill_example_values(mod)
        return report

    def _partitioner(self) -> OffloadingPartitioner | None:
        """The partitioner that offloads saved tensors, if the config asks for it (it chains
        to a partitioner the user set in Inductor's config)."""
        if not self.config.offload:
            return None
        from torch._inductor import config

        return OffloadingPartitioner(self.config.offload_min_bytes,
                                     getattr(config, "custom_partitioner_fn", None))

    def _without_flex(self, gm, example_inputs, flex: list, why: str):
        """Compile again with flex_attention off, after Inductor failed on a graph with flex
        rewrites (torch 2.11 on CUDA: block masks at a symbolic length, "CantSplit"): the
        other rewrites (MLP, head, causal masks) stay, and the masks are kept with why."""
        log.warning("mst_fx: Inductor failed on flex_attention in this graph, compiling it again "
                    "with its masks kept: %s", why)
        self.reports.pop()
        retry = MSTBackend(self.config.replace(flex_attention="off"), self.compiler)
        compiled = retry._compile(gm, example_inputs)
        report = retry.reports[-1]
        where = {r.where for r in flex}
        for s in report.skipped:
            if s.kind == "attention" and s.where in where:
                s.reason += f"; flex_attention failed in Inductor here: {why}"
        self.reports.append(report)
        return compiled

    @property
    def report(self) -> Report:
        """All graphs' reports in one."""
        total = Report()
        for r in self.reports:
            total.extend(r)
        return total


def count_runs(compiled, applied: list):
    """``compiled``, adding its rewrites to ``counters["mst_fx_run"]`` each time it runs.
    ``counters["mst_fx"]`` counts a graph's rewrites once, when it compiles; a graph that
    serves every decoder layer (one compile per block, FSDP2's per-layer graphs, a
    checkpointed layer) runs once a layer, and these are the rewrites a step ran."""
    if not applied:
        return compiled
    kinds: dict[str, int] = {}
    for r in applied:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1

    def run(*args):
        for kind, n in kinds.items():
            counters["mst_fx_run"][kind] += n
        return compiled(*args)

    run._boxed_call = getattr(compiled, "_boxed_call", False)
    return run


@contextlib.contextmanager
def outside_autograd_hooks():
    """Run the passes apart from the autograd hooks of the code that called the compiled
    region. Dynamo compiles inside the caller's contexts, so an eager
    ``torch.utils.checkpoint`` around a compiled layer (or ``save_on_cpu``) would see every
    tensor the passes save while they run chunk bodies on fake values, and its recompute
    (which finds the graph compiled) would save fewer: CheckpointError. The innermost
    saved-tensor hooks win, so identity hooks keep the caller's from seeing ours."""
    with torch.autograd.graph.saved_tensors_hooks(_same, _same):
        yield


def _same(t):
    return t


def symbols_of(example_inputs) -> list[str]:
    """The symbols of a graph's symbolic sizes (Dynamo's SymInt inputs and tensor dims)."""
    found: list[str] = []
    for x in example_inputs:
        sizes = [x] if isinstance(x, torch.SymInt) else list(x.shape) if isinstance(x, torch.Tensor) else []
        for s in sizes:
            if isinstance(s, torch.SymInt):
                for sym in sorted(map(str, s.node.expr.free_symbols)):
                    if sym not in found:
                        found.append(sym)
    return found


def engine_failure(gm, config: MSTConfig, reason: str) -> Report:
    """The detection report of an unchanged graph, every region turned into a skip."""
    report = Report()
    try:
        for _, found in engine.detect(gm, config):
            report.skipped += found.skipped
            report.skipped += [Skipped(r.kind, r.where, reason, Reason.FAILED) for r in found.regions]
    except Exception as e:  # noqa: BLE001
        report.skipped.append(Skipped("*", "?", f"detection failed: {e!r}", Reason.FAILED))
    return report


def make_backend(config: MSTConfig | None = None, *, compiler=None, **overrides) -> MSTBackend:
    """A backend for ``config`` with some fields overridden (``compiler``: see MSTBackend).

    Example:
        >>> backend = make_backend(chunks=8)
        >>> compiled = torch.compile(model, backend=backend)
    """
    config = config if config is not None else MSTConfig()
    return MSTBackend(config.replace(**overrides) if overrides else config, compiler)


def aot_eager_compiler(gm: torch.fx.GraphModule, example_inputs, config_patches=None):
    """AOTAutograd (forward and backward graphs) with eager kernels: a compiler for
    MSTBackend that checks a rewrite without Inductor. ``config_patches`` is ignored."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward))(gm, example_inputs)


def mst_backend(gm: torch.fx.GraphModule, example_inputs):
    """The backend with the default MSTConfig: ``torch.compile(model, backend=mst_backend)``."""
    return MSTBackend()(gm, example_inputs)


def registered_backend(gm: torch.fx.GraphModule, example_inputs, *, options: dict | None = None,
                       mode: str | None = None):
    """The backend torch finds by name, through the ``torch_dynamo_backends`` entry point
    (pyproject.toml): ``torch.compile(model, backend="mst", options={"chunks": 8})``, with no
    import of mst_fx first. ``options`` are MSTConfig fields; an unknown one or a bad value
    raises ValueError naming it (torch reports it when the first graph compiles).
    """
    if mode not in (None, "default"):
        raise ValueError(f'backend "mst" takes no mode (got {mode!r}); use options={{...}} with MSTConfig fields')
    config = MSTConfig().replace(**options) if options else MSTConfig()
    return MSTBackend(config)(gm, example_inputs)


def explain(model_or_fn, *args, config: MSTConfig | None = None, **kwargs) -> Report:
    """Capture ``model_or_fn(*args, **kwargs)`` with Dynamo and report what mst_fx would
    chunk and what it would leave, and why. Runs the forward once, eagerly; nothing is
    compiled by Inductor and nothing is chunked (the normalizations detection reads the
    graph after, which keep every value, are applied: see mst_fx.engine.normalize).

    With ``config.offload`` the report also lists the tensors each graph's step would
    offload (see ``plan_offload``).

    Example:
        >>> print(explain(model, input_ids, labels=labels, config=MSTConfig(chunks=4)))
    """
    config = config if config is not None else MSTConfig()
    report = Report()

    def capture(gm, example_inputs):
        engine.normalize(gm)
        for _, found in engine.detect(gm, config):
            report.extend(found)
        if config.offload:
            report.note_offload(plan_offload(gm, example_inputs, config), "the graph has no backward")
        return gm.forward

    torch.compile(model_or_fn, backend=capture)(*args, **kwargs)
    return report


def plan_offload(gm: torch.fx.GraphModule, example_inputs, config: MSTConfig) -> list:
    """What MSTConfig.offload would move to host memory in ``gm``'s training step: the
    graph as the backend rewrites it, traced by AOTAutograd and partitioned as Inductor
    does (embedding recompute included) with eager kernels, nothing run. ``gm`` is left as
    it was. A graph without gradients has no plan (nothing is saved)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from mst_fx.passes.joint.embedding_recompute import mark_embeddings

    planner = OffloadingPartitioner(config.offload_min_bytes)

    def partition(joint, inputs, **kwargs):  # as Inductor calls its partitioner
        if config.recompute_embedding:
            mark_embeddings(joint.graph)
        return planner(joint, inputs, compiler="inductor", **kwargs)

    saved = engine.snapshot(gm)
    try:
        with outside_autograd_hooks():
            engine.rewrite(gm, config)
        eager = lambda g, _: make_boxed_func(g.forward)  # noqa: E731
        aot_autograd(fw_compiler=eager, bw_compiler=eager, partition_fn=partition)(gm, example_inputs)
    finally:
        engine.restore(saved)
    return planner.plans
