"""`ldmkit train`: the training recipes from the command line.

    ldmkit train shapes-model [--out DIR] [--run-dir DIR] [--resume] [--quick] [--snr-gamma G] [--clip-context K]
                              [--high-noise-fraction F] [--schedule {v-zero-snr,sd}]
    ldmkit train shapes-model --continue-from MODEL [--unet-steps N] [--high-noise-fraction F] [--out DIR]
                              [--run-dir DIR] [--resume]
    ldmkit train digits       [--run-dir DIR] [--steps N] [--batch-size B] [--precision P] [--resume]
    ldmkit train minimal      [--run-dir DIR] [--steps N] [--batch-size B] [--resume]

Every recipe runs data-parallel unchanged under torchrun, e.g.
`torchrun --nproc_per_node 2 -m ldmkit train digits` (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..errors import InvalidArgument

RECIPES = ("shapes-model", "digits", "minimal")
SCHEDULE_NAMES = ("v-zero-snr", "sd")  # shapes_model.SCHEDULES' names (not imported here: it imports torch)


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model from scratch (shapes text-to-image, digits DDPM, minimal)")
    p.add_argument("recipe", choices=RECIPES)
    p.add_argument("--run-dir", type=Path, help="checkpoints, samples and TensorBoard logs (default runs/RECIPE)")
    p.add_argument("--out", type=Path, help="shapes-model: where to write the model folder (default RUN_DIR/model)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in RUN_DIR")
    p.add_argument("--quick", action="store_true", help="shapes-model: a seconds-long smoke run")
    p.add_argument("--continue-from", type=Path, metavar="MODEL",
                   help="shapes-model: train this model's U-Net further (VAE, text encoder, tokenizer kept)")
    p.add_argument("--unet-steps", type=int, help="shapes-model --continue-from: U-Net steps (default 8000)")
    p.add_argument("--snr-gamma", type=float, metavar="G",
                   help="shapes-model: Min-SNR-G weights on the U-Net's loss (default: plain MSE)")
    p.add_argument("--clip-context", type=int, metavar="K",
                   help="shapes-model: in CLIP's word-keeping term each word's state also names the K words "
                        "before it (default 4)")
    p.add_argument("--high-noise-fraction", type=float, metavar="F",
                   help="shapes-model: this fraction of U-Net rows draws its timestep from the noisiest tenth "
                        "(default 0.5; with --continue-from 0.2)")
    p.add_argument("--schedule", choices=SCHEDULE_NAMES,
                   help="shapes-model: the U-Net's target and noise schedule: v on SD's betas rescaled to zero "
                        "terminal SNR (default) or SD 1.x's epsilon")
    p.add_argument("--steps", type=int, help="digits/minimal: optimizer steps")
    p.add_argument("--batch-size", type=int, help="digits/minimal: global batch size")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="autocast precision (default fp32)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_train)


def run_train(args) -> int:
    from .trainer import finish_distributed, init_distributed

    init_distributed()
    status = _train(args)
    finish_distributed()
    return status


def _train(args) -> int:
    from .trainer import TrainConfig, world

    run_dir = args.run_dir or Path("runs") / args.recipe
    if args.recipe == "shapes-model":
        from .shapes_model import SCHEDULES, UNET_CONTINUE_TRAIN, ShapesModelRecipe, continue_unet, train_shapes_model

        if args.snr_gamma is not None and not args.snr_gamma > 0:
            raise InvalidArgument(f"--snr-gamma must be positive, got {args.snr_gamma}")
        if args.high_noise_fraction is not None and not 0 <= args.high_noise_fraction <= 1:
            raise InvalidArgument(f"--high-noise-fraction must be in [0, 1], got {args.high_noise_fraction}")
        if args.clip_context is not None and not args.clip_context > 0:
            raise InvalidArgument(f"--clip-context must be positive, got {args.clip_context}")
        if args.clip_context and args.continue_from is not None:
            raise InvalidArgument("--clip-context trains CLIP, which --continue-from keeps")
        if args.schedule and args.continue_from is not None:
            raise InvalidArgument("--schedule sets the noise schedule, which --continue-from keeps")
        recipe = ShapesModelRecipe(seed=args.seed, snr_gamma=args.snr_gamma)
        if args.continue_from is not None:  # a continuation is a warm restart, as the recipe's refinement
            recipe = replace(recipe, high_noise_fraction=recipe.refine_high_noise_fraction)
        if args.high_noise_fraction is not None:
            recipe = replace(recipe, high_noise_fraction=args.high_noise_fraction)
        if args.schedule:
            recipe = replace(recipe, schedule=SCHEDULES[args.schedule])
        if args.clip_context:
            recipe = replace(recipe, clip_token_loss=1.0, clip_token_context=args.clip_context)
        if args.continue_from is not None:
            train = replace(UNET_CONTINUE_TRAIN, steps=args.unet_steps or UNET_CONTINUE_TRAIN.steps, seed=args.seed)
            if args.quick:
                recipe, train = recipe.quick(), replace(recipe.quick().unet_train, lr=train.lr)
            out = continue_unet(args.continue_from, args.out or run_dir / "model", run_dir, train, recipe,
                                resume=args.resume)
            _say(f"wrote {out}")
            return 0
        out = train_shapes_model(args.out or run_dir / "model", run_dir, recipe.quick() if args.quick else recipe,
                                 resume=args.resume)
        _say(f"wrote {out}")
        return 0
    from .digits_model import DIGITS_TRAIN, train_digits, train_minimal

    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size),
                                   ("precision", args.precision), ("seed", args.seed)) if v is not None}
    if args.recipe == "digits":
        train_digits(run_dir, replace(DIGITS_TRAIN, **overrides), resume=args.resume)
    else:
        config = TrainConfig(steps=1000, batch_size=128, lr=1e-3, warmup_steps=20, ema_decay=None)
        train_minimal(run_dir, replace(config, **overrides), resume=args.resume)
    if world()[0] == 0:
        _say(f"checkpoints and samples in {run_dir}")
    return 0


def _say(message: str) -> None:
    print(message)
