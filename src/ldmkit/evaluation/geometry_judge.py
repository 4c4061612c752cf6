"""A second shapes judge with nothing learned in it, to cross-check the attribute classifier.

Every pixel takes its nearest palette colour or white; the 4-connected regions of non-white
pixels above a minimum area are objects (the data set never lets two objects touch), each of the
colour most of its pixels have (a shaded sample may stray into a neighbouring palette colour).
A region's shape comes from how it fills its bounding box (a square fills it all, a circle pi/4
of it, an apex-up triangle half, and its top half is much narrower than its bottom half), its
size from the box's longer side (small 22%, large 40% of the canvas), its centre from the
region's mean pixel position. The verdicts then follow the same rules as the classifier's
(`alignment.judge_detections`), so where the two judges disagree it is about what is in the
image, not about what the prompt asks.

It is exact on clean renderings. It assumes flat colours on white, so two generated objects that
touch read as one, and a blotch over the minimum area as an object: a disagreement is a reason to
look at the image.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.shapes import BACKGROUND, COLORS, SIZES, parse_caption
from .alignment import judge_detections, summarize
from .shapes_classifier import DetectedObject, to_input

MIN_AREA_FRACTION = 0.004  # smallest region counted as an object: ~16 pixels at 64x64 (a small triangle is ~100)
SQUARE_FILL = 0.9  # bounding-box fill above which a region is a square (square 1.0, circle 0.785)
TRIANGLE_FILL = 0.64  # below which it is a triangle (triangle 0.5)
SIZE_THRESHOLD = (SIZES["small"] + SIZES["large"]) / 2  # longer box side, canvas fractions


def nearest_palette_index(image: np.ndarray) -> np.ndarray:
    """(H, W) index of each pixel's nearest colour: 0..5 the palette (COLORS order), 6 white."""
    refs = np.array([*COLORS.values(), BACKGROUND], dtype=np.float32)  # (7, 3)
    d2 = ((image[:, :, None, :].astype(np.float32) - refs) ** 2).sum(-1)  # (H, W, 7)
    return d2.argmin(-1)


def regions(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected regions of a boolean mask, each as an (N, 2) array of (row, col)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    found = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        stack, pixels = [start], []
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        found.append(np.array(pixels))
    return found


def classify_region(pixels: np.ndarray, canvas: int) -> tuple[str, str, tuple[float, float]]:
    """(shape, size, centre) of one region on a canvas x canvas image."""
    rows, cols = pixels[:, 0], pixels[:, 1]
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    height, width = bottom - top + 1, right - left + 1
    fill = len(pixels) / (height * width)
    middle = (top + bottom) / 2
    top_width = np.ptp(cols[rows <= middle]) + 1  # the widest row span is a proxy for the half's width
    bottom_width = np.ptp(cols[rows >= middle]) + 1
    if fill >= SQUARE_FILL:
        shape = "square"
    elif fill < TRIANGLE_FILL and top_width < 0.8 * bottom_width:
        shape = "triangle"
    else:
        shape = "circle"
    size = "large" if max(height, width) / canvas > SIZE_THRESHOLD else "small"
    centre = ((cols.mean() + 0.5) / canvas, (rows.mean() + 0.5) / canvas)
    return shape, size, centre


def detect_geometric(image: np.ndarray) -> list[DetectedObject]:
    """The objects in one (H, W, 3) uint8 image, read by the rules of the module docstring."""
    canvas = image.shape[0]
    index = nearest_palette_index(image)
    min_area = MIN_AREA_FRACTION * canvas * canvas
    colors = list(COLORS)
    found = []
    for pixels in regions(index != len(colors)):  # objects never touch, so a region is one object
        if len(pixels) >= min_area:
            votes = np.bincount(index[pixels[:, 0], pixels[:, 1]], minlength=len(colors))
            shape, size, centre = classify_region(pixels, canvas)
            found.append(DetectedObject(colors[int(votes.argmax())], shape, size, centre, 1))
    return found


def detect_many(images, size: int = 64) -> list[list[DetectedObject]]:
    """`detect_geometric` for images in any form the classifier takes (PIL, list, tensors in
    [-1, 1]), at the classifier's canvas size."""
    x = to_input(images, size)
    pixels = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [detect_geometric(p) for p in pixels]


def cross_check(prompts: list[str], images, classifier_verdicts: list[dict], margin: float) -> dict:
    """This judge's verdicts on the same images, summarised, and how often its "correct" agrees
    with the classifier's: {"alignment": summarize(...), "agreement": {"one_object",
    "two_object", "all"}}."""
    verdicts = [judge_detections(p, found, margin) | {"prompt": p} for p, found in zip(prompts, detect_many(images))]
    same = [(parse_caption(p).relation is not None, ours["correct"] == theirs["correct"])
            for p, ours, theirs in zip(prompts, verdicts, classifier_verdicts)]
    groups = {"one_object": [s for two, s in same if not two], "two_object": [s for two, s in same if two],
              "all": [s for _, s in same]}
    return {"alignment": summarize(verdicts),
            "agreement": {name: sum(v) / len(v) if v else None for name, v in groups.items()}}
