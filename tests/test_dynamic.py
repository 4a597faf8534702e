"""Varying lengths: with symbolic token counts (dynamic=True, mark_dynamic, or the default's
recompile after a second length) every pass still applies (MLP and head chunked, attention
masks dropped or turned into flex_attention), exact at every length, without a recompile
per length; inference and evaluation compile and are exact."""

import copy

import pytest
import torch
from blocks import GLU, Stack
from helpers import TOL, grads_of
from torch._dynamo.utils import counters

import mst_fx

H, I = 32, 96
CFG = mst_fx.MSTConfig(chunks=4)


def _step(module, x):
    y = module(x)
    y.square().mean().backward()
    return y


def _lengths_match_eager(compiled, eager, lengths, dynamic_dim=None):
    for s in lengths:
        x = torch.randn(2, s, H)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        if dynamic_dim is not None:
            torch._dynamo.mark_dynamic(a, dynamic_dim)
        got, ref = _step(compiled, a), _step(eager, b)
        torch.testing.assert_close(got, ref, **TOL[torch.float32])
        want, have = grads_of(eager, [b]), grads_of(compiled._orig_mod, [a])
        assert want.keys() == have.keys()
        for name in want:
            torch.testing.assert_close(have[name], want[name], **TOL[torch.float32],
                                       msg=lambda m: f"{s} {name}: {m}")
        for m in (compiled, eager):
            m.zero_grad(set_to_none=True)


@pytest.mark.parametrize("how", ["dynamic_true", "mark_dynamic"])
def test_symbolic_tokens_are_chunked_once_for_every_length(how):
    torch.manual_seed(0)
    eager = GLU(H, I)
    backend = mst_fx.make_backend(CFG)
    counters.clear()
    compiled = torch.compile(copy.deepcopy(eager), backend=backend, dynamic=True if how == "dynamic_true" else None)
    # 74, 100, 122, 46 tokens: remainders mod 4 of 2, 0, 2, 2; the last chunk takes them.
    _lengths_match_eager(compiled, eager, [37, 50, 61, 23], dynamic_dim=1 if how == "mark_dynamic" else None)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    (region,) = backend.report.regions
    assert region.detail.endswith("symbolic tokens") and region.chunks == 4 and counters["mst_fx"]["mlp"] == 1


def test_symbolic_tokens_under_checkpointing():
    """Layers under activation checkpointing with a symbolic token count: chunked and exact
    at every length. Inductor asks Dynamo to trace again here (TensorifyScalarRestartAnalysis,
    a float to specialize); the backend lets that signal through instead of taking it for a
    failure, so no region is reported as skipped and the second trace is rewritten."""
    torch.manual_seed(0)
    eager = Stack(2, checkpointed=True, hidden=H, inter=I)
    backend = mst_fx.make_backend(CFG)
    counters.clear()
    compiled = torch.compile(copy.deepcopy(eager), backend=backend, dynamic=True)
    _lengths_match_eager(compiled, eager, [37, 50, 23])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert counters["mst_fx"]["mlp"] == 2 and not backend.report.skipped, str(backend.report)
    assert len(backend.report.regions) == 2
    assert all(r.applied and r.detail.endswith("symbolic tokens") for r in backend.report.regions)


# Attention masks at a symbolic length: proofs that hold for every length, block masks built
# at run time for the current one. Flex rewrites run through aot_eager_compiler on CPU (see
# test_attention.py); the causal ones through Inductor.
from test_attention import Attention, causal_2d, causal_hf, documents, padding, prefix_lm, window  # noqa: E402

FLEX = mst_fx.MSTConfig(passes=("attention",), flex_attention="all")
MASKS = [
    (causal_hf, None, "causal: mask dropped"), (causal_2d, None, "causal: mask dropped"),
    (window, None, "flex: q - kv >= 0 and q - kv <= 4 (sliding window)"),
    (prefix_lm, None, "flex: a condition on q or kv alone"),
    (documents, lambda S: [torch.arange(S) // 7], "flex: l_extra_0_ depends on the graph's inputs"),
    (padding, lambda S: [torch.arange(S)[None, :] >= torch.tensor([[3], [0]])], "flex: getitem"),
]


@pytest.mark.parametrize("build,extra,detail", MASKS, ids=[m[0].__name__ for m in MASKS])
def test_symbolic_masks_are_rewritten_for_every_length(build, extra, detail):
    from mst_fx.backend import aot_eager_compiler

    eager = Attention(build)
    model = copy.deepcopy(eager)
    causal = detail.startswith("causal")
    backend = mst_fx.make_backend(FLEX, compiler=None if causal else aot_eager_compiler)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for S in (24, 37, 50):
        x = torch.randn(2, S, 16)
        more = extra(S) if extra else []
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        got, ref = compiled(a, *more), eager(b, *more)
        got.square().sum().backward()
        ref.square().sum().backward()
        torch.testing.assert_close(got, ref, **TOL[torch.float32])
        torch.testing.assert_close(a.grad, b.grad, **TOL[torch.float32])
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, **TOL[torch.float32], msg=lambda m: f"{S} {name}: {m}")
        model.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    (region,) = backend.report.regions
    assert region.applied and region.detail.startswith(detail) and region.detail.endswith("symbolic tokens"), \
        region.detail
    assert counters["mst_fx_symbolic"]["attention"] == 1


def test_symbolic_size_inside_a_mask_is_left_with_a_reason():
    """A mask that compares an index with the length itself (kv < S) would need the symbol
    inside the mask_mod: left as it is, with the reason, and still exact."""
    from test_attention import always_true

    backend = mst_fx.make_backend(FLEX)
    model = Attention(always_true)
    compiled = torch.compile(copy.deepcopy(model), backend=backend, dynamic=True)
    x = torch.randn(2, 30, 16)
    torch.testing.assert_close(compiled(x), model(x), **TOL[torch.float32])
    (skip,) = backend.report.skipped
    assert "symbolic size" in skip.reason and not backend.report.regions, skip.reason


transformers = pytest.importorskip("transformers")


def _random_length_steps(model, eager, steps, lo=1000, hi=4096):
    """``steps`` training steps of one sequence of lo to hi tokens; with ``eager``, its loss
    and every gradient equal to the compiled model's at every step."""
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 512, (1, int(torch.randint(lo, hi + 1, (1,), generator=g))), generator=g)
        got = model(input_ids=ids, labels=ids).loss
        got.backward()
        if eager is not None:
            _same_step(model, eager, got, eager(input_ids=ids, labels=ids).loss)
        model.zero_grad(set_to_none=True)


def _same_step(model, eager, got, ref, loss_tol=1e-5, grad_rtol=1e-4, grad_atol=1e-5):
    """Backward of the eager loss ``ref`` (``got``'s was run), then the losses and every
    parameter gradient of ``model`` and ``eager`` compared; the eager gradients reset."""
    ref.backward()
    torch.testing.assert_close(got, ref, rtol=loss_tol, atol=loss_tol)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=grad_rtol, atol=grad_atol, msg=lambda m: f"{name}: {m}")
    eager.zero_grad(set_to_none=True)


def _llama(checkpointing):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=176)).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gc"])
def test_hf_llama_random_lengths_compile_twice_with_every_pass(checkpointing):
    """The default dynamic=None: one static compile, then one with a symbolic length, which
    gets every rewrite the static graph got (the head in its forward mode too); steps of
    random lengths, losses and gradients equal eager. With gradient checkpointing,
    transformers (5.2x) breaks the graph at its checkpointed layers: each frame then
    compiles twice, as many graphs as plain torch.compile makes."""
    steps = 4 if checkpointing else 8
    eager = _llama(checkpointing)
    model = copy.deepcopy(eager)
    backend = mst_fx.make_backend(min_chunk_tokens=256)
    torch._dynamo.reset()
    counters.clear()
    _random_length_steps(torch.compile(model, backend=backend), eager, steps)
    graphs = counters["stats"]["unique_graphs"]
    if checkpointing:
        torch._dynamo.reset()
        counters.clear()
        _random_length_steps(torch.compile(copy.deepcopy(eager)), None, steps)
        assert graphs == counters["stats"]["unique_graphs"], (graphs, dict(counters["stats"]))
    else:
        assert graphs == 2, graphs
    static = [r for r in backend.reports if not r.symbols]
    symbolic = [r for r in backend.reports if r.symbols]
    assert len(static) == len(symbolic), [str(r) for r in backend.reports]
    kinds = lambda rs: sorted((x.kind, x.where) for r in rs for x in r.regions if x.applied)  # noqa: E731
    reasons = lambda rs: sorted(x.reason for r in rs for x in r.skipped)  # noqa: E731
    assert kinds(symbolic) == kinds(static) and reasons(symbolic) == reasons(static), \
        "\n".join(map(str, backend.reports))
    assert {"lm_head", "mlp"} <= {k for k, _ in kinds(symbolic)}
    head = next(x for r in symbolic for x in r.regions if x.kind == "lm_head")
    assert "grad=forward" in head.detail and head.detail.endswith("symbolic tokens"), head.detail


def _qwen3():
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=176, head_dim=16))


def _gemma3():  # a sliding-window layer and a global one
    config = transformers.Gemma3TextConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=176, head_dim=16, sliding_window=64, layer_types=["sliding_attention", "full_attention"])
    config._attn_implementation = "sdpa"
    return transformers.Gemma3ForCausalLM(config)


@pytest.mark.parametrize("build", [_qwen3, _gemma3], ids=["qwen3", "gemma3"])
def test_qwen3_and_gemma3_random_lengths_compile_twice(build):
    """Lengths of 400 to 1100 tokens, one sequence a step: two graphs, each with every pass
    (Gemma 3's sliding-window mask as flex_attention on the symbolic graph too), losses and
    gradients equal eager. Through AOTAutograd with eager kernels: Inductor's C++ backend
    itself guards on a reduction size (s <= 1024, cpp.py need_use_acc_helper) and compiles
    a third graph under plain torch.compile as well; its GPU backend does not."""
    from mst_fx.backend import aot_eager_compiler

    torch.manual_seed(0)
    eager = build().train()
    model = copy.deepcopy(eager)
    backend = mst_fx.make_backend(min_chunk_tokens=64, flex_attention="all", compiler=aot_eager_compiler)
    _random_length_steps(torch.compile(model, backend=backend), eager, 5, 400, 1100)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    static, symbolic = backend.reports
    kinds = lambda r: sorted((x.kind, x.where) for x in r.regions if x.applied)  # noqa: E731
    assert symbolic.symbols and kinds(symbolic) == kinds(static), f"{static}\n{symbolic}"
    assert {"mlp", "lm_head"} <= {k for k, _ in kinds(symbolic)}
    if build is _gemma3:
        assert any("sliding window" in x.detail for x in symbolic.regions if x.kind == "attention"), str(symbolic)


def test_head_after_a_symbolic_slice_under_checkpointing():
    """dynamic=True makes HF's ``logits_to_keep`` a symbol, so the head reads
    ``hidden[:, -logits_to_keep:]`` of length ``s0 + s1`` (Qwen3 + GC, where the layers'
    graph break hands the head its own graph): the chunk bodies take the two symbols, not
    the sum, which bound neither and failed in Inductor. Chunked and exact at two lengths."""
    torch.manual_seed(0)
    eager = _qwen3().train()
    eager.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = copy.deepcopy(eager)
    backend = mst_fx.make_backend(chunks=4)
    _random_length_steps(torch.compile(model, backend=backend, dynamic=True), eager, 2, 128, 256)
    head = [x for x in backend.report.regions if x.kind == "lm_head"]
    assert head and all(x.applied for x in head), str(backend.report)
    assert not [s for s in backend.report.skipped if s.kind == "lm_head"], str(backend.report)


@pytest.mark.parametrize("how", ["no_grad", "eval"])
def test_inference_and_evaluation_are_exact(how):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=176))
    model = model.eval() if how == "eval" else model.train()
    ids = torch.randint(0, 256, (2, 37))
    compiled = torch.compile(copy.deepcopy(model), backend=mst_fx.make_backend(CFG))
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids)
        got = compiled(input_ids=ids, labels=ids)
    torch.testing.assert_close(got.logits, ref.logits, **TOL[torch.float32])
    torch.testing.assert_close(got.loss, ref.loss, **TOL[torch.float32])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family,case", [("llama", "packed"), ("mistral", "none"), ("llama", "single")])
def test_symbolic_flex_and_causal_on_gpu(family, case):
    """The default dynamic=None through Inductor's kernels on a GPU, fp32: the second length
    compiles a symbolic graph whose attention is still rewritten (flex block masks built at
    run time, or is_causal), exact at every length."""
    from test_attention import hf_inputs, hf_model

    eager = hf_model(family).cuda()
    model = copy.deepcopy(eager)
    backend = mst_fx.make_backend(passes=("attention",))
    compiled = torch.compile(model, backend=backend)
    for S in (200, 264, 333):
        ids, kwargs = hf_inputs(case, S=S)
        kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        got = compiled(ids.cuda(), **kwargs).loss
        got.backward()
        _same_step(model, eager, got, eager(ids.cuda(), **kwargs).loss, 1e-4, 1e-3, 1e-4)
        model.zero_grad(set_to_none=True)
    symbolic = [r for r in backend.reports if r.symbols]
    assert len(backend.reports) == 2 and len(symbolic) == 1, [str(r) for r in backend.reports]
    applied = [r for r in symbolic[0].regions if r.applied]
    failed = [s for s in symbolic[0].skipped if "flex_attention failed in Inductor here" in s.reason]
    # torch 2.11's Inductor cannot yet compile a block mask at a symbolic length
    # (CantSplit): then the masks are kept and say so (benchmarks/RESULTS.md, issue 20).
    assert len(applied) == 2 or (case != "single" and len(failed) == 2), str(symbolic[0])


def _hf_positions(S):  # transformers 5.2x: positions, then packed-sequence ids from them
    pos = (torch.arange(S) + 0).unsqueeze(0)
    first = pos[:, :1] - 1
    return pos, (torch.diff(pos, prepend=first, dim=-1) != 1).cumsum(-1)


def _steps(S):
    return torch.arange(2, S + 2).unsqueeze(0).expand(3, -1) * 1, (torch.arange(S) * 0 + 1).cumsum(-1)


@pytest.mark.parametrize("build", [_hf_positions, _steps])
def test_sequence_values_hold_at_every_length(build):
    """sequence_value reads buffers of a symbolic length as functions of the token index;
    what it says must be what the graph computes, at lengths other than the traced one."""
    from torch.fx import Interpreter

    from mst_fx.passes.graph.attention.prover import sequence_value

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(build, backend=capture, dynamic=True, fullgraph=True)(17)
    (gm,) = graphs
    outs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    seqs = [sequence_value(n) for n in outs]
    assert all(s is not None for s in seqs), seqs
    torch.compile(lambda S: torch.arange(S) >= 5, backend=capture, dynamic=True, fullgraph=True)(17)
    step = next(n for n in graphs[1].graph.nodes if n.op == "output").args[0][0]
    assert sequence_value(step) is None  # a step inside the sequence: not an affine function
    for S in (5, 40):
        class Run(Interpreter):
            def placeholder(self, target, args, kwargs):
                return S  # the only input: the length

        values = Run(gm).run(S)
        for seq, got in zip(seqs, values):
            i = torch.arange(S)
            want = torch.where(i == 0, torch.tensor(int(seq.first)), seq.a * i + int(seq.k))
            assert torch.equal(got.reshape(-1, S), want.expand_as(got.reshape(-1, S)).to(got.dtype)), (S, seq, got)


def test_a_compiler_failing_on_flex_keeps_the_other_rewrites():
    """When the compiler fails on a graph with flex rewrites (Inductor on CUDA, torch 2.11,
    at a symbolic length: "CantSplit" in the block mask), the graph is compiled again with
    its masks kept: the MLP rewrite stays, the mask's skip says why, the result is exact."""
    from mst_fx.backend import aot_eager_compiler
    from mst_fx.passes.graph.attention import flex

    def refuses_flex(gm, example_inputs, config_patches=None):
        from mst_fx.engine import graph_modules

        if any(n.target is flex.attention for m, _ in graph_modules(gm) for n in m.graph.nodes):
            raise RuntimeError("CantSplit (a stand-in)")
        return aot_eager_compiler(gm, example_inputs)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            from test_attention import Attention, window

            self.attn, self.mlp = Attention(window, width=H, heads=2), GLU(H, I)

        def forward(self, x):
            return self.mlp(self.attn(x))

    eager = Block()
    model = copy.deepcopy(eager)
    backend = mst_fx.make_backend(CFG.replace(flex_attention="all"), compiler=refuses_flex)
    x = torch.randn(2, 24, H)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    _step(torch.compile(model, backend=backend), a)
    _step(eager, b)
    torch.testing.assert_close(a.grad, b.grad, **TOL[torch.float32])
    (report,) = backend.reports
    assert [r.kind for r in report.regions if r.applied] == ["mlp"], str(report)
    (skip,) = [s for s in report.skipped if s.kind == "attention"]
    assert "flex_attention failed in Inductor here" in skip.reason and "CantSplit" in skip.reason, skip.reason
