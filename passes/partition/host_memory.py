"""Host memory for offloaded tensors: the page-locked buffers the copies go into (a pool of
exact-size blocks, kept across steps), and the check, before a step copies anything
(``mst_fx::reserve_host``), that the host has room for them, so that a step too long for
the host fails with a message instead of the kernel's OOM killer ending the process.

Blocks are anonymous memory mappings registered with CUDA (``cudaHostRegister``), each
sized to its tensor rounded up to one of eight steps between two powers of two (at most
1/8 over; torch's pinned-memory allocator rounds to the power of two, up to 2x, which made
the host, not the GPU, end the longest sequence). A block is idle once no tensor views it;
a later step takes an idle block of its size. The check counts the blocks this step cannot
find idle in the pool; if the host is short it first releases the idle blocks this step
does not take. What is free is the kernel's MemAvailable, lowered to the cgroup's limit
where the process runs in one (containers), less a margin for everything else.
"""

from __future__ import annotations

import mmap
import pathlib
from collections import Counter

import torch

MARGIN = 2 * 2**30  # bytes left to the rest of the process and the system
PAGE = 4096
DIVISIONS = 8  # steps between two powers of two a block size can take


def block_size(nbytes: int) -> int:
    """Bytes of the host block a tensor of ``nbytes`` gets: at least a page, rounded up to
    one of DIVISIONS steps between the powers of two around it (at most 1/DIVISIONS over)."""
    if nbytes <= 0:
        return 0
    n = max(int(nbytes), PAGE)
    step = max((1 << (n - 1).bit_length()) // (2 * DIVISIONS), PAGE)
    return -(-n // step) * step


def _cuda_register(ptr: int, nbytes: int) -> None:
    cudart = torch.cuda.cudart()
    torch.cuda.check_error(cudart.cudaHostRegister(ptr, nbytes, 1))  # 1: portable


def _cuda_unregister(ptr: int, nbytes: int) -> None:
    torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(ptr))


class _Block:
    """One mapping of ``size`` bytes; ``base`` views all of it."""

    def __init__(self, size: int, register):
        self.size = size
        self.mapping = mmap.mmap(-1, size)
        self.base = torch.frombuffer(self.mapping, dtype=torch.uint8)
        register(self.base.data_ptr(), size)
        self.storage = self.base.untyped_storage()
        self.idle_refs = self._refs()  # the references the block itself holds

    def _refs(self) -> int:
        return torch._C._storage_Use_Count(self.storage._cdata)

    def idle(self) -> bool:
        return self._refs() == self.idle_refs


class HostPool:
    """Page-locked host blocks for offloaded tensors, reused by later steps.
    ``register``/``unregister`` page-lock a range and undo it (CUDA's by default)."""

    def __init__(self, register=_cuda_register, unregister=_cuda_unregister):
        self.register = register
        self.unregister = unregister
        self.blocks: list[_Block] = []

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 host tensor of ``nbytes`` in an idle block of its size (a new one if none
        is idle). The block is the caller's while any view of the tensor lives."""
        size = block_size(nbytes)
        if size == 0:
            return torch.empty(0, dtype=torch.uint8)
        block = next((b for b in self.blocks if b.size == size and b.idle()), None)
        if block is None:
            block = _Block(size, self.register)
            self.blocks.append(block)
        return block.base[:nbytes]

    def idle_sizes(self) -> Counter:
        return Counter(b.size for b in self.blocks if b.idle())

    def held_bytes(self) -> int:
        return sum(b.size for b in self.blocks)

    def release_idle(self, keep: Counter | None = None) -> int:
        """Return to the system the idle blocks beyond ``keep`` (blocks by size a coming step
        takes); the bytes released."""
        keep = Counter(keep or {})
        kept, released = [], 0
        for block in self.blocks:
            if block.idle() and keep[block.size] <= 0:
                self.unregister(block.base.data_ptr(), block.size)
                released += block.size
                continue
            if block.idle():
                keep[block.size] -= 1
            kept.append(block)
        self.blocks = kept
        return released


POOL = HostPool()


def needed_bytes(sizes: list[int], pinned: bool, pool: HostPool | None = None) -> int:
    """New host bytes the tensors of ``sizes`` (bytes each) take as offloaded: pinned, the
    blocks of their sizes that ``pool`` (default: this process's) has no idle block for."""
    if not pinned:
        return sum(int(s) for s in sizes)
    idle = (POOL if pool is None else pool).idle_sizes()
    wanted = Counter(block_size(s) for s in sizes)
    return sum(size * max(n - idle[size], 0) for size, n in wanted.items())


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


def check_room(sizes: list[int], pinned: bool, pool: HostPool | None = None) -> None:
    """Raise RuntimeError if the host cannot take tensors of ``sizes`` bytes, after releasing
    the pool's idle blocks this step does not take if that is what it is short of."""
    pool = POOL if pool is None else pool
    need = needed_bytes(sizes, pinned, pool)
    free = available_bytes()
    if free is None or need <= free - MARGIN:
        return
    if pinned and pool.release_idle(keep=Counter(block_size(s) for s in sizes)):
        need, free = needed_bytes(sizes, pinned, pool), available_bytes()
        if free is None or need <= free - MARGIN:
            return
    total = sum(int(s) for s in sizes)
    raise RuntimeError(
        f"mst_fx offload: this step moves {len(sizes)} saved tensors ({total / 2**30:.2f} GiB) to "
        f"host memory and needs {need / 2**30:.2f} GiB more of it, but the host has "
        f"{free / 2**30:.2f} GiB free (keeping {MARGIN / 2**30:.0f} GiB for the rest). Train a "
        f"shorter sequence, free host memory, or set MSTConfig(offload=False).")
