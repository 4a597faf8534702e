"""Model code written in forms the matchers had to learn (issue 22): a token-wise activation
written as a torch.autograd.Function, a loss the model's code already split over tokens.
Each is chunked and exact; forms that are not token-wise stay unchanged with a reason.
(The zoo has a whole model of each: parallel_block, autograd_gelu, chunked_loss.)"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import TOL, check_rewrite
from torch._dynamo.utils import counters

import mst_fx
from mst_fx.backend import aot_eager_compiler

CFG = mst_fx.MSTConfig(chunks=4)
H, I, V = 32, 128, 256


class Square(torch.autograd.Function):
    """x^2 with a hand-written backward: pointwise in both directions."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2.0 * x * g


class Mixing(torch.autograd.Function):
    """Pointwise forward, but a backward that mixes tokens (a cumulative sum over them):
    not token-wise, so a chunk's gradient would differ."""

    @staticmethod
    def forward(ctx, x):
        return x * 2.0

    @staticmethod
    def backward(ctx, g):
        return g.cumsum(0) * 0 + g * 2.0 + g.cumsum(-2) * 1e-3


class FunctionMLP(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.up, self.down, self.fn = nn.Linear(H, I), nn.Linear(I, H), fn

    def forward(self, x):
        return self.down(self.fn(self.up(x)))


def test_autograd_function_activation_is_chunked_and_exact():
    x = torch.randn(2, 37, H, requires_grad=True)
    check_rewrite(FunctionMLP(Square.apply), [x], expect={"mlp": 1}, config=CFG)


def test_autograd_function_that_mixes_tokens_is_left_alone():
    x = torch.randn(2, 37, H, requires_grad=True)
    backend = check_rewrite(FunctionMLP(Mixing.apply), [x], expect={"mlp": 0}, config=CFG)
    assert any("autograd_function_apply" in s.reason for s in backend.report.skipped), str(backend.report)


def _split_ce(z, y, size=16, **kw):
    z, y = z.reshape(-1, z.shape[-1]), y.reshape(-1)
    pieces = [F.cross_entropy(a, b, reduction="none", **kw) for a, b in zip(z.split(size), y.split(size))]
    return torch.cat(pieces).sum() / y.numel()


def _summed_pieces(z, y, size=16):
    """Each piece's loss summed, the sums added (Python's sum: 0 + s0 + s1 + ...)."""
    z, y = z.reshape(-1, z.shape[-1]), y.reshape(-1)
    return sum(F.cross_entropy(a, b, reduction="none").sum() for a, b in zip(z.split(size), y.split(size))) / y.numel()


def _piece_sums(z, y):
    z, y = z.reshape(-1, z.shape[-1]), y.reshape(-1)
    pieces = [F.cross_entropy(a, b, reduction="sum") for a, b in zip(z.split(20), y.split(20))]
    return (pieces[0] + pieces[1] + pieces[2] + pieces[3]) / y.numel()


def _piece_means(z, y):
    """The mean of each piece, added: pieces of unequal size weigh their tokens unequally,
    which is not the loss over all tokens; left split."""
    z, y = z.reshape(-1, z.shape[-1]), y.reshape(-1)
    return sum(F.cross_entropy(a, b) for a, b in zip(z.split(16), y.split(16)))


def _differing_pieces(z, y):
    z, y = z.reshape(-1, z.shape[-1]), y.reshape(-1)
    pieces = [F.cross_entropy(a, b, reduction="none", label_smoothing=0.1 * k)
              for k, (a, b) in enumerate(zip(z.split(16), y.split(16)))]
    return torch.cat(pieces).sum()


def _piece_used_twice(z, y):
    z, y = z.reshape(-1, z.shape[-1]), y.reshape(-1)
    pieces = [F.cross_entropy(a, b, reduction="none") for a, b in zip(z.split(16), y.split(16))]
    return torch.cat(pieces).sum() + pieces[0].mean()


def _split_over_classes(z, y):
    z, y = z.reshape(-1, z.shape[-1]), y.reshape(-1)
    return torch.cat([p.float().square() for p in z.split(V // 2, dim=-1)], dim=-1).mean()


class SplitLossHead(nn.Module):
    def __init__(self, loss):
        super().__init__()
        self.lm, self.loss = nn.Linear(H, V, bias=False), loss

    def forward(self, h, y):
        return self.loss(self.lm(h), y)


@pytest.mark.parametrize("loss,merged,head", [
    (_split_ce, 1, 1),
    (lambda z, y: _split_ce(z, y, size=5, ignore_index=3), 1, 1),
    (_summed_pieces, 1, 1),
    (_piece_sums, 1, 1),
    (_piece_means, 0, 0),
    (_differing_pieces, 0, 0),
    (_piece_used_twice, 0, 0),
    (_split_over_classes, 0, 0),
])
def test_loss_split_over_tokens_is_joined_and_chunked(loss, merged, head):
    h = torch.randn(2, 37, H, requires_grad=True)
    y = torch.randint(0, V, (2, 37))
    backend = check_rewrite(SplitLossHead(loss), [h, y], expect={"lm_head": head}, config=CFG)
    assert counters["mst_fx_graph"]["merged_token_splits"] == merged, str(backend.report)


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "gc"])
@pytest.mark.parametrize("kw", [dict(parallel=True), dict(act="autograd_gelu"), dict(loss="chunked")],
                         ids=["parallel_block", "autograd_gelu", "chunked_loss"])
def test_new_structures_on_varying_lengths(kw, checkpointed):
    """The zoo's three structures in a real run's shape: one process, three lengths (the
    second recompiles with a symbolic length), with and without checkpointed blocks: every
    gradient equals eager's at every length, and the symbolic graph chunks both MLPs and
    the head, with as many graphs as plain torch.compile."""
    from zoo.families import NanoGPT, TanhGELU, chunked_cross_entropy

    kw = {**kw, "checkpointed": checkpointed}
    kw["act"] = TanhGELU.apply if kw.get("act") else F.gelu
    kw["loss"] = chunked_cross_entropy if kw.get("loss") else None
    model = NanoGPT(**kw)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend=mst_fx.make_backend(CFG, compiler=aot_eager_compiler))
    for s in (23, 31, 40):
        ids = torch.randint(0, V, (2, s))
        for p in list(model.parameters()) + list(twin.parameters()):
            p.grad = None
        model(ids, ids)[1].backward()
        compiled(ids, ids)[1].backward()
        for (name, a), b in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(b.grad, a.grad, **TOL[torch.float32], msg=lambda m: f"{s} {name}: {m}")
    graphs = counters["stats"]["unique_graphs"]
    assert counters["mst_fx_symbolic"]["mlp"] >= 2 and counters["mst_fx_symbolic"]["lm_head"] >= 1, (
        dict(counters["mst_fx_symbolic"]))
    torch._dynamo.reset()
    counters.clear()
    plain = torch.compile(copy.deepcopy(model), backend="aot_eager")
    for s in (23, 31, 40):
        ids = torch.randint(0, V, (2, s))
        plain(ids, ids)[1].backward()
    assert graphs == counters["stats"]["unique_graphs"]
