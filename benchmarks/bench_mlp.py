"""MLP block alone: time and peak memory vs tokens and chunk count M (the MsT paper's MLP
tables), for eager, torch.compile and mst_backend.

One SwiGLU block (Llama-3-8B dims by default: H=4096, I=14336), bf16, forward + backward
with a given output gradient. Reported per (method, tokens):
- ms: median step time (CUDA events; wall clock on CPU) over --iters steps after warm-up;
- extra_gb: peak allocated during the step minus what was allocated before it (weights,
  input, output gradient), so it includes the output and all gradients;
- floor_gb: what any method must allocate in the step: the output, the input gradient and
  the weight gradients. extra - floor is the activation memory the method adds.

    python benchmarks/bench_mlp.py                         # GPU, the issue's figures
    python benchmarks/bench_mlp.py --quick                 # CPU, tiny, checks the script
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from common import paper_tables, time_and_extra_peak, write_csv

import mst_fx


class SwiGLU(nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.gate = nn.Linear(hidden, inter, bias=False)
        self.up = nn.Linear(hidden, inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def methods(chunk_counts):
    yield "eager", None
    yield "torch.compile", "inductor"
    yield "mst (default)", mst_fx.make_backend()
    for m in chunk_counts:
        yield f"mst M={m}", mst_fx.make_backend(chunks=m)


def measure(module, backend, tokens, hidden, dtype, device, iters):
    torch._dynamo.reset()
    fn = module if backend is None else torch.compile(module, backend=backend)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, hidden, device=device, dtype=dtype)

    def clear():
        x.grad = None
        for p in module.parameters():
            p.grad = None

    def step():
        clear()
        fn(x).backward(dy)

    ms, extra = time_and_extra_peak(step, iters, device, clear=clear)
    chunks = "-"
    if isinstance(backend, mst_fx.MSTBackend) and backend.report.regions:
        chunks = str(backend.report.regions[0].chunks)
    return ms, extra, chunks


def run(hidden=4096, inter=14336, tokens=(16384, 65536), chunk_counts=(2, 4, 8),
        dtype="bfloat16", iters=10, out="benchmarks/out/bench_mlp.csv"):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    module = SwiGLU(hidden, inter).to(device=device, dtype=dt)
    itemsize = torch.finfo(dt).bits // 8
    rows = []
    for n in tokens:
        floor = (2 * n * hidden + 3 * hidden * inter) * itemsize
        for name, backend in methods(chunk_counts):
            try:
                ms, extra, chunks = measure(module, backend, n, hidden, dt, device, iters)
                rows.append(dict(method=name, tokens=n, chunks=chunks, ms=round(ms, 2),
                                 extra_gb=round(extra / 1e9, 3), floor_gb=round(floor / 1e9, 3),
                                 over_floor_gb=round((extra - floor) / 1e9, 3)))
            except torch.OutOfMemoryError:
                rows.append(dict(method=name, tokens=n, chunks="-", ms="OOM", extra_gb="OOM",
                                 floor_gb=round(floor / 1e9, 3), over_floor_gb="OOM"))
            if device == "cuda":
                torch.cuda.empty_cache()
    write_csv(rows, out)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\nSwiGLU H={hidden} I={inter} {dtype} fwd+bwd on {name}, torch {torch.__version__}")
    print(f"{'method':<16}{'tokens':>8}{'M':>4}{'ms':>10}{'extra GB':>10}{'floor GB':>10}{'over floor':>11}")
    for r in rows:
        print(f"{r['method']:<16}{r['tokens']:>8}{r['chunks']:>4}{r['ms']:>10}{r['extra_gb']:>10}"
              f"{r['floor_gb']:>10}{r['over_floor_gb']:>11}")
    print(paper_tables(rows, (("ms", "time (ms)"), ("extra_gb", "extra peak (GB)"))))  # the MsT paper's MLP tables
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="tiny CPU run that checks the script")
    p.add_argument("--tokens", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--chunks", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default="benchmarks/out/bench_mlp.csv")
    a = p.parse_args()
    if a.quick:
        run(hidden=64, inter=224, tokens=(512,), chunk_counts=(2,), dtype="float32", iters=2, out=a.out)
    else:
        run(tokens=tuple(a.tokens), chunk_counts=tuple(a.chunks), iters=a.iters, out=a.out)


if __name__ == "__main__":
    main()
