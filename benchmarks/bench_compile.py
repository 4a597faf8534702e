"""Compile time and varying sequence lengths: Hugging Face Llama (bench_attention's presets:
the Llama-3.2-1B shape on GPU, a 16-layer small-dims model with --cpu), training steps
with gradient checkpointing, torch.compile's default backend vs mst_fx's, default
dynamic=None.

Each method runs in its own process with its own empty Inductor cache directory (cold
caches). Per method: the first step's wall time minus a steady step's (compile time, as
the user waits for it), then --steps steps at random lengths between --min and --max
tokens: compiles (torch._dynamo counters: unique graphs), median step time over the steps
after the recompile, peak memory, the largest loss difference between methods is printed
by the parent, and the rewrites mst_fx applied on the dynamic graph.

    python benchmarks/bench_compile.py                    # GPU, Llama-3.2-1B shape
    python benchmarks/bench_compile.py --cpu --min 1000 --max 4096
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from common import LLAMA_32_1B, build_model, kind_counts, print_result, run_rows, script_cmd, write_csv

import mst_fx

METHODS = ("compile_gc", "mst_gc")
SMALL_16 = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=16, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run_one(method: str, steps: int, lo: int, hi: int, cpu: bool) -> dict:
    from torch._dynamo.utils import counters

    device = "cpu" if cpu else "cuda"
    model = build_model(SMALL_16 if cpu else LLAMA_32_1B, device)
    # The small CPU model at 1000-4096 tokens gets no chunk under the default floor of
    # 1024 tokens per chunk; 256 lets the MLPs and the head be chunked as on the GPU.
    backend = (mst_fx.make_backend(min_chunk_tokens=256) if cpu else mst_fx.make_backend()) \
        if method == "mst_gc" else "inductor"
    fn = torch.compile(model, backend=backend)
    g = torch.Generator().manual_seed(0)
    lengths = [int(torch.randint(lo, hi + 1, (1,), generator=g)) for _ in range(steps)]
    vocab = model.config.vocab_size

    def step(n):
        ids = torch.randint(0, vocab, (1, n), generator=g).to(device)
        model.zero_grad(set_to_none=True)
        _sync(device)
        t = time.perf_counter()
        loss = fn(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        _sync(device)
        dt = time.perf_counter() - t
        print(f"  {method} {n} tokens: {dt:.1f} s", file=sys.stderr, flush=True)
        return dt, loss.item()

    first, _ = step(lengths[0])
    again, _ = step(lengths[0])
    compile_s = first - again
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses, graphs_before = [], [], counters["stats"]["unique_graphs"]
    for i, n in enumerate(lengths):
        dt, loss = step(n)
        losses.append(loss)
        if i == 1:
            second_s = dt  # the step that recompiles for a second length
        if i >= 2:  # after the recompile for a second length
            times.append(dt / n * 1e6)  # microseconds per token
    rewrites = ""
    if method == "mst_gc":
        rewrites = kind_counts([r.kind for r in backend.report.regions
                                if r.applied and r.detail.endswith("symbolic tokens")], ",")
    return {"method": method, "compile_s": round(compile_s, 1), "second_length_s": round(second_s, 1),
            "graphs": counters["stats"]["unique_graphs"],
            "graphs_in_sweep": counters["stats"]["unique_graphs"] - graphs_before,
            "us_per_token": round(statistics.median(times), 2) if times else None,
            "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if device == "cuda" else 0,
            "losses": losses, "lengths": lengths, "symbolic_rewrites": rewrites}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--min", type=int, default=4096)
    p.add_argument("--max", type=int, default=16384)
    p.add_argument("--cpu", action="store_true", help="the 16-layer small-dims model on CPU")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--one", metavar="METHOD", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print_result(run_one(args.one, args.steps, args.min, args.max, args.cpu))
        return
    rows = []
    for method in args.methods:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="mst_cold_"))
        cmd = script_cmd(__file__, "--one", method, "--steps", args.steps, "--min", args.min, "--max", args.max,
                         *(["--cpu"] if args.cpu else []))
        got, error = run_rows(cmd, env)
        if not got:
            print(method, "failed:", error or "no RESULT line")
            continue
        rows.append(got[-1])
    if not rows:
        return
    base = rows[0]["losses"]
    for r in rows:
        r["max_loss_diff"] = round(max(abs(a - b) for a, b in zip(r["losses"], base)), 6)
    path = os.path.join(args.out, "results_compile.csv")
    write_csv(rows, path, ["method", "compile_s", "second_length_s", "graphs", "graphs_in_sweep", "us_per_token",
                           "peak_gb", "max_loss_diff", "symbolic_rewrites", "lengths"])
    print(f"\nlengths: {rows[0]['lengths']}")
    print(f"{'method':<11} {'compile s':>9} {'2nd len s':>9} {'graphs':>6} {'us/token':>9} {'peak GB':>8} "
          f"{'loss diff':>9}  symbolic rewrites")
    for r in rows:
        print(f"{r['method']:<11} {r['compile_s']:>9} {r['second_length_s']:>9} {r['graphs']:>6} "
              f"{str(r['us_per_token']):>9} {r['peak_gb']:>8} {r['max_loss_diff']:>9}  {r['symbolic_rewrites']}")
    if len(rows) == 2:
        print(f"compile time ratio mst / default: {rows[1]['compile_s'] / rows[0]['compile_s']:.2f}")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
