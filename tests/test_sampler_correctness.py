"""Samplers are right, not just like diffusers: checked against an exactly solvable distribution.

With the ideal denoiser of a Gaussian mixture (tests/gaussian_mixture.py), sampling must give the
mixture back, deterministic samplers must converge to the exact probability-flow ODE solution, and
DDIM inversion must be undone by DDIM sampling.
"""

import pytest
import torch
from gaussian_mixture import MEANS, STDS, WEIGHTS, exact_denoiser, exact_network, mixture_statistics, sample_data

from ldmkit.diffusion import samplers
from ldmkit.diffusion.denoiser import Denoiser
from ldmkit.diffusion.sampling import SAMPLERS, make_plan
from ldmkit.diffusion.schedule import NoiseSchedule, ScheduleConfig, karras_sigmas

SCHEDULE = NoiseSchedule(ScheduleConfig())  # Stable Diffusion 1.x/2.x training schedule
DETERMINISTIC = ["ddim", "pndm", "lms", "euler", "heun", "dpmpp_2m"]

# Relative error allowed on each component's std after 50 steps. The schedule's last step is first
# order (to sigma = 0 from sigma(1) for DDIM-like, sigma(20) for DPM-Solver's spacing), which
# shrinks the spread a little; ancestral (SDE) samplers converge more slowly still.
STD_TOLERANCE = {"pndm": 0.03, "lms": 0.03, "heun": 0.03,
                 "ddim": 0.08, "euler": 0.08, "dpmpp_2m": 0.08, "ddpm": 0.12, "euler_a": 0.12}
WEIGHT_TOLERANCE = 0.02  # absolute; sampling error of 20000 draws is 0.0035
MEAN_TOLERANCE = 0.03  # absolute, component std is 0.35


def run(sampler, prediction_type, steps, n=20000, seed=0, dtype=torch.float32):
    plan = make_plan(sampler, SCHEDULE, steps)
    denoiser = Denoiser(exact_network(SCHEDULE, prediction_type), SCHEDULE, prediction_type)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=gen, dtype=dtype) * plan.init_noise_scale
    return plan, x, plan.run(denoiser, x, generator=gen)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_50_steps_reproduce_the_mixture(sampler, prediction_type):
    plan, _, out = run(sampler, prediction_type, 50)
    weights, means, stds = mixture_statistics(plan.to_vp(out))
    assert torch.allclose(weights, WEIGHTS.float(), atol=WEIGHT_TOLERANCE), weights
    assert torch.allclose(means, MEANS, atol=MEAN_TOLERANCE), means
    assert ((stds - STDS).abs() / STDS).max() < STD_TOLERANCE[sampler], stds


def exact_flow(x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    """The probability-flow ODE solved to ~1e-6 by a second-order solver on 2000 log-spaced steps."""
    low = max(sigma_to, 1e-4)
    fine = torch.logspace(torch.log10(torch.tensor(sigma_from)), torch.log10(torch.tensor(low)), 2000, dtype=torch.float64)
    if sigma_to == 0:
        fine = torch.cat([fine, torch.zeros(1, dtype=torch.float64)])
    return samplers.sample_dpmpp_2m(exact_denoiser, x, fine)


@pytest.mark.parametrize("sampler", DETERMINISTIC)
def test_error_against_the_exact_flow_falls_with_more_steps(sampler):
    errors = []
    for steps in (5, 10, 20, 50):
        plan, x, out = run(sampler, "epsilon", steps, n=2000, seed=1, dtype=torch.float64)
        reference = exact_flow(x, float(plan.sigmas[0]), float(plan.sigmas[-1]))
        errors.append(float((out - reference).abs().mean()))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.25 * errors[0], errors


def test_dpmpp_2m_beats_euler_at_10_steps():
    sigmas = torch.cat([karras_sigmas(10, SCHEDULE.sigma_min, SCHEDULE.sigma_max), torch.zeros(1, dtype=torch.float64)])
    x = torch.randn(2000, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * sigmas[0]
    reference = exact_flow(x, float(sigmas[0]), 0.0)
    error = {f.__name__: float((f(exact_denoiser, x, sigmas) - reference).abs().mean())
             for f in (samplers.sample_euler, samplers.sample_dpmpp_2m)}
    assert error["sample_dpmpp_2m"] < 0.6 * error["sample_euler"], error


@pytest.mark.parametrize("steps", [50, 100])
def test_ddim_inversion_then_ddim_sampling_reconstructs_the_input(steps):
    plan = make_plan("ddim", SCHEDULE, steps)
    x0 = sample_data(2000, torch.Generator().manual_seed(3))
    noise = samplers.invert_euler(exact_denoiser, x0, plan.sigmas.flip(0), fixed_point_iters=20)
    assert noise.std() > 10, "inversion should end at the noise level sigma_max"
    reconstruction = samplers.sample_euler(exact_denoiser, noise, plan.sigmas)
    assert (reconstruction - x0).abs().max() < 1e-3


def test_plain_ddim_inversion_is_close_but_fixed_point_is_closer():
    plan = make_plan("ddim", SCHEDULE, 50)
    x0 = sample_data(2000, torch.Generator().manual_seed(4))
    errors = []
    for iters in (0, 5):
        noise = samplers.invert_euler(exact_denoiser, x0, plan.sigmas.flip(0), fixed_point_iters=iters)
        errors.append(float((samplers.sample_euler(exact_denoiser, noise, plan.sigmas) - x0).abs().mean()))
    # measured: plain 0.085 mean abs error (the slope is taken at the wrong end of each step),
    # five fixed-point iterations 4e-6
    assert errors[0] < 0.15 and errors[1] < 1e-3 * errors[0], errors


def test_img2img_strength_starts_part_way():
    plan = make_plan("heun", SCHEDULE, 20)
    half = plan.from_strength(0.5)
    assert half.steps == 10 and torch.equal(half.sigmas, plan.sigmas[10:])
    assert plan.from_strength(1.0).steps == 20 and plan.from_strength(0.0).steps == 0
    # starting from a sample at the half-way noise level recovers the data distribution
    x0 = sample_data(20000, torch.Generator().manual_seed(5))
    x = x0 + float(half.sigmas[0]) * torch.randn(x0.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    weights, means, _ = mixture_statistics(half.run(exact_denoiser, x))
    assert torch.allclose(weights, WEIGHTS.float(), atol=WEIGHT_TOLERANCE)
    assert torch.allclose(means, MEANS, atol=MEAN_TOLERANCE)
