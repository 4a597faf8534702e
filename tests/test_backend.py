"""Backend glue: never raise out of torch.compile, report why, count what was applied;
the backend by name ("mst") through the entry point."""

import subprocess
import sys

import pytest
import torch
from blocks import GLU, Stack
from helpers import check_rewrite
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass

import mst_fx

CFG = mst_fx.MSTConfig(chunks=4)


def test_failing_rewrite_leaves_graph_unchanged(monkeypatch):
    from mst_fx.passes.graph import mlp

    def broken(*args, **kwargs):
        raise RuntimeError("simulated pass bug")

    monkeypatch.setattr(mlp, "rewrite", broken)
    x = torch.randn(2, 24, 32, requires_grad=True)
    backend = check_rewrite(GLU(32, 96), [x], expect={"mlp": 0}, config=CFG)
    assert not backend.report.regions
    assert "simulated pass bug" in backend.report.skipped[0].reason


def test_failing_inductor_on_rewrite_falls_back(monkeypatch):
    """If Inductor rejects the rewritten graph, the original graph is compiled instead."""
    import torch._inductor.compile_fx as cfx

    real = cfx.compile_fx

    def picky(gm, example_inputs, **kwargs):
        if any(n.target is torch.ops.higher_order.invoke_subgraph for n in gm.graph.nodes):
            raise RuntimeError("simulated Inductor failure")
        return real(gm, example_inputs, **kwargs)

    monkeypatch.setattr(cfx, "compile_fx", picky)
    x = torch.randn(2, 24, 32, requires_grad=True)
    backend = check_rewrite(GLU(32, 96), [x], expect={"mlp": 0}, config=CFG)
    assert not backend.report.regions[0].applied
    assert "simulated Inductor failure" in backend.report.skipped[-1].reason


def test_failing_inductor_without_rewrite_falls_back(monkeypatch):
    """A graph with nothing to chunk still goes to Inductor with mst_fx's decomposition
    table; if that fails, plain Inductor compiles it and the report says why."""
    import torch._inductor.compile_fx as cfx

    real = cfx.compile_fx

    def picky(gm, example_inputs, **kwargs):
        if kwargs.get("decompositions") is not None:
            raise RuntimeError("simulated decomposition failure")
        return real(gm, example_inputs, **kwargs)

    monkeypatch.setattr(cfx, "compile_fx", picky)
    x = torch.randn(2, 24, 32, requires_grad=True)  # 48 tokens: below min_chunk_tokens
    backend = check_rewrite(GLU(32, 96), [x], expect={"mlp": 0})
    assert not backend.report.regions
    (skip,) = [s for s in backend.report.skipped if s.kind == "backend"]
    assert "simulated decomposition failure" in skip.reason


def test_inference_is_exact_and_chunked():
    block = GLU(32, 96).eval()
    x = torch.randn(3, 30, 32)
    with torch.no_grad():
        ref = block(x)
        got = torch.compile(block, backend=mst_fx.make_backend(CFG))(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert counters["mst_fx"]["mlp"] == 1


def test_run_counters_count_every_run_of_a_graph():
    """counters["mst_fx"] counts a graph's rewrites once (at compile), counters["mst_fx_run"]
    each time the compiled graph runs: one layer graph serving three layers ran three."""
    block = GLU(32, 96).eval()
    compiled = torch.compile(block, backend=mst_fx.make_backend(CFG))
    with torch.no_grad():
        for _ in range(3):
            compiled(torch.randn(3, 30, 32))
    assert counters["mst_fx"]["mlp"] == 1 and counters["mst_fx_run"]["mlp"] == 3


def test_report_table_reads():
    x = torch.randn(4, 512, 64)
    report = mst_fx.explain(GLU(64, 256), x, config=mst_fx.MSTConfig(min_chunk_tokens=256))
    text = str(report)
    assert "1 region(s) to chunk" in text and "64->256+256->64" in text
    assert report.regions[0].tokens == 2048 and report.regions[0].chunks == 8
    assert report.regions[0].bytes_saved == 2048 * 512 * 4 * 7 // 8


def test_default_backend_callable():
    x = torch.randn(2, 24, 32, requires_grad=True)
    block = GLU(32, 96)
    out = torch.compile(block, backend=mst_fx.mst_backend)(x)
    torch.testing.assert_close(out, block(x), rtol=1e-5, atol=1e-5)
    assert not counters["mst_fx"]  # 48 tokens: below min_chunk_tokens, left unchanged


BY_NAME = """
import sys, torch
from torch._dynamo.utils import counters
assert "mst_fx" not in sys.modules
print("listed", "mst" in torch._dynamo.list_backends())
def f(x, w1, w2):
    return (torch.nn.functional.silu(x @ w1) @ w2).sum()
x, w1, w2 = torch.randn(64, 16), torch.randn(16, 64, requires_grad=True), torch.randn(64, 16, requires_grad=True)
torch.compile(f, backend="mst", options={"chunks": 4, "passes": ["mlp"]})(x, w1, w2).backward()
print("rewrites", dict(counters["mst_fx"]))
torch._dynamo.reset()
try:
    torch.compile(f, backend="mst", options={"chunkz": 4})(x, w1, w2)
except Exception as e:
    print("error", "no field ['chunkz']" in str(e))
"""


def test_backend_by_name_from_the_entry_point(tmp_path):
    """pyproject registers "mst" in torch's torch_dynamo_backends group: a process that never
    imports mst_fx compiles with backend="mst"; options are MSTConfig fields, checked."""
    out = subprocess.run([sys.executable, "-c", BY_NAME], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out == ["listed True", "rewrites {'mlp': 1}", "error True"], out


def test_chunk_schemas_traced_once_per_body(monkeypatch):
    """invoke_subgraph re-traces a body for its schema on every call autograd sees; the
    backend memoizes it for mst_fx's bodies (mst_fx.schemas): fewer re-traces, same result."""
    import contextlib

    import torch._higher_order_ops.utils as hop_utils
    from torch._higher_order_ops.invoke_subgraph import invoke_subgraph

    from mst_fx import backend as backend_mod
    from mst_fx.backend import aot_eager_compiler

    real = hop_utils.materialize_as_graph
    calls = []
    monkeypatch.setattr(hop_utils, "materialize_as_graph",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(2, 40, 32, requires_grad=True)

    def traces():
        calls.clear()
        check_rewrite(Stack(2, checkpointed=True), [x], expect={"mlp": 2}, config=CFG, compiler=aot_eager_compiler)
        return len(calls)

    cached = traces()
    with monkeypatch.context() as m:
        m.setattr(backend_mod, "cached_chunk_schemas", contextlib.nullcontext)
        uncached = traces()
    # 2 layers x 4 chunks share one body: each call re-traced it without the cache.
    assert uncached >= 8 and cached < uncached / 2, (cached, uncached)
    assert "gen_schema" not in vars(invoke_subgraph)  # the original method is back


@pytest.mark.parametrize("identifier,traces", [("mst_mlp_0", 1), ("fw_mst_mlp_0", 1),
                                               ("bw_mst_mlp_0_0", 1), ("subgraph_0", 2)])
def test_chunk_schema_memo_names(monkeypatch, identifier, traces):
    """The memo covers mst_fx's bodies under the names invoke_subgraph's autograd gives the
    graphs it derives from them (torch 2.11 generates every fw_ call's schema), and no
    other body."""
    import torch._higher_order_ops.utils as hop_utils
    from torch._higher_order_ops.invoke_subgraph import invoke_subgraph

    from mst_fx.schemas import cached_chunk_schemas

    real = hop_utils.materialize_as_graph
    calls = []
    monkeypatch.setattr(hop_utils, "materialize_as_graph",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    body = torch.fx.symbolic_trace(lambda x, w: (x @ w).relu())
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    with cached_chunk_schemas():
        first = invoke_subgraph.gen_schema(body, identifier, x, w)
        second = invoke_subgraph.gen_schema(body, identifier, x, w)
    assert str(first) == str(second)
    assert len(calls) == traces


class CountingPass(CustomGraphPass):
    """A user's own Inductor pass: counts the graphs it sees."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph):
        self.graphs += 1

    def uuid(self):
        return "counting-pass"


def test_users_own_inductor_passes_still_run():
    """A user's post-grad and joint-graph custom passes (a list, which torch 2.13 accepts, and
    a single one) run before the backend's own, and the rewrite stays exact."""
    post, joint = CountingPass(), CountingPass()
    x = torch.randn(2, 40, 32, requires_grad=True)
    with torch._inductor.config.patch(post_grad_custom_post_pass=[post], joint_custom_post_pass=joint,
                                      fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        check_rewrite(Stack(2, checkpointed=True), [x], expect={"mlp": 2}, config=CFG)
    assert post.graphs >= 2 and joint.graphs >= 1, (post.graphs, joint.graphs)
