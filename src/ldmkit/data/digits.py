"""scikit-learn's bundled 8x8 handwritten digits, a tiny offline data set for smoke training.

The 1,797 images (values 0..16, white strokes on black) are scaled to [-1, 1] and upsampled to
size x size with bilinear interpolation (torch `interpolate`, align_corners=False, no
antialiasing). The split is deterministic: a permutation from numpy's Generator seeded with
SPLIT_SEED puts the first TEST_FRACTION of the images in "test" and the rest in "train".

scikit-learn is a development dependency, imported only when the data is loaded.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidArgument, LdmkitError, check_choice

SPLITS = ("train", "test", "all")
SPLIT_SEED = 0  # seeds the permutation that splits train from test
TEST_FRACTION = 0.2  # share of the images in the test split
MAX_VALUE = 16.0  # the largest pixel value in scikit-learn's digits


def digit_caption(label: int) -> str:
    """The caption of a digit image, e.g. "a handwritten digit 7"."""
    return f"a handwritten digit {label}"


@lru_cache(maxsize=1)
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 8, 8) float in 0..16, labels (N,) int) from scikit-learn's bundled copy."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise LdmkitError(
            "the digits data set needs scikit-learn: pip install scikit-learn"
        ) from None
    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def split_indices(count: int, split: str) -> np.ndarray:
    """Indices of `split` among `count` images, from a fixed-seed permutation."""
    order = np.random.default_rng(SPLIT_SEED).permutation(count)
    n_test = round(count * TEST_FRACTION)
    if split == "test":
        return np.sort(order[:n_test])
    if split == "train":
        return np.sort(order[n_test:])
    return np.arange(count)


class DigitsDataset(torch.utils.data.Dataset):
    """Items are dict(image=(channels, size, size) in [-1, 1], caption, label=int)."""

    def __init__(
        self,
        size: int = 32,  # side after bilinear upsampling from 8x8
        split: str = "train",  # "train", "test" or "all"
        channels: int = 1,  # 1 (grayscale) or 3 (the gray value repeated, for RGB models)
    ) -> None:
        check_choice("digits split", split, SPLITS)
        if size < 1:
            raise InvalidArgument(f"digits size must be positive, got {size}")
        if channels not in (1, 3):
            raise InvalidArgument(f"digits channels must be 1 or 3, got {channels}")
        images, labels = load_digits_arrays()
        keep = split_indices(len(images), split)
        x = torch.from_numpy(images[keep]).unsqueeze(1)  # (N, 8, 8) -> (N, 1, 8, 8)
        x = x / MAX_VALUE * 2.0 - 1.0
        if size != x.shape[-1]:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        self.images = x.clamp_(-1.0, 1.0).expand(-1, channels, -1, -1).contiguous()
        self.labels = labels[keep]
        self.size, self.split, self.channels = size, split, channels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        label = int(self.labels[i])
        return dict(image=self.images[i], caption=digit_caption(label), label=label)
