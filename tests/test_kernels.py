"""The chunk bodies are compiled by Inductor: C++ kernels on CPU, Triton kernels on GPU."""

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import mst_fx
from blocks import GLU


def compiled_code(device):
    module = GLU(64, 256).to(device)
    x = torch.randn(4, 64, 64, device=device, requires_grad=True)
    compiled = torch.compile(module, backend=mst_fx.make_backend(chunks=4))

    def step():
        compiled(x).sum().backward()

    _, code = run_and_get_code(step)
    return "\n".join(code)


def body_source(code: str, prefix: str) -> str:
    """The generated Python function of the first chunk body whose name starts with prefix."""
    start = code.index(f"def {prefix}")
    end = code.find("\ndef ", start + 1)
    return code[start:end]


def test_weight_gradients_are_summed_chunk_by_chunk():
    """Each add of the chunks' partial weight gradients is its own barrier call, placed
    after the chunk that produced it (mst_fx.accumulate), not one fused kernel at the end."""
    code = compiled_code("cpu")
    lines = [l.strip() for l in code.splitlines()]
    calls = [i for i, l in enumerate(lines) if l.startswith("# subgraph: partitioned_bw_mst_mlp")]
    adds = [i for i, l in enumerate(lines) if l.startswith("# subgraph: mst_accumulate")]
    assert len(calls) == 4 and len(adds) == 3 * 3  # 3 weights, 3 adds each for 4 chunks
    for k in range(1, 4):  # the adds using chunk k's partials run before chunk k+1 starts
        before_next = [i for i in adds if calls[k] < i < (calls[k + 1] if k + 1 < 4 else 10**9)]
        assert len(before_next) == 3, (k, calls, adds)


def test_chunk_bodies_become_cpp_kernels():
    code = compiled_code("cpu")
    for prefix in ("partitioned_fw_mst_mlp", "partitioned_bw_mst_mlp"):
        assert "cpp_fused_" in body_source(code, prefix)  # silu(gate) * up: a generated C++ kernel


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_chunk_bodies_become_triton_kernels():
    code = compiled_code("cuda")
    for prefix in ("partitioned_fw_mst_mlp", "partitioned_bw_mst_mlp"):
        assert "triton_poi_fused_" in body_source(code, prefix)
    assert "@triton.jit" in code
