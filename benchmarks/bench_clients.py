"""Real trainers on varying lengths: HF Trainer and TRL's SFTTrainer (padding_free) with
and without mst_backend, one process each, on a GPU.

A small Llama-shaped model (random weights, bf16, gradient checkpointing), AdamW, one
sequence a step (Trainer) or a padding-free packed batch (SFTTrainer), lengths drawn
uniformly between --min and --max tokens (seeded). For each run: the per-step losses, the
peak memory of the whole run (torch.cuda.max_memory_allocated), the wall time of the
steps after the first two (which compile), the graphs compiled, and for mst the rewrites
of every graph; the mst losses are compared with the uncompiled run's step by step.

    python benchmarks/bench_clients.py --out $OUT          # needs trl for the SFTTrainer rows
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from common import applied_kinds, build_model, print_result, run_row, script_cmd, write_csv

import mst_fx

DIMS = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
            num_key_value_heads=4, vocab_size=32000, max_position_embeddings=65536)


def lengths(n: int, lo: int, hi: int) -> list[int]:
    g = torch.Generator().manual_seed(0)
    return [int(t) for t in torch.randint(lo, hi + 1, (n,), generator=g)]


class Steps:
    """A Trainer callback: wall time of each step, CUDA-synchronized."""

    def __init__(self):
        import transformers

        outer = self

        class Callback(transformers.TrainerCallback):
            def on_step_begin(self, *a, **k):
                torch.cuda.synchronize()
                outer.t = time.perf_counter()

            def on_step_end(self, *a, **k):
                torch.cuda.synchronize()
                outer.ms.append((time.perf_counter() - outer.t) * 1e3)

        self.ms, self.callback = [], Callback()


def run(client: str, method: str, steps: int, lo: int, hi: int) -> dict:
    """Child process: one training run of ``method`` (eager_gc, compile_gc: plain
    torch.compile, mst_gc), its row printed as ``RESULT {json}``."""
    import transformers
    from torch._dynamo.utils import counters

    m = build_model(DIMS, "cuda")
    mst = method == "mst_gc"
    backend = mst_fx.make_backend(logits="drop") if mst else "inductor"
    timer = Steps()
    common = dict(output_dir=tempfile.mkdtemp(), max_steps=steps, learning_rate=1e-5, logging_steps=1,
                  report_to=[], save_strategy="no", seed=0, dataloader_num_workers=0, disable_tqdm=True)
    rows = [torch.randint(2, DIMS["vocab_size"], (n,), generator=torch.Generator().manual_seed(n))
            for n in lengths(steps * (2 if client == "sft" else 1), lo, hi)]
    torch.cuda.reset_peak_memory_stats()
    if client == "trainer":
        if method != "eager_gc":
            m = torch.compile(m, backend=backend)  # the README recipe
        data = [{"input_ids": r, "labels": r} for r in rows]
        args = transformers.TrainingArguments(per_device_train_batch_size=1, remove_unused_columns=False, **common)
        trainer = transformers.Trainer(model=m, args=args, train_dataset=data, callbacks=[timer.callback])
    else:
        import datasets
        import trl
        from tokenizers import Tokenizer, models

        if method != "eager_gc":
            m.compile(backend=backend)  # in place: SFTTrainer patches the model's own head
        vocab = {f"t{i}": i for i in range(DIMS["vocab_size"])}
        tok = transformers.PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), pad_token="t0", eos_token="t1")
        data = datasets.Dataset.from_dict({"input_ids": [r.tolist() for r in rows]})
        args = trl.SFTConfig(per_device_train_batch_size=2, padding_free=True, max_length=None, **common)
        trainer = trl.SFTTrainer(model=m, args=args, train_dataset=data, processing_class=tok,
                                 callbacks=[timer.callback])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    row = {"client": client, "method": method, "steps": steps, "tokens": f"{lo}-{hi}",
           "losses": losses, "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3),
           "ms_after_compile": round(sum(timer.ms[2:]), 1), "graphs": counters["stats"]["unique_graphs"]}
    if mst:
        row["rewrites"] = [("symbolic " if r.symbols else "static ") + applied_kinds(r) for r in backend.reports]
    print_result(row)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", nargs="+", default=["trainer", "sft"], choices=["trainer", "sft"])
    p.add_argument("--methods", nargs="+", default=["eager_gc", "mst_gc"], choices=["eager_gc", "compile_gc", "mst_gc"])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--min", type=int, default=4096)
    p.add_argument("--max", type=int, default=16384)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--one", nargs=2, metavar=("CLIENT", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        run(args.one[0], args.one[1], args.steps, args.min, args.max)
        return
    rows = []
    for client in args.clients:
        by = {}
        for method in args.methods:
            cmd = script_cmd(__file__, "--one", client, method, "--steps", args.steps, "--min", args.min,
                             "--max", args.max)
            by[method] = row = run_row(cmd, {"client": client, "method": method}, "note")
            rows.append(row)
        ref = by.get("eager_gc", {})
        for method, row in by.items():
            if method != "eager_gc" and "losses" in ref and "losses" in row:
                row["max_loss_diff"] = round(max(abs(a - b) for a, b in zip(ref["losses"], row["losses"])), 5)
    write_csv(rows, os.path.join(args.out, "results_clients.csv"))
    print(f"\n{'client':<8} {'method':<9} {'peak GB':>8} {'ms after compile':>17} {'graphs':>6} {'max loss diff':>13}")
    for r in rows:
        print(f"{r['client']:<8} {r['method']:<9} {str(r.get('peak_gb', '')):>8} "
              f"{str(r.get('ms_after_compile', '')):>17} {str(r.get('graphs', '')):>6} "
              f"{str(r.get('max_loss_diff', '')):>13}  {r.get('note') or ''}")
        for line in r.get("rewrites", []):
            print(f"    {line}")


if __name__ == "__main__":
    main()
