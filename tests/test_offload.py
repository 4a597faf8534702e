"""MSTConfig.offload: the saved tensors chosen are exactly the checkpoint boundaries (and
those over the size floor), counted and in bytes; values and every gradient equal eager's,
with the MLP / head / attention rewrites, under HF gradient checkpointing and
torch.utils.checkpoint in user code, at varying lengths; a step the host cannot take
fails before copying anything; explain() lists the plan; the forward's copy is started
where its tensor is computed, not where it is last read. On the CPU the copies are plain
copies (tests/test_offload_gpu.py checks the side stream on CUDA)."""

import re

import pytest
import torch
from blocks import Stack
from torch._inductor.utils import fresh_inductor_cache, run_and_get_code

import mst_fx
from mst_fx.passes.partition import host_memory, transfer


def llama(layers=3, hidden=64):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2)).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def eager_grads(model, **batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return loss.detach(), grads


def assert_grads(model, ref):
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-6, msg=n)


def moved(report):
    return [s for s in report.offload if s.offloaded]


def test_checkpointed_llama_offloads_each_layer_input():
    """HF Llama, 3 layers, GC: the inputs of layers 1 and 2 ([1, 512, 64] fp32, 128 KiB
    each) are offloaded and nothing else (layer 0's input, the embedding, is recomputed from
    the ids); one copy out and one back per tensor a step; loss and every gradient equal
    eager's with the MLPs and attention rewritten. In the forward Inductor generates, each
    copy is started where its tensor is computed and waited for after the next layer's
    GEMMs (Inductor's reordering for peak memory, which moved it down to the wait, is off
    for these graphs)."""
    model = llama()
    ids = torch.randint(0, 96, (1, 512))
    ref_loss, ref = eager_grads(model, input_ids=ids, labels=ids)
    backend = mst_fx.make_backend(offload=True, min_chunk_tokens=64, logits="drop")
    compiled = torch.compile(model, backend=backend)
    with fresh_inductor_cache():
        before = dict(transfer.STATS)
        loss, codes = run_and_get_code(lambda: compiled(input_ids=ids, labels=ids).loss)
        loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert_grads(model, ref)
    report = backend.report
    assert {r.kind for r in report.regions if r.applied} >= {"mlp", "attention"}
    assert [(s.boundary, s.nbytes) for s in moved(report)] == [(True, 512 * 64 * 4)] * 2
    assert transfer.STATS["offloaded"] - before["offloaded"] == 2
    assert transfer.STATS["reloaded"] - before["reloaded"] == 2
    assert transfer.STATS["offloaded_bytes"] - before["offloaded_bytes"] == 2 * 512 * 64 * 4

    lines = next(c for c in codes if "mst_fx.offload.default" in c).splitlines()
    for name in re.findall(r"mst_fx\.offload\.default\((buf\d+)\)", "\n".join(lines)):
        made = next(i for i, line in enumerate(lines) if re.search(rf"\b{name}\b", line))
        start = next(i for i, line in enumerate(lines) if f"mst_fx.offload.default({name})" in line)
        wait = next(i for i, line in enumerate(lines) if re.search(rf"transfer_wait\.default\(\w+, {name}\)", line))
        assert "extern_kernels.mm(" not in "\n".join(lines[made:start]), "\n".join(lines[made:start])
        assert "\n".join(lines[start:wait]).count("extern_kernels.mm(") >= 3


def test_user_checkpoint_and_size_floor():
    """torch.utils.checkpoint in user code (3 checkpointed layers): the 3 layer inputs are
    boundaries (the first is the graph's input, kept by its caller: 2 offloaded); with no
    checkpoints and offload_min_bytes=0 every saved tensor the copies can take is offloaded
    (the MLP's intermediates, unchunked here), and the gradients are still exact."""
    torch.manual_seed(0)
    for checkpointed, floor, expect in ((True, 2**30, 2), (False, 0, None)):
        model = Stack(layers=3, checkpointed=checkpointed)
        x = torch.randn(2, 256, 32, requires_grad=True)
        model(x).square().mean().backward()
        ref = {n: p.grad.clone() for n, p in model.named_parameters()}
        ref_x = x.grad.clone()
        model.zero_grad()
        x.grad = None
        torch._dynamo.reset()
        backend = mst_fx.make_backend(offload=True, offload_min_bytes=floor, passes=())
        with fresh_inductor_cache():
            torch.compile(model, backend=backend)(x).square().mean().backward()
        assert_grads(model, ref)
        torch.testing.assert_close(x.grad, ref_x, rtol=1e-5, atol=1e-6)
        chosen = moved(backend.report)
        if expect is not None:
            assert len(chosen) == expect and all(s.boundary for s in chosen)
        else:
            assert len(chosen) >= 6 and not any(s.boundary for s in chosen)
            assert all(s.reason for s in backend.report.offload if not s.offloaded)


def test_varying_lengths_keep_offloading():
    """Two lengths in one process (dynamic=None): two decoder graphs, the second symbolic; each
    step offloads the second layer's input at its own size; gradients equal eager's."""
    model = llama(layers=2)
    backend = mst_fx.make_backend(offload=True, min_chunk_tokens=64, logits="drop")
    compiled = torch.compile(model, backend=backend)
    with fresh_inductor_cache():
        for tokens in (256, 384):
            ids = torch.randint(0, 96, (1, tokens))
            _, ref = eager_grads(model, input_ids=ids, labels=ids)
            before = dict(transfer.STATS)
            compiled(input_ids=ids, labels=ids).loss.backward()
            assert_grads(model, ref)
            model.zero_grad()
            assert transfer.STATS["offloaded"] - before["offloaded"] == 1
            assert transfer.STATS["offloaded_bytes"] - before["offloaded_bytes"] == tokens * 64 * 4
    decoder = [r for r in backend.reports if moved(r)]  # the model's graph (the loss is another)
    assert len(decoder) == 2 and not decoder[0].symbols and decoder[1].symbols
    symbolic = moved(decoder[1])
    assert len(symbolic) == 1 and all(re.search(r"s\d+", s.size) for s in symbolic)


def test_host_too_small_fails_before_copying(monkeypatch):
    """A step whose offloaded tensors do not fit in free host memory raises, naming the
    figures and the way out, before the first copy."""
    model = llama(layers=2)
    ids = torch.randint(0, 96, (1, 512))
    monkeypatch.setattr(host_memory, "available_bytes", lambda: host_memory.MARGIN + 1000)
    compiled = torch.compile(model, backend=mst_fx.make_backend(offload=True, min_chunk_tokens=64))
    before = transfer.STATS["offloaded"]
    with fresh_inductor_cache(), pytest.raises(RuntimeError, match=r"mst_fx offload: .*offload=False"):
        compiled(input_ids=ids, labels=ids)
    assert transfer.STATS["offloaded"] == before


def test_explain_lists_the_plan():
    model = llama(layers=3)
    ids = torch.randint(0, 96, (1, 512))
    text = str(mst_fx.explain(model, input_ids=ids, labels=ids,
                              config=mst_fx.MSTConfig(offload=True, min_chunk_tokens=64)))
    assert "offload to host: 2 of" in text and text.count("yes, checkpoint boundary") == 2
    assert "0.2 MiB a step" in text


def test_offload_config_is_validated():
    with pytest.raises(ValueError, match="offload"):
        mst_fx.MSTConfig(offload="yes")
    with pytest.raises(ValueError, match="offload_min_bytes"):
        mst_fx.MSTConfig(offload_min_bytes=-1)


def test_host_blocks_exact_sizes_reused_once_idle():
    """Host blocks are sized to their tensors (at most 1/8 over, whole pages), a block is
    taken again only once no tensor views it, and the need a step counts is the blocks it
    finds no idle one for; the host-short path releases only idle blocks the step does not
    take. (CUDA's page-locking is replaced by a record of the calls.)"""
    for n in (1, 4096, 5000, 2**20 + 1, int(2.5 * 2**30), 3 * 2**30 + 7):
        size = host_memory.block_size(n)
        assert n <= size <= max(4096, n + n // 8 + 4096) and size % 4096 == 0, n
    assert host_memory.block_size(int(2.5 * 2**30)) == int(2.5 * 2**30)  # torch's allocator: 4 GiB

    calls = []
    pool = host_memory.HostPool(register=lambda p, n: calls.append(("reg", n)),
                                unregister=lambda p, n: calls.append(("unreg", n)))
    mib = 2**20
    a = pool.take(5 * mib).view(torch.float32)
    a.fill_(1.0)
    b = pool.take(5 * mib)
    assert a.data_ptr() != b.data_ptr() and pool.held_bytes() == 10 * mib  # a is held
    assert host_memory.needed_bytes([5 * mib], pinned=True, pool=pool) == 5 * mib
    ptr = b.data_ptr()
    del b
    assert host_memory.needed_bytes([5 * mib, 5 * mib], pinned=True, pool=pool) == 5 * mib
    assert pool.take(5 * mib).data_ptr() == ptr and len(calls) == 2  # reused, not registered
    assert host_memory.needed_bytes([5 * mib] * 3, pinned=False) == 15 * mib

    pool.take(7 * mib)  # idle at once (its tensor is dropped)
    assert pool.release_idle(keep={host_memory.block_size(5 * mib): 1}) == 7 * mib
    assert calls[-1] == ("unreg", 7 * mib) and pool.held_bytes() == 10 * mib
    assert pool.release_idle() == 10 * mib - 5 * mib  # a still holds its block
    assert a.sum() == 5 * mib / 4
