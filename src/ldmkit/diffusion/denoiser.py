"""Denoisers: the one interface samplers see, `denoiser(x, sigma) -> x0 estimate`.

A U-Net trained on discrete timesteps predicts epsilon, v or x0 from the DDPM sample
x_t = x / sqrt(1 + sigma^2). `Denoiser` adapts it once (Karras et al. 2022, EDM, section 2 and
table 1 "preconditioning": c_in, c_skip, c_out), so that every sampler only deals with sigma:

    epsilon:  D(x) = x - sigma * F(c_in x, t)
    v:        D(x) = c_skip x + c_out F(c_in x, t),  c_skip = 1 / (1 + sigma^2),
              c_out = -sigma / sqrt(1 + sigma^2)
    sample:   D(x) = F(c_in x, t)

with c_in = 1 / sqrt(1 + sigma^2) and t = schedule.sigma_to_t(sigma).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from .schedule import NoiseSchedule


class DenoiserFn(Protocol):
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor: ...


def per_sample_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma as a float64 tensor of shape (B,) for a batch x of shape (B, ...)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return sigma.reshape(-1).expand(x.shape[0]) if sigma.numel() == 1 else sigma.reshape(x.shape[0])


class Denoiser:
    """Wrap `model(x_t, t, **kwargs) -> prediction` trained on `schedule` as a sigma-space denoiser.

    `quantize_timesteps` rounds t to the nearest training timestep, for samplers whose reference
    implementation feeds the model integer timesteps (diffusers' DPM-Solver with Karras sigmas).
    """

    def __init__(self, model: Callable, schedule: NoiseSchedule, prediction_type: str | None = None,
                 quantize_timesteps: bool = False) -> None:
        self.model = model
        self.schedule = schedule
        self.prediction_type = prediction_type or schedule.prediction_type
        self.quantize_timesteps = quantize_timesteps

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        t = self.schedule.sigma_to_t(sigma)
        return t.round() if self.quantize_timesteps else t

    def __call__(self, x: torch.Tensor, sigma, **kwargs) -> torch.Tensor:
        sigma = per_sample_sigma(sigma, x).to(x.device)
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, ..., 1)
        c_in = 1 / (1 + s**2).sqrt()
        t = self.timestep(sigma).float()
        out = self.model((x * c_in).to(x.dtype), t, **kwargs).to(x.dtype)
        return self.from_prediction(x, sigma, out)

    def from_prediction(self, x: torch.Tensor, sigma, out: torch.Tensor) -> torch.Tensor:
        """The denoised estimate for the network output `out` (eps, v or x0) at (x, sigma)."""
        s = per_sample_sigma(sigma, x).to(x.device).reshape(-1, *([1] * (x.ndim - 1)))
        if self.prediction_type == "epsilon":
            return x - (s * out).to(x.dtype)
        if self.prediction_type == "v_prediction":
            return (x / (1 + s**2) - out * s / (1 + s**2).sqrt()).to(x.dtype)
        return out

    def to_prediction(self, x: torch.Tensor, sigma, denoised: torch.Tensor) -> torch.Tensor:
        """The network output (eps or v) that would give `denoised` at (x, sigma); inverse of __call__."""
        s = per_sample_sigma(sigma, x).to(x.device).reshape(-1, *([1] * (x.ndim - 1)))
        if self.prediction_type == "epsilon":
            return ((x - denoised) / s).to(x.dtype)
        if self.prediction_type == "v_prediction":
            return ((x / (1 + s**2) - denoised) * (1 + s**2).sqrt() / s).to(x.dtype)
        return denoised


def classifier_free_guidance(denoiser: DenoiserFn, cond: dict, uncond: dict, scale: float,
                             rescale: float = 0.0) -> DenoiserFn:
    """Ho & Salimans 2022, "Classifier-Free Diffusion Guidance": D_u + scale * (D_c - D_u).

    The unconditional and conditional passes run as one batch [uncond, cond] (like diffusers), so
    each tensor in `cond`/`uncond` is concatenated along the batch. Guiding the denoised estimate is
    the same as guiding eps or v, since D is affine in the network output at fixed (x, sigma).
    With scale == 1 only the conditional pass runs.

    `rescale` (0..1; needs a `Denoiser`) is Lin et al. 2024's guidance rescale, diffusers'
    `guidance_rescale`: the guided network output is scaled to the conditional output's standard
    deviation per image and mixed in with this weight, against the over-bright, over-saturated
    images that a strong scale gives models trained with zero terminal SNR.
    """

    def guided(x: torch.Tensor, sigma, **kwargs) -> torch.Tensor:
        if scale == 1.0:
            return denoiser(x, sigma, **cond, **kwargs)
        sigma = per_sample_sigma(sigma, x)
        both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
        d_uncond, d_cond = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both, **kwargs).chunk(2)
        d_guided = d_uncond + scale * (d_cond - d_uncond)
        return _rescaled(denoiser, x, sigma, d_guided, d_cond, rescale) if rescale > 0 else d_guided

    return guided


def _rescaled(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, d_guided: torch.Tensor,
              d_cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Guidance rescale, done where diffusers does it: on the network outputs (eps or v)."""
    out_guided, out_cond = denoiser.to_prediction(x, sigma, d_guided), denoiser.to_prediction(x, sigma, d_cond)
    dims = tuple(range(1, x.ndim))
    matched = out_guided * (out_cond.std(dim=dims, keepdim=True) / out_guided.std(dim=dims, keepdim=True))
    return denoiser.from_prediction(x, sigma, rescale * matched + (1 - rescale) * out_guided)
