"""Whole-model training step with the attention pass: Hugging Face Llama at the
Llama-3.2-1B shape (16 layers, hidden 2048, MLP 8192, 32/8 heads, vocab 128256, tied),
bf16, batch 1, SDPA attention, HF gradient checkpointing (GC), no mask given (training
without padding) or packed documents through position_ids.

Methods, each in its own process (an OOM is recorded and the run goes on):
    eager_gc       HF eager + GC
    compile_gc     torch.compile + GC (Inductor)
    mst_gc         torch.compile(backend=mst_backend) + GC, every pass
    mst_gc_attn    the same with only the attention pass
Reported per (method, tokens, documents): median step time (forward + backward, the model
output dropped before backward, as HF Trainer does) over --iters steps after one warm-up
step, peak memory (torch.cuda.max_memory_allocated over one step, weights and gradients
included), the loss, and what the attention pass did.

    python benchmarks/bench_attention.py --tokens 32768 --docs 1 8
    python benchmarks/bench_attention.py --quick      # CPU, tiny model: checks the script
"""

from __future__ import annotations

import argparse
import os

import torch
from common import (
    LLAMA_32_1B,
    TINY,
    build_model,
    inputs,
    kind_counts,
    print_result,
    run_row,
    script_cmd,
    time_and_peak,
    write_csv,
)

import mst_fx

METHODS = ("eager_gc", "compile_gc", "mst_gc", "mst_gc_attn")


def run_one(method: str, tokens: int, docs: int, iters: int, quick: bool) -> dict:
    device = "cpu" if quick else "cuda"
    model = build_model(TINY if quick else LLAMA_32_1B, device)
    batch = inputs(tokens, docs, model.config.vocab_size, device)
    backend = None
    if method == "eager_gc":
        fn = model
    elif method == "compile_gc":
        fn = torch.compile(model)
    else:
        passes = ("attention",) if method == "mst_gc_attn" else mst_fx.MSTConfig().passes
        backend = mst_fx.make_backend(passes=passes)
        fn = torch.compile(model, backend=backend)
    losses = []

    def step():
        model.zero_grad(set_to_none=True)
        loss = fn(**batch).loss  # the output (and its logits) dropped before backward
        loss.backward()
        losses.append(loss.item())

    ms, peak = time_and_peak(step, iters, device)  # a warm-up step first: compiles
    attention = ""
    if backend is not None:
        kinds = [r.detail.split(":")[0] for r in backend.report.regions if r.kind == "attention"]
        attention = kind_counts(kinds, ",", "unchanged")
    return {"method": method, "tokens": tokens, "docs": docs, "ms": round(ms, 1),
            "peak_gb": round(peak / 1e9, 2), "loss": round(losses[-1], 5), "attention": attention}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[32768])
    p.add_argument("--docs", type=int, nargs="+", default=[1])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--quick", action="store_true", help="CPU, tiny model, 256 tokens")
    p.add_argument("--one", nargs=3, metavar=("METHOD", "TOKENS", "DOCS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        method, tokens, docs = args.one
        print_result(run_one(method, int(tokens), int(docs), args.iters, args.quick))
        return
    if args.quick:
        args.tokens, args.iters = [256], 1
    rows = []
    for tokens in args.tokens:
        for docs in args.docs:
            for method in args.methods:
                cmd = script_cmd(__file__, "--one", method, tokens, docs, "--iters", args.iters,
                                 *(["--quick"] if args.quick else []))
                row = run_row(cmd, {"method": method, "tokens": tokens, "docs": docs, "ms": None,
                                    "peak_gb": None, "loss": None}, "attention")
                rows.append(row)
                print(row, flush=True)
    path = os.path.join(args.out, "results_attention.csv")
    write_csv(rows, path)
    print(f"\n{'method':<12} {'tokens':>7} {'docs':>4} {'ms':>9} {'peak GB':>8} {'loss':>9}  attention")
    for r in rows:
        print(f"{r['method']:<12} {r['tokens']:>7} {r['docs']:>4} {str(r['ms']):>9} {str(r['peak_gb']):>8} "
              f"{str(r['loss']):>9}  {r['attention']}")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
