"""An exactly solvable data distribution: a 1-D Gaussian mixture and its ideal denoiser.

Under VE noise x = x0 + sigma * n, component k is N(mu_k, s_k^2 + sigma^2), and the exact
denoiser is E[x0 | x] = sum_k r_k(x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)), r_k the posterior
responsibility of component k. Wrapped as a network over (x_t, t) it predicts epsilon or v.
"""

import torch

from ldmkit.diffusion.denoiser import Denoiser
from ldmkit.diffusion.schedule import NoiseSchedule

# Mean 0 and variance about 1, like the N(0, 1 + sigma_max^2) start: SD's sigma_max (14.6) is finite, so
# a data mean away from 0 would bias the samples by the prior mismatch, not by the sampler.
WEIGHTS = torch.tensor([0.4, 0.6], dtype=torch.float64)
MEANS = torch.tensor([-1.2, 0.8], dtype=torch.float64)
STDS = torch.tensor([0.35, 0.35], dtype=torch.float64)
SPLIT = -0.2  # between the components, 2.9 standard deviations from each


def exact_denoiser(x: torch.Tensor, sigma) -> torch.Tensor:
    """E[x0 | x0 + sigma n = x] for the mixture; x of shape (N, 1), sigma scalar or (N,)."""
    xd = x.double()
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
    var = STDS**2 + sigma**2  # (N or 1, K)
    log_r = torch.log(WEIGHTS) - 0.5 * torch.log(var) - 0.5 * (xd - MEANS) ** 2 / var
    r = torch.softmax(log_r, dim=1)
    posterior_means = MEANS + STDS**2 / var * (xd - MEANS)
    return (r * posterior_means).sum(dim=1, keepdim=True).to(x.dtype)


def exact_network(schedule: NoiseSchedule, prediction_type: str):
    """The ideal network over (x_t, t) that `Denoiser` turns back into `exact_denoiser`."""
    wrapper = Denoiser(lambda x, t: x, schedule, prediction_type)

    def network(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = schedule.t_to_sigma(t)
        x = x_t * (1 + sigma.reshape(-1, 1) ** 2).sqrt()
        return wrapper.to_prediction(x, sigma, exact_denoiser(x, sigma))

    return network


def sample_data(n: int, generator: torch.Generator) -> torch.Tensor:
    k = torch.multinomial(WEIGHTS, n, replacement=True, generator=generator)
    return (MEANS[k] + STDS[k] * torch.randn(n, generator=generator, dtype=torch.float64)).reshape(n, 1)


def mixture_statistics(x: torch.Tensor):
    """Per-component weight, mean and std of samples, split at SPLIT."""
    x = x.double().flatten()
    parts = [x[x < SPLIT], x[x >= SPLIT]]
    weights = torch.tensor([len(p) / len(x) for p in parts])
    means = torch.stack([p.mean() for p in parts])
    stds = torch.stack([p.std() for p in parts])
    return weights, means, stds
