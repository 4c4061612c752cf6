"""Our own CPU kernels, compiled on first use and called through ctypes.

- `attention(q, k, v)` is `F.scaled_dot_product_attention(q, k, v)` (no mask, no dropout) that
  runs bf16 inference through `attention.cpp` when it can: its products on Intel AMX tiles where
  the CPU has them, else as AVX512-BF16 dot products (AMD Zen 4 and 5; not Intel's Cooper Lake,
  which lacks the AVX512-VBMI it also needs);
- `group_norm(x, norm, silu, shift)` is `norm(x + shift)`, then SiLU, in one pass over a bf16
  feature map on AVX-512 through `group_norm.cpp` when it can;
- `layer_norm(x, norm)` is `norm(x)` for an `nn.LayerNorm` over the last dimension, one read of
  each bf16 row on AVX-512 through `layer_norm.cpp` when it can;
- `conv3x3(x, tiles, bias, residual)` is a 3x3 convolution (stride 1, padding 1) of a bf16
  feature map plus its bias (and a residual) on AMX tiles through `conv.cpp`, for the weight-heavy
  convolutions `models.onednn.prepack` hands it (weights packed once by `pack_conv3x3_weight`);
- `upsample_conv3x3(x, tiles, bias)` is nearest 2x upsampling then such a 3x3 convolution, as the
  four output parities' 2x2 convolutions of x (4/9 of the multiply-adds) through the same
  `conv.cpp`, each written in place into the upsampled map (weights by `pack_parity_weight`);
- `geglu(x, tiles, bias)` is a GEGLU feed-forward projection, value * GELU(gate), as one GEMM on
  AMX tiles with the GELU and the product in its epilogue, through `conv.cpp` too (a linear layer
  is its convolution with one tap; weights packed once by `pack_geglu_weight`);
- `winograd_input(x)` and `winograd_output(products, bias, residual)` are the transforms of
  Winograd's F(2x2, 3x3) convolution of a bf16 channels_last feature map, on AVX-512 through
  `winograd.cpp`: `models.onednn.WinogradConv2d` runs its 16 GEMMs between them on oneDNN, with
  the weight's transform from `winograd_weight`.

Otherwise each goes to PyTorch, with the same results to bf16 rounding. Each kernel is a plain C++
file built with the system's g++ into `~/.cache/ldmkit/kernels/` (a second or two, once per version
of the file); without g++, the CPU features or Linux, or with LDMKIT_ATTENTION_KERNEL=0 or
LDMKIT_GROUP_NORM_KERNEL=0 or LDMKIT_LAYER_NORM_KERNEL=0 in the environment, its calls go to PyTorch
(and with LDMKIT_CONV_KERNEL=0 `prepack` leaves every convolution to oneDNN, with
LDMKIT_WINOGRAD_KERNEL=0 none to Winograd's).
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
from torch import nn

from ..cache import user_cache_dir
from ..cpu import AMX_FLAGS, cpu_flags, cpu_has_amx

COMPILE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-mfma", "-mavx512f", "-mavx512bw",
                 "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mamx-tile", "-mamx-bf16")
NEEDS = {  # /proc/cpuinfo flags each kernel needs
    "attention": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512vbmi"},
    "group_norm": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"},
    "layer_norm": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"},
    "conv": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", *AMX_FLAGS},
    "winograd": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"},
}
EXTRA_FLAGS = {"attention": ("-mavx512vbmi",)}  # only where NEEDS asks for it: no VBMI in the other kernels
MAX_WIDTH = 160  # head widths the attention kernel takes (query/key and value; query/key even)
MIN_SCORES = 256 * 256  # below this many scores per head PyTorch's kernel is as fast: not worth a call

_lock = threading.Lock()
_libraries: dict[str, ctypes.CDLL | None] = {}  # kernel name -> library, or None where it cannot run
_enabled = {"attention": os.environ.get("LDMKIT_ATTENTION_KERNEL", "1") != "0",
            "group_norm": os.environ.get("LDMKIT_GROUP_NORM_KERNEL", "1") != "0",
            "layer_norm": os.environ.get("LDMKIT_LAYER_NORM_KERNEL", "1") != "0",
            "conv": os.environ.get("LDMKIT_CONV_KERNEL", "1") != "0",
            "winograd": os.environ.get("LDMKIT_WINOGRAD_KERNEL", "1") != "0"}
_scratch = torch.empty(0, dtype=torch.uint8)  # the packed K and V, kept between calls: no page faults per call
_amx = False  # whether the attention kernel may use AMX tiles (the CPU has them and Linux granted them)


def _build(name: str) -> Path:
    """The compiled kernel `name` for this version of its source, built if missing (atomically)."""
    source = Path(__file__).with_name(f"{name}.cpp")
    header = Path(__file__).with_name("simd.h")  # included by every source
    flags = (*COMPILE_FLAGS, *EXTRA_FLAGS.get(name, ()))
    digest = hashlib.sha256(source.read_bytes() + header.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    target = user_cache_dir() / "kernels" / f"{name}-{digest}.so"
    if target.is_file():
        return target
    compiler = os.environ.get("CXX") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) found")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([compiler, *flags, "-o", str(built), str(source)], check=True, capture_output=True)
        os.replace(built, target)  # another process may have raced us here: either file is the same
    return target


def _load(name: str) -> ctypes.CDLL | None:
    """The kernel library `name`, or None where it cannot run (tried once per process)."""
    if name in _libraries:  # every call asks: no lock once the answer is known
        return _libraries[name]
    with _lock:
        if name not in _libraries:
            _libraries[name] = _open(name)
        return _libraries[name]


def _open(name: str) -> ctypes.CDLL | None:
    global _amx
    if not cpu_flags().issuperset(NEEDS[name]):
        return None
    try:
        lib = ctypes.CDLL(str(_build(name)))
    except (OSError, RuntimeError, subprocess.CalledProcessError):
        return None  # PyTorch's kernels are always there and always right
    if name == "attention":
        _amx = cpu_has_amx() and lib.ldm_amx_init() == 0  # products on AMX tiles where Linux granted their state
        lib.ldm_attention_scratch_bytes.restype = ctypes.c_long
        lib.ldm_attention_scratch_bytes.argtypes = [ctypes.c_int] * 5
        lib.ldm_attention.restype = ctypes.c_int
        lib.ldm_attention.argtypes = ([ctypes.c_void_p] * 5 + [ctypes.c_int] * 6
                                      + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_int])
    elif name == "conv":
        if lib.ldm_amx_init() != 0:  # Linux refused the tile state
            return None
        lib.ldm_conv3x3_scratch.restype = ctypes.c_long
        lib.ldm_conv3x3_scratch.argtypes = [ctypes.c_int] * 4
        lib.ldm_conv3x3.restype = ctypes.c_int
        lib.ldm_conv3x3.argtypes = ([ctypes.c_void_p] + [ctypes.c_int] * 4 + [ctypes.c_void_p, ctypes.c_int]
                                    + [ctypes.c_void_p] * 4 + [ctypes.c_int])
        lib.ldm_upsample_conv3x3.restype = ctypes.c_int
        lib.ldm_upsample_conv3x3.argtypes = ([ctypes.c_void_p] + [ctypes.c_int] * 4 + [ctypes.c_void_p, ctypes.c_int]
                                             + [ctypes.c_void_p] * 3 + [ctypes.c_int])
        lib.ldm_geglu.restype = ctypes.c_int
        lib.ldm_geglu.argtypes = ([ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
                                  + [ctypes.c_void_p] * 2 + [ctypes.c_int])
    elif name == "winograd":
        lib.ldm_winograd_input.restype = ctypes.c_int
        lib.ldm_winograd_input.argtypes = [ctypes.c_void_p] + [ctypes.c_int] * 6 + [ctypes.c_void_p, ctypes.c_int]
        lib.ldm_winograd_output.restype = ctypes.c_int
        lib.ldm_winograd_output.argtypes = ([ctypes.c_void_p] + [ctypes.c_int] * 6 + [ctypes.c_void_p] * 3
                                            + [ctypes.c_int])
    elif name == "layer_norm":
        lib.ldm_layer_norm.restype = ctypes.c_int
        lib.ldm_layer_norm.argtypes = ([ctypes.c_void_p] * 2 + [ctypes.c_long, ctypes.c_int] + [ctypes.c_void_p] * 2
                                       + [ctypes.c_float, ctypes.c_int])
    else:
        lib.ldm_group_norm.restype = ctypes.c_int
        lib.ldm_group_norm.argtypes = ([ctypes.c_void_p] * 2 + [ctypes.c_int] * 2 + [ctypes.c_long]
                                       + [ctypes.c_int] * 2 + [ctypes.c_void_p] * 3 + [ctypes.c_float]
                                       + [ctypes.c_int] * 2)
    return lib


def attention_kernel() -> str | None:
    """What `attention` runs on in this process: "amx", "avx512_bf16" or None (PyTorch's kernel)."""
    if _load("attention") is None:
        return None
    return "amx" if _amx else "avx512_bf16"


def group_norm_kernel_available() -> bool:
    """Whether `group_norm` can use our kernel in this process."""
    return _load("group_norm") is not None


def layer_norm_kernel_available() -> bool:
    """Whether `layer_norm` can use our kernel in this process."""
    return _load("layer_norm") is not None


def conv_kernel_available() -> bool:
    """Whether `conv3x3`, `upsample_conv3x3` and `geglu` can run here (AMX, g++, Linux) and
    LDMKIT_CONV_KERNEL is not 0."""
    return _enabled["conv"] and _load("conv") is not None


def winograd_kernel_available() -> bool:
    """Whether `winograd_input` and `winograd_output` can run here (AVX512-BF16, g++, Linux) and
    LDMKIT_WINOGRAD_KERNEL is not 0."""
    return _enabled["winograd"] and _load("winograd") is not None


def set_attention_kernel(enabled: bool) -> bool:
    """Let `attention` use our kernel (where it can) or not; returns the previous setting.
    The benchmark times both; LDMKIT_ATTENTION_KERNEL=0 sets it off at start-up."""
    previous, _enabled["attention"] = _enabled["attention"], enabled
    return previous


def set_group_norm_kernel(enabled: bool) -> bool:
    """Let `group_norm` use our kernel (where it can) or not; returns the previous setting.
    LDMKIT_GROUP_NORM_KERNEL=0 sets it off at start-up."""
    previous, _enabled["group_norm"] = _enabled["group_norm"], enabled
    return previous


def set_layer_norm_kernel(enabled: bool) -> bool:
    """Let `layer_norm` use our kernel (where it can) or not; returns the previous setting.
    LDMKIT_LAYER_NORM_KERNEL=0 sets it off at start-up."""
    previous, _enabled["layer_norm"] = _enabled["layer_norm"], enabled
    return previous


def _eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.bfloat16
            and q.ndim == k.ndim == v.ndim == 4
            and q.shape[-1] <= MAX_WIDTH and q.shape[-1] % 2 == 0 and v.shape[-1] <= MAX_WIDTH
            and q.shape[2] * k.shape[2] >= MIN_SCORES
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, amx: bool = True) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q (B, H, N, d), k (B, H, M, d), v (B, H, M, dv) -> (B, H, N, dv).
    Our kernel's result is laid out as (B, N, H, dv) in memory, so `.transpose(1, 2)` of it is free.
    `amx=False` keeps its products off AMX tiles (for tests of the other path on an AMX CPU)."""
    global _scratch
    lib = _load("attention") if _enabled["attention"] and _eligible(q, k, v) else None
    if lib is None:
        return F.scaled_dot_product_attention(q, k, v)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    (b, h, n, d), m, dv = q.shape, k.shape[2], v.shape[-1]
    out = q.new_empty(b, n, h, dv).transpose(1, 2)  # (B, H, N, dv) view of (B, N, H, dv)
    strides = (ctypes.c_long * 12)(*(s for t in (q, k, v, out) for s in t.stride()[:3]))
    with _lock:
        if _scratch.numel() < (size := lib.ldm_attention_scratch_bytes(b, h, m, d, dv)):
            _scratch = torch.empty(size, dtype=torch.uint8)
        status = lib.ldm_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), strides, b, h, n, m, d,
                                   dv, d ** -0.5, _scratch.data_ptr(), torch.get_num_threads(), int(amx and _amx))
    if status != 0:
        raise RuntimeError(f"the attention kernel refused shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")
    return out


def group_norm(x: torch.Tensor, norm: nn.GroupNorm, silu: bool = False, shift: torch.Tensor | None = None) -> torch.Tensor:
    """norm(x + shift[:, :, None, None]), then SiLU when `silu`, for x (B, C, H, W) and shift (B, C).
    bf16 inference on a contiguous or channels_last x runs as one pass of our kernel (the output
    in x's layout); everything else (float32, autograd, CUDA) as PyTorch's modules."""
    lib = _load("group_norm") if _enabled["group_norm"] and _norm_eligible(x, norm, shift) else None
    if lib is None:
        y = norm(x if shift is None else x + shift.to(x.dtype)[:, :, None, None])
        return F.silu(y) if silu else y
    b, c, h, w = x.shape
    nhwc = not x.is_contiguous()  # then channels_last (_norm_eligible)
    out = torch.empty_like(x)
    weight, bias = _float_affine(norm, norm.num_channels)
    shift = None if shift is None else shift.detach().float().contiguous()
    status = lib.ldm_group_norm(x.data_ptr(), out.data_ptr(), b, c, h * w, int(nhwc), norm.num_groups,
                                None if shift is None else shift.data_ptr(), weight.data_ptr(), bias.data_ptr(),
                                norm.eps, int(silu), torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"group_norm refused x {tuple(x.shape)} with {norm.num_groups} groups")
    return out


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """norm(x) for a LayerNorm over x's last dimension. bf16 inference on a contiguous x runs as
    one pass of our kernel; everything else (float32, autograd, CUDA) as PyTorch's module."""
    lib = _load("layer_norm") if _enabled["layer_norm"] and _layer_norm_eligible(x, norm) else None
    if lib is None:
        return norm(x)
    out = torch.empty_like(x)
    width = x.shape[-1]
    weight, bias = _float_affine(norm, width)
    status = lib.ldm_layer_norm(x.data_ptr(), out.data_ptr(), x.numel() // width, width, weight.data_ptr(),
                                bias.data_ptr(), norm.eps, torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"layer_norm refused x {tuple(x.shape)}")
    return out


def _layer_norm_eligible(x: torch.Tensor, norm: nn.LayerNorm) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.ndim >= 1 and x.numel() > 0
            and x.is_contiguous() and tuple(norm.normalized_shape) == (x.shape[-1],)
            and not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in norm.parameters()))))


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """An (N, K) weight in bf16 AMX B tiles (N/16, K/32, 16, 16, 2): the reduction in pairs, 16 output
    columns per tile row. K a multiple of 32, N of 16."""
    n, k = weight.shape
    return weight.detach().to(torch.bfloat16).reshape(n // 16, 16, k // 32, 16, 2).permute(0, 2, 3, 1, 4).contiguous()


def unpack_linear_weight(tiles: torch.Tensor) -> torch.Tensor:
    """The (N, K) weight of `pack_linear_weight`'s tiles."""
    return tiles.permute(0, 3, 1, 2, 4).reshape(tiles.shape[0] * 16, tiles.shape[1] * 32)


def pack_conv3x3_weight(weight: torch.Tensor) -> torch.Tensor:
    """(O, C, 3, 3) weights as `conv3x3` reads them: the linear weight (O, 9C) with the reduction over
    (dy, dx, c), in `pack_linear_weight`'s tiles. C a multiple of 32, O of 64."""
    o, c = weight.shape[:2]
    return pack_linear_weight(weight.detach().permute(0, 2, 3, 1).reshape(o, 9 * c))


def unpack_conv3x3_weight(tiles: torch.Tensor) -> torch.Tensor:
    """The (O, C, 3, 3) weights of `pack_conv3x3_weight`'s tiles."""
    rows = unpack_linear_weight(tiles)
    return rows.reshape(rows.shape[0], 3, 3, -1).permute(0, 3, 1, 2)


def pack_parity_weight(phases: torch.Tensor) -> torch.Tensor:
    """The 2x2 kernels of an upsampler's four output parities (4 O, C, 2, 2), parity 2 py + px in
    output channels [(2 py + px) O, (2 py + px + 1) O) (`layers.upsample_phase_weight`), as
    `upsample_conv3x3` reads them: per parity the (O, 4C) weight, reduction over (a, b, c), in
    `pack_linear_weight`'s tiles."""
    per_parity = phases.detach().reshape(4, -1, *phases.shape[1:]).permute(0, 1, 3, 4, 2)  # (4, O, a, b, C)
    return torch.stack([pack_linear_weight(w.reshape(w.shape[0], -1)) for w in per_parity])


def upsample_conv3x3(x: torch.Tensor, tiles: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1) for bf16 x
    (B, C, H, W), as the four output parities' 2x2 convolutions of x on AMX tiles, each written in
    place into the (B, O, 2H, 2W) channels_last result; `tiles` from `pack_parity_weight`, bias
    float32 (O,). Inference only, where `conv_kernel_available()`."""
    lib = _load("conv")
    b, c, h, w = x.shape
    o = tiles.shape[1] * 16
    if lib is None or x.dtype != torch.bfloat16 or tiles.shape[0] != 4 or 4 * c != tiles.shape[2] * 32:
        raise RuntimeError(f"upsample_conv3x3 cannot run {x.dtype} x {tuple(x.shape)} against {o}x{c} tiles here")
    x = x.contiguous(memory_format=torch.channels_last)
    out = torch.empty(b, o, 2 * h, 2 * w, dtype=x.dtype, memory_format=torch.channels_last)
    scratch = x.new_empty(lib.ldm_conv3x3_scratch(b, h, w, c))
    status = lib.ldm_upsample_conv3x3(x.data_ptr(), b, h, w, c, tiles.data_ptr(), o, bias.data_ptr(), out.data_ptr(),
                                      scratch.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"the upsample_conv3x3 kernel refused x {tuple(x.shape)} with {o} output channels")
    return out


# Winograd's F(2x2, 3x3): the weight's transform U = G g G^T, and G's left inverse (G^+ G = I)
# that gives the weight back from U
_WINOGRAD_G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
_WINOGRAD_G_INVERSE = torch.linalg.pinv(_WINOGRAD_G)


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """The transform U = G g G^T of a 3x3 convolution's weight g (O, C, 3, 3), in float32 then
    rounded to bf16: (16, O, C), position 4 i + j of the 4x4 as the linear weight of its GEMM."""
    u = torch.einsum("ij,ocjk,lk->iloc", _WINOGRAD_G, weight.detach().float(), _WINOGRAD_G)
    return u.reshape(16, *weight.shape[:2]).to(torch.bfloat16).contiguous()


def winograd_weight_inverse(u: torch.Tensor) -> torch.Tensor:
    """The float32 (O, C, 3, 3) weight whose `winograd_weight` is u (16, O, C), to u's rounding (bf16)."""
    u = u.float().reshape(4, 4, *u.shape[1:])
    return torch.einsum("ij,jkoc,lk->ocil", _WINOGRAD_G_INVERSE, u, _WINOGRAD_G_INVERSE)


def winograd_tile_rows(b: int, h: int) -> int:
    """How many rows of 2x2 tiles a batch of b maps of height h has: the range of `winograd_input`'s rows."""
    return b * ((h + 1) // 2)


def winograd_input(x: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The transforms V = B^T d B of the 4x4 input patches of a bf16 x (B, C, H, W) for a 3x3
    convolution with zero padding 1, rounded to bf16: (16, tiles, C) for the tiles in `rows` =
    [first, end) of the batch's `winograd_tile_rows` (None: all), row-major, ceil(W/2) a row.
    x should be channels_last (else it is copied so). Where `winograd_kernel_available()`."""
    lib = _load("winograd")
    b, c, h, w = x.shape
    first, end = rows or (0, winograd_tile_rows(b, h))
    if lib is None or x.dtype != torch.bfloat16:
        raise RuntimeError(f"winograd_input cannot run {x.dtype} x {tuple(x.shape)} here")
    x = x.contiguous(memory_format=torch.channels_last)  # NHWC memory: the kernel's layout
    v = x.new_empty(16, max(end - first, 0) * ((w + 1) // 2), c)
    if lib.ldm_winograd_input(x.data_ptr(), b, h, w, c, first, end, v.data_ptr(), torch.get_num_threads()) != 0:
        raise RuntimeError(f"the winograd_input kernel refused x {tuple(x.shape)}, tile rows {first} to {end}")
    return v


def winograd_output(products: list[torch.Tensor], shape: tuple[int, int, int], bias: torch.Tensor,
                    residual: torch.Tensor | None = None, rows: tuple[int, int] | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """The convolution's output (B, O, H, W), channels_last, from the 16 GEMMs' products (tiles, O)
    in bf16 (position 4 i + j each, tiles as `winograd_input` orders them) by Y = A^T M A per tile,
    plus bias float32 (O,) and residual (B, O, H, W). `shape` is (B, H, W). With `rows` (the
    products' tile rows, as given to `winograd_input`) only those output pixels are written, into
    `out` (a channels_last bf16 (B, O, H, W); None: a new tensor), which is returned."""
    lib = _load("winograd")
    (b, h, w), o = shape, products[0].shape[1]
    first, end = rows or (0, winograd_tile_rows(b, h))
    tiles = (end - first) * ((w + 1) // 2)
    if out is None:
        out = torch.empty(b, o, h, w, dtype=torch.bfloat16, memory_format=torch.channels_last)
    if (lib is None or len(products) != 16 or bias.shape != (o,) or bias.dtype != torch.float32
            or not bias.is_contiguous()
            or any(m.shape != (tiles, o) or m.dtype != torch.bfloat16 or not m.is_contiguous() for m in products)
            or out.shape != (b, o, h, w) or out.dtype != torch.bfloat16
            or not out.is_contiguous(memory_format=torch.channels_last)):
        raise RuntimeError(f"winograd_output cannot make a ({b}, {o}, {h}, {w}) output of these products here")
    if residual is not None:
        residual = residual.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    pointers = (ctypes.c_void_p * 16)(*(m.data_ptr() for m in products))
    status = lib.ldm_winograd_output(pointers, b, h, w, o, first, end, bias.data_ptr(),
                                     None if residual is None else residual.data_ptr(), out.data_ptr(),
                                     torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"the winograd_output kernel refused a ({b}, {o}, {h}, {w}) output, tile rows {first} "
                           f"to {end}")
    return out


def _geglu_order(rows: torch.Tensor, back: bool = False) -> torch.Tensor:
    """A GEGLU projection's rows [values; gates] (2I, ...) as `geglu`'s tiles take them, each 32 output
    channels' values then their gates (and, with `back`, that order undone)."""
    halves = (2, -1, 32) if not back else (-1, 2, 32)
    return rows.reshape(*halves, *rows.shape[1:]).transpose(0, 1).reshape(rows.shape)


def pack_geglu_weight(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A GEGLU projection (weight (2I, K), bias (2I,), values first) as `geglu` reads it: B tiles and
    a float32 bias. I a multiple of 32, K of 32."""
    return pack_linear_weight(_geglu_order(weight.detach())), _geglu_order(bias.detach().float()).contiguous()


def unpack_geglu_weight(tiles: torch.Tensor) -> torch.Tensor:
    """The (2I, K) projection weight, values first, of `pack_geglu_weight`'s tiles."""
    return _geglu_order(unpack_linear_weight(tiles), back=True)


def conv3x3(x: torch.Tensor, tiles: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1) (+ residual) for bf16 x (B, C, H, W) and the weight's
    `pack_conv3x3_weight` tiles, bias float32 (O,), residual (B, O, H, W); the result channels_last.
    Inference only, where `conv_kernel_available()`."""
    lib = _load("conv")
    b, c, h, w = x.shape
    o = tiles.shape[0] * 16
    if lib is None or x.dtype != torch.bfloat16 or 9 * c != tiles.shape[1] * 32:
        raise RuntimeError(f"conv3x3 cannot run {x.dtype} x {tuple(x.shape)} against {o}x{c}x3x3 tiles here")
    x = x.contiguous(memory_format=torch.channels_last)  # NHWC memory: the kernel's layout
    if residual is not None:
        residual = residual.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    out = torch.empty(b, o, h, w, dtype=x.dtype, memory_format=torch.channels_last)
    scratch = x.new_empty(lib.ldm_conv3x3_scratch(b, h, w, c))  # the padded input
    status = lib.ldm_conv3x3(x.data_ptr(), b, h, w, c, tiles.data_ptr(), o, bias.data_ptr(),
                             None if residual is None else residual.data_ptr(), out.data_ptr(), scratch.data_ptr(),
                             torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"the conv3x3 kernel refused x {tuple(x.shape)} with {o} output channels")
    return out


def geglu(x: torch.Tensor, tiles: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """value * GELU(gate) of the projection [value, gate] = x W^T + b, for bf16 x (..., K) and W, b as
    `pack_geglu_weight` gives them; the GEMM on AMX tiles, the bias, GELU and product in its epilogue,
    rounded to bf16 once. Inference only, where `conv_kernel_available()`."""
    lib = _load("conv")
    n, k = tiles.shape[0] * 16, tiles.shape[1] * 32
    if lib is None or x.dtype != torch.bfloat16 or x.shape[-1] != k:
        raise RuntimeError(f"geglu cannot run {x.dtype} x {tuple(x.shape)} against a {n}x{k} projection here")
    x = x.contiguous()
    out = x.new_empty(*x.shape[:-1], n // 2)
    status = lib.ldm_geglu(x.data_ptr(), x.numel() // k, k, tiles.data_ptr(), n, bias.data_ptr(), out.data_ptr(),
                           torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"the geglu kernel refused x {tuple(x.shape)} against a {n}x{k} projection")
    return out


def _float_affine(norm: nn.GroupNorm | nn.LayerNorm, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The norm's scale and offset as contiguous float32, as the kernel reads them; cached on the
    module (a sampler calls each norm dozens of times) until its weights change or move. Inference
    tensors keep no version counter, so for them nothing is cached."""
    params = [p for p in (norm.weight, norm.bias) if p is not None]
    cacheable = not any(p.is_inference() for p in params)
    # the same tensors (held, so their memory is not reused), same storage, not written since
    key = [(p, p.data_ptr(), p._version) for p in params] if cacheable else None
    cached = getattr(norm, "_ldm_float_affine", None)
    if (key is not None and cached is not None and len(cached[0]) == len(key)
            and all(a[0] is b[0] and a[1:] == b[1:] for a, b in zip(cached[0], key))):
        return cached[1], cached[2]
    weight = torch.ones(channels) if norm.weight is None else norm.weight.detach().float().contiguous()
    bias = torch.zeros(channels) if norm.bias is None else norm.bias.detach().float().contiguous()
    if cacheable:
        norm._ldm_float_affine = (key, weight, bias)
    return weight, bias


def _norm_eligible(x: torch.Tensor, norm: nn.GroupNorm, shift: torch.Tensor | None) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.ndim == 4 and x.numel() > 0
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
            and x.shape[1] == norm.num_channels and norm.num_channels % norm.num_groups == 0
            and (shift is None or (shift.device.type == "cpu" and shift.shape == x.shape[:2]))
            and not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in norm.parameters())
                                                  or (shift is not None and shift.requires_grad))))
