"""MSTConfig.offload on CUDA (skipped without a GPU): the copies to and from pinned host
memory run on a side stream while the compute stream runs kernels, the host blocks are
page-locked, sized to their tensors and reused by the next step, and the step's loss and
gradients equal the same step without offload."""

import pytest
import torch
from torch._inductor.utils import fresh_inductor_cache

import mst_fx
from mst_fx.passes.partition import host_memory

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4)).cuda().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _step(model, backend, ids):
    torch._dynamo.reset()
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend=backend)
    compiled(input_ids=ids, labels=ids).loss.backward()  # compiles
    model.zero_grad(set_to_none=True)
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, compiled


def test_copies_overlap_compute_and_gradients_are_unchanged():
    model = _model()
    ids = torch.randint(0, 1024, (1, 16384), device="cuda")
    loss, grads, _ = _step(model, mst_fx.make_backend(logits="drop"), ids)
    backend = mst_fx.make_backend(logits="drop", offload=True)
    with fresh_inductor_cache():  # the plan is derived where the graph is partitioned
        got_loss, got, compiled = _step(model, backend, ids)
    layer_inputs = [s for s in backend.report.offload if s.offloaded and s.nbytes == 16384 * 512 * 4]
    assert len(layer_inputs) == 3 and all(s.boundary for s in layer_inputs)  # layers 1-3's
    torch.testing.assert_close(got_loss, loss, rtol=1e-5, atol=1e-5)
    for n in grads:
        torch.testing.assert_close(got[n], grads[n], rtol=1e-4, atol=1e-5, msg=n)

    offloaded = sum(s.nbytes for r in backend.reports for s in r.offload if s.offloaded)
    held = host_memory.POOL.held_bytes()
    assert offloaded <= held <= offloaded * 9 // 8 + 4096 * 16, (held, offloaded)
    assert all(b.idle() for b in host_memory.POOL.blocks)  # the backward let them go
    block = host_memory.POOL.take(layer_inputs[0].nbytes)
    assert block.is_pinned() and host_memory.POOL.held_bytes() == held  # reused, registered
    del block
    compiled(input_ids=ids, labels=ids).loss.backward()
    assert host_memory.POOL.held_bytes() == held  # the next step takes the same blocks

    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        compiled(input_ids=ids, labels=ids).loss.backward()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.load(open(f.name))["traceEvents"]
    gpu = [e for e in trace if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy")]
    copies = [e for e in gpu if e["cat"] == "gpu_memcpy" and ("DtoH" in e["name"] or "HtoD" in e["name"])
              and e["dur"] > 20]
    kernels = [e for e in gpu if e["cat"] == "kernel"]
    assert len(copies) >= 6, [e["name"] for e in copies]  # 3 out, 3 back
    copy_streams = {e["args"].get("stream") for e in copies}
    compute_streams = {e["args"].get("stream") for e in kernels}
    assert not copy_streams & compute_streams, (copy_streams, compute_streams)

    def overlaps(a, b):
        return a["ts"] < b["ts"] + b["dur"] and b["ts"] < a["ts"] + a["dur"]

    overlapped = sum(any(overlaps(c, k) for k in kernels) for c in copies)
    print(f"{len(copies)} copies on streams {copy_streams}, compute on {compute_streams}, "
          f"{overlapped} overlap a kernel")
    assert overlapped >= len(copies) // 2, (overlapped, len(copies))
