"""Our own CPU kernels, compiled on first use and called through ctypes.

`attention(q, k, v)` is `F.scaled_dot_product_attention(q, k, v)` (no mask, no dropout) that runs
bf16 inference on Intel AMX through `amx_attention.cpp` when it can, and through PyTorch
otherwise. The kernel is a plain C++ file built with the system's g++ into
`~/.cache/ldmkit/kernels/` (a second or two, once per version of the file); without g++, AMX or
Linux, or with LDMKIT_AMX_ATTENTION=0 in the environment, every call goes to PyTorch.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cache import user_cache_dir
from ..cpu import cpu_flags

SOURCE = Path(__file__).with_name("amx_attention.cpp")
CPU_FLAGS = ("amx_tile", "amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags the kernel needs
COMPILE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-mfma", "-mavx512f", "-mavx512bw",
                 "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mamx-tile", "-mamx-bf16")
MAX_WIDTH = 64  # head widths the kernel takes (query/key and value; query/key even)
MIN_SCORES = 256 * 256  # below this many scores per head PyTorch's kernel is as fast: not worth a call

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False
_enabled = os.environ.get("LDMKIT_AMX_ATTENTION", "1") != "0"
_scratch = torch.empty(0, dtype=torch.uint8)  # the packed K and V, kept between calls: no page faults per call


def _build() -> Path:
    """The compiled kernel for this version of the source, built if missing (atomically)."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(COMPILE_FLAGS).encode()).hexdigest()[:16]
    target = user_cache_dir() / "kernels" / f"amx_attention-{digest}.so"
    if target.is_file():
        return target
    compiler = os.environ.get("CXX") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) found")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([compiler, *COMPILE_FLAGS, "-o", str(built), str(SOURCE)], check=True, capture_output=True)
        os.replace(built, target)  # another process may have raced us here: either file is the same
    return target


def _load() -> ctypes.CDLL | None:
    """The kernel library, or None where it cannot run (tried once per process)."""
    global _library, _tried
    if _tried:  # every attention call asks: no lock once the answer is known
        return _library
    with _lock:
        if _tried:
            return _library
        _tried = True
        if not cpu_flags().issuperset(CPU_FLAGS):
            return None
        try:
            lib = ctypes.CDLL(str(_build()))
        except (OSError, RuntimeError, subprocess.CalledProcessError):
            return None  # PyTorch's attention is always there and always right
        if lib.ldm_amx_init() != 0:  # Linux refused the AMX tile state
            return None
        lib.ldm_amx_scratch_bytes.restype = ctypes.c_long
        lib.ldm_amx_scratch_bytes.argtypes = [ctypes.c_int] * 5
        lib.ldm_amx_attention.restype = ctypes.c_int
        lib.ldm_amx_attention.argtypes = ([ctypes.c_void_p] * 5 + [ctypes.c_int] * 6
                                          + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int])
        _library = lib
        return lib


def amx_attention_available() -> bool:
    """Whether `attention` can use the AMX kernel in this process."""
    return _load() is not None


def set_amx_attention(enabled: bool) -> bool:
    """Let `attention` use the AMX kernel (where it can) or not; returns the previous setting.
    The benchmark times both; LDMKIT_AMX_ATTENTION=0 sets it off at start-up."""
    global _enabled
    previous, _enabled = _enabled, enabled
    return previous


def _eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.bfloat16
            and q.ndim == k.ndim == v.ndim == 4
            and q.shape[-1] <= MAX_WIDTH and q.shape[-1] % 2 == 0 and v.shape[-1] <= MAX_WIDTH
            and q.shape[2] * k.shape[2] >= MIN_SCORES
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q (B, H, N, d), k (B, H, M, d), v (B, H, M, dv) -> (B, H, N, dv).
    The AMX result is laid out as (B, N, H, dv) in memory, so `.transpose(1, 2)` of it is free."""
    global _scratch
    lib = _load() if _enabled and _eligible(q, k, v) else None
    if lib is None:
        return F.scaled_dot_product_attention(q, k, v)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    (b, h, n, d), m, dv = q.shape, k.shape[2], v.shape[-1]
    out = q.new_empty(b, n, h, dv).transpose(1, 2)  # (B, H, N, dv) view of (B, N, H, dv)
    strides = (ctypes.c_long * 12)(*(s for t in (q, k, v, out) for s in t.stride()[:3]))
    with _lock:
        if _scratch.numel() < (size := lib.ldm_amx_scratch_bytes(b, h, m, d, dv)):
            _scratch = torch.empty(size, dtype=torch.uint8)
        status = lib.ldm_amx_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), strides, b, h, n,
                                       m, d, dv, d ** -0.5, _scratch.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"amx_attention refused shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")
    return out
