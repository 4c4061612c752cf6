"""Scenes for evaluation: what the shapes classifier trains on, and real scenes for a prompt.

The data set (ldmkit.data.shapes) only draws one- and two-object scenes, but a generator can
draw none, three, or the same object twice. The classifier must count those correctly to reject
them, so its training mixes the data set's scenes (both splits, so every prompt's objects are
seen) with free scenes of 0 to 3 objects that may repeat a (color, shape), and extra pairs of
one color (the case the classifier found hardest: a small object beside a large one).

Generated objects are not always one flat colour: an orange square with a yellow rim, a green
shape with red patches. `two_tone` paints such objects, the minority of an object's pixels in
another palette colour, so that the classifier learns to read an object as the colour most of it
has (as a person, and the rule-based judge, would).
"""

from __future__ import annotations

import numpy as np

from ..data.shapes import (
    BORDER, COLORS, GAP, MIN_MARGIN, SHAPES, SIZES, Scene, ShapeObject, boxes_apart, parse_caption, pixel_bbox,
    relation_holds, sample_scene,
)

FREE_GAP = 0.02  # free space kept between objects of a free scene
FREE_COUNTS = (0, 1, 2, 3)  # object counts of free scenes ...
FREE_COUNT_WEIGHTS = (0.15, 0.25, 0.35, 0.25)  # ... and how often each is drawn
# classifier training scenes: the data set's splits, free scenes, and extra pairs sharing a color
# (a small object beside a large one of its color is the hardest case to count)
TRAINING_MIX = {"train": 0.30, "heldout": 0.30, "free": 0.25, "same_color": 0.15}
TWO_TONE_FRACTION = 0.25  # training scenes with one object painted in two colours (two_tone)


def place(rng: np.random.Generator, shape: str, color: str, size: str) -> ShapeObject:
    """An object at a uniformly random position at least BORDER inside the canvas."""
    x0, y0, x1, y1 = ShapeObject(shape, color, size, (0.0, 0.0)).bbox
    x = rng.uniform(BORDER - x0, 1 - BORDER - x1)
    y = rng.uniform(BORDER - y0, 1 - BORDER - y1)
    return ShapeObject(shape, color, size, (float(x), float(y)))


def random_object(rng: np.random.Generator) -> ShapeObject:
    """An object of uniformly random shape, color and size, placed at random."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    return place(rng, shape, color, size)


def free_scene(rng: np.random.Generator) -> Scene:
    """0 to 3 random non-overlapping objects; repeats of a (color, shape) are allowed."""
    count = int(rng.choice(FREE_COUNTS, p=FREE_COUNT_WEIGHTS))
    objects: list[ShapeObject] = []
    for _ in range(100 * count):
        if len(objects) == count:
            break
        candidate = random_object(rng)
        if all(boxes_apart(candidate, o, FREE_GAP) for o in objects):
            objects.append(candidate)
    return Scene(tuple(objects))


def same_color_scene(rng: np.random.Generator) -> Scene:
    """Two objects of one color and different shapes, random sizes, anywhere apart."""
    color = list(COLORS)[rng.integers(len(COLORS))]
    shapes = rng.choice(len(SHAPES), size=2, replace=False)
    while True:
        a, b = (place(rng, SHAPES[k], color, list(SIZES)[rng.integers(len(SIZES))]) for k in shapes)
        if boxes_apart(a, b, FREE_GAP):
            return Scene((a, b))


def training_scene(rng: np.random.Generator) -> Scene:
    """One scene of the classifier's training mix (TRAINING_MIX)."""
    kinds = list(TRAINING_MIX)
    kind = kinds[rng.choice(len(kinds), p=list(TRAINING_MIX.values()))]
    if kind == "free":
        return free_scene(rng)
    if kind == "same_color":
        return same_color_scene(rng)
    return sample_scene(rng, one_object_fraction=0.5, split=kind)


def two_tone(image: np.ndarray, obj: ShapeObject, rng: np.random.Generator) -> None:
    """Paint a minority of `obj`'s pixels in `image` ((H, W, 3) uint8, as rendered) another palette
    colour, in place, with an edge from sharp to soft, in one of three patterns seen in generated
    samples: one side of the object, its rim (following its outline, so the majority keeps the
    object's shape) or a small patch. The shares stay small enough that the object's colour is
    still plainly the one most of it has."""
    size = image.shape[0]
    x0, y0, x1, y1 = pixel_bbox(obj, size)
    box = image[y0:y1 + 1, x0:x1 + 1]  # a view: objects never share a bounding box
    mask = (box == COLORS[obj.color]).all(-1)  # (h, w): the object's pixels
    ys, xs = np.nonzero(mask)
    cx, cy, hw, hh = xs.mean(), ys.mean(), max(np.ptp(xs), 1) / 2, max(np.ptp(ys), 1) / 2
    pattern = rng.integers(3)
    if pattern == 0:  # one side: a ramp along a random direction
        angle = rng.uniform(0, 2 * np.pi)
        score, max_share = (xs - cx) / hw * np.cos(angle) + (ys - cy) / hh * np.sin(angle), 0.4
    elif pattern == 1:  # the rim: pixels nearest the outline
        score, max_share = -_depth(mask)[ys, xs], 0.35
    else:  # a patch around a random pixel of the object
        k = rng.integers(len(xs))
        score, max_share = -np.hypot((xs - xs[k]) / hw, (ys - ys[k]) / hh), 0.2
    score = score + rng.normal(0, 1e-3, len(score))  # break ties, so the quantile splits even a flat score
    threshold = np.quantile(score, 1 - rng.uniform(0.05, max_share))  # the second colour above it
    softness = rng.uniform(0.01, 0.3) * (score.std() + 1e-6)
    weight = 1 / (1 + np.exp(-(score - threshold) / softness))  # (N,): how much of the second colour
    others = [c for c in COLORS if c != obj.color]
    first, second = (np.array(COLORS[c], dtype=np.float64) for c in (obj.color, others[rng.integers(len(others))]))
    box[ys, xs] = np.round(first + weight[:, None] * (second - first)).astype(np.uint8)


def _depth(mask: np.ndarray) -> np.ndarray:
    """How many 4-neighbour erosions each pixel of a boolean mask survives, plus one (0 outside)."""
    depth, inside = np.zeros(mask.shape), mask.copy()
    while inside.any():
        depth += inside
        padded = np.pad(inside, 1)
        inside = inside & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return depth


def _pair_layout_ok(a: ShapeObject, b: ShapeObject, relation: str) -> bool:
    """As the data set lays pairs out: margin along the stated axis, that axis dominant, boxes apart."""
    if not relation_holds(a, b, relation, MIN_MARGIN) or not boxes_apart(a, b, GAP):
        return False
    dx, dy = abs(a.center[0] - b.center[0]), abs(a.center[1] - b.center[1])
    return dy < dx if relation in ("to the left of", "to the right of") else dx < dy


def scene_for_prompt(prompt: str, rng: np.random.Generator) -> Scene:
    """A random scene that the shapes caption `prompt` describes (unstated sizes drawn at random).

    Used for real reference images of exactly the prompts being evaluated: for held-out prompts
    these are held-out-split scenes, laid out with the data set's rules.
    """
    attrs = parse_caption(prompt)
    sizes = list(SIZES)
    if attrs.relation is None:
        size, color, shape = attrs.objects[0]
        size = size or sizes[rng.integers(len(sizes))]
        return Scene((place(rng, shape, color, size),), None, attrs.sizes[0] is not None)
    (_, c1, s1), (_, c2, s2) = attrs.objects
    for _ in range(100_000):
        z1, z2 = (sizes[i] for i in rng.integers(len(sizes), size=2))
        a, b = place(rng, s1, c1, z1), place(rng, s2, c2, z2)
        if _pair_layout_ok(a, b, attrs.relation):
            return Scene((a, b), attrs.relation, False)
    raise RuntimeError(f"could not lay out {prompt!r}")
