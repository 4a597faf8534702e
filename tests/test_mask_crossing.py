"""Masks built in one compiled graph and used in another (passes/graph/attention/crossing.py):
a graph break between the mask's code and the layers (FSDP2's hooks, an eager module)
still gets the attention rewrite, results equal eager, and a mask the first graph did not
make runs the later graph unchanged."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import check_rewrite
from torch._dynamo.utils import counters

import mst_fx
from mst_fx.backend import aot_eager_compiler

transformers = pytest.importorskip("transformers")


class BrokenModel(torch.nn.Module):
    """A mask built from the indices, a graph break, then two attention layers using it;
    ``mask`` given to forward replaces the built one."""

    def __init__(self, window=None, width=16, heads=2):
        super().__init__()
        self.window, self.heads = window, heads
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(width, 3 * width) for _ in range(2))
        self.out = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(2))

    def forward(self, x, mask=None):
        B, S, D = x.shape
        if mask is None:
            i = torch.arange(S, device=x.device)
            mask = i[None, :] <= i[:, None]
            if self.window is not None:
                mask = mask & (i[:, None] - i[None, :] < self.window)
            mask = mask[None, None]
        torch._dynamo.graph_break()
        for qkv, out in zip(self.qkv, self.out):
            q, k, v = qkv(x).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
            x = x + out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, S, D))
        return x


def test_causal_mask_across_a_graph_break():
    """The causal mask is an output of the first graph and an input of the second, which
    drops it (is_causal=True) in both layers; output and gradients equal eager."""
    torch.manual_seed(0)
    backend = check_rewrite(BrokenModel(), [torch.randn(2, 12, 16, requires_grad=True)],
                            expect={"attention": 2})
    details = [r.detail for r in backend.report.regions]
    assert all(d.startswith("causal") and "earlier graph" in d for d in details), details
    assert counters["mst_fx_run"]["attention"] == 2 and not counters["mst_fx_run"]["mask_unproved"]


def test_sliding_window_across_a_graph_break_becomes_flex():
    """A mask of the indices alone (a sliding window) crosses as its mask_mod: the later
    graph builds the block mask itself."""
    torch.manual_seed(0)
    config = mst_fx.MSTConfig(passes=("attention",), flex_attention="all")
    backend = check_rewrite(BrokenModel(window=4), [torch.randn(1, 12, 16, requires_grad=True)],
                            expect={"attention": 2}, config=config, compiler=aot_eager_compiler)
    assert all(r.detail.startswith("flex") and "sliding window" in r.detail for r in backend.report.regions)


def test_a_mask_the_first_graph_did_not_make_runs_the_graph_unchanged():
    """The later graph was compiled for the first graph's causal mask; handed a mask of the
    same shape from elsewhere (not causal) it runs unchanged, eagerly: exact, and counted."""
    torch.manual_seed(0)
    eager = BrokenModel()
    model = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=mst_fx.make_backend())
    x = torch.randn(1, 12, 16)
    compiled(x).sum().backward()
    assert counters["mst_fx"]["attention"] == 2
    other = torch.rand(1, 1, 12, 12) < 0.5
    other |= torch.eye(12, dtype=torch.bool)  # every query keeps a key
    model.zero_grad()
    got = compiled(x, other)
    got.sum().backward()
    ref = eager(x, other)
    ref.sum().backward()
    torch.testing.assert_close(got, ref)
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert counters["mst_fx_run"]["mask_unproved"] == 1


def test_hf_llama_with_a_graph_break_per_layer():
    """HF Llama, a graph break before every decoder layer (as FSDP2's hooks make) and the
    causal mask built, not skipped (transformers 5.17 under compile): the mask is built in
    the root's graph and each layer's graph drops it, at a static and a symbolic length."""
    torch.manual_seed(0)
    eager = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=176)).train()
    model = copy.deepcopy(eager)

    @torch._dynamo.disable
    def hook(module, args):
        return None

    for layer in model.model.layers:
        layer.register_forward_pre_hook(hook)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=mst_fx.make_backend(passes=("attention",)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transformers.masking_utils, "_ignore_causal_mask_sdpa", lambda *a, **k: False)
        for n in (48, 80):
            ids = torch.randint(0, 256, (1, n))
            counters["mst_fx_run"].clear()
            got = compiled(input_ids=ids, labels=ids).loss
            got.backward()
            ref = eager(input_ids=ids, labels=ids).loss
            ref.backward()
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            for (name, p), q in zip(model.named_parameters(), eager.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
            model.zero_grad()
            eager.zero_grad()
            assert counters["mst_fx_run"]["attention"] == 2, dict(counters["mst_fx_run"])
            assert not counters["mst_fx_run"]["mask_unproved"]
