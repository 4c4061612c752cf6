"""The trainer: data order, per-row randomness, learning-rate schedule, exact resume,
accumulation, data parallelism and logging. Faults (kill -9, full disk, divergence) are in
tests/trust/test_training_faults.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldmkit.training.trainer import DataOrder, RowRandom, TrainConfig, Trainer, checkpoint_paths, lr_factor
from training_worker import tiny_stage

WORKER = Path(__file__).with_name("training_worker.py")


def config(**overrides) -> TrainConfig:
    base = dict(steps=6, batch_size=8, lr=1e-2, warmup_steps=2, checkpoint_every=1000)
    return TrainConfig(**{**base, **overrides})


def run(run_dir, resume=False, **overrides) -> Trainer:
    trainer = Trainer(tiny_stage(), config(**overrides), run_dir, progress=False)
    if resume:
        trainer.resume()
    trainer.train()
    return trainer


def weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- building blocks ---------------------------------------------------------------------------


def test_data_order_is_a_permutation_per_epoch_and_resumes():
    order = DataOrder(10, seed=3)
    first = order.next_batch(10)
    assert sorted(first) == list(range(10))
    order.next_batch(4)
    state = order.state_dict()
    rest = order.next_batch(12)
    again = DataOrder(10, seed=3)
    again.load_state_dict(state)
    assert again.next_batch(12) == rest
    assert state == {"epoch": 1, "offset": 4}


def test_row_random_does_not_depend_on_how_rows_are_split():
    whole = RowRandom(0, 5, [0, 1, 2, 3]).randn(2, 2)
    halves = torch.cat([RowRandom(0, 5, [0, 1]).randn(2, 2), RowRandom(0, 5, [2, 3]).randn(2, 2)])
    assert torch.equal(whole, halves)
    assert not torch.equal(whole, RowRandom(0, 6, [0, 1, 2, 3]).randn(2, 2))


def test_learning_rate_warms_up_then_follows_a_cosine():
    cfg = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, cfg) == pytest.approx(0.1)


# -- exactness ---------------------------------------------------------------------------------


def test_resumed_run_matches_the_uninterrupted_run_exactly(tmp_path):
    straight = run(tmp_path / "a")
    run(tmp_path / "b", steps=6, checkpoint_every=3)  # writes step 3 and 6
    (tmp_path / "b" / "checkpoints" / "step-00000006.pt").unlink()
    resumed = run(tmp_path / "b", resume=True)
    assert resumed.history == straight.history
    assert weights_equal(resumed.model.state_dict(), straight.model.state_dict())
    assert weights_equal(resumed.ema.state_dict(), straight.ema.state_dict())


def test_gradient_accumulation_matches_the_whole_batch(tmp_path):
    whole = run(tmp_path / "a", steps=3)
    micro = run(tmp_path / "b", steps=3, micro_batch_size=3)  # 3 + 3 + 2 rows
    torch.testing.assert_close(torch.tensor(micro.history), torch.tensor(whole.history), rtol=1e-5, atol=1e-6)
    # Adam divides by sqrt(v): float-rounding differences in near-zero gradients move weights by up
    # to ~lr, so weights are compared at a fraction of one step (lr = 1e-2), losses tightly
    for k, v in whole.model.state_dict().items():
        torch.testing.assert_close(micro.model.state_dict()[k], v, rtol=1e-3, atol=5e-4)


def test_conv_weights_train_channels_last_unless_turned_off(tmp_path):
    def conv_weights(trainer):
        return [p for p in trainer.model.parameters() if p.ndim == 4]

    nhwc = run(tmp_path / "a", steps=2)
    nchw = run(tmp_path / "b", steps=2, channels_last=False)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(nhwc))
    assert not all(w.is_contiguous() for w in conv_weights(nhwc))  # 1x1 kernels are both; 3x3 ones are not
    assert all(w.is_contiguous() for w in conv_weights(nchw))
    assert nhwc.history == pytest.approx(nchw.history, rel=1e-4)  # the layout changes speed, not the result
    # the EMA copy and the checkpoint follow; resuming into either layout continues the run
    resumed = Trainer(tiny_stage(), config(steps=3, channels_last=False), tmp_path / "a", progress=False)
    resumed.resume()
    assert resumed.step == 2 and all(w.is_contiguous() for w in conv_weights(resumed))


def test_bf16_autocast_trains(tmp_path):
    trainer = run(tmp_path, steps=3, precision="bf16")
    assert all(torch.isfinite(torch.tensor(trainer.history)))


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "one"), "4"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(WORKER), str(tmp_path / "two"), "4"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    one = torch.load(tmp_path / "one" / "final.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "final.pt", weights_only=True)
    torch.testing.assert_close(two["history"], one["history"], rtol=1e-5, atol=1e-6)
    for k, v in one["model"].items():  # tolerance as in the accumulation test
        torch.testing.assert_close(two["model"][k], v, rtol=1e-3, atol=5e-4)
    # only rank 0 wrote: one event file, one config
    assert len(list((tmp_path / "two").glob("events.out.tfevents.*"))) == 1


# -- logging and outputs -----------------------------------------------------------------------


def test_writes_config_tensorboard_scalars_and_checkpoints(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run(tmp_path, steps=4, log_every=2, checkpoint_every=2, keep_checkpoints=1)
    assert [p.name for p in checkpoint_paths(tmp_path / "checkpoints")] == ["step-00000004.pt"]
    assert (tmp_path / "config.json").is_file()
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [e.step for e in acc.Scalars("pixel_ddpm/loss")] == [2, 4]
    assert "pixel_ddpm/grad_norm" in acc.Tags()["scalars"]
