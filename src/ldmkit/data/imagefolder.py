"""A folder of captioned images, in the Hugging Face `imagefolder` convention.

Captions come from one of two places:

- ``metadata.jsonl`` at the folder's root: one JSON object per line with ``file_name`` (a path
  relative to the folder) and ``text`` (the caption). Only the images it names are used.
- otherwise, every image under the folder (searched recursively, in sorted order), each with its
  caption in a ``.txt`` file of the same stem beside it (``cat.png`` + ``cat.txt``). An image with
  no ``.txt`` gets the empty caption, unless ``require_captions=True``.

Each image is converted to RGB (transparent pixels composited onto white), its shorter side
resized to `size` (bicubic), and a size x size square cropped from the center, or from a random
position drawn from a `torch.Generator` when ``random_crop=True``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import InvalidArgument, LdmkitError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILE = "metadata.jsonl"


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB or L PIL image as a float32 (C, H, W) tensor in [-1, 1].

    The arithmetic is done in numpy: torch's elementwise ops on one small image can cost
    milliseconds in thread-pool overhead on a busy machine.
    """
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        array = array[:, :, None]  # (H, W) -> (H, W, 1)
    array = array.transpose(2, 0, 1) / np.float32(127.5) - np.float32(1.0)  # (C, H, W)
    return torch.from_numpy(np.ascontiguousarray(array))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert to RGB, compositing any transparency onto a white background."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_and_crop(
    image: Image.Image,
    size: int,
    random_crop: bool = False,
    generator: torch.Generator | None = None,
) -> Image.Image:
    """Resize the shorter side to `size` (bicubic) and crop a size x size square.

    The crop is centered, or at a position drawn from `generator` when `random_crop` is set.
    """
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if random_crop:
        left = int(torch.randint(new_w - size + 1, (1,), generator=generator))
        top = int(torch.randint(new_h - size + 1, (1,), generator=generator))
    else:
        left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_image(path: Path) -> Image.Image:
    """Open an image file fully, raising LdmkitError naming the file if it cannot be read."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise LdmkitError(f"{path}: cannot read image ({error})") from None


@dataclass(frozen=True)
class ImageRecord:
    """One image of the folder and its caption."""

    path: Path  # the image file
    caption: str  # its caption ("" when it has none)


def _read_metadata(root: Path) -> list[ImageRecord]:
    """Records from metadata.jsonl, checking every line names an existing image and a caption."""
    metadata = root / METADATA_FILE
    records = []
    with open(metadata, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{metadata}:{number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise LdmkitError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(entry, dict) or "file_name" not in entry:
                raise LdmkitError(f"{where}: each line needs a \"file_name\" field")
            text = entry.get("text", "")
            if not isinstance(text, str):
                raise LdmkitError(f"{where}: \"text\" must be a string")
            path = root / entry["file_name"]
            if not path.is_file():
                raise LdmkitError(f"{where}: names {entry['file_name']!r}, which is not in {root}")
            records.append(ImageRecord(path, text))
    return records


def _scan_folder(root: Path, require_captions: bool) -> list[ImageRecord]:
    """Records for every image under root, each captioned by the .txt file beside it."""
    records = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        text_file = path.with_suffix(".txt")
        if text_file.is_file():
            text = text_file.read_text(encoding="utf-8").strip()
        elif require_captions:
            raise LdmkitError(f"{path}: no caption file {text_file.name} beside it")
        else:
            text = ""
        records.append(ImageRecord(path, text))
    return records


class ImageFolderDataset(torch.utils.data.Dataset):
    """Captioned images from a folder; items are dict(image=(3, size, size), caption, label=None)."""

    def __init__(
        self,
        root: str | Path,  # the folder
        size: int = 64,  # side of the square images returned
        random_crop: bool = False,  # crop at a random position instead of the center
        generator: torch.Generator | None = None,  # source of crop positions for random_crop
        require_captions: bool = False,  # without metadata.jsonl: error on an image with no .txt
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise LdmkitError(f"{self.root}: image folder not found")
        if size < 1:
            raise InvalidArgument(f"image size must be positive, got {size}")
        if (self.root / METADATA_FILE).is_file():
            self.records = _read_metadata(self.root)
        else:
            self.records = _scan_folder(self.root, require_captions)
        if not self.records:
            kinds = ", ".join(IMAGE_EXTENSIONS)
            raise LdmkitError(f"{self.root}: no images found (looked for {kinds})")
        self.size, self.random_crop, self.generator = size, random_crop, generator

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        image = to_rgb(load_image(record.path))
        image = resize_and_crop(image, self.size, self.random_crop, self.generator)
        return dict(image=pil_to_tensor(image), caption=record.caption, label=None)
