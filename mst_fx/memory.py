"""Peak memory of one call, on CPU (torch.profiler) or GPU (CUDA allocator statistics),
and the median time of a step (for the benchmarks).

CPU: the profiler records every allocation and free as a "[memory]" event with a byte
delta; the peak is the maximum of their running sum, i.e. the most bytes allocated at once
during the call beyond what was already allocated before it.
GPU: torch.cuda.max_memory_allocated over the call, minus what was allocated before it.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def peak_bytes(step: Callable[[], object], device: str = "cpu") -> int:
    """Extra bytes at the peak while ``step()`` runs (memory allocated before is not counted)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def median_ms(step: Callable[[], object], iters: int, device: str = "cpu") -> float:
    """Median wall time of ``step()`` in ms over ``iters`` calls (CUDA events on GPU)."""
    times = []
    for _ in range(iters):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
