"""Process-level settings that make PyTorch faster on a CPU, and what the CPU can do.

`cpu_flags()` reads the CPU feature flags that decide the fast paths: `native_bf16()` is true on
CPUs with AMX or AVX-512-bf16, where a bf16 matmul runs several times faster than float32 (Intel
Xeons since Cooper Lake / Sapphire Rapids); AVX2-only CPUs (the AMD EPYCs of our pool) emulate it.
Training (`--precision auto`) and decoding (`--dtype auto`) both decide from these.

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
from functools import lru_cache
from pathlib import Path

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


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags that matter for speed (Linux /proc/cpuinfo; empty elsewhere)."""
    wanted = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni", "avx_vnni"}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(wanted & set(line.split(":", 1)[1].split()))
    return frozenset()


def can_compile(device_type: str = "cpu") -> bool:
    """Whether torch.compile can build kernels here: on a CPU, inductor compiles C++ (g++ or clang++,
    or the compiler $CXX names); on CUDA it needs Triton, which the CUDA wheels ship."""
    if device_type == "cuda":
        return True
    import shutil

    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++") if c)


def native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU multiplies bf16 natively (AMX or AVX-512-bf16)."""
    flags = cpu_flags() if flags is None else flags
    return bool({"amx_bf16", "avx512_bf16"} & flags)


def available_memory() -> int | None:
    """Bytes of memory a new allocation can have now (Linux MemAvailable; None where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
