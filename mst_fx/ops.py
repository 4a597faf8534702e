"""Two small in-place custom ops the chunk loops write into preallocated buffers with.

A functional graph would make every chunk's contribution a new full-size tensor: each
chunk's weight-gradient partial [V, H] and a running sum of them, or every chunk's logits
before one ``cat``. These ops mutate one buffer instead. In the graph they appear as
``auto_functionalized`` calls, which Inductor turns back into in-place calls on the
buffer (it is a graph intermediate that nothing else reads), so the buffer is the only
full-size tensor.

    mst_fx::addmm_into(acc, a, b)        acc += a @ b   (acc may be fp32 while a, b are bf16)
    mst_fx::write_rows(out, start, src)  out[start:start + len(src)] = src
"""

from __future__ import annotations

import torch


@torch.library.custom_op("mst_fx::addmm_into", mutates_args=("acc",))
def addmm_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        # cuBLAS accumulates bf16/fp16 products into the fp32 buffer in place.
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:  # no mixed-dtype addmm on CPU: the chunk's product is rounded once, summed in fp32
        acc.add_(torch.mm(a, b).to(acc.dtype))


@addmm_into.register_fake
def _addmm_into_fake(acc, a, b) -> None:
    return None


@torch.library.custom_op("mst_fx::write_rows", mutates_args=("out",))
def write_rows(out: torch.Tensor, start: int, src: torch.Tensor) -> None:
    out.narrow(0, start, src.shape[0]).copy_(src)


@write_rows.register_fake
def _write_rows_fake(out, start, src) -> None:
    return None
