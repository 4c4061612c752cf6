"""The `ldmkit` command line. One function pair per subcommand (`add_X(subparsers)` registers
the arguments, `run_X(args) -> int` does the work); add a subcommand by writing a pair and
listing it in SUBCOMMANDS. User mistakes (LdmkitError) become one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import InvalidArgument, LdmkitError

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


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

    dst = Path(args.dst)
    if dst.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise InvalidArgument(f"{dst}: writing pickled {dst.suffix} files is not supported; use .safetensors")
    components = _load(args, args.dtype)
    if dst.suffix == ".safetensors":
        save_single_file(components, dst)
    else:
        save_diffusers(components, dst)
    print(f"wrote {dst} ({components.architecture}, {components.prediction_type})")
    return 0


SUBCOMMANDS = (add_info, add_convert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldmkit", description="latent diffusion toolkit")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 for user mistakes, with one line on stderr)."""
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


if __name__ == "__main__":
    sys.exit(main())
