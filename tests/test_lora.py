"""LoRA adapters: a projection with low-rank updates added is one projection to the MLP and
vocabulary-projection passes; chunked blocks stay exact, adapters' gradients included."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from blocks import LoRAGLU, LoRALinear
from helpers import check_rewrite
from torch.utils.checkpoint import checkpoint

import mst_fx
from mst_fx.backend import aot_eager_compiler

H, I, V = 32, 96, 256
CFG = mst_fx.MSTConfig(chunks=4)


@pytest.mark.parametrize("lora", [dict(), dict(adapters=2, bias=True)], ids=["one", "two_adapters_bias"])
def test_lora_block_is_one_block(lora):
    x = torch.randn(2, 37, H, requires_grad=True)
    # Inductor for one adapter; the variant through AOTAutograd with eager kernels (suite time).
    backend = check_rewrite(LoRAGLU(H, I, **lora), [x], expect={"mlp": 1}, config=CFG,
                            compiler=aot_eager_compiler if lora else None)
    (region,) = backend.report.regions
    assert region.detail == f"{H}->{I}+{I}->{H}, LoRA r=4", region.detail


class Head(nn.Module):
    """A LoRA'd MLP under a residual, then a LoRA'd vocabulary projection and its loss;
    optionally the layer under torch.utils.checkpoint."""

    def __init__(self, dropout=0.0, checkpointed=False):
        super().__init__()
        self.mlp = LoRAGLU(H, I, dropout=dropout)
        self.head = LoRALinear(H, V, dropout=dropout)
        self.checkpointed = checkpointed

    def forward(self, x, labels):
        h = checkpoint(self.mlp, x, use_reentrant=False) if self.checkpointed else self.mlp(x)
        return F.cross_entropy(self.head(x + h).flatten(0, 1), labels.flatten())


def test_lora_head_is_chunked_with_its_adapter():
    x = torch.randn(2, 37, H, requires_grad=True)
    labels = torch.randint(0, V, (2, 37))
    # Eager kernels: a LoRA head goes through Inductor in test_peft_llama_matches_eager.
    backend = check_rewrite(Head(), [x, labels], expect={"mlp": 1, "lm_head": 1}, config=CFG,
                            compiler=aot_eager_compiler)
    head = next(r for r in backend.report.regions if r.kind == "lm_head")
    assert head.detail.endswith("grad=recompute, LoRA r=4"), head.detail


def _finite_difference_error(model, x, labels, backend) -> float:
    """Largest relative gap between each parameter's gradient along a random direction and
    the loss's central difference, both with the same seed (so the same dropout masks)."""
    compiled = torch.compile(model, backend=backend)

    def loss():
        torch.manual_seed(1)
        return compiled(x, labels)

    loss().backward()
    worst = 0.0
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is None:
                continue
            v, eps = torch.randn_like(p), 1e-6
            p += eps * v
            up = loss()
            p -= 2 * eps * v
            down = loss()
            p += eps * v
            slope, grad = (up - down) / (2 * eps), (p.grad * v).sum()
            worst = max(worst, float((slope - grad).abs() / grad.abs().clamp(min=1e-3)))
    return worst


def test_lora_dropout_gradients_belong_to_the_forward_that_ran():
    """Dropout can't be compared with eager (other random streams); instead, in float64,
    each gradient must match finite differences of the same-seed loss. The MLP is chunked
    with its adapters' dropout; the head with a dropout adapter is left unchanged (its
    recomputed body gave gradients of another mask when it was chunked)."""
    torch.manual_seed(0)
    model = Head(dropout=0.3).double()
    x = torch.randn(2, 37, H, dtype=torch.float64)
    labels = torch.randint(0, V, (2, 37))
    backend = mst_fx.make_backend(CFG)
    assert _finite_difference_error(model, x, labels, backend) < 1e-6
    # The report covers the training graph and the no_grad ones of the differences.
    assert {r.kind for r in backend.report.regions} == {"mlp"}, str(backend.report)
    assert any(s.kind == "lm_head" and s.where == "head" and "dropout p=0.3" in s.reason
               for s in backend.report.skipped), str(backend.report)


def test_lora_dropout_inside_checkpointing_is_left_unchanged():
    model = Head(dropout=0.3, checkpointed=True)
    x, labels = torch.randn(2, 37, H), torch.randint(0, V, (2, 37))
    report = mst_fx.explain(model, x, labels, config=CFG)
    assert not report.regions
    (mlp,) = [s for s in report.skipped if s.kind == "mlp"]
    assert "LoRA adapter: dropout p=0.3" in mlp.reason and "checkpointed" in mlp.reason


peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _peft_llama(lora_targets, modules_to_save=None, dropout=0.0):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=176))
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=lora_targets,
        modules_to_save=modules_to_save))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; random so that adapters matter
            nn.init.normal_(p, std=0.1)
    return model.train()


@pytest.mark.parametrize("case", ["all_linear_save_head", "mlp_head_trainable_base_ckpt"])
def test_peft_llama_matches_eager(case):
    if case == "all_linear_save_head":
        model = _peft_llama("all-linear", modules_to_save=["lm_head"])
        expect = {"mlp": 2, "lm_head": 1}
    else:
        model = _peft_llama(["gate_proj", "up_proj", "down_proj", "lm_head"])
        for name, p in model.named_parameters():
            if "mlp.up_proj.base_layer" in name:  # a base weight trained with its adapter
                p.requires_grad_(True)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        expect = {"mlp": 2, "lm_head": 1, "attention": 2}
    ids = torch.randint(0, V, (2, 23))
    # The checkpointed case through Inductor, the other with eager kernels (suite time).
    backend = check_rewrite(model, [], kwargs={"input_ids": ids, "labels": ids}, expect=expect,
                            config=CFG, loss_fn=lambda out: out.loss,
                            compiler=None if case.endswith("ckpt") else aot_eager_compiler)
    mlps = [r for r in backend.report.regions if r.kind == "mlp"]
    assert all(r.where.endswith(f"layers.{i}.mlp") for i, r in enumerate(mlps)), mlps
    assert all("LoRA r=4" in r.detail for r in mlps)
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert any("lora_A" in n for n in trained) and any("lora_B" in n for n in trained)


def test_merged_adapters_are_plain_projections():
    model = _peft_llama(["gate_proj", "up_proj", "down_proj"])
    model.merge_adapter()
    ids = torch.randint(0, V, (2, 23))
    report = mst_fx.explain(model, input_ids=ids, labels=ids, config=CFG)
    mlps = [r for r in report.regions if r.kind == "mlp"]
    assert len(mlps) == 2 and not any("LoRA" in r.detail for r in mlps), str(report)
