"""What the benchmark scripts share: the model presets and the model built from one, the
timed step (median time and peak memory), the child-process row runner (each table row in
its own process, so an OOM is recorded and the sweep goes on) with the ``RESULT {json}``
lines that carry a row from child to parent, and CSV writing.

Every script imports it before mst_fx: importing it puts the repository root first on
sys.path, so the scripts run the checkout's mst_fx, installed or not. (``python
benchmarks/x.py`` puts benchmarks/ on sys.path, which is how this module is found.)
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Model presets: Hugging Face config fields. LLAMA_32_1B and TINY are the whole-model
# benchmarks' shapes (bench_attention, bench_compile, bench_lora, bench_train); PRESETS are
# bench_train's --preset choices (also those of memory_at_peak, time_profile and
# compile_profile), each (family, fields).
LLAMA_32_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                   tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=262144)
TINY = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True)
LONG = dict(rope_theta=500000.0, max_position_embeddings=524288)
PRESETS = {
    "llama-3.2-1b": ("llama", dict(LLAMA_32_1B, **LONG)),
    "llama-3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                 tie_word_embeddings=False, **LONG)),
    "qwen3-1.7b": ("qwen3", dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                 vocab_size=151936, tie_word_embeddings=True, **LONG)),
    "tiny": ("llama", TINY),
}
FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
RESULT = "RESULT "


def build_model(dims: dict, device: str, family: str = "llama", checkpointing: bool = True):
    """A Hugging Face causal LM of ``family`` with config fields ``dims``, random weights
    (seed 0), SDPA attention, bf16 on CUDA and fp32 on CPU, in train mode; with HF gradient
    checkpointing (non-reentrant) unless ``checkpointing`` is False."""
    import transformers

    config_cls, model_cls = (getattr(transformers, name) for name in FAMILIES[family])
    config = config_cls(**dims)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = model_cls(config)
    model = model.to(torch.bfloat16 if device == "cuda" else torch.float32)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


class QLoRALinear(torch.nn.Module):
    """torchtune's QLoRA layer: a frozen 4-bit NF4 base (torchao's ``linear_nf4``) plus a
    rank-``rank`` adapter in the base's compute dtype, ``B`` starting at zero, scaled 2."""

    def __init__(self, linear: torch.nn.Linear, rank: int):
        super().__init__()
        from torchao.quantization import to_nf4

        blocks = linear.weight.numel() // 64  # torchao's defaults, 64 x 256; smaller scale blocks for tiny models
        scaler = next(b for b in (256, 128, 64, 32, 16, 8, 4, 2, 1) if blocks % b == 0)
        self.weight = torch.nn.Parameter(to_nf4(linear.weight.detach(), 64, scaler), requires_grad=False)
        w = linear.weight
        self.lora_a = torch.nn.Linear(linear.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_b = torch.nn.Linear(rank, linear.out_features, bias=False, device=w.device, dtype=w.dtype)
        torch.nn.init.zeros_(self.lora_b.weight)

    def forward(self, x):
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

        return linear_nf4(x, self.weight) + self.lora_b(self.lora_a(x)) * 2.0


def to_qlora(model, rank: int):
    """Every linear of the decoder layers a QLoRALinear; everything else frozen (QLoRA)."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = model.model.layers
    for name, lin in list(layers.named_modules()):
        if isinstance(lin, torch.nn.Linear):
            parent, _, attr = name.rpartition(".")
            setattr(layers.get_submodule(parent), attr, QLoRALinear(lin, rank))
    if getattr(model, "is_gradient_checkpointing", False):
        model.enable_input_require_grads()  # checkpointed layers need an input that requires grad
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return model


def inputs(tokens: int, docs: int, vocab: int, device: str, seed: int = 1) -> dict:
    """A training batch of one sequence: ``tokens`` random ids (a CPU generator seeded with
    ``seed``), labels = ids; ``docs`` > 1 packs that many equal documents through
    position_ids (positions restarting at each)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, tokens), generator=g).to(device)
    out = {"input_ids": ids, "labels": ids, "use_cache": False}
    if docs > 1:
        bounds = [tokens * i // docs for i in range(docs + 1)]
        out["position_ids"] = torch.cat([torch.arange(b - a) for a, b in zip(bounds, bounds[1:])])[None].to(device)
    return out


def time_and_peak(step, iters: int, device: str, cpu_peak: bool = False) -> tuple[float, int]:
    """A whole training step: one warm-up ``step()`` (it compiles), then the median ms over
    ``iters`` steps and their peak memory in bytes, torch.cuda.max_memory_allocated over them
    on CUDA (weights, gradients and optimizer state included); on CPU the bytes one more
    step allocates (mst_fx.memory.peak_bytes) with ``cpu_peak``, else 0."""
    from mst_fx.memory import median_ms, peak_bytes

    step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        ms = median_ms(step, iters, device)
        return ms, torch.cuda.max_memory_allocated()
    ms = median_ms(step, iters, device)
    return ms, peak_bytes(step, device) if cpu_peak else 0


def time_and_extra_peak(step, iters: int, device: str, warmup: int = 2, clear=None) -> tuple[float, int]:
    """One block or call: ``warmup`` steps, the median ms over ``iters`` steps, then the bytes
    one more step allocates beyond what is alive before it (mst_fx.memory.peak_bytes),
    ``clear()`` run first (to drop the last step's gradients) when given."""
    from mst_fx.memory import median_ms, peak_bytes

    for _ in range(warmup):
        step()
    ms = median_ms(step, iters, device)
    if clear is not None:
        clear()
    return ms, peak_bytes(step, device)


def kind_counts(kinds: list[str], sep: str = ", ", none: str = "none") -> str:
    """"lm_head x1, mlp x2": how many times each kind occurs, by kind; ``none`` if empty."""
    return sep.join(f"{k} x{kinds.count(k)}" for k in sorted(set(kinds))) or none


def applied_kinds(report, sep: str = ", ") -> str:
    """kind_counts of the regions an mst_fx report says were rewritten."""
    return kind_counts([r.kind for r in report.regions if r.applied], sep)


def print_result(row: dict) -> None:
    """A child's row, as the line run_rows reads back."""
    print(RESULT + json.dumps(row), flush=True)


def script_cmd(script: str, *args) -> list[str]:
    """The command that runs ``script`` (a benchmark's ``__file__``) in a fresh Python."""
    return [sys.executable, os.path.abspath(script), *map(str, args)]


def run_row(cmd: list[str], failed: dict, note: str, env: dict | None = None) -> dict:
    """The row the child printed as ``RESULT {json}``, else ``failed`` with ``note`` set to
    "OOM" or the child's last error line."""
    rows, error = run_rows(cmd, env)
    return rows[-1] if rows else {**failed, note: error}


def run_rows(cmd: list[str], env: dict | None = None) -> tuple[list[dict], str | None]:
    """Every row the child printed as ``RESULT {json}``, and None if it exited cleanly, else
    "OOM" or its last error line."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rows = [json.loads(line[len(RESULT):]) for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode == 0:
        return rows, None
    err = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return rows, "OOM" if "OutOfMemory" in proc.stderr else err[:200]


def write_csv(rows: list[dict], path: str, fields: list[str] | None = None) -> None:
    """``rows`` as CSV at ``path`` (its folder made): the columns ``fields``, else every key
    of the rows in the order first seen; a missing value is empty, a list is JSON."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields or list(dict.fromkeys(k for r in rows for k in r)),
                           extrasaction="ignore")
        w.writeheader()
        w.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows)


def paper_tables(rows: list[dict], tables) -> str:
    """The MsT paper's table layout, markdown: for each (field, title) of ``tables`` one row
    per method and one column per token count."""
    tokens = sorted({r["tokens"] for r in rows}, key=int)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["tokens"]): r for r in rows}
    out = []
    for field, title in tables:
        out.append(f"\n{title}\n| method | " + " | ".join(str(t) for t in tokens) + " |")
        out.append("|---|" + "---|" * len(tokens))
        for m in methods:
            out.append(f"| {m} | " + " | ".join(str(cell[(m, t)][field]) if (m, t) in cell else ""
                                                for t in tokens) + " |")
    return "\n".join(out)


def recorded_step(step) -> tuple[int, dict]:
    """(bytes allocated before, the CUDA allocator's snapshot with its history) of one
    ``step()``, recorded with torch.cuda.memory._record_memory_history."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=4_000_000, stacks="python")
    step()
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    return before, snapshot
