"""Sequence parallelism's single-process parts: ``shard``'s arithmetic (the ranks' losses
average to the whole sequence's), the config's group argument, the graphs the pass refuses
(with the reason), and the rewrite on a one-rank gloo group against eager (exact; the
two-rank runs are in test_distributed.py)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from helpers import check_rewrite
from transformers.loss.loss_utils import ForCausalLMLoss

import mst_fx
from mst_fx import sequence_parallel as sp


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    """A one-rank gloo group (a file store: no port)."""
    store = dist.FileStore(str(tmp_path_factory.mktemp("sp") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_shard_pieces_average_to_the_whole_sequence(monkeypatch, group):
    """Over 4 pretended ranks: the pieces tile the sequence, each piece's labels are the
    whole sequence's shifted ones, and the mean of the ranks' HF losses is the whole loss."""
    torch.manual_seed(0)
    P, V = 4, 11
    ids = torch.randint(0, V, (2, 16))
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt left out of the loss
    logits = torch.randn(2, 16, V)
    whole = ForCausalLMLoss(logits, labels, V)
    monkeypatch.setattr(dist, "get_world_size", lambda g=None: P)
    losses, pieces = [], []
    for r in range(P):
        monkeypatch.setattr(dist, "get_rank", lambda g=None, r=r: r)
        b = sp.shard(group, ids, labels)
        pieces.append(b["input_ids"])
        assert b["position_ids"][0].tolist() == list(range(4 * r, 4 * r + 4))
        s = slice(4 * r, 4 * r + 4)
        losses.append(ForCausalLMLoss(logits[:, s].contiguous(), None, V, shift_labels=b["shift_labels"],
                                      num_items_in_batch=b["num_items_in_batch"]))
    assert torch.equal(torch.cat(pieces, -1), ids)
    torch.testing.assert_close(torch.stack(losses).mean(), whole)
    with pytest.raises(ValueError, match="do not divide"):
        sp.shard(group, ids[:, :15], labels[:, :15])


def test_config_takes_a_group_and_stores_its_name(group):
    cfg = mst_fx.MSTConfig(sequence_parallel=group)
    assert cfg.sequence_parallel == group.group_name
    assert mst_fx.MSTConfig(sequence_parallel=cfg.sequence_parallel) == cfg
    with pytest.raises(ValueError, match="ProcessGroup"):
        mst_fx.MSTConfig(sequence_parallel=2)


def _compile(fn, group, *args):
    torch._dynamo.reset()
    backend = mst_fx.make_backend(sequence_parallel=group)
    return torch.compile(fn, backend=backend, fullgraph=True)(*args)


def test_refuses_a_mask_given_as_graph_input(group):
    """Computed outside the graph, the mask is this rank's alone: the compile says so
    instead of running attention over the wrong tokens."""
    q = torch.randn(1, 2, 8, 4)
    mask = torch.ones(8, 8, dtype=torch.bool).tril()
    with pytest.raises(Exception, match="mask is an input of this graph"):
        _compile(lambda q, m: F.scaled_dot_product_attention(q, q, q, attn_mask=m), group, q, mask)


def test_refuses_written_out_attention(group):
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(Exception, match="mixes tokens outside scaled_dot_product_attention"):
        _compile(lambda q: (q @ q.transpose(-1, -2)).softmax(-1) @ q, group, q)


def _llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa"))


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "left_padding"])
def test_one_rank_llama_exact(group, padded):
    """The rewritten graph on one rank, against eager: causal attention moves as it is; a
    padding mask is read back, its input gathered and the mask built for the whole sequence."""
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded:
        mask[:, :5] = 0
    batch = sp.shard(group, ids, ids, attention_mask=mask if padded else None)
    backend = check_rewrite(_llama(), [], kwargs=batch, expect=None,
                            config=mst_fx.MSTConfig(chunks=4, min_chunk_tokens=1, sequence_parallel=group))
    applied = [r for r in backend.report.regions if r.applied]
    assert sorted(r.kind for r in applied) == ["lm_head", "mlp", "mlp", "sequence_parallel", "sequence_parallel"]
    detail = {r.detail for r in applied if r.kind == "sequence_parallel"}
    assert detail == {"all-to-all over 1 ranks; " + ("mask built for the whole sequence (boolean)" if padded
                                                     else "causal")}, detail
