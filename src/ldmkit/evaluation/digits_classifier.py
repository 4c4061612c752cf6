"""A digits classifier for judging class-conditional samples of scikit-learn's digits (16x16).

A small CNN trained on the train split of `DigitsDataset(size=16)` with the defects of generated
samples added (noise, softening, contrast changes; common.augment) and one-pixel shifts. It
gives two numbers for a sampler that maps class labels to images:

    accuracy   how often the classifier reads a sample as the digit it was asked for
    FID        Fréchet distance between its penultimate-layer features of the samples and of the
               real test-split images

The weights ship as ``ldmkit/assets/digits_classifier.safetensors`` (retrained and cached by
`load_digits_classifier` when missing; ``ldmkit eval classifier digits`` retrains them).
scikit-learn is needed only to retrain, and for the real images of the FID.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.digits import DigitsDataset
from ..errors import InvalidArgument
from .common import augment, cache_path, find_asset, read_model, save_weights, seeded
from .fid import fid_from_features

ASSET_NAME = "digits_classifier.safetensors"
NUM_CLASSES = 10

# A sampler maps class labels (B,) to images (B, 1, 16, 16) in [-1, 1] (3 channels also accepted).
DigitsSampler = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DigitsClassifierConfig:
    image_size: int = 16  # input side in pixels; other sizes are resized to it
    channels: tuple[int, ...] = (32, 64)  # conv widths, each stage halving the resolution
    feature_dim: int = 128  # width of the penultimate layer (the FID feature space)


class DigitsClassifier(nn.Module):
    """CNN: (B, 1, 16, 16) in [-1, 1] -> class logits (B, 10)."""

    def __init__(self, config: DigitsClassifierConfig = DigitsClassifierConfig()) -> None:
        super().__init__()
        self.config = config
        layers, c_in = [], 1
        for c in config.channels:  # each stage: (H, W) -> (H/2, W/2)
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.SiLU(), nn.MaxPool2d(2)]
            c_in = c
        self.conv = nn.Sequential(*layers)
        side = config.image_size // 2 ** len(config.channels)
        self.embed = nn.Sequential(nn.Flatten(), nn.Dropout(0.2),
                                   nn.Linear(c_in * side * side, config.feature_dim), nn.SiLU())
        self.head = nn.Linear(config.feature_dim, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (B, feature_dim)."""
        return self.embed(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_input(images: torch.Tensor, size: int = 16) -> torch.Tensor:
    """Images (B, 1 or 3, H, W) in [-1, 1] as (B, 1, size, size): RGB averaged, resized if needed."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InvalidArgument(f"digit images must be a (B, 1 or 3, H, W) tensor in [-1, 1], got {shape}")
    x = images.float().mean(dim=1, keepdim=True)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(-1, 1)


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to `max_shift` pixels in x and y (padding with the black background)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx, dy = (torch.randint(2 * max_shift + 1, (2, b), generator=generator)).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def train_digits_classifier(
    steps: int = 600,  # optimizer steps
    batch_size: int = 64,  # images per step
    lr: float = 3e-3,  # peak learning rate of the one-cycle schedule
    seed: int = 0,  # seeds the batches, the augmentation and the initial weights
    config: DigitsClassifierConfig = DigitsClassifierConfig(),
) -> DigitsClassifier:
    """Train on the train split of the 16x16 digits with augmentation; returns eval mode."""
    data = DigitsDataset(size=config.image_size, split="train")
    images, labels = data.images, torch.from_numpy(data.labels)
    gen = torch.Generator().manual_seed(seed)
    with seeded(seed):
        model = DigitsClassifier(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        x = augment(random_shift(images[idx], gen), gen, max_noise=0.15)
        loss = F.cross_entropy(model(x), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def classify(model: DigitsClassifier, images: torch.Tensor) -> torch.Tensor:
    """Predicted digit (B,) of each image."""
    return model(to_input(images, model.config.image_size)).argmax(dim=1)


@torch.no_grad()
def extract_features(model: DigitsClassifier, images: torch.Tensor) -> torch.Tensor:
    """Penultimate-layer features (B, feature_dim) in float64, for the FID."""
    return model.features(to_input(images, model.config.image_size)).double()


def test_accuracy(model: DigitsClassifier) -> float:
    """Accuracy on the real test-split digits."""
    data = DigitsDataset(size=model.config.image_size, split="test")
    return (classify(model, data.images) == torch.from_numpy(data.labels)).float().mean().item()


def evaluate_digits_sampler(
    sampler: DigitsSampler,
    per_class: int = 50,  # samples per digit
    batch_size: int = 100,  # labels per sampler call
    classifier: DigitsClassifier | None = None,
) -> dict:
    """Class accuracy of a class-conditional sampler and the FID of its samples to real test digits.

    `sampler(labels)` gets labels (B,) and returns images (B, 1 or 3, H, W) in [-1, 1]. Returns
    {"accuracy", "per_class_accuracy": [10], "fid", "samples", "real"}.
    """
    classifier = classifier or load_digits_classifier()
    labels = torch.arange(NUM_CLASSES).repeat(per_class)  # every digit in each stretch of 10
    images = torch.cat([sampler(labels[i:i + batch_size]) for i in range(0, len(labels), batch_size)])
    if len(images) != len(labels):
        raise InvalidArgument(f"the sampler returned {len(images)} images for {len(labels)} labels")
    right = classify(classifier, images) == labels
    real = DigitsDataset(size=classifier.config.image_size, split="test").images
    fid = fid_from_features(extract_features(classifier, images), extract_features(classifier, real))
    return {
        "accuracy": right.float().mean().item(),
        "per_class_accuracy": [right[labels == k].float().mean().item() for k in range(NUM_CLASSES)],
        "fid": fid,
        "samples": len(images),
        "real": len(real),
    }


# -- the asset ----------------------------------------------------------------------------------


def read_digits_classifier(path: str | Path) -> DigitsClassifier:
    return read_model(path, DigitsClassifier, DigitsClassifierConfig)


_LOADED: dict[str, DigitsClassifier] = {}


def load_digits_classifier(path: str | Path | None = None) -> DigitsClassifier:
    """The trained classifier: from `path`, else the packaged asset, else retrained and cached."""
    if path is not None:
        return read_digits_classifier(path)
    found = find_asset(ASSET_NAME) or retrain_asset(cache_path(ASSET_NAME))
    if str(found) not in _LOADED:
        _LOADED[str(found)] = read_digits_classifier(found)
    return _LOADED[str(found)]


def retrain_asset(path: str | Path, seed: int = 0, steps: int = 600, verbose: bool = False) -> Path:
    """Train with `seed`, measure test accuracy and save to `path`."""
    start = time.time()
    model = train_digits_classifier(steps=steps, seed=seed)
    info = {"seed": seed, "steps": steps, "train_seconds": round(time.time() - start, 1),
            "torch_threads": torch.get_num_threads(), "test_accuracy": round(test_accuracy(model), 4)}
    if verbose:
        print(f"trained: {info}")
    return save_weights(model, asdict(model.config), info, path)

