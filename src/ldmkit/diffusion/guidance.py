"""Denoiser wrappers that steer sampling: classifier guidance, CLIP guidance, dynamic thresholding.

Each takes `denoiser(x, sigma, **kwargs) -> denoised` (see denoiser.py) and returns another, so
they compose with each other, with classifier-free guidance and with every sampler.

Gradient guidance in the sigma (VE) parameterisation. With x = x0 + sigma * n, Tweedie's formula
gives the denoiser from the score of the noised density p_sigma:

    D(x, sigma) = E[x0 | x] = x + sigma^2 grad_x log p_sigma(x).

Conditioning on y adds grad_x log p(y | x, sigma) to the score (Bayes: p(x | y) ∝ p(x) p(y | x)),
so the conditional denoiser is

    D(x, sigma | y) = D(x, sigma) + sigma^2 grad_x log p(y | x, sigma),

and guidance with strength `scale` (sampling from ∝ p(x) p(y | x)^scale) adds
scale * sigma^2 * grad_x log p(y | x, sigma). This is Dhariwal & Nichol's eps-space rule
eps - sqrt(1 - abar) grad_{x_t} log p(y | x_t) rewritten: x_t = x / sqrt(1 + sigma^2) and
sqrt(1 - abar) = sigma / sqrt(1 + sigma^2), so sqrt(1 - abar) grad_{x_t} = sigma grad_x, and
D = x - sigma * eps turns -sigma * (-sigma grad_x) into +sigma^2 grad_x.

The samplers run under `torch.no_grad()`; the wrappers turn gradients back on for their own
computation only and return detached tensors.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import InvalidArgument
from .denoiser import DenoiserFn, per_sample_sigma

Guidance = Callable[[DenoiserFn], DenoiserFn]  # wraps a denoiser in another (pipelines' `guidance=`)
Classifier = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x VE view, sigma (B,)) -> logits (B, K)
Decode = Callable[[torch.Tensor], torch.Tensor]  # denoised x -> images (B, 3, H, W) in [-1, 1]
EmbedImage = Callable[[torch.Tensor], torch.Tensor]  # images in [-1, 1] -> CLIP image embeddings (B, P)


def _sigma_squared(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma^2 shaped (B, 1, ..., 1) to broadcast over x, in x's dtype."""
    s = per_sample_sigma(sigma, x).to(x.device)
    return (s**2).reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)  # (B, 1, ..., 1)


def classifier_guidance(denoiser: DenoiserFn, classifier: Classifier, labels: torch.Tensor,
                        scale: float = 1.0) -> DenoiserFn:
    """Classifier guidance (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image
    Synthesis", section 4, Algorithm 2), in the sigma parameterisation:

        D_guided(x, sigma) = D(x, sigma) + scale * sigma^2 * grad_x log p(labels | x, sigma)

    (derivation in the module docstring). `classifier(x, sigma)` returns logits (B, K) for the
    noised sample x = x0 + sigma * n (VE view, sigma of shape (B,)); see NoisyClassifier. With
    scale 1 and a classifier that is the exact posterior, this is the exact conditional denoiser.
    """
    labels = torch.as_tensor(labels).reshape(-1)

    def guided(x: torch.Tensor, sigma, **kwargs) -> torch.Tensor:
        denoised = denoiser(x, sigma, **kwargs)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logits = classifier(x_in, per_sample_sigma(sigma, x).to(x.device))  # (B, K)
            log_probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(dim=-1)
            chosen = log_probs.gather(1, labels.to(x.device).expand(x.shape[0])[:, None])  # (B, 1)
            (grad,) = torch.autograd.grad(chosen.sum(), x_in)
        return denoised + scale * _sigma_squared(sigma, x) * grad.to(x.dtype)

    return guided


def clip_similarity(embed_image: EmbedImage, images: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Cosine similarity (B,) between the image embeddings of images (B, 3, H, W) in [-1, 1] and
    text embeddings (B or 1, P); differentiable w.r.t. the images."""
    image_embeds = F.normalize(embed_image(images).float(), dim=-1)  # (B, P)
    return (image_embeds * F.normalize(text_embeds.float(), dim=-1)).sum(dim=-1)


def clip_guidance(denoiser: DenoiserFn, embed_image: EmbedImage, text_embeds: torch.Tensor, decode: Decode,
                  scale: float) -> DenoiserFn:
    """CLIP guidance on the denoised image (Crowson's CLIP-guided diffusion; diffusers'
    community CLIPGuidedStableDiffusion; GLIDE, Nichol et al. 2022, section 2.3, uses a
    noise-aware CLIP on x instead). Treating the cosine similarity as a log-likelihood,

        D_guided(x, sigma) = D(x, sigma) + scale * sigma^2 * grad_x cos(E_img(decode(D(x))), E_txt)

    where the gradient flows back through the decoder and the denoiser, so an ordinary CLIP
    trained on clean images works. `embed_image` maps images in [-1, 1] to CLIP image embeddings
    (for ldmkit's CLIPModel: pipelines.stable_diffusion.clip_image_embedder); `decode` maps
    denoised x to images in [-1, 1] (a VAE decode for latent models, identity for pixel models);
    `text_embeds` (P, D) are spread over the batch (B % P == 0, each over B / P adjacent images).
    Cosine similarities move little, so useful scales are large (tens to hundreds).
    """

    def guided(x: torch.Tensor, sigma, **kwargs) -> torch.Tensor:
        if x.shape[0] % text_embeds.shape[0]:
            raise InvalidArgument(f"{text_embeds.shape[0]} text embeddings cannot be spread over "
                                  f"a batch of {x.shape[0]}")
        text = text_embeds.to(x.device).repeat_interleave(x.shape[0] // text_embeds.shape[0], dim=0)  # (B, P)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            denoised = denoiser(x_in, sigma, **kwargs)
            similarity = clip_similarity(embed_image, decode(denoised), text)  # (B,)
            (grad,) = torch.autograd.grad(similarity.sum(), x_in)
        return denoised.detach() + scale * _sigma_squared(sigma, x) * grad.to(x.dtype)

    return guided


def dynamic_thresholding(denoiser: DenoiserFn, percentile: float = 0.995) -> DenoiserFn:
    """Dynamic thresholding (Saharia et al. 2022, "Photorealistic Text-to-Image Diffusion Models
    with Deep Language Understanding" (Imagen), section 2.3): per sample, s is the `percentile`
    quantile of |x0_hat| but at least 1; x0_hat is clamped to [-s, s] and divided by s.

    For pixel-space models whose data lie in [-1, 1]: it keeps x0 estimates in range under strong
    guidance. Estimates already within [-1, 1] are left exactly as they are (s = 1).
    """
    if not 0.0 < percentile <= 1.0:
        raise InvalidArgument(f"percentile must be in (0, 1], got {percentile}")

    def thresholded(x: torch.Tensor, sigma, **kwargs) -> torch.Tensor:
        denoised = denoiser(x, sigma, **kwargs)
        flat = denoised.abs().flatten(1).float()  # (B, N)
        s = torch.quantile(flat, percentile, dim=1).clamp(min=1.0)  # (B,)
        s = s.reshape(-1, *([1] * (denoised.ndim - 1))).to(denoised.dtype)  # (B, 1, ..., 1)
        return torch.maximum(torch.minimum(denoised, s), -s) / s

    return thresholded
