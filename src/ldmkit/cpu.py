"""What this CPU can do, as Linux reports it, and how glibc's malloc and PyTorch should get large blocks on it."""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path


AMX_FLAGS = frozenset({"amx_tile", "amx_bf16"})  # /proc/cpuinfo flags of Intel's AMX bf16 tiles


def cpu_flags() -> frozenset[str]:
    """The feature flags of /proc/cpuinfo (empty where there is none: not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    return frozenset(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")),
                          []))


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX bf16 tiles (Intel Sapphire Rapids and later)."""
    return cpu_flags().issuperset(AMX_FLAGS)


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


# PyTorch backs each CPU tensor of 2 MiB or more with transparent huge pages (2 MiB pages, where
# Linux lends them on request: THP "madvise" or "always") when THP_MEM_ALLOC_ENABLE=1 at its first
# allocation, which it reads once. A fresh page is then one fault per 2 MiB instead of 512: on the
# 2-core Sapphire Rapids (2026-12-07) the SD VAE decode inside a 20-step txt2img took 1.28-1.63
# against 1.84-2.46 s, and a fresh `ldmkit generate` 23.4-25.6 against 24.1-28.9 s, at a lower peak
# RSS (5.51-5.57 against 5.83-5.90 GB). Where the kernel lends no huge pages it changes nothing.
HUGE_PAGES_VARIABLE = "THP_MEM_ALLOC_ENABLE"


def linux_huge_page_mode() -> str:
    """Linux's transparent huge page mode: "always", "madvise" (on request, as PyTorch asks),
    "never", or "unknown" where there is no such setting."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    return text[text.index("[") + 1:text.index("]")] if "[" in text and "]" in text else "unknown"


def request_huge_pages() -> bool:
    """Ask PyTorch for huge pages (see the note above) unless the environment already says either
    way; `import ldmkit` does it. Only takes effect before torch is imported: returns whether it
    will, i.e. torch is not imported yet and the variable is 1."""
    if "torch" in sys.modules:
        return False
    os.environ.setdefault(HUGE_PAGES_VARIABLE, "1")
    return os.environ[HUGE_PAGES_VARIABLE] == "1"
