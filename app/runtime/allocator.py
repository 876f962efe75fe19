"""Keep freed memory for reuse on glibc: large CPU tensors then cost no page faults per step.

glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and gives it back to the kernel on ``free``. A training step of the 3D CNN allocates and
frees dozens of 30-60 MB activations, so each step pays for touching every page of them again:
on a 2-core EPYC a quarter of the step went into first-touch page faults (zero-fills, copies and
element-wise ops that ran at 1 GB/s). PyTorch's CUDA allocator caches its blocks; on the CPU the
same effect needs two ``mallopt`` settings: no ``mmap`` for large blocks (``M_MMAP_MAX`` = 0) and
no trimming of the heap's top (``M_TRIM_THRESHOLD``), so freed blocks are reused. The process
keeps its peak memory until it exits, which is what a training or inference process wants:
a float32 training step of the reference network at batch 2 went from over 100,000 page faults to
none and from 1.47 s to 1.21-1.27 s, for a peak RSS of about 930 MB instead of 755 MB (the
heap holds blocks that PyTorch's 64-byte-aligned requests cannot always reuse at once):
``python -m benchmarks.page_faults --precision fp32``, figures in the README.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

#: mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_applied = False


def glibc() -> ctypes.CDLL | None:
    """glibc's C library, or None where the process does not run on glibc (macOS, musl)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def reuse_freed_memory(enabled: bool = True) -> bool:
    """Make glibc keep freed blocks for reuse (see the module docstring); True when applied.

    Applies once per process; a no-op (False) with ``enabled=False`` or without glibc.
    """
    global _applied
    if not enabled:
        return False
    if _applied:
        return True
    libc = glibc()
    if libc is None:
        return False
    # 2**31 - 1: mallopt takes an int; the heap is then never trimmed below that much free space
    _applied = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied
