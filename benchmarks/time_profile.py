"""Where the time of one training step goes: GPU kernel time by kind and the kernels that
take the most, from torch.profiler over one step after a warm-up (compile) step.

Builds a bench_train.py preset and method as memory_at_peak.py does. Kinds by kernel name:
attention (flash, cuDNN, fmha), GEMM (cuBLAS/CUTLASS/nvjet), Triton (Inductor's generated
kernels and Liger's), the rest. GPU only.

    python benchmarks/time_profile.py --method mst_gc --tokens 32768
    python benchmarks/time_profile.py --method liger_gc --tokens 32768
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from collections import defaultdict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..")]
from bench_train import PRESETS, build, loss_fn  # noqa: E402

KINDS = (("attention", ("flash", "cudnn", "fmha", "attention", "sdpa")),
         ("GEMM", ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas")),
         ("Triton", ("triton", "_kernel")))


def kind(name: str) -> str:
    low = name.lower()
    for k, marks in KINDS:
        if any(m in low for m in marks):
            return k
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama-3.2-1b", choices=[k for k in PRESETS if k != "tiny"])
    p.add_argument("--method", default="mst_gc")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--mst", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="MSTConfig fields for the mst methods (Python literals)")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()

    model = build(args.preset, args.method, "cuda", None)
    overrides = {k: ast.literal_eval(v) for k, v in (o.split("=", 1) for o in args.mst)}
    f, _ = loss_fn(model, args.method, False, overrides.pop("logits", "drop"), overrides)
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), device="cuda")
    batch = {"input_ids": ids, "labels": ids, "use_cache": False}

    def step():
        model.zero_grad(set_to_none=True)
        f(batch).backward()

    step()  # compiles
    step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    per_kernel: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[e.name][0] += e.device_time / 1e3  # ms
            per_kernel[e.name][1] += 1
    total = sum(t for t, _ in per_kernel.values())
    by_kind: dict[str, float] = defaultdict(float)
    for name, (t, _) in per_kernel.items():
        by_kind[kind(name)] += t
    print(f"{args.method} {args.tokens} tokens {' '.join(args.mst)}: GPU kernel time {total:.1f} ms")
    for k, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {k:10} {t:9.1f} ms  {100 * t / total:5.1f}%")
    print(f"{'ms':>9} {'calls':>6}  kernel")
    for name, (t, n) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"{t:9.1f} {n:6d}  {name[:110]}")


if __name__ == "__main__":
    main()
