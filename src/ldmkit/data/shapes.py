"""The built-in `shapes` data set: procedurally drawn, captioned scenes of flat-colored shapes.

The spec is shared/specs/shapes.md. In short: a white square canvas holding one or two
non-overlapping objects (circle, square or isosceles apex-up triangle) in one of six exact
palette colors, each small (bounding box side 22% of the canvas) or large (40%), with captions

    one object:   "a {size} {color} {shape}"   ({size} stated in about half of the captions)
    two objects:  "a {color} {shape} {relation} a {color} {shape}"

where the relation holds between the objects' centroids with a margin of at least 20% of the
canvas along its axis, and the two objects differ in color or shape. Two-object layouts also keep
the stated axis dominant (the centroids are further apart along it than along the other axis),
so that "above" never also reads as "to the left of"; together with the gap kept between the
boxes this makes the margin in practice at least about 22%. Both objects' sizes are random in
two-object scenes (the caption does not state them).

Geometry lives in canvas fractions (0..1, y pointing down), so one scene renders at any size.
An object's `center` is its area centroid: the bounding-box center for circles and squares, and
one third of the height above the base for triangles.

Held-out captions (for evaluating prompts "chosen away from the training captions"):

- two objects: a scene is written canonically with the left (for left/right) or upper (for
  above/below) object first and the relation as "to the left of" or "above", so that a caption
  and its mirror ("A to the right of B" = "B to the left of A") share one canonical text.
  The combination is held out when ``zlib.crc32(canonical text) % 10 == 0``: about 10% of them,
  and a caption and its mirror are always held out together.
- one object: the size-stated captions in `HELDOUT_SINGLES` ("a large purple triangle", ...).
  The train split still draws such objects, but then never states their size.

The "train" split never produces a held-out caption; the "heldout" split produces only those.
"""

from __future__ import annotations

import itertools
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..errors import InvalidArgument, LdmkitError, check_choice
from .imagefolder import pil_to_tensor

SHAPES = ("circle", "square", "triangle")
COLORS = {  # exact sRGB fill values
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 30),
}
SIZES = {"small": 0.22, "large": 0.40}  # bounding-box side as a fraction of the canvas
RELATIONS = ("to the left of", "to the right of", "above", "below")
SPLITS = ("train", "heldout")
BACKGROUND = (255, 255, 255)

MIN_MARGIN = 0.20  # smallest centroid distance along the relation's axis, in canvas fractions
BORDER = 0.02  # free space kept between an object and the canvas edge
GAP = 0.04  # free space kept between the two objects' bounding boxes
HELDOUT_MODULUS = 10  # a two-object combination is held out when crc32(text) % this == 0
HELDOUT_SINGLES = (  # (size, color, shape) whose size-stated caption the train split never writes
    ("large", "purple", "triangle"),
    ("small", "orange", "circle"),
    ("large", "green", "square"),
)

# Words starting with a vowel letter but a consonant sound, and the reverse.
_CONSONANT_SOUND = ("one", "uni", "use", "eu")
_VOWEL_SOUND = ("hour", "honest", "honor")


def article(word: str) -> str:
    """Return "an" before a word starting with a vowel sound, else "a" ("an orange", "a red")."""
    w = word.lower()
    if w.startswith(_VOWEL_SOUND):
        return "an"
    if w.startswith(_CONSONANT_SOUND):
        return "a"
    return "an" if w[:1] in "aeiou" else "a"


# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeObject:
    """One flat-filled shape on the canvas; geometry in canvas fractions, y down."""

    shape: str  # one of SHAPES
    color: str  # one of COLORS
    size: str  # one of SIZES: "small" or "large"
    center: tuple[float, float]  # (x, y) of the area centroid

    @property
    def side(self) -> float:
        """Bounding-box side (width = height) as a fraction of the canvas."""
        return SIZES[self.size]

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the bounding box; a triangle's centroid sits 2/3 of the way down."""
        (x, y), s = self.center, self.side
        top = 2 * s / 3 if self.shape == "triangle" else s / 2
        return (x - s / 2, y - top, x + s / 2, y - top + s)


@dataclass(frozen=True)
class Scene:
    """What one image shows, and how its caption is written."""

    objects: tuple[ShapeObject, ...]  # one or two objects, in caption order
    relation: str | None = None  # for two objects: objects[0] {relation} objects[1]
    size_stated: bool = False  # for one object: whether the caption names its size


@dataclass(frozen=True)
class CaptionAttributes:
    """What a caption says, as parse_caption reads it back."""

    objects: tuple[tuple[str | None, str, str], ...]  # (size or None, color, shape) per object
    relation: str | None  # the relation of a two-object caption, else None

    @property
    def shapes(self) -> tuple[str, ...]:
        return tuple(o[2] for o in self.objects)

    @property
    def colors(self) -> tuple[str, ...]:
        return tuple(o[1] for o in self.objects)

    @property
    def sizes(self) -> tuple[str | None, ...]:
        return tuple(o[0] for o in self.objects)


def relation_holds(a: ShapeObject, b: ShapeObject, relation: str, margin: float = MIN_MARGIN) -> bool:
    """Whether `a {relation} b` holds between centroids with at least `margin` along its axis."""
    (ax, ay), (bx, by) = a.center, b.center
    gaps = {
        "to the left of": bx - ax,
        "to the right of": ax - bx,
        "above": by - ay,
        "below": ay - by,
    }
    return gaps[relation] >= margin


def boxes_apart(a: ShapeObject, b: ShapeObject, gap: float = 0.0) -> bool:
    """Whether the two bounding boxes are separated by at least `gap` along some axis."""
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    return bx0 - ax1 >= gap or ax0 - bx1 >= gap or by0 - ay1 >= gap or ay0 - by1 >= gap


def _place(rng: np.random.Generator, shape: str, color: str, size: str) -> ShapeObject:
    """An object at a uniformly random position that keeps it BORDER inside the canvas."""
    probe = ShapeObject(shape, color, size, (0.0, 0.0))
    x0, y0, x1, y1 = probe.bbox
    x = rng.uniform(BORDER - x0, 1 - BORDER - x1)
    y = rng.uniform(BORDER - y0, 1 - BORDER - y1)
    return ShapeObject(shape, color, size, (float(x), float(y)))


def _layout_ok(a: ShapeObject, b: ShapeObject, relation: str) -> bool:
    """The stated relation holds with the margin, dominates the other axis, and boxes are apart."""
    if not relation_holds(a, b, relation) or not boxes_apart(a, b, GAP):
        return False
    dx, dy = abs(a.center[0] - b.center[0]), abs(a.center[1] - b.center[1])
    horizontal = relation in ("to the left of", "to the right of")
    return dy < dx if horizontal else dx < dy


def _place_pair(rng: np.random.Generator, first: tuple, second: tuple, relation: str):
    """Two objects, (shape, color) each, placed by rejection so that `_layout_ok` holds."""
    for _ in range(1000):
        sizes = rng.choice(list(SIZES), size=2)
        for _ in range(50):
            a = _place(rng, first[0], first[1], str(sizes[0]))
            b = _place(rng, second[0], second[1], str(sizes[1]))
            if _layout_ok(a, b, relation):
                return a, b
    raise RuntimeError("could not place two objects; the layout constants are inconsistent")


# ---------------------------------------------------------------------------------------------
# Held-out combinations
# ---------------------------------------------------------------------------------------------


def _two_object_text(c1: str, s1: str, relation: str, c2: str, s2: str) -> str:
    return f"{article(c1)} {c1} {s1} {relation} {article(c2)} {c2} {s2}"


def _canonical(c1: str, s1: str, relation: str, c2: str, s2: str) -> str:
    """The caption written with the left / upper object first ("to the left of" / "above")."""
    if relation == "to the right of":
        return _two_object_text(c2, s2, "to the left of", c1, s1)
    if relation == "below":
        return _two_object_text(c2, s2, "above", c1, s1)
    return _two_object_text(c1, s1, relation, c2, s2)


def is_heldout_pair(c1: str, s1: str, relation: str, c2: str, s2: str) -> bool:
    """Whether the two-object combination belongs to the held-out split (see module docstring)."""
    text = _canonical(c1, s1, relation, c2, s2)
    return zlib.crc32(text.encode()) % HELDOUT_MODULUS == 0


@lru_cache(maxsize=None)
def _pair_combinations(heldout: bool) -> tuple[tuple[str, str, str, str, str], ...]:
    """All (color1, shape1, relation, color2, shape2) whose objects differ, in or out of held-out."""
    objects = list(itertools.product(COLORS, SHAPES))  # (color, shape)
    return tuple(
        (c1, s1, relation, c2, s2)
        for (c1, s1), relation, (c2, s2) in itertools.product(objects, RELATIONS, objects)
        if (c1, s1) != (c2, s2) and is_heldout_pair(c1, s1, relation, c2, s2) == heldout
    )


@lru_cache(maxsize=None)
def _single_combinations(exclude_heldout: bool) -> tuple[tuple[str, str, str], ...]:
    """All (size, color, shape), optionally without HELDOUT_SINGLES."""
    combos = [(z, c, s) for z in SIZES for c in COLORS for s in SHAPES]
    return tuple(t for t in combos if not (exclude_heldout and t in HELDOUT_SINGLES))


def heldout_prompts() -> list[str]:
    """Every held-out caption: the two-object ones (both mirror forms) and HELDOUT_SINGLES."""
    singles = [f"{article(z)} {z} {c} {s}" for z, c, s in HELDOUT_SINGLES]
    pairs = [_two_object_text(*combo) for combo in _pair_combinations(heldout=True)]
    return singles + pairs


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def _sample_one(rng: np.random.Generator, split: str) -> Scene:
    """One object; the size is stated with probability 1/2, never for a held-out single."""
    if split == "heldout":
        size, color, shape = HELDOUT_SINGLES[rng.integers(len(HELDOUT_SINGLES))]
        return Scene((_place(rng, shape, color, size),), None, True)
    stated = bool(rng.random() < 0.5)
    combos = _single_combinations(exclude_heldout=stated)
    size, color, shape = combos[rng.integers(len(combos))]
    return Scene((_place(rng, shape, color, size),), None, stated)


def _sample_two(rng: np.random.Generator, split: str) -> Scene:
    combos = _pair_combinations(heldout=split == "heldout")
    c1, s1, relation, c2, s2 = combos[rng.integers(len(combos))]
    a, b = _place_pair(rng, (s1, c1), (s2, c2), relation)
    return Scene((a, b), relation, False)


def sample_scene(
    rng: np.random.Generator,
    one_object_fraction: float = 0.5,
    split: str = "train",
) -> Scene:
    """Draw a scene: one object with probability `one_object_fraction`, else two.

    Two-object combinations are uniform over those allowed in the split. One-object scenes state
    the size with probability 1/2; the (size, color, shape) is uniform over all combinations when
    it is not stated, and over those the split allows when it is.
    All randomness comes from `rng`, so a Generator seeded the same way gives the same scene.
    """
    check_choice("shapes split", split, SPLITS)
    if not 0.0 <= one_object_fraction <= 1.0:
        raise InvalidArgument(f"one_object_fraction must be in [0, 1], got {one_object_fraction}")
    if rng.random() < one_object_fraction:
        return _sample_one(rng, split)
    return _sample_two(rng, split)


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------


def caption(scene: Scene) -> str:
    """The scene's caption: lower case, no trailing period, "a"/"an" by vowel sound."""
    if len(scene.objects) == 1:
        o = scene.objects[0]
        words = [o.size, o.color, o.shape] if scene.size_stated else [o.color, o.shape]
        return f"{article(words[0])} {' '.join(words)}"
    a, b = scene.objects
    return _two_object_text(a.color, a.shape, scene.relation, b.color, b.shape)


def _alternatives(words) -> str:
    """A regex alternation of the given words."""
    return "|".join(re.escape(w) for w in words)


_OBJECT = rf"(an?) (?:({_alternatives(SIZES)}) )?({_alternatives(COLORS)}) ({_alternatives(SHAPES)})"
_PAIR_OBJECT = rf"(an?) ({_alternatives(COLORS)}) ({_alternatives(SHAPES)})"
_ONE_RE = re.compile(rf"{_OBJECT}")
_TWO_RE = re.compile(rf"{_PAIR_OBJECT} ({_alternatives(RELATIONS)}) {_PAIR_OBJECT}")


def _check_article(text: str, art: str, word: str) -> None:
    if art != article(word):
        raise InvalidArgument(f"shapes caption {text!r}: expected {article(word)!r} before {word!r}")


def parse_caption(text: str) -> CaptionAttributes:
    """Read a shapes caption back into its attributes; the inverse of `caption`.

    Raises InvalidArgument for any text outside the caption grammar (including a wrong article
    and two identical objects), so evaluation never silently scores a prompt it misread.
    """
    if m := _ONE_RE.fullmatch(text):
        art, size, color, shape = m.groups()
        _check_article(text, art, size or color)
        return CaptionAttributes(((size, color, shape),), None)
    if m := _TWO_RE.fullmatch(text):
        art1, c1, s1, relation, art2, c2, s2 = m.groups()
        _check_article(text, art1, c1)
        _check_article(text, art2, c2)
        if (c1, s1) == (c2, s2):
            raise InvalidArgument(f"shapes caption {text!r}: the two objects must differ in color or shape")
        return CaptionAttributes(((None, c1, s1), (None, c2, s2)), relation)
    raise InvalidArgument(
        f"shapes caption {text!r} is outside the grammar "
        "'a [size] {color} {shape}' / 'a {color} {shape} {relation} a {color} {shape}'"
    )


OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of",
            "above": "below", "below": "above"}


def hard_negatives(text: str) -> list[str]:
    """Captions that use a two-object caption's words but describe a different scene: the
    relation reversed and, when the objects differ in both colour and shape, the colours bound
    to the other shapes. (When they share one, rebinding only swaps the objects, which is the
    reversed relation again.) Contrastive training against them (NegCLIP, Yuksekgonul et al.
    2023) keeps a text encoder from reading captions as bags of words. One-object captions: []."""
    attributes = parse_caption(text)
    if attributes.relation is None:
        return []
    (_, c1, s1), (_, c2, s2) = attributes.objects
    rel = attributes.relation
    negatives = [_two_object_text(c1, s1, OPPOSITE[rel], c2, s2)]
    if c1 != c2 and s1 != s2:
        negatives.append(_two_object_text(c2, s1, rel, c1, s2))
    return negatives


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def pixel_bbox(obj: ShapeObject, size: int) -> tuple[int, int, int, int]:
    """Inclusive pixel box (x0, y0, x1, y1) the object is drawn in on a size x size canvas."""
    side = max(1, round(obj.side * size))
    x0, y0, _, _ = obj.bbox
    px = min(max(round(x0 * size), 0), size - side)
    py = min(max(round(y0 * size), 0), size - side)
    return px, py, px + side - 1, py + side - 1


def _draw(draw: ImageDraw.ImageDraw, obj: ShapeObject, size: int) -> None:
    x0, y0, x1, y1 = pixel_bbox(obj, size)
    fill = COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:  # isosceles triangle, apex up, base horizontal
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw the scene on a white size x size RGB canvas with exact, un-antialiased palette fills."""
    if size < 8:
        raise InvalidArgument(f"shapes canvas size must be at least 8 pixels, got {size}")
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw(draw, obj, size)
    return image


# ---------------------------------------------------------------------------------------------
# The data set
# ---------------------------------------------------------------------------------------------


class ShapesDataset(torch.utils.data.Dataset):
    """`length` scenes drawn on the fly; item i is a pure function of (seed, split, i).

    Items follow the ldmkit.data protocol: dict(image=(3, size, size) float in [-1, 1],
    caption=str, label=None). `scene(i)` gives the scene behind item i, for evaluation.
    """

    def __init__(
        self,
        size: int = 64,  # canvas side in pixels
        length: int = 20_000,  # number of items (scenes are generated, so any length works)
        seed: int = 0,  # seeds every item's numpy Generator together with the index
        one_object_fraction: float = 0.5,  # probability of a one-object scene
        split: str = "train",  # "train" (never a held-out caption) or "heldout" (only those)
    ) -> None:
        check_choice("shapes split", split, SPLITS)
        if length < 1:
            raise InvalidArgument(f"shapes length must be positive, got {length}")
        if size < 8:
            raise InvalidArgument(f"shapes canvas size must be at least 8 pixels, got {size}")
        if not 0.0 <= one_object_fraction <= 1.0:
            raise InvalidArgument(f"one_object_fraction must be in [0, 1], got {one_object_fraction}")
        self.size, self.length, self.seed = size, length, seed
        self.one_object_fraction, self.split = one_object_fraction, split

    def __len__(self) -> int:
        return self.length

    def _index(self, i: int) -> int:
        if not -self.length <= i < self.length:
            raise IndexError(f"shapes index {i} out of range for length {self.length}")
        return i % self.length

    def scene(self, i: int) -> Scene:
        """The scene of item i, sampled from a Generator seeded by (seed, split, i)."""
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), self._index(i)])
        return sample_scene(rng, self.one_object_fraction, self.split)

    def __getitem__(self, i: int) -> dict:
        scene = self.scene(i)
        return dict(image=pil_to_tensor(render(scene, self.size)), caption=caption(scene), label=None)


def check_scene(scene: Scene) -> None:
    """Raise LdmkitError if a scene breaks the data set's invariants (used by tests and tools)."""
    for o in scene.objects:
        x0, y0, x1, y1 = o.bbox
        if min(x0, y0) < 0 or max(x1, y1) > 1:
            raise LdmkitError(f"shapes scene: {o} leaves the canvas")
    if len(scene.objects) == 2:
        a, b = scene.objects
        if not boxes_apart(a, b):
            raise LdmkitError("shapes scene: the two objects overlap")
        if (a.color, a.shape) == (b.color, b.shape):
            raise LdmkitError("shapes scene: the two objects are identical")
        if not relation_holds(a, b, scene.relation):
            raise LdmkitError(f"shapes scene: {scene.relation!r} does not hold with the margin")
