"""The benchmark scripts run end to end (tiny sizes, CPU) and report what they claim."""

import csv
import glob
import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def load(name):
    """A benchmark script as a module, with benchmarks/ on sys.path as ``python
    benchmarks/<name>.py`` has it (the scripts import benchmarks/common.py)."""
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_mlp_quick(tmp_path):
    bench = load("bench_mlp")
    rows = bench.run(hidden=64, inter=224, tokens=(512,), chunk_counts=(2,), dtype="float32",
                     iters=1, out=str(tmp_path / "mlp.csv"))
    by = {r["method"]: r for r in rows}
    assert set(by) == {"eager", "torch.compile", "mst (default)", "mst M=2"}
    assert by["mst M=2"]["chunks"] == "2" and by["torch.compile"]["chunks"] == "-"
    assert (tmp_path / "mlp.csv").read_text().startswith("method,tokens,chunks")


def test_bench_lm_head_quick(tmp_path):
    bench = load("bench_lm_head")
    rows = bench.run(hidden=64, vocab=1024, tokens=(2048,), sweep=(), chunk_counts=(4,),
                     dtype="float32", iters=1, out=str(tmp_path / "head.csv"))
    by = {r["method"]: r for r in rows}
    assert {"eager", "torch.compile", "mst (default)", "mst recompute", "mst M=4"} <= set(by)
    assert by["mst M=4"]["chunks"] == "4" and by["torch.compile"]["chunks"] == "-"
    losses = {r["loss"] for r in rows}
    assert max(losses) - min(losses) < 1e-4, losses
    assert (tmp_path / "head.csv").read_text().startswith("table,method,tokens")


def test_bench_train_quick(tmp_path):
    """The end-to-end script on CPU (tiny Llama, 128 and 256 tokens, one step): a row per
    method and length (peers without their package say so), mst's losses equal
    torch.compile's, the fit and the plot are written."""
    import subprocess
    import sys

    # Every kind of method once (compiled, a peer that may be missing, mst); HF eager (+ GC),
    # the auto_chunker and mst without GC differ from these only in a flag.
    methods = ["compile_gc", "cce_gc", "mst_gc"]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_train.py"), "--quick",
                          "--methods", *methods, "--out", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    bench = load("bench_train")
    rows = bench.read_csv([str(tmp_path / "results_train_tiny.csv")])
    by = {(r["method"], r["tokens"]): r for r in rows}
    assert {m for m, _ in by} == set(methods), out
    for method in ("compile_gc", "mst_gc"):
        for tokens in (128, 256):
            assert by[(method, tokens)]["peak_gb"] >= 0 and by[(method, tokens)]["ms"] > 0, by[(method, tokens)]
    for method in ("mst_gc",):
        for tokens in (128, 256):
            row = by[(method, tokens)]
            assert abs(row["loss"] - by[("compile_gc", tokens)]["loss"]) < 1e-4, row
            assert "mlp x2" in row["rewrites"] and "lm_head x1" in row["rewrites"], row
    assert "longest sequence within" in out
    assert (tmp_path / "train_tiny.png").stat().st_size > 1000


def test_bench_train_varying_quick(tmp_path):
    """--varying: one process, several lengths; the graph after the second length is
    symbolic and keeps every rewrite, and the rows say so."""
    import subprocess
    import sys

    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_train.py"), "--quick",
                    "--methods", "mst_gc", "--varying", "4", "--out", str(tmp_path)],
                   capture_output=True, text=True, check=True)
    rows = load("bench_train").read_csv([str(tmp_path / "results_train_tiny.csv")])
    assert all(r["kind"] == "varying" for r in rows) and len({r["step"] for r in rows}) == 4, rows
    last = max(rows, key=lambda r: int(r["step"]))
    assert last["rewrites"].endswith("symbolic graph") and "mlp x2" in last["rewrites"], last
    assert "lm_head x1" in last["rewrites"] and last["graphs"] == "2", last


@pytest.mark.parametrize("name", sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(BENCH, "*.py"))))
def test_bench_scripts_import(name):
    """Every script, the GPU-only ones included, imports (common.py, bench_train, mst_fx)."""
    load(name)


def test_bench_common_rows(tmp_path):
    """The child-process row runner reads ``RESULT`` lines back and names a failure; the CSV
    has every key of the rows in the order first seen, a missing value empty, a list as JSON."""
    common = load("common")
    ok = "import json; print('RESULT ' + json.dumps({'a': 1})); print('other output')"
    assert common.run_rows([sys.executable, "-c", ok]) == ([{"a": 1}], None)
    oom = "import sys; sys.stderr.write('torch.OutOfMemoryError: CUDA out of memory'); sys.exit(1)"
    assert common.run_row([sys.executable, "-c", oom], {"a": None}, "note") == {"a": None, "note": "OOM"}
    assert common.run_rows([sys.executable, "-c", "raise ValueError('boom')"]) == ([], "ValueError: boom")
    path = tmp_path / "new" / "rows.csv"
    common.write_csv([{"a": 1, "b": [1, "x"]}, {"a": 2, "c": 3}], str(path))
    with open(path, newline="") as f:
        assert list(csv.DictReader(f)) == [{"a": "1", "b": '[1, "x"]', "c": ""}, {"a": "2", "b": "", "c": "3"}]
