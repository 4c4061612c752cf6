"""Training faults: kill -9 at random moments, a full disk, divergence, missing or corrupt
checkpoints. Each test fails without the protection it names."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ldmkit.training import trainer as trainer_module
from ldmkit.training.trainer import Trainer, TrainingError, checkpoint_paths, load_checkpoint
from test_training import config, run, weights_equal
from training_worker import tiny_stage

WORKER = Path(__file__).resolve().parent.parent / "training_worker.py"


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(TrainingError, match="no checkpoint"):
        Trainer(tiny_stage(), config(), tmp_path, progress=False).resume()


def test_resume_from_a_corrupt_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    run(tmp_path, steps=2, checkpoint_every=2)
    path = checkpoint_paths(tmp_path / "checkpoints")[-1]
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(TrainingError, match="unreadable"):
        Trainer(tiny_stage(), config(), tmp_path, progress=False).resume()


def test_full_disk_keeps_the_previous_checkpoint_and_stops_clearly(tmp_path, monkeypatch):
    run(tmp_path, steps=2, checkpoint_every=2)
    good = checkpoint_paths(tmp_path / "checkpoints")
    before = good[-1].read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer_module.torch, "save", disk_full)
    with pytest.raises(TrainingError, match="No space left on device.*previous checkpoint is kept"):
        run(tmp_path, resume=True, steps=4, checkpoint_every=2)
    monkeypatch.undo()
    assert checkpoint_paths(tmp_path / "checkpoints") == good
    assert good[-1].read_bytes() == before
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))
    assert load_checkpoint(good[-1])["step"] == 2


def test_divergence_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    run(tmp_path, steps=2, checkpoint_every=2)
    stage = tiny_stage()
    loss = stage.loss
    stage.loss = lambda model, batch, rand: (loss(model, batch, rand)[0] * float("nan"), {})
    trainer = Trainer(stage, config(steps=4, checkpoint_every=1), tmp_path, progress=False)
    trainer.resume()
    with pytest.raises(TrainingError, match="diverged at step 3"):
        trainer.train()
    paths = checkpoint_paths(tmp_path / "checkpoints")
    assert [p.name for p in paths] == ["step-00000002.pt"]
    state = load_checkpoint(paths[-1])
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def _newest_step(run_dir: Path) -> int:
    paths = checkpoint_paths(run_dir / "checkpoints")
    return int(paths[-1].name[5:13]) if paths else -1


@pytest.mark.slow
def test_kill_9_at_random_moments_never_loses_finished_work(tmp_path):
    """Kill a checkpoint-every-step run at random moments, resume each time; the final loss curve
    equals an uninterrupted run's, and no partial file survives a restart."""
    steps, env = 12, {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "ref"), str(steps)], env=env,
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]
    run_dir, rng = tmp_path / "killed", random.Random(0)
    for attempt in range(3):
        cmd = [sys.executable, str(WORKER), str(run_dir), str(steps), "--checkpoint-every", "1", "--slow", "0.15"]
        if checkpoint_paths(run_dir / "checkpoints"):
            cmd.append("--resume")
        before = _newest_step(run_dir)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while _newest_step(run_dir) == before and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)  # wait for this attempt's first new checkpoint
        time.sleep(rng.uniform(0, 0.5))  # then kill at a random moment, possibly mid-save
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        newest = checkpoint_paths(run_dir / "checkpoints")
        assert newest, "no checkpoint survived the kill"
        load_checkpoint(newest[-1])  # the newest complete one always loads
    finish = subprocess.run([sys.executable, str(WORKER), str(run_dir), str(steps), "--checkpoint-every", "1",
                             "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert finish.returncode == 0, finish.stderr[-2000:]
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))
    final = torch.load(run_dir / "final.pt", weights_only=True)
    ref = torch.load(tmp_path / "ref" / "final.pt", weights_only=True)
    assert torch.equal(final["history"], ref["history"])
    assert weights_equal(final["model"], ref["model"])
