"""What this CPU can do, as Linux reports it, and how glibc's malloc should treat large blocks on it."""

from __future__ import annotations

import ctypes
from pathlib import Path


def cpu_flags() -> frozenset[str]:
    """The feature flags of /proc/cpuinfo (empty where there is none: not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    return frozenset(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")),
                          []))


# glibc's malloc serves a block above its mmap threshold (128 KiB at start, rising with the blocks
# freed to at most 32 MiB) by a fresh mmap and unmaps it when freed, so a tensor that size is page-
# faulted in afresh at every call that makes it. On a 2-core virtual machine (2026-12-06) that was a
# third of a bf16 SD VAE decode (1 s of system time in 2.2 s: 2 GB of faults) and 5-10% of a U-Net
# step. Keeping: such blocks come from the heap, which keeps what is freed for the next call.
_KEEP = (1 << 30, 1 << 31)  # M_MMAP_THRESHOLD (no fresh mapping below 1 GiB), M_TRIM_THRESHOLD (2 GiB)
_GLIBC_SETTLED = (32 << 20, 64 << 20)  # glibc's own two values once its dynamic threshold has risen to its cap
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(keep: bool = True) -> bool:
    """Tell glibc's malloc to keep freed large blocks for reuse instead of unmapping them (see the
    note above), or with keep=False to go back to its settled defaults and return what it kept to
    the system. Process-wide; `load_pipeline` does it for CPU pipelines. False where the C library
    is not glibc (nothing changed)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return False
    mmap_threshold, trim_threshold = _KEEP if keep else _GLIBC_SETTLED
    applied = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    if not keep:
        malloc_trim(0)
    return applied
