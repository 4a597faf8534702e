"""LoRA fine-tuning step: Hugging Face Llama at the Llama-3.2-1B shape (bench_attention's
preset: 16 layers, hidden 2048, MLP 8192, vocab 128256, tied), bf16, batch 1, SDPA, HF
gradient checkpointing, PEFT LoRA r=16 on every linear (base weights frozen).

Methods, each in its own process (an OOM is recorded and the run goes on):
    compile_gc   torch.compile + GC, the default backend (Inductor)
    mst_gc       torch.compile with mst_fx's backend + GC
    eager_gc     no compile + GC (reference)
Reported per (method, tokens): median step time (forward + backward + an AdamW step on
the adapters, output dropped before backward) over --iters steps after one warm-up step,
peak memory (torch.cuda.max_memory_allocated over one step), the loss, and the regions
mst_fx rewrote.

    python benchmarks/bench_lora.py --tokens 32768
    python benchmarks/bench_lora.py --quick      # CPU, tiny model: checks the script
"""

from __future__ import annotations

import argparse
import os

import torch
from common import (
    LLAMA_32_1B,
    TINY,
    applied_kinds,
    build_model,
    inputs,
    print_result,
    run_row,
    script_cmd,
    time_and_peak,
    write_csv,
)

import mst_fx

METHODS = ("compile_gc", "mst_gc", "eager_gc")


def lora(model, rank: int):
    import peft

    model.enable_input_require_grads()  # GC with frozen embeddings: as PEFT's recipes do
    return peft.get_peft_model(model, peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear"))


def run_one(method: str, tokens: int, iters: int, quick: bool, rank: int) -> dict:
    device = "cpu" if quick else "cuda"
    model = lora(build_model(TINY if quick else LLAMA_32_1B, device), rank)
    batch = inputs(tokens, 1, model.config.vocab_size, device)
    backend = None
    if method == "eager_gc":
        fn = model
    elif method == "compile_gc":
        fn = torch.compile(model)
    else:
        backend = mst_fx.make_backend(chunks=2) if quick else mst_fx.make_backend()
        fn = torch.compile(model, backend=backend)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    losses = []

    def step():
        loss = fn(**batch).loss  # the output (and its logits) dropped before backward
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    ms, peak = time_and_peak(step, iters, device)  # a warm-up step first: compiles
    rewrites = applied_kinds(backend.report, ",") if backend is not None else ""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"method": method, "tokens": tokens, "ms": round(ms, 1), "peak_gb": round(peak / 1e9, 2),
            "loss": round(losses[0], 5), "trainable_m": round(trainable / 1e6, 2), "rewrites": rewrites}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[32768])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--quick", action="store_true", help="CPU, tiny model, 512 tokens")
    p.add_argument("--one", nargs=2, metavar=("METHOD", "TOKENS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        method, tokens = args.one
        print_result(run_one(method, int(tokens), args.iters, args.quick, args.rank))
        return
    if args.quick:
        args.tokens, args.iters = [512], 1
    rows = []
    for tokens in args.tokens:
        for method in args.methods:
            cmd = script_cmd(__file__, "--one", method, tokens, "--iters", args.iters, "--rank", args.rank,
                             *(["--quick"] if args.quick else []))
            row = run_row(cmd, {"method": method, "tokens": tokens, "ms": None, "peak_gb": None,
                                "loss": None, "trainable_m": None}, "rewrites")
            rows.append(row)
            print(row, flush=True)
    path = os.path.join(args.out, "results_lora.csv")
    write_csv(rows, path)
    print(f"\n{'method':<11} {'tokens':>7} {'ms':>9} {'peak GB':>8} {'loss':>9}  rewrites")
    for r in rows:
        print(f"{r['method']:<11} {r['tokens']:>7} {str(r['ms']):>9} {str(r['peak_gb']):>8} "
              f"{str(r['loss']):>9}  {r['rewrites']}")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
