"""The samplers users know by name, and the noise levels each one visits.

A `SamplingPlan` is everything that differs between the named samplers besides the update rule:
which sigmas they step through, how pure noise is scaled at the start, and whether the model is
shown rounded timesteps. The rules follow diffusers' schedulers for the same scheduler config, so
that a seed gives diffusers' image:

| name       | update rule (samplers.py)        | timesteps                       | last sigma          |
|------------|----------------------------------|---------------------------------|---------------------|
| ddpm       | ancestral Euler, eta = 1         | spacing, rounded                | 0                   |
| ddim       | ancestral Euler, eta (default 0) | spacing, rounded                | sigma(abar_final)   |
| pndm       | PLMS                             | spacing, rounded                | sigma(abar_final)   |
| lms        | linear multistep, order 4        | spacing, interpolated; Karras   | 0                   |
| euler      | Euler                            | spacing, interpolated; Karras   | 0                   |
| euler_a    | ancestral Euler, eta = 1         | spacing, interpolated; Karras   | 0                   |
| heun       | Heun                             | spacing, interpolated; Karras   | 0                   |
| dpmpp_2m   | DPM-Solver++(2M)                 | DPM-Solver's spacing; Karras    | 0                   |

abar_final is 1 with `set_alpha_to_one`, else abar_0 (SD's setting).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..errors import InvalidArgument, check_choice
from . import samplers
from .schedule import NoiseSchedule, dpm_timesteps, karras_sigmas, spaced_timesteps

SAMPLERS = ("ddpm", "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpmpp_2m")
DISCRETE_SAMPLERS = ("ddpm", "ddim", "pndm")  # step between training timesteps
KARRAS_SAMPLERS = ("lms", "euler", "euler_a", "heun", "dpmpp_2m")
STOCHASTIC_SAMPLERS = ("ddpm", "euler_a")  # ddim too when eta > 0


@dataclass(frozen=True)
class SamplingPlan:
    """The noise levels one sampling run visits, and how it starts."""

    sampler: str  # one of SAMPLERS
    sigmas: torch.Tensor  # float64, descending; sampling goes from sigmas[0] to sigmas[-1]
    init_noise_scale: float  # pure-noise start: x = noise * init_noise_scale
    quantize_timesteps: bool  # the model is shown integer timesteps (DPM-Solver + Karras)
    combine: str = "eps"  # PNDM only: combine "eps" or "v" outputs across steps

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def from_strength(self, strength: float) -> "SamplingPlan":
        """Keep the last int(steps * strength) steps, for starting from a noised image (img2img)."""
        if not 0.0 <= strength <= 1.0:
            raise InvalidArgument(f"strength must be between 0 and 1, got {strength}")
        keep = min(int(self.steps * strength), self.steps)
        return replace(self, sigmas=self.sigmas[self.steps - keep:])

    def to_vp(self, x: torch.Tensor) -> torch.Tensor:
        """Turn the VE result at sigmas[-1] into a DDPM-space sample (what a decoder expects)."""
        return x / math.sqrt(1 + float(self.sigmas[-1]) ** 2)

    def run(self, model, x: torch.Tensor, *, eta: float | None = None, generator=None,
            callback=None) -> torch.Tensor:
        """Sample from x (VE space, at sigmas[0]) with `model(x, sigma) -> denoised`."""
        name = self.sampler
        if name in ("ddpm", "euler_a", "ddim"):
            eta = {"ddpm": 1.0, "euler_a": 1.0, "ddim": 0.0}[name] if eta is None else eta
            noise = samplers.noise_like(x, generator) if eta > 0 else None
            return samplers.sample_euler_ancestral(model, x, self.sigmas, eta=eta, noise=noise, callback=callback)
        if eta not in (None, 0.0):
            raise InvalidArgument(f"eta applies to ddim, ddpm and euler_a, not {name}")
        if name == "euler":
            return samplers.sample_euler(model, x, self.sigmas, callback=callback)
        if name == "heun":
            return samplers.sample_heun(model, x, self.sigmas, callback=callback)
        if name == "lms":
            return samplers.sample_lms(model, x, self.sigmas, callback=callback)
        if name == "pndm":
            return samplers.sample_plms(model, x, self.sigmas, combine=self.combine, callback=callback)
        return samplers.sample_dpmpp_2m(model, x, self.sigmas, callback=callback)

    def model_calls(self) -> int:
        """How many times the model runs (for progress bars)."""
        n = self.steps
        if self.sampler == "heun":
            return 2 * n - int(n > 0 and float(self.sigmas[-1]) == 0)
        if self.sampler == "pndm":
            return n + int(n > 1)
        return n


def make_plan(sampler: str, schedule: NoiseSchedule, steps: int, *, karras: bool = False) -> SamplingPlan:
    """The plan for `steps` steps of a named sampler on a model's training schedule."""
    check_choice("sampler", sampler, SAMPLERS)
    T = schedule.num_train_timesteps
    if not 1 <= steps <= T:
        raise InvalidArgument(f"steps must be between 1 and {T}, got {steps}")
    if karras and sampler not in KARRAS_SAMPLERS:
        raise InvalidArgument(f"Karras sigmas work with {', '.join(KARRAS_SAMPLERS)}, not {sampler}")
    cfg = schedule.config
    quantize = False
    if sampler in DISCRETE_SAMPLERS:
        t = spaced_timesteps(cfg.timestep_spacing, steps, T, cfg.steps_offset, rounded=True)
        final = 0.0 if sampler == "ddpm" else schedule.final_sigma()
        sigmas = schedule.sigmas[torch.from_numpy(t.astype("int64"))]
    elif sampler == "dpmpp_2m":
        final = 0.0
        if karras:
            sigmas = karras_sigmas(steps, schedule.sigma_min, schedule.sigma_max)
            quantize = cfg.beta_schedule != "squaredcos_cap_v2"  # diffusers rounds these timesteps
        else:
            sigmas = schedule.t_to_sigma(torch.from_numpy(dpm_timesteps(cfg.timestep_spacing, steps, T, cfg.steps_offset)))
    else:
        final = 0.0
        t = spaced_timesteps(cfg.timestep_spacing, steps, T, cfg.steps_offset, rounded=False)
        sigmas = schedule.t_to_sigma(torch.from_numpy(t.copy()))
        if karras:
            sigmas = karras_sigmas(steps, float(sigmas[-1]), float(sigmas[0]))
    sigmas = torch.cat([sigmas.double(), torch.tensor([final], dtype=torch.float64)])
    sigma_max = float(sigmas[0])
    # diffusers scales the start of its sigma samplers by sigma_max, not sqrt(1 + sigma_max^2),
    # under linspace/trailing spacing; match it, the difference is tiny at sigma_max ~ 14.6
    if sampler in ("lms", "euler", "euler_a", "heun") and cfg.timestep_spacing != "leading":
        init = sigma_max
    else:
        init = math.sqrt(1 + sigma_max**2)
    combine = "v" if sampler == "pndm" and schedule.prediction_type == "v_prediction" else "eps"
    return SamplingPlan(sampler, sigmas, init, quantize, combine)
