"""lm_head, at run time: logits the head's loop returned without gradient (they were computed
chunk by chunk for the loss) are marked so that a backward through them raises instead of
silently leaving a gradient out. The backend calls ``wrap_compiled`` on every compiled graph
this pass rewrote."""

from __future__ import annotations

import torch

from mst_fx import fx


def wrap_compiled(compiled, gm: torch.fx.GraphModule):
    """``compiled`` with the graph's gradient-free logits outputs guarded (see guard_logits)."""
    return guard_logits(compiled, logits_outputs(gm))


def logits_outputs(gm: torch.fx.GraphModule) -> list[int]:
    """Positions of graph outputs that the lm_head pass turned into logits without gradient."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    values = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    return [i for i, a in enumerate(values)
            if isinstance(a, torch.fx.Node) and a.meta.get(fx.LOGITS_META)]


class _NoGradientThroughLogits(torch.autograd.Function):
    """Marks rewritten logits: backward through them raises instead of silently leaving a
    gradient out. (Their values are exact; their gradient was never computed.)"""

    @staticmethod
    def forward(ctx, logits, anchor):
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(
            "mst_fx: these logits were computed chunk by chunk for the loss and carry no "
            "gradient. Backpropagate from the loss only, or compile with "
            "make_backend(passes=('mlp',)) to leave the vocabulary projection unchanged.")


_ANCHOR: list[torch.Tensor] = []


def guard_logits(compiled, positions: list[int]):
    """``compiled`` with the outputs at ``positions`` wrapped in _NoGradientThroughLogits."""
    if not positions:
        return compiled

    def run(*args):
        outs = compiled(*args)
        if not torch.is_grad_enabled():
            return outs
        if not _ANCHOR:
            _ANCHOR.append(torch.zeros((), requires_grad=True))
        fixed = list(outs)
        for i in positions:
            fixed[i] = _NoGradientThroughLogits.apply(fixed[i], _ANCHOR[0])
        return type(outs)(fixed) if isinstance(outs, tuple) else fixed

    run._boxed_call = getattr(compiled, "_boxed_call", False)
    return run
