"""Same seed, same image as diffusers: txt2img, img2img and inpainting against diffusers'
Stable Diffusion pipelines, on one tiny random-weight model loaded into both with zero renames,
for every named sampler."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from ldmkit.checkpoints import keys_clip
from ldmkit.checkpoints.keys_unet_vae import unet_config_from_diffusers, vae_config_from_diffusers
from ldmkit.diffusion.sampling import SAMPLERS
from ldmkit.diffusion.schedule import NoiseSchedule, ScheduleConfig
from ldmkit.errors import GenerationError, InvalidArgument
from ldmkit.models.clip import CLIPTextModel, text_config_from_transformers
from ldmkit.models.tokenizer import CLIPTokenizer
from ldmkit.models.unet import UNet
from ldmkit.models.vae import AutoencoderKL
from ldmkit.pipelines.stable_diffusion import StableDiffusion

from diffusers_oracle import DIFFUSERS_SCHEDULERS as DIFFUSERS_CLASSES
from diffusers_oracle import SD15_SCHEDULER

pytestmark = pytest.mark.oracle

TOL = 1 / 255  # images in [0, 1], float32 on both sides
SIZE = 64  # pixels; the VAE downscales 8x, so latents are 8x8
PROMPT, NEGATIVE = "a red square on a blue background", "blurry"


def tiny_unet(in_channels: int = 4):
    torch.manual_seed(1)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=SIZE // 8, in_channels=in_channels,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
        norm_num_groups=8,
    ).eval()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """diffusers / transformers components of a tiny SD, and ldmkit's copies of the same weights."""
    folder = tmp_path_factory.mktemp("tokenizer")
    CLIPTokenizer.from_openai_bpe().save(folder)
    hf_tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder))
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8,
        latent_channels=4, sample_size=SIZE,
    ).eval()
    text_config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    torch.manual_seed(2)
    text_encoder = transformers.CLIPTextModel(text_config).eval()
    unet, unet9 = tiny_unet(4), tiny_unet(9)

    tokenizer = CLIPTokenizer.from_folder(folder)
    ours_text = CLIPTextModel(text_config_from_transformers(text_config.to_dict())).eval()
    ours_text.load_state_dict(keys_clip.to_ldmkit(text_encoder.state_dict()), strict=True)
    ours_vae = AutoencoderKL(vae_config_from_diffusers(dict(vae.config))).eval()
    ours_vae.load_state_dict(vae.state_dict(), strict=True)

    def ours_unet(model):
        u = UNet(unet_config_from_diffusers(dict(model.config))).eval()
        u.load_state_dict(model.state_dict(), strict=True)
        return u

    schedule = NoiseSchedule(ScheduleConfig.from_dict(SD15_SCHEDULER))
    theirs = dict(vae=vae, text_encoder=text_encoder, tokenizer=hf_tokenizer, safety_checker=None,
                  feature_extractor=None, requires_safety_checker=False)
    return dict(
        theirs=theirs, unet=unet, unet9=unet9,
        ours=StableDiffusion(ours_unet(unet), ours_vae, ours_text, tokenizer, schedule),
        ours9=StableDiffusion(ours_unet(unet9), ours_vae, ours_text, tokenizer, schedule),
    )


def diffusers_pipe(parts, cls_name: str, sampler: str, unet_key: str = "unet"):
    scheduler = getattr(diffusers, DIFFUSERS_CLASSES[sampler]).from_config(SD15_SCHEDULER)
    pipe = getattr(diffusers, cls_name)(unet=parts[unet_key], scheduler=scheduler, **parts["theirs"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_image() -> Image.Image:
    """A smooth colourful test picture."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def make_mask() -> Image.Image:
    m = np.zeros((SIZE, SIZE), dtype=np.uint8)
    m[16:48, 20:52] = 255  # white = repaint
    return Image.fromarray(m)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def max_diff(ours: torch.Tensor, theirs: np.ndarray) -> float:
    ours = ours.permute(0, 2, 3, 1).numpy()  # (B, H, W, 3), as diffusers' "np" output
    assert ours.shape == theirs.shape
    return float(np.abs(ours - theirs).max())


def assert_not_flat(images: np.ndarray) -> None:
    """The comparison means something: the random model's images are not clamped flat."""
    inside = ((images > 0.01) & (images < 0.99)).mean()
    assert inside > 0.2 and images.std() > 0.01, (inside, images.std())


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_txt2img_matches_diffusers(parts, sampler):
    steps = 3
    pipe = diffusers_pipe(parts, "StableDiffusionPipeline", sampler)
    theirs = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5,
                  height=SIZE, width=SIZE, generator=seeded(11), output_type="np").images
    ours = parts["ours"].txt2img(PROMPT, NEGATIVE, sampler=sampler, steps=steps, cfg_scale=7.5, height=SIZE,
                                 width=SIZE, seed=seeded(11), output="tensor")
    assert_not_flat(theirs)
    diff = max_diff(ours, theirs)
    print(f"txt2img {sampler}: max |diff| = {diff:.2e}")
    assert diff <= TOL


ZERO_SNR_V = {**SD15_SCHEDULER, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
              "timestep_spacing": "trailing"}


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_guidance_rescale_matches_diffusers(parts, sampler):
    """cfg_rescale is diffusers' guidance_rescale, on a zero-terminal-SNR v-prediction schedule
    (what it is for); the rescale must also change the image, or the comparison shows nothing."""
    scheduler = getattr(diffusers, DIFFUSERS_CLASSES[sampler]).from_config(ZERO_SNR_V)
    pipe = diffusers.StableDiffusionPipeline(unet=parts["unet"], scheduler=scheduler, **parts["theirs"])
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.5, guidance_rescale=0.7,
                  height=SIZE, width=SIZE, generator=seeded(13), output_type="np").images
    ours_sd = parts["ours"]
    ours_sd = StableDiffusion(ours_sd.unet, ours_sd.vae, ours_sd.text_encoder, ours_sd.tokenizer,
                              NoiseSchedule(ScheduleConfig.from_dict(ZERO_SNR_V)))
    run = lambda rescale: ours_sd.txt2img(PROMPT, NEGATIVE, sampler=sampler, steps=4, cfg_scale=7.5,  # noqa: E731
                                          cfg_rescale=rescale, height=SIZE, width=SIZE, seed=seeded(13),
                                          output="tensor")
    ours = run(0.7)
    assert_not_flat(theirs)
    diff = max_diff(ours, theirs)
    print(f"guidance rescale {sampler}: max |diff| = {diff:.2e}")
    assert diff <= TOL
    assert (ours - run(0.0)).abs().max() > 10 * TOL


# Starting part-way (img2img, inpainting with strength < 1), two diffusers schedulers do not follow
# their own full-length trajectory from the start point, while ldmkit runs the truncated plan
# exactly as a run that started there (the same rule for every sampler):
# - PNDMScheduler has no begin index: its timestep list repeats the second timestep (for the
#   warm-up), so cutting it at t_start * order starts one timestep too early (noise is added at
#   that level), and its step counter restarts, so after the warm-up it steps a sample that sits
#   at one timestep as if it were at the next. Measured: 0.39 (img2img), 0.38 (inpaint, 0.6).
# - LMSDiscreteScheduler picks its order from the global step index, min(step_index + 1, 4), but
#   has only the derivatives of this run: the first step multiplies the one derivative it has by
#   the 4th-order Adams coefficient instead of taking an Euler step (and so on for the next
#   two). Measured: 0.11 (img2img), 0.065 (inpaint, 0.6).
# Both match to ~1e-6 from pure noise (txt2img, inpainting at strength 1).
def _partial_start_quirk(sampler: str, measured: float):
    reason = {
        "pndm": "diffusers' PNDM restarts its warm-up on a timestep list cut one entry early",
        "lms": "diffusers' LMS uses order min(global step + 1, 4) with only this run's derivatives",
    }[sampler]
    return pytest.param(sampler, marks=pytest.mark.xfail(reason=f"{reason} (measured {measured})", strict=False))


IMG2IMG_SAMPLERS = [_partial_start_quirk(s, {"pndm": 0.39, "lms": 0.11}[s]) if s in ("pndm", "lms") else s
                    for s in SAMPLERS]
INPAINT_CASES = [
    pytest.param(s, st, marks=pytest.mark.xfail(reason=f"diffusers' {s} partial-start quirk (measured "
                                                       f"{ {'pndm': 0.38, 'lms': 0.065}[s]})", strict=False))
    if s in ("pndm", "lms") and st < 1 else (s, st)
    for s in SAMPLERS for st in (1.0, 0.6)
]


@pytest.mark.parametrize("sampler", IMG2IMG_SAMPLERS)
def test_img2img_matches_diffusers(parts, sampler):
    steps, strength = 5, 0.6
    pipe = diffusers_pipe(parts, "StableDiffusionImg2ImgPipeline", sampler)
    theirs = pipe(PROMPT, image=make_image(), strength=strength, negative_prompt=NEGATIVE,
                  num_inference_steps=steps, guidance_scale=7.5, generator=seeded(12), output_type="np").images
    ours = parts["ours"].img2img(PROMPT, make_image(), strength, NEGATIVE, sampler=sampler, steps=steps,
                                 cfg_scale=7.5, seed=seeded(12), output="tensor")
    assert_not_flat(theirs)
    diff = max_diff(ours, theirs)
    print(f"img2img {sampler}: max |diff| = {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("sampler, strength", INPAINT_CASES)
def test_inpaint_matches_diffusers(parts, sampler, strength):
    steps = 5
    pipe = diffusers_pipe(parts, "StableDiffusionInpaintPipeline", sampler, unet_key="unet9")
    theirs = pipe(PROMPT, image=make_image(), mask_image=make_mask(), strength=strength, negative_prompt=NEGATIVE,
                  num_inference_steps=steps, guidance_scale=7.5, height=SIZE, width=SIZE,
                  generator=seeded(13), output_type="np").images
    ours = parts["ours9"].inpaint(PROMPT, make_image(), make_mask(), NEGATIVE, strength=strength, sampler=sampler,
                                  steps=steps, cfg_scale=7.5, seed=seeded(13), output="tensor")
    assert_not_flat(theirs)
    diff = max_diff(ours, theirs)
    print(f"inpaint {sampler} strength {strength}: max |diff| = {diff:.2e}")
    assert diff <= TOL


# -- ldmkit's own behaviour ----------------------------------------------------------------------


@pytest.mark.parametrize("task", ["txt2img", "img2img", "inpaint"])
def test_batch_with_generator_list_equals_single_runs(parts, task):
    sd = parts["ours9"] if task == "inpaint" else parts["ours"]
    seeds = [5, 6, 7]

    def run(seed, n):
        kwargs = dict(sampler="euler_a", steps=3, seed=seed, num_images=n, output="tensor")
        if task == "txt2img":
            return sd.txt2img(PROMPT, height=SIZE, width=SIZE, **kwargs)
        if task == "img2img":
            return sd.img2img(PROMPT, make_image(), 0.7, **kwargs)
        return sd.inpaint(PROMPT, make_image(), make_mask(), strength=0.8, **kwargs)

    batch = run([seeded(s) for s in seeds], len(seeds))
    singles = torch.cat([run(seeded(s), 1) for s in seeds])
    assert (batch - singles).abs().max() <= 1e-4


def test_negative_prompt_and_seed_change_the_image(parts):
    sd = parts["ours"]
    kwargs = dict(sampler="euler", steps=2, height=32, width=32, output="tensor")
    a = sd.txt2img(PROMPT, seed=1, **kwargs)
    assert torch.equal(a, sd.txt2img(PROMPT, seed=1, **kwargs))
    assert (a - sd.txt2img(PROMPT, "a green circle", seed=1, **kwargs)).abs().max() > 1e-3
    assert (a - sd.txt2img(PROMPT, seed=2, **kwargs)).abs().max() > 1e-3


def test_txt2img_projects_the_text_once(parts):
    sd = parts["ours"]
    attn2 = [m for name, m in sd.unet.named_modules() if name.endswith("attn2")]
    projections = []
    hooks = [a.to_k.register_forward_hook(lambda module, args, out: projections.append(1)) for a in attn2]
    try:
        sd.txt2img(PROMPT, sampler="euler", steps=3, height=32, width=32, seed=0, output="tensor")
    finally:
        for hook in hooks:
            hook.remove()
    assert len(projections) == len(attn2) > 0  # 3 steps, one projection of the text per layer


def test_outputs_and_callback(parts):
    sd = parts["ours"]
    seen = []
    images = sd.txt2img([PROMPT, "x"], sampler="heun", steps=2, height=32, width=48, num_images=2, seed=0,
                        callback=lambda i, x: seen.append((i, tuple(x.shape))))
    assert len(images) == 4 and all(isinstance(im, Image.Image) and im.size == (48, 32) for im in images)
    assert seen == [(0, (4, 4, 4, 6)), (1, (4, 4, 4, 6))]
    latents = sd.txt2img(PROMPT, steps=2, height=32, width=32, seed=0, output="latent")
    assert latents.shape == (1, 4, 4, 4)


def test_four_channel_inpainting_keeps_the_known_region(parts):
    sd = parts["ours"]
    image, mask = make_image(), make_mask()
    out = sd.inpaint(PROMPT, image, mask, sampler="dpmpp_2m", steps=4, seed=3, output="latent")
    known = sd.encode_images(torch.from_numpy(np.asarray(image) / 255.0).permute(2, 0, 1)[None].float(),
                             1, seeded(3))
    keep = torch.nn.functional.interpolate(torch.from_numpy(np.asarray(mask) >= 128).float()[None, None],
                                           size=out.shape[-2:]) < 0.5
    keep = keep.expand_as(out)
    assert torch.allclose(out[keep], known[keep], atol=1e-4)  # dpmpp_2m ends on the denoised estimate
    assert not torch.allclose(out[~keep], known[~keep], atol=1e-2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=60), "height must be"),
    (dict(width=0), "width must be"),
    (dict(steps=0), "steps must be"),
    (dict(sampler="dpm_fast"), "unknown sampler"),
    (dict(output="jpeg"), "unknown output"),
    (dict(num_images=0), "num_images"),
    (dict(cfg_rescale=1.5), "cfg_rescale must be"),
    (dict(cfg_rescale=float("nan")), "cfg_rescale must be"),
    (dict(seed=[torch.Generator()] * 3), "one torch.Generator per image"),
    (dict(seed="7"), "seed must be"),
    (dict(sampler="ddim", karras=True), "Karras"),
    (dict(sampler="euler", eta=0.5), "eta applies"),
])
def test_bad_inputs_raise_invalid_argument(parts, kwargs, message):
    with pytest.raises(InvalidArgument, match=message):
        parts["ours"].txt2img(PROMPT, **{"steps": 2, "height": 32, "width": 32, **kwargs})


def test_bad_image_inputs_raise_invalid_argument(parts):
    sd = parts["ours"]
    with pytest.raises(InvalidArgument, match="strength must be"):
        sd.img2img(PROMPT, make_image(), 1.5, steps=2)
    with pytest.raises(InvalidArgument, match="leaves no step"):
        sd.img2img(PROMPT, make_image(), 0.1, steps=2)
    with pytest.raises(InvalidArgument, match="must be"):
        sd.img2img(PROMPT, torch.rand(1, 3, 30, 32), 0.5, steps=2)
    with pytest.raises(InvalidArgument, match="mask"):
        sd.inpaint(PROMPT, make_image(), torch.ones(1, 1, 8, 8), steps=2)
    with pytest.raises(InvalidArgument, match="inpainting U-Net"):
        parts["ours9"].txt2img(PROMPT, steps=2, height=32, width=32)


def test_nan_raises_generation_error(parts):
    broken = copy.deepcopy(parts["ours"])
    with torch.no_grad():
        broken.unet.conv_out.bias[0] = float("nan")
    with pytest.raises(GenerationError, match="NaN"):
        broken.txt2img(PROMPT, steps=2, height=32, width=32, seed=0)
