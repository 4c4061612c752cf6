"""Every named sampler follows diffusers' scheduler trajectory for the same config, noise and model.

The whole trajectory is compared: every model call's input and timestep, and the final sample.
The model is a fixed smooth function of (x_t, t), so any difference in the path shows up.
"""

import inspect

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ldmkit.diffusion.denoiser import Denoiser
from ldmkit.diffusion.sampling import KARRAS_SAMPLERS, SAMPLERS, make_plan
from ldmkit.diffusion.schedule import NoiseSchedule, ScheduleConfig

from diffusers_oracle import DIFFUSERS_SCHEDULERS as DIFFUSERS_CLASSES
from diffusers_oracle import SD15_SCHEDULER as SD15

pytestmark = pytest.mark.oracle


STEP_COUNTS = [1, 2, 10, 20, 50]
TOL = 1e-4


def toy_network(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic, smooth stand-in for a U-Net: depends on every channel and on t."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1) / 1000
    mixed = 0.8 * x + 0.3 * torch.sin(3 * t + x.roll(1, dims=1))
    return torch.tanh(mixed) * (0.6 + 0.4 * t)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-12))


def run_diffusers(name, config, steps, noise, seed, karras=False, eta=0.0):
    cls = getattr(diffusers, DIFFUSERS_CLASSES[name])
    extra = {"use_karras_sigmas": True} if karras else {}
    sched = cls.from_config({**config, **extra})
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    gen = torch.Generator().manual_seed(seed)
    accepts = inspect.signature(sched.step).parameters
    kwargs = {k: v for k, v in {"generator": gen, "eta": eta}.items() if k in accepts}
    calls = []
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t)
        calls.append((inp.clone(), float(t)))
        x = sched.step(toy_network(inp, t), t, x, **kwargs).prev_sample
    return calls, x


def run_ldmkit(name, config, steps, noise, seed, karras=False, eta=None):
    schedule = NoiseSchedule(ScheduleConfig.from_dict(config))
    plan = make_plan(name, schedule, steps, karras=karras)
    calls = []

    def network(x_in, t):
        calls.append((x_in.clone(), t.clone()))
        return toy_network(x_in, t)

    denoiser = Denoiser(network, schedule, quantize_timesteps=plan.quantize_timesteps)
    gen = torch.Generator().manual_seed(seed)
    out = plan.run(denoiser, noise * plan.init_noise_scale, eta=eta, generator=gen)
    assert len(calls) == plan.model_calls()
    return calls, plan.to_vp(out)


def assert_same_trajectory(ours, theirs):
    (calls, final), (ref_calls, ref_final) = ours, theirs
    assert len(calls) == len(ref_calls), "different number of model calls"
    for i, ((x, t), (ref_x, ref_t)) in enumerate(zip(calls, ref_calls)):
        assert torch.allclose(t.double(), torch.tensor(ref_t, dtype=torch.float64), atol=2e-3), f"call {i}: t {t} vs {ref_t}"
        assert rel_err(x, ref_x) < TOL, f"call {i}: model input differs by {rel_err(x, ref_x):.2e}"
    assert rel_err(final, ref_final) < TOL, f"final sample differs by {rel_err(final, ref_final):.2e}"


def noise_for(seed=0, shape=(2, 4, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sd15_trajectory_matches_diffusers(sampler, steps, prediction_type):
    config = {**SD15, "prediction_type": prediction_type}
    noise = noise_for(steps)
    assert_same_trajectory(run_ldmkit(sampler, config, steps, noise, seed=7),
                           run_diffusers(sampler, config, steps, noise, seed=7))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("sampler", [s for s in KARRAS_SAMPLERS if s != "euler_a"])
def test_karras_trajectory_matches_diffusers(sampler, steps, prediction_type):
    """(diffusers' EulerAncestralDiscreteScheduler has no Karras option to compare with.)"""
    config = {**SD15, "prediction_type": prediction_type}
    noise = noise_for(100 + steps)
    assert_same_trajectory(run_ldmkit(sampler, config, steps, noise, seed=3, karras=True),
                           run_diffusers(sampler, config, steps, noise, seed=3, karras=True))


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 10, 25])
@pytest.mark.parametrize("sampler", ["ddpm", "lms", "euler", "euler_a", "heun", "dpmpp_2m"])
def test_other_spacings_match_diffusers(sampler, steps, spacing):
    """DDIM and PNDM are left out: for spacings where T/steps is not a whole number, diffusers steps
    them to t - T // steps rather than to the next timestep of their own list; ldmkit takes the
    next timestep. Trailing spacing with whole ratios is checked below."""
    config = {**SD15, "timestep_spacing": spacing}
    noise = noise_for(200 + steps)
    assert_same_trajectory(run_ldmkit(sampler, config, steps, noise, seed=5),
                           run_diffusers(sampler, config, steps, noise, seed=5))


@pytest.mark.parametrize("sampler", ["ddim", "pndm"])
@pytest.mark.parametrize("steps", [1, 10, 20, 50])
def test_trailing_ddim_pndm_match_diffusers(sampler, steps):
    config = {**SD15, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}
    noise = noise_for(300 + steps)
    assert_same_trajectory(run_ldmkit(sampler, config, steps, noise, seed=1),
                           run_diffusers(sampler, config, steps, noise, seed=1))


@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("steps", [2, 20])
def test_ddim_eta_matches_diffusers(eta, steps):
    noise = noise_for(400 + steps)
    assert_same_trajectory(run_ldmkit("ddim", SD15, steps, noise, seed=11, eta=eta),
                           run_diffusers("ddim", SD15, steps, noise, seed=11, eta=eta))


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_a"])
def test_zero_terminal_snr_matches_diffusers(sampler):
    config = {**SD15, "timestep_spacing": "trailing", "prediction_type": "v_prediction",
              "rescale_betas_zero_snr": True}
    noise = noise_for(500)
    assert_same_trajectory(run_ldmkit(sampler, config, 20, noise, seed=2),
                           run_diffusers(sampler, config, 20, noise, seed=2))


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_other_beta_schedules_match_diffusers(sampler, schedule):
    config = {**SD15, "beta_schedule": schedule, "beta_start": 0.0001, "beta_end": 0.02}
    noise = noise_for(600)
    assert_same_trajectory(run_ldmkit(sampler, config, 20, noise, seed=4),
                           run_diffusers(sampler, config, 20, noise, seed=4))


def test_a_wrong_sampler_fails_the_comparison():
    """The comparison itself can fail: euler's path is not heun's."""
    noise = noise_for(9)
    with pytest.raises(AssertionError):
        assert_same_trajectory(run_ldmkit("euler", SD15, 10, noise, seed=0),
                               run_diffusers("lms", SD15, 10, noise, seed=0))
