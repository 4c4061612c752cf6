"""Stable Diffusion: text-to-image, image-to-image and inpainting on ldmkit's modules.

`StableDiffusion` holds a U-Net, a VAE, a CLIP text encoder with its tokenizer, and the noise
schedule the U-Net was trained on. Each method is the same short story:

    encode the prompts once -> [uncond, cond] context (2B, 77, D)
    draw the start latents  -> x = x0 + sigma_0 * noise (VE view, see diffusion/denoiser.py)
    run the named sampler   -> SamplingPlan.run(CFG(Denoiser(U-Net)), x)
    decode                  -> VAE(latents / scaling_factor) -> images in [0, 1]

Decoding runs one image at a time and over overlapping tiles once the image is larger than
`vae_tile_size` (the VAE's training size by default), so its memory does not grow with the batch
or, much, with the image. Latents and decoded images are checked for NaN/Inf in every element; a
reduced-precision VAE whose decode overflows is retried once on a float32 copy before giving up.

Noise is drawn from the caller's `torch.Generator`s in diffusers' order (start noise, then the
samplers' fresh noise; for img2img/inpainting the VAE posterior sample comes first), so one seed
gives diffusers' image for the same weights and sampler.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..diffusion.denoiser import Denoiser, classifier_free_guidance
from ..diffusion.guidance import EmbedImage, Guidance, clip_guidance
from ..diffusion.samplers import gaussian_noise
from ..diffusion.sampling import SAMPLERS, SamplingPlan, make_plan
from ..diffusion.schedule import NoiseSchedule
from ..errors import GenerationError, InvalidArgument, check_choice
from ..models import onednn
from ..models.clip import CLIPModel, CLIPTextModel, clip_preprocess
from ..models.tokenizer import CLIPTokenizer
from ..models.unet import UNet
from ..models.vae import AutoencoderKL

OUTPUTS = ("pil", "tensor", "latent")  # PIL images; float (B, 3, H, W) in [0, 1]; U-Net latents
Generators = torch.Generator | Sequence[torch.Generator]
ImageInput = Image.Image | Sequence[Image.Image] | torch.Tensor  # PIL, or (B, 3, H, W) in [0, 1]
MaskInput = Image.Image | Sequence[Image.Image] | torch.Tensor  # white / 1 = repaint
Callback = Callable[[int, torch.Tensor], None] | None  # callback(step, latents) after each step


# -- input checking and conversion -------------------------------------------------------------


def _as_prompts(prompt: str | Sequence[str], what: str = "prompt") -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InvalidArgument(f"{what} must be a string or a non-empty list of strings")
    return prompts


def _check_common(sampler: str, steps: int, cfg_scale: float, num_images: int, output: str,
                  cfg_rescale: float = 0.0) -> None:
    check_choice("sampler", sampler, SAMPLERS)
    check_choice("output", output, OUTPUTS)
    if not isinstance(steps, int) or steps < 1:
        raise InvalidArgument(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(num_images, int) or num_images < 1:
        raise InvalidArgument(f"num_images must be an integer >= 1, got {num_images!r}")
    if not math.isfinite(cfg_scale):
        raise InvalidArgument(f"cfg_scale must be a finite number, got {cfg_scale}")
    if not 0.0 <= cfg_rescale <= 1.0:
        raise InvalidArgument(f"cfg_rescale must be between 0 and 1, got {cfg_rescale}")


def _check_strength(strength: float) -> None:
    if not 0.0 <= strength <= 1.0:
        raise InvalidArgument(f"strength must be between 0 and 1, got {strength}")


def make_generators(seed: int | Generators | None, batch: int) -> Generators:
    """A CPU generator from an int seed (a random seed when None); generators pass through.

    A list must hold one generator per image of the batch."""
    if seed is None:
        seed = random.randrange(2**63)
    if isinstance(seed, bool) or not isinstance(seed, (int, torch.Generator, list, tuple)):
        raise InvalidArgument(f"seed must be an int, a torch.Generator or a list of them, got {type(seed).__name__}")
    if isinstance(seed, int):
        return torch.Generator("cpu").manual_seed(seed)
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch or not all(isinstance(g, torch.Generator) for g in seed):
            raise InvalidArgument(f"a list of generators needs one torch.Generator per image ({batch}), got {len(seed)}")
        return list(seed)
    return seed


def seed_generators(seed: int, count: int) -> list[torch.Generator]:
    """One CPU generator per image: image k draws from `seed + k` alone.

    Passed as `seed=` this makes image k of a batch equal to a single run seeded `seed + k`, so
    any image can be regenerated on its own, whatever batch it came from."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidArgument(f"seed must be an integer >= 0, got {seed!r}")
    return [torch.Generator("cpu").manual_seed(seed + k) for k in range(count)]


def _pil_list(image) -> list[Image.Image] | None:
    if isinstance(image, Image.Image):
        return [image]
    if isinstance(image, (list, tuple)) and image and all(isinstance(i, Image.Image) for i in image):
        return list(image)
    return None


def image_to_tensor(image: ImageInput, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """Images as float (B, 3, H, W) in [0, 1]; PIL images are resized (Lanczos) to (height, width)."""
    pils = _pil_list(image)
    if pils is not None:
        arrays = []
        for im in pils:
            im = im.convert("RGB")
            if height is not None and im.size != (width, height):
                im = im.resize((width, height), resample=Image.LANCZOS)
            arrays.append(np.asarray(im, dtype=np.float32) / 255.0)  # (H, W, 3)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)
    if isinstance(image, torch.Tensor):
        x = image[None] if image.ndim == 3 else image
        if x.ndim != 4 or x.shape[1] != 3:
            raise InvalidArgument(f"an image tensor must be (B, 3, H, W) or (3, H, W), got {tuple(image.shape)}")
        if height is not None and x.shape[-2:] != (height, width):
            raise InvalidArgument(f"image is {x.shape[-1]}x{x.shape[-2]}, expected {width}x{height}")
        return x.float()
    raise InvalidArgument(f"image must be a PIL image, a list of them or a tensor, got {type(image).__name__}")


def mask_to_tensor(mask: MaskInput, height: int, width: int) -> torch.Tensor:
    """Binary masks (B, 1, H, W), 1 where the image is repainted (values >= 0.5)."""
    pils = _pil_list(mask)
    if pils is not None:
        arrays = []
        for im in pils:
            im = im.convert("L")
            if im.size != (width, height):
                im = im.resize((width, height), resample=Image.LANCZOS)
            arrays.append(np.asarray(im, dtype=np.float32) / 255.0)  # (H, W)
        m = torch.from_numpy(np.stack(arrays))[:, None]  # (B, 1, H, W)
    elif isinstance(mask, torch.Tensor):
        m = mask.float()
        m = m.reshape(1, 1, *m.shape) if m.ndim == 2 else m[None] if m.ndim == 3 else m
        if m.ndim != 4 or m.shape[1] != 1 or m.shape[-2:] != (height, width):
            raise InvalidArgument(f"a mask tensor must be (B, 1, {height}, {width}), got {tuple(mask.shape)}")
    else:
        raise InvalidArgument(f"mask must be a PIL image, a list of them or a tensor, got {type(mask).__name__}")
    return (m >= 0.5).float()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> uint8 PIL images (rounded as diffusers rounds)."""
    arrays = (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


def _repeat_to(x: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    if x.shape[0] == batch:
        return x
    if batch % x.shape[0]:
        raise InvalidArgument(f"{x.shape[0]} {what}s cannot be spread over a batch of {batch} images")
    return x.repeat(batch // x.shape[0], *([1] * (x.ndim - 1)))


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise GenerationError(f"generation produced NaN or Inf values in the {what} "
                              "(try float32, a lower cfg_scale or another sampler)")


def clip_image_embedder(clip_model: CLIPModel) -> EmbedImage:
    """images (B, 3, H, W) in [-1, 1] -> `clip_model`'s image embeddings (B, P), differentiable;
    the `embed_image` of diffusion.guidance.clip_guidance."""
    size, dtype = clip_model.config.vision.image_size, clip_model.visual_projection.weight.dtype
    return lambda images: clip_model.encode_image(clip_preprocess(images, size).to(dtype))


# -- the pipeline ------------------------------------------------------------------------------


class StableDiffusion:
    """Text-to-image, image-to-image and inpainting with ldmkit's U-Net, VAE and CLIP text model.

    The U-Net takes 4 latent channels (ordinary models) or 9 (inpainting models: latents, mask,
    masked-image latents). Modules stay where they are: sampling runs on the U-Net's device, with
    sampler arithmetic in float32 and the networks in their own dtype.
    """

    def __init__(self, unet: UNet, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer, schedule: NoiseSchedule, default_cfg_scale: float = 7.5) -> None:
        self.unet = unet.eval()
        self.vae = vae.eval()
        self.text_encoder = text_encoder.eval()
        self.tokenizer = tokenizer
        self.schedule = schedule
        self.latent_channels = vae.config.latent_channels
        self.downscale = vae.config.downscale
        self.multiple = math.lcm(8, self.downscale)  # height and width must be multiples of this
        self.vae_tile_size: int | None = vae.config.sample_size  # decode/encode tiles above this side; None: never
        self.default_cfg_scale = default_cfg_scale  # the guidance the CLI uses when none is asked for

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def default_size(self) -> int:
        """The image side the model was trained at (U-Net sample size times the VAE downscale)."""
        latent = self.unet.config.sample_size
        return latent * self.downscale if latent else self.vae.config.sample_size

    @property
    def is_inpainting_model(self) -> bool:
        return self.unet.config.in_channels == 2 * self.latent_channels + 1

    # -- building blocks -----------------------------------------------------------------------

    def _check_size(self, height: int, width: int) -> None:
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v < self.multiple or v % self.multiple:
                raise InvalidArgument(f"{name} must be a positive multiple of {self.multiple}, got {v!r}")

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], negative: list[str], num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) contexts, each (B * num_images, T, D), images of one prompt adjacent."""
        if len(negative) == 1 and len(prompts) > 1:
            negative = negative * len(prompts)
        if len(negative) != len(prompts):
            raise InvalidArgument(f"got {len(negative)} negative prompts for {len(prompts)} prompts")
        ids = self.tokenizer(prompts + negative).to(self.device)  # (2P, T)
        emb = self.text_encoder(ids).last_hidden_state  # (2P, T, D)
        cond, uncond = emb.chunk(2)
        return cond.repeat_interleave(num_images, 0), uncond.repeat_interleave(num_images, 0)

    def _network(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                 cond_image: torch.Tensor | None = None) -> torch.Tensor:
        """The U-Net on sampler tensors: inpainting models get [x, mask, masked latents] stacked."""
        if cond_image is not None:
            x = torch.cat([x, cond_image.to(x.dtype)], dim=1)  # (B, 9, h, w)
        dtype = next(self.unet.parameters()).dtype
        return self.unet(x.to(dtype), t, context.to(dtype)).float()

    def _denoiser(self, plan: SamplingPlan, cond: dict, uncond: dict, cfg_scale: float, cfg_rescale: float = 0.0):
        denoiser = Denoiser(self._network, self.schedule, quantize_timesteps=plan.quantize_timesteps)
        return classifier_free_guidance(denoiser, cond, uncond, cfg_scale, cfg_rescale)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch: int, generator: Generators,
                      normalized: bool = False) -> torch.Tensor:
        """U-Net latents (batch, C, h, w) of images in [0, 1] (in [-1, 1] when `normalized`): a
        posterior sample times the scaling factor, drawn as diffusers draws it (one draw for the
        images with one generator, one draw per image with a list)."""
        x = images.to(self.device, self.vae_dtype)
        x = x if normalized else x * 2 - 1  # [-1, 1]
        encode = lambda x_: self.vae.encode(x_, sliced=True, tile_size=self.vae_tile_size)  # noqa: E731
        if isinstance(generator, list):
            x = _repeat_to(x, batch, "image")
            z = torch.cat([encode(x[i:i + 1]).sample(g) for i, g in enumerate(generator)])
        else:
            z = encode(x).sample(generator)
        return _repeat_to(z.float() * self.vae.config.scaling_factor, batch, "image")

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] from U-Net latents, decoded one at a time (tiled above
        `vae_tile_size`). A bf16/fp16 VAE can overflow where float32 does not, so a non-finite
        decode is retried once on a float32 copy of the VAE before GenerationError."""
        images = self._decode(self.vae, latents)
        if self.vae_dtype != torch.float32 and not torch.isfinite(images).all():
            images = self._decode(onednn.plain_copy(self.vae).float(), latents)  # its Winograd layers plain again
        _check_finite(images, "decoded images")
        return (images / 2 + 0.5).clamp(0, 1)

    def _decode(self, vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
        z = (latents / vae.config.scaling_factor).to(next(vae.parameters()).dtype)
        return vae.decode(z, sliced=True, tile_size=self.vae_tile_size).float()  # [-1, 1]

    def _sample(self, plan: SamplingPlan, denoiser, x: torch.Tensor, eta, generator, callback) -> torch.Tensor:
        """Run the plan from x (VE view) and return U-Net latents (DDPM view)."""
        user_callback = callback

        def on_step(i: int, x_i: torch.Tensor) -> None:
            user_callback(i, x_i / math.sqrt(1 + float(plan.sigmas[i + 1]) ** 2))

        with self.unet.reusing_context():  # the text's keys and values once, not at every step
            out = plan.run(denoiser, x, eta=eta, generator=generator, callback=on_step if callback else None)
        latents = plan.to_vp(out)
        _check_finite(latents, "latents")
        return latents

    def _finish(self, latents: torch.Tensor, output: str):
        if output == "latent":
            return latents
        images = self.decode_latents(latents)
        return images if output == "tensor" else to_pil(images)

    def plan(self, sampler: str, steps: int, karras: bool = False, strength: float = 1.0) -> SamplingPlan:
        """The noise levels a run visits (`plan(...).steps` is how often the callback is called)."""
        plan = make_plan(sampler, self.schedule, steps, karras=karras)
        plan = plan.from_strength(strength) if strength < 1.0 else plan
        if plan.steps < 1:
            raise InvalidArgument(f"strength {strength} with {steps} steps leaves no step to run; raise either")
        return plan

    # -- the three tasks -----------------------------------------------------------------------

    @torch.no_grad()
    def txt2img(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] = "", *,
                sampler: str = "pndm", steps: int = 50, cfg_scale: float = 7.5, cfg_rescale: float = 0.0,
                eta: float | None = None, karras: bool = False, height: int = 512, width: int = 512,
                num_images: int = 1, seed: int | Generators | None = None, output: str = "pil",
                callback: Callback = None, guidance: Guidance | None = None):
        """Images for `prompt` (one or a list), `num_images` each, from pure noise.

        seed: an int, a CPU torch.Generator, or one generator per image (then a batch equals the
        single runs). guidance: wraps the CFG denoiser, e.g. `self.make_clip_guidance(...)` or
        `lambda d: dynamic_thresholding(d)` (diffusion/guidance.py). Returns PIL images, a
        (B, 3, H, W) tensor in [0, 1] or the latents.
        """
        prompts, negative = _as_prompts(prompt), _as_prompts(negative_prompt, "negative_prompt")
        _check_common(sampler, steps, cfg_scale, num_images, output, cfg_rescale)
        self._check_size(height, width)
        if self.is_inpainting_model:
            raise InvalidArgument("this is an inpainting U-Net; use inpaint()")
        batch = len(prompts) * num_images
        generator = make_generators(seed, batch)
        plan = self.plan(sampler, steps, karras, 1.0)
        cond, uncond = self.encode_prompt(prompts, negative, num_images)
        shape = (batch, self.latent_channels, height // self.downscale, width // self.downscale)
        x = gaussian_noise(shape, generator, self.device) * plan.init_noise_scale
        denoiser = self._denoiser(plan, {"context": cond}, {"context": uncond}, cfg_scale, cfg_rescale)
        if guidance is not None:
            denoiser = guidance(denoiser)
        return self._finish(self._sample(plan, denoiser, x, eta, generator, callback), output)

    @torch.no_grad()
    def img2img(self, prompt: str | Sequence[str], image: ImageInput, strength: float = 0.8,
                negative_prompt: str | Sequence[str] = "", *, sampler: str = "pndm", steps: int = 50,
                cfg_scale: float = 7.5, cfg_rescale: float = 0.0, eta: float | None = None, karras: bool = False,
                num_images: int = 1, seed: int | Generators | None = None, output: str = "pil",
                callback: Callback = None):
        """Re-imagine `image`: noise its latents to the level `strength` of the way (0: unchanged,
        1: pure noise) and run the last int(steps * strength) steps from there.

        PIL images are cut down to multiples of 8 (Lanczos resize); tensors must already fit.
        """
        prompts, negative = _as_prompts(prompt), _as_prompts(negative_prompt, "negative_prompt")
        _check_common(sampler, steps, cfg_scale, num_images, output, cfg_rescale)
        _check_strength(strength)
        if self.is_inpainting_model:
            raise InvalidArgument("this is an inpainting U-Net; use inpaint()")
        pixels = self._load_image(image)
        height, width = pixels.shape[-2:]
        batch = len(prompts) * num_images
        generator = make_generators(seed, batch)
        plan = self.plan(sampler, steps, karras, strength)
        cond, uncond = self.encode_prompt(prompts, negative, num_images)
        x0 = self.encode_images(pixels, batch, generator)
        noise = gaussian_noise(x0.shape, generator, self.device)
        x = x0 + noise * float(plan.sigmas[0])  # q(x_t | x0) in the VE view
        denoiser = self._denoiser(plan, {"context": cond}, {"context": uncond}, cfg_scale, cfg_rescale)
        return self._finish(self._sample(plan, denoiser, x, eta, generator, callback), output)

    @torch.no_grad()
    def inpaint(self, prompt: str | Sequence[str], image: ImageInput, mask: MaskInput,
                negative_prompt: str | Sequence[str] = "", *, strength: float = 1.0, sampler: str = "pndm",
                steps: int = 50, cfg_scale: float = 7.5, cfg_rescale: float = 0.0, eta: float | None = None,
                karras: bool = False, num_images: int = 1, seed: int | Generators | None = None,
                output: str = "pil", callback: Callback = None):
        """Repaint the white part of `mask` in `image` (same size) to fit `prompt`.

        Inpainting U-Nets (9 input channels) see [latents, mask, masked-image latents] at every
        call, as they were trained. Ordinary U-Nets (4 channels) keep the known region on the
        noised original: its latents start at x0 + sigma_0 * noise, and the denoised estimate
        there is replaced by x0 at every call, so each step lands the known region on x0 noised
        to the next sigma (for the deterministic samplers exactly diffusers' re-noise-and-blend).
        """
        prompts, negative = _as_prompts(prompt), _as_prompts(negative_prompt, "negative_prompt")
        _check_common(sampler, steps, cfg_scale, num_images, output, cfg_rescale)
        _check_strength(strength)
        in_ch = self.unet.config.in_channels
        if in_ch not in (self.latent_channels, 2 * self.latent_channels + 1):
            raise InvalidArgument(f"inpainting needs a U-Net with {self.latent_channels} or "
                                  f"{2 * self.latent_channels + 1} input channels, this one has {in_ch}")
        pixels = self._load_image(image)
        height, width = pixels.shape[-2:]
        masks = mask_to_tensor(mask, height, width)
        batch = len(prompts) * num_images
        generator = make_generators(seed, batch)
        plan = self.plan(sampler, steps, karras, strength)
        cond, uncond = self.encode_prompt(prompts, negative, num_images)
        shape = (batch, self.latent_channels, height // self.downscale, width // self.downscale)

        # start latents, drawn in diffusers' order: image posterior sample (when needed), noise
        known = None
        if not self.is_inpainting_model or strength < 1.0:
            known = self.encode_images(pixels, batch, generator)
        noise = gaussian_noise(shape, generator, self.device)
        x = noise * plan.init_noise_scale if strength == 1.0 else known + noise * float(plan.sigmas[0])
        latent_mask = _repeat_to(F.interpolate(masks, size=shape[-2:]), batch, "mask").to(self.device)  # nearest

        if self.is_inpainting_model:
            # the hole is zeroed in [-1, 1] (mid grey), as the inpainting models were trained
            masked = (pixels * 2 - 1) * (masks < 0.5)
            masked_latents = self.encode_images(masked, batch, generator, normalized=True)
            cond_image = torch.cat([latent_mask, masked_latents], dim=1)  # (B, 1 + C, h, w)
            denoiser = self._denoiser(plan, {"context": cond, "cond_image": cond_image},
                                      {"context": uncond, "cond_image": cond_image}, cfg_scale, cfg_rescale)
        else:
            x = latent_mask * x + (1 - latent_mask) * (known + noise * float(plan.sigmas[0]))
            guided = self._denoiser(plan, {"context": cond}, {"context": uncond}, cfg_scale, cfg_rescale)

            def denoiser(x_: torch.Tensor, sigma, **kwargs) -> torch.Tensor:
                return latent_mask * guided(x_, sigma, **kwargs) + (1 - latent_mask) * known

        return self._finish(self._sample(plan, denoiser, x, eta, generator, callback), output)

    # -- guidance hooks (diffusion/guidance.py) ------------------------------------------------

    @torch.no_grad()
    def make_clip_guidance(self, clip_model: CLIPModel, prompt: str | Sequence[str], scale: float,
                           tokenizer: CLIPTokenizer | None = None) -> Guidance:
        """A `guidance=` hook for txt2img steering the decoded images toward `prompt` under
        `clip_model` (one prompt, or one per prompt of the run). The gradient of the CLIP cosine
        similarity flows through the VAE decoder and the U-Net. `tokenizer` defaults to the
        pipeline's; pass the CLIP model's own when its vocabulary differs."""
        if not math.isfinite(scale):
            raise InvalidArgument(f"CLIP guidance scale must be a finite number, got {scale}")
        tokenizer = tokenizer or self.tokenizer
        device = clip_model.logit_scale.device
        text = clip_model.encode_text(tokenizer(_as_prompts(prompt)).to(device), normalize=True)  # (P, D)
        embed_image = clip_image_embedder(clip_model)
        decode = lambda z: self._decode(self.vae, z)  # noqa: E731  differentiable, [-1, 1]
        return lambda denoiser: clip_guidance(denoiser, embed_image, text, decode, scale)

    def _load_image(self, image: ImageInput) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] with H and W multiples of `self.multiple`."""
        pils = _pil_list(image)
        if pils is not None:
            w, h = pils[0].size
            m = self.multiple
            height, width = h // m * m, w // m * m
            self._check_size(height, width)
            return image_to_tensor(pils, height, width)
        pixels = image_to_tensor(image)
        self._check_size(int(pixels.shape[-2]), int(pixels.shape[-1]))
        if pixels.min() < 0 or pixels.max() > 1:
            raise InvalidArgument("image tensors must hold values in [0, 1]")
        return pixels
