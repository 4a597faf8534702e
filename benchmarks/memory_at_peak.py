"""Where the memory of one training step goes: the live allocations at the step's peak,
grouped by the source line that allocated them.

Builds a bench_train.py preset and method, runs one warm-up step (compiles), then records
the CUDA allocator's history (torch.cuda.memory._record_memory_history) over one more step,
replays it, and prints the allocations alive at the peak: bytes, count and the first
source line outside torch's own modules (Inductor's generated code with the line's text,
transformers, mst_fx, a peer's kernels; "autograd engine" where backward allocated from
C++ with no Python frame). Memory alive before the step (weights, optimizer state) is one
line. GPU only.

    python benchmarks/memory_at_peak.py --method mst_gc --tokens 32768
    python benchmarks/memory_at_peak.py --method mst_gc --tokens 32768 --mst fp32_weight_grad=False
    python benchmarks/memory_at_peak.py --method liger_gc --tokens 32768
"""

from __future__ import annotations

import linecache
import os
from collections import defaultdict

import torch
from bench_train import one_step, one_step_parser
from common import recorded_step

TORCH_DIR = os.path.dirname(torch.__file__)


def site(frames: list[dict]) -> str:
    """The first frame outside torch's package (Inductor's generated code is outside it)."""
    for f in frames:
        name = f.get("filename", "")
        if name.startswith(TORCH_DIR) or name.startswith("<") or name == "??":
            continue
        text = linecache.getline(name, f["line"]).strip()[:70]
        return f"{_short(name)}:{f['line']} {f.get('name', '')}  {text}"
    return "autograd engine / C++ (no Python frame)"


def _short(path: str) -> str:
    for mark in ("site-packages/", "torchinductor", "mst_fx/", "passes/"):
        if mark in path:
            return path[path.index(mark):]
    return os.path.basename(path)


def at_peak(trace: list[dict], before: int) -> tuple[int, dict[int, tuple[int, str]]]:
    """Replay allocator events: (peak bytes, {address: (size, site)} alive at the peak).
    ``before``: bytes allocated when recording began (their frees are subtracted too)."""
    live: dict[int, tuple[int, list]] = {}
    total = peak = before
    best: dict[int, tuple[int, list]] = {}
    for e in trace:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], e.get("frames", []))
            total += e["size"]
            if total > peak:
                peak, best = total, dict(live)
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
            total -= e["size"]
    return peak, {a: (s, site(fr)) for a, (s, fr) in best.items()}


def main() -> None:
    p = one_step_parser(__doc__.splitlines()[0])
    p.add_argument("--top", type=int, default=18)
    args = p.parse_args()
    model, step = one_step(args)

    step()  # compiles
    model.zero_grad(set_to_none=True)
    before, snap = recorded_step(step)
    measured = torch.cuda.max_memory_allocated()

    peak, live = at_peak(snap["device_traces"][0], before)
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, where in live.values():
        groups[where][0] += size
        groups[where][1] += 1
    gb = 1e9
    print(f"{args.method} {args.tokens} tokens {' '.join(args.mst)}: peak {measured / gb:.2f} GB "
          f"(max_memory_allocated); replayed {peak / gb:.2f} GB = {before / gb:.2f} GB alive before the "
          f"step (weights) + {(peak - before) / gb:.2f} GB allocated in it and alive at its peak")
    print(f"{'GB':>7} {'count':>6}  allocated at")
    for where, (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"{size / gb:7.3f} {count:6d}  {where}")
    rest = sorted(groups.values(), key=lambda v: -v[0])[args.top:]
    if rest:
        print(f"{sum(s for s, _ in rest) / gb:7.3f} {sum(c for _, c in rest):6d}  (the rest)")


if __name__ == "__main__":
    main()
