"""Stage recipes: what each network of latent diffusion is trained on, and with which loss.

Each stage follows the trainer's `Stage` protocol: `model`, `__len__`, `batch(indices)`,
`loss(model, batch, rand) -> (per-row losses, scalars)` and `sample(model, step)`. The model a
loss receives may be wrapped in DistributedDataParallel, so losses only call `model(...)`.

- `VAEStage`: the KL autoencoder, L1 reconstruction + a small KL term (Rombach et al. 2022, §3),
  optionally a perceptual term from a user-supplied feature network.
- `CLIPStage`: the symmetric contrastive loss on image-caption pairs (Radford et al. 2021).
- `LatentUNetStage`: the text-conditioned U-Net on frozen-VAE latents and frozen-CLIP context,
  with 10% caption dropout for classifier-free guidance (Ho & Salimans 2022).
- `PixelDDPMStage`: a class-conditional U-Net on pixels (Ho et al. 2020), label dropout for CFG.
- `MinimalStage`: the course's basic U-Net predicting the clean image from a linear noise mix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import nn

from ..data import make_grid
from ..diffusion.forward import min_snr_weights, q_sample, training_target
from ..diffusion.schedule import NoiseSchedule
from ..errors import InvalidArgument
from ..models.clip import CLIPModel, clip_preprocess, zero_shot_classify
from ..models.tokenizer import CLIPTokenizer
from ..models.unet import UNet
from ..models.vae import AutoencoderKL, VAEConfig


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> uint8, a quarter of the memory for cached data sets."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def uint8_to_images(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1


def per_row_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)


# -- VAE ---------------------------------------------------------------------------------------


class VAETrainingModel(nn.Module):
    """The autoencoder as one forward call: x and noise -> (reconstruction, mean, logvar), so
    DistributedDataParallel sees a single forward."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x)
        z = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)  # reparameterisation
        return self.vae.decode(z), posterior.mean, posterior.logvar


class VAEStage:
    """Reconstruction (L1 by default, or L2) + `kl_weight` * KL(q(z|x) || N(0, I)) per pixel.

    `perceptual`: an optional feature network f (images in [-1, 1] -> features); the loss then
    adds `perceptual_weight` * mean |f(x) - f(recon)|. LDM used LPIPS on VGG; ldmkit downloads
    nothing, so the user brings the network (e.g. a classifier trained on their data).
    """

    name = "vae"

    def __init__(self, config: VAEConfig, images: torch.Tensor, kl_weight: float = 1e-6,
                 reconstruction: str = "l1", perceptual: Callable | None = None,
                 perceptual_weight: float = 0.1, sample_count: int = 8, crop_size: int | None = None,
                 decoder_of: AutoencoderKL | None = None) -> None:
        if reconstruction not in ("l1", "l2"):
            raise InvalidArgument(f"reconstruction must be l1 or l2, got {reconstruction!r}")
        if decoder_of is not None:  # the same latent space: its measured scaling factor too
            config = replace(config, scaling_factor=decoder_of.config.scaling_factor)
        vae = AutoencoderKL(config)
        if decoder_of is not None:
            # Fine-tune only the decoder of a trained VAE (as SD's ft-MSE VAE did): the encoder,
            # and so the latent space a U-Net learns, stay exactly as they are.
            vae.load_state_dict(decoder_of.state_dict())
            for frozen in (vae.encoder, vae.quant_conv):
                if frozen is not None:
                    frozen.requires_grad_(False)
            self.name = "vae_decoder"
        self.model = VAETrainingModel(vae)
        self.images = images  # (N, C, H, W) uint8
        self.kl_weight, self.reconstruction = kl_weight, reconstruction
        self.perceptual, self.perceptual_weight = perceptual, perceptual_weight
        self.sample_count = sample_count
        self.crop_size = crop_size  # train on random square crops (the model is convolutional): cheaper steps
        side = crop_size or images.shape[-1]
        if side % config.downscale or side > min(images.shape[-2:]):
            raise InvalidArgument(f"crop_size {side} must fit the images and be a multiple of {config.downscale}")
        self.latent_shape = (config.latent_channels, side // config.downscale, side // config.downscale)

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: list[int]) -> dict:
        return {"image": uint8_to_images(self.images[indices])}

    def _crop(self, x: torch.Tensor, rand) -> torch.Tensor:
        c = self.crop_size
        if c is None:
            return x
        tops, lefts = rand.randint(x.shape[-2] - c + 1), rand.randint(x.shape[-1] - c + 1)
        return torch.stack([img[:, t:t + c, l:l + c] for img, t, l in zip(x, tops.tolist(), lefts.tolist())])

    def loss(self, model, batch, rand):
        x = self._crop(batch["image"], rand)
        recon, mean, logvar = model(x, rand.randn(*self.latent_shape))
        error = (recon.float() - x).abs() if self.reconstruction == "l1" else (recon.float() - x).pow(2)
        rec = error.flatten(1).mean(1)  # (B,)
        kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1 - logvar.float()).flatten(1).sum(1)
        # LDM weighs the summed KL against the summed pixel error; both divided by the pixel count here
        loss = rec + self.kl_weight * kl / x[0].numel()
        if self.perceptual is not None:
            loss = loss + self.perceptual_weight * (self.perceptual(recon) - self.perceptual(x)).abs().flatten(1).mean(1)
        return loss, {"reconstruction": rec.mean().item(), "kl": kl.mean().item()}

    @torch.no_grad()
    def sample(self, model: VAETrainingModel, step: int):
        """Originals (top row) over their reconstructions (bottom row)."""
        x = uint8_to_images(self.images[: self.sample_count])
        recon = model.vae.decode(model.vae.encode(x).mode()).float()
        return make_grid(torch.cat([x, recon]), nrow=len(x))


@torch.no_grad()
def measure_scaling_factor(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator,
                           batch_size: int = 256) -> float:
    """1 / std of posterior samples over `images` (uint8), the way SD's 0.18215 was found, so the
    U-Net sees latents of unit variance."""
    samples = [vae.encode(uint8_to_images(images[i:i + batch_size])).sample(generator)
               for i in range(0, len(images), batch_size)]
    return float(1.0 / torch.cat(samples).float().std())


# -- CLIP --------------------------------------------------------------------------------------


class CLIPStage:
    """The symmetric contrastive loss over each micro-batch's image-caption pairs.

    Captions repeat in small vocabularies (shapes: ~1,300 distinct); a repeated caption in the
    batch is a false negative the loss cannot know about, which only softens the objective.
    With several ranks, negatives are those of the rank's own micro-batch (no all-gather).
    With `hard_negatives` (caption -> captions of other scenes, e.g. `data.shapes.hard_negatives`)
    those texts join each micro-batch as extra negatives for the images (NegCLIP).

    `token_loss_weight` adds a word-keeping term for the text tower: each word's last hidden state
    must name its own word again (a cross-entropy over the vocabulary, read out with the tied
    token embeddings). The contrastive loss trains only the end token; the other states, which a
    U-Net's cross-attention reads, are free to lose their words, and words that barely move that
    loss (the relation words of shapes captions) do: after one layer, "left" and "right" had
    states with cosine similarity 0.995. With `token_context` k > 0 each state must also name the
    up to k words before it (its target: half its own word, half those words), so that a word carries
    what precedes it, such as the relation before the second object: a U-Net learns where to put
    an object when the object's own tokens carry its role, not from a separate relation token
    (README, "The binding, isolated").
    """

    name = "clip"

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer, images: torch.Tensor, captions: Sequence[str],
                 zero_shot: tuple[torch.Tensor, list[int], list[str]] | None = None,
                 hard_negatives: Callable[[str], list[str]] | None = None, token_loss_weight: float = 0.0,
                 token_context: int = 0) -> None:
        if len(images) != len(captions):
            raise InvalidArgument(f"{len(images)} images but {len(captions)} captions")
        self.model, self.tokenizer = model, tokenizer
        self.images, self.captions = images, list(captions)
        self.ids = tokenizer(self.captions, warn_truncation=False)  # (N, T), tokenised once
        self.zero_shot = zero_shot  # (images uint8, labels, class prompts) for a held-out check
        # per row, the ids (K, T) of captions that reuse its words for another scene, tokenised once
        self.negative_ids = None if hard_negatives is None else _negative_ids(tokenizer, self.captions, hard_negatives)
        if token_context < 0 or (token_context and not token_loss_weight):
            raise InvalidArgument(f"token_context must be >= 0 and needs a token_loss_weight, got {token_context}")
        self.token_loss_weight, self.token_context = token_loss_weight, token_context

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: list[int]) -> dict:
        pixels = clip_preprocess(uint8_to_images(self.images[indices]), self.model.config.vision.image_size)
        ids = self.ids[indices]
        if self.negative_ids is not None:  # after the batch's own captions: texts no image matches
            ids = torch.cat([ids, *(self.negative_ids[i] for i in indices)])
        return {"pixels": pixels, "ids": ids}

    def loss(self, model, batch, rand):
        out = model(batch["ids"], batch["pixels"], return_loss=True)
        clip = model.module if hasattr(model, "module") else model
        scalars = {"logit_scale": clip.logit_scale.exp().item()}
        if not self.token_loss_weight:
            return out.loss, scalars
        token_loss = self._token_loss(out.text_hidden_state, batch["ids"], clip.text_model.embeddings.token_embedding)
        scalars["token_loss"] = token_loss.item()
        return out.loss + self.token_loss_weight * token_loss, scalars

    def _token_loss(self, states: torch.Tensor, ids: torch.Tensor, embedding: nn.Embedding) -> torch.Tensor:
        """Cross-entropy of each word token's id from its own state (B, T, D), read out with the
        token embeddings, and with `token_context` k, of the up to k words before it (together
        weighted as much as its own); start, end and padding tokens are not words."""
        special = torch.tensor([self.tokenizer.bos_id, self.tokenizer.eos_id, self.tokenizer.pad_id])
        words = ~torch.isin(ids, special.to(ids.device))  # (B, T)
        log_probs = nn.functional.log_softmax(states[words] @ embedding.weight.t(), dim=-1)  # (W, V)
        own = log_probs.gather(1, ids[words][:, None])[:, 0]  # (W,)
        context, count = torch.zeros_like(own), torch.zeros_like(own)
        for back in range(1, self.token_context + 1):
            earlier = nn.functional.pad(ids, (back, 0), value=self.tokenizer.pad_id)[:, :-back]  # ids[t - back]
            is_word = nn.functional.pad(words, (back, 0), value=False)[:, :-back][words]  # (W,)
            context = context + log_probs.gather(1, earlier[words][:, None])[:, 0] * is_word
            count = count + is_word
        mixed = torch.where(count > 0, (own + context / count.clamp(min=1)) / 2, own)
        return -mixed.mean()

    @torch.no_grad()
    def zero_shot_accuracy(self, model: CLIPModel) -> float | None:
        if self.zero_shot is None:
            return None
        images, labels, prompts = self.zero_shot
        probs = zero_shot_classify(model, self.tokenizer, uint8_to_images(images), prompts)
        return float((probs.argmax(-1) == torch.tensor(labels)).float().mean())

    @torch.no_grad()
    def hard_negative_accuracy(self, model: CLIPModel, images: torch.Tensor, captions: list[str],
                               hard_negatives: Callable[[str], list[str]]) -> float:
        """The fraction of `images` (uint8) whose own caption scores above each of its hard
        negatives: chance for a bag-of-words reader, 1.0 for one that reads relations and bindings.
        Images whose caption has no hard negatives (one object) are not counted."""
        pixels = clip_preprocess(uint8_to_images(images), model.config.vision.image_size)
        image = model.encode_image(pixels, normalize=True)
        right = []
        for embedding, text in zip(image, captions):
            if negatives := hard_negatives(text):
                scores = model.encode_text(self.tokenizer([text, *negatives]), normalize=True) @ embedding
                right.append(bool((scores[0] > scores[1:]).all()))
        if not right:
            raise InvalidArgument("no caption has hard negatives to rank against")
        return sum(right) / len(right)

    def sample(self, model, step):
        return None


def _negative_ids(tokenizer: CLIPTokenizer, captions: list[str], hard_negatives) -> list[torch.Tensor]:
    """Per caption, its hard negatives' ids (K, T), K = 0 for none; each distinct caption tokenised once."""
    distinct = {c: hard_negatives(c) for c in set(captions)}
    ids = {c: tokenizer(negs, warn_truncation=False) if negs else torch.zeros(0, tokenizer.context_length,
                                                                              dtype=torch.long)
           for c, negs in distinct.items()}
    return [ids[c] for c in captions]


# -- text-conditioned latent U-Net ----------------------------------------------------------------


class LatentUNetStage:
    """Denoising in a frozen VAE's latent space, conditioned on a frozen text encoder's context.

    Latents are encoded once (posterior mean and std, so every step still draws a fresh sample)
    and contexts once per distinct caption: the frozen networks cost nothing per step.
    `latents` are already multiplied by the scaling factor.
    """

    name = "unet"

    def __init__(self, unet: UNet, schedule: NoiseSchedule, latent_mean: torch.Tensor, latent_std: torch.Tensor,
                 caption_ids: torch.Tensor, contexts: torch.Tensor, empty_context: torch.Tensor,
                 caption_dropout: float = 0.1, snr_gamma: float | None = None,
                 high_noise_fraction: float = 0.0, sampler: Callable | None = None) -> None:
        if not 0.0 <= high_noise_fraction <= 1.0:
            raise InvalidArgument(f"the high-noise fraction must be in [0, 1], got {high_noise_fraction}")
        self.model, self.schedule = unet, schedule
        self.latent_mean, self.latent_std = latent_mean, latent_std  # (N, C, h, w) each
        self.caption_ids = caption_ids  # (N,) index into contexts
        self.contexts, self.empty_context = contexts, empty_context  # (K, T, D), (T, D)
        self.caption_dropout = caption_dropout
        # Min-SNR-gamma loss weights (None: plain MSE): rows at nearly clean timesteps (SNR above
        # gamma) count less, so that they do not outweigh the noisy ones where a layout is decided
        self.snr_gamma = snr_gamma
        # This fraction of rows draws its timestep from the noisiest tenth of the schedule instead
        # of all of it: a two-object layout is decided there, where uniform sampling spends 1 row in 10
        self.high_noise_fraction = high_noise_fraction
        self.sampler = sampler  # (model) -> PIL grid, for progress samples

    def __len__(self) -> int:
        return len(self.latent_mean)

    def batch(self, indices: list[int]) -> dict:
        return {"mean": self.latent_mean[indices], "std": self.latent_std[indices],
                "context": self.contexts[self.caption_ids[indices]]}

    def loss(self, model, batch, rand):
        mean = batch["mean"]
        x0 = mean + batch["std"] * rand.randn(*mean.shape[1:])
        drop = (rand.rand() < self.caption_dropout).view(-1, 1, 1)
        context = torch.where(drop, self.empty_context.to(batch["context"]), batch["context"])
        t = self._timesteps(rand)
        noise = rand.randn(*mean.shape[1:])
        prediction = model(q_sample(self.schedule, x0, t, noise), t.float(), context)
        target = training_target(self.schedule.prediction_type, self.schedule, x0, t, noise)
        loss = per_row_mse(prediction, target)
        if self.snr_gamma is not None:
            loss = loss * min_snr_weights(self.schedule, t, self.snr_gamma, self.schedule.prediction_type).to(loss)
        return loss, {}

    def _timesteps(self, rand) -> torch.Tensor:
        steps = self.schedule.num_train_timesteps
        t = rand.randint(steps)
        if self.high_noise_fraction > 0:  # extra draws only then: the plain stream stays as it was
            high = rand.rand() < self.high_noise_fraction
            # the uniform draw taken modulo a tenth of the schedule is uniform over that tenth
            t = torch.where(high, steps - 1 - t % max(steps // 10, 1), t)
        return t

    def sample(self, model, step):
        return self.sampler(model) if self.sampler is not None else None


# -- pixel-space stages -------------------------------------------------------------------------


class PixelDDPMStage:
    """Class-conditional pixel-space DDPM; label `null_class` (dropped 10%) is "no label" for CFG."""

    name = "pixel_ddpm"

    def __init__(self, unet: UNet, schedule: NoiseSchedule, images: torch.Tensor, labels: torch.Tensor,
                 null_class: int, label_dropout: float = 0.1, sampler: Callable | None = None) -> None:
        self.model, self.schedule = unet, schedule
        self.images, self.labels = images, labels  # (N, C, H, W) float in [-1, 1], (N,)
        self.null_class, self.label_dropout = null_class, label_dropout
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: list[int]) -> dict:
        return {"image": self.images[indices], "label": self.labels[indices]}

    def loss(self, model, batch, rand):
        x0, labels = batch["image"], batch["label"]
        labels = torch.where(rand.rand() < self.label_dropout, self.null_class, labels)
        t = rand.randint(self.schedule.num_train_timesteps)
        noise = rand.randn(*x0.shape[1:])
        prediction = model(q_sample(self.schedule, x0, t, noise), t.float(), class_labels=labels)
        target = training_target(self.schedule.prediction_type, self.schedule, x0, t, noise)
        return per_row_mse(prediction, target), {}

    def sample(self, model, step):
        return self.sampler(model) if self.sampler is not None else None


class MinimalStage:
    """The course's first diffusion model: x_noisy = (1 - amount) x + amount * noise with amount
    uniform in [0, 1], and the basic U-Net predicts x itself (no time input)."""

    name = "minimal"

    def __init__(self, unet: UNet, images: torch.Tensor) -> None:
        if unet.config.architecture != "basic":
            raise InvalidArgument("the minimal stage trains the basic U-Net (unet_preset('minimal'))")
        self.model, self.images = unet, images

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: list[int]) -> dict:
        return {"image": self.images[indices]}

    def loss(self, model, batch, rand):
        x = batch["image"]
        amount = rand.rand().view(-1, 1, 1, 1)
        noisy = (1 - amount) * x + amount * rand.randn(*x.shape[1:])
        return per_row_mse(model(noisy), x), {}

    @torch.no_grad()
    def sample(self, model, step, count: int = 16, steps: int = 5):
        """The course's sampler: start from noise, move 1/(steps - i) of the way to the prediction."""
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((count, *self.images.shape[1:]), generator=gen)
        for i in range(steps):
            x = x + (model(x) - x) / (steps - i)
        return make_grid(x.clamp(-1, 1), nrow=8)


__all__ = [
    "CLIPStage", "LatentUNetStage", "MinimalStage", "PixelDDPMStage", "VAEStage", "VAETrainingModel",
    "images_to_uint8", "measure_scaling_factor", "per_row_mse", "uint8_to_images",
]
