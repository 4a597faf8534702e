"""Quantized frozen projections (QLoRA): a linear by a 4-bit NF4 weight, written as an
autograd.Function, is one projection to the MLP and head passes; chunked blocks stay exact,
adapters' gradients included, and the weight is dequantized once per projection, not per
chunk, and not kept at full precision for the backward under checkpointing (without it,
no more than plain torch.compile keeps)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from blocks import LoRAGLU, LoRALinear, NF4Linear, to_qlora
from helpers import check_rewrite
from torch._dynamo.utils import counters
from torch.utils.checkpoint import checkpoint

import mst_fx
from mst_fx.backend import aot_eager_compiler

pytest.importorskip("torchao")

H, I, V = 32, 512, 1024  # NF4 quantizes in blocks of 64 x 256 values: every weight a multiple
CFG = mst_fx.MSTConfig(chunks=4)


class Layer(nn.Module):
    """A QLoRA SwiGLU block under a residual (optionally checkpointed), then a QLoRA'd
    vocabulary projection and its loss."""

    def __init__(self, checkpointed=False):
        super().__init__()
        self.mlp = LoRAGLU(H, I, nf4=True)
        self.head = LoRALinear(H, V, nf4=True)
        self.checkpointed = checkpointed

    def forward(self, x, labels):
        h = checkpoint(self.mlp, x, use_reentrant=False) if self.checkpointed else self.mlp(x)
        return F.cross_entropy(self.head(x + h).flatten(0, 1), labels.flatten())


class Recording:
    """A compiler for MSTBackend that keeps the rewritten graphs it is handed."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs, config_patches=None):
        self.graphs.append(gm)
        return aot_eager_compiler(gm, example_inputs)


def _dequantizations(gm) -> tuple[int, int]:
    """(in the graph itself, inside its chunk bodies): ``.to`` calls on an NF4 weight."""
    from torchao.quantization import NF4Tensor

    def count(g):
        return sum(1 for n in g.graph.nodes if n.op == "call_method" and n.target == "to"
                   and isinstance(n.args[0].meta.get("example_value"), NF4Tensor))
    bodies = [m for name, m in gm.named_modules() if name and isinstance(m, torch.fx.GraphModule)]
    return count(gm), sum(count(b) for b in bodies)


def test_qlora_block_is_one_block():
    x = torch.randn(2, 37, H, requires_grad=True)
    record = Recording()
    backend = check_rewrite(LoRAGLU(H, I, nf4=True), [x], expect={"mlp": 1}, config=CFG, compiler=record)
    (region,) = backend.report.regions
    assert region.detail == f"{H}->{I}+{I}->{H}, LoRA r=4", region.detail
    assert counters["mst_fx_graph"]["opened_frozen_linears"] == 3
    (gm,) = record.graphs
    assert _dequantizations(gm) == (3, 0)  # once per projection, none per chunk


def test_qlora_head_and_block_inductor():
    x = torch.randn(2, 37, H, requires_grad=True)
    labels = torch.randint(0, V, (2, 37))
    backend = check_rewrite(Layer(), [x, labels], expect={"mlp": 1, "lm_head": 1}, config=CFG)
    head = next(r for r in backend.report.regions if r.kind == "lm_head")
    assert "LoRA r=4" in head.detail, head.detail


def _saved(model, x, labels, backend) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of what the compiled forward saves for backward."""
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t
    compiled = torch.compile(model, backend=backend)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = compiled(x, labels)
    loss.backward()
    return saved


def _full_precision(saved, shapes) -> list:
    return [s for s in saved if s[0] in shapes and s[1].is_floating_point]


def test_qlora_checkpointed_keeps_no_dequantized_weight():
    """Under checkpointing the unmodified model keeps the 4-bit weights for backward; the
    rewritten one must too: no full-precision weight of the checkpointed block is saved."""
    torch.manual_seed(0)
    x = torch.randn(2, 37, H, requires_grad=True)
    labels = torch.randint(0, V, (2, 37))
    check_rewrite(Layer(checkpointed=True), [x, labels], expect={"mlp": 1, "lm_head": 1}, config=CFG,
                  compiler=aot_eager_compiler)
    torch._dynamo.reset()
    saved = _saved(Layer(checkpointed=True), x, labels, mst_fx.make_backend(CFG))
    assert not _full_precision(saved, {(I, H), (H, I)}), saved


class Mixer(nn.Module):
    """A 4-bit projection whose output is mixed over the tokens (not chunkable), then a
    chunked QLoRA block, no checkpointing."""

    def __init__(self):
        super().__init__()
        self.proj = NF4Linear(H, 512)
        self.mix = NF4Linear(512, H)
        self.mlp = LoRAGLU(H, 2 * I, nf4=True)

    def forward(self, x, labels):
        h = x + self.mix(torch.softmax(self.proj(x), dim=1))
        return (h + self.mlp(h)).pow(2).mean()


def test_without_checkpointing_keeps_what_plain_compile_keeps():
    """Without checkpointing plain torch.compile keeps each dequantized weight from forward
    to backward (its partitioner does not recompute the dequantization; eager keeps the
    codes). The rewritten graph keeps no more: the same full-precision weights, once each."""
    torch.manual_seed(0)
    x = torch.randn(2, 37, H, requires_grad=True)
    labels = torch.randint(0, V, (2, 37))
    check_rewrite(Mixer(), [x, labels], expect={"mlp": 1}, config=CFG, compiler=aot_eager_compiler)
    shapes = {(512, H), (H, 512), (2 * I, H), (H, 2 * I)}
    plain = _full_precision(_saved(Mixer(), x, labels, "inductor"), shapes)
    torch._dynamo.reset()
    ours = _full_precision(_saved(Mixer(), x, labels, mst_fx.make_backend(CFG)), shapes)
    assert set(ours) <= set(plain), (plain, ours)


class TrainedWeightLinear(torch.autograd.Function):
    """A linear that also returns its weight's gradient: not a frozen projection."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, (g.flatten(0, -2).t() @ x.flatten(0, -2))


class TrainedGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.ParameterList(nn.Parameter(torch.randn(*s) / s[1] ** 0.5) for s in ((I, H), (I, H), (H, I)))

    def forward(self, x):
        g, u, d = self.w
        return TrainedWeightLinear.apply(F.silu(TrainedWeightLinear.apply(x, g)) * TrainedWeightLinear.apply(x, u), d)


def test_function_with_a_weight_gradient_is_not_opened():
    x = torch.randn(2, 37, H, requires_grad=True)
    backend = check_rewrite(TrainedGLU(), [x], expect={}, config=CFG, compiler=aot_eager_compiler)
    assert counters["mst_fx_graph"]["opened_frozen_linears"] == 0
    assert not backend.report.regions


def test_qlora_llama_checkpointed_matches_eager():
    """HF Llama, every decoder linear a 4-bit base with an adapter, HF gradient checkpointing
    (the QLoRA recipe): both MLPs and the head chunked, attention rewritten, exact."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=256))
    model = to_qlora(model, "model.layers")
    for p in list(model.model.embed_tokens.parameters()) + list(model.lm_head.parameters()):
        p.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    ids = torch.randint(0, V, (2, 23))
    backend = check_rewrite(model, [], kwargs={"input_ids": ids, "labels": ids},
                            expect={"mlp": 2, "lm_head": 1, "attention": 2}, config=CFG,
                            loss_fn=lambda out: out.loss)
    mlps = [r for r in backend.report.regions if r.kind == "mlp"]
    assert all("LoRA r=4" in r.detail for r in mlps), mlps
    assert counters["mst_fx_graph"]["opened_frozen_linears"] == 2 * 7
