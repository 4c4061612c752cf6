"""The shapes attribute classifier: reads back which objects a 64x64 shapes image shows.

A small CNN with one output slot per (color, shape) pair, 18 in all (a scene's objects always
differ in color or shape, so one slot per pair can describe any data-set scene). Each slot says

    count    how many such objects there are (0 .. MAX_COUNT, "MAX_COUNT or more"), so that an
             image with a missing, repeated or extra object is seen as such
    size     small or large, meaningful when the count is 1
    center   the area centroid (x, y) in canvas fractions (y down), meaningful when the count is 1

How: `palette_membership` turns the image into six maps, how much each pixel is each palette
color. One small fully convolutional network, shared by the six colors, reads each map and
paints, per shape, a density on an 8x8 grid whose sum is the object count (counting by density,
Lempitsky & Zisserman 2010), with per-cell size logits and centroid offsets that the density
averages. Everything is translation-equivariant and shared across colors, so an object seen in
one place and color teaches every other, which is why it learns in a few minutes on one thread.
It trains on rendered scenes (see scenes.py) with the defects of generated samples added
(common.augment): 1000 steps, in under five minutes on one CPU thread.

Two of them ship, the same network trained two ways:

    the judge    (`load_shapes_judge`, ``assets/shapes_judge.safetensors``) reads each color's map
                 beside the occupancy map (where anything is drawn: their sum), and a quarter of
                 its training scenes hold an object painted in two colours (scenes.two_tone), so
                 it reads such an object as the colour most of it has, as a person does.
                 Generated samples have them (an orange square with a yellow rim); a network
                 that sees one color's map alone cannot tell such an object from a fragment.
    the FID one  (`load_shapes_classifier`, ``assets/shapes_classifier.safetensors``) reads the
                 color maps alone and trains on one-colour objects. Its penultimate layer, the
                 trunk features averaged over the grid for each color (6 x 32 numbers), is the
                 feature space of the shapes FID; it is kept because it tells a blur from real
                 images better than the judge's features do.

A missing asset is retrained and cached on first use; ``ldmkit eval classifier shapes`` (or
``shapes-judge``) retrains one reproducibly.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ..data.imagefolder import pil_to_tensor
from ..data.shapes import BACKGROUND, COLORS, SHAPES, SIZES, Scene, render, sample_scene
from ..errors import InvalidArgument
from .common import augment, cache_path, find_asset, read_model, save_weights, seeded
from .scenes import TWO_TONE_FRACTION, training_scene, two_tone

ASSET_NAME = "shapes_classifier.safetensors"  # the FID's feature network
JUDGE_ASSET_NAME = "shapes_judge.safetensors"  # the alignment judge
SLOTS = tuple(itertools.product(COLORS, SHAPES))  # (color, shape) per output slot
SIZE_NAMES = tuple(SIZES)  # ("small", "large"): size class index -> name
MAX_COUNT = 3  # counts are read as 0 .. MAX_COUNT ("MAX_COUNT or more")
MAP_OUTPUTS = 1 + len(SIZE_NAMES) + 2  # per shape and grid cell: density, size logits, (dx, dy)


@dataclass(frozen=True)
class ShapesClassifierConfig:
    image_size: int = 64  # input side in pixels; other sizes are resized to it
    channels: tuple[int, ...] = (8, 16, 32)  # widths of the stride-2 stages: 64 -> 8x8 grid
    grid_layers: int = 2  # 3x3 convolutions on the 8x8 grid (receptive field 47 px)
    temperature: float = 0.02  # softness of the palette membership (squared distance, [-1, 1] units)
    occupancy: bool = False  # read each color's map beside the occupancy map (the judge)


@dataclass(frozen=True)
class DetectedObject:
    """One object the classifier sees (a slot whose count is at least 1)."""

    color: str
    shape: str
    size: str  # "small" or "large"
    center: tuple[float, float]  # (x, y) in canvas fractions, y down
    count: int  # 1 .. MAX_COUNT (MAX_COUNT means that many or more)


def palette_membership(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """How much each pixel of x (B, 3, H, W) in [-1, 1] is each palette color: (B, 6, H, W).

    A softmax over the squared distances to the six colors and the white background, so a
    slightly off color still counts as its nearest palette color, and a pixel halfway between
    two (a blurred edge, say) is split between them.
    """
    refs = torch.tensor([*COLORS.values(), BACKGROUND], dtype=x.dtype) / 127.5 - 1  # (7, 3)
    d2 = (x[:, None] - refs[None, :, :, None, None]).square().sum(dim=2)  # (B, 7, H, W)
    return torch.softmax(-d2 / temperature, dim=1)[:, :len(COLORS)]


class ShapesClassifier(nn.Module):
    """(B, 3, 64, 64) in [-1, 1] -> per-slot (counts (B, 18), size logits (B, 18, 2), centers (B, 18, 2)).

    Slots are color-major (SLOTS); see the module docstring for how they are read.
    """

    def __init__(self, config: ShapesClassifierConfig = ShapesClassifierConfig()) -> None:
        super().__init__()
        self.config = config
        layers, c_in = [], 1 + config.occupancy  # a color's membership map (and the occupancy map)
        for c in config.channels:  # each stage: (H, W) -> (H/2, W/2)
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.SiLU()]
            c_in = c
        for _ in range(config.grid_layers):  # widen the view until a large object fits in it
            layers += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.BatchNorm2d(c_in), nn.SiLU()]
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Conv2d(c_in, len(SHAPES) * MAP_OUTPUTS, 1)
        with torch.no_grad():  # start with a near-empty density (softplus(-6) * 64 cells ~ 0.16)
            self.head.bias.view(len(SHAPES), MAP_OUTPUTS)[:, 0] = -6.0
        self.grid = config.image_size // 2 ** len(config.channels)
        cells = (torch.arange(self.grid) + 0.5) / self.grid  # cell centers in canvas fractions
        self.register_buffer("cell_x", cells[None, :].expand(self.grid, -1).clone(), persistent=False)
        self.register_buffer("cell_y", cells[:, None].expand(-1, self.grid).clone(), persistent=False)

    def color_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk features of each color's membership map (beside the occupancy map): (B * 6, C, g, g)."""
        b, _, h, w = x.shape
        maps = palette_membership(x, self.config.temperature)[:, :, None]  # (B, 6, 1, H, W)
        if self.config.occupancy:
            occupied = maps.sum(dim=1, keepdim=True)  # (B, 1, 1, H, W): 1 - the white background's share
            maps = torch.cat([maps, occupied.expand_as(maps)], dim=2)  # (B, 6, 2, H, W)
        return self.trunk(maps.reshape(b * len(COLORS), -1, h, w))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (B, 6 * C): each color's trunk features averaged over the grid."""
        return self.color_maps(x).mean(dim=(2, 3)).reshape(x.shape[0], -1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, g = x.shape[0], self.grid
        out = self.head(self.color_maps(x)).reshape(b, len(SLOTS), MAP_OUTPUTS, g, g)  # (B, 18, 5, g, g)
        density = F.softplus(out[:, :, 0])  # (B, 18, g, g): objects per cell
        counts = density.sum(dim=(2, 3))  # (B, 18)
        weights = density / (counts[:, :, None, None] + 1e-6)  # where the slot's object is
        size_logits = (weights[:, :, None] * out[:, :, 1:3]).sum(dim=(3, 4))  # (B, 18, 2)
        # a cell's centroid guess: its center plus an offset of up to one cell
        offsets = torch.tanh(out[:, :, 3:5]) / g  # (B, 18, 2, g, g)
        cx = (weights * (self.cell_x + offsets[:, :, 0])).sum(dim=(2, 3))
        cy = (weights * (self.cell_y + offsets[:, :, 1])).sum(dim=(2, 3))
        return counts, size_logits, torch.stack([cx, cy], dim=-1)


# -- inputs and targets -------------------------------------------------------------------------


def to_input(images, size: int = 64) -> torch.Tensor:
    """Images as the classifier's input (B, 3, size, size) in [-1, 1].

    Accepts a PIL image, a list of them, or a tensor (3, H, W) / (B, 3, H, W) in [-1, 1] (the
    ldmkit convention; grayscale (B, 1, H, W) is repeated to RGB). Other sizes are resized.
    """
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if not images:
            raise InvalidArgument("no images to classify")
        tensors = []
        for im in images:
            if isinstance(im, torch.Tensor):
                tensors.append(im)
                continue
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            tensors.append(pil_to_tensor(im))
        images = torch.stack([t if t.ndim == 3 else t[0] for t in tensors])
    if not isinstance(images, torch.Tensor):
        raise InvalidArgument(f"images must be PIL images or a tensor, got {type(images).__name__}")
    x = images[None] if images.ndim == 3 else images
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise InvalidArgument(f"an image tensor must be (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
    x = x.float().expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(-1, 1)


def scene_targets(scene: Scene) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets of one scene: counts (18,) long, sizes (18,) long, centers (18, 2) float."""
    counts = torch.zeros(len(SLOTS), dtype=torch.long)
    sizes = torch.zeros(len(SLOTS), dtype=torch.long)
    centers = torch.zeros(len(SLOTS), 2)
    for o in scene.objects:
        k = SLOTS.index((o.color, o.shape))
        counts[k] = min(int(counts[k]) + 1, MAX_COUNT)  # a third repeat reads as "MAX_COUNT or more"
        sizes[k] = SIZE_NAMES.index(o.size)
        centers[k] = torch.tensor(o.center)
    return counts, sizes, centers


def render_batch(scenes: list[Scene], size: int = 64) -> torch.Tensor:
    """Rendered scenes as (B, 3, size, size) in [-1, 1]."""
    return torch.stack([pil_to_tensor(render(s, size)) for s in scenes])


def batch_targets(scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    counts, sizes, centers = zip(*(scene_targets(s) for s in scenes))
    return torch.stack(counts), torch.stack(sizes), torch.stack(centers)


# -- training -----------------------------------------------------------------------------------


def loss_fn(out: tuple, counts: torch.Tensor, sizes: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Count error everywhere; size and center losses only where exactly one object is."""
    pred_counts, size_logits, pred_centers = out
    # summed over the 18 slots (not averaged), so that counting weighs as much as the per-object terms
    loss = F.mse_loss(pred_counts, counts.float(), reduction="sum") / len(counts)
    single = counts == 1  # (B, 18)
    if single.any():
        loss = loss + F.cross_entropy(size_logits[single], sizes[single])
        # centers in units of a tenth of the canvas, so their loss weighs like the others
        loss = loss + F.mse_loss(pred_centers[single] * 10, centers[single] * 10)
    return loss


def render_pool(scenes: list[Scene], size: int = 64, two_tone_fraction: float = 0.0,
                rng: np.random.Generator | None = None) -> torch.Tensor:
    """Rendered scenes as uint8 (B, 3, size, size): a compact pool to draw training batches from;
    that fraction of them with one object painted in two colours (scenes.two_tone), drawn from `rng`."""
    images = np.stack([np.array(render(s, size)) for s in scenes])  # (B, H, W, 3), writable
    for image, scene in zip(images, scenes):
        if two_tone_fraction and scene.objects and rng.random() < two_tone_fraction:
            two_tone(image, scene.objects[rng.integers(len(scene.objects))], rng)
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def train_shapes_classifier(
    steps: int = 1000,  # optimizer steps
    batch_size: int = 32,  # scenes per step (each gives six color maps to the shared network)
    pool_size: int = 10_000,  # distinct scenes rendered once up front (rendering is the slow part)
    lr: float = 3e-3,  # peak learning rate of the one-cycle schedule
    seed: int = 0,  # seeds the scenes, the batches, the augmentation and the initial weights
    config: ShapesClassifierConfig = ShapesClassifierConfig(),
    two_tone_fraction: float = 0.0,  # share of the scenes with an object painted in two colours
    log_every: int = 0,  # print the loss every this many steps (0: quiet)
) -> ShapesClassifier:
    """Train on a pool of rendered scenes, freshly augmented at every draw; returns eval mode."""
    rng = np.random.default_rng([seed, 1])  # scenes
    gen = torch.Generator().manual_seed(seed)  # batches and augmentation
    scenes = [training_scene(rng) for _ in range(pool_size)]
    pool = render_pool(scenes, config.image_size, two_tone_fraction, rng)  # (N, 3, H, W) uint8
    counts, sizes, centers = batch_targets(scenes)
    with seeded(seed):
        model = ShapesClassifier(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        idx = torch.randint(pool_size, (batch_size,), generator=gen)
        x = augment(pool[idx].float() / 127.5 - 1, gen)
        loss = loss_fn(model(x), counts[idx], sizes[idx], centers[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}: loss {loss.item():.4f}", flush=True)
    return model.eval()


# -- prediction ---------------------------------------------------------------------------------


@torch.no_grad()
def predict(model: ShapesClassifier, images, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(counts (B, 18) long, sizes (B, 18) long, centers (B, 18, 2)) for images (see `to_input`)."""
    x = to_input(images, model.config.image_size)
    counts, size_logits, centers = (torch.cat(t) for t in zip(*(model(x[i:i + batch_size])
                                                                 for i in range(0, len(x), batch_size))))
    return counts.round().clamp(0, MAX_COUNT).long(), size_logits.argmax(-1), centers


@torch.no_grad()
def extract_features(model: ShapesClassifier, images, batch_size: int = 256) -> torch.Tensor:
    """Penultimate-layer features (B, 6 * C) in float64, for the FID."""
    x = to_input(images, model.config.image_size)
    return torch.cat([model.features(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).double()


def detect(model: ShapesClassifier, images) -> list[list[DetectedObject]]:
    """The objects the classifier sees in each image."""
    counts, sizes, centers = predict(model, images)
    result = []
    for c, z, xy in zip(counts.tolist(), sizes.tolist(), centers.tolist()):
        result.append([
            DetectedObject(SLOTS[k][0], SLOTS[k][1], SIZE_NAMES[z[k]], (xy[k][0], xy[k][1]), c[k])
            for k in range(len(SLOTS)) if c[k] > 0
        ])
    return result


def scene_accuracy(
    model: ShapesClassifier,
    scenes: list[Scene],
    images=None,
    center_tolerance: float = 0.05,  # largest centroid error, canvas fractions, still "right"
) -> dict[str, float]:
    """How often the classifier reads scenes exactly right: every count, size and center.

    `images` defaults to the clean renderings of `scenes`. Returns the exact-scene accuracy and
    the per-part accuracies (counts right; sizes right and centers within tolerance, per object).
    """
    images = render_batch(scenes, model.config.image_size) if images is None else images
    counts, sizes, centers = predict(model, images)
    t_counts, t_sizes, t_centers = batch_targets(scenes)
    counts_ok = (counts == t_counts).all(dim=1)
    single = t_counts == 1
    size_ok = (sizes == t_sizes) | ~single
    center_ok = ((centers - t_centers).abs().amax(-1) <= center_tolerance) | ~single
    exact = counts_ok & size_ok.all(1) & center_ok.all(1)
    n_single = max(int(single.sum()), 1)
    return {
        "exact_scene": exact.float().mean().item(),
        "counts": counts_ok.float().mean().item(),
        "sizes": ((sizes == t_sizes) & single).sum().item() / n_single,
        "centers": (center_ok & single).sum().item() / n_single,
        "center_mae": ((centers - t_centers).abs().amax(-1)[single]).mean().item(),
    }


def fresh_scenes(seed: int, count: int, split: str, one_object_fraction: float = 0.5) -> list[Scene]:
    """`count` data-set scenes from a seed stream separate from the classifier's training."""
    rng = np.random.default_rng([seed, 2])
    return [sample_scene(rng, one_object_fraction, split) for _ in range(count)]


# -- the asset ----------------------------------------------------------------------------------


def save_shapes_classifier(model: ShapesClassifier, path: str | Path, info: dict) -> Path:
    return save_weights(model, asdict(model.config), info, path)


def read_shapes_classifier(path: str | Path) -> ShapesClassifier:
    """A classifier from a safetensors file written by `save_shapes_classifier`."""
    return read_model(path, ShapesClassifier, ShapesClassifierConfig)


_LOADED: dict[str, ShapesClassifier] = {}


# how the judge differs from the FID's classifier (module docstring)
JUDGE_TRAINING = {"config": ShapesClassifierConfig(occupancy=True), "two_tone_fraction": TWO_TONE_FRACTION}


def load_shapes_classifier(path: str | Path | None = None) -> ShapesClassifier:
    """The FID's feature network: from `path`, else the packaged asset, else retrained and cached."""
    return _load(path, ASSET_NAME, judge=False)


def load_shapes_judge(path: str | Path | None = None) -> ShapesClassifier:
    """The alignment judge: from `path`, else the packaged asset, else retrained and cached."""
    return _load(path, JUDGE_ASSET_NAME, judge=True)


def _load(path: str | Path | None, name: str, judge: bool) -> ShapesClassifier:
    if path is not None:
        return read_shapes_classifier(path)
    found = find_asset(name) or retrain_asset(cache_path(name), judge=judge)
    key = str(found)
    if key not in _LOADED:
        _LOADED[key] = read_shapes_classifier(found)
    return _LOADED[key]


def retrain_asset(path: str | Path, seed: int = 0, steps: int = 1000, verbose: bool = False,
                  judge: bool = False) -> Path:
    """Train the FID's classifier (or the judge) with `seed`, measure its accuracy on fresh scenes
    (another seed) and save it to `path`."""
    start = time.time()
    model = train_shapes_classifier(steps=steps, seed=seed, log_every=100 if verbose else 0,
                                    **(JUDGE_TRAINING if judge else {}))
    seconds = time.time() - start
    info = {"seed": seed, "steps": steps, "train_seconds": round(seconds, 1),
            "torch_threads": torch.get_num_threads()}
    for split in ("train", "heldout"):
        acc = scene_accuracy(model, fresh_scenes(seed + 1000, 1000, split))
        info[f"exact_scene_{split}"] = round(acc["exact_scene"], 4)
    if verbose:
        print(f"trained in {seconds:.0f} s; {info}")
    return save_shapes_classifier(model, path, info)

