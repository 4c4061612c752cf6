"""Samplers as pure functions over a tensor of sigmas (the k-diffusion design).

Each sampler takes `model(x, sigma) -> denoised` (see denoiser.py), a start `x = x0 + sigmas[0] * n`
in the variance-exploding view, and `sigmas` (float64, descending; the last may be 0), and returns
x at sigmas[-1]. The familiar DDPM names are special cases, which is why there are fewer functions
than sampler names (Karras et al. 2022, EDM, section 3 and appendix B.1):

- DDIM (eta = 0) is Euler's method on the probability-flow ODE dx/dsigma = (x - D(x)) / sigma;
- DDIM with eta = 1, DDPM's ancestral step and "Euler ancestral" are the same ancestral step.

Randomness arrives only through `noise`, a callable returning a standard normal tensor shaped
like x; `gaussian_noise` makes one from seeded `torch.Generator`s, drawing in diffusers' order.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor], None] | None
NoiseFn = Callable[[], torch.Tensor]


def gaussian_noise(
    shape: Sequence[int],
    generator: torch.Generator | Sequence[torch.Generator] | None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise drawn the way diffusers' `randn_tensor` draws it.

    With a list of generators, image i of the batch comes from generator i alone, so a batch of N
    equals N single runs with the same seeds. A CPU generator draws on the CPU and the result is
    moved to `device`, so a seed gives the same numbers on every device.
    """
    shape = tuple(shape)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        parts = [gaussian_noise((1,) + shape[1:], g, device, dtype) for g in generator]
        return torch.cat(parts)
    draw_device = generator.device if generator is not None else torch.device(device)
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)


def noise_like(x: torch.Tensor, generator) -> NoiseFn:
    """A `noise` callable drawing fresh noise shaped like x from `generator` at every call."""
    return lambda: gaussian_noise(x.shape, generator, x.device, torch.float32).to(x.dtype)


def _d(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE's derivative dx/dsigma = (x - D(x, sigma)) / sigma (EDM eq. 3)."""
    return (x - denoised) / sigma


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step sigma -> sigma_next into a deterministic part down to sigma_down and fresh noise
    of size sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2.

    sigma_up^2 = eta^2 sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 is DDIM's sigma_t (Song et
    al. 2021, eq. 16) divided by sqrt(abar_prev); eta = 1 gives DDPM's posterior variance.
    """
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


@torch.no_grad()
def sample_euler_ancestral(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, eta: float = 1.0,
                           noise: NoiseFn | None = None, callback: Callback = None) -> torch.Tensor:
    """Ancestral sampling with Euler steps: DDIM(eta) (Song et al. 2021), DDPM (Ho et al. 2020,
    Algorithm 2, eta = 1) and k-diffusion's Euler ancestral are all this loop.

    Noise is drawn at every step when eta > 0, the last included, as diffusers does.
    """
    if eta > 0 and noise is None:
        raise ValueError("an ancestral sampler with eta > 0 needs a noise source")
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        # Euler step of the ODE down to sigma_down: x = denoised + sigma_down * eps_hat
        x = x + _d(x, denoised, sigma) * (sigma_down - sigma)
        if eta > 0:
            x = x + noise() * sigma_up
        if callback:
            callback(i, x)
    return x


def sample_euler(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (EDM Algorithm 1 without the Heun correction);
    identical to deterministic DDIM (Song et al. 2021, eq. 12 with eta = 0)."""
    return sample_euler_ancestral(model, x, sigmas, eta=0.0, callback=callback)


@torch.no_grad()
def sample_heun(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 1, no churn). Two model calls
    per step except the last, which is an Euler step to sigma = 0."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        d_cur = _d(x, model(x, sigmas[i]), sigma)
        dt = sigma_next - sigma
        x_next = x + d_cur * dt
        if sigma_next != 0:
            # correct with the slope at the Euler estimate: the trapezoidal rule
            d_next = _d(x_next, model(x_next, sigmas[i + 1]), sigma_next)
            x_next = x + (d_cur + d_next) / 2 * dt
        x = x_next
        if callback:
            callback(i, x)
    return x


def lms_coefficient(sigmas: np.ndarray, i: int, j: int, order: int) -> float:
    """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial that is 1 at
    sigma_{i-j} and 0 at the other points sigma_{i-k}, k < order (exact polynomial integration)."""
    poly = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            poly = poly * np.polynomial.Polynomial([-sigmas[i - k], 1.0]) / (sigmas[i - j] - sigmas[i - k])
    antiderivative = poly.integ()
    return float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]))


@torch.no_grad()
def sample_lms(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, order: int = 4,
               callback: Callback = None) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth) in sigma over the last `order` derivatives, with the
    coefficients integrated exactly for the actual, non-uniform sigma steps (k-diffusion's LMS)."""
    s = sigmas.double().cpu().numpy()
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        ds = (ds + [_d(x, model(x, sigmas[i]), float(s[i]))])[-order:]
        cur_order = min(i + 1, order)
        coeffs = [lms_coefficient(s, i, j, cur_order) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        if callback:
            callback(i, x)
    return x


# Adams-Bashforth coefficients for equal steps, newest derivative first (PNDM, Liu et al. 2022, eq. 12).
_ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _eps_from_v(v: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """eps = sqrt(abar) v + sqrt(1 - abar) x_t, written in sigma and the VE sample x."""
    return v / math.sqrt(1 + sigma**2) + x * sigma / (1 + sigma**2)


def _v_from_denoised(x: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
    return (x / (1 + sigma**2) - denoised) * math.sqrt(1 + sigma**2) / sigma


@torch.no_grad()
def sample_plms(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, combine: str = "eps",
                callback: Callback = None) -> torch.Tensor:
    """Pseudo linear multistep (PLMS, Liu et al. 2022, "Pseudo Numerical Methods for Diffusion
    Models", with the Runge-Kutta warm-up replaced by one Heun-like step as in Stable Diffusion).

    Each step is a DDIM step whose epsilon is an Adams-Bashforth combination of the last four
    epsilons (fixed coefficients, as if the steps were equal). The first step averages the epsilon
    at the start and at an Euler estimate of the next point. `combine="v"` combines the network's
    v outputs instead and converts at the current point, which is what diffusers' PNDMScheduler
    does for v-prediction models (kept for image parity).
    """
    def quantity(x_, sigma: float, denoised):  # what gets combined across steps
        if combine == "v":
            return _v_from_denoised(x_, denoised, sigma)
        return _d(x_, denoised, sigma)

    def as_eps(q, x_, sigma: float):
        return _eps_from_v(q, x_, sigma) if combine == "v" else q

    history: list[torch.Tensor] = []
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        q = quantity(x, sigma, model(x, sigmas[i]))
        history = (history + [q])[-4:]
        if i == 0 and n > 1:
            # warm-up: average with the slope at an Euler estimate of the next point
            x_euler = x + (sigma_next - sigma) * as_eps(q, x, sigma)
            q = (q + quantity(x_euler, sigma_next, model(x_euler, sigmas[i + 1]))) / 2
        else:
            coeffs = _ADAMS_BASHFORTH[len(history)]
            q = sum(c * h for c, h in zip(coeffs, reversed(history)))
        x = x + (sigma_next - sigma) * as_eps(q, x, sigma)
        if callback:
            callback(i, x)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), in log-sigma time
    lambda = -log(sigma): a second-order multistep on the data prediction, first order on the
    first step and on the step to sigma = 0."""
    old_denoised = None
    h_last = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigmas[i])
        if sigma_next == 0:
            x = denoised  # the exponential integrator's step to sigma = 0
        else:
            h = math.log(sigma) - math.log(sigma_next)  # lambda_next - lambda
            if old_denoised is None:
                d_comb = denoised
            else:
                r = h_last / h
                d_comb = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * d_comb
            h_last = h
        old_denoised = denoised
        if callback:
            callback(i, x)
    return x


@torch.no_grad()
def invert_euler(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, fixed_point_iters: int = 0,
                 callback: Callback = None) -> torch.Tensor:
    """DDIM inversion: run the deterministic DDIM/Euler step backwards, image -> noise.

    `sigmas` ascend (e.g. a sampling schedule reversed); x is at sigmas[0], which may be 0. Plain
    inversion (fixed_point_iters = 0, Song et al. 2021, section 4.3) evaluates the slope at the
    known lower point. Each fixed-point iteration solves the implicit equation
    x_lo = x_hi + (sigma_lo - sigma_hi) * d(x_hi, sigma_hi) more exactly, so that sampling with
    Euler/DDIM on the same sigmas returns to the input (Pan et al. 2023, "Effective Real Image
    Editing with Accelerated Iterative Diffusion Inversion").
    """
    for i in range(len(sigmas) - 1):
        sigma, sigma_up = float(sigmas[i]), float(sigmas[i + 1])
        x_up = x
        for _ in range(1 + fixed_point_iters):
            x_up = x + (sigma_up - sigma) * _d(x_up, model(x_up, sigmas[i + 1]), sigma_up)
        x = x_up
        if callback:
            callback(i, x)
    return x
