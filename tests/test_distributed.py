"""mst_fx under DDP and FSDP2: 2 processes on gloo (loopback), each test a run of
tests/distributed/worker.py bounded by a timeout, so a hung collective fails the test.

Each run checks, on a small HF model: the global loss and every gradient equal the
unwrapped model's eager step on the whole batch (fp32); which rewrites applied on every
rank's graphs, and how many ran in the step; and that the step calls the same collectives,
as many times, as the step under plain torch.compile.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "distributed", "worker.py")
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(setup: str, tmp_path) -> dict:
    out = tmp_path / f"{setup}.json"
    proc = subprocess.Popen([sys.executable, WORKER, setup, str(_free_port()), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the ranks too: they are in its session
        log, _ = proc.communicate()
        pytest.fail(f"{setup}: no result in {TIMEOUT_S} s (a hung collective?)\n{log[-3000:]}")
    assert proc.returncode == 0, log[-3000:]
    return json.loads(out.read_text())


def check_exact(r: dict) -> None:
    assert r["loss_diff"] <= 1e-5, r["loss_diff"]
    worst = max(r["grad_diff"].values())
    assert len(r["grad_diff"]) >= 20 and worst <= 1e-5 * max(1.0, r["grad_scale"]), r["grad_diff"]
    assert r["calls"] == r["plain_calls"] and r["calls"], (r["calls"], r["plain_calls"])


def test_ddp_whole_graph_chunks_every_block(tmp_path):
    """optimize_ddp=False (the documented recipe): one graph, both MLPs and the head
    chunked; DDP's all-reduces are plain compile's."""
    r = run_worker("ddp_whole", tmp_path)
    check_exact(r)
    assert r["rewrites"] == {"mlp": 2, "lm_head": 1} and r["runs"] == r["rewrites"], r
    assert any("allreduce" in c for c in r["calls"]), r["calls"]


def test_ddp_bucket_split_names_its_cause(tmp_path):
    """Dynamo's default DDPOptimizer cuts the MLPs at bucket boundaries before mst_fx sees
    them: they stay unchanged, exact, and each skip says what cut it and the setting that
    gives mst_fx the whole graph."""
    r = run_worker("ddp", tmp_path)
    check_exact(r)
    assert r["rewrites"].get("mlp", 0) == 0 and r["rewrites"].get("lm_head") == 1, r["rewrites"]
    cut = [x for x in r["reasons"] if x.startswith("mlp:")]
    assert cut and all("optimize_ddp = False" in x for x in cut), r["reasons"]


def test_fsdp2_per_layer_chunks_with_the_layers_all_gather(tmp_path):
    """fully_shard per decoder layer and at the root: its hooks break the graph at every
    layer; each layer's MLP and the head are chunked, with no collective per chunk. The
    causal mask is built in the root's graph (the worker makes HF build it, as transformers
    5.17 does) and read back in each layer's graph: attention is rewritten there too."""
    r = run_worker("fsdp", tmp_path)
    check_exact(r)
    assert r["runs"] == {"mlp": 2, "lm_head": 1, "attention": 2}, (r["runs"], r["reasons"])
    assert any("allgather" in c for c in r["calls"]) and any("reduce_scatter" in c for c in r["calls"])


def test_fsdp2_with_gradient_checkpointing_qwen3(tmp_path):
    """FSDP2 + HF gradient checkpointing on Qwen3: one compiled layer graph serves both
    layers (counted once when compiled, twice in the step's runs)."""
    r = run_worker("fsdp_gc", tmp_path)
    check_exact(r)
    assert r["rewrites"] == {"mlp": 1, "lm_head": 1}, r["rewrites"]
    assert r["runs"] == {"mlp": 2, "lm_head": 1}, r["runs"]


def check_sequence_parallel(r: dict, layers: int, with_gc: bool) -> None:
    """Exact against the whole sequence in one process, and the all-to-alls are those of
    the attention calls (two each way a layer, two more per recompute), none per chunk."""
    assert r["loss_diff"] <= 1e-5, r["loss_diff"]
    worst = max(r["grad_diff"].values())
    assert len(r["grad_diff"]) >= 20 and worst <= 1e-5 * max(1.0, r["grad_scale"]), r["grad_diff"]
    assert r["runs"].get("sequence_parallel") == layers, r["runs"]
    assert r["calls"].get("c10d::alltoall_base_") == layers * (12 if with_gc else 8), r["calls"]


def test_sequence_parallel_qwen3_gc_ddp_symbolic(tmp_path):
    """Ulysses over 2 ranks, Qwen3 with HF gradient checkpointing under DDP on the same
    group, one symbolic graph serving two lengths: the causal mask HF builds is read back
    and made for the whole sequence; the MLPs are chunked per rank."""
    r = run_worker("sp", tmp_path)
    check_sequence_parallel(r, layers=2, with_gc=True)
    assert r["graphs"] <= 2 and r["runs"].get("mlp") == 2 and r["runs"].get("lm_head") == 1, r
    assert any("allreduce" in c for c in r["calls"]), r["calls"]


def test_sequence_parallel_llama_fsdp2_per_layer(tmp_path):
    """Ulysses with fully_shard per layer and at the root on the same 2 ranks, three
    lengths under the default dynamic=None (the measured step on the symbolic graphs):
    FSDP2's gathers and reduce-scatters stay one per layer, the causal mask HF builds in
    the root's graph is read back in each layer's graph (transformers 5.17's way, where it
    raised before), and every layer graph is chunked at the symbolic length too."""
    r = run_worker("sp_fsdp", tmp_path)
    check_sequence_parallel(r, layers=2, with_gc=False)
    assert not any("Inductor failed" in x for x in r["reasons"]), r["reasons"]
    assert r["runs"] == {"mlp": 2, "attention": 2, "sequence_parallel": 2, "lm_head": 1}, r["runs"]
    assert r["calls"].get("c10d::_reduce_scatter_base_", 0) <= 3, r["calls"]
