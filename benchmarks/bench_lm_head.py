"""Vocabulary projection + cross-entropy alone: time and peak memory for eager,
torch.compile (with and without Inductor's auto_chunker), mst_backend in both gradient
modes, Liger's fused linear cross entropy and Cut Cross-Entropy (when importable); plus the
MsT paper's LM-head table layout (time and memory vs tokens and M).

The head: logits = h @ W^T, upcast to fp32, cross_entropy(ignore_index=-100, mean), with
1/7 of the labels ignored; Llama-3 dims by default (H=4096, V=128256), bf16. Reported per
(method, tokens):
- ms: median step time (forward + backward) over --iters steps after warm-up (CUDA events);
- extra_gb: peak allocated during the step minus what was allocated before it;
- floor_gb: what every method must allocate: the gradients of h and W;
- over_floor_gb = extra - floor: the working memory the method adds (the figure the
  issue's targets are about; ../shared/NOTES.md's "extra peak" for the peers).

    python benchmarks/bench_lm_head.py                 # GPU: main table at 32k, then the sweep
    python benchmarks/bench_lm_head.py --quick         # CPU, tiny, checks the script
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from common import paper_tables, time_and_extra_peak, write_csv

import mst_fx


class HeadLoss(nn.Module):
    def __init__(self, hidden, vocab):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab, hidden) / hidden ** 0.5)

    def forward(self, h, labels):
        return F.cross_entropy(F.linear(h, self.weight).float(), labels, ignore_index=-100)


def _liger():
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
    return lambda module, h, labels: loss(module.weight, h, labels)


def _cce():
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        return None
    return lambda module, h, labels: linear_cross_entropy(h, module.weight, labels, ignore_index=-100)


def methods(main: bool, chunk_counts, peers=True):
    """(name, kind, payload): kind "module" runs HeadLoss through a backend (None = eager),
    "fn" a peer's function."""
    if peers:
        yield "eager", "module", None
    yield "torch.compile", "module", "inductor"
    if main and peers:
        yield "torch.compile+auto_chunker", "module", "auto_chunker"
    yield "mst (default)", "module", mst_fx.make_backend()
    yield "mst bf16 weight-grad", "module", mst_fx.make_backend(fp32_weight_grad=False)
    if main and peers:
        yield "mst recompute", "module", mst_fx.make_backend(lm_head_grad="recompute")
        for name, fn in (("liger", _liger()), ("cut-cross-entropy", _cce())):
            if fn is not None and torch.cuda.is_available():
                yield name, "fn", fn
    for m in chunk_counts:
        yield f"mst M={m}", "module", mst_fx.make_backend(chunks=m)
        if main:
            yield f"mst bf16 M={m}", "module", mst_fx.make_backend(chunks=m, fp32_weight_grad=False)


def measure(module, kind, payload, tokens, hidden, vocab, dtype, device, iters):
    torch._dynamo.reset()
    g = torch.Generator(device="cpu").manual_seed(1)
    h = torch.randn(tokens, hidden, generator=g).to(device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[torch.rand(tokens, generator=g) < 1 / 7] = -100
    labels = labels.to(device)
    if kind == "fn":
        fn = lambda: payload(module, h, labels)  # noqa: E731
    elif payload is None:
        fn = lambda: module(h, labels)  # noqa: E731
    elif payload == "auto_chunker":
        compiled = torch.compile(module, options={"auto_chunker.enable": True})
        fn = lambda: compiled(h, labels)  # noqa: E731
    else:
        compiled = torch.compile(module, backend=payload)
        fn = lambda: compiled(h, labels)  # noqa: E731
    losses = []

    def clear():
        h.grad = None
        module.weight.grad = None

    def step():
        clear()
        loss = fn()
        loss.backward()
        losses.append(loss.detach())

    ms, extra = time_and_extra_peak(step, iters, device, clear=clear)
    chunks = "-"
    if isinstance(payload, mst_fx.MSTBackend):
        heads = [r for r in payload.report.regions if r.kind == "lm_head"]
        chunks = str(heads[0].chunks) if heads else "none"
    return ms, extra, chunks, float(losses[-1])


def run(hidden=4096, vocab=128256, tokens=(32768,), sweep=(), chunk_counts=(),
        sweep_chunks=(), dtype="bfloat16", iters=10, out="benchmarks/out/bench_lm_head.csv",
        peers=True):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    module = HeadLoss(hidden, vocab).to(device=device, dtype=dt)
    itemsize = torch.finfo(dt).bits // 8
    rows = []
    plan = [(n, True, chunk_counts) for n in tokens] + [(n, False, sweep_chunks) for n in sweep]
    for n, main, counts in plan:
        floor = (n * hidden + vocab * hidden) * itemsize
        for name, kind, payload in methods(main, counts, peers):
            row = dict(table="main" if main else "sweep", method=name, tokens=n,
                       floor_gb=round(floor / 1e9, 3))
            try:
                ms, extra, chunks, loss = measure(module, kind, payload, n, hidden, vocab, dt,
                                                  device, iters)
                row.update(chunks=chunks, ms=round(ms, 2), extra_gb=round(extra / 1e9, 3),
                           over_floor_gb=round((extra - floor) / 1e9, 3), loss=round(loss, 5))
            except torch.OutOfMemoryError:
                row.update(chunks="-", ms="OOM", extra_gb="OOM", over_floor_gb="OOM", loss="-")
            rows.append(row)
            print(row, flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    write_csv(rows, out, ["table", "method", "tokens", "chunks", "ms", "extra_gb", "floor_gb", "over_floor_gb", "loss"])
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\nLM head + CE, H={hidden} V={vocab} {dtype}, 1/7 labels ignored, fwd+bwd on {name}, "
          f"torch {torch.__version__}")
    print(f"{'method':<28}{'tokens':>8}{'M':>5}{'ms':>10}{'extra GB':>10}{'over floor':>11}{'loss':>10}")
    for r in rows:
        if r["table"] == "main":
            print(f"{r['method']:<28}{r['tokens']:>8}{r['chunks']:>5}{r['ms']:>10}{r['extra_gb']:>10}"
                  f"{r['over_floor_gb']:>11}{r['loss']:>10}")
    sweep_rows = [r for r in rows if r["table"] == "sweep"]
    if sweep_rows:
        print(paper_tables(sweep_rows, (("ms", "time (ms)"),  # the MsT paper's LM-head tables
                                        ("over_floor_gb", "memory over the gradient floor (GB)"))))
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="tiny CPU run that checks the script")
    p.add_argument("--tokens", type=int, nargs="*", default=[32768])
    p.add_argument("--chunks", type=int, nargs="*", default=[16, 64])
    p.add_argument("--sweep", type=int, nargs="*", default=[1024, 4096, 16384, 32768, 65536, 81920])
    p.add_argument("--sweep-chunks", type=int, nargs="*", default=[8, 32])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default="benchmarks/out/bench_lm_head.csv")
    p.add_argument("--no-peers", action="store_true", help="only torch.compile and mst_fx")
    a = p.parse_args()
    if a.quick:
        run(hidden=64, vocab=1024, tokens=(2048,), sweep=(1024,), chunk_counts=(4,),
            sweep_chunks=(2,), dtype="float32", iters=2, out=a.out)
    else:
        run(tokens=tuple(a.tokens), sweep=tuple(a.sweep), chunk_counts=tuple(a.chunks),
            sweep_chunks=tuple(a.sweep_chunks), iters=a.iters, out=a.out, peers=not a.no_peers)


if __name__ == "__main__":
    main()
