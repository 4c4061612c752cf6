"""The forward (noising) process q(x_t | x_0), training targets and the diffusion loss.

t here is an integer tensor of training timesteps (shape (B,)); `schedule.alphas_cumprod[t]` is
abar_t. Everything is computed in the dtype of x0, with the schedule's coefficients cast to it.
"""

from __future__ import annotations

import torch

from ..errors import check_choice
from .schedule import PREDICTION_TYPES, NoiseSchedule


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) tensor of coefficients to broadcast over a (B, ...) batch."""
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sample from q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (Ho et al. 2020, eq. 4)."""
    abar = schedule.alphas_cumprod[t.cpu()]
    return _per_sample(abar.sqrt(), x0) * x0 + _per_sample((1 - abar).sqrt(), x0) * noise


def training_target(
    prediction_type: str, schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """What the network should output for x_t = q_sample(x0, t, noise).

    epsilon: the noise; sample: x0; v_prediction: v = sqrt(abar) eps - sqrt(1 - abar) x0
    (Salimans & Ho 2022, "Progressive Distillation", section 4).
    """
    check_choice("prediction type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    abar = schedule.alphas_cumprod[t.cpu()]
    return _per_sample(abar.sqrt(), x0) * noise - _per_sample((1 - abar).sqrt(), x0) * x0


def snr(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio abar_t / (1 - abar_t) (float64, shape of t)."""
    abar = schedule.alphas_cumprod[t.cpu()]
    return abar / (1 - abar)


def min_snr_weights(schedule: NoiseSchedule, t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting".

    The x0-space weight min(SNR, gamma) is converted to the space the loss is measured in:
    divided by SNR for epsilon targets and by SNR + 1 for v targets.
    """
    check_choice("prediction type", prediction_type, PREDICTION_TYPES)
    s = snr(schedule, t)
    clipped = s.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / s
    if prediction_type == "v_prediction":
        return clipped / (s + 1)
    return clipped


def offset_noise(
    shape: tuple[int, ...], strength: float, generator: torch.Generator | None = None, device=None, dtype=None
) -> torch.Tensor:
    """Gaussian noise plus a per-(sample, channel) constant offset (Guttenberg 2023, "offset noise").

    Training with it lets a model change an image's overall brightness, which plain noise hides.
    """
    noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if strength:
        offset = torch.randn((shape[0], shape[1]) + (1,) * (len(shape) - 2), generator=generator, device=device, dtype=dtype)
        noise = noise + strength * offset
    return noise


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample, optionally weighted per sample, averaged over the batch."""
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device, per_sample.dtype)
    return per_sample.mean()
