"""How much host memory an offloading step needs and whether the host has it, checked
before the step copies anything (``mst_fx::reserve_host``), so that a step too long for the
host fails with a message instead of the kernel's OOM killer ending the process.

The need is the offloaded tensors' bytes as torch's pinned-memory allocator hands them out
(each rounded up to a power of two), less the blocks earlier steps' offloads left in that
allocator's cache (which the kernel counts as used memory). What is free is the kernel's
MemAvailable, lowered to the cgroup's limit where the process runs in one (containers),
less a margin for everything else.
"""

from __future__ import annotations

import pathlib
from collections import Counter

MARGIN = 2 * 2**30  # bytes left to the rest of the process and the system


def pinned_size(nbytes: int) -> int:
    """The bytes the pinned-memory allocator reserves for a request of ``nbytes``."""
    return 1 << max(int(nbytes) - 1, 0).bit_length() if nbytes > 0 else 0


# Pinned blocks earlier steps' offloads made, by size: torch's allocator keeps them cached
# for this process, so a later step of the same sizes takes no new host memory (and the
# kernel counts them as used, not available). A lower bound: every count is the most
# blocks of that size one step held at once (all of a step's offloads are alive together
# between its forward and its backward).
_cached_blocks: Counter = Counter()


def needed_bytes(sizes: list[int], pinned: bool, cached: Counter | None = None) -> int:
    """New host bytes the tensors of ``sizes`` (bytes each) take as offloaded: pinned, each
    a power-of-two block, less the blocks ``cached`` (default: this process's) already holds."""
    if not pinned:
        return sum(int(s) for s in sizes)
    cached = _cached_blocks if cached is None else cached
    wanted = Counter(pinned_size(s) for s in sizes)
    return sum(size * max(n - cached[size], 0) for size, n in wanted.items())


def record_blocks(sizes: list[int], cached: Counter | None = None) -> None:
    """Note the pinned blocks a step of ``sizes`` leaves in torch's cache."""
    cached = _cached_blocks if cached is None else cached
    for size, n in Counter(pinned_size(s) for s in sizes).items():
        cached[size] = max(cached[size], n)


def available_bytes() -> int | None:
    """Free host memory in bytes (None where it cannot be read)."""
    free = None
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        limit = pathlib.Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(pathlib.Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max" and free is not None:
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def check_room(sizes: list[int], pinned: bool) -> None:
    """Raise RuntimeError if the host cannot take tensors of ``sizes`` bytes."""
    need = needed_bytes(sizes, pinned)
    free = available_bytes()
    if free is None or need <= free - MARGIN:
        if pinned:
            record_blocks(sizes)
        return
    total = sum(int(s) for s in sizes)
    raise RuntimeError(
        f"mst_fx offload: this step moves {len(sizes)} saved tensors ({total / 2**30:.2f} GiB) to "
        f"host memory and needs {need / 2**30:.2f} GiB more of it, but the host has "
        f"{free / 2**30:.2f} GiB free (keeping {MARGIN / 2**30:.0f} GiB for the rest). Train a "
        f"shorter sequence, free host memory, or set MSTConfig(offload=False).")
