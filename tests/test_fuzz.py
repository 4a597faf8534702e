"""Differential fuzzing: hypothesis builds random small models out of the constructs mst_fx
meets in real ones (linear layers that expand or not, activations, gating, norms,
residuals, views and transposes that regroup tokens or ops that mix them, feature and token
reductions, a vocabulary projection with one of several losses, or none) and checks that
mst_backend never raises, never changes the output or any gradient (fp32), and that every
candidate it leaves alone has a reason in explain.

Seeded (derandomized) and bounded: a few examples in the normal suite; a longer run with
``MST_FX_FUZZ_EXAMPLES=500 pytest tests/test_fuzz.py``. The graphs go through AOTAutograd
with eager kernels (the rewrite is what varies here, not the kernels).
"""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import check_rewrite
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import mst_fx
from mst_fx.backend import aot_eager_compiler

EXAMPLES = int(os.environ.get("MST_FX_FUZZ_EXAMPLES", "10"))
B, S, D, V = 2, 7, 16, 64  # 14 tokens; V = 4 x D, the smallest vocabulary the head pass takes

ACTS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu, "tanh": torch.tanh, "none": lambda h: h}
# Ops inside a block, on its intermediate h [B, S, E]. The first five keep every token apart
# (and must be chunked through); the last three mix tokens (and must be left with a reason).
INNER = {
    "none": lambda h: h,
    "feature_center": lambda h: h - h.mean(-1, keepdim=True),
    "scale": lambda h: h * 0.5,
    "swap_batch_seq": lambda h: F.gelu(h.transpose(0, 1)).transpose(0, 1),
    "flatten_tokens": lambda h: h.reshape(-1, h.shape[-1]).relu().reshape(h.shape),
    "token_cumsum": lambda h: h.cumsum(1),
    "token_mean": lambda h: h + h.mean(1, keepdim=True),
    "token_softmax": lambda h: h.softmax(dim=1),
}
# Ops between blocks, on x [B, S, D].
BETWEEN = {
    "none": lambda x: x,
    "flatten": lambda x: x.reshape(B * S, D).reshape(B, S, D),
    "transpose": lambda x: x.transpose(0, 1).contiguous().transpose(0, 1),
    "roll_tokens": lambda x: x + x.roll(1, dims=1),
    "attend": lambda x: x + (x @ x.transpose(-1, -2) / 4).softmax(-1) @ x,
}
LOSSES = ("ce_mean", "ce_sum", "ce_masked", "logsumexp", "none")

block_spec = st.fixed_dictionaries({
    "norm": st.sampled_from(["none", "layer", "rms"]),
    "expand": st.sampled_from([1, 2, 3, 4]),
    "gate": st.booleans(),
    "act": st.sampled_from(sorted(ACTS)),
    "bias": st.booleans(),
    "inner": st.sampled_from(sorted(INNER)),
    "residual": st.booleans(),
    "between": st.sampled_from(sorted(BETWEEN)),
})
model_spec = st.fixed_dictionaries({
    "blocks": st.lists(block_spec, min_size=1, max_size=3),
    "head": st.booleans(),
    "head_bias": st.booleans(),
    "softcap": st.booleans(),
    "loss": st.sampled_from(LOSSES),
    "return_logits": st.booleans(),
    "seed": st.integers(0, 2**16),
})


class Block(nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        width = D * spec["expand"]
        self.norm = {"none": nn.Identity(), "layer": nn.LayerNorm(D), "rms": nn.RMSNorm(D)}[spec["norm"]]
        self.up = nn.Linear(D, width, bias=spec["bias"])
        self.gate = nn.Linear(D, width, bias=spec["bias"]) if spec["gate"] else None
        self.down = nn.Linear(width, D, bias=spec["bias"])

    def forward(self, x):
        s = self.spec
        h = self.norm(x)
        u = ACTS[s["act"]](self.up(h))
        if self.gate is not None:
            u = u * self.gate(h)
        y = self.down(INNER[s["inner"]](u))
        return BETWEEN[s["between"]](x + y if s["residual"] else y)


class Fuzzed(nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.blocks = nn.ModuleList(Block(b) for b in spec["blocks"])
        self.head = nn.Linear(D, V, bias=spec["head_bias"]) if spec["head"] else None

    def forward(self, x, labels, mask):
        for block in self.blocks:
            x = block(x)
        if self.head is None:
            return x
        logits = self.head(x)
        if self.spec["softcap"]:
            logits = 5.0 * torch.tanh(logits / 5.0)
        loss = _loss(self.spec["loss"], logits, labels, mask)
        if loss is None:
            return logits
        return (loss, logits) if self.spec["return_logits"] else loss


def _loss(kind, logits, labels, mask):
    flat, target = logits.view(-1, V), labels.view(-1)
    if kind == "ce_mean":
        return F.cross_entropy(flat, target)
    if kind == "ce_sum":
        return F.cross_entropy(flat, target, reduction="sum") / target.numel()
    if kind == "ce_masked":
        per_token = F.cross_entropy(flat, target, reduction="none")
        return (per_token * mask.view(-1)).sum() / mask.sum()
    if kind == "logsumexp":
        return torch.logsumexp(flat.float(), -1).mean()
    return None


def _scalar(out):
    out = out[0] if isinstance(out, tuple) else out
    return out if out.dim() == 0 else out.square().mean()


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(spec=model_spec, chunks=st.integers(2, 5))
def test_random_models_equal_eager_and_every_candidate_is_explained(spec, chunks):
    torch._dynamo.reset()
    torch.manual_seed(spec["seed"])
    model = Fuzzed(spec)
    x = torch.randn(B, S, D, requires_grad=True)
    labels = torch.randint(0, V, (B, S))
    mask = (torch.rand(B, S) > 0.3).float()
    mask[0, 0] = 1.0  # at least one token counts
    backend = check_rewrite(model, [x, labels, mask], expect=None, loss_fn=_scalar,
                            config=mst_fx.MSTConfig(chunks=chunks), compiler=aot_eager_compiler)

    report = backend.report
    for kind in ("mlp", "lm_head"):  # shown by --hypothesis-show-statistics
        event(f"{kind} rewrites: {sum(r.kind == kind and r.applied for r in report.regions)}")
    named = [r.where for r in report.regions] + [s.where for s in report.skipped]
    for i, block in enumerate(spec["blocks"]):
        if block["expand"] >= 2:  # an expanding projection: an MLP candidate
            assert any(w.startswith(f"blocks.{i}") for w in named), (i, str(report))
        if block["inner"] in ("token_cumsum", "token_mean", "token_softmax"):
            assert not any(r.kind == "mlp" and r.where.startswith(f"blocks.{i}") for r in report.regions)
    if spec["head"]:
        assert any(w.startswith("head") for w in named), str(report)
