"""`make demo`: text to image with the bundled shapes model (VAE + CLIP + U-Net trained from
scratch by `ldmkit train shapes-model`), a grid of prompts it never saw as captions and some it
did, sampled with DPM-Solver++(2M) and classifier-free guidance; one PNG with the parameters.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .data import make_grid
from .errors import LdmkitError
from .pipelines.load import load_pipeline, model_hash, resolve_model_path
from .pipelines.output import save_png
from .pipelines.stable_diffusion import seed_generators

PROMPTS = (
    "a red circle",
    "a large blue square",
    "a small yellow triangle",
    "a purple circle",
    "a red circle to the left of a blue square",
    "a green triangle above an orange circle",
    "a yellow square below a purple triangle",
    "a blue circle to the right of a green square",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder or file (default: the bundled shapes model)")
    parser.add_argument("--per-prompt", type=int, default=4, help="images per prompt (one row each)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--cfg-scale", type=float, help="default: what the model recommends (the bundled model: 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/demo.png")
    args = parser.parse_args(argv)
    try:
        start = time.time()
        path = resolve_model_path(args.model)
        pipe = load_pipeline(path)
        if args.cfg_scale is None:
            args.cfg_scale = pipe.default_cfg_scale
        n = args.per_prompt
        prompts = [p for p in PROMPTS for _ in range(n)]
        with torch.inference_mode():
            images = pipe.txt2img(prompts, sampler="dpmpp_2m", karras=True, steps=args.steps, cfg_scale=args.cfg_scale,
                                  height=pipe.default_size, width=pipe.default_size,
                                  seed=seed_generators(args.seed, len(prompts)))
        grid = make_grid(images, nrow=n)
        grid = grid.resize((grid.width * 2, grid.height * 2), resample=0)  # 64 px images are small on screen
        params = {"model": str(path), "model_hash": model_hash(path), "prompts": list(PROMPTS),
                  "layout": f"one row per prompt, {n} seeds per row ({args.seed}..{args.seed + len(prompts) - 1})",
                  "sampler": "dpmpp_2m", "karras": True, "steps": args.steps, "cfg_scale": args.cfg_scale,
                  "seed": args.seed, "size": [pipe.default_size, pipe.default_size]}
        out = save_png(grid, args.out, params)
    except LdmkitError as e:
        print(f"ldmkit: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({len(PROMPTS)} prompts x {n} seeds) in {time.time() - start:.1f} s")
    for i, prompt in enumerate(PROMPTS):
        print(f"  row {i + 1}: {prompt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
