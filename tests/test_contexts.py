"""Compiled regions that run inside the caller's autograd contexts: an eager
torch.utils.checkpoint around a compiled layer (activation checkpointing applied after
compile, as training libraries' recipes do), saved-tensor hooks (CPU offload), autocast
and no_grad. Each trains exactly as eager, with the rewrites applied."""

import contextlib
import copy

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint as checkpoint
from blocks import GLU
from helpers import TOL, grads_of
from torch._dynamo.utils import counters

import mst_fx

CFG = mst_fx.MSTConfig(chunks=4)


class Layer(nn.Module):
    def __init__(self, hidden=32, inter=128):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.mlp = GLU(hidden, inter)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class Head(nn.Module):
    def __init__(self, hidden=32, vocab=1024):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, vocab, bias=False)

    def forward(self, x, labels):
        logits = self.proj(self.norm(x)).float()
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


class Counting(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that keep a copy of each saved tensor (as offload hooks do)."""

    def __init__(self):
        super().__init__(lambda t: t.clone(), lambda t: t)


def forward(layers, head, x, labels, how):
    h = x
    for layer in layers:
        if how == "checkpoint":
            h = checkpoint.checkpoint(layer, h, use_reentrant=False)
        elif how == "checkpoint_reentrant":
            h = checkpoint.checkpoint(layer, h, use_reentrant=True)
        else:
            h = layer(h)
    return head(h, labels)


CONTEXTS = {
    "checkpoint": lambda device: contextlib.nullcontext(),
    "checkpoint_reentrant": lambda device: contextlib.nullcontext(),
    "save_on_cpu": lambda device: torch.autograd.graph.save_on_cpu(),
    "saved_tensors_hooks": lambda device: Counting(),
    "autocast": lambda device: torch.autocast(device, dtype=torch.bfloat16),  # fp32 weights: AMP
}


@pytest.mark.parametrize("how", list(CONTEXTS))
def test_compiled_layers_inside_a_context_train_as_eager(how):
    _check(how, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("how", ["checkpoint", "autocast"])
def test_compiled_layers_inside_a_context_on_gpu(how):
    _check(how, "cuda")


@pytest.mark.parametrize("how", ["checkpoint", "save_on_cpu"])
def test_offloading_layers_inside_a_context_train_as_eager(how):
    """MSTConfig.offload with every saved tensor offloaded (no size floor) in layers that
    run inside an eager checkpoint (its recompute runs the compiled forward again, copies
    included) or under save_on_cpu hooks: exact, and the copies ran."""
    from mst_fx.passes.partition import transfer

    before = transfer.STATS["offloaded"]
    _check(how, "cpu", CFG.replace(offload=True, offload_min_bytes=0))
    assert transfer.STATS["offloaded"] > before


def _check(how: str, device: str, config: mst_fx.MSTConfig = CFG) -> None:
    layers, head = nn.ModuleList(Layer() for _ in range(2)).to(device), Head().to(device)
    x = torch.randn(2, 64, 32, requires_grad=True, device=device)
    labels = torch.randint(0, 1024, (2, 64), device=device)
    backend = mst_fx.make_backend(config)
    comp_layers, comp_head = copy.deepcopy(layers), copy.deepcopy(head)
    compiled = [torch.compile(m, backend=backend) for m in comp_layers]
    x2 = x.detach().clone().requires_grad_()
    with CONTEXTS[how](device):
        ref = forward(layers, head, x, labels, how)
        ref.backward()
    with CONTEXTS[how](device):
        got = forward(compiled, torch.compile(comp_head, backend=backend), x2, labels, how)
        got.backward()
    tol = TOL[torch.bfloat16 if how == "autocast" else torch.float32]
    torch.testing.assert_close(got, ref, **tol)
    ref_g = grads_of(nn.ModuleList([layers, head]), [x])
    got_g = grads_of(nn.ModuleList([comp_layers, comp_head]), [x2])
    assert ref_g.keys() == got_g.keys()
    for name in ref_g:
        torch.testing.assert_close(got_g[name], ref_g[name], **tol, msg=lambda m: f"{name}: {m}")
    assert counters["mst_fx"]["mlp"] >= 1 and counters["mst_fx"]["lm_head"] == 1, (
        dict(counters["mst_fx"]), str(backend.report))


def test_compiled_model_under_no_grad_matches_eager():
    layers, head = nn.ModuleList(Layer() for _ in range(2)), Head()
    x, labels = torch.randn(2, 64, 32), torch.randint(0, 1024, (2, 64))
    backend = mst_fx.make_backend(CFG)
    compiled = [torch.compile(m, backend=backend) for m in copy.deepcopy(layers)]
    with torch.no_grad():
        ref = forward(layers, head, x, labels, "plain")
        got = forward(compiled, torch.compile(copy.deepcopy(head), backend=backend), x, labels, "plain")
    torch.testing.assert_close(got, ref, **TOL[torch.float32])
    assert not backend.report.skipped or all("rewrite failed" not in s.reason for s in backend.report.skipped)
