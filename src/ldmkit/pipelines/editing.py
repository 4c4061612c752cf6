"""Real-image editing by DDIM inversion: image -> noise under one prompt, noise -> image under another.

    encode the image      -> latents z0 (the VAE posterior mean: no randomness)
    invert (source)       -> run the deterministic DDIM ODE backwards to sigma_start (invert_euler)
    regenerate (target)   -> run DDIM forwards from there under the target prompt and CFG
    decode

Song et al. 2021 ("Denoising Diffusion Implicit Models", section 4.3) show that the eta = 0 DDIM
step is an ODE step and can be run backwards to encode an image; editing by regenerating the
encoding under another prompt is the baseline of Hertz et al. 2022 ("Prompt-to-Prompt") and
Mokady et al. 2023 ("Null-text Inversion"). Inversion runs with CFG scale 1 (the conditional
model alone), the standard choice: guidance > 1 amplifies the inversion's per-step error, which
Mokady et al. then correct by optimising the null-text embedding (not done here). Fixed-point
iterations (Pan et al. 2023) make each inverse step solve the implicit DDIM equation, so that
regenerating with the same prompt and CFG 1 returns the input latents almost exactly.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..diffusion.samplers import invert_euler
from ..diffusion.sampling import SamplingPlan
from ..errors import InvalidArgument
from .stable_diffusion import (Callback, ImageInput, StableDiffusion, _as_prompts, _check_common,
                               _check_strength, _repeat_to)


def _contexts(pipe: StableDiffusion, prompt: str | Sequence[str], negative_prompt: str | Sequence[str],
              batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) contexts spread over `batch` images (one prompt for all, or one per image)."""
    prompts = _as_prompts(prompt)
    cond, uncond = pipe.encode_prompt(prompts, _as_prompts(negative_prompt, "negative_prompt"), 1)
    return _repeat_to(cond, batch, "prompt"), _repeat_to(uncond, batch, "prompt")


@torch.no_grad()
def encode_mean(pipe: StableDiffusion, pixels: torch.Tensor) -> torch.Tensor:
    """U-Net latents (B, C, h, w) of images (B, 3, H, W) in [0, 1]: the VAE posterior mean times
    the scaling factor (deterministic, unlike the posterior sample img2img draws)."""
    x = pixels.to(pipe.device, pipe.vae_dtype) * 2 - 1  # [-1, 1]
    posterior = pipe.vae.encode(x, sliced=True, tile_size=pipe.vae_tile_size)
    return posterior.mode().float() * pipe.vae.config.scaling_factor


@torch.no_grad()
def invert(pipe: StableDiffusion, latents: torch.Tensor, prompt: str | Sequence[str], plan: SamplingPlan, *,
           negative_prompt: str | Sequence[str] = "", cfg_scale: float = 1.0,
           fixed_point_iters: int = 5) -> torch.Tensor:
    """DDIM inversion (Song et al. 2021, section 4.3): U-Net latents -> x at plan.sigmas[0] (VE view).

    The latents are taken as the sampler's result at plan.sigmas[-1] (what `SamplingPlan.to_vp`
    turns back into latents), and the deterministic DDIM/Euler step is run up the plan's sigmas
    under `prompt` with classifier-free guidance `cfg_scale` (1: the conditional model only).
    """
    cond, uncond = _contexts(pipe, prompt, negative_prompt, latents.shape[0])
    denoiser = pipe._denoiser(plan, {"context": cond}, {"context": uncond}, cfg_scale)
    x = latents.to(pipe.device).float() * math.sqrt(1 + float(plan.sigmas[-1]) ** 2)  # VP -> VE at sigmas[-1]
    return invert_euler(denoiser, x, plan.sigmas.flip(0), fixed_point_iters=fixed_point_iters)


@torch.no_grad()
def edit(pipe: StableDiffusion, image: ImageInput, source_prompt: str | Sequence[str],
         target_prompt: str | Sequence[str], steps: int = 50, cfg_scale: float = 7.5, strength: float = 1.0, *,
         negative_prompt: str | Sequence[str] = "", inversion_cfg_scale: float = 1.0, fixed_point_iters: int = 5,
         output: str = "pil", callback: Callback = None):
    """Edit `image` from `source_prompt` (what it shows) to `target_prompt` by DDIM inversion.

    The image's latents are inverted with deterministic DDIM under the source prompt
    (`inversion_cfg_scale`, 1 by default: see the module docstring) up to the noise level
    `strength` of the way (1: pure noise; lower keeps more of the image), then regenerated
    with deterministic DDIM under the target prompt with `cfg_scale`. With the same prompt and
    cfg_scale 1 the result reconstructs the image. Returns what txt2img returns for `output`.
    """
    _check_common("ddim", steps, cfg_scale, 1, output)
    _check_strength(strength)
    if not math.isfinite(inversion_cfg_scale):
        raise InvalidArgument(f"inversion_cfg_scale must be a finite number, got {inversion_cfg_scale}")
    if not isinstance(fixed_point_iters, int) or fixed_point_iters < 0:
        raise InvalidArgument(f"fixed_point_iters must be an integer >= 0, got {fixed_point_iters!r}")
    if pipe.is_inpainting_model:
        raise InvalidArgument("this is an inpainting U-Net; editing needs an ordinary one")
    pixels = pipe._load_image(image)
    plan = pipe.plan("ddim", steps, strength=strength)
    latents = encode_mean(pipe, pixels)
    x = invert(pipe, latents, source_prompt, plan, negative_prompt=negative_prompt,
               cfg_scale=inversion_cfg_scale, fixed_point_iters=fixed_point_iters)
    cond, uncond = _contexts(pipe, target_prompt, negative_prompt, latents.shape[0])
    denoiser = pipe._denoiser(plan, {"context": cond}, {"context": uncond}, cfg_scale)
    return pipe._finish(pipe._sample(plan, denoiser, x, 0.0, None, callback), output)

