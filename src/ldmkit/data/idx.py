"""MNIST and Fashion-MNIST from local IDX files (plain or gzip-compressed).

The IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/): a 4-byte magic number
(two zero bytes, a type code, 0x08 for unsigned bytes, and the number of dimensions), then each
dimension as a big-endian int32, then the data. Images are idx3 (N, 28, 28), labels idx1 (N,).
Headers are checked strictly: the magic, the dimension count, and that the data length is
exactly the product of the dimensions, so a truncated or mislabeled file fails loudly.

A folder holds the four standard files, looked up as NAME or NAME.gz, in the folder or its
``raw/`` subfolder (torchvision's layout):

    train-images-idx3-ubyte  train-labels-idx1-ubyte  t10k-images-idx3-ubyte  t10k-labels-idx1-ubyte

Images are white-on-black (MNIST) / light-on-black (Fashion-MNIST) grayscale, scaled to [-1, 1],
and brought to `size` by zero-padding ("pad": 28 -> 32 adds 2 black pixels per side) or by
bilinear resizing ("resize").
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidArgument, LdmkitError, check_choice
from .shapes import article

KINDS = ("mnist", "fashion-mnist")
SPLITS = ("train", "test")
FIT_MODES = ("pad", "resize")
FILE_PREFIX = {"train": "train", "test": "t10k"}
UBYTE = 0x08  # the IDX type code of unsigned bytes, the only type MNIST files use
FASHION_CLASSES = (  # Fashion-MNIST's ten classes, as caption nouns
    "t-shirt", "pair of trousers", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)


def idx_caption(kind: str, label: int) -> str:
    """"a handwritten digit 3" for MNIST, "a photo of a sneaker" for Fashion-MNIST."""
    if kind == "mnist":
        return f"a handwritten digit {label}"
    noun = FASHION_CLASSES[label]
    return f"a photo of {article(noun)} {noun}"


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as error:
        raise LdmkitError(f"{path}: cannot read IDX file ({error})") from None


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file with `ndim` dimensions, validating its header strictly."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise LdmkitError(f"{path}: too short to be an IDX file ({len(data)} bytes)")
    zero0, zero1, type_code, dims = data[:4]
    if zero0 or zero1:
        raise LdmkitError(f"{path}: bad IDX magic {data[:4].hex()} (must start with two zero bytes)")
    if type_code != UBYTE:
        raise LdmkitError(f"{path}: IDX type 0x{type_code:02x} unsupported (expected 0x08, unsigned bytes)")
    if dims != ndim:
        raise LdmkitError(f"{path}: IDX file has {dims} dimensions, expected {ndim}")
    header = 4 + 4 * dims
    if len(data) < header:
        raise LdmkitError(f"{path}: IDX header truncated")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=dims, offset=4))
    expected = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != expected:
        raise LdmkitError(
            f"{path}: IDX data has {len(data) - header} bytes, but dimensions {shape} need {expected}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def find_idx_file(root: Path, name: str) -> Path:
    """NAME or NAME.gz in root or root/raw, else LdmkitError listing where it looked."""
    for folder in (root, root / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise LdmkitError(f"{root}: no {name} or {name}.gz (also looked in {root / 'raw'})")


def load_idx_split(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, H, W) uint8, labels (N,) uint8) of the split, with counts and labels checked."""
    root = Path(root)
    if not root.is_dir():
        raise LdmkitError(f"{root}: IDX folder not found")
    prefix = FILE_PREFIX[split]
    images_path = find_idx_file(root, f"{prefix}-images-idx3-ubyte")
    labels_path = find_idx_file(root, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise LdmkitError(f"{root}: {len(images)} images but {len(labels)} labels in the {split} split")
    if len(labels) and labels.max() > 9:
        raise LdmkitError(f"{labels_path}: label {int(labels.max())} outside 0..9")
    return images, labels


def fit_images(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Bring (N, C, H, W) images in [-1, 1] to size x size by black padding or bilinear resize."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if mode == "resize":
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if size < max(h, w):
        raise InvalidArgument(f"cannot pad {h}x{w} images to {size}; use fit='resize'")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(x, (left, size - w - left, top, size - h - top), value=-1.0)


class IdxDataset(torch.utils.data.Dataset):
    """MNIST-style data; items are dict(image=(channels, size, size) in [-1, 1], caption, label)."""

    def __init__(
        self,
        root: str | Path,  # folder holding the IDX files
        kind: str = "mnist",  # "mnist" or "fashion-mnist": decides the captions
        split: str = "train",  # "train" or "test" (the t10k files)
        size: int = 32,  # output side; 28 keeps the originals
        fit: str = "pad",  # "pad" (centered, black) or "resize" (bilinear) to reach `size`
        channels: int = 1,  # 1 (grayscale) or 3 (the gray value repeated, for RGB models)
    ) -> None:
        check_choice("IDX data set kind", kind, KINDS)
        check_choice("IDX split", split, SPLITS)
        check_choice("fit mode", fit, FIT_MODES)
        if channels not in (1, 3):
            raise InvalidArgument(f"channels must be 1 or 3, got {channels}")
        if size < 1:
            raise InvalidArgument(f"image size must be positive, got {size}")
        images, labels = load_idx_split(root, split)
        self.images = torch.from_numpy(images.copy())  # (N, H, W) uint8, converted per item
        self.labels = labels.astype(np.int64)
        self.kind, self.size, self.fit, self.channels = kind, size, fit, channels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        x = self.images[i].float().div(127.5).sub(1.0)[None, None]  # (H, W) -> (1, 1, H, W)
        x = fit_images(x, self.size, self.fit)[0].clamp(-1.0, 1.0)  # (1, size, size)
        label = int(self.labels[i])
        image = x.expand(self.channels, -1, -1).contiguous()  # (channels, size, size)
        return dict(image=image, caption=idx_caption(self.kind, label), label=label)
