"""Compiled artifacts: a chunk body is compiled once per distinct shape (not per chunk or
per layer); a rewritten graph is stored in Inductor's FX graph cache and AOTAutograd's
cache, a second process with the same config hits both, and a changed config (or mst_fx
code) never reuses an artifact compiled for another rewrite."""

import json
import os
import re
import subprocess
import sys

import torch
from blocks import GLU
from torch._inductor.utils import run_and_get_code

import mst_fx
from mst_fx.identity import code_hash, rewrite_identity
from mst_fx.passes.post_grad.pipeline import PostGradPasses

# One training step of an MLP block and a vocabulary projection + loss, compiled with
# mst_fx in a fresh process; prints the cache counters, the rewrites and the largest
# difference from eager over the loss and every gradient.
STEP = """
import copy, json, sys
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
import mst_fx

class LM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up = torch.nn.Linear(32, 96, bias=False), torch.nn.Linear(32, 96, bias=False)
        self.down = torch.nn.Linear(96, 32, bias=False)
        self.head = torch.nn.Linear(32, 256, bias=False)

    def forward(self, x, labels):
        h = x + self.down(F.silu(self.gate(x)) * self.up(x))
        return F.cross_entropy(self.head(h).flatten(0, 1), labels.flatten())

torch.manual_seed(0)
eager = LM()
compiled = copy.deepcopy(eager)
x, labels = torch.randn(2, 64, 32), torch.randint(0, 256, (2, 64))
ref = eager(x, labels)
ref.backward()
got = torch.compile(compiled, backend=mst_fx.make_backend(chunks=int(sys.argv[1])))(x, labels)
got.backward()
diff = max([(got - ref).abs().item()] + [(a.grad - b.grad).abs().max().item()
            for a, b in zip(compiled.parameters(), eager.parameters())])
print(json.dumps({"aot": {k: v for k, v in counters["aot_autograd"].items() if "cache" in k},
                  "fx": {k: v for k, v in counters["inductor"].items() if "fxgraph_cache" in k},
                  "rewrites": dict(counters["mst_fx"]), "diff": diff}))
"""


def _step(cache_dir, chunks: int) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir), TORCHINDUCTOR_FX_GRAPH_CACHE="1",
               TORCHINDUCTOR_AUTOGRAD_CACHE="1")
    out = subprocess.run([sys.executable, "-c", STEP, str(chunks)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_hits_the_caches_and_a_new_config_does_not(tmp_path):
    first = _step(tmp_path, 4)
    assert first["rewrites"] == {"mlp": 1, "lm_head": 1}, first
    assert first["aot"].get("autograd_cache_saved") == 1 and "autograd_cache_bypass" not in first["aot"], first
    # The backend's decomposition table is part of the FX graph key: it must pickle.
    assert "fxgraph_cache_bypass" not in first["fx"], first
    assert first["diff"] < 1e-5, first

    again = _step(tmp_path, 4)
    assert again["aot"] == {"autograd_cache_hit": 1}, again
    assert again["rewrites"] == {"mlp": 1, "lm_head": 1} and again["diff"] < 1e-5, again

    other = _step(tmp_path, 2)
    assert "autograd_cache_hit" not in other["aot"] and other["aot"].get("autograd_cache_saved") == 1, other
    assert other["rewrites"] == {"mlp": 1, "lm_head": 1} and other["diff"] < 1e-5, other


def test_cache_key_names_the_config_and_the_code():
    a, b = mst_fx.MSTConfig(chunks=4), mst_fx.MSTConfig(chunks=8)
    assert rewrite_identity(a) == rewrite_identity(mst_fx.MSTConfig(chunks=4))
    assert rewrite_identity(a) != rewrite_identity(b)
    ua, ub = PostGradPasses(None, rewrite_identity(a)).uuid(), PostGradPasses(None, rewrite_identity(b)).uuid()
    assert ua != ub and code_hash() in ua


class TwoBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = GLU(32, 96), GLU(32, 96)

    def forward(self, x):
        return self.b(self.a(x) + x)


def test_body_compiled_once_per_shape():
    """128 tokens in 3 chunks (43, 43, 42 rows) are two shapes: two layers x 3 chunks still
    give one compiled forward and one backward body per shape, two of each, called 6 times."""
    shapes = 2
    model = torch.compile(TwoBlocks(), backend=mst_fx.make_backend(chunks=3, passes=("mlp",)))
    x = torch.randn(2, 64, 32, requires_grad=True)
    _, (forward, backward) = run_and_get_code(lambda: model(x).sum().backward())
    for code, prefix in ((forward, "partitioned_fw_mst_"), (backward, "partitioned_bw_mst_")):
        bodies = re.findall(rf"^def ({prefix}\w+)\(", code, re.M)
        assert len(bodies) == len(set(bodies)) == shapes, bodies
        assert code.count(f"# subgraph: {prefix}") == 2 * 3  # layers x chunks
