"""Sequence parallelism (DeepSpeed-Ulysses): one sequence's tokens split across the ranks of
a process group, with attention run over the whole sequence for a share of the heads.

Each rank holds a contiguous piece of every sequence (rank r: tokens [r * s, (r + 1) * s)).
Everything token-wise (embeddings, norms, MLPs, the head and its loss) runs on the local
piece, chunked by mst_fx as in one process. Attention is the one place tokens meet: before
it, an all-to-all trades token pieces for head groups (each rank gets every token of H / P
heads); after it, a second all-to-all trades them back. The backend puts these around every
attention call of the graph (mst_fx.passes.graph.sequence_parallel); this module holds
what the rewritten graph calls and ``shard``, what the training loop calls.

    shard(group, input_ids, labels, position_ids=None, attention_mask=None) -> dict
        the rank's piece of a batch, as keyword arguments of a Hugging Face causal LM:
        global position ids, labels shifted over the whole sequence (``shift_labels``), and
        ``num_items_in_batch`` set so that the ranks' losses and gradients *average* to the
        whole sequence's (what DDP and FSDP2 do with the gradients).
    attention(q, k, v, ..., group=name): SDPA between the two all-to-alls.
    flex(q, k, v, ..., group=name): flex_attention between them (masks read back from the
        graph and built for the whole sequence).
    gather(x, dim, group=name): a per-token input of the graph (position ids, a padding
        mask) gathered along its token dim, for masks computed over the whole sequence.

The collectives are torch.distributed's functional ones, so AOTAutograd traces them into
the forward and backward graphs and Inductor schedules them; every backend torch's
functional collectives run on (NCCL, gloo) works.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100


def group_name(group) -> str:
    """The name of a process group given as a ProcessGroup, a 1-D DeviceMesh or a name."""
    if isinstance(group, str):
        return group
    if hasattr(group, "get_group"):  # a DeviceMesh
        if group.ndim != 1:
            raise ValueError(f"sequence_parallel: a DeviceMesh must be 1-D (the sequence dim), "
                             f"got {group.ndim} dims; pass mesh['<its sequence dim>']")
        group = group.get_group()
    if isinstance(group, dist.ProcessGroup):
        return group.group_name
    raise ValueError(f"sequence_parallel must be a ProcessGroup, a 1-D DeviceMesh or a group name, got {group!r}")


def _group(name: str) -> dist.ProcessGroup:
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def world(name: str) -> int:
    """The number of ranks of the named group."""
    return dist.get_world_size(_group(name))


def shard(group, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
          position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> dict:
    """This rank's piece of a batch of whole sequences ([batch, tokens] each), as keyword
    arguments for a Hugging Face causal LM's forward.

    The tokens must divide by the group's size (pad them first). Labels are shifted over
    the whole sequence before it is cut, so the last token of one piece predicts the first
    of the next. ``num_items_in_batch`` is the batch's count of labelled tokens over the
    group's size: each rank's loss is its tokens' summed loss times P over that count, so
    the mean of the ranks' losses is the whole batch's mean loss, and the mean of their
    gradients (DDP's and FSDP2's reduction over these ranks) is its gradient.
    """
    P = dist.get_world_size(_group(group_name(group)))
    r = dist.get_rank(_group(group_name(group)))
    S = input_ids.shape[-1]
    if S % P:
        raise ValueError(f"shard: {S} tokens do not divide over {P} ranks; pad the batch to a multiple of {P}")
    s = S // P
    piece = slice(r * s, (r + 1) * s)
    if position_ids is None:
        position_ids = torch.arange(S, device=input_ids.device).expand_as(input_ids)
    out = {"input_ids": input_ids[..., piece].contiguous(), "position_ids": position_ids[..., piece].contiguous()}
    if attention_mask is not None:
        out["attention_mask"] = attention_mask[..., piece].contiguous()
    if labels is not None:  # contiguous: HF's loss views them flat
        shifted = F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
        count = (shifted != IGNORE_INDEX).sum()
        out["labels"] = out["shift_labels"] = shifted[..., piece].contiguous()
        out["num_items_in_batch"] = count.to(torch.float32) / P
    return out


def _heads_to_ranks(x: torch.Tensor, P: int, name: str) -> torch.Tensor:
    """[B, H, s, D] (local tokens, all heads) -> [B, H / P, P * s, D] (all tokens, this
    rank's heads)."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    B, H, s, D = x.shape
    x = x.reshape(B, P, H // P, s, D).permute(1, 0, 2, 3, 4).contiguous()
    x = all_to_all_single_autograd(x, None, None, name)  # dim 0: the source rank's token piece
    return x.permute(1, 2, 0, 3, 4).reshape(B, H // P, P * s, D)


def _ranks_to_heads(x: torch.Tensor, P: int, name: str) -> torch.Tensor:
    """The inverse of _heads_to_ranks: [B, H / P, P * s, D] -> [B, H, s, D]."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    B, h, S, D = x.shape
    x = x.reshape(B, h, P, S // P, D).permute(2, 0, 1, 3, 4).contiguous()
    x = all_to_all_single_autograd(x, None, None, name)  # dim 0: the source rank's head group
    return x.permute(1, 0, 2, 3, 4).reshape(B, P * h, S // P, D)


def _kv_heads(k: torch.Tensor, v: torch.Tensor, q_heads: int, P: int) -> tuple:
    """Keys and values with a head count the ranks can split in step with the queries':
    unchanged when it divides by P, else repeated to the queries' count."""
    if k.shape[1] % P == 0:
        return k, v
    n = q_heads // k.shape[1]
    return k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)


def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False, *, group: str):
    """scaled_dot_product_attention over the whole sequence of the group's ranks; q, k, v
    are this rank's tokens ([B, H, s, D]), ``attn_mask`` (if any) is the whole sequence's
    ([B or 1, 1, P * s, P * s]). Returns this rank's tokens of the output."""
    P = world(group)
    k, v = _kv_heads(k, v, q.shape[1], P)
    q, k, v = (_heads_to_ranks(x, P, group) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                         is_causal=is_causal, scale=scale,
                                         enable_gqa=enable_gqa or k.shape[1] != q.shape[1])
    return _ranks_to_heads(out, P, group)


def flex(q, k, v, mask_mod, layout: tuple, scale, n_parts: int, *tensors, group: str, score_mod=None):
    """mst_fx's flex_attention call (passes.graph.attention.flex.attention) over the whole
    sequence: the block mask in ``tensors`` is the whole sequence's."""
    from mst_fx.passes.graph.attention import flex as flex_call

    P = world(group)
    k, v = _kv_heads(k, v, q.shape[1], P)
    q, k, v = (_heads_to_ranks(x, P, group) for x in (q, k, v))
    out = flex_call.attention(q, k, v, mask_mod, layout, scale, n_parts, *tensors, score_mod=score_mod)
    return _ranks_to_heads(out, P, group)


def gather(x: torch.Tensor, dim: int, *, group: str) -> torch.Tensor:
    """A per-token tensor of every rank, concatenated along its token dim (no gradient: the
    masks' inputs are ids and flags)."""
    from torch.distributed._functional_collectives import all_gather_tensor

    return all_gather_tensor(x.detach().contiguous(), dim, group)


def dense_mask(mask_mod, B: int, S: int, device, *buffers) -> torch.Tensor:
    """The boolean [B, 1, S, S] mask of ``mask_mod(b, h, q, kv, *buffers)`` over the whole
    sequence (where flex_attention is not used: on CPU by default)."""
    from torch.nn.attention.flex_attention import create_mask

    return create_mask(lambda b, h, q, kv: mask_mod(b, h, q, kv, *buffers), B, 1, S, S, device=device)
