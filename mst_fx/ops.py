"""Small custom ops of the chunk loops: two write into preallocated buffers in place, one
starts the head's weight-gradient accumulator, one attaches that gradient to the loss.

A functional graph would make every chunk's contribution a new full-size tensor: each
chunk's weight-gradient partial [V, H] and a running sum of them, or every chunk's logits
before one ``cat``. These ops mutate one buffer instead. In the graph they appear as
``auto_functionalized`` calls, which Inductor turns back into in-place calls on the
buffer (it is a graph intermediate that nothing else reads), so the buffer is the only
full-size tensor.

    mst_fx::addmm_into(acc, a, b)        acc += a @ b   (acc may be fp32 while a, b are bf16)
    mst_fx::write_rows(out, start, src)  out[start:start + len(src)] = src
    mst_fx::mm_acc(a, b, fp32)           a @ b as a new tensor, fp32 if asked (the first chunk)
    mst_fx::with_grad(loss, w, dw)       loss; its backward gives w the gradient g * dw
    mst_fx::embedding_dense_backward     torch's own kernel for an embedding's weight gradient

The accumulator starts as the first chunk's product rather than zeros: a zeros tensor of
the weight's shape and dtype is merged by AOTAutograd's CSE with the zeros that Inductor's
embedding backward starts from, which then kept it alive through the whole backward
(measured: 1.05 GB at V x H = 128256 x 2048 in fp32). with_grad states what backward
needs, ``dw`` in the weight's dtype, so that only it is kept from the forward.
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


@torch.library.custom_op("mst_fx::mm_acc", mutates_args=())
def mm_acc(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == a.dtype:
        return torch.mm(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=dtype)
    return torch.mm(a, b).to(dtype)


@mm_acc.register_fake
def _mm_acc_fake(a, b, dtype):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=dtype)


@torch.library.custom_op("mst_fx::with_grad", mutates_args=())
def with_grad(loss: torch.Tensor, w: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    return loss.clone()


@with_grad.register_fake
def _with_grad_fake(loss, w, dw):
    return torch.empty_like(loss)


def _with_grad_setup(ctx, inputs, output) -> None:
    _, w, dw = inputs
    ctx.save_for_backward(dw)
    ctx.w_dtype = w.dtype


def _with_grad_backward(ctx, g):
    (dw,) = ctx.saved_tensors
    # The incoming gradient (a scalar, e.g. 1/accumulation steps) multiplies in fp32.
    return g, (dw.float() * g.float()).to(ctx.w_dtype), None


with_grad.register_autograd(_with_grad_backward, setup_context=_with_grad_setup)


# Inductor decomposes an embedding's backward into zeros of the weight's shape in fp32 and
# an index_put into them, then a cast: for a bf16 weight a [V, H] fp32 buffer alive at the
# end of backward (1.05 GB for Llama-3.2-1B), twice the gradient itself. Behind a custom op
# Inductor calls this instead of generating its own kernels (see
# mst_fx.backend.inductor_decompositions). Both ways each row's contributions are summed in
# fp32 and rounded once to the weight's dtype.
@torch.library.custom_op("mst_fx::embedding_dense_backward", mutates_args=())
def embedding_dense_backward(grad: torch.Tensor, indices: torch.Tensor, num_weights: int,
                             padding_idx: int, scale_grad_by_freq: bool) -> torch.Tensor:
    if grad.is_cuda:
        # torch's CUDA kernel: sorts the indices, sums per row in fp32, writes grad's dtype.
        return torch.ops.aten.embedding_dense_backward(grad, indices, num_weights, padding_idx,
                                                        scale_grad_by_freq)
    # torch's CPU kernel sums bf16 rows in bf16; here: fp32 sums over the rows that occur.
    idx = indices.reshape(-1)
    g = grad.reshape(idx.numel(), -1).float()
    rows, inverse, counts = torch.unique(idx, return_inverse=True, return_counts=True)
    if scale_grad_by_freq:
        g = g / counts[inverse].unsqueeze(1)
    g = g * (idx != padding_idx).unsqueeze(1)
    sums = g.new_zeros((rows.numel(), g.shape[1])).index_add_(0, inverse, g)
    out = grad.new_zeros((num_weights, *grad.shape[indices.dim():]))
    out.view(num_weights, -1)[rows] = sums.to(grad.dtype)
    return out


@embedding_dense_backward.register_fake
def _embedding_dense_backward_fake(grad, indices, num_weights, padding_idx, scale_grad_by_freq):
    return grad.new_empty((num_weights, *grad.shape[indices.dim():]))
