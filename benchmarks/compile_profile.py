"""Where the compile time goes: cProfile of the first training step (Dynamo, AOTAutograd,
Inductor, the step itself) of a bench_train.py preset and method, with Dynamo's
per-phase times.

Builds the model as memory_at_peak.py and time_profile.py do; prints the phase times and
the functions with the most cumulative time; --dump writes the pstats file. Run it with an
empty TORCHINDUCTOR_CACHE_DIR for a cold compile. GPU only.

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/compile_profile.py --method mst_gc --tokens 8192
"""

from __future__ import annotations

import cProfile
import pstats
import time

import torch
from bench_train import one_step, one_step_parser


def main() -> None:
    p = one_step_parser(__doc__.splitlines()[0])
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--dump", metavar="FILE", help="write the pstats file here")
    args = p.parse_args()
    _, step = one_step(args)

    profiler = cProfile.Profile()
    t = time.perf_counter()
    profiler.enable()
    step()
    torch.cuda.synchronize()
    profiler.disable()
    print(f"{args.method} {args.tokens} tokens: first step {time.perf_counter() - t:.1f} s (under cProfile)")
    print(torch._dynamo.utils.compile_times())
    if args.dump:
        profiler.dump_stats(args.dump)
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
