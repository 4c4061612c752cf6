"""Text alignment on the shapes data set: does an image show exactly what its prompt says?

`judge` reads an image with the shapes judge (`shapes_classifier.load_shapes_judge`) and checks
every attribute of a shapes caption (grammar in shared/specs/shapes.md):

    count     as many objects as the prompt names (1 or 2); a repeated object counts twice
    shape     the detected shapes are the prompt's shapes (as a multiset)
    color     the detected colors are the prompt's colors (as a multiset)
    objects   the detected (color, shape) pairs are the prompt's: colors bound to the right shapes
    size      one-object prompts that state a size: the object has that size (else None)
    relation  two-object prompts: both named objects are there once each and their centroids
              differ by more than `margin` of the canvas in the stated direction (else None)
    correct   every attribute that applies holds

The data set keeps related centroids at least 0.2 canvas apart, so the default margin of 0.1
accepts every correct layout with room for the classifier's centroid error (about 0.01).

`evaluation_prompts` picks prompts away from the training captions: the held-out captions
(`heldout_prompts`) for the main number, and a sample of training captions for comparison.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence

import numpy as np

from ..data.shapes import (
    COLORS, HELDOUT_SINGLES, RELATIONS, SHAPES, SIZES, Scene, ShapeObject, caption, heldout_prompts,
    is_heldout_pair, parse_caption,
)
from ..errors import InvalidArgument, check_choice
from .shapes_classifier import DetectedObject, ShapesClassifier, detect, load_shapes_judge

RELATION_MARGIN = 0.1  # centroid difference along the relation's axis, canvas fractions
ATTRIBUTES = ("count", "shape", "color", "objects", "size", "relation")
PROMPT_SETS = ("heldout", "train")


def _relation_gap(a: DetectedObject, b: DetectedObject, relation: str) -> float:
    """How far `a` is from `b` in the direction the relation states (positive when it holds)."""
    (ax, ay), (bx, by) = a.center, b.center
    return {"to the left of": bx - ax, "to the right of": ax - bx, "above": by - ay, "below": ay - by}[relation]


def judge_detections(prompt: str, found: list[DetectedObject], margin: float = RELATION_MARGIN) -> dict:
    """The attribute checks of the module docstring for what the classifier found in one image."""
    attrs = parse_caption(prompt)
    # a slot that sees "two or more" contributes its object twice to the multisets
    seen = [o for o in found for _ in range(o.count)]
    want = [(color, shape) for _, color, shape in attrs.objects]
    result = {
        "count": len(seen) == len(want),
        "shape": Counter(o.shape for o in seen) == Counter(s for _, s in want),
        "color": Counter(o.color for o in seen) == Counter(c for c, _ in want),
        "objects": Counter((o.color, o.shape) for o in seen) == Counter(want),
        "size": None,
        "relation": None,
    }
    if attrs.relation is None and attrs.sizes[0] is not None:
        result["size"] = len(seen) == 1 and seen[0].size == attrs.sizes[0]
    if attrs.relation is not None:
        by_pair = {(o.color, o.shape): o for o in found if o.count == 1}
        a, b = by_pair.get(want[0]), by_pair.get(want[1])
        result["relation"] = a is not None and b is not None and _relation_gap(a, b, attrs.relation) > margin
    result["correct"] = all(v for v in result.values() if v is not None)
    result["detected"] = [f"{o.size} {o.color} {o.shape} at ({o.center[0]:.2f}, {o.center[1]:.2f})"
                          + (" (x2+)" if o.count > 1 else "") for o in found]
    return result


def judge_many(prompts: Sequence[str], images, classifier: ShapesClassifier | None = None,
               margin: float = RELATION_MARGIN) -> list[dict]:
    """`judge` for many (prompt, image) pairs at once (images: PIL list or (B, 3, H, W) in [-1, 1])."""
    classifier = classifier or load_shapes_judge()
    for p in prompts:
        parse_caption(p)  # a prompt outside the grammar is a user error, raised before any work
    found = detect(classifier, images)
    if len(found) != len(prompts):
        raise InvalidArgument(f"got {len(prompts)} prompts for {len(found)} images")
    return [judge_detections(p, f, margin) | {"prompt": p} for p, f in zip(prompts, found)]


def judge(prompt: str, image, classifier: ShapesClassifier | None = None, margin: float = RELATION_MARGIN) -> dict:
    """Whether one image (PIL, or (3, H, W) in [-1, 1]) shows every attribute of a shapes prompt.

    Returns {"correct": bool, "count", "shape", "color", "objects": bool, "size", "relation":
    bool or None when the prompt does not state it, "detected": [descriptions], "prompt"}.
    """
    return judge_many([prompt], image, classifier, margin)[0]


def _rate(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(judgements: list[dict]) -> dict:
    """Fraction fully right, per-attribute accuracies and the relation's accuracy among images
    whose objects are right, for one- and two-object prompts apart."""
    groups = {
        "one_object": [j for j in judgements if parse_caption(j["prompt"]).relation is None],
        "two_object": [j for j in judgements if parse_caption(j["prompt"]).relation is not None],
        "all": judgements,
    }
    report = {}
    for name, js in groups.items():
        report[name] = {
            "correct": _rate([j["correct"] for j in js]),
            "images": len(js),
            "attributes": {a: _rate([j[a] for j in js]) for a in ATTRIBUTES},
            # where a model draws both named objects right, does it also put them where the prompt
            # says? A model that ignores the relation words scores about 0.5 here
            "relation_where_objects_right": _rate([j["relation"] for j in js if j["objects"]]),
        }
    return report


def text_alignment(prompts: Sequence[str], images, classifier: ShapesClassifier | None = None,
                   margin: float = RELATION_MARGIN) -> dict:
    """Alignment of images with their prompts: {"one_object", "two_object", "all"} each holding
    the fraction fully right ("correct"), the image count and per-attribute accuracies (None
    where no prompt of the group states the attribute)."""
    return summarize(judge_many(prompts, images, classifier, margin))


# -- evaluation prompts -------------------------------------------------------------------------


def _pair_caption(c1: str, s1: str, relation: str, c2: str, s2: str) -> str:
    # captions come from a Scene so that the wording is the data set's own; positions do not matter
    a, b = ShapeObject(s1, c1, "small", (0.0, 0.0)), ShapeObject(s2, c2, "small", (0.0, 0.0))
    return caption(Scene((a, b), relation))


def training_prompts() -> tuple[list[str], list[str]]:
    """(one-object, two-object) captions the train split can write, in a fixed order."""
    singles = []
    for color, shape in itertools.product(COLORS, SHAPES):
        singles.append(caption(Scene((ShapeObject(shape, color, "small", (0.0, 0.0)),))))
        for size in SIZES:
            if (size, color, shape) not in HELDOUT_SINGLES:
                singles.append(caption(Scene((ShapeObject(shape, color, size, (0.0, 0.0)),), None, True)))
    objects = list(itertools.product(COLORS, SHAPES))
    pairs = [_pair_caption(c1, s1, r, c2, s2)
             for (c1, s1), r, (c2, s2) in itertools.product(objects, RELATIONS, objects)
             if (c1, s1) != (c2, s2) and not is_heldout_pair(c1, s1, r, c2, s2)]
    return singles, pairs


def evaluation_prompts(which: str = "heldout", num_one: int | None = None, num_two: int | None = None,
                       seed: int = 0) -> list[str]:
    """Prompts to evaluate: "heldout" (captions never written in training; the main number) or
    "train" (a sample of training captions, for comparison). `num_one` / `num_two` cap the
    one- and two-object prompts, sampled with `seed`; by default the training sample has as many
    two-object prompts as the held-out set and 18 one-object prompts."""
    check_choice("prompt set", which, PROMPT_SETS)
    if which == "heldout":
        prompts = heldout_prompts()
        singles = [p for p in prompts if parse_caption(p).relation is None]
        pairs = [p for p in prompts if parse_caption(p).relation is not None]
    else:
        singles, pairs = training_prompts()
        held_pairs = sum(parse_caption(p).relation is not None for p in heldout_prompts())
        num_one = 18 if num_one is None else num_one
        num_two = held_pairs if num_two is None else num_two
    rng = np.random.default_rng(seed)

    def pick(items: list[str], n: int | None) -> list[str]:
        if n is None or n >= len(items):
            return items
        return [items[i] for i in sorted(rng.choice(len(items), size=n, replace=False))]

    return pick(singles, num_one) + pick(pairs, num_two)
