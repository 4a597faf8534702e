"""The calls the attention pass puts in a graph to run flex_attention with a mask_mod.

    block_mask(mask_mod, B, H, Q, KV, device, *buffers) -> tuple
        the BlockMask of mask_mod as a flat tuple (tensors, ints, flags), once per mask in
        the graph that computed the mask;
    attention(q, k, v, mask_mod, layout, scale, n_parts, *tensors, score_mod=None) -> out
        flex_attention over that block mask, where each SDPA call was.

Both are plain functions: AOTAutograd traces through them into aten ops and the
flex_attention higher-order op, which Inductor compiles into its flex kernels (Triton on
GPU, C++ on CPU), with its own backward. The BlockMask is built from ``mask_mod``
element by element, which Inductor fuses into one reduction per block: the S x S mask is
never stored.

Only tensors cross into activation-checkpointed bodies, so a block mask travels as its
tensors plus a ``layout`` (the tuple with each tensor replaced by TENSOR and a symbolic
sequence length by Q_LEN / KV_LEN, read again from the query and key where the mask is
used), worked out once at rewrite time on fake tensors.
"""

from __future__ import annotations

import importlib
import math

import torch
from torch._higher_order_ops.flex_attention import flex_attention as flex_attention_hop

_flex = importlib.import_module("torch.nn.attention.flex_attention")

TENSOR = "<tensor>"
Q_LEN, KV_LEN = "<q length>", "<kv length>"


def block_mask(mask_mod, B: int, H: int, Q: int, KV: int, device, *buffers) -> tuple:
    """The BlockMask of ``mask_mod(b, h, q, kv, *buffers)`` as a tuple, its mask_mod left out."""
    bm = _flex.create_block_mask(lambda b, h, q, kv: mask_mod(b, h, q, kv, *buffers),
                                 B, H, Q, KV, device=device, _compile=False)
    return tuple(bm.as_tuple()[:-1])


def layout(parts: tuple, q_len=None, kv_len=None) -> tuple:
    """``parts`` (a block_mask tuple) with its tensors replaced by TENSOR and its symbolic
    ints, which must be the query or key length, by Q_LEN / KV_LEN (ValueError otherwise)."""
    from mst_fx.passes.graph.tokenwise import same_size

    out = []
    for p in parts:
        if isinstance(p, torch.Tensor):
            out.append(TENSOR)
        elif isinstance(p, torch.SymInt):
            if q_len is not None and same_size(p, q_len):
                out.append(Q_LEN)
            elif kv_len is not None and same_size(p, kv_len):
                out.append(KV_LEN)
            else:
                raise ValueError(f"the block mask holds a symbolic size {p} that is not a sequence length")
        else:
            out.append(p)
    return tuple(out)


def attention(q, k, v, mask_mod, layout: tuple, scale: float | None, n_parts: int, *tensors,
              score_mod=None):
    """flex_attention(q, k, v) under the block mask whose tensors are ``tensors[:n_parts]``;
    ``tensors[n_parts:]`` are mask_mod's buffers; ``score_mod(score, b, h, q, kv)`` changes
    each scaled score (softcapping). Grouped-query attention when k and v have fewer heads
    than q, as scaled_dot_product_attention(enable_gqa=True)."""
    parts, buffers = iter(tensors[:n_parts]), tuple(tensors[n_parts:])
    lengths = {TENSOR: None, Q_LEN: q.shape[-2], KV_LEN: k.shape[-2]}
    block = tuple(p if not isinstance(p, str) or p not in lengths else
                  next(parts) if p == TENSOR else lengths[p] for p in layout) + (mask_mod,)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    options = _flex._apply_kernel_options(q, k, v, False, None)
    score_mod = score_mod if score_mod is not None else _flex._identity
    out = flex_attention_hop(q, k, v, score_mod, block, scale, options, (), buffers)
    return out[0]
