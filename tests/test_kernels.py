"""The chunk bodies are compiled by Inductor: C++ kernels on CPU, Triton kernels on GPU."""

import pytest
import torch
from blocks import GLU
from torch._inductor.utils import run_and_get_code

import mst_fx


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


def test_backward_stays_chunk_by_chunk():
    """Each add of the chunks' partial weight gradients runs right after the body that
    produced it (mst_fx.passes.post_grad.barriers), instead of in one fused kernel after the last chunk."""
    code = compiled_code("cpu")
    lines = [line.strip() for line in code.splitlines()]
    calls = [i for i, line in enumerate(lines) if line.startswith("# subgraph: partitioned_bw_mst_mlp")]
    barriers = [i for i, line in enumerate(lines) if line.startswith("# subgraph: mst_barrier")]
    assert len(calls) == 4 and len(barriers) == 3 * 3  # 3 weights, 3 adds each for 4 chunks
    bounds = [-1] + calls + [10**9]
    between = [sum(bounds[k] < i < bounds[k + 1] for i in barriers) for k in range(5)]
    # after chunk 0 nothing to add yet; after each later chunk, one add per weight
    assert between == [0, 0, 3, 3, 3], between


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
