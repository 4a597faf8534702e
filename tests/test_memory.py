"""Peak memory after Inductor, measured with torch.profiler (profile_memory=True): the
rewrite must lower the peak of a real fwd+bwd step, with the default config."""

import torch

import mst_fx
from blocks import GLU
from mst_fx.memory import peak_bytes


def step_peak(backend, module, x):
    compiled = torch.compile(module, backend=backend)

    def step():
        compiled(x).sum().backward()

    step()  # compile and allocate .grad outside the measured step
    return peak_bytes(step)


def test_swiglu_peak_at_most_half_of_plain_compile():
    """SwiGLU H=512, I=2048, 16384 tokens: plain compile keeps gate and up for backward
    (2 x 128 MiB in fp32); chunked, only one chunk's intermediates exist at a time."""
    module = GLU(512, 2048)
    x = torch.randn(16384, 512, requires_grad=True)
    plain = step_peak("inductor", module, x)
    torch._dynamo.reset()
    backend = mst_fx.make_backend()
    chunked = step_peak(backend, module, x)
    assert backend.report.regions[0].chunks == 8  # default: 2 x 2048 / 512
    assert chunked <= 0.5 * plain, (chunked / 2**20, plain / 2**20)
    # The bound that chunking promises: fewer bytes than the saved gate + up of plain compile.
    assert chunked < 16384 * 2048 * 4 * 2
