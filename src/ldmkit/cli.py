"""The `ldmkit` command line. One function pair per subcommand (`add_X(subparsers)` registers
the arguments, `run_X(args) -> int` does the work); add a subcommand by writing a pair and
listing it in SUBCOMMANDS. User mistakes (LdmkitError) become one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from .errors import GenerationError, InvalidArgument, LdmkitError
from .evaluation.cli import add_eval
from .training.cli import add_train

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors read like every other user mistake: one line, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"ldmkit: error: {message}\n")


def _add_load_options(p: argparse.ArgumentParser) -> None:
    """Flags that override what is detected in a checkpoint."""
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction", "sample"),
                   help="override the detected prediction type")
    p.add_argument("--arch", choices=("sd1", "sd2"), help="override the detected architecture")
    p.add_argument("--inpainting", action=argparse.BooleanOptionalAction, default=None,
                   help="require (or forbid) an inpainting U-Net")


def _load(args, dtype: str = "fp32"):
    import torch

    from .checkpoints.loading import load_pipeline_components

    return load_pipeline_components(
        args.path if hasattr(args, "path") else args.src,
        prediction_type=args.prediction_type, arch=args.arch, inpainting=args.inpainting,
        dtype=getattr(torch, DTYPES[dtype]),
    )


# -- info ---------------------------------------------------------------------------------------


def add_info(sub) -> None:
    p = sub.add_parser("info", help="show what a checkpoint (folder or single file) contains")
    p.add_argument("path", help="diffusers folder or .safetensors/.ckpt single file")
    _add_load_options(p)
    p.set_defaults(func=run_info)


def run_info(args) -> int:
    summary = _load(args).describe()
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v:,}" for k, v in value.items())
        print(f"{key}: {value}")
    return 0


# -- convert ------------------------------------------------------------------------------------


def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="diffusers folder <-> single .safetensors file")
    p.add_argument("src", help="diffusers folder or single file to read")
    p.add_argument("dst", help="a .safetensors path writes a single file; any other path a diffusers folder")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="weights dtype to write")
    _add_load_options(p)
    p.set_defaults(func=run_convert)


def run_convert(args) -> int:
    from .checkpoints.loading import save_diffusers, save_single_file
    from .pipelines.load import GENERATION_FILE, recommended_cfg_scale, write_recommended_cfg_scale

    dst = Path(args.dst)
    if dst.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise InvalidArgument(f"{dst}: writing pickled {dst.suffix} files is not supported; use .safetensors")
    components = _load(args, args.dtype)
    if dst.suffix == ".safetensors":
        save_single_file(components, dst)
    else:
        save_diffusers(components, dst)
        src = Path(args.src)
        if (src / GENERATION_FILE).is_file():  # a folder's recommended settings go with its weights
            write_recommended_cfg_scale(dst, recommended_cfg_scale(src))
    print(f"wrote {dst} ({components.architecture}, {components.prediction_type})")
    return 0


# -- generate -----------------------------------------------------------------------------------

GENERATE_HELP = """Write PNG images for PROMPT, each with its generation parameters embedded (prompt,
sampler, steps, cfg, seed, size, model path and hash...), so any image can be made again. Image k
of a run uses seed SEED+k with a generator of its own: it equals a single run with --seed SEED+k,
whatever --batch-size. --init-image turns on img2img, --init-image with --mask inpainting."""
MAX_SIDE = 4096  # pixels; larger sides are almost certainly typos (and would not fit in memory)
MAX_STEPS = 1000  # the training schedules have 1000 timesteps
ETA_SAMPLERS = ("ddim", "ddpm", "euler_a")  # the samplers that take eta
IMG2IMG_STRENGTH, INPAINT_STRENGTH = 0.8, 1.0  # default --strength with --init-image, with --mask


def add_generate(sub) -> None:
    from .diffusion.sampling import SAMPLERS
    from .pipelines.load import DEVICES, PRECISIONS

    p = sub.add_parser("generate", help="text-to-image, img2img (--init-image), inpainting (--mask)",
                       description=GENERATE_HELP)
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--model", help="diffusers folder or single file (default: the bundled shapes model)")
    p.add_argument("--negative-prompt", default="", help="what to steer away from")
    p.add_argument("--sampler", choices=SAMPLERS, default="dpmpp_2m")
    p.add_argument("--karras", action="store_true", help="Karras sigmas (lms, euler, euler_a, heun, dpmpp_2m)")
    p.add_argument("--steps", type=int, default=25, help=f"sampling steps, 1..{MAX_STEPS} (default 25)")
    p.add_argument("--cfg-scale", type=float,
                   help="classifier-free guidance scale (default: what the model recommends in its "
                   "generation.json, 5 for the bundled model; else 7.5)")
    p.add_argument("--cfg-rescale", type=float, default=0.0,
                   help="guidance rescale, 0..1 (Lin et al. 2024; 0.7 for zero-terminal-SNR models; default 0)")
    p.add_argument("--eta", type=float, help="noise of ddim (default 0), ddpm and euler_a (default 1)")
    p.add_argument("--seed", type=int, help="seed of the first image; image k uses SEED+k (default: random, printed)")
    p.add_argument("--height", type=int, help="pixels (default: the model's training size, or the init image's)")
    p.add_argument("--width", type=int, help="pixels (default: the model's training size, or the init image's)")
    p.add_argument("--num-images", type=int, default=1, help="images to make (default 1)")
    p.add_argument("--batch-size", type=int, help="images per batch (default: as many as fit in memory)")
    p.add_argument("--init-image", type=Path, help="start from this image (img2img)")
    p.add_argument("--strength", type=float, help=f"how far to move from the init image, 0..1 "
                   f"(default {IMG2IMG_STRENGTH}; {INPAINT_STRENGTH} with --mask)")
    p.add_argument("--mask", type=Path, help="inpaint the white part of this mask (same size as --init-image)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--out", type=Path, help="PNG path (default outputs/<timestamp>.png); several images "
                   "are written as STEM-0.png, STEM-1.png, ...")
    p.add_argument("--grid", action="store_true", help="also write all images on one sheet, STEM-grid.png")
    _add_load_options(p)
    p.set_defaults(func=run_generate)


def _check_side(flag: str, value: int | None) -> None:
    if value is not None and not (8 <= value <= MAX_SIDE and value % 8 == 0):
        raise InvalidArgument(f"{flag} must be a multiple of 8 between 8 and {MAX_SIDE}, got {value}")


def _check_generate_args(args) -> None:
    """Every check that needs no model, so mistakes are reported before anything heavy runs."""
    from .diffusion.sampling import KARRAS_SAMPLERS

    finite = lambda x: x is not None and math.isfinite(x)  # noqa: E731
    problems = (
        (not 1 <= args.steps <= MAX_STEPS, f"--steps must be between 1 and {MAX_STEPS}, got {args.steps}"),
        (args.cfg_scale is not None and not (finite(args.cfg_scale) and args.cfg_scale >= 0),
         f"--cfg-scale must be >= 0, got {args.cfg_scale}"),
        (not 0 <= args.cfg_rescale <= 1, f"--cfg-rescale must be between 0 and 1, got {args.cfg_rescale}"),
        (args.num_images < 1, f"--num-images must be >= 1, got {args.num_images}"),
        (args.batch_size is not None and args.batch_size < 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.seed is not None and not 0 <= args.seed <= 2**63 - 1 - args.num_images,
         f"--seed must be between 0 and 2^63 - 1 - num_images, got {args.seed}"),
        (args.eta is not None and not (finite(args.eta) and args.eta >= 0), f"--eta must be >= 0, got {args.eta}"),
        (args.eta is not None and args.sampler not in ETA_SAMPLERS,
         f"--eta applies to {', '.join(ETA_SAMPLERS)}, not {args.sampler}"),
        (args.karras and args.sampler not in KARRAS_SAMPLERS,
         f"--karras works with {', '.join(KARRAS_SAMPLERS)}, not {args.sampler}"),
        (args.strength is not None and not 0 <= args.strength <= 1, f"--strength must be in [0, 1], got {args.strength}"),
        (args.strength is not None and args.init_image is None, "--strength needs --init-image"),
        (args.mask is not None and args.init_image is None, "--mask needs --init-image"),
        (args.out is not None and args.out.suffix.lower() != ".png", f"--out must be a .png path, got {args.out}"),
    )
    for bad, message in problems:
        if bad:
            raise InvalidArgument(message)
    _check_side("--height", args.height)
    _check_side("--width", args.width)


def _open_image(path: Path, flag: str, mode: str):
    """The image at `path` in `mode` ("RGB", "L"), read now, so a broken file fails before the
    model loads (and palette or alpha images resize like any other)."""
    from PIL import Image

    if not path.is_file():
        raise InvalidArgument(f"{flag} {path}: no such file")
    if path.stat().st_size == 0:
        raise InvalidArgument(f"{flag} {path}: empty file")
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidArgument(f"{flag} {path}: not a readable image ({e})") from None


def _check_images(args, init, mask) -> None:
    if mask is not None and mask.size != init.size:
        raise InvalidArgument(f"--mask is {mask.width}x{mask.height} but --init-image is {init.width}x{init.height}")
    if init is not None and (args.width is None or args.height is None):
        if not (8 <= min(init.size) and max(init.size) <= MAX_SIDE):
            raise InvalidArgument(f"--init-image is {init.width}x{init.height}; sides must be between 8 and "
                                  f"{MAX_SIDE} (or pass --width and --height to resize it)")


@dataclass
class _Job:
    """One generate run, fully decided before the first step."""

    height: int
    width: int
    init: object  # PIL image (resized to width x height) or None
    mask: object  # PIL image or None
    strength: float | None  # None for txt2img
    steps: int  # sampler steps each batch runs (fewer than --steps when strength < 1)
    seed: int  # image k uses seed + k
    batch: int  # images per pipeline call
    out: Path  # --out: the PNG path, or the pattern of several (STEM-k.png)
    paths: list[Path]  # one PNG per image
    parameters: dict  # embedded in every PNG (with that image's seed)

    @property
    def grid_path(self) -> Path:
        return self.out.with_name(f"{self.out.stem}-grid{self.out.suffix}")


def _output_size(args, pipe, init) -> tuple[int, int]:
    """(height, width): the flags, else the init image's size cut to the model's multiple, else
    the model's training size."""
    if init is not None:
        m = pipe.multiple
        default_h, default_w = init.height // m * m, init.width // m * m
    else:
        default_h = default_w = pipe.default_size
    return args.height or default_h, args.width or default_w


def _output_paths(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(count)]


def _plan_job(args, pipe, init, mask, model_path: Path) -> _Job:
    from PIL import Image

    from . import __version__
    from .pipelines.load import model_hash, precision_name
    from .pipelines.memory import auto_batch_size

    if pipe.is_inpainting_model and mask is None:
        raise InvalidArgument(f"{model_path} is an inpainting model: pass --init-image and --mask")
    height, width = _output_size(args, pipe, init)
    if init is not None and init.size != (width, height):
        init = init.resize((width, height), resample=Image.LANCZOS)  # the pipeline resizes the mask to match
    strength = None
    if init is not None:
        default = INPAINT_STRENGTH if mask is not None else IMG2IMG_STRENGTH
        strength = default if args.strength is None else args.strength
    steps = pipe.plan(args.sampler, args.steps, args.karras, 1.0 if strength is None else strength).steps
    parameters = {
        "prompt": args.prompt, "negative_prompt": args.negative_prompt, "sampler": args.sampler,
        "karras": args.karras, "steps": args.steps, "cfg_scale": args.cfg_scale,
        "cfg_rescale": args.cfg_rescale, "eta": args.eta,
        "height": height, "width": width, "strength": strength,
        "init_image": None if init is None else str(args.init_image),
        "mask": None if mask is None else str(args.mask),
        "model": str(model_path), "model_hash": model_hash(model_path),
        "prediction_type": pipe.schedule.prediction_type,
        "precision": precision_name(next(pipe.unet.parameters()).dtype), "device": pipe.device.type,
        "ldmkit_version": __version__,
    }
    seed = random.randrange(2**32) if args.seed is None else args.seed
    batch = args.batch_size or auto_batch_size(pipe, height, width, args.num_images)
    out = args.out or Path("outputs") / f"{time.strftime('%Y%m%d-%H%M%S')}.png"
    paths = _output_paths(out, args.num_images)
    return _Job(height, width, init, mask, strength, steps, seed, batch, out, paths, parameters)


def _generate_batch(pipe, args, job: _Job, generators: list, callback) -> list:
    """PIL images for one pipeline call: one image per generator."""
    common = dict(negative_prompt=args.negative_prompt, sampler=args.sampler, steps=args.steps,
                  cfg_scale=args.cfg_scale, cfg_rescale=args.cfg_rescale, eta=args.eta, karras=args.karras,
                  num_images=len(generators),
                  seed=generators, callback=callback)
    if job.mask is not None:
        return pipe.inpaint(args.prompt, job.init, job.mask, strength=job.strength, **common)
    if job.init is not None:
        return pipe.img2img(args.prompt, job.init, job.strength, **common)
    return pipe.txt2img(args.prompt, height=job.height, width=job.width, **common)


@contextlib.contextmanager
def _interrupt_kept():
    """Ctrl-C raises KeyboardInterrupt as usual and is also remembered, and the block gets a
    `check()` that raises it again: Python drops a KeyboardInterrupt that lands in a finalizer
    (`__del__`, a weakref callback), and then a Ctrl-C would be lost and the run go on."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread has signals
        yield lambda: None
        return
    caught = []

    def on_sigint(signum, frame):
        caught.append(signum)
        raise KeyboardInterrupt

    def check() -> None:
        if caught:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, previous)


def _run_job(pipe, args, job: _Job) -> list:
    """Generate in batches, writing each PNG as soon as its batch is done; returns the images."""
    import torch
    from tqdm import tqdm

    from .pipelines.output import save_png
    from .pipelines.stable_diffusion import seed_generators

    n = len(job.paths)
    bar = tqdm(total=job.steps * math.ceil(n / job.batch), desc="generating", unit="step")
    images = []
    try:
        with _interrupt_kept() as check_interrupt:
            for start in range(0, n, job.batch):
                generators = seed_generators(job.seed + start, min(job.batch, n - start))
                batch = _generate_batch(pipe, args, job, generators,
                                        callback=lambda i, x: (bar.update(), check_interrupt()))
                for k, image in enumerate(batch, start):
                    save_png(image, job.paths[k], {**job.parameters, "seed": job.seed + k})
                    tqdm.write(f"wrote {job.paths[k]}", file=sys.stdout)
                    check_interrupt()
                images += batch
    except torch.OutOfMemoryError as e:
        raise GenerationError(f"out of memory in batches of {job.batch}; pass a smaller --batch-size ({e})") from None
    finally:
        bar.close()
    return images


def run_generate(args) -> int:
    import torch

    from .data import make_grid
    from .pipelines.load import (cpu_has_native_bf16, load_pipeline, resolve_device, resolve_model_path,
                                 resolve_precision)
    from .pipelines.output import save_png

    # everything that can be checked without the model comes first
    _check_generate_args(args)
    init = _open_image(args.init_image, "--init-image", "RGB") if args.init_image else None
    mask = _open_image(args.mask, "--mask", "L") if args.mask else None
    _check_images(args, init, mask)
    model_path = resolve_model_path(args.model)
    device = resolve_device(args.device)  # CUDA missing is an error here
    dtype = resolve_precision(args.precision, device)  # ... and so is fp16 on the CPU
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_native_bf16():
        print("note: this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 is emulated and several times "
              "slower than fp32 here (--precision auto picks fp32)", file=sys.stderr)

    pipe = load_pipeline(model_path, args.precision, args.device, prediction_type=args.prediction_type,
                         arch=args.arch, inpainting=args.inpainting)
    if args.cfg_scale is None:
        args.cfg_scale = pipe.default_cfg_scale
    job = _plan_job(args, pipe, init, mask, model_path)
    print(f"seed {job.seed}: {len(job.paths)} image(s) of {job.width}x{job.height} in batches of {job.batch}, "
          f"{job.parameters['precision']} on {job.parameters['device']}")
    images = _run_job(pipe, args, job)
    if args.grid:
        grid = make_grid(images, nrow=math.ceil(math.sqrt(len(images))))
        save_png(grid, job.grid_path, {**job.parameters, "seed": job.seed, "num_images": len(images)})
        print(f"wrote {job.grid_path}")
    return 0


SUBCOMMANDS = (add_info, add_convert, add_generate, add_train, add_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ldmkit", description="latent diffusion toolkit")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 for user mistakes, with one line on stderr; 130 for Ctrl-C)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed its usage error
        return int(e.code or 0)
    try:
        return args.func(args)
    except LdmkitError as e:
        message = " ".join(str(e).split("\n"))
        print(f"ldmkit: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: finished files are complete (atomic writes), no traceback
        print("ldmkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
