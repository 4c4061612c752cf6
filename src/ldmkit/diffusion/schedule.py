"""Noise schedules: betas, alphas_cumprod, sigmas, and the conversions between time and sigma.

Inside ldmkit the one time variable of the samplers is sigma, the noise level of the
"variance-exploding" view of a DDPM (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", EDM): a noisy sample is x = x0 + sigma * eps, related to the
DDPM sample x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps by

    sigma_t = sqrt((1 - abar_t) / abar_t),      x = x_t * sqrt(1 + sigma_t^2).

Discrete timesteps (what the U-Net was trained on) are converted to and from sigma here, in one
place. The table is computed in float32 exactly as diffusers computes it, so that ldmkit's sampling
trajectories match diffusers' for the same checkpoint; everything downstream is float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from ..errors import InvalidArgument, check_choice

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")

# The smallest abar kept when zero-terminal-SNR makes the last abar exactly 0 (sigma = inf);
# 2**-24 gives sigma_max ~ 4096, the value diffusers uses too.
ZERO_SNR_ALPHA_BAR = 2.0**-24


@dataclass(frozen=True)
class ScheduleConfig:
    """How a model was trained to be noised. Field names follow diffusers' scheduler_config.json."""

    num_train_timesteps: int = 1000  # length T of the training chain
    beta_start: float = 0.00085  # beta at t = 0 (SD 1.x/2.x value)
    beta_end: float = 0.012  # beta at t = T - 1 (SD 1.x/2.x value)
    beta_schedule: str = "scaled_linear"  # one of BETA_SCHEDULES
    prediction_type: str = "epsilon"  # what the network predicts: epsilon, v_prediction or sample
    timestep_spacing: str = "leading"  # how inference timesteps are picked from the chain
    steps_offset: int = 1  # added to "leading" timesteps (SD uses 1)
    set_alpha_to_one: bool = False  # DDIM/PNDM: final step goes to abar = 1 (else abar_0)
    rescale_betas_zero_snr: bool = False  # Lin et al. 2023: make the last step pure noise

    def __post_init__(self) -> None:
        check_choice("beta schedule", self.beta_schedule, BETA_SCHEDULES)
        check_choice("prediction type", self.prediction_type, PREDICTION_TYPES)
        check_choice("timestep spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        if self.num_train_timesteps < 2:
            raise InvalidArgument(f"num_train_timesteps must be at least 2, got {self.num_train_timesteps}")

    @classmethod
    def from_dict(cls, config: dict) -> "ScheduleConfig":
        """Read a diffusers scheduler config dict, ignoring keys that do not describe the noise."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in known and v is not None}
        if config.get("trained_betas") is not None:
            raise InvalidArgument("schedules given as an explicit list of trained_betas are not supported")
        return cls(**values)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def make_betas(schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """The per-step noise variances beta_t, t = 0 .. T-1, as float32 (diffusers' arithmetic)."""
    check_choice("beta schedule", schedule, BETA_SCHEDULES)
    T = num_train_timesteps
    if schedule == "linear":  # Ho et al. 2020
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if schedule == "scaled_linear":  # Rombach et al. 2022 (latent diffusion): linear in sqrt(beta)
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    # Nichol & Dhariwal 2021, "Improved DDPM", eq. 17: abar(t) = cos^2(((t/T + s)/(1 + s)) * pi/2).
    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1.

    Shift and scale sqrt(abar) so that the last step has zero signal (SNR = 0) and the first is kept.
    """
    sqrt_abar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


class NoiseSchedule:
    """The discrete training chain of a model and its sigma <-> timestep conversions.

    Attributes (float64 tensors of length T): `alphas_cumprod` (abar_t), `sigmas`
    (sqrt((1 - abar_t) / abar_t), ascending in t) and `log_sigmas`.
    """

    def __init__(self, config: ScheduleConfig | None = None) -> None:
        self.config = config or ScheduleConfig()
        c = self.config
        betas = make_betas(c.beta_schedule, c.num_train_timesteps, c.beta_start, c.beta_end)
        if c.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        abar32 = torch.cumprod(1.0 - betas, dim=0)  # float32, as diffusers
        self.betas = betas.double()
        self.alphas_cumprod = abar32.double()
        abar = self.alphas_cumprod.clamp(min=ZERO_SNR_ALPHA_BAR)
        self.sigmas = ((1 - abar) / abar).sqrt()
        self.log_sigmas = self.sigmas.log()

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    @property
    def prediction_type(self) -> str:
        return self.config.prediction_type

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def final_sigma(self) -> float:
        """Where DDIM/PNDM's last step lands: abar = 1 (sigma 0) or abar_0 (SD's set_alpha_to_one=False)."""
        return 0.0 if self.config.set_alpha_to_one else self.sigma_min

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at (possibly fractional) timesteps t, linear interpolation of the table."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_train_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        w = t - low
        return (1 - w) * self.sigmas[low] + w * self.sigmas[low + 1]

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep of a sigma, by linear interpolation in log sigma (k-diffusion's rule).

        A sigma taken from the table maps back to its integer timestep exactly.
        """
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        log_sigma = sigma.clamp(min=1e-10).log()
        table = self.log_sigmas.to(sigma.device)
        # index of the last table entry <= log_sigma, kept inside [0, T-2]
        low = (torch.searchsorted(table, log_sigma.reshape(-1), right=True) - 1).clamp(0, len(table) - 2)
        low = low.reshape(log_sigma.shape)
        w = ((table[low] - log_sigma) / (table[low] - table[low + 1])).clamp(0, 1)
        return low + w

    def alpha_bar_at(self, sigma: torch.Tensor) -> torch.Tensor:
        """abar for a sigma: 1 / (1 + sigma^2)."""
        return 1.0 / (1.0 + torch.as_tensor(sigma, dtype=torch.float64) ** 2)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 (EDM), eq. 5: n sigmas from sigma_max down to sigma_min, uniform in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def spaced_timesteps(spacing: str, steps: int, num_train_timesteps: int, steps_offset: int, rounded: bool) -> np.ndarray:
    """Descending inference timesteps picked from the training chain (diffusers' three spacings).

    "leading": multiples of T // steps plus the offset (SD 1.x/2.x); "trailing": counted back from
    T - 1; "linspace": evenly from T - 1 to 0, kept fractional unless `rounded` (the discrete
    samplers DDPM/DDIM/PNDM round, the sigma samplers interpolate).
    """
    check_choice("timestep spacing", spacing, TIMESTEP_SPACINGS)
    T = num_train_timesteps
    if spacing == "linspace":
        t = np.linspace(0, T - 1, steps)[::-1]
        return t.round() if rounded else t.copy()
    if spacing == "leading":
        # with steps == T the offset would push the first timestep past the chain: keep it inside
        offset = min(steps_offset, T - 1 - (steps - 1) * (T // steps))
        return (np.arange(0, steps) * (T // steps)).round()[::-1] + offset
    return np.arange(T, 0, -T / steps).round() - 1.0


def dpm_timesteps(spacing: str, steps: int, num_train_timesteps: int, steps_offset: int) -> np.ndarray:
    """DPM-Solver's own variant of the three spacings (steps + 1 points, the last one dropped)."""
    check_choice("timestep spacing", spacing, TIMESTEP_SPACINGS)
    T = num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].copy()
    if spacing == "leading":
        ratio = T // (steps + 1)
        return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1] + steps_offset
    return np.arange(T, 0, -T / steps).round() - 1.0
