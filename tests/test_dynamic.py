"""Varying lengths: with symbolic token counts (dynamic=True, mark_dynamic, or the default's
recompile after a second length) the MLP blocks are still chunked, exact at every length,
without a recompile per length; inference and evaluation compile and are exact."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import mst_fx
from blocks import GLU, Stack
from helpers import TOL, grads_of

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


transformers = pytest.importorskip("transformers")


def test_hf_llama_twenty_random_lengths_compile_twice():
    """The default dynamic=None: one static compile, then one with a symbolic length (the
    MLPs and the head chunked there too, the head in recompute mode); 20 steps of random
    lengths, losses and gradients equal eager."""
    torch.manual_seed(0)
    eager = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=176)).train()
    model = copy.deepcopy(eager)
    backend = mst_fx.make_backend(min_chunk_tokens=256)
    counters.clear()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.randint(0, 512, (1, int(torch.randint(1000, 4097, (1,), generator=g))), generator=g)
        got, ref = compiled(input_ids=ids, labels=ids).loss, eager(input_ids=ids, labels=ids).loss
        got.backward()
        ref.backward()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
        model.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    symbolic = [r for r in backend.report.regions if r.detail.endswith("symbolic tokens")]
    assert sorted(r.kind for r in symbolic) == ["lm_head", "mlp", "mlp"], str(backend.report)
    assert all(r.applied for r in symbolic) and "grad=recompute" in symbolic[-1].detail


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
