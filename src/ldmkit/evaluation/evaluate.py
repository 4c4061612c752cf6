"""Evaluate a text-to-image model on the shapes data set: generate, judge, and measure FID.

    evaluate_shapes_model(pipe, prompts)     generate num_per_prompt images per prompt, then
    score_shapes_images(prompts, images)     text alignment (alignment.py) and FID against real
                                             renderings of the same prompts

The real reference images are fresh renderings of exactly the evaluated prompts (for held-out
prompts: scenes of the held-out split), so that the FID measures image quality rather than a
difference between the prompt mix and the data set's mix of one- and two-object scenes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..data.shapes import render
from ..errors import InvalidArgument
from .alignment import RELATION_MARGIN, judge_many, summarize
from .fid import fid_from_features
from .geometry_judge import cross_check
from .scenes import scene_for_prompt
from .shapes_classifier import ShapesClassifier, extract_features, load_shapes_classifier, load_shapes_judge

MIN_REAL_IMAGES = 1000  # the real side of the FID has at least this many images
REAL_SEED = 12345  # seeds the real reference scenes (any fixed value; not the classifier's)


def real_images_for_prompts(prompts: Sequence[str], per_prompt: int, seed: int = REAL_SEED, size: int = 64) -> list:
    """`per_prompt` fresh renderings (PIL) of scenes each prompt describes, prompt by prompt."""
    rng = np.random.default_rng(seed)
    return [render(scene_for_prompt(p, rng), size) for p in prompts for _ in range(per_prompt)]


def shapes_fid(images, real_images, classifier: ShapesClassifier | None = None) -> float:
    """FID between two image sets in the penultimate-layer feature space of the shapes classifier
    (by default the FID's own, not the judge: see shapes_classifier)."""
    classifier = classifier or load_shapes_classifier()
    return fid_from_features(extract_features(classifier, images), extract_features(classifier, real_images))


def score_shapes_images(
    prompts: Sequence[str],
    images,
    num_per_prompt: int = 1,
    judge: ShapesClassifier | None = None,
    margin: float = RELATION_MARGIN,
    real_seed: int = REAL_SEED,
    min_real_images: int = MIN_REAL_IMAGES,
) -> dict:
    """Alignment and FID of images; `images` holds `num_per_prompt` consecutive images per prompt.

    `judge` (default: the packaged judge) gives the verdicts; the FID is in the packaged FID
    classifier's feature space. Returns {"alignment": summarize(...), "fid": float, "real_images":
    int, "judgements": [...], "geometry_check": the rule-based judge's alignment and its agreement
    with the judge's verdicts (geometry_judge.cross_check)}.
    """
    judge = judge or load_shapes_judge()
    expanded = [p for p in prompts for _ in range(num_per_prompt)]
    judgements = judge_many(expanded, images, judge, margin)
    real_per_prompt = max(num_per_prompt, -(-min_real_images // len(prompts)))  # ceil
    real = real_images_for_prompts(prompts, real_per_prompt, real_seed, judge.config.image_size)
    return {
        "alignment": summarize(judgements),
        "fid": shapes_fid(images, real),
        "real_images": len(real),
        "judgements": judgements,
        "geometry_check": cross_check(expanded, images, judgements, margin),
    }


def generate_images(
    pipe,
    prompts: Sequence[str],
    num_per_prompt: int = 4,
    steps: int = 25,
    sampler: str = "dpmpp_2m",
    cfg_scale: float = 7.5,
    seed: int = 0,
    size: int | None = None,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
    cfg_rescale: float = 0.0,
) -> list:
    """PIL images, `num_per_prompt` consecutive per prompt; image k draws from seed + k alone.

    `pipe` is a StableDiffusion; `size` defaults to its training size. `progress(done, total)`
    is called after each batch.
    """
    from ..pipelines.stable_diffusion import seed_generators

    if num_per_prompt < 1:
        raise InvalidArgument(f"num_per_prompt must be >= 1, got {num_per_prompt}")
    size = size or pipe.default_size
    expanded = [p for p in prompts for _ in range(num_per_prompt)]
    images = []
    for start in range(0, len(expanded), batch_size):
        chunk = expanded[start:start + batch_size]
        generators = seed_generators(seed + start, len(chunk))
        images += pipe.txt2img(chunk, sampler=sampler, steps=steps, cfg_scale=cfg_scale, cfg_rescale=cfg_rescale,
                               height=size, width=size, seed=generators)
        if progress:
            progress(len(images), len(expanded))
    return images


def evaluate_shapes_model(
    pipe,
    prompts: Sequence[str],
    num_per_prompt: int = 4,  # images per prompt
    steps: int = 25,  # sampling steps
    sampler: str = "dpmpp_2m",  # one of ldmkit.diffusion.sampling.SAMPLERS
    cfg_scale: float = 7.5,  # classifier-free guidance scale
    seed: int = 0,  # image k is drawn from seed + k
    batch_size: int = 32,  # images per pipeline call
    judge: ShapesClassifier | None = None,  # default: the packaged shapes judge
    progress: Callable[[int, int], None] | None = None,  # progress(done, total) after each batch
    keep_images: bool = False,  # also return the generated PIL images under "images"
    min_real_images: int = MIN_REAL_IMAGES,  # size of the real side of the FID (at least)
    cfg_rescale: float = 0.0,  # guidance rescale (0: plain classifier-free guidance)
) -> dict:
    """Generate images for `prompts` with a StableDiffusion and score them (score_shapes_images).

    Returns {"alignment", "fid", "real_images", "judgements", "settings", "seconds"[, "images"]}.
    """
    start = time.time()
    with torch.no_grad():
        images = generate_images(pipe, prompts, num_per_prompt, steps, sampler, cfg_scale, seed,
                                 batch_size=batch_size, progress=progress, cfg_rescale=cfg_rescale)
    report = score_shapes_images(prompts, images, num_per_prompt, judge, min_real_images=min_real_images)
    report["settings"] = {"prompts": len(prompts), "num_per_prompt": num_per_prompt, "steps": steps,
                          "sampler": sampler, "cfg_scale": cfg_scale, "cfg_rescale": cfg_rescale, "seed": seed}
    report["seconds"] = round(time.time() - start, 1)
    if keep_images:
        report["images"] = images
    return report
