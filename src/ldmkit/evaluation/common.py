"""Pieces the evaluation classifiers share: image augmentation, weight assets, seeding.

The classifiers judge generated images, which are never quite like the rendered training data:
they carry faint noise, soft edges and slightly shifted colors. `augment` adds exactly those
defects during training, so that a classifier reads an imperfect sample by its content rather
than by its texture.

Trained weights are small and live in the package (``ldmkit/assets/*.safetensors``) with the
model's config, the training seed and the measured accuracy as JSON in the safetensors header,
so evaluation never retrains; when an asset is missing it is retrained (seeded, reproducible)
and cached under ``~/.cache/ldmkit`` if the package folder cannot be written.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cache import user_cache_dir
from ..errors import LdmkitError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CONFIG_KEY = "config"  # safetensors metadata key holding the model config as JSON
INFO_KEY = "training"  # safetensors metadata key holding the training record as JSON


# -- augmentation ------------------------------------------------------------------------------


def gaussian_blur(x: torch.Tensor, sigma: float, radius: int = 2) -> torch.Tensor:
    """Blur images (B, C, H, W) with a Gaussian of std `sigma` pixels; borders are replicated,
    so a white canvas stays white."""
    b, c, h, w = x.shape
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)  # (K,)
    k1 = torch.exp(-0.5 * (offsets / max(sigma, 1e-3)) ** 2)
    k1 = k1 / k1.sum()
    kernel = (k1[:, None] * k1[None, :])[None, None]  # (1, 1, K, K)
    # every channel as its own one-channel image: a plain convolution, much faster than grouped
    padded = F.pad(x.reshape(b * c, 1, h, w), (radius,) * 4, mode="replicate")
    return F.conv2d(padded, kernel).reshape(b, c, h, w)


def augment(
    x: torch.Tensor,
    generator: torch.Generator,
    probability: float = 0.8,  # share of the images that get any defect at all
    blur: float = 1.0,  # std in pixels of the strongest blur
    max_gain: float = 0.06,  # per-channel contrast change, as a fraction
    max_shift: float = 0.08,  # per-channel offset, in [-1, 1] units
    max_noise: float = 0.08,  # largest std of added Gaussian noise, in [-1, 1] units
) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1] with the defects of generated samples, drawn from `generator`.

    The changes are small on purpose: the palette's nearest colors (red, orange, yellow) must stay
    apart, and a blurred small object must stay smaller than a large one.
    """
    b, c = x.shape[:2]
    on = (torch.rand(b, generator=generator) < probability).to(x.dtype)[:, None, None, None]  # (B, 1, 1, 1)
    u = lambda *shape: torch.rand(*shape, generator=generator, dtype=x.dtype)  # noqa: E731
    # a random mix of the image and its blur: a softening of random strength, one convolution
    x = torch.lerp(x, gaussian_blur(x, blur), u(b, 1, 1, 1) * on)
    gain = 1 + (2 * u(b, c, 1, 1) - 1) * max_gain * on
    shift = (2 * u(b, c, 1, 1) - 1) * max_shift * on
    noise_std = u(b, 1, 1, 1) * max_noise * on
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return (x * gain + shift + noise * noise_std).clamp(-1, 1)


# -- seeding -----------------------------------------------------------------------------------


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with torch's global RNG seeded (for module initialisation), restoring it after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# -- weight assets -----------------------------------------------------------------------------


def save_weights(model: torch.nn.Module, config: dict, info: dict, path: str | Path) -> Path:
    """Write the model's weights (float32) with its config and training record as JSON metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={CONFIG_KEY: json.dumps(config), INFO_KEY: json.dumps(info)})
    path.chmod(0o644)  # safetensors writes owner-only files; a packaged asset must be readable by all
    return path


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(state dict, config, training record) of an asset written by `save_weights`."""
    from ..checkpoints.io import read_safetensors, read_safetensors_metadata

    metadata = read_safetensors_metadata(path)
    if CONFIG_KEY not in metadata:
        raise LdmkitError(f"{path}: not an ldmkit evaluation classifier (no {CONFIG_KEY!r} metadata)")
    return read_safetensors(path), json.loads(metadata[CONFIG_KEY]), json.loads(metadata.get(INFO_KEY, "{}"))


def read_model(path: str | Path, model_cls: type, config_cls: type) -> torch.nn.Module:
    """A classifier written by `save_weights`: its config dataclass rebuilt, weights loaded, eval mode."""
    state, config, _ = read_weights(path)
    config["channels"] = tuple(config["channels"])
    model = model_cls(config_cls(**config))
    model.load_state_dict(state)
    return model.eval()


def cache_path(name: str) -> Path:
    """Where a retrained asset goes: the package's assets folder if writable, else the user cache."""
    if os.access(ASSETS, os.W_OK):
        return ASSETS / name
    return user_cache_dir() / name


def find_asset(name: str) -> Path | None:
    """The packaged asset, else a cached retrained copy, else None."""
    for path in (ASSETS / name, cache_path(name)):
        if path.is_file():
            return path
    return None
