"""One gloo run of 2 processes on loopback, started by tests/test_distributed.py.

``python worker.py SETUP PORT OUT``: each rank trains one step of a small HF model on its
sequence of a 2-sequence global batch, compiled with mst_fx under the SETUP's wrapping, then
the same step under plain torch.compile (Inductor); rank 0 also runs the unwrapped model
eagerly on the whole batch. Rank 0 writes to OUT (JSON): the largest difference of the loss
and of every gradient from the eager run, mst_fx's rewrite counters and skip reasons, and
the collectives each compiled run called.

``WORLD=1 DEVICE=cuda`` runs the same step on one GPU with NCCL (the CUDA path's check on
the GPU machine, benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import transformers

SEQ, VOCAB = 256, 512
WORLD = int(os.environ.get("WORLD", "2"))
DEVICE = os.environ.get("DEVICE", "cpu")
SETUPS = ("ddp", "ddp_whole", "fsdp", "fsdp_gc", "sp", "sp_fsdp")


def model(setup: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if setup in ("fsdp_gc", "sp"):  # the second family: Qwen3 (q/k norms)
        m = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, intermediate_size=176))
    else:
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=176))
    return m.to(DEVICE)


def wrap(m: torch.nn.Module, setup: str) -> torch.nn.Module:
    if setup == "sp":
        m.gradient_checkpointing_enable()
    if setup.startswith("ddp") or setup == "sp":
        from torch.nn.parallel import DistributedDataParallel

        # Buckets of ~1/10 of the model, as a 1B model's 25 MiB buckets are of it; DDP's
        # first bucket (1 MiB) is larger than this whole model, so it is lowered too.
        dist._DEFAULT_FIRST_BUCKET_BYTES = 20_000
        return DistributedDataParallel(m, bucket_cap_mb=0.05)
    from torch.distributed.fsdp import fully_shard

    if setup == "fsdp_gc":
        m.gradient_checkpointing_enable()
    for layer in m.model.layers:
        fully_shard(layer)
    fully_shard(m)
    return m


class Calls:
    """Counts the collectives (c10d ops) run while it is entered, by name, through the profiler."""

    def __enter__(self):
        self.profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self.profile.__enter__()
        return self

    def __exit__(self, *exc):
        self.profile.__exit__(*exc)
        self.count = {}
        for e in self.profile.events():
            if e.name.startswith(("c10d::", "nccl:", "_c10d_functional::all_to_all", "_c10d_functional::all_gather")):
                self.count[e.name] = self.count.get(e.name, 0) + 1


def full_grads(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in m.named_parameters():
        g = p.grad
        g = g.full_tensor() if hasattr(g, "full_tensor") else g
        out[name.replace("module.", "").replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")] = g
    return out


def step(setup: str, ids: torch.Tensor, rank: int, backend):
    from torch._dynamo.utils import counters

    m = wrap(model(setup), setup)
    compiled = torch.compile(m, backend=backend)
    x = ids[rank:rank + 1]
    compiled(input_ids=x, labels=x).loss.backward()  # compiles
    m.zero_grad(set_to_none=True)
    counters["mst_fx_run"].clear()
    with Calls() as calls:
        loss = compiled(input_ids=x, labels=x).loss
        loss.backward()
    return loss.detach(), full_grads(m), calls.count


def sp_step(setup: str, ids: torch.Tensor, backend):
    """Sequence parallel: every rank holds its piece of the same sequence. "sp" compiles
    one symbolic graph (dynamic=True) and steps at two lengths on it; "sp_fsdp" steps at
    three under the default dynamic=None (a static graph, then a symbolic one per frame, as
    a run of varying lengths gets). The last step is measured."""
    from torch._dynamo.utils import counters

    from mst_fx.sequence_parallel import shard

    m = wrap(model(setup), setup)
    compiled = torch.compile(m, backend=backend, dynamic=True if setup == "sp" else None)
    for n in ([SEQ - 64] if setup == "sp" else [SEQ - 64, SEQ - 32]):
        warm = ids[:, :n]
        compiled(**shard(dist.group.WORLD, warm, warm)).loss.backward()
    m.zero_grad(set_to_none=True)
    counters["mst_fx_run"].clear()
    with Calls() as calls:
        loss = compiled(**shard(dist.group.WORLD, ids, ids)).loss
        loss.backward()
    return loss.detach(), full_grads(m), calls.count


BUILDS_MASK = ("fsdp", "sp_fsdp")  # the causal mask built in the root graph, used in the layers'


def main(rank: int, setup: str, port: int, out: str) -> None:
    from torch._dynamo.utils import counters

    import mst_fx

    if setup in BUILDS_MASK:
        # As transformers 5.17 does under compile (the GPU image's), and as any padded batch
        # gets: the mask is built, not skipped, so it crosses FSDP2's graph breaks.
        transformers.masking_utils._ignore_causal_mask_sdpa = lambda *a, **k: False

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if DEVICE == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo", rank=rank, world_size=WORLD)
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (WORLD, SEQ)).to(DEVICE)
    backend = mst_fx.make_backend(chunks=4, min_chunk_tokens=1)
    # "ddp": Dynamo's default DDPOptimizer split; "ddp_whole": the recipe (one graph).
    torch._dynamo.config.optimize_ddp = setup == "ddp"
    if setup.startswith("sp"):  # one sequence, cut over the ranks
        ids = ids[:1]
        backend = mst_fx.make_backend(chunks=4, min_chunk_tokens=1, sequence_parallel=dist.group.WORLD)
        loss, grads, calls = sp_step(setup, ids, backend)
        plain_loss, plain_calls = loss, None  # plain torch.compile has no sequence parallelism
    else:
        loss, grads, calls = step(setup, ids, rank, backend)
    rewrites, runs = dict(counters["mst_fx"]), dict(counters["mst_fx_run"])
    if not setup.startswith("sp"):
        torch._dynamo.reset()
        plain_loss, _, plain_calls = step(setup, ids, rank, "inductor")
    losses = [torch.zeros((), device=DEVICE) for _ in range(WORLD)]
    dist.all_gather(losses, loss)
    if rank == 0:
        ref = model(setup)
        if setup in ("fsdp_gc", "sp"):
            ref.gradient_checkpointing_enable()
        ref(input_ids=ids, labels=ids).loss.backward()
        want = {n: p.grad for n, p in ref.named_parameters()}
        # equal token counts: the mean of the ranks' means; under sequence parallelism the
        # mean of the ranks' losses by construction (mst_fx.sequence_parallel.shard)
        global_loss = torch.stack(losses).mean()
        ref_loss = ref(input_ids=ids, labels=ids).loss.detach()
        result = dict(
            loss_diff=float((global_loss - ref_loss).abs()),
            grad_diff={n: float((grads[n] - want[n]).abs().max()) for n in want},
            grad_scale=max(float(g.abs().max()) for g in want.values()),
            rewrites=rewrites, runs=runs,
            reasons=sorted({f"{s.kind}: {s.reason}" for s in backend.report.skipped}),
            details=sorted({f"{r.kind}: {r.detail}" for r in backend.report.regions if r.applied}),
            graphs=len(backend.reports),
            calls=calls, plain_calls=plain_calls, plain_loss_diff=float((plain_loss - loss).abs()))
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    setup, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    assert setup in SETUPS, setup
    mp.spawn(main, args=(setup, port, out), nprocs=WORLD)
