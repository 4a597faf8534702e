"""The benchmark scripts run end to end (tiny sizes, CPU) and report what they claim."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
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
