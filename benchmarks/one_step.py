"""One training step at each of a few long lengths, compile included: the peak memory of
a step past what the two-step sweep (bench_train.py: a warm-up and timed steps) has time
for, and the host memory an offloading step pins.

One process, one model; per length Dynamo is reset (a static graph, as bench_train.py's
sweep) and one forward + backward runs. Per length a row: wall time of the step including
its compile, peak device memory over it (torch.cuda.max_memory_allocated), the loss, and
for offload the host blocks held after it. Rows are printed and appended to
one_step_<preset>.csv under --out as each length finishes, so a run cut off by a time limit
keeps the lengths it finished.

    python benchmarks/one_step.py --preset llama-3-8b --method mst_gc_offload --tokens 131072 262144
"""

from __future__ import annotations

import os
import time

import torch
from bench_train import build, loss_fn, mst_fields, one_step_parser
from common import inputs, print_result, write_csv


def main() -> None:
    p = one_step_parser(__doc__.splitlines()[0], lengths=True)
    p.set_defaults(method="mst_gc_offload")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    model = build(args.preset, args.method, "cuda", None)
    overrides = mst_fields(args.mst)
    logits = overrides.pop("logits", "drop")
    rows, path = [], os.path.join(args.out, f"one_step_{args.preset}.csv")
    for tokens in args.tokens:
        torch._dynamo.reset()
        f, _ = loss_fn(model, args.method, False, logits, overrides)
        batch = inputs(tokens, 1, model.config.vocab_size, "cuda", seed=tokens)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss = f(batch)
        loss.backward()
        torch.cuda.synchronize()
        row = dict(method=args.method, tokens=tokens, s_with_compile=round(time.perf_counter() - start, 1),
                   peak_gb=round(torch.cuda.max_memory_allocated() / 1e9, 3), loss=round(loss.item(), 5))
        if args.method == "mst_gc_offload":
            from mst_fx.passes.partition import host_memory

            row["host_gb"] = round(host_memory.POOL.held_bytes() / 1e9, 2)
        del loss, f
        print_result(row)
        rows.append(row)
        write_csv(rows, path)


if __name__ == "__main__":
    main()
