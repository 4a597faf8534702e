"""The custom ops the offload pass (offload.py) puts into the forward and backward graphs:
copies of saved activations between device and host memory on a side stream, so the
compute stream goes on while they run.

    mst_fx::offload(x) -> host             start copying x into pinned host memory
    mst_fx::reload(host, device) -> x      start copying host back into a new device tensor
    mst_fx::transfer_wait(x, source) -> x  the compute stream waits until x's copy is done;
                                           ``source`` (the tensor copied from) stays alive
                                           until here, so its memory is not reused before
    mst_fx::reserve_host(sizes)            raise, before anything is copied, if host memory
                                           cannot take the graph's offloaded tensors (bytes)

On CUDA every copy runs on one transfer stream per device (D2H and H2D copies in the order
they were started), each after the compute stream's work so far (the tensor it reads is
complete), and records an event; ``transfer_wait`` makes the compute stream wait on it.
Host buffers are page-locked blocks of host_memory.POOL, sized to their tensors; a block is
taken again (by a later step) only after the tensor viewing it died, and its next copy runs
on the same transfer stream after the copy that read it last. Off CUDA (the CPU tests) the
copies are plain synchronous copies, with the same graph and the same values.

``transfer_wait`` returns its input (an alias), so the tensor's users depend on the wait
and run after it.
"""

from __future__ import annotations

import torch

from mst_fx.passes.partition import host_memory

_streams: dict[torch.device, torch.cuda.Stream] = {}
_events: dict[int, torch.cuda.Event] = {}  # data_ptr of a copy's destination -> its event
STATS = {"offloaded": 0, "reloaded": 0, "offloaded_bytes": 0}  # since import; tests read them


def transfer_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream of ``device`` that every offload and reload copy runs on."""
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device=device)
    return _streams[device]


def _copy_on_side_stream(dst: torch.Tensor, src: torch.Tensor, device: torch.device) -> None:
    stream = transfer_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        dst.copy_(src, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    _events[dst.data_ptr()] = event


@torch.library.custom_op("mst_fx::offload", mutates_args=())
def offload(x: torch.Tensor) -> torch.Tensor:
    STATS["offloaded"] += 1
    STATS["offloaded_bytes"] += x.numel() * x.element_size()
    if not x.is_cuda:
        return x.clone()
    host = host_memory.POOL.take(x.numel() * x.element_size()).view(x.dtype).view(x.shape)
    _copy_on_side_stream(host, x, x.device)
    return host


@offload.register_fake
def _offload_fake(x):
    return torch.empty(x.shape, dtype=x.dtype, device="cpu")


@torch.library.custom_op("mst_fx::reload", mutates_args=())
def reload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    STATS["reloaded"] += 1
    if device.type != "cuda":
        return host.to(device, copy=True)
    # Allocated on the compute stream, which owns it; the copy waits for the stream's work
    # so far (the allocator may have handed out memory that work still reads).
    x = torch.empty(host.shape, dtype=host.dtype, device=device)
    _copy_on_side_stream(x, host, device)
    return x


@reload.register_fake
def _reload_fake(host, device):
    return torch.empty(host.shape, dtype=host.dtype, device=device)


torch.library.define("mst_fx::transfer_wait", "(Tensor(a) x, Tensor source) -> Tensor(a)")


@torch.library.impl("mst_fx::transfer_wait", "CompositeExplicitAutograd")
def transfer_wait(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    event = _events.pop(x.data_ptr(), None)
    if event is not None:
        device = source.device if source.is_cuda else x.device
        torch.cuda.current_stream(device).wait_event(event)
    return x


@torch.library.register_fake("mst_fx::transfer_wait")
def _transfer_wait_fake(x, source):
    return x


@torch.library.custom_op("mst_fx::reserve_host", mutates_args=())
def reserve_host(sizes: list[int], pinned: bool) -> None:
    host_memory.check_room(sizes, pinned)


@reserve_host.register_fake
def _reserve_host_fake(sizes, pinned) -> None:
    return None


torch.fx.node.has_side_effect(torch.ops.mst_fx.transfer_wait.default)
torch.fx.node.has_side_effect(torch.ops.mst_fx.reserve_host.default)
