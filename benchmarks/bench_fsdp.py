"""A training step under FSDP2 per decoder layer: plain torch.compile against mst_backend.

``fully_shard`` on every decoder layer and at the root, then torch.compile of the whole
model (the recipe in docs/usage.md): FSDP2's hooks break the graph at every layer, so the
causal mask HF builds in the root's graph reaches each layer's graph as an input. Plain
torch.compile runs SDPA's masked path there; mst_backend reads the mask back where it was
built (passes/graph/attention/crossing.py) and runs the causal kernel. One process per
GPU (``torchrun --nproc-per-node N``; without torchrun one process, world size 1, NCCL),
bf16 weights, Llama-3.2-1B shape with random weights, no gradient checkpointing (torch 2.11
does not capture checkpointed layers under FSDP2), one sequence per rank. Per (method,
length): the median step ms over --iters steps after one warm-up step, the peak memory,
the loss, mst's rewrites run in a step and what its attention pass did; rows printed, then written to
results_fsdp_<preset>.csv under --out.

    python benchmarks/bench_fsdp.py --tokens 8192 16384
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist
from common import PRESETS, build_model, inputs, time_and_peak, write_csv
from torch._dynamo.utils import counters

import mst_fx


def run(method: str, preset: str, tokens: int, iters: int) -> dict:
    family, dims = PRESETS[preset]
    model = build_model(dims, "cuda", family, checkpointing=False)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    torch._dynamo.reset()
    backend = mst_fx.make_backend(logits="drop") if method == "mst" else "inductor"
    compiled = torch.compile(model, backend=backend)
    batch = inputs(tokens, 1, model.config.vocab_size, "cuda", seed=tokens + dist.get_rank())
    losses = []

    def step():
        model.zero_grad(set_to_none=True)
        counters["mst_fx_run"].clear()
        loss = compiled(**batch).loss
        loss.backward()
        losses.append(loss.item())

    ms, peak = time_and_peak(step, iters, "cuda")
    runs = dict(counters["mst_fx_run"]) if method == "mst" else {}
    attention = sorted({f"{r.detail}" for r in backend.report.regions if r.kind == "attention"} |
                       {f"skipped: {s.reason}" for s in backend.report.skipped if s.kind == "attention"}) \
        if method == "mst" else []
    return dict(method=method, tokens=tokens, world=dist.get_world_size(), ms=round(ms, 1),
                peak_gb=round(peak / 1e9, 3), loss=round(losses[0], 5), runs=runs, attention=attention)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama-3.2-1b", choices=[k for k in PRESETS if k != "tiny"])
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--methods", nargs="+", default=["compile", "mst"], choices=["compile", "mst"])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    dist.init_process_group("nccl", rank=int(os.environ.get("RANK", 0)),
                            world_size=int(os.environ.get("WORLD_SIZE", 1)))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    rows = []
    for tokens in args.tokens:
        for method in args.methods:
            try:
                row = run(method, args.preset, tokens, args.iters)
            except torch.OutOfMemoryError:
                row = dict(method=method, tokens=tokens, world=dist.get_world_size(), note="OOM")
                torch.cuda.empty_cache()
            rows.append(row)
            gc.collect()
            torch.cuda.empty_cache()
            if dist.get_rank() == 0:
                print(row, flush=True)
    if dist.get_rank() == 0:
        write_csv(rows, os.path.join(args.out, f"results_fsdp_{args.preset}.csv"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
