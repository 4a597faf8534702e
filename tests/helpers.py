"""One helper does the whole numerical check of a rewrite (Inductor's test style):
clear counters, run eager, run compiled with mst_fx, compare the output and every
gradient, and check the rewrite counters and the explain report."""

from __future__ import annotations

import copy

import torch
from torch._dynamo.utils import counters

import mst_fx

# Tolerances against eager, by dtype. fp32: the chunked GEMMs sum the weight gradient
# chunk by chunk, so it differs from one big GEMM by rounding only. bf16: both sides round
# to bf16 at every op boundary, but fusion decisions differ (docs/correctness.md, "bf16 tolerances").
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def grads_of(module: torch.nn.Module, inputs) -> dict[str, torch.Tensor]:
    out = {f"param:{n}": p.grad for n, p in module.named_parameters() if p.grad is not None}
    for i, t in enumerate(inputs):
        if isinstance(t, torch.Tensor) and t.grad is not None:
            out[f"input:{i}"] = t.grad
    return out


def run_step(module, inputs, kwargs, loss_fn):
    out = module(*inputs, **kwargs)
    loss_fn(out).backward()
    return out


def default_loss(out):
    out = out[0] if isinstance(out, tuple) else out
    out = getattr(out, "loss", None) if not isinstance(out, torch.Tensor) else out
    return out.float().square().mean() if out.dim() else out


def check_rewrite(module: torch.nn.Module, inputs, *, expect: dict[str, int] | None,
                  config: mst_fx.MSTConfig | None = None, loss_fn=default_loss,
                  dtype: torch.dtype = torch.float32, kwargs: dict | None = None,
                  compiler=None):
    """Eager vs mst_fx-compiled: output and every gradient equal within TOL[dtype]; the
    counters show exactly ``expect`` rewrites (``None``: any). Returns the backend (its ``report``).
    ``compiler``: what the rewritten graph goes to (default Inductor; see MSTBackend)."""
    config = config if config is not None else mst_fx.MSTConfig()
    counters.clear()
    eager_mod = module
    compiled_mod = copy.deepcopy(module)
    eager_in = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                for t in inputs]
    comp_in = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
               for t in inputs]
    kwargs = kwargs or {}
    ref = run_step(eager_mod, eager_in, kwargs, loss_fn)
    backend = mst_fx.make_backend(config, compiler=compiler)
    got = run_step(torch.compile(compiled_mod, backend=backend), comp_in, kwargs, loss_fn)

    tol = TOL[dtype]
    torch.testing.assert_close(_main(got), _main(ref), **tol, equal_nan=True)
    ref_g, got_g = grads_of(eager_mod, eager_in), grads_of(compiled_mod, comp_in)
    assert ref_g.keys() == got_g.keys()
    for name in ref_g:
        torch.testing.assert_close(got_g[name], ref_g[name], **tol, equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")
    applied = {k: v for k, v in counters["mst_fx"].items()}
    assert expect is None or applied == {k: v for k, v in expect.items() if v}, (applied, str(backend.report))
    return backend


def _main(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return out[0]
    return out.loss if getattr(out, "loss", None) is not None else out.logits
