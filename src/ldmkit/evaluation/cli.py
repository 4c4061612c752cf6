"""`ldmkit eval`: score a shapes text-to-image model, or retrain an evaluation classifier.

    ldmkit eval shapes [--model PATH] [--prompts heldout|train|both | --prompts-file FILE]
                       [--num-per-prompt K] [--steps 25] [--sampler dpmpp_2m] [--cfg-scale S]
                       [--cfg-rescale R] [--seed 0] [--out FILE] [--grid FILE] [--save-images DIR]
    ldmkit eval classifier {shapes,shapes-judge,digits} [--seed 0] [--steps N] [--out FILE]

An independent checker brings its own prompts (`--prompts-file`, one shapes caption per line)
and judges the very images this evaluator judged (`--save-images`: one PNG per image, its
prompt and seed embedded; the report's verdicts name the files).

Registered by ldmkit.cli like its other subcommands (`add_eval(subparsers)`, `run_eval(args)`);
``python -m ldmkit.evaluation.cli shapes ...`` runs the same commands without the `eval` word.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from ..errors import InvalidArgument

PROMPT_CHOICES = ("heldout", "train", "both")


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a shapes model (alignment, FID) or retrain a classifier")
    evsub = p.add_subparsers(dest="eval_command", required=True)
    _add_shapes(evsub)
    _add_classifier(evsub)


def _add_shapes(evsub) -> None:
    from ..diffusion.sampling import SAMPLERS
    from ..pipelines.load import DEVICES, PRECISIONS

    p = evsub.add_parser("shapes", help="generate images for evaluation prompts and score them",
                         description="Generate --num-per-prompt images per evaluation prompt, judge each "
                         "with the shapes attribute classifier and measure FID in its feature space. "
                         "Prints a summary and writes the full report (per-image verdicts too) as JSON.")
    p.add_argument("--model", help="diffusers folder or single file (default: the bundled shapes model)")
    p.add_argument("--prompts", choices=PROMPT_CHOICES, default="heldout",
                   help="held-out captions (the main number), a sample of training captions, or both")
    p.add_argument("--prompts-file", type=Path,
                   help="evaluate these prompts instead: one shapes caption per line "
                   "(blank lines and #-comments skipped)")
    p.add_argument("--num-per-prompt", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    p.add_argument("--sampler", choices=SAMPLERS, default="dpmpp_2m")
    p.add_argument("--cfg-scale", type=float,
                   help="classifier-free guidance scale (default: what the model recommends in its "
                   "generation.json, 5 for the bundled model; else 7.5)")
    p.add_argument("--cfg-rescale", type=float, default=0.0, help="guidance rescale, 0..1 (default 0)")
    p.add_argument("--seed", type=int, default=0, help="image k uses seed SEED+k (default 0)")
    p.add_argument("--batch-size", type=int, default=32, help="images per pipeline call (default 32)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--classifier", type=Path, help="the alignment judge's weights (default: the packaged asset)")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    p.add_argument("--grid", type=Path, help="also write the generated images on one PNG sheet")
    p.add_argument("--save-images", type=Path, metavar="DIR",
                   help="also write every generated image as DIR/<set>-<index>.png, prompt and seed embedded")
    p.set_defaults(func=run_eval)


def _add_classifier(evsub) -> None:
    p = evsub.add_parser("classifier", help="retrain an evaluation classifier (seeded, reproducible)")
    p.add_argument("which", choices=("shapes", "shapes-judge", "digits"),
                   help="the shapes FID's classifier, the shapes alignment judge, or the digits classifier")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="training steps (default: the packaged asset's)")
    p.add_argument("--out", type=Path, help="weights file (default: the packaged asset)")
    p.set_defaults(func=run_eval)


def run_eval(args) -> int:
    if args.eval_command == "classifier":
        return _run_classifier(args)
    return _run_shapes(args)


def _run_classifier(args) -> int:
    import torch

    from . import digits_classifier, shapes_classifier
    from .common import cache_path

    module = digits_classifier if args.which == "digits" else shapes_classifier
    judge = args.which == "shapes-judge"
    if args.steps is not None and args.steps < 1:
        raise InvalidArgument(f"--steps must be >= 1, got {args.steps}")
    torch.set_num_threads(1)  # the recorded training time is for one thread, and it is reproducible
    kwargs = ({} if args.steps is None else {"steps": args.steps}) | ({"judge": True} if judge else {})
    name = module.JUDGE_ASSET_NAME if judge else module.ASSET_NAME
    path = module.retrain_asset(args.out or cache_path(name), args.seed, verbose=True, **kwargs)
    print(f"wrote {path}")
    return 0


def _check_shapes_args(args) -> None:
    problems = (
        (args.num_per_prompt < 1, f"--num-per-prompt must be >= 1, got {args.num_per_prompt}"),
        (args.steps < 1, f"--steps must be >= 1, got {args.steps}"),
        (args.batch_size < 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.seed < 0, f"--seed must be >= 0, got {args.seed}"),
        (args.cfg_scale is not None and not (math.isfinite(args.cfg_scale) and args.cfg_scale >= 0),
         f"--cfg-scale must be >= 0, got {args.cfg_scale}"),
        (not 0 <= args.cfg_rescale <= 1, f"--cfg-rescale must be between 0 and 1, got {args.cfg_rescale}"),
        (args.out is not None and args.out.suffix.lower() != ".json", f"--out must be a .json path, got {args.out}"),
        (args.grid is not None and args.grid.suffix.lower() != ".png", f"--grid must be a .png path, got {args.grid}"),
    )
    for bad, message in problems:
        if bad:
            raise InvalidArgument(message)


def read_prompts_file(path: Path) -> list[str]:
    """The shapes captions in `path`, one per line; each must parse (`parse_caption`)."""
    from ..data.shapes import parse_caption

    if not path.is_file():
        raise InvalidArgument(f"--prompts-file {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InvalidArgument(f"--prompts-file {path}: not UTF-8 text") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise InvalidArgument(f"--prompts-file {path}: no prompts in it")
    for number, prompt in enumerate(prompts, 1):
        try:
            parse_caption(prompt)
        except InvalidArgument as e:
            raise InvalidArgument(f"--prompts-file {path}, prompt {number}: {e}") from None
    return prompts


def _save_images(folder: Path, name: str, images: list, report: dict) -> None:
    """One PNG per judged image, its verdict pointing at the file."""
    from ..pipelines.output import save_png

    settings = report["settings"]
    for index, (image, verdict) in enumerate(zip(images, report["judgements"])):
        path = save_png(image, folder / f"{name}-{index:05d}.png",
                        {"prompt": verdict["prompt"], "seed": settings["seed"] + index,  # image k: seed + k
                         "steps": settings["steps"], "sampler": settings["sampler"],
                         "cfg_scale": settings["cfg_scale"], "cfg_rescale": settings["cfg_rescale"]})
        verdict["file"] = path.name


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _print_summary(name: str, report: dict) -> None:
    a = report["alignment"]
    print(f"[{name}] {report['settings']['prompts']} prompts x {report['settings']['num_per_prompt']}: "
          f"one-object {_fmt(a['one_object']['correct'])} ({a['one_object']['images']} images), "
          f"two-object {_fmt(a['two_object']['correct'])} ({a['two_object']['images']} images), "
          f"FID {report['fid']:.2f}")
    attrs = a["all"]["attributes"]
    print(f"[{name}] per attribute: " + ", ".join(f"{k} {_fmt(v)}" for k, v in attrs.items())
          + f"; relation where both objects are right {_fmt(a['two_object']['relation_where_objects_right'])}")
    check = report["geometry_check"]
    g, agree = check["alignment"], check["agreement"]
    print(f"[{name}] rule-based judge: one-object {_fmt(g['one_object']['correct'])}, two-object "
          f"{_fmt(g['two_object']['correct'])}; agrees with the classifier on {_fmt(agree['all'])} of images")


def _run_shapes(args) -> int:
    from tqdm import tqdm

    from ..data import make_grid
    from ..pipelines.load import load_pipeline, resolve_device, resolve_model_path, resolve_precision
    from .alignment import evaluation_prompts
    from .evaluate import evaluate_shapes_model
    from .shapes_classifier import load_shapes_judge

    _check_shapes_args(args)
    model_path = resolve_model_path(args.model)
    resolve_precision(args.precision, resolve_device(args.device))
    if args.prompts_file is not None:  # read (and checked) before any model is loaded
        prompt_sets = {"file": read_prompts_file(args.prompts_file)}
    else:
        sets = ("heldout", "train") if args.prompts == "both" else (args.prompts,)
        prompt_sets = {name: evaluation_prompts(name) for name in sets}
    judge = load_shapes_judge(args.classifier)
    pipe = load_pipeline(model_path, args.precision, args.device)
    if args.cfg_scale is None:
        args.cfg_scale = pipe.default_cfg_scale
    reports, grids = {}, []
    for name, prompts in prompt_sets.items():
        bar = tqdm(total=len(prompts) * args.num_per_prompt, desc=f"generating ({name})", unit="image")
        report = evaluate_shapes_model(
            pipe, prompts, args.num_per_prompt, args.steps, args.sampler, args.cfg_scale, args.seed,
            args.batch_size, judge, progress=lambda done, total: bar.update(done - bar.n),
            keep_images=args.grid is not None or args.save_images is not None, cfg_rescale=args.cfg_rescale)
        bar.close()
        images = report.pop("images", [])
        if args.save_images is not None:
            _save_images(args.save_images, name, images, report)
        grids += images
        report["settings"]["model"] = str(model_path)
        reports[name] = report
        _print_summary(name, report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(reports, indent=2))
        print(f"wrote {args.out}")
    if args.grid:
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        make_grid(grids, nrow=max(args.num_per_prompt, 8)).save(args.grid)
        print(f"wrote {args.grid}")
    sys.stdout.flush()
    return 0


def main(argv=None) -> int:
    """`python -m ldmkit.evaluation.cli ...`: the eval subcommands on their own."""
    import argparse

    from ..errors import LdmkitError

    parser = argparse.ArgumentParser(prog="python -m ldmkit.evaluation.cli")
    add_eval(_Single(parser))
    args = parser.parse_args(argv)
    try:
        return run_eval(args)
    except LdmkitError as e:
        print(f"ldmkit: error: {e}", file=sys.stderr)
        return 2


class _Single:
    """Lets add_eval register its subcommands directly on a parser, without the `eval` level."""

    def __init__(self, parser) -> None:
        self.parser = parser

    def add_parser(self, name, **kwargs):
        return self.parser


if __name__ == "__main__":
    sys.exit(main())
