"""A ready-to-run StableDiffusion from a path: device and precision choice, the bundled model,
and a short hash that names the weights in each image's parameters.

Precision "auto" picks what is fast and safe where the model runs: fp16 on CUDA, bf16 on CPUs
with native bf16 arithmetic (AVX512-BF16 or AMX), float32 elsewhere. With an fp16 U-Net the VAE
stays float32 ("VAE upcast", as diffusers does for SD 1.x), because the SD VAE decoder's
activations overflow fp16's range; bf16 has float32's range, so a bf16 VAE is kept (and a
non-finite decode is still retried in float32 by the pipeline).

On the CPU the VAE runs channels_last, and so does the U-Net, whose convolutions, linear layers and
GEGLUs are instead prepacked for oneDNN in bf16 (`ldmkit.models.onednn`: weights reordered once
instead of every step, GEGLU as two GEMMs with fused post-ops; on AMX CPUs our own kernels for the
widest of them). On the Sapphire Rapids prepacking made the SD 1.5 U-Net step 22% faster; on AMD
Zen 5 (AVX512-BF16, no AMX) 12-15%, once its weights were laid out for an input size
(`onednn._layout_input_size`; without one, its 1x1 and 320-channel 3x3 weights were reordered
again at every call there). The VAE's 3x3 convolutions are left direct even without AMX, where
Winograd's way (`onednn.winograd_convolutions`) decoded 512x512 in 3.48 s against 5.04 on the Zen
5: with it a fresh `ldmkit generate` peaked at 5.82 GiB, over the 6 GB target (5.52 without).
In float32 channels_last made an AVX2-only CPU's (AMD Zen 3) SD 1.5 U-Net step 13% faster and
its VAE decode 17%, and was neutral to 25% faster on the Sapphire Rapids; on the Zen 3
prepacking was slower than channels_last (17.8 against 13.8 s a step) and fusing the GEGLUs
gained nothing. Our kernels (`ldmkit.kernels`) are built here rather than in
the first sampling step. On the CPU glibc's malloc is told to keep freed large blocks
(`cpu.keep_freed_memory`; LDMKIT_KEEP_FREED_MEMORY=0 leaves it as it is): each step and decode
then reuses the memory of the last instead of page-faulting in fresh mappings.
Measured in bench/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from pathlib import Path

import torch

from .. import kernels
from ..cache import user_cache_dir
from ..checkpoints.io import write_text_atomic
from ..checkpoints.loading import SINGLE_FILE_SUFFIXES, load_pipeline_components
from ..cpu import cpu_flags, keep_freed_memory
from ..diffusion.schedule import NoiseSchedule
from ..errors import InvalidArgument, LdmkitError, check_choice
from ..models import onednn
from .stable_diffusion import StableDiffusion

BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "assets" / "shapes_model"  # diffusers layout
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic
HASH_LENGTH = 10  # hex characters of the model hash recorded with each image
HASH_CACHE_FILE = "model_hashes.json"  # in the user cache: {model path: {"files": [...], "hash"}}
GENERATION_FILE = "generation.json"  # in a model folder: settings its makers recommend, {"cfg_scale": 5.0}
DEFAULT_CFG_SCALE = 7.5  # SD's usual guidance scale, for models that recommend none


def resolve_model_path(model: str | Path | None) -> Path:
    """The model's folder or file: `model`, or the bundled model when None; must exist."""
    if model is None:
        if not BUNDLED_MODEL.is_dir():
            raise LdmkitError(f"bundled model not found at {BUNDLED_MODEL}; pass --model PATH")
        return BUNDLED_MODEL
    path = Path(model)
    if not path.exists():
        raise InvalidArgument(f"model not found: {path}")
    return path


def resolve_device(device: str = "auto") -> torch.device:
    """"auto": CUDA when available, else the CPU. Asking for CUDA without it is an error."""
    check_choice("device", device, DEVICES)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("device cuda requested, but CUDA is not available (use --device cpu)")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (else bf16 is emulated and slower than fp32; a
    CPU that does not say, off Linux, is assumed not to: float32 is always correct)."""
    return not cpu_flags().isdisjoint(CPU_BF16_FLAGS)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The U-Net / text encoder dtype for `precision` on `device` (see the module docstring)."""
    check_choice("precision", precision, PRECISIONS)
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if precision == "fp16" and device.type == "cpu":
        raise InvalidArgument("precision fp16 needs CUDA; on the CPU use bf16 or fp32")
    return DTYPES[precision]


def precision_name(dtype: torch.dtype) -> str:
    """"fp32", "bf16" or "fp16" for a dtype (what --precision takes)."""
    return next(name for name, d in DTYPES.items() if d == dtype)


def vae_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype next to a U-Net in `dtype`: fp16 is upcast to float32 (overflow)."""
    return torch.float32 if dtype == torch.float16 else dtype


def recommended_cfg_scale(path: str | Path) -> float:
    """The classifier-free guidance scale a model folder recommends in its GENERATION_FILE, else
    DEFAULT_CFG_SCALE. A model trained on little data can need far less guidance than SD's 7.5
    (the bundled model: 5)."""
    file = Path(path) / GENERATION_FILE
    if not file.is_file():
        return DEFAULT_CFG_SCALE
    try:
        value = json.loads(file.read_text())["cfg_scale"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LdmkitError(f"{file}: no readable cfg_scale ({type(e).__name__}: {e})") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise LdmkitError(f"{file}: cfg_scale must be a number >= 0, got {value!r}")
    return float(value)


def write_recommended_cfg_scale(folder: str | Path, cfg_scale: float) -> None:
    """Record in a model folder the guidance scale its users should get by default."""
    write_text_atomic(Path(folder) / GENERATION_FILE, json.dumps({"cfg_scale": cfg_scale}, indent=2) + "\n")


def model_hash(path: str | Path) -> str:
    """The first HASH_LENGTH hex digits of sha256 over a model's weight files (a single file, or
    every weight file under a folder in sorted order, each with its relative path).

    Reading gigabytes for it takes seconds, so the hash is kept in the user cache
    (`HASH_CACHE_FILE`) with each file's size and modification time, and computed again only when
    one of them changes, as the web UIs do.
    """
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in SINGLE_FILE_SUFFIXES
    )
    stamp = [[str(f), *_size_and_mtime(f)] for f in files]
    cache = _read_hash_cache()
    entry = cache.get(str(path))
    if entry is not None and entry.get("files") == stamp and isinstance(entry.get("hash"), str):
        return entry["hash"]
    value = _sha256_of_weights(path, files)
    cache[str(path)] = {"files": stamp, "hash": value}
    with contextlib.suppress(OSError):  # a read-only cache only costs the next run the hashing
        write_text_atomic(user_cache_dir() / HASH_CACHE_FILE, json.dumps(cache))
    return value


def _size_and_mtime(file: Path) -> tuple[int, int]:
    stat = file.stat()
    return stat.st_size, stat.st_mtime_ns


def _read_hash_cache() -> dict:
    try:
        cache = json.loads((user_cache_dir() / HASH_CACHE_FILE).read_text())
    except (OSError, ValueError):  # none yet, unreadable or damaged: start afresh
        return {}
    return cache if isinstance(cache, dict) else {}


def _sha256_of_weights(path: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:HASH_LENGTH]


def load_pipeline(
    model: str | Path | None = None,
    precision: str = "auto",
    device: str = "auto",
    *,
    prediction_type: str | None = None,
    arch: str | None = None,
    inpainting: bool | None = None,
    prepack: bool = True,
) -> StableDiffusion:
    """A StableDiffusion from a diffusers folder or single file (None: the bundled model).

    precision: "auto", "fp32", "bf16" or "fp16" (CUDA only); device: "auto", "cpu" or "cuda".
    `prediction_type`, `arch` and `inpainting` are passed to load_pipeline_components.
    `prepack` (CPU bf16 only): True (the default) prepacks the U-Net's layers for oneDNN where
    oneDNN has bf16 kernels for this CPU, False keeps them PyTorch layers with channels_last weights.
    """
    target = resolve_device(device)
    dtype = resolve_precision(precision, target)
    path = resolve_model_path(model)
    comps = load_pipeline_components(path, prediction_type=prediction_type, arch=arch,
                                     inpainting=inpainting, dtype=dtype, device=target)
    comps.vae.to(vae_dtype_for(dtype))
    if target.type == "cpu":
        comps.vae.to(memory_format=torch.channels_last)
        if prepack and dtype == torch.bfloat16 and onednn.available(dtype):
            onednn.prepack(comps.unet)
        else:
            comps.unet.to(memory_format=torch.channels_last)
    if target.type == "cpu" and dtype == torch.bfloat16:
        kernels.attention_kernel()  # build our kernels now, not in the first step
        kernels.group_norm_kernel_available()
    if target.type == "cpu" and os.environ.get("LDMKIT_KEEP_FREED_MEMORY", "1") != "0":
        keep_freed_memory()  # after loading, whose transient copies go back to the system
    return StableDiffusion(comps.unet, comps.vae, comps.text_encoder, comps.tokenizer,
                           NoiseSchedule(comps.schedule_config), default_cfg_scale=recommended_cfg_scale(path))
