"""Data sets for training and evaluation, all following one item protocol.

Every data set has ``__len__`` and ``__getitem__(i) -> dict`` with

    image:    float32 tensor (C, H, W) in [-1, 1]  (C = 3, or 1 for grayscale sets by default)
    caption:  str
    label:    int, or None when the data set has no class labels

`get_dataset` turns a short spec string into a data set:

    "shapes"               the built-in procedurally drawn shapes (shared/specs/shapes.md)
    "digits"               scikit-learn's 8x8 digits, upsampled
    "mnist:PATH"           MNIST IDX files in the folder PATH
    "fashion-mnist:PATH"   Fashion-MNIST IDX files in the folder PATH
    PATH                   a Hugging Face-style image folder (metadata.jsonl or .txt captions)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

from ..errors import InvalidArgument
from .digits import DigitsDataset
from .idx import IdxDataset
from .imagefolder import ImageFolderDataset, pil_to_tensor
from .shapes import ShapesDataset, caption, heldout_prompts, parse_caption, render, sample_scene

__all__ = [
    "DigitsDataset", "IdxDataset", "ImageFolderDataset", "ShapesDataset", "caption",
    "get_dataset", "heldout_prompts", "make_grid", "parse_caption", "pil_to_tensor", "render",
    "sample_scene", "to_image",
]

SPEC_HELP = "use shapes, digits, mnist:PATH, fashion-mnist:PATH, or an image folder path"


def get_dataset(spec: str, size: int | None = None, **kwargs) -> torch.utils.data.Dataset:
    """The data set a spec string names (see the module docstring); `size` None keeps its default.

    Extra keyword arguments go to the data set's constructor (e.g. split, seed, length).
    """
    if size is not None:
        kwargs["size"] = size
    name, sep, path = spec.partition(":")
    if name == "shapes" and not sep:
        return ShapesDataset(**kwargs)
    if name == "digits" and not sep:
        return DigitsDataset(**kwargs)
    if name in ("mnist", "fashion-mnist"):
        if not path:
            raise InvalidArgument(f"data set {spec!r} needs a folder: {name}:PATH")
        return IdxDataset(path, kind=name, **kwargs)
    if Path(spec).exists() or "/" in spec or "\\" in spec:
        return ImageFolderDataset(spec, **kwargs)
    raise InvalidArgument(f"unknown data set {spec!r}: {SPEC_HELP}")


def to_image(tensor: torch.Tensor) -> Image.Image:
    """A (C, H, W) tensor in [-1, 1] (C = 1 or 3) as a uint8 PIL image, rounding to nearest."""
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
        raise InvalidArgument(f"to_image needs a (1 or 3, H, W) tensor, got shape {tuple(tensor.shape)}")
    x = ((tensor.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = x.permute(1, 2, 0).numpy()  # (C, H, W) -> (H, W, C)
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def make_grid(
    images,
    nrow: int = 8,
    padding: int = 2,
    background: tuple[int, int, int] = (128, 128, 128),
) -> Image.Image:
    """Tile tensors (each (C, H, W) in [-1, 1], or a (B, C, H, W) batch) or PIL images, row-major.

    `nrow` images per row, `padding` pixels of `background` between and around them (mid gray
    by default, visible against both white shapes canvases and black digits); grayscale and RGB
    inputs may be mixed (all are shown as RGB).
    """
    pils = [im if isinstance(im, Image.Image) else to_image(im) for im in images]
    if not pils:
        raise InvalidArgument("make_grid needs at least one image")
    if nrow < 1:
        raise InvalidArgument(f"make_grid nrow must be positive, got {nrow}")
    w = max(im.width for im in pils)
    h = max(im.height for im in pils)
    cols = min(nrow, len(pils))
    rows = math.ceil(len(pils) / cols)
    size = (cols * w + (cols + 1) * padding, rows * h + (rows + 1) * padding)
    grid = Image.new("RGB", size, tuple(background))
    for k, im in enumerate(pils):
        r, c = divmod(k, cols)
        grid.paste(im.convert("RGB"), (padding + c * (w + padding), padding + r * (h + padding)))
    return grid

