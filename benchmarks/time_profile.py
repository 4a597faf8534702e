"""Where the time of one training step goes: GPU kernel time by kind and the kernels that
take the most, from torch.profiler over one step after a warm-up (compile) step.

Builds a bench_train.py preset and method as memory_at_peak.py does. Kinds by kernel name:
attention (flash, cuDNN, fmha), GEMM (cuBLAS/CUTLASS/nvjet), Triton (Inductor's generated
kernels and Liger's), the rest. GPU only.

    python benchmarks/time_profile.py --method mst_gc --tokens 32768
    python benchmarks/time_profile.py --method liger_gc --tokens 32768
"""

from __future__ import annotations

from collections import defaultdict

import torch
from bench_train import one_step, one_step_parser

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
    p = one_step_parser(__doc__.splitlines()[0])
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--shapes", action="store_true",
                   help="also GPU time of the matrix multiplies by operand shapes")
    args = p.parse_args()
    _, step = one_step(args)

    step()  # compiles
    step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.shapes else [])
    with profile(activities=activities, record_shapes=args.shapes) as prof:
        step()
        torch.cuda.synchronize()
    per_kernel: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        # (with --shapes the CPU trace adds "## Call CompiledFxGraph ##" GPU-side annotations)
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("## "):
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
    if args.shapes:
        print(f"{'ms':>9} {'calls':>6}  matrix multiply: operand shapes")
        mms = [a for a in prof.key_averages(group_by_input_shape=True)
               if a.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")]
        for a in sorted(mms, key=lambda a: -a.device_time_total)[:args.top]:
            print(f"{a.device_time_total / 1e3:9.1f} {a.count:6d}  {a.key} {a.input_shapes}")


if __name__ == "__main__":
    main()
