"""`ldmkit generate` when things go wrong: killed or interrupted runs, bad input at the process
level, NaN in reduced precision, and seeds that must give the same image every time.

The many in-process bad-input cases (sizes, steps, strength, sampler, missing/empty/unreadable
files, a mask of another size...) are in tests/test_generate_cli.py
(test_bad_input_is_one_line_before_loading); here are the input classes it lacks, and four
representative ones run through a real `python -m ldmkit` process, where the exit code and
stderr are what a shell sees.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import ldmkit.pipelines.load as load_module
from ldmkit.cli import main
from ldmkit.models.unet import UNet
from ldmkit.models.vae import Decoder
from ldmkit.pipelines.output import read_parameters

SIDE = "32"  # pixels: 16x16 latents, about 0.15 s an image on one core
FAST = ["--steps", "2", "--sampler", "euler_a", "--height", SIDE, "--width", SIDE, "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def argv(model, out, *extra) -> list[str]:
    return ["generate", "a red square", "--model", str(model), "--out", str(out), *FAST, *extra]


def ldmkit_process(args: list[str], **kwargs):
    return subprocess.Popen([sys.executable, "-m", "ldmkit", *args], env=ENV, **kwargs)


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def write_image(path, width: int, height: int, mode: str = "RGB") -> str:
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return str(path)


def assert_complete_png(path, seed: int) -> None:
    """`path` is a whole, decodable PNG of the run that wrote it (its parameters name `seed`)."""
    with Image.open(path) as image:
        image.verify()  # checksums of every chunk
    with Image.open(path) as image:
        image.load()  # and every pixel decodes
        assert image.size == (int(SIDE), int(SIDE))
    assert read_parameters(path)["seed"] == seed


# -- (a) kill -9 and Ctrl-C in the middle of a run --------------------------------------------------


@pytest.mark.slow
def test_kill_9_and_ctrl_c_at_random_moments_leave_only_complete_pngs(tiny_diffusers, tmp_path):
    """Start a 500-image run, wait for its first PNG, then SIGKILL or SIGINT it a random moment
    later (often mid-batch, sometimes mid-save). Every .png in the folder is complete and belongs
    to its run; the only other files are save_png's hidden `.NAME.png.XXXX.tmp` temporaries that a
    SIGKILL can strand (never a .png suffix, so never mistaken for an image); Ctrl-C cleans its own
    temporary up and exits 130 with one line and no traceback."""
    out_dir, rng = tmp_path / "out", random.Random(0)
    runs = {}  # stem -> seed of its first image
    for attempt, sig in enumerate((signal.SIGKILL, signal.SIGINT, signal.SIGKILL)):
        stem, seed = f"run{attempt}", 100 * attempt
        runs[stem] = seed
        log_out, log_err = tmp_path / f"{stem}.out", tmp_path / f"{stem}.err"
        with open(log_out, "w") as stdout, open(log_err, "w") as stderr:  # files: tqdm fills a pipe
            proc = ldmkit_process(argv(tiny_diffusers, out_dir / f"{stem}.png", "--num-images", "500",
                                       "--batch-size", "1", "--seed", str(seed), "--precision", "fp32"),
                                  stdout=stdout, stderr=stderr)
            try:
                deadline = time.time() + 120
                while not (out_dir / f"{stem}-0.png").exists() and proc.poll() is None and time.time() < deadline:
                    time.sleep(0.02)
                time.sleep(rng.uniform(0, 0.5))
                assert proc.poll() is None, f"{stem} ended before the signal:\n{log_err.read_text()[-2000:]}"
                proc.send_signal(sig)
                code = proc.wait(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL
        else:
            err = log_err.read_text()
            assert code == 130, err[-2000:]
            assert "Traceback" not in err
            lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and not line.startswith("generating")]
            assert lines == ["ldmkit: interrupted"], err[-2000:]  # besides the progress bar
            assert not list(out_dir.glob(f".{stem}-*.tmp")), "Ctrl-C left a temporary file"

    for stem, seed in runs.items():
        written = sorted(int(p.stem.rsplit("-", 1)[1]) for p in out_dir.glob(f"{stem}-*.png"))
        assert written == list(range(len(written))) and written, stem  # images 0..m-1, in order
        for k in written:
            assert_complete_png(out_dir / f"{stem}-{k}.png", seed + k)
    for path in out_dir.iterdir():
        if path.suffix == ".png":
            assert re.fullmatch(r"run\d-\d+\.png", path.name), path.name
        else:  # a temporary stranded by SIGKILL: hidden and not a .png
            assert re.fullmatch(r"\.run\d-\d+\.png\.\w+\.tmp", path.name), path.name


# -- (b) bad input ----------------------------------------------------------------------------------

PROCESS_CASES = {  # one per class, through a real process
    "size not a multiple of 8": ["--height", "30"],
    "no steps": ["--steps", "0"],
    "unknown sampler (argparse)": ["--sampler", "magic"],
    "mask of another size": ["--init-image", "{img}", "--mask", "{small}"],
}
IN_PROCESS_CASES = {  # the classes tests/test_generate_cli.py does not have
    "empty mask": ["--init-image", "{img}", "--mask", "{empty}"],
    "truncated init image": ["--init-image", "{truncated}"],
    "init image is a folder": ["--init-image", "{folder}"],
    "nan strength": ["--init-image", "{img}", "--strength", "nan"],
    "infinite eta": ["--sampler", "ddim", "--eta", "inf"],
    "huge seed": ["--seed", str(2**63)],
    "mask of another size with explicit output size": ["--init-image", "{img}", "--mask", "{small}",
                                                        "--width", "32", "--height", "32"],
}


def input_files(tmp_path) -> dict[str, str]:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "empty.png").write_bytes(b"")
    whole = (inputs / "whole.png")
    write_image(whole, 32, 32)
    (inputs / "truncated.png").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    (inputs / "folder.png").mkdir()
    return {"img": str(whole), "small": write_image(inputs / "small.png", 16, 16, "L"),
            "empty": str(inputs / "empty.png"), "truncated": str(inputs / "truncated.png"),
            "folder": str(inputs / "folder.png")}


@pytest.mark.parametrize("case", PROCESS_CASES)
def test_bad_input_through_a_real_process_is_one_line_and_exit_2(case, tiny_diffusers, tmp_path):
    files = input_files(tmp_path)
    extra = [a.format(**files) for a in PROCESS_CASES[case]]
    proc = ldmkit_process(argv(tiny_diffusers, tmp_path / "out" / "x.png", *extra),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    assert stderr.startswith("ldmkit: error: ") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr and stdout == ""
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", IN_PROCESS_CASES)
def test_more_bad_input_is_one_line_before_loading(case, tiny_diffusers, tmp_path, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(load_module, "load_pipeline_components", no_loading)
    files = input_files(tmp_path)
    extra = [a.format(**files) for a in IN_PROCESS_CASES[case]]
    assert main(argv(tiny_diffusers, tmp_path / "out" / "x.png", *extra)) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("ldmkit: error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert not (tmp_path / "out").exists()


# -- (c) reduced precision never silently gives NaN or black images ----------------------------------


def test_nan_after_the_float32_retry_is_one_line_exit_2_and_no_file(tiny_diffusers, tmp_path, capsys, monkeypatch):
    """A bf16 decode that overflows is retried in float32 (tests/test_generate_cli.py shows the
    retry succeeding); when the float32 decode is NaN too, the run stops: exit 2, one line, and
    no PNG at all (a NaN image would be saved as black)."""
    decoded_in = []
    original = Decoder.forward

    def nan_forward(self, z):
        out = original(self, z)
        decoded_in.append(out.dtype)
        return out * float("nan")

    monkeypatch.setattr(Decoder, "forward", nan_forward)
    out = tmp_path / "out" / "nan.png"
    assert main(argv(tiny_diffusers, out, "--precision", "bf16", "--steps", "1", "--num-images", "2")) == 2
    assert decoded_in[0] == torch.bfloat16 and torch.float32 in decoded_in  # bf16, then the fp32 retry
    err = capsys.readouterr().err
    errors = [line for line in re.split(r"[\r\n]", err) if line.startswith("ldmkit")]
    assert errors == [errors[0]] and "NaN" in errors[0] and "decoded images" in errors[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_nan_latents_from_the_unet_are_one_line_exit_2_and_no_file(tiny_diffusers, tmp_path, capsys, monkeypatch):
    original = UNet.forward
    monkeypatch.setattr(UNet, "forward", lambda self, *a, **k: original(self, *a, **k) * float("nan"))
    assert main(argv(tiny_diffusers, tmp_path / "out" / "nan.png", "--precision", "bf16", "--steps", "1")) == 2
    err = capsys.readouterr().err
    errors = [line for line in re.split(r"[\r\n]", err) if line.startswith("ldmkit")]
    assert len(errors) == 1 and "NaN" in errors[0] and "latents" in errors[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "nan.png").exists()


# -- (d) same seed, same image -----------------------------------------------------------------------


def test_same_seed_gives_identical_pixels_in_separate_runs(tiny_diffusers, tmp_path):
    """One run in a fresh process, one in this process after disturbing every global RNG: the
    image comes only from the seed."""
    seed_args = ["--seed", "1234", "--cfg-scale", "5", "--precision", "fp32"]
    proc = ldmkit_process(argv(tiny_diffusers, tmp_path / "a.png", *seed_args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    assert main(argv(tiny_diffusers, tmp_path / "b.png", *seed_args)) == 0
    a, b = pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png")
    assert a.tobytes() == b.tobytes()
    assert read_parameters(tmp_path / "a.png") == read_parameters(tmp_path / "b.png")
    assert a.std() > 0  # a real image, not a constant one


def test_batch_equals_single_runs_with_consecutive_seeds(tiny_diffusers, tmp_path):
    seed = 42
    common = ["--cfg-scale", "5", "--precision", "fp32"]
    assert main(argv(tiny_diffusers, tmp_path / "batch.png", "--seed", str(seed), "--num-images", "3",
                     "--batch-size", "3", *common)) == 0
    for k in range(3):
        assert main(argv(tiny_diffusers, tmp_path / f"single{k}.png", "--seed", str(seed + k), *common)) == 0
        batch, single = pixels(tmp_path / f"batch-{k}.png"), pixels(tmp_path / f"single{k}.png")
        assert np.abs(batch.astype(np.int16) - single).max() <= 1, k  # within 1/255
        assert read_parameters(tmp_path / f"batch-{k}.png")["seed"] == seed + k
    assert not np.array_equal(pixels(tmp_path / "batch-0.png"), pixels(tmp_path / "batch-1.png"))
