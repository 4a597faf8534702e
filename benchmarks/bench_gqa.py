"""One causal SDPA call with grouped-query heads (32 query, 8 key/value heads, head dim 64,
bf16), forward + backward: keys/values repeated per query group as transformers'
``repeat_kv`` does, against ``enable_gqa=True`` (what the attention pass gives SDPA), with
torch's default kernel choice and with each kernel forced. Prints median ms of 3 steps and
the peak over the inputs (the repeated copies and every gradient included), and the largest
relative gradient difference from the first row. GPU only.

    python benchmarks/bench_gqa.py --tokens 32768 65536
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F
from common import time_and_extra_peak
from torch.nn.attention import SDPBackend, sdpa_kernel

KERNELS = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
           "efficient": SDPBackend.EFFICIENT_ATTENTION}


def repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n, t, d).reshape(b, h * n, t, d)


def run(tokens: int, shared: bool, kernel):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, tokens, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (32, 8, 8))
    grad = torch.randn(1, 32, tokens, 64, device="cuda", dtype=torch.bfloat16)

    def step():
        q.grad = k.grad = v.grad = None
        with sdpa_kernel(kernel) if kernel is not None else contextlib.nullcontext():
            if shared:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                out = F.scaled_dot_product_attention(q, repeat_kv(k, 4), repeat_kv(v, 4), is_causal=True)
        out.backward(grad)

    ms, peak = time_and_extra_peak(step, 3, "cuda", warmup=1)
    return ms, peak / 1e9, (q.grad, k.grad, v.grad)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[32768, 65536])
    args = p.parse_args()
    print(f"{'tokens':>7} {'keys/values':12} {'kernel':10} {'ms':>8} {'peak GB':>8} {'grad diff':>9}")
    for tokens in args.tokens:
        ref = None
        for shared in (False, True):
            for name, kernel in KERNELS.items():
                what = "enable_gqa" if shared else "repeat_kv"
                try:
                    ms, peak, grads = run(tokens, shared, kernel)
                except RuntimeError as e:
                    print(f"{tokens:>7} {what:12} {name:10} no kernel ({str(e).splitlines()[0][:50]})")
                    continue
                ref = ref or grads
                diff = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                           for a, b in zip(grads, ref))
                print(f"{tokens:>7} {what:12} {name:10} {ms:8.1f} {peak:8.2f} {diff:9.1e}")


if __name__ == "__main__":
    main()
