"""Process-level settings that make PyTorch faster on a CPU.

`keep_freed_memory()`: glibc's malloc serves large blocks (above 32 MB at most, often far less) with
fresh mmap()s and hands them back to the OS on free(), so every training step's large activations
and every MoE layer's gathered tokens land on new pages that the kernel must fault in and zero
before PyTorch writes them. Serving every block from the heap, and keeping freed memory there,
lets the next step reuse the same pages (what that gains for training steps, gathers and MoE layers
is measured in docs/benchmarks.md, "Memory reuse"). The price:
the process keeps its peak heap until it exits (PyTorch's CUDA allocator behaves the same way),
which is what a training or serving process wants. Intel's PyTorch CPU tuning guide reaches the
same end by preloading jemalloc or tcmalloc; this needs no extra library.

The `lmlab` command calls it at start (LMLAB_MALLOC=default turns it off); from Python, call it
yourself. It is a no-op returning False where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)
_applied = False


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse (see the module docstring). True when applied."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("LMLAB_MALLOC") == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied
