"""Guidance wrappers (classifier, CLIP, dynamic thresholding) and DDIM-inversion editing.

Classifier guidance is checked against an exact answer: for the Gaussian mixture, the exact
posterior over components is a noise-conditional classifier, and guidance with scale 1 must turn
the mixture's exact denoiser into the exact denoiser of the chosen component alone.
"""

from dataclasses import replace

import pytest
import torch

from gaussian_mixture import MEANS, SPLIT, STDS, WEIGHTS, exact_denoiser
from ldmkit.diffusion import samplers
from ldmkit.diffusion.guidance import classifier_guidance, clip_guidance, clip_similarity, dynamic_thresholding
from ldmkit.diffusion.sampling import make_plan
from ldmkit.diffusion.schedule import NoiseSchedule, ScheduleConfig
from ldmkit.errors import InvalidArgument
from ldmkit.models.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel
from ldmkit.models.noisy_classifier import NoisyClassifier, train_noisy_classifier
from ldmkit.models.tokenizer import CLIPTokenizer
from ldmkit.models.unet import UNet, unet_preset
from ldmkit.models.vae import AutoencoderKL, vae_preset
from ldmkit.pipelines.editing import edit, encode_mean
from ldmkit.pipelines.stable_diffusion import StableDiffusion, clip_image_embedder

SCHEDULE = NoiseSchedule(ScheduleConfig())  # SD 1.x training schedule
SIZE = 32  # pixels; tiny U-Net sample size 16 x tiny VAE downscale 2


# -- classifier guidance on the Gaussian mixture ------------------------------------------------


def exact_classifier(x: torch.Tensor, sigma) -> torch.Tensor:
    """log p(k | x, sigma) up to a constant: the exact posterior over the mixture's components."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
    var = STDS**2 + sigma**2  # (N or 1, K)
    return torch.log(WEIGHTS) - 0.5 * torch.log(var) - 0.5 * (x.double() - MEANS) ** 2 / var


def component_denoiser(k: int, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """E[x0 | x, component k] for the Gaussian N(mu_k, s_k^2)."""
    return MEANS[k] + STDS[k] ** 2 / (STDS[k] ** 2 + sigma**2) * (x - MEANS[k])


@pytest.mark.parametrize("sigma", [0.05, 0.5, 2.0, 14.0])
def test_classifier_guidance_with_the_exact_posterior_is_the_component_denoiser(sigma):
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)[:, None]  # (N, 1)
    for k in (0, 1):
        guided = classifier_guidance(exact_denoiser, exact_classifier, torch.tensor(k), scale=1.0)
        out = guided(x, torch.tensor(sigma, dtype=torch.float64))
        assert (out - component_denoiser(k, x, sigma)).abs().max() < 1e-9


class MixtureClassifier(torch.nn.Module):
    """A small MLP p(k | x, sigma) with NoisyClassifier's input scaling and noise conditioning."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.SiLU(), torch.nn.Linear(32, 2))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        c_in = (1 + sigma**2).rsqrt()[:, None]  # (N, 1)
        return self.net(torch.cat([x.float() * c_in, (sigma.log() / 4)[:, None]], dim=1))  # (N, 2)


def test_a_trained_noisy_classifier_steers_an_unconditional_sampler_to_the_class():
    gen = torch.Generator().manual_seed(0)
    labels = torch.multinomial(WEIGHTS, 4000, replacement=True, generator=gen)
    data = (MEANS[labels] + STDS[labels] * torch.randn(4000, generator=gen, dtype=torch.float64))[:, None].float()
    torch.manual_seed(0)
    classifier = train_noisy_classifier(MixtureClassifier(), data, labels, SCHEDULE, steps=300,
                                        batch_size=128, lr=1e-2)
    plan = make_plan("euler", SCHEDULE, 20)
    noise = torch.randn(1000, 1, generator=torch.Generator().manual_seed(1)) * plan.init_noise_scale
    unguided = samplers.sample_euler(exact_denoiser, noise, plan.sigmas)
    assert abs(float((unguided < SPLIT).double().mean()) - 0.4) < 0.05  # the prior's weight of component 0
    for k in (0, 1):
        guided = classifier_guidance(exact_denoiser, classifier, torch.tensor(k))
        out = samplers.sample_euler(guided, noise, plan.sigmas)
        in_k = (out < SPLIT) if k == 0 else (out >= SPLIT)
        # measured: 0.995 and 1.0
        assert float(in_k.double().mean()) > 0.9, k


def test_noisy_classifier_gives_logits_and_a_gradient_under_no_grad():
    torch.manual_seed(0)
    classifier = NoisyClassifier().eval()
    x = torch.randn(3, 1, 16, 16)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    assert classifier(x, sigma).shape == (3, 10)
    assert not torch.allclose(classifier(x, sigma), classifier(x, sigma * 2))  # noise-conditional
    blur = lambda x, sigma: x * 0.5  # noqa: E731  any denoiser
    with torch.no_grad():  # as inside the samplers
        guided = classifier_guidance(blur, classifier, torch.tensor([3, 3, 3]), scale=2.0)(x, sigma)
    assert guided.shape == x.shape and not guided.requires_grad
    assert torch.isfinite(guided).all() and not torch.allclose(guided, x * 0.5)


# -- dynamic thresholding -----------------------------------------------------------------------


def test_dynamic_thresholding_keeps_x0_in_range_and_leaves_in_range_x0_alone():
    gen = torch.Generator().manual_seed(0)
    inside = torch.rand(2, 1, 16, 16, generator=gen) * 2 - 1  # all |x0| <= 1
    outside = torch.randn(2, 1, 16, 16, generator=gen) * 3
    batch = torch.cat([inside, outside])
    out = dynamic_thresholding(lambda x, sigma: x, percentile=0.995)(batch, 1.0)
    assert out.abs().max() <= 1.0
    assert torch.equal(out[:2], inside)  # s = 1 per sample: untouched, even beside out-of-range samples
    s = torch.quantile(outside.abs().flatten(1), 0.995, dim=1).reshape(-1, 1, 1, 1)
    assert torch.allclose(out[2:], outside.clamp(-s, s) / s)
    with pytest.raises(InvalidArgument):
        dynamic_thresholding(lambda x, sigma: x, percentile=1.5)


# -- CLIP guidance and editing on a tiny random Stable Diffusion ---------------------------------


@pytest.fixture(scope="module")
def pipe():
    """Tiny random SD; the VAE's scaling factor gives unit-std latents, as SD's does (for its VAE)."""
    text = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    vae = AutoencoderKL(vae_preset("tiny"))
    with torch.no_grad():
        std = float(vae.encode(image() * 2 - 1).mode().std())
    scaled = AutoencoderKL(vae_preset("tiny", scaling_factor=1 / std))
    scaled.load_state_dict(vae.state_dict())
    torch.manual_seed(1)
    return StableDiffusion(UNet(unet_preset("tiny")), scaled, CLIPTextModel(text), CLIPTokenizer.from_openai_bpe(),
                           SCHEDULE)


@pytest.fixture(scope="module")
def clip():
    """Tiny random CLIP sharing the SD tokenizer's vocabulary."""
    config = CLIPConfig.preset("tiny")
    torch.manual_seed(2)
    return CLIPModel(replace(config, text=replace(config.text, vocab_size=49408, eos_token_id=49407,
                                                   pad_token_id=49407))).eval()


def image() -> torch.Tensor:
    """A smooth test image (1, 3, SIZE, SIZE) in [0, 1]."""
    u = torch.linspace(0, 1, SIZE)
    return torch.stack([u[None, :].expand(SIZE, SIZE), u[:, None].expand(SIZE, SIZE),
                        (u[None, :] - u[:, None]).abs().expand(SIZE, SIZE)])[None]


TXT2IMG = dict(sampler="ddim", steps=3, cfg_scale=2.0, height=SIZE, width=SIZE, seed=0, output="latent")


def test_clip_guidance_steps_uphill_in_clip_similarity(pipe, clip):
    text = clip.encode_text(pipe.tokenizer(["a blue circle"]), normalize=True)
    embed = clip_image_embedder(clip)
    decode = lambda z: pipe._decode(pipe.vae, z)  # noqa: E731
    plan = pipe.plan("ddim", 3)
    cond, uncond = pipe.encode_prompt(["a red square"], [""], 2)
    denoiser = pipe._denoiser(plan, {"context": cond}, {"context": uncond}, 2.0)
    guided = clip_guidance(denoiser, embed, text, decode, scale=1.0)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 3.0
    sigma = torch.tensor(3.0, dtype=torch.float64)

    def similarity(x_):
        with torch.no_grad():
            return clip_similarity(embed, decode(denoiser(x_, sigma)), text)

    with torch.no_grad():
        correction = guided(x, sigma) - denoiser(x, sigma)  # sigma^2 * grad_x similarity
    assert correction.abs().max() > 0
    step = 1e-3 / correction.abs().max()
    assert (similarity(x + step * correction) > similarity(x)).all()
    assert (similarity(x - step * correction) < similarity(x)).all()


def test_txt2img_guidance_hook(pipe, clip):
    base = pipe.txt2img("a red square", **TXT2IMG)
    assert torch.equal(pipe.txt2img("a red square", guidance=lambda d: d, **TXT2IMG), base)
    hook = pipe.make_clip_guidance(clip, "a blue circle", scale=200.0)
    guided = pipe.txt2img("a red square", guidance=hook, **TXT2IMG)
    assert torch.isfinite(guided).all()
    assert (guided - base).abs().mean() > 1e-3 * base.abs().mean()


def test_edit_with_the_same_prompt_and_cfg_1_reconstructs_and_another_prompt_changes_it(pipe):
    latents = encode_mean(pipe, image())
    same = edit(pipe, image(), "a red square", "a red square", steps=5, cfg_scale=1.0, fixed_point_iters=20,
                output="latent")
    error = float((same - latents).abs().mean() / latents.std())
    assert error < 0.01, error  # measured: 0.0027; 0.015 with 10 fixed-point iterations, 0.51 with none
    other = edit(pipe, image(), "a red square", "a green triangle on a beach", steps=5, cfg_scale=3.0,
                 fixed_point_iters=2, output="latent")
    change = float((other - latents).abs().mean() / latents.std())
    assert change > 10 * error and change > 0.05, (change, error)
