"""End-to-end training step against every peer: how long a sequence trains on one GPU, and
how fast.

One training step (forward, backward, optionally an AdamW step) of a Hugging Face model
built from a config preset with random weights, bf16, batch 1, SDPA attention, labels =
input ids (HF's shifted mean cross-entropy). The model output is dropped before backward,
as HF Trainer does. Methods:

    eager                   HF eager
    eager_gc                HF eager + gradient checkpointing (GC, non-reentrant)
    compile_gc              torch.compile (Inductor) + GC
    compile_gc_autochunk    the same with Inductor's auto_chunker enabled
    liger_gc                Liger Kernel's model patch (RMSNorm, RoPE, SwiGLU, fused linear
                            cross-entropy) + GC, eager (needs liger_kernel)
    cce_gc                  Cut Cross-Entropy's linear_cross_entropy on the decoder's hidden
                            states + GC, eager (needs cut_cross_entropy)
    mst_gc                  torch.compile(backend=mst_backend) + GC
    mst_gc_offload          the same with MSTConfig(offload=True): the layer checkpoints in
                            pinned host memory between forward and backward
    mst                     torch.compile(backend=mst_backend), no GC
The mst methods use MSTConfig(logits="drop") (--mst-logits): the step reads only the loss,
as HF Trainer does, so the [tokens, vocab] logits output is returned empty (Liger's fused
loss skips the logits in training too); with "keep" it costs tokens x vocab x 2 bytes
(8.4 GB at 32k tokens for Llama-3.2-1B).

Each method runs in its own process over the lengths in increasing order; its first OOM
is recorded and ends its sweep, and the next method goes on. Every length compiles its own
static graph (the best each compiled method can do; dynamic shapes: bench_compile.py).
Per (method, length): median step time over --iters steps after one warm-up step, tokens/s,
peak memory (torch.cuda.max_memory_allocated over the timed steps: weights, gradients and
optimizer state included), the loss, and for mst_* the difference from compile_gc's loss on
the same inputs. Per method: the longest sequence that fits in --capacity-gb, from the line
through its two longest runs (peak vs tokens); --check runs one method at that length
(warm-up and one timed step).

--qlora R runs every method on a QLoRA model: each decoder linear a frozen 4-bit NF4 base
(torchao, as torchtune's QLoRA writes it) with a rank-R adapter, everything else frozen.

--varying N is what a real run gets instead: one process, torch.compile's default
dynamic=None, N steps whose lengths are drawn uniformly (seeded, multiples of 256) between
the smallest and largest --tokens, the largest last. The first length compiles a static
graph, the second one graph with a symbolic length that serves every later length. Each
step runs twice at its length (the first run may compile), the second timed alone, with
its peak; rows of kind "varying" with the step, the graphs compiled so far and, for mst,
the rewrites of the graph that ran. Compare with a sweep (kind "sweep") at the same length.

Writes results_train_<preset>.csv and train_<preset>.png (peak memory and tokens/s vs
length, one line per method) under --out; --plot CSV... redraws both from earlier runs.

    python benchmarks/bench_train.py --preset llama-3.2-1b
    python benchmarks/bench_train.py --methods mst_gc --tokens 131072 262144 --check mst_gc
    python benchmarks/bench_train.py --plot a/results_train_llama-3.2-1b.csv b/results_train_llama-3.2-1b.csv
    python benchmarks/bench_train.py --methods mst_gc liger_gc --tokens 8192 65536 --varying 12
    python benchmarks/bench_train.py --preset llama-3-8b --qlora 16 --methods compile_gc liger_gc mst_gc \
        --tokens 32768 65536
    python benchmarks/bench_train.py --quick       # CPU, tiny model, eager kernels: checks the script
"""

from __future__ import annotations

import argparse
import ast
import csv
import gc
import os

import torch
from common import (
    PRESETS,
    applied_kinds,
    build_model,
    inputs,
    print_result,
    run_rows,
    script_cmd,
    time_and_peak,
    to_qlora,
    write_csv,
)

import mst_fx
from mst_fx.backend import aot_eager_compiler

METHODS = ("eager", "eager_gc", "compile_gc", "compile_gc_autochunk", "liger_gc", "cce_gc", "mst_gc",
           "mst_gc_offload", "mst")
LENGTHS = (8192, 16384, 32768, 65536, 131072, 262144)
FIELDS = ["method", "tokens", "ms", "tokens_per_s", "peak_gb", "loss", "loss_diff_vs_compile", "rewrites",
          "note", "kind", "step", "graphs"]


def build(preset: str, method: str, device: str, layers: int | None, qlora: int = 0):
    family, dims = PRESETS[preset]
    dims = dict(dims, num_hidden_layers=layers) if layers else dims
    if method == "liger_gc":
        import liger_kernel.transformers as liger

        getattr(liger, f"apply_liger_kernel_to_{family}")()  # patches the classes: before building
    model = build_model(dims, device, family, checkpointing=method not in ("eager", "mst"))
    return to_qlora(model, qlora) if qlora else model


def loss_fn(model, method: str, quick: bool, logits: str = "drop", mst: dict | None = None):
    """(batch -> loss, mst backend or None) for ``method``; ``mst``: MSTConfig fields."""
    if method in ("eager", "eager_gc", "liger_gc"):
        return (lambda b: model(**b).loss), None
    if method == "cce_gc":
        from cut_cross_entropy import linear_cross_entropy

        def cce(b):
            h = model.model(input_ids=b["input_ids"], use_cache=False).last_hidden_state
            return linear_cross_entropy(h, model.lm_head.weight, b["labels"], shift=True)
        return cce, None
    # --quick checks the script, not Inductor's kernels: compiled methods run through
    # AOTAutograd with eager kernels there (so its auto_chunker row is plain compile's), and
    # tiny sequences need a lower floor on chunk size to be chunked at all.
    if method in ("compile_gc", "compile_gc_autochunk"):
        torch._inductor.config.auto_chunker.enable = method == "compile_gc_autochunk"
        compiled = torch.compile(model, backend="aot_eager" if quick else "inductor")
        return (lambda b: compiled(**b).loss), None
    fields = dict(mst or {}, logits=logits, **({"offload": True} if method == "mst_gc_offload" else {}))
    backend = mst_fx.make_backend(**dict(fields, min_chunk_tokens=32), compiler=aot_eager_compiler) if quick \
        else mst_fx.make_backend(**fields)
    compiled = torch.compile(model, backend=backend)
    return (lambda b: compiled(**b).loss), backend


def mst_fields(pairs: list[str]) -> dict:
    """``--mst FIELD=VALUE ...`` as MSTConfig fields (values read as Python literals)."""
    return {k: ast.literal_eval(v) for k, v in (o.split("=", 1) for o in pairs)}


def one_step_parser(description: str, lengths: bool = False) -> argparse.ArgumentParser:
    """The arguments of the one-step GPU tools (memory_at_peak.py, time_profile.py,
    compile_profile.py; one_step.py with ``lengths``: --tokens takes several)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", default="llama-3.2-1b", choices=[k for k in PRESETS if k != "tiny"])
    p.add_argument("--method", default="mst_gc")
    if lengths:
        p.add_argument("--tokens", type=int, nargs="+", required=True)
    else:
        p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--mst", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="MSTConfig fields for the mst methods (Python literals)")
    return p


def one_step(args):
    """(model, step) for the parsed one_step_parser arguments, on CUDA: ``step()`` runs one
    forward + backward of ``args.tokens`` tokens with the gradients reset first."""
    model = build(args.preset, args.method, "cuda", None)
    overrides = mst_fields(args.mst)
    f, _ = loss_fn(model, args.method, False, overrides.pop("logits", "drop"), overrides)
    batch = inputs(args.tokens, 1, model.config.vocab_size, "cuda")

    def step():
        model.zero_grad(set_to_none=True)
        f(batch).backward()

    return model, step


def training_step(model, f, tokens: int, vocab: int, device: str, opt=None):
    """(step, losses): ``step()`` runs one training step on ``tokens`` ids seeded by the
    length (the same inputs in every method and run) and appends its loss to ``losses``."""
    batch = inputs(tokens, 1, vocab, device, seed=tokens)
    losses = []

    def step():
        model.zero_grad(set_to_none=True)
        loss = f(batch)
        loss.backward()
        if opt is not None:
            opt.step()
        losses.append(loss.item())

    return step, losses


def measured(tokens: int, ms: float, peak: int, losses: list[float]) -> dict:
    """A row's measured fields: step time, tokens/s, peak GB and the first step's loss."""
    return dict(ms=round(ms, 1), tokens_per_s=round(tokens / ms * 1e3), peak_gb=round(peak / 1e9, 3),
                loss=round(losses[0], 5))


def run_method(method: str, preset: str, lengths: list[int], iters: int, adamw: bool, quick: bool,
               layers: int | None, logits: str = "drop", mst: dict | None = None, qlora: int = 0) -> None:
    """Child process: one ``RESULT {json}`` line per length; stops after an OOM."""
    device = "cpu" if quick else "cuda"
    torch._dynamo.config.automatic_dynamic_shapes = False  # every length its own static graph
    model = build(preset, method, device, layers, qlora)
    vocab = model.config.vocab_size
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5) if adamw else None
    for tokens in sorted(lengths):
        torch._dynamo.reset()
        f, backend = loss_fn(model, method, quick, logits, mst)
        step, losses = training_step(model, f, tokens, vocab, device, opt)

        row = {"method": method, "tokens": tokens, "kind": "sweep"}
        try:  # a warm-up step first (compiles); CPU: the bytes allocated during a step
            ms, peak = time_and_peak(step, iters, device, cpu_peak=True)
        except torch.OutOfMemoryError:
            print_result({**row, "note": "OOM"})
            return
        if backend is not None:
            row["rewrites"] = applied_kinds(backend.report) + f"; logits {logits}" \
                + "".join(f"; {k}={v}" for k, v in (mst or {}).items())
        row.update(measured(tokens, ms, peak, losses))
        print_result(row)
        step = f = backend = None  # free this length's tensors and compiled graph
        model.zero_grad(set_to_none=True)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def varying_lengths(lo: int, hi: int, steps: int, seed: int = 0) -> list[int]:
    """``steps`` lengths drawn uniformly in [lo, hi] in multiples of 256 (of 32 below 256
    tokens: --quick), the last one hi."""
    unit = 256 if lo >= 256 else 32
    g = torch.Generator().manual_seed(seed)
    drawn = torch.randint(lo // unit, hi // unit + 1, (steps - 1,), generator=g) * unit
    return [int(t) for t in drawn] + [hi]


def run_varying(method: str, preset: str, lengths: list[int], quick: bool, layers: int | None,
                logits: str = "drop", mst: dict | None = None) -> None:
    """Child process: the steps of --varying, one ``RESULT {json}`` line each, in one
    process with torch.compile's defaults (no Dynamo reset, automatic dynamic shapes)."""
    from torch._dynamo.utils import counters

    device = "cpu" if quick else "cuda"
    model = build(preset, method, device, layers)
    f, backend = loss_fn(model, method, quick, logits, mst)
    vocab = model.config.vocab_size
    for i, tokens in enumerate(lengths):
        step, losses = training_step(model, f, tokens, vocab, device)

        row = {"method": method, "tokens": tokens, "kind": "varying", "step": i}
        try:  # the first run may compile (first and second lengths), the second is timed alone
            ms, peak = time_and_peak(step, 1, device, cpu_peak=True)
        except torch.OutOfMemoryError:
            print_result({**row, "note": "OOM"})
            return
        if backend is not None:
            last = backend.reports[-1]
            row["rewrites"] = applied_kinds(last) + ("; symbolic graph" if last.symbols else "; static graph")
        row.update(measured(tokens, ms, peak, losses), graphs=counters["stats"]["unique_graphs"])
        print_result(row)
        step = None
        if device == "cuda":
            torch.cuda.empty_cache()


def longest(rows: list[dict], method: str, capacity_gb: float) -> int | None:
    """Tokens where the line through the method's two longest runs reaches capacity_gb."""
    ran = sorted((r["tokens"], r["peak_gb"]) for r in rows
                 if r["method"] == method and r.get("peak_gb") not in (None, "") and r.get("kind") == "sweep")
    if len(ran) < 2:
        return None
    (t1, p1), (t2, p2) = ran[-2], ran[-1]
    if p2 <= p1:
        return None
    return int(t2 + (capacity_gb - p2) * (t2 - t1) / (p2 - p1))


def add_loss_diffs(rows: list[dict]) -> None:
    base = {r["tokens"]: r["loss"] for r in rows if r["method"] == "compile_gc" and r.get("loss") not in (None, "")}
    for r in rows:
        if r["method"].startswith("mst") and r.get("loss") not in (None, "") and r["tokens"] in base:
            r["loss_diff_vs_compile"] = round(abs(r["loss"] - base[r["tokens"]]), 5)


def plot(rows: list[dict], path: str, title: str, capacity_gb: float) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (run again with --plot on the CSV)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (mem, speed) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in [m for m in METHODS if any(r["method"] == m for r in rows)]:
        ran = sorted((r["tokens"], r["peak_gb"], r["tokens_per_s"]) for r in rows
                     if r["method"] == method and r.get("peak_gb") not in (None, ""))
        if not ran:
            continue
        t = [x[0] / 1024 for x in ran]
        mem.plot(t, [x[1] for x in ran], marker="o", label=method)
        speed.plot(t, [x[2] for x in ran], marker="o", label=method)
    if max(r.get("peak_gb") or 0 for r in rows) > capacity_gb / 4:
        mem.axhline(capacity_gb, color="grey", linestyle="--", linewidth=1)
    for ax, label in ((mem, "peak memory (GB)"), (speed, "tokens / s")):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("sequence length (k tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    mem.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report(rows: list[dict], out: str, preset: str, capacity_gb: float, title: str) -> None:
    add_loss_diffs(rows)
    rows = sorted(rows, key=lambda r: (METHODS.index(r["method"]), r.get("kind", ""),
                                       r["step"] if r.get("kind") == "varying" else r["tokens"]))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"results_train_{preset}.csv")
    write_csv(rows, path, FIELDS)
    png = os.path.join(out, f"train_{preset}.png")
    drew = plot(rows, png, title, capacity_gb)
    print(f"\n{'method':<21} {'tokens':>7} {'ms':>9} {'tok/s':>7} {'peak GB':>8} {'loss':>8} {'vs compile':>10}  note")
    for r in rows:
        print(f"{r['method']:<21} {r['tokens']:>7} {str(r.get('ms', '')):>9} {str(r.get('tokens_per_s', '')):>7} "
              f"{str(r.get('peak_gb', '')):>8} {str(r.get('loss', '')):>8} "
              f"{str(r.get('loss_diff_vs_compile', '')):>10}  "
              f"{r.get('kind') if r.get('kind') == 'check' else ''} {r.get('note') or ''} {r.get('rewrites') or ''}"
              + (f" (step {r['step']}, {r.get('graphs')} graphs)" if r.get("kind") == "varying" else ""))
    print(f"\nlongest sequence within {capacity_gb} GB (line through the two longest runs):")
    for method in METHODS:
        if any(r["method"] == method for r in rows):
            n = longest(rows, method, capacity_gb)
            checks = [r for r in rows if r["method"] == method and r.get("kind") == "check"]
            seen = "; checked: " + ", ".join(f"{c['tokens']} -> {c.get('peak_gb') or c.get('note')} GB"
                                             for c in checks) if checks else ""
            print(f"  {method:<21} {f'{n // 1024}k tokens' if n else '-'}{seen}")
    print(f"written: {path}" + (f", {png}" if drew else ""))


def read_csv(paths: list[str]) -> list[dict]:
    """Rows of earlier runs; a later file's row replaces an earlier one for the same
    (method, tokens, kind, step)."""
    merged: dict[tuple, dict] = {}
    for p in paths:
        with open(p) as f:
            for r in csv.DictReader(f):
                r = {k: v for k, v in r.items() if v != ""}
                r["tokens"] = int(r["tokens"])
                for k in ("ms", "peak_gb", "loss"):
                    if k in r:
                        r[k] = float(r[k])
                if "tokens_per_s" in r:
                    r["tokens_per_s"] = int(float(r["tokens_per_s"]))
                r.pop("loss_diff_vs_compile", None)
                merged[(r["method"], r["tokens"], r.get("kind", "sweep"), r.get("step"))] = r
    return list(merged.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama-3.2-1b", choices=[k for k in PRESETS if k != "tiny"])
    p.add_argument("--layers", type=int, help="override the preset's number of layers")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--tokens", type=int, nargs="+", default=list(LENGTHS))
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--adamw", action="store_true", help="an AdamW step in every training step")
    p.add_argument("--capacity-gb", type=float, default=78.0)
    p.add_argument("--check", nargs="*", default=[], metavar="METHOD",
                   help="run these methods once at their fitted longest length")
    p.add_argument("--mst-logits", default="drop", choices=("drop", "keep"), help="MSTConfig.logits")
    p.add_argument("--mst", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="other MSTConfig fields for the mst methods (Python literals)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--varying", type=int, metavar="N",
                   help="N steps of lengths between the smallest and largest --tokens in one process")
    p.add_argument("--qlora", type=int, default=0, metavar="R",
                   help="QLoRA: every decoder linear a frozen 4-bit NF4 base (torchao) with a rank-R adapter")
    p.add_argument("--quick", action="store_true", help="CPU, tiny model, 128 and 256 tokens, 1 step")
    p.add_argument("--plot", nargs="+", metavar="CSV", help="table and plot from earlier runs' CSVs")
    p.add_argument("--one", metavar="METHOD", help=argparse.SUPPRESS)
    args = p.parse_args()
    preset = "tiny" if args.quick else args.preset
    if args.quick and not args.one:  # a child gets its lengths from the parent
        args.tokens, args.iters = [128, 256], 1
    title = f"{preset}{f' ({args.layers} layers)' if args.layers else ''}, {'fp32, CPU' if args.quick else 'bf16'}, " \
            f"batch 1, fwd+bwd" \
            + (" + AdamW" if args.adamw else "") + (f", QLoRA r={args.qlora}" if args.qlora else "")
    if args.plot:
        report(read_csv(args.plot), args.out, preset, args.capacity_gb, title)
        return
    if args.one and args.varying:
        run_varying(args.one, preset, args.tokens, args.quick, args.layers, args.mst_logits, mst_fields(args.mst))
        return
    if args.one:
        mst = mst_fields(args.mst)
        run_method(args.one, preset, args.tokens, args.iters, args.adamw, args.quick, args.layers,
                   args.mst_logits, mst, args.qlora)
        return

    def child(method: str, tokens: list[int], iters: int = args.iters, varying: bool = False) -> list[dict]:
        cmd = script_cmd(__file__, "--one", method, "--tokens", *tokens, "--iters", iters,
                         *(["--quick"] if args.quick else []), *(["--varying", 1] if varying else []),
                         *(["--adamw"] if args.adamw else []), *(["--layers", args.layers] if args.layers else []),
                         *(["--preset", args.preset] if not args.quick else []), "--mst-logits", args.mst_logits,
                         *(["--mst", *args.mst] if args.mst else []), *(["--qlora", args.qlora] if args.qlora else []))
        got, error = run_rows(cmd)
        done = {r["tokens"] for r in got}
        missing = [t for t in (tokens if varying else sorted(tokens)) if t not in done]
        if error and missing and not any(r.get("note") == "OOM" for r in got):
            got.append({"method": method, "tokens": missing[0], "kind": "sweep", "note": error})
        for r in got:
            print(r, flush=True)
        return got

    rows = []
    if args.varying:
        lengths = varying_lengths(min(args.tokens), max(args.tokens), args.varying)
        for method in args.methods:
            rows += child(method, lengths, varying=True)
        report(rows, args.out, preset, args.capacity_gb, title)
        return
    for method in args.methods:
        rows += child(method, args.tokens)
    for method in args.check:
        n = longest(rows, method, args.capacity_gb)
        if n:
            for r in child(method, [n // 8192 * 8192], iters=1):  # one timed step: it fits or not
                rows.append({**r, "kind": "check"})
    report(rows, args.out, preset, args.capacity_gb, title)


if __name__ == "__main__":
    main()
