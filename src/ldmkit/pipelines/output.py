"""Writing images people will look at: PNG files with their generation parameters embedded.

Files are written atomically (a temporary file in the same folder, then a rename), so an
interrupted run leaves either the complete PNG or none.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image, PngImagePlugin

from ..checkpoints.io import temp_file_beside

PARAMETERS_KEY = "parameters"  # the PNG text chunk the generation parameters go in (as the web UIs)


def save_png(image: Image.Image, path: str | os.PathLike, parameters: dict | None = None) -> Path:
    """Save `image` as PNG at `path` with `parameters` as JSON in a text chunk, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text(PARAMETERS_KEY, json.dumps(parameters, sort_keys=True))
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_parameters(path: str | os.PathLike) -> dict:
    """The generation parameters embedded by `save_png` (empty if there are none)."""
    with Image.open(path) as image:
        text = image.info.get(PARAMETERS_KEY)
    return json.loads(text) if text else {}
