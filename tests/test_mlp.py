"""MLP pass: every block form is rewritten and exact; unsafe forms are left alone, with reasons."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from blocks import GLU, Conv1DMLP, FusedGateUp, MatmulMLP, Plain, Stack, gelu_tanh, squared_relu
from helpers import check_rewrite
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters
from torch.utils.checkpoint import checkpoint

import mst_fx
from mst_fx.backend import aot_eager_compiler

H, I = 32, 96
CFG = mst_fx.MSTConfig(chunks=4)

BLOCKS = {
    "swiglu": lambda: GLU(H, I, F.silu),
    "geglu_tanh": lambda: GLU(H, I, gelu_tanh),
    "sigmoid_gate": lambda: GLU(H, I, torch.sigmoid),
    "tanh_gate_bias": lambda: GLU(H, I, torch.tanh, bias=True),
    "gelu_bias": lambda: Plain(H, I, F.gelu),
    "relu": lambda: Plain(H, I, F.relu),
    "squared_relu": lambda: Plain(H, I, squared_relu, bias=False),
    "dropout_p0": lambda: Plain(H, I, F.gelu, dropout=0.0),
    "fused_chunk": lambda: FusedGateUp(H, I, "chunk"),
    "fused_split": lambda: FusedGateUp(H, I, "split"),
    "fused_slice": lambda: FusedGateUp(H, I, "slice"),
    "fused_narrow": lambda: FusedGateUp(H, I, "narrow"),
    "conv1d_gelu_new": lambda: Conv1DMLP(H, I),
    "matmul_casts": lambda: MatmulMLP(H, I),
}


@pytest.mark.parametrize("name", sorted(BLOCKS))
@pytest.mark.parametrize("shape", [(2, 37), (74,)], ids=["3d", "2d"])  # 74 tokens: not divisible by 4
def test_block_is_rewritten_and_exact(name, shape):
    block = BLOCKS[name]()
    x = torch.randn(*shape, H, requires_grad=True)
    # Every block goes through Inductor in the 3-D variant; the 2-D one checks the same
    # rewrite through AOTAutograd with eager kernels (the suite's time on 2 cores).
    compiler = aot_eager_compiler if len(shape) == 1 else None
    backend = check_rewrite(block, [x], expect={"mlp": 1}, config=CFG, compiler=compiler)
    (region,) = backend.report.regions
    assert region.kind == "mlp" and region.chunks == 4 and region.tokens == 74


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtypes(dtype):
    block = GLU(H, I).to(dtype)
    x = torch.randn(3, 50, H, dtype=dtype, requires_grad=True)
    check_rewrite(block, [x], expect={"mlp": 1}, config=CFG, dtype=dtype)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_layers_rewritten_with_module_paths(checkpointed):
    x = torch.randn(2, 40, H, requires_grad=True)
    model = Stack(2, checkpointed)
    # Caches off: the post-grad pass below runs only when Inductor compiles.
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        backend = check_rewrite(model, [x], expect={"mlp": 2}, config=CFG)
    assert sorted(r.where for r in backend.report.regions) == ["mlps.0", "mlps.1"]
    # Through Inductor, exact above: under GC the layers' recompute keeps no chunk forward.
    assert counters["mst_fx_inductor"]["dead_forward_calls"] == (8 if checkpointed else 0)
    report = mst_fx.explain(model, x, config=CFG)
    assert [r.kind for r in report.regions] == ["mlp", "mlp"] and not report.skipped
    assert "mlps.0" in str(report)


def _backward_mm_flops(config, model, x):
    """FLOPs of every mm the backward graph runs (inside chunk bodies too), from the graphs
    AOTAutograd's min-cut partitioner makes of the rewritten graph (as Inductor does),
    after the post-grad pass that drops dead chunk forwards (as the backend runs it)."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from mst_fx import engine
    from mst_fx.passes.post_grad.dead_forwards import drop_dead_forwards

    flops = {}

    def count(gm):
        total = 0
        for n in gm.graph.nodes:
            if n.target is torch.ops.aten.mm.default:
                (m, k), (_, n_) = n.args[0].meta["val"].shape, n.args[1].meta["val"].shape
                total += 2 * m * k * n_
            elif n.target is torch.ops.higher_order.invoke_subgraph:
                total += count(getattr(gm, n.args[0].target))
        return total

    def bw(gm, _):
        if config is not None:
            drop_dead_forwards(gm.graph)
            gm.recompile()
        flops["bw"] = count(gm)
        return gm

    def backend(gm, example_inputs):
        if config is not None:
            engine.rewrite(gm, config)
        return aot_module_simplified(gm, example_inputs, fw_compiler=lambda g, _: g,
                                     bw_compiler=bw, partition_fn=min_cut_rematerialization_partition)

    torch._dynamo.reset()
    torch.compile(model, backend=backend)(x).sum().backward()
    return flops["bw"]


@pytest.mark.parametrize("nested", [False, True])
def test_checkpointed_layer_recompute_cost(nested):
    """Under per-layer checkpointing the layer is recomputed once. With
    recompute_in_checkpoint=False only the down projection re-runs inside the recomputed
    chunk (1 unit of 2*T*H*I per layer) and every chunk's intermediates are alive at once
    there. With True (the default) the layer's recompute keeps no chunk forward at all
    (mst_fx.passes.post_grad.dead_forwards drops the calls that only pass their inputs through) and each
    chunk's gate and up run right before its backward: no GEMM more than plain GC, one
    chunk's intermediates alive at a time."""
    x = torch.randn(2, 64, H, requires_grad=True)
    model = Stack(2, checkpointed=True)
    plain = _backward_mm_flops(None, model, x)
    chunked = _backward_mm_flops(CFG.replace(recompute_in_checkpoint=nested), model, x)
    unit = 2 * x.shape[0] * x.shape[1] * H * I
    assert chunked - plain == (0 if nested else 1) * unit * 2  # two layers


def test_not_checkpointed_recomputes_only_the_expansions():
    x = torch.randn(2, 64, H, requires_grad=True)
    model = Stack(2, checkpointed=False)
    unit = 2 * x.shape[0] * x.shape[1] * H * I
    extra = _backward_mm_flops(CFG, model, x) - _backward_mm_flops(None, model, x)
    assert extra == 2 * unit * 2  # gate and up recomputed, per layer


# ---- negative cases: left unchanged, with a reason, and still exact --------------------


class TokenMix(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.fc1, self.fc2, self.how = nn.Linear(H, I), nn.Linear(I, H), how

    def forward(self, x, other=None):
        h = F.gelu(self.fc1(x))
        if self.how == "transpose":
            h = h.transpose(0, 1).contiguous().transpose(0, 1)
        elif self.how == "cumsum":
            h = torch.cumsum(h, dim=1)
        elif self.how == "mean_over_tokens":
            h = h - h.mean(dim=1, keepdim=True)
        elif self.how == "escapes":
            return self.fc2(h), h.sum()
        elif self.how == "second_input":
            h = h * other
        return self.fc2(h)


@pytest.mark.parametrize("how,reason", [
    ("transpose", "not token-wise"),
    ("cumsum", "not token-wise"),
    ("mean_over_tokens", "not token-wise"),
    ("escapes", "not token-wise"),
    ("second_input", "second token-shaped input"),
])
def test_unsafe_blocks_left_unchanged(how, reason):
    x = torch.randn(2, 24, H, requires_grad=True)
    args = [x, torch.randn(2, 24, I)] if how == "second_input" else [x]
    block = TokenMix(how)
    loss = (lambda out: out[0].square().mean() + out[1]) if how == "escapes" else None
    kwargs = {"loss_fn": loss} if loss else {}
    backend = check_rewrite(block, args, expect={"mlp": 0}, config=CFG, **kwargs)
    assert not backend.report.regions
    assert any(reason in s.reason for s in backend.report.skipped), str(backend.report)


def test_intermediate_returned_is_left_unchanged():
    class Returns(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(H, I), nn.Linear(I, H)

        def forward(self, x):
            h = F.relu(self.fc1(x))
            return self.fc2(h), h

    x = torch.randn(2, 24, H, requires_grad=True)
    backend = check_rewrite(Returns(), [x], expect={"mlp": 0}, config=CFG,
                            loss_fn=lambda o: o[0].square().mean() + o[1].mean())
    assert "output of the graph" in backend.report.skipped[0].reason


def test_dropout_in_training_is_left_unchanged_only_inside_checkpointing():
    """Outside a checkpointed region the chunk body keeps its dropout mask for backward
    (tests/test_lora.py checks the gradients by finite differences); inside one, torch
    would redraw it on recompute."""
    x = torch.randn(2, 24, H, requires_grad=True)
    report = mst_fx.explain(Plain(H, I, dropout=0.1).train(), x, config=CFG)
    assert len(report.regions) == 1
    block = Plain(H, I, dropout=0.1).train()
    wrapped = lambda x: checkpoint(block, x, use_reentrant=False)  # noqa: E731
    report = mst_fx.explain(wrapped, x, config=CFG)
    assert not report.regions and "checkpointed" in report.skipped[0].reason


def test_too_few_tokens_for_default_chunking():
    x = torch.randn(2, 24, H, requires_grad=True)
    report = mst_fx.explain(GLU(H, I), x)  # default: at least 1024 tokens per chunk
    assert not report.regions and "min_chunk_tokens" in report.skipped[0].reason
    check_rewrite(GLU(H, I), [x], expect={"mlp": 0})


def test_default_chunk_count_follows_mst():
    """M = sum of expanded widths / hidden (2 x 4096 / 512 = 16 for this GLU), floored by
    min_chunk_tokens (8192 tokens / 1024 = 8)."""
    x = torch.randn(8192, 512)
    (region,) = mst_fx.explain(GLU(512, 4096), x).regions
    assert region.chunks == 8
    (region,) = mst_fx.explain(GLU(512, 4096), x, config=mst_fx.MSTConfig(min_chunk_tokens=256)).regions
    assert region.chunks == 16
    (region,) = mst_fx.explain(Plain(512, 1024), x).regions
    assert region.chunks == 2
    # chunk_bytes: gate + up of 8192 tokens in fp32 hold 256 MiB; 64 MiB per chunk -> M=4
    config = mst_fx.MSTConfig(chunk_bytes=64 << 20)
    (region,) = mst_fx.explain(GLU(512, 4096), x, config=config).regions
    assert region.chunks == 4


def test_default_leaves_blocks_whose_weights_outweigh_their_intermediates():
    """Per-chunk weight-gradient partials cost about the weights: 2048 tokens x 2 x 4096
    wide (64 MiB) vs 3 x 4096 x 2048 weights (96 MiB) is not worth chunking."""
    x = torch.randn(2048, 2048)
    config = mst_fx.MSTConfig(min_chunk_tokens=256)
    report = mst_fx.explain(GLU(2048, 4096), x, config=config)
    assert not report.regions and "no larger than the weights" in report.skipped[0].reason
    assert len(mst_fx.explain(GLU(2048, 4096), x, config=config.replace(chunks=4)).regions) == 1


# ---- property: any shape, activation, chunk count and dtype ------------------------------

ACTS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "sigmoid": torch.sigmoid}


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    batch=st.integers(1, 3), seq=st.integers(1, 40), hidden=st.sampled_from([8, 16, 24]),
    expand=st.integers(2, 4), act=st.sampled_from(sorted(ACTS)), glu=st.booleans(),
    chunks=st.integers(2, 7), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_property_equals_eager(batch, seq, hidden, expand, act, glu, chunks, dtype):
    torch._dynamo.reset()
    inter = hidden * expand
    block = (GLU(hidden, inter, ACTS[act]) if glu else Plain(hidden, inter, ACTS[act])).to(dtype)
    x = torch.randn(batch, seq, hidden, dtype=dtype, requires_grad=True)
    tokens = batch * seq
    expect = {"mlp": 1 if min(chunks, tokens) >= 2 else 0}
    # Shapes and chunk counts vary here, not kernels: AOTAutograd with eager kernels.
    check_rewrite(block, [x], expect=expect, config=mst_fx.MSTConfig(chunks=chunks), dtype=dtype,
                  compiler=aot_eager_compiler)


def test_expansion_inside_a_block_is_one_region():
    """fc1 expands, fc_mid expands again inside the block: one region, the outer one."""

    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.mid, self.fc2 = nn.Linear(H, 2 * H), nn.Linear(2 * H, 4 * H), nn.Linear(4 * H, H)

        def forward(self, x):
            return self.fc2(F.gelu(self.mid(F.relu(self.fc1(x)))))

    x = torch.randn(2, 24, H, requires_grad=True)
    backend = check_rewrite(Nested(), [x], expect={"mlp": 1}, config=CFG)
    assert any("overlaps" in s.reason for s in backend.report.skipped)


def test_view_that_changes_the_feature_dim_is_left_unchanged():
    class Heads(nn.Module):  # like attention: split the features into heads, mix per head
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(H, I), nn.Linear(I, H)

        def forward(self, x):
            h = self.fc1(x)
            h = h.view(*h.shape[:-1], 4, I // 4).softmax(-2).flatten(-2)
            return self.fc2(h)

    x = torch.randn(2, 24, H, requires_grad=True)
    backend = check_rewrite(Heads(), [x], expect={"mlp": 0}, config=CFG)
    assert "feature dim" in backend.report.skipped[0].reason


class PostNorm(nn.Module):
    """BERT's layer shape: the residual adds the MLP's own input, h + mlp(h), then LayerNorm.
    (The in-place write that broke BERT did not reproduce in this small form; the BERT
    test in test_models.py is the regression test.)"""

    def __init__(self):
        super().__init__()
        self.norm_in, self.norm_out, self.mlp = nn.LayerNorm(H), nn.LayerNorm(H), Plain(H, I)

    def forward(self, x):
        h = self.norm_in(x)
        return self.norm_out(h + self.mlp(h))


def test_residual_over_the_block_input_is_exact():
    x = torch.randn(2, 40, H, requires_grad=True)
    check_rewrite(PostNorm(), [x], expect={"mlp": 1}, config=CFG)


@pytest.mark.parametrize("dynamo_path,expect", [
    ("L['self'].model.layers[0].mlp", "model.layers.0.mlp"),
    ("L['args'][0].model.layers.0.mlp", "model.layers.0.mlp"),  # forward behind a *args decorator
    ("L['self'].base_model.__dict__._modules['model'].layers[1]", "base_model.model.layers.1"),
])
def test_module_paths_read_as_named_modules(dynamo_path, expect):
    from mst_fx.engine import _clean

    assert _clean(dynamo_path) == expect
