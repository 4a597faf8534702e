"""The memory timeline of one training step: CUDA memory allocated over the step's time,
for several methods of bench_train.py at one length (by default mst_gc with and without
MSTConfig.offload), as a CSV and a picture.

Each method runs in this process in turn: build, one warm-up step (compiles), then the
CUDA allocator's history (torch.cuda.memory._record_memory_history) over one more step,
replayed into allocated bytes at every allocation and free (memory alive before the step,
the weights, included). Writes memory_timeline_<tokens>.csv (method, ms, allocated_gb)
and memory_timeline_<tokens>.png under --out; --plot CSV redraws the picture from a CSV
(on a machine with matplotlib). GPU only for the run.

    python benchmarks/memory_timeline.py --tokens 65536
    python benchmarks/memory_timeline.py --plot memory_timeline_65536.csv
"""

from __future__ import annotations

import argparse
import csv
import gc
import os

import torch
from bench_train import build, loss_fn, training_step
from common import recorded_step


def timeline(step) -> tuple[list[float], list[int]]:
    """(ms since the step started, bytes allocated) after every allocation and free of one
    ``step()``, the memory allocated before it included."""
    base, snapshot = recorded_step(step)
    events = [e for trace in snapshot["device_traces"] for e in trace
              if e["action"] in ("alloc", "free_completed")]
    events.sort(key=lambda e: e["time_us"])
    t0 = events[0]["time_us"] if events else 0
    ms, allocated, now = [], [], base
    for e in events:
        now += e["size"] if e["action"] == "alloc" else -e["size"]
        ms.append((e["time_us"] - t0) / 1e3)
        allocated.append(now)
    return ms, allocated


def thin(ms: list[float], allocated: list[int], points: int = 4000) -> list[tuple[float, int]]:
    """At most ``points`` samples, keeping each window's largest value (peaks stay)."""
    if len(ms) <= points:
        return list(zip(ms, allocated))
    width = len(ms) / points
    out = []
    for i in range(points):
        lo, hi = int(i * width), int((i + 1) * width)
        j = max(range(lo, hi), key=lambda k: allocated[k])
        out.append((ms[j], allocated[j]))
    return out


def plot(rows: list[dict], path: str, title: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no picture (run again with --plot on the CSV)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [(float(r["ms"]), float(r["allocated_gb"])) for r in rows if r["method"] == method]
        peak = max(p[1] for p in pts)
        ax.plot([p[0] / 1e3 for p in pts], [p[1] for p in pts], linewidth=1, label=f"{method} (peak {peak:.1f} GB)")
    ax.set_xlabel("time in the step (s)")
    ax.set_ylabel("CUDA memory allocated (GB)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama-3.2-1b")
    p.add_argument("--methods", nargs="+", default=["mst_gc", "mst_gc_offload"])
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--plot", metavar="CSV", help="redraw the picture from an earlier run's CSV")
    args = p.parse_args()
    title = f"{args.preset}, bf16, GC, one training step"
    if args.plot:
        with open(args.plot) as f:
            rows = list(csv.DictReader(f))
        png = os.path.splitext(args.plot)[0] + ".png"
        plot(rows, png, f"{title} ({rows[0].get('tokens', '?')} tokens)") and print(f"written: {png}")
        return
    rows = []
    for method in args.methods:
        torch._dynamo.reset()
        model = build(args.preset, method, "cuda", None)
        f, _ = loss_fn(model, method, False)
        step, _ = training_step(model, f, args.tokens, model.config.vocab_size, "cuda")
        step()  # compiles
        ms, allocated = timeline(step)
        peak = max(allocated)
        print(f"{method:<16} {args.tokens} tokens: step {ms[-1]:.0f} ms (with recording), peak {peak / 1e9:.2f} GB")
        rows += [dict(method=method, tokens=args.tokens, ms=round(t, 3), allocated_gb=round(a / 1e9, 4))
                 for t, a in thin(ms, allocated)]
        del model, f, step
        gc.collect()
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"memory_timeline_{args.tokens}.csv")
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["method", "tokens", "ms", "allocated_gb"])
        w.writeheader()
        w.writerows(rows)
    png = os.path.join(args.out, f"memory_timeline_{args.tokens}.png")
    drew = plot(rows, png, f"{title} ({args.tokens} tokens)")
    print(f"written: {path}" + (f", {png}" if drew else ""))


if __name__ == "__main__":
    main()
