#!/usr/bin/env python
"""Speed and precision of ldmkit against diffusers / transformers on Stable Diffusion 1.5-shaped
models with random weights (the same weights on both sides), on the CPU.

Workloads (each timed for every variant, in one process, variants alternating):

    unet      one U-Net call: batch 2 (classifier-free guidance: one 4x64x64 latent under two 77x768
              contexts, as samplers call it; ldmkit runs the layers before the first cross-attention
              once for both, `UNet._shared_start`), and ldmkit bf16 packed on two distinct latents
    vae       VAE decode of one 4x64x64 latent to a 512x512 image
    text      CLIP text encoding of a batch of 2 x 77 tokens
    pipeline  a whole 20-step 512x512 txt2img with DPM-Solver++(2M) and CFG 7.5 (--skip-pipeline)
    shapes    the bundled shapes model (src/ldmkit/assets/shapes_model, when present): 16 images
              64x64, 25 steps dpmpp_2m with CFG; the target is < 5 s
    generate  `ldmkit generate` in a fresh process on the SD 1.5-shaped weights saved as a diffusers
              folder: seconds and peak RSS as a user sees them (--skip-cli)
    training  one optimizer step of the bundled U-Net's shape, batch 32: ldmkit against diffusers'
              UNet2DConditionModel, fp32 and bf16 autocast, in images/s (--skip-training)

Variants: diffusers fp32, diffusers under bf16 autocast, ldmkit fp32, ldmkit fp32 with
channels_last weights and inputs (U-Net and VAE: the layout's effect alone; what `load_pipeline`
runs in float32 on the CPU, so the txt2img workload's "ldmkit fp32" is channels_last), ldmkit with
bf16 weights and channels_last, ldmkit bf16 with the U-Net's layers prepacked for oneDNN
(`ldmkit.models.onednn`, what `load_pipeline` runs in bf16 where oneDNN has bf16 kernels; elsewhere
the bf16 pipelines use bf16 channels_last), that prepacked U-Net with the other choice of
Winograd's 3x3 convolutions (`onednn.prepack(model, winograd=...)`: on by default only where the
CPU has no AMX, so the variant is "direct 3x3" there and "Winograd" on AMX, where it is otherwise
unmeasured), and with --compile bf16 channels_last under torch.compile. The diffusers /
transformers models share ldmkit fp32's weight tensors, so the weights are held once.

Reported per workload and variant: median seconds over --runs runs (after --warmup untimed calls),
speed-up against diffusers fp32 and diffusers bf16 autocast (their time / this time, > 1 is
faster), achieved TFLOP/s (matmul/conv/attention FLOPs counted once per workload with
FlopCounterMode on ldmkit fp32), that as a share of a measured 4096x4096 matmul peak in fp32 and
bf16, and the process's peak resident memory during the timed calls (all models stay loaded, so it
includes every model's weights). Quality checks: bf16 against fp32 outputs (U-Net relative error,
VAE mean absolute difference in 0..255), and ldmkit fp32 against diffusers fp32.

A last section runs tiny models with bf16 weights and channels_last inputs, module by module,
reporting any op that fails and where tensors change memory layout or dtype.

    make bench                                         # everything; writes bench/RESULTS.md
    .venv/bin/python bench/run.py --skip-pipeline      # the components only
    .venv/bin/python bench/run.py --smoke --runs 1     # tiny models, seconds: the code paths only

At SD 1.5 size on 2 cores, one U-Net step is about 1.6 TFLOP and a 512x512 decode about 2.5 TFLOP:
expect a second or two per U-Net call in bf16 on AMX, tens of seconds in float32. CPUs without
native bf16 (no AVX512-BF16/AMX, e.g. AVX2-only ones) emulate it, at about a GFLOP/s: there every
variant that computes in bf16 (and `ldmkit generate`'s bf16) is left out, the float32 ones are what
`--precision auto` runs; --emulated-bf16 keeps them (hours at SD 1.5 size). The log on stderr says
how far it is and, before the pipeline, how long that should take.

Run it on a quiet machine: the numbers are only as good as the CPU is idle.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import ldmkit  # noqa: F401 - before torch: it asks PyTorch for huge pages, as `ldmkit generate` has them
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ldmkit import kernels
from ldmkit.checkpoints.keys_unet_vae import unet_config_to_diffusers, vae_config_to_diffusers
from ldmkit.cpu import HUGE_PAGES_VARIABLE, cpu_has_amx, keep_freed_memory, linux_huge_page_mode
from ldmkit.diffusion.schedule import NoiseSchedule, ScheduleConfig
from ldmkit.models import onednn
from ldmkit.models.clip import CLIPTextConfig, CLIPTextModel, text_config_to_transformers
from ldmkit.models.layers import Attention, SpatialSelfAttention, SpatialTransformer
from ldmkit.models.tokenizer import CLIPTokenizer
from ldmkit.models.unet import UNet, unet_preset
from ldmkit.models.vae import AutoencoderKL, vae_preset
from ldmkit.pipelines.load import BUNDLED_MODEL, cpu_has_native_bf16, load_pipeline
from ldmkit.pipelines.stable_diffusion import StableDiffusion

BF16 = torch.bfloat16
CL = torch.channels_last
PROMPT = "a photograph of an astronaut riding a horse"
# Stable Diffusion 1.5's scheduler_config.json, as a swapped-in diffusers scheduler sees it
# (the same dict as tests/diffusers_oracle.py).
SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, set_alpha_to_one=False, clip_sample=False, skip_prk_steps=True,
    timestep_spacing="leading", prediction_type="epsilon",
)
D32, DAC, L32, L16, LCO = "diffusers fp32", "diffusers bf16 autocast", "ldmkit fp32", "ldmkit bf16 CL", "ldmkit bf16 CL compile"
LCL = "ldmkit fp32 CL"  # float32 with channels_last: the layout's effect alone
LPK = "ldmkit bf16 packed"  # bf16, U-Net layers prepacked for oneDNN: what load_pipeline runs where oneDNN has bf16
LBF = LPK if onednn.available(BF16) else L16  # the bf16 U-Net load_pipeline builds here: the pipelines' bf16 variant
LP2 = f"{LPK}, distinct latents"  # the U-Net step on a batch whose rows all differ: no shared start
LPS = f"{LBF} SDPA"  # that with PyTorch's attention kernel in place of ours
LPG = f"{LBF} PyTorch GN"  # ... with PyTorch's GroupNorm and SiLU in place of our kernel
# ... with the other choice of Winograd's 3x3 convolutions than prepack's default (on where the CPU has no AMX)
LPW = f"{LPK}, Winograd" if cpu_has_amx() else f"{LPK}, direct 3x3"
L16G = "ldmkit bf16 CL PyTorch GN"
LVW = "ldmkit bf16 CL Winograd"  # the VAE with onednn.winograd_convolutions (where the CPU has no AMX; not load_pipeline's)
UNET_REL_ERR_TARGET = 0.02  # bf16 U-Net output: relative L2 error against fp32
VAE_MAD_TARGET = 1.0  # bf16 VAE decode: mean |difference| in 0..255 against fp32
SHAPES_TARGET_S = 5.0  # the bundled model: 16 images, 25 steps
MALLOC_POLICIES = {  # --malloc: which variants run with glibc keeping freed large blocks, as the report says it
    "ldmkit": "for ldmkit's inference variants (as load_pipeline sets it), not for diffusers' or training",
    "all": "for every variant",
    "none": "for no variant",
}


# -- sizes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """What one run builds and feeds: SD 1.5 for the real measurement, tiny models for --smoke."""

    unet: str  # unet_preset name
    vae: str  # vae_preset name
    text: CLIPTextConfig  # text tower config
    image: int  # image side of the VAE decode and the pipeline
    batch: int = 2  # U-Net batch: [uncond, cond]
    matmul_n: int = 4096  # side of the square matmuls that measure the peak
    shapes_images: int = 16  # images of the shapes workload
    shapes_steps: int = 25  # sampler steps of the shapes workload
    pipeline_steps: int | None = None  # txt2img steps; None: --steps
    train_batch: int = 32  # batch of the training-step workload (the bundled model's recipe)


def sizes_for(smoke: bool) -> Sizes:
    if not smoke:
        return Sizes("sd15", "sd", CLIPTextConfig.preset("sd15_text"), image=512)
    # the tiny text tower with CLIP's real vocabulary, so the BPE tokenizer's ids fit
    text = replace(CLIPTextConfig.preset("tiny"), vocab_size=49408, eos_token_id=49407, pad_token_id=49407)
    return Sizes("tiny", "tiny", text, image=32, matmul_n=256, shapes_images=2, shapes_steps=2, pipeline_steps=2,
                 train_batch=4)


# -- memory ---------------------------------------------------------------------------------------


def _status_bytes(key: str) -> int | None:
    """A kB line of /proc/self/status (VmRSS, VmHWM) in bytes, None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss() -> int:
    return _status_bytes("VmRSS") or 0


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident memory of this process (since the last reset_peak, where that works)."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux counts kB


TRAINING = "U-Net training step"  # the one workload whose ldmkit variants do not run through load_pipeline


def keeps_freed_memory(variant: str, workload: str, policy: str) -> bool:
    """Whether `variant` runs with glibc keeping freed large blocks (`ldmkit.cpu.keep_freed_memory`):
    --malloc ldmkit (the default) gives it to ldmkit's inference variants, as load_pipeline does in a
    user's process, and leaves diffusers (and training) with glibc's defaults; all: every variant;
    none: no variant."""
    if policy == "all":
        return True
    return policy == "ldmkit" and variant.startswith("ldmkit") and workload != TRAINING


# -- FLOPs and the matmul peak --------------------------------------------------------------------


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU flash-attention kernel, which FlopCounterMode does not know: QK^T and PV
    (a causal mask is counted as full)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CUSTOM_FLOPS = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _CUSTOM_FLOPS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops


def count_flops(fn: Callable[[], object]) -> int:
    """Matmul, convolution and attention FLOPs of one call of fn (2 per multiply-add)."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(dtype: torch.dtype, n: int, runs: int) -> float:
    """TFLOP/s of an n x n by n x n matmul in `dtype`, the best of `runs` timed calls."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up
    reps = max(1, 2**31 // n**3)  # about 4 GFLOP per timing at least; 1 matmul at n = 4096
    best = math.inf
    for _ in range(max(runs, 2)):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * n**3 / best / 1e12


# -- timing -----------------------------------------------------------------------------------------


@dataclass
class Timing:
    times: list[float] = field(default_factory=list)  # seconds of each timed call
    peak: int = 0  # most resident bytes during a timed call
    above: int = 0  # most resident bytes above those before the call
    first_call: float = 0.0  # seconds of the first (warm-up) call: compile time for compiled variants
    output: object = None  # what the last timed call returned (compared in the quality checks)
    error: str | None = None  # why the variant was dropped, if it raised
    user: float = 0.0  # process user CPU seconds over the timed calls
    sys: float = 0.0  # process system CPU seconds over the timed calls (page faults of fresh memory, ...)

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else math.nan


def native_variants(variants: dict[str, Callable[[], object]], keep_bf16: bool) -> dict[str, Callable[[], object]]:
    """`variants` less those that compute in bf16 (their names say so), unless `keep_bf16`."""
    return dict(variants) if keep_bf16 else {name: fn for name, fn in variants.items() if "bf16" not in name}


def time_variants(variants: dict[str, Callable[[], object]], runs: int, warmup: int, label: str, malloc: str,
                  warm_once: tuple[str, ...] = (), rewarm: bool = True) -> dict[str, Timing]:
    """Time each variant `runs` times after `warmup` untimed calls (at least one for the names in
    `warm_once`), alternating variants (and reversing their order every other round) so that a
    drift in machine speed is shared between them. With `rewarm` each timed call comes right after
    an untimed one of the same variant, as a step follows a step in a sampling loop: a call right
    after another variant's can be slower (SD 1.5's packed U-Net step after the unpacked bf16 one's,
    1.03-1.05 s, against 0.97 s after its own kind's). A variant that raises is dropped with its
    error recorded, so one broken variant does not end a long run. `malloc`: see
    keeps_freed_memory."""
    results = {name: Timing() for name in variants}
    live = dict(variants)

    def call(name: str) -> tuple[object, float] | None:
        keep_freed_memory(keeps_freed_memory(name, label, malloc))
        t0 = time.perf_counter()
        try:
            out = live[name]()
        except Exception as e:  # noqa: BLE001 - reported in the table
            results[name].error = f"{type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"
            log(f"  {label} {name}: FAILED {results[name].error}")
            del live[name]
            return None
        return out, time.perf_counter() - t0

    with torch.no_grad():
        for w in range(max(warmup, 1 if warm_once else 0)):
            for name in [n for n in live if w < warmup or n in warm_once]:
                got = call(name)
                if got is not None and w == 0:
                    results[name].first_call = got[1]
                    log(f"  {label} {name}: warm-up {got[1]:.3f} s")
        for r in range(runs):
            names = list(live) if r % 2 == 0 else list(reversed(live))
            for name in names:
                if rewarm and name in live and call(name) is None:  # untimed, so the timed call follows its own kind
                    continue
                gc.collect()
                keep_freed_memory(keeps_freed_memory(name, label, malloc))  # before `before`: leaving it trims
                before = rss()
                reset_peak()
                cpu0 = resource.getrusage(resource.RUSAGE_SELF)
                got = call(name)
                if got is None:
                    continue
                cpu1 = resource.getrusage(resource.RUSAGE_SELF)
                res = results[name]
                res.user += cpu1.ru_utime - cpu0.ru_utime
                res.sys += cpu1.ru_stime - cpu0.ru_stime
                res.output, dt = got
                res.times.append(dt)
                res.peak = max(res.peak, peak_rss())
                res.above = max(res.above, peak_rss() - before)
                log(f"  {label} {name}: run {r + 1}/{runs} {dt:.3f} s")
    return results


_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress on stderr, with the seconds since the start."""
    print(f"[{time.perf_counter() - _T0:7.1f} s] {msg}", file=sys.stderr, flush=True)


# -- models -----------------------------------------------------------------------------------------


def converted_copy(model: nn.Module, build: Callable[[], nn.Module], dtype: torch.dtype, channels_last: bool) -> nn.Module:
    """A copy of `model` in `dtype` without a transient float32 copy: built on the meta device, then
    the cast weights are assigned (and 4-D weights laid out channels_last when asked). Weights that
    need no change (float32 ones not made channels_last) share `model`'s memory."""
    with torch.device("meta"):
        copy_ = build()
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}  # float32: shared with `model`
    copy_.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in [*copy_.parameters(), *copy_.buffers()]):
        raise RuntimeError(f"{type(model).__name__}: a tensor was left on the meta device")
    if channels_last:
        copy_.to(memory_format=CL)
    return copy_.eval()


def winograd_vae(vae: AutoencoderKL, config) -> AutoencoderKL | None:
    """A bf16 channels_last copy of `vae` with Winograd's 3x3 convolutions (where the CPU has no
    AMX); None where `onednn.winograd_convolutions` takes none."""
    copy_ = converted_copy(vae, lambda: AutoencoderKL(config), BF16, channels_last=True)
    return copy_ if onednn.winograd_convolutions(copy_) else None


def shared_reference(theirs: nn.Module, ours: nn.Module) -> nn.Module:
    """Load ours' weights into the diffusers/transformers model, sharing their memory (assign).
    transformers 5 drops the `text_model.` prefix from CLIPTextModel's keys."""
    keys = set(theirs.state_dict())
    state = {k if k in keys else k.removeprefix("text_model."): v for k, v in ours.state_dict().items()}
    theirs.load_state_dict(state, strict=True, assign=True)
    return theirs.eval()


@dataclass
class Models:
    unet: UNet
    vae: AutoencoderKL
    text: CLIPTextModel
    unet16: UNet  # bf16, channels_last
    unet_packed: UNet | None  # bf16, layers prepacked (models.onednn); None where oneDNN has no bf16 here
    unet_packed_other: UNet | None  # that with the other choice of Winograd's way (LPW); None where it has none
    vae16: AutoencoderKL  # bf16, channels_last
    vae_winograd: AutoencoderKL | None  # that with its 3x3 convolutions Winograd's (LVW); None where it takes none
    unet_cl: UNet  # float32, channels_last
    vae_cl: AutoencoderKL  # float32, channels_last
    text16: CLIPTextModel  # bf16
    d_unet: nn.Module  # diffusers UNet2DConditionModel
    d_vae: nn.Module  # diffusers AutoencoderKL
    d_text: nn.Module  # transformers CLIPTextModel
    unet_compiled: nn.Module | None = None


def build_models(sizes: Sizes, compile_backend: str | None) -> Models:
    import diffusers
    import transformers

    torch.manual_seed(0)
    ucfg, vcfg, tcfg = unet_preset(sizes.unet), vae_preset(sizes.vae), sizes.text
    unet, vae, text = UNet(ucfg).eval(), AutoencoderKL(vcfg).eval(), CLIPTextModel(tcfg).eval()
    dcfg = {k: v for k, v in unet_config_to_diffusers(ucfg).items() if k != "_class_name"}
    d_unet = shared_reference(diffusers.UNet2DConditionModel(**dcfg), unet)
    vcfg_d = {k: v for k, v in vae_config_to_diffusers(vcfg).items() if k != "_class_name"}
    d_vae = shared_reference(diffusers.AutoencoderKL(**vcfg_d), vae)
    hf_cfg = transformers.CLIPTextConfig(**text_config_to_transformers(tcfg))
    d_text = shared_reference(transformers.CLIPTextModel(hf_cfg), text)
    packs = onednn.available(BF16)
    winograd_choice = packs and kernels.winograd_kernel_available()

    def packed(winograd: bool | None) -> UNet:
        return onednn.prepack(converted_copy(unet, lambda: UNet(ucfg), BF16, channels_last=False), winograd)

    models = Models(
        unet, vae, text,
        converted_copy(unet, lambda: UNet(ucfg), BF16, channels_last=True),
        packed(None) if packs else None,
        packed(cpu_has_amx()) if winograd_choice else None,
        converted_copy(vae, lambda: AutoencoderKL(vcfg), BF16, channels_last=True),
        winograd_vae(vae, vcfg) if packs else None,
        converted_copy(unet, lambda: UNet(ucfg), torch.float32, channels_last=True),
        converted_copy(vae, lambda: AutoencoderKL(vcfg), torch.float32, channels_last=True),
        converted_copy(text, lambda: CLIPTextModel(tcfg), BF16, channels_last=False),
        d_unet, d_vae, d_text,
    )
    if compile_backend:
        models.unet_compiled = torch.compile(models.unet16, backend=compile_backend)
    gc.collect()
    return models


# -- workloads --------------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    what: str  # one line: shapes and settings
    variants: dict[str, Callable[[], object]]
    flops: int
    timings: dict[str, Timing] = field(default_factory=dict)

    def out(self, variant: str) -> torch.Tensor | None:
        t = self.timings.get(variant)
        return None if t is None else t.output

    def has(self, *variants: str) -> bool:
        return all(self.out(v) is not None for v in variants)


def kernel_off(switch: Callable[[bool], bool], fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` run with one of our kernels switched off (`kernels.set_attention_kernel` or
    `kernels.set_group_norm_kernel`): PyTorch's kernel in its place."""
    def run():
        previous = switch(False)
        try:
            return fn()
        finally:
            switch(previous)
    return run


def unet_workload(m: Models, sizes: Sizes, compile_: bool) -> Workload:
    cfg = m.unet.config
    side = sizes.image // m.vae.config.downscale
    g = torch.Generator().manual_seed(1)
    # a CFG step as samplers make it: each latent twice, under the negative and the positive prompt
    latents = torch.randn(sizes.batch // 2, cfg.in_channels, side, side, generator=g)
    x = latents.repeat(2, 1, 1, 1)  # (B, 4, h, w)
    ctx = torch.randn(sizes.batch, 77, cfg.context_dim, generator=g)  # (B, 77, D)
    t = torch.full((sizes.batch,), 500.0)
    x16, ctx16 = x.to(BF16).contiguous(memory_format=CL), ctx.to(BF16)
    x_cl = x.contiguous(memory_format=CL)
    distinct = torch.randn(x.shape, generator=g)  # a batch with no shared start
    distinct16 = distinct.to(BF16).contiguous(memory_format=CL)

    def d32():
        return m.d_unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0]

    def dac():
        with torch.autocast("cpu", dtype=BF16):
            return m.d_unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0]

    variants = {D32: d32, DAC: dac, L32: lambda: m.unet(x, t, ctx), LCL: lambda: m.unet_cl(x_cl, t, ctx),
                L16: lambda: m.unet16(x16, t, ctx16)}
    if m.unet_packed is not None:
        variants[LPK] = lambda: m.unet_packed(x16, t, ctx16)
        variants[LP2] = lambda: m.unet_packed(distinct16, t, ctx16)
    if m.unet_packed_other is not None:
        variants[LPW] = lambda: m.unet_packed_other(x16, t, ctx16)
    if kernels.attention_kernel():
        variants[LPS] = kernel_off(kernels.set_attention_kernel, variants[LBF])
    if kernels.group_norm_kernel_available():
        variants[LPG] = kernel_off(kernels.set_group_norm_kernel, variants[LBF])
    if compile_:
        variants[LCO] = lambda: m.unet_compiled(x16, t, ctx16)
    what = (f"CFG batch {sizes.batch}: {len(latents)} {cfg.in_channels}x{side}x{side} latent(s), each under two "
            f"77x{cfg.context_dim} contexts")
    # the whole batch's work, as diffusers does it: ldmkit's shared start skips about 3% of it (SD 1.5)
    return Workload("U-Net step", what, variants, count_flops(lambda: m.unet(distinct, t, ctx)))


def vae_workload(m: Models, sizes: Sizes) -> Workload:
    side = sizes.image // m.vae.config.downscale
    z = torch.randn(1, m.vae.config.latent_channels, side, side, generator=torch.Generator().manual_seed(2))
    z = z / m.vae.config.scaling_factor  # U-Net-scale latents in the VAE's own scale
    z16, z_cl = z.to(BF16).contiguous(memory_format=CL), z.contiguous(memory_format=CL)

    def dac():
        with torch.autocast("cpu", dtype=BF16):
            return m.d_vae.decode(z, return_dict=False)[0]

    variants = {D32: lambda: m.d_vae.decode(z, return_dict=False)[0], DAC: dac,
                L32: lambda: m.vae.decode(z), LCL: lambda: m.vae_cl.decode(z_cl), L16: lambda: m.vae16.decode(z16)}
    if kernels.group_norm_kernel_available():
        variants[L16G] = kernel_off(kernels.set_group_norm_kernel, variants[L16])
    if m.vae_winograd is not None:
        variants[LVW] = lambda: m.vae_winograd.decode(z16)
    what = f"1x{z.shape[1]}x{side}x{side} latent -> {sizes.image}x{sizes.image} image"
    return Workload("VAE decode", what, variants, count_flops(lambda: m.vae.decode(z)))


def text_workload(m: Models, ids: torch.Tensor) -> Workload:
    def dac():
        with torch.autocast("cpu", dtype=BF16):
            return m.d_text(ids).last_hidden_state

    variants = {D32: lambda: m.d_text(ids).last_hidden_state, DAC: dac, L32: lambda: m.text(ids).last_hidden_state,
                "ldmkit bf16": lambda: m.text16(ids).last_hidden_state}  # no 4-D tensors: no channels_last
    what = f"{ids.shape[0]} x {ids.shape[1]} tokens, width {m.text.config.hidden_size}"
    return Workload("text encode", what, variants, count_flops(lambda: m.text(ids)))


def pipeline_workload(m: Models, sizes: Sizes, steps: int, tokenizer: CLIPTokenizer, hf_tokenizer,
                      compile_: bool, flops_per: dict[str, int]) -> Workload:
    import diffusers

    schedule = NoiseSchedule(ScheduleConfig.from_dict(SD15_SCHEDULER))

    def ours_pipe(unet, vae, text) -> StableDiffusion:
        p = StableDiffusion(unet, vae, text, tokenizer, schedule)
        p.vae_tile_size = None  # decode whole, as diffusers does (tiling starts above 512 for SD anyway)
        return p

    # what load_pipeline builds on the CPU: float32 channels_last; in bf16 the U-Net packed where
    # oneDNN has bf16, else channels_last, and a channels_last VAE
    unet16 = m.unet_packed if LBF == LPK else m.unet16
    ours32, ours16 = ours_pipe(m.unet_cl, m.vae_cl, m.text), ours_pipe(unet16, m.vae16, m.text16)
    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER)
    pipe = diffusers.StableDiffusionPipeline(
        vae=m.d_vae, text_encoder=m.d_text, tokenizer=hf_tokenizer, unet=m.d_unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    h = sizes.image

    def theirs():
        return pipe(PROMPT, negative_prompt="", num_inference_steps=steps, guidance_scale=7.5, height=h, width=h,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images

    def theirs_ac():
        with torch.autocast("cpu", dtype=BF16):
            return theirs()

    def ours(p: StableDiffusion):
        return lambda: p.txt2img(PROMPT, "", sampler="dpmpp_2m", steps=steps, cfg_scale=7.5, height=h, width=h,
                                 seed=0, output="tensor")

    variants = {D32: theirs, DAC: theirs_ac, L32: ours(ours32), LBF: ours(ours16)}
    if compile_:
        variants[LCO] = ours(ours_pipe(m.unet_compiled, m.vae16, m.text16))
    flops = flops_per["text encode"] + steps * flops_per["U-Net step"] + flops_per["VAE decode"]
    what = f"{h}x{h}, {steps} steps dpmpp_2m, CFG 7.5, 1 image"
    return Workload("txt2img", what, variants, flops)


def shapes_workload(sizes: Sizes, folder: Path, compile_backend: str | None) -> tuple[Workload, dict]:
    """The bundled model, ldmkit fp32 and bf16 + channels_last (and diffusers fp32 when its
    pipeline loads the folder)."""
    from ldmkit.training.shapes_model import SAMPLE_PROMPTS

    p32 = load_pipeline(folder, precision="fp32", device="cpu")
    p16 = load_pipeline(folder, precision="bf16", device="cpu")  # U-Net packed where oneDNN has bf16, channels_last VAE
    per_prompt = max(1, sizes.shapes_images // len(SAMPLE_PROMPTS))
    prompts = list(SAMPLE_PROMPTS[: sizes.shapes_images // per_prompt])
    n = len(prompts) * per_prompt
    steps, side = sizes.shapes_steps, p32.default_size

    def run(p: StableDiffusion):
        return lambda: p.txt2img(prompts, "", sampler="dpmpp_2m", steps=steps, cfg_scale=7.5, height=side,
                                 width=side, num_images=per_prompt, seed=0, output="tensor")

    variants = {L32: run(p32), LBF: run(p16)}
    if compile_backend:
        p16c = StableDiffusion(torch.compile(p16.unet, backend=compile_backend), p16.vae, p16.text_encoder,
                               p16.tokenizer, p16.schedule)
        variants[LCO] = run(p16c)
    notes = {}
    try:
        import diffusers

        pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            str(folder), torch_dtype=torch.float32, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        d_prompts = [q for q in prompts for _ in range(per_prompt)]
        variants = {D32: lambda: pipe(d_prompts, negative_prompt=[""] * n, num_inference_steps=steps,
                                      guidance_scale=7.5, height=side, width=side, output_type="pt",
                                      generator=torch.Generator().manual_seed(0)).images, **variants}
    except Exception as e:  # noqa: BLE001 - a reference that does not load is reported, not fatal
        notes["diffusers"] = f"diffusers could not run the bundled model: {type(e).__name__}: {str(e)[:120]}"
    # FLOPs: the text encoding, one U-Net call per step on the CFG batch [uncond, cond], the decode
    ids = p32.tokenizer(prompts + [""] * len(prompts))  # (2P, T)
    lat = p32.default_size // p32.downscale
    x = torch.randn(2 * n, p32.latent_channels, lat, lat)  # (2n, C, h, w)
    with torch.no_grad():
        ctx = p32.text_encoder(p32.tokenizer([prompts[0]] * (2 * n))).last_hidden_state  # (2n, T, D)
    flops = (count_flops(lambda: p32.text_encoder(ids)) + steps * count_flops(lambda: p32.unet(x, 500.0, ctx))
             + count_flops(lambda: p32.vae.decode(torch.randn(n, p32.latent_channels, lat, lat))))
    what = f"{n} images {side}x{side}, {steps} steps dpmpp_2m, CFG 7.5 (target < {SHAPES_TARGET_S:g} s)"
    wl = Workload("shapes model", what, variants, flops)
    return wl, notes


CHILD = """\
import sys, time
from ldmkit.cli import main
from ldmkit.pipelines.stable_diffusion import StableDiffusion
image_seconds = []  # the txt2img call alone: text, sampling, decode; the work the txt2img workload times
untimed = StableDiffusion.txt2img
def timed(self, *args, **kwargs):
    start = time.perf_counter()
    try:
        return untimed(self, *args, **kwargs)
    finally:
        image_seconds.append(time.perf_counter() - start)
StableDiffusion.txt2img = timed
t0 = time.perf_counter()
rc = main(sys.argv[1:])
status = open("/proc/self/status").read()
peak = next(int(l.split()[1]) * 1024 for l in status.splitlines() if l.startswith("VmHWM:"))
print(f"BENCH {time.perf_counter() - t0:.3f} {peak} {sum(image_seconds):.3f}")
sys.exit(rc)
"""


def cli_run(m: Models, sizes: Sizes, steps: int, runs: int, malloc: str,
            precision: str) -> tuple[list[list[str]], list[str]]:
    """`ldmkit generate --precision PRECISION` as a user runs it, in a fresh process, on the
    random-weight models saved as a diffusers folder in bf16: seconds from start to PNG (loading
    included) and that process's peak RSS (with --malloc none, LDMKIT_KEEP_FREED_MEMORY=0).
    Returns table rows and notes."""
    import subprocess

    from ldmkit.checkpoints.loading import Components, save_diffusers

    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "sd15"
        comps = Components(m.unet16, m.vae16, m.text16, CLIPTokenizer.from_openai_bpe(),
                           ScheduleConfig.from_dict(SD15_SCHEDULER))
        save_diffusers(comps, folder)
        h = sizes.image
        argv = ["generate", PROMPT, "--model", str(folder), "--steps", str(steps), "--width", str(h),
                "--height", str(h), "--seed", "0", "--precision", precision, "--device", "cpu",
                "--out", str(Path(tmp) / "out.png")]
        for r in range(runs):
            proc = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),
                                       "LDMKIT_KEEP_FREED_MEMORY": "0" if malloc == "none" else "1"})
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
            if proc.returncode != 0 or line is None:
                notes.append(f"ldmkit generate failed (exit {proc.returncode}): {proc.stderr.strip()[-200:]}")
                break
            seconds, peak, image_seconds = line.split()[1:]
            log(f"  ldmkit generate: run {r + 1}/{runs} {float(seconds):.1f} s ({float(image_seconds):.1f} s in "
                f"txt2img), peak RSS {int(peak) / 2**30:.2f} GiB")
            rows.append([f"run {r + 1}", f"{float(seconds):.1f}", f"{float(image_seconds):.2f}",
                         f"{int(peak) / 2**30:.2f}"])
    return rows, notes


LAC = "ldmkit bf16 autocast CL"  # training: bf16 autocast with channels_last weights and inputs


def training_workload(sizes: Sizes, folder: Path) -> Workload:
    """One optimizer step of the bundled model's U-Net shape (its unet/config.json, random
    weights): forward on noised latents with its 16 x 128 text context, MSE on epsilon, backward,
    AdamW; ldmkit against diffusers' UNet2DConditionModel of the same config, each with its own
    weights and optimizer."""
    import json

    import diffusers

    from ldmkit.checkpoints.keys_unet_vae import unet_config_from_diffusers

    config = json.loads((folder / "unet" / "config.json").read_text())
    ucfg = unet_config_from_diffusers(config)
    batch, side = sizes.train_batch, config["sample_size"]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, ucfg.in_channels, side, side, generator=g)  # (B, 4, h, w)
    eps = torch.randn(x.shape, generator=g)
    ctx = torch.randn(batch, 16, ucfg.context_dim, generator=g)  # (B, T, D)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    dcfg = {k: v for k, v in config.items() if not k.startswith("_")}

    def step_fn(model: nn.Module, call, autocast: bool, channels_last: bool):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        inputs = x.contiguous(memory_format=CL) if channels_last else x

        def step():
            with torch.enable_grad():
                with torch.autocast("cpu", dtype=BF16, enabled=autocast):
                    pred = call(model, inputs)
                loss = torch.nn.functional.mse_loss(pred.float(), eps)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            return loss.detach()
        return step

    torch.manual_seed(0)
    ours = lambda: UNet(ucfg).train()  # noqa: E731
    theirs = lambda: diffusers.UNet2DConditionModel(**dcfg).train()  # noqa: E731
    call_ours = lambda m, inp: m(inp, t, ctx)  # noqa: E731
    call_theirs = lambda m, inp: m(inp, t, encoder_hidden_states=ctx, return_dict=False)[0]  # noqa: E731
    variants = {
        D32: step_fn(theirs(), call_theirs, False, False),
        DAC: step_fn(theirs(), call_theirs, True, False),
        L32: step_fn(ours(), call_ours, False, False),
        LCL: step_fn(ours().to(memory_format=CL), call_ours, False, False),  # the trainer's default layout
        LAC: step_fn(ours().to(memory_format=CL), call_ours, True, True),
    }
    flop_model = ours()

    def fwd_bwd():
        with torch.enable_grad():
            call_ours(flop_model, x).square().mean().backward()

    what = f"batch {batch}, {ucfg.in_channels}x{side}x{side} latents, forward + backward + AdamW"
    return Workload(TRAINING, what, variants, count_flops(fwd_bwd))


def expected_pipeline_seconds(workloads: dict[str, Workload], steps: int, runs: int) -> float:
    """Steps x U-Net + decode + text, summed over the variants the pipeline times, times runs."""
    total = 0.0
    for name in (D32, DAC, L32, LBF, LCO):
        parts = [workloads[w].timings.get(name) for w in ("U-Net step", "VAE decode", "text encode")]
        if name == L32:  # the pipeline's float32 run is channels_last
            parts[:2] = workloads["U-Net step"].timings.get(LCL), workloads["VAE decode"].timings.get(LCL)
        if name in (LBF, LCO):  # the pipeline's bf16 runs use the channels_last VAE and the bf16 text encoder
            parts[1:] = workloads["VAE decode"].timings.get(L16), workloads["text encode"].timings.get("ldmkit bf16")
        if all(p is not None and p.times for p in parts):
            total += steps * parts[0].median + parts[1].median + parts[2].median
    return total * runs


# -- quality ---------------------------------------------------------------------------------------------


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in float32."""
    a, ref = a.float(), ref.float()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def mad_255(a: torch.Tensor, ref: torch.Tensor, clamp: bool) -> float:
    """Mean |a - ref| of images in [-1, 1], in 0..255 units (clamped to the image range, as saved,
    when `clamp`)."""
    a, ref = a.float(), ref.float()
    if clamp:
        a, ref = a.clamp(-1, 1), ref.clamp(-1, 1)
    return float((a - ref).abs().mean() * 127.5)


@dataclass
class Check:
    name: str
    value: float
    unit: str
    target: float | None = None  # pass when value < target

    def row(self) -> list[str]:
        verdict = "" if self.target is None else ("pass" if self.value < self.target else "FAIL")
        target = "" if self.target is None else f"< {self.target:g}"
        return [self.name, f"{self.value:.3g} {self.unit}".strip(), target, verdict]


def quality_checks(workloads: dict[str, Workload]) -> list[Check]:
    """Compare the last timed outputs (every variant of a workload ran on the same inputs); a
    comparison whose variant failed is left out."""
    checks = []
    unet, vae, text = (workloads.get(k) for k in ("U-Net step", "VAE decode", "text encode"))
    if unet is not None:
        for a, b, target in ((L16, L32, UNET_REL_ERR_TARGET), (LPK, L32, UNET_REL_ERR_TARGET),
                             (LPS, L32, UNET_REL_ERR_TARGET), (LPG, L32, UNET_REL_ERR_TARGET),
                             (LPW, L32, UNET_REL_ERR_TARGET),
                             (LCO, L32, UNET_REL_ERR_TARGET), (DAC, D32, None),
                             (L32, D32, None), (LCL, L32, None)):
            if unet.has(a, b):
                checks.append(Check(f"U-Net {a} vs {b}: relative L2 error", rel_err(unet.out(a), unet.out(b)), "",
                                    target))
    if vae is not None:
        for a, b, clamp, target in ((L16, L32, True, VAE_MAD_TARGET), (L16, L32, False, None),
                                    (L16G, L32, True, VAE_MAD_TARGET), (LVW, L32, True, VAE_MAD_TARGET),
                                    (DAC, D32, True, None),
                                    (L32, D32, False, None), (LCL, L32, False, None)):
            if vae.has(a, b):
                how = "clamped to the image range" if clamp else "unclamped"
                checks.append(Check(f"VAE {a} vs {b}: mean |diff|, {how}", mad_255(vae.out(a), vae.out(b), clamp),
                                    "/255", target))
        if vae.has(L32):
            checks.append(Check("VAE random-weight output std (the image range is [-1, 1])",
                                float(vae.out(L32).float().std()), ""))
    if text is not None:
        for a, b in (("ldmkit bf16", L32), (L32, D32)):
            if text.has(a, b):
                checks.append(Check(f"text {a} vs {b.replace('diffusers', 'transformers')}: relative L2 error",
                                    rel_err(text.out(a), text.out(b)), ""))
    return checks


def image_checks(wl: Workload) -> list[Check]:
    """Images in [0, 1] of a pipeline workload against ldmkit fp32's (and diffusers bf16 autocast
    against diffusers fp32), as mean |difference| in 0..255 units."""
    pairs = [(name, L32) for name in wl.timings if name != L32]
    pairs += [(DAC, D32)]
    pairs = [(a, b) for a, b in pairs if wl.has(a, b)]
    return [Check(f"{wl.name}: {a} vs {b} images: mean |diff|",
                  float((wl.out(a).float() - wl.out(b).float()).abs().mean() * 255), "/255") for a, b in pairs]


# -- bf16 + channels_last compatibility on tiny modules ------------------------------------------------


class LayoutTracer(TorchDispatchMode):
    """Counts, per module and op, where a channels_last input comes out contiguous NCHW (a layout
    change) and where a bf16 input comes out float32 (an upcast), plus every explicit copy."""

    def __init__(self):
        super().__init__()
        self.where: list[str] = ["(top)"]
        self.layout = Counter()
        self.upcast = Counter()
        self.copies = Counter()

    @staticmethod
    def _is_cl(t) -> bool:
        return (isinstance(t, torch.Tensor) and t.ndim == 4 and t.shape[1] > 1 and t.shape[2] * t.shape[3] > 1
                and t.is_contiguous(memory_format=CL) and not t.is_contiguous())

    @staticmethod
    def _is_nchw(t) -> bool:
        return (isinstance(t, torch.Tensor) and t.ndim == 4 and t.shape[1] > 1 and t.shape[2] * t.shape[3] > 1
                and t.is_contiguous() and not t.is_contiguous(memory_format=CL))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # views move no data
            return out
        flat = list(args) + list((kwargs or {}).values())
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        outs = out if isinstance(out, (tuple, list)) else [out]
        key = (self.where[-1], str(func.overloadpacket.__name__))
        if any(self._is_cl(a) for a in tensors) and any(self._is_nchw(o) for o in outs):
            self.layout[key] += 1
        first = outs[0] if outs else None  # the main result (SDPA's logsumexp is always float32)
        if (any(a.dtype == BF16 for a in tensors)
                and isinstance(first, torch.Tensor) and first.dtype == torch.float32):
            self.upcast[key] += 1
        if func.overloadpacket.__name__ in ("clone", "_to_copy", "copy_", "contiguous"):
            size = sum(o.numel() * o.element_size() for o in outs if isinstance(o, torch.Tensor))
            self.copies[key] += size
        return out

    def attach(self, model: nn.Module) -> list:
        """Hooks that keep `where` at the class name of the innermost running module."""

        def enter(module, args):
            self.where.append(type(module).__name__)

        def leave(module, args, output):
            self.where.pop()

        return [h for mod in model.modules()
                for h in (mod.register_forward_pre_hook(enter), mod.register_forward_hook(leave))]


def compat_checks() -> tuple[list[list[str]], list[list[str]]]:
    """Tiny modules with bf16 weights and channels_last inputs against float32: whether each runs,
    its relative error, whether the output stays channels_last; and the layout changes and upcasts
    seen inside (by module class and op)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    unet, vae = UNet(unet_preset("tiny")).eval(), AutoencoderKL(vae_preset("tiny")).eval()
    text = CLIPTextModel(CLIPTextConfig.preset("tiny")).eval()
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    img = torch.randn(1, 3, 32, 32, generator=g)
    z = torch.randn(1, 4, 32, 32, generator=g)
    ids = torch.randint(0, 998, (2, 77), generator=g)
    ids[:, 9] = 999
    feat = torch.randn(2, 32, 8, 8, generator=g)
    cases = [
        ("GroupNorm", nn.GroupNorm(8, 32), (feat,)),
        ("SpatialSelfAttention (GroupNorm + SDPA)", SpatialSelfAttention(32, 1, 8), (feat,)),
        ("SpatialTransformer (conv proj + SDPA self/cross)", SpatialTransformer(32, 2, 32, groups=8), (feat, ctx)),
        ("SpatialTransformer (linear proj)", SpatialTransformer(32, 2, 32, groups=8, linear_projection=True), (feat, ctx)),
        ("Attention (SDPA)", Attention(32, 2, 16, context_dim=32), (feat.flatten(2).transpose(1, 2).contiguous(), ctx)),
        ("UNet tiny", unet, (x, torch.tensor([10.0, 500.0]), ctx)),
        ("VAE tiny encode", _Call(vae, lambda m, a: m.encode(a).mean), (img,)),
        ("VAE tiny decode", _Call(vae, lambda m, a: m.decode(a)), (z,)),
        ("VAE tiny decode sliced + tiled", _Call(vae, lambda m, a: m.decode(torch.cat([a, a]), sliced=True, tile_size=32)), (z,)),
        ("CLIP text tiny", _Call(text, lambda m, a: m(a).last_hidden_state), (ids,)),
    ]
    rows, trace_rows = [], []
    tracer_total = LayoutTracer()
    for name, module, args in cases:
        module = module.eval()
        with torch.no_grad():
            ref = module(*args)
            try:
                m16 = copy.deepcopy(module).to(BF16).to(memory_format=CL)
                a16 = tuple(_to_bf16_cl(a) for a in args)
                handles = tracer_total.attach(m16)
                try:
                    with tracer_total:
                        out = m16(*a16)
                finally:
                    for h in handles:
                        h.remove()
                    tracer_total.where[1:] = []
                finite = bool(torch.isfinite(out.float()).all())
                cl = "yes" if out.ndim == 4 and out.is_contiguous(memory_format=CL) else ("n/a" if out.ndim != 4 else "no")
                rows.append([name, "ok" if finite else "NON-FINITE", f"{rel_err(out, ref):.2e}", str(out.dtype).removeprefix("torch."), cl])
            except Exception as e:  # noqa: BLE001 - a failing op is the finding
                rows.append([name, f"ERROR {type(e).__name__}: {str(e)[:100]}", "", "", ""])
    for (where, op), n in sorted(tracer_total.layout.items(), key=lambda kv: -kv[1]):
        trace_rows.append(["layout CL -> NCHW", where, op, str(n)])
    for (where, op), n in sorted(tracer_total.upcast.items(), key=lambda kv: -kv[1]):
        trace_rows.append(["bf16 -> fp32 output", where, op, str(n)])
    for (where, op), n in sorted(tracer_total.copies.items(), key=lambda kv: -kv[1]):
        trace_rows.append(["explicit copy (bytes)", where, op, str(n)])
    return rows, trace_rows


class _Call(nn.Module):
    """A module with one method picked as its forward, for the checks above."""

    def __init__(self, model: nn.Module, fn: Callable):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *args):
        return self.fn(self.model, *args)


def _to_bf16_cl(a):
    if not isinstance(a, torch.Tensor) or not a.is_floating_point():
        return a
    if a.ndim == 1:  # timesteps stay float32, as the samplers pass them
        return a
    a = a.to(BF16)
    return a.contiguous(memory_format=CL) if a.ndim == 4 else a


# -- report -----------------------------------------------------------------------------------------------


def fmt_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table, columns padded so it also reads as plain text."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def timing_rows(workloads: list[Workload], peaks: dict[torch.dtype, float]) -> list[list[str]]:
    rows = []
    for wl in workloads:
        base32 = wl.timings.get(D32) if wl.has(D32) else None
        base16 = wl.timings.get(DAC) if wl.has(DAC) else None
        for name, t in wl.timings.items():
            if not t.times:
                rows.append([wl.name, name, f"failed: {t.error}"] + [""] * 9)
                continue
            s = t.median
            tflops = wl.flops / s / 1e12
            rows.append([
                wl.name, name, f"{s:.3f}",
                f"{base32.median / s:.2f}x" if base32 else "",
                f"{base16.median / s:.2f}x" if base16 else "",
                f"{tflops:.3f}",
                f"{100 * tflops / peaks[torch.float32]:.0f}%",
                "" if math.isnan(peaks[BF16]) else f"{100 * tflops / peaks[BF16]:.0f}%",  # not measured
                f"{(t.user + t.sys) / sum(t.times):.2f}",
                f"{100 * t.sys / max(t.user + t.sys, 1e-9):.0f}%",
                f"{t.peak / 2**30:.2f}", f"{t.above / 2**30:.2f}",
            ])
    return rows


TIMING_HEADER = ["workload", "variant", "median s", "vs diffusers fp32", "vs diffusers bf16 AC", "TFLOP/s",
                 "% fp32 peak", "% bf16 peak", "cores busy", "sys %", "peak RSS GiB", "above start GiB"]


def environment(args) -> list[str]:
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    import diffusers
    import transformers

    return [
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- mode: {'SMOKE (tiny models: code paths only, the numbers mean nothing)' if args.smoke else 'SD 1.5 shapes, random weights'}",
        f"- CPU: {cpu}; native bf16 (AVX512-BF16/AMX): {'yes' if cpu_has_native_bf16() else 'no (bf16 is emulated)'}",
        f"- threads: {torch.get_num_threads()} (torch.set_num_threads); os.cpu_count() = {os.cpu_count()}",
        f"- glibc malloc keeps freed large blocks (--malloc {args.malloc}): "
        f"{MALLOC_POLICIES[args.malloc] if platform.libc_ver()[0] == 'glibc' else 'no: the C library is not glibc'}",
        f"- PyTorch huge pages for tensors of 2 MiB and more (THP_MEM_ALLOC_ENABLE, as `import ldmkit` sets it): "
        f"{os.environ.get(HUGE_PAGES_VARIABLE, 'unset')}; Linux transparent huge pages: {linux_huge_page_mode()}, for every variant",
        f"- torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}",
        f"- runs: median of {args.runs} after {args.warmup} warm-up call(s) per variant, each timed call right after "
        f"an untimed one of its variant; pipelines: {args.pipeline_runs} run(s), no warm-up",
    ]


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


# -- main -------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny models, a few seconds: exercise the code paths only")
    p.add_argument("--runs", type=int, default=3, help="timed calls per variant; the median is reported (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per variant first (default 1)")
    p.add_argument("--pipeline-runs", type=int, default=1,
                   help="timed txt2img runs per variant (default 1: at SD 1.5 size one run of each variant takes "
                        "minutes, tens of minutes for bf16 on CPUs without native bf16)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps of the txt2img workload (default 20)")
    p.add_argument("--skip-pipeline", action="store_true", help="leave out the whole txt2img (long)")
    p.add_argument("--skip-shapes", action="store_true", help="leave out the bundled shapes model")
    p.add_argument("--skip-cli", action="store_true", help="leave out `ldmkit generate` in a fresh process")
    p.add_argument("--skip-training", action="store_true", help="leave out the bundled U-Net's training step")
    p.add_argument("--shapes-model", type=Path, default=BUNDLED_MODEL,
                   help="the shapes model folder (default: the bundled one, skipped when absent)")
    p.add_argument("--skip-compat", action="store_true", help="leave out the tiny bf16/channels_last checks")
    p.add_argument("--malloc", choices=tuple(MALLOC_POLICIES), default="ldmkit",
                   help="which variants run with glibc keeping freed large blocks (fewer page faults): "
                        "ldmkit's inference variants, as load_pipeline sets it (default), all, or none")
    p.add_argument("--emulated-bf16", action="store_true",
                   help="keep the bf16 variants on a CPU without native bf16 (left out there by default: hours)")
    p.add_argument("--compile", action="store_true", help="add ldmkit bf16 channels_last under torch.compile")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend for --compile (default inductor; 'eager' checks the wiring fast)")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown report (default bench/RESULTS.md; with --smoke a file in the temp folder)")
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.threads < 1 or args.steps < 1:
        p.error("--runs, --threads and --steps must be >= 1, --warmup >= 0")
    if args.pipeline_runs < 1:
        p.error("--pipeline-runs must be >= 1")
    if args.out is None:  # a smoke run never overwrites the real results
        args.out = (Path(tempfile.gettempdir()) / "ldmkit-bench-smoke.md" if args.smoke
                    else Path(__file__).resolve().parent / "RESULTS.md")
    return args


def render(head: list[str], done: list[Workload], peaks: dict, checks: list[Check], compat, notes: list[str],
           seconds: float, partial: bool, cli_rows: list[list[str]]) -> str:
    """The markdown report."""
    sections = [*head, "## Timings", "", "\n".join(f"- {w.name}: {w.what}; {w.flops / 1e9:.1f} GFLOP" for w in done), "",
                fmt_table(TIMING_HEADER, timing_rows(done, peaks)), "",
                "- `vs diffusers ...`: the reference's median time divided by this one (> 1: faster than it).",
                "- TFLOP/s: matmul, convolution and attention FLOPs (FlopCounterMode on ldmkit fp32, CPU SDPA "
                "added) over the median time; `% peak` against the measured matmul peaks above.",
                "- peak RSS: this process's peak resident memory during the variant's timed calls (VmHWM, reset "
                "before each call); every model stays loaded, so it includes all weights (the diffusers and "
                "transformers models share ldmkit fp32's weight memory). `above start`: peak minus the RSS "
                "just before the call, roughly the call's own activations.",
                "- cores busy: process CPU seconds (user + system) per wall second during the timed calls; "
                "`sys %`: the system share of them (mostly page faults on freshly allocated memory).",
                "- CL: channels_last weights and inputs. compile: the first call (compilation) is left out of "
                "the median; its time is in the log.", ""]
    if cli_rows:
        sections += ["## `ldmkit generate` in a fresh process", "",
                     "The same random weights saved as a diffusers folder (bf16), one image per run (the "
                     "pipeline workload's size and steps), `--precision bf16` (fp32 where bf16 is emulated, "
                     "as said above): seconds inside `ldmkit.cli.main`, from the call to the PNG (loading, "
                     "prepacking, text, sampling, decode, save; not Python's start-up); of them, "
                     "the seconds inside `StableDiffusion.txt2img` (text, sampling, decode: the txt2img "
                     "workload's work, its first call in a process that holds only this model); and the "
                     "process's peak RSS.", "",
                     fmt_table(["run", "seconds", "txt2img call s", "peak RSS GiB"], cli_rows), ""]
    sections += ["## Quality", "", fmt_table(["check", "value", "target", ""], [c.row() for c in checks]), ""]
    if compat is not None:
        rows, trace = compat
        sections += ["## bf16 weights + channels_last inputs on tiny modules", "",
                     fmt_table(["module", "runs", "rel. error vs fp32", "out dtype", "out channels_last"], rows), "",
                     "Where layouts change or bf16 comes out float32 inside them (module class, aten op, count; "
                     "copies in bytes):", "",
                     fmt_table(["event", "module", "op", "count"], trace) if trace else "(none)", ""]
    if notes:
        sections += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    sections.append(f"{'PARTIAL (still running): ' if partial else ''}total wall time {seconds:.1f} s.")
    return "\n".join(sections) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = sizes_for(args.smoke)
    started = time.perf_counter()
    head: list[str] = [f"# ldmkit speed benchmark{' (smoke)' if args.smoke else ''}", "", *environment(args), ""]

    # a smoke run keeps bf16 everywhere: its tiny models take seconds even where bf16 is emulated
    keep_bf16 = cpu_has_native_bf16() or args.emulated_bf16 or args.smoke
    log(f"matmul peak ({sizes.matmul_n}x{sizes.matmul_n}) ...")
    peaks = {dt: matmul_peak(dt, sizes.matmul_n, args.runs) if keep_bf16 or dt == torch.float32 else math.nan
             for dt in (torch.float32, BF16)}
    head += [f"Matmul peak ({sizes.matmul_n}x{sizes.matmul_n}, best of {max(args.runs, 2)}): "
             f"fp32 {peaks[torch.float32]:.3f} TFLOP/s, bf16 "
             + (f"{peaks[BF16]:.3f} TFLOP/s." if keep_bf16 else "not measured."), ""]
    log(head[-2])
    if not keep_bf16:
        head += ["This CPU emulates bf16 (no AVX512-BF16/AMX): the variants that compute in bf16 are left out "
                 "(`--emulated-bf16` keeps them), and `ldmkit generate` runs in float32, as `--precision auto` "
                 "does here.", ""]
        log(head[-2])

    def timed(wl: Workload, runs: int, warmup: int, **kwargs) -> dict[str, Timing]:
        wl.variants = native_variants(wl.variants, keep_bf16)
        return time_variants(wl.variants, runs, warmup, wl.name, args.malloc, **kwargs)

    compat = None
    if not args.skip_compat:  # first: seconds, and it does not wait for the long workloads
        log("bf16 + channels_last checks on tiny modules ...")
        compat = compat_checks()

    log("building models ...")
    m = build_models(sizes, args.compile_backend if args.compile else None)
    log(f"models built; RSS {rss() / 2**30:.2f} GiB")
    tokenizer = CLIPTokenizer.from_openai_bpe()
    ids = tokenizer([PROMPT, ""])  # (2, 77)

    workloads: dict[str, Workload] = {}
    workloads["U-Net step"] = unet_workload(m, sizes, args.compile)
    workloads["VAE decode"] = vae_workload(m, sizes)
    workloads["text encode"] = text_workload(m, ids)
    for wl in workloads.values():
        log(f"{wl.name}: {wl.what}; {wl.flops / 1e9:.2f} GFLOP")
        wl.timings = timed(wl, args.runs, args.warmup)

    checks = quality_checks(workloads)
    notes: list[str] = []
    cli_rows: list[list[str]] = []
    done = list(workloads.values())

    def save(partial: bool) -> str:
        report = render(head, done, peaks, checks, compat, notes, time.perf_counter() - started, partial, cli_rows)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        return report

    save(partial=True)  # the components are in, should a long workload below fail or be stopped
    if not args.skip_pipeline:
        try:
            with tempfile.TemporaryDirectory() as folder:
                import transformers

                tokenizer.save(folder)
                hf_tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
                flops_per = {name: w.flops for name, w in workloads.items()}
                steps = sizes.pipeline_steps or args.steps
                pw = pipeline_workload(m, sizes, steps, tokenizer, hf_tokenizer, args.compile, flops_per)
                log(f"{pw.name}: {pw.what}; {pw.flops / 1e12:.2f} TFLOP; expected about "
                    f"{expected_pipeline_seconds(workloads, steps, args.pipeline_runs):.0f} s in all "
                    "(from the component timings)")
                # compiled U-Nets recompile for the pipeline's NCHW inputs: one untimed run first
                pw.timings = timed(pw, args.pipeline_runs, 0, warm_once=(LCO,), rewarm=False)
                checks += image_checks(pw)
                done.append(pw)
        except Exception as e:  # noqa: BLE001 - keep what was measured
            notes.append(f"txt2img workload failed: {type(e).__name__}: {str(e)[:200]}")
            log(notes[-1])
        save(partial=True)

    if not args.skip_cli:
        precision = "bf16" if keep_bf16 else "fp32"
        log(f"ldmkit generate in a fresh process ({precision}, loading included) ...")
        cli_rows, cli_notes = cli_run(m, sizes, sizes.pipeline_steps or args.steps, args.pipeline_runs, args.malloc,
                                      precision)
        notes += cli_notes
        save(partial=True)

    if not args.skip_shapes:
        if args.shapes_model.is_dir():
            try:
                sw, shape_notes = shapes_workload(sizes, args.shapes_model,
                                                  args.compile_backend if args.compile else None)
                notes += list(shape_notes.values())
                log(f"{sw.name}: {sw.what}; {sw.flops / 1e9:.2f} GFLOP")
                sw.timings = timed(sw, args.runs, args.warmup)
                checks += image_checks(sw)
                ours = [t.median for name, t in sw.timings.items() if name.startswith("ldmkit") and t.times]
                if ours:
                    checks.append(Check(f"shapes model: fastest ldmkit variant ({sw.what.split(',')[0]})", min(ours),
                                        "s", SHAPES_TARGET_S))
                done.append(sw)
            except Exception as e:  # noqa: BLE001 - keep what was measured
                notes.append(f"shapes model workload failed: {type(e).__name__}: {str(e)[:200]}")
                log(notes[-1])
        else:
            notes.append(f"No shapes model at {args.shapes_model}: its workload was skipped.")

    if not args.skip_training and args.shapes_model.is_dir():
        try:
            tw = training_workload(sizes, args.shapes_model)
            log(f"{tw.name}: {tw.what}; {tw.flops / 1e9:.2f} GFLOP")
            tw.timings = timed(tw, args.runs, args.warmup)
            batch = sizes.train_batch
            notes += [f"U-Net training step, {name}: {batch / t.median:.0f} images/s" for name, t in tw.timings.items()
                      if t.times]
            done.append(tw)
        except Exception as e:  # noqa: BLE001 - keep what was measured
            notes.append(f"training workload failed: {type(e).__name__}: {str(e)[:200]}")
            log(notes[-1])

    print(save(partial=False))
    log(f"wrote {args.out}")
    failed = [c.name for c in checks if c.target is not None and not c.value < c.target]
    if failed:
        log("checks over target: " + "; ".join(failed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
