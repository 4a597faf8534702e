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
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..")]
import mst_fx  # noqa: E402
from mst_fx.memory import median_ms  # noqa: E402
from rows import run_row, write_csv  # noqa: E402

METHODS = ("eager_gc", "compile_gc", "mst_gc", "mst_gc_attn")
LLAMA_32_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                   tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=262144)
TINY = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True)


def build(dims: dict, device: str):
    import transformers

    config = transformers.LlamaConfig(**dims)
    config._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def inputs(tokens: int, docs: int, vocab: int, device: str) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (1, tokens), generator=g).to(device)
    out = {"input_ids": ids, "labels": ids, "use_cache": False}
    if docs > 1:  # equal documents, positions restarting at each
        bounds = [tokens * i // docs for i in range(docs + 1)]
        out["position_ids"] = torch.cat([torch.arange(b - a) for a, b in zip(bounds, bounds[1:])])[None].to(device)
    return out


def run_one(method: str, tokens: int, docs: int, iters: int, quick: bool) -> dict:
    device = "cpu" if quick else "cuda"
    model = build(TINY if quick else LLAMA_32_1B, device)
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

    step()  # warm-up: compiles
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ms = median_ms(step, iters, device)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    attention = ""
    if backend is not None:
        kinds = [r.detail.split(":")[0] for r in backend.report.regions if r.kind == "attention"]
        attention = ",".join(sorted({f"{k} x{kinds.count(k)}" for k in kinds})) or "unchanged"
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
        print("RESULT " + json.dumps(run_one(method, int(tokens), int(docs), args.iters, args.quick)))
        return
    if args.quick:
        args.tokens, args.iters = [256], 1
    rows = []
    for tokens in args.tokens:
        for docs in args.docs:
            for method in args.methods:
                cmd = [sys.executable, os.path.abspath(__file__), "--one", method, str(tokens), str(docs),
                       "--iters", str(args.iters)] + (["--quick"] if args.quick else [])
                row = run_row(cmd, {"method": method, "tokens": tokens, "docs": docs, "ms": None,
                                    "peak_gb": None, "loss": None}, "attention")
                rows.append(row)
                print(row, flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results_attention.csv")
    write_csv(rows, path)
    print(f"\n{'method':<12} {'tokens':>7} {'docs':>4} {'ms':>9} {'peak GB':>8} {'loss':>9}  attention")
    for r in rows:
        print(f"{r['method']:<12} {r['tokens']:>7} {r['docs']:>4} {str(r['ms']):>9} {str(r['peak_gb']):>8} "
              f"{str(r['loss']):>9}  {r['attention']}")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
