"""Noise schedules, the forward process q(x_t | x_0), training targets and loss weights."""

import pytest
import torch

from ldmkit.diffusion.forward import (diffusion_loss, min_snr_weights, offset_noise, q_sample, snr,
                                      training_target)
from ldmkit.diffusion.schedule import (NoiseSchedule, ScheduleConfig, karras_sigmas, make_betas,
                                       rescale_zero_terminal_snr)
from ldmkit.errors import InvalidArgument

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_match_diffusers(kind, zero_snr):
    config = dict(beta_schedule=kind, beta_start=0.0001, beta_end=0.02, rescale_betas_zero_snr=zero_snr)
    ours = NoiseSchedule(ScheduleConfig.from_dict(config))
    theirs = diffusers.DDPMScheduler(**config)
    # float32 arithmetic like diffusers; the zero-SNR rescale rounds in a different order (3e-7)
    assert torch.allclose(ours.alphas_cumprod, theirs.alphas_cumprod.double(), rtol=0, atol=1e-6)


def test_zero_terminal_snr_ends_in_pure_noise_and_keeps_the_start():
    betas = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    rescaled = rescale_zero_terminal_snr(betas)
    abar, new_abar = torch.cumprod(1 - betas, 0), torch.cumprod(1 - rescaled, 0)
    assert new_abar[-1].abs() < 1e-12 and abs(new_abar[0] - abar[0]) < 1e-7
    assert (new_abar[1:] < new_abar[:-1]).all()


def test_sigma_and_timestep_conversions_invert_each_other():
    schedule = NoiseSchedule()
    t = torch.arange(1000, dtype=torch.float64)
    assert torch.equal(schedule.sigma_to_t(schedule.sigmas), t)  # table sigmas map to exact integers
    fractional = torch.tensor([0.25, 10.5, 500.75, 998.9], dtype=torch.float64)
    # t -> sigma interpolates sigma linearly, sigma -> t interpolates log sigma (both diffusers'
    # conventions), so a fractional round trip is close but not exact where sigma changes fastest
    assert torch.allclose(schedule.sigma_to_t(schedule.t_to_sigma(fractional)), fractional, atol=0.05)
    assert torch.allclose(schedule.sigmas, ((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod).sqrt())


def test_karras_sigmas_span_the_range_monotonically():
    s = karras_sigmas(20, 0.03, 14.6)
    assert abs(s[0] - 14.6) < 1e-9 and abs(s[-1] - 0.03) < 1e-9 and (s[1:] < s[:-1]).all()
    inner = s ** (1 / 7)  # evenly spaced in sigma^(1/rho)
    assert torch.allclose(inner[1:] - inner[:-1], (inner[1] - inner[0]).expand(19), atol=1e-9)


def test_q_sample_and_v_target_match_diffusers():
    schedule = NoiseSchedule()
    theirs = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8, generator=gen), torch.randn(4, 3, 8, 8, generator=gen)
    t = torch.tensor([0, 10, 500, 999])
    assert torch.allclose(q_sample(schedule, x0, t, noise), theirs.add_noise(x0, noise, t), atol=1e-6)
    assert torch.allclose(training_target("v_prediction", schedule, x0, t, noise), theirs.get_velocity(x0, noise, t), atol=1e-6)
    assert torch.equal(training_target("epsilon", schedule, x0, t, noise), noise)
    assert torch.equal(training_target("sample", schedule, x0, t, noise), x0)


def test_q_sample_has_the_closed_form_moments():
    schedule = NoiseSchedule()
    x0 = torch.full((20000, 1), 2.0)
    t = torch.full((20000,), 300)
    xt = q_sample(schedule, x0, t, torch.randn(20000, 1, generator=torch.Generator().manual_seed(1)))
    abar = float(schedule.alphas_cumprod[300])
    assert abs(xt.mean() - 2 * abar**0.5) < 0.02 and abs(xt.var() - (1 - abar)) < 0.02


def test_min_snr_weights_follow_the_paper():
    schedule = NoiseSchedule()
    t = torch.tensor([1, 100, 400, 900])
    s = snr(schedule, t)
    assert torch.allclose(min_snr_weights(schedule, t, 5.0, "epsilon"), s.clamp(max=5) / s)
    assert torch.allclose(min_snr_weights(schedule, t, 5.0, "v_prediction"), s.clamp(max=5) / (s + 1))
    assert torch.allclose(min_snr_weights(schedule, t, 5.0, "sample"), s.clamp(max=5))
    # low-noise steps (high SNR) are down-weighted for epsilon targets, noisy ones keep weight 1
    w = min_snr_weights(schedule, t, 5.0, "epsilon")
    assert w[0] < 0.1 and w[-1] == 1.0


def test_offset_noise_shifts_whole_channels():
    gen = torch.Generator().manual_seed(0)
    plain = offset_noise((256, 4, 16, 16), 0.0, gen)
    shifted = offset_noise((256, 4, 16, 16), 0.5, torch.Generator().manual_seed(0))
    channel_means = shifted.mean(dim=(2, 3))
    assert plain.mean(dim=(2, 3)).std() < 0.1 and 0.4 < channel_means.std() < 0.6


def test_weighted_loss():
    pred, target = torch.zeros(2, 3), torch.ones(2, 3)
    assert diffusion_loss(pred, target) == 1.0
    assert diffusion_loss(pred, target, torch.tensor([0.0, 2.0])) == 1.0


def test_bad_configs_are_one_line_errors():
    with pytest.raises(InvalidArgument, match="beta schedule"):
        ScheduleConfig(beta_schedule="cubic")
    with pytest.raises(InvalidArgument, match="prediction type"):
        ScheduleConfig(prediction_type="noise")
    from ldmkit.diffusion.sampling import make_plan
    with pytest.raises(InvalidArgument, match="steps must be between 1 and 1000"):
        make_plan("euler", NoiseSchedule(), 0)
    with pytest.raises(InvalidArgument, match="unknown sampler"):
        make_plan("dpm_fast", NoiseSchedule(), 10)
    with pytest.raises(InvalidArgument, match="Karras"):
        make_plan("ddim", NoiseSchedule(), 10, karras=True)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m", "pndm", "heun", "lms"])
def test_every_step_count_up_to_the_training_length_works(sampler):
    from ldmkit.diffusion.sampling import make_plan
    schedule = NoiseSchedule()
    for steps in (1, 3, 7, 999, 1000):
        plan = make_plan(sampler, schedule, steps)
        assert plan.steps == steps and torch.isfinite(plan.sigmas).all()
        assert (plan.sigmas[1:] <= plan.sigmas[:-1]).all()
