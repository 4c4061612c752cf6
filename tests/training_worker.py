"""A tiny training run used by tests/test_training.py in subprocesses (torchrun, kill -9).

    python tests/training_worker.py RUN_DIR STEPS [--resume] [--checkpoint-every N] [--slow S]

Trains a small class-conditional pixel U-Net on fixed random images; on success writes
RUN_DIR/final.pt with the weights and the loss history. `--slow S` sleeps S seconds per step so
a test can kill the process mid-run.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from ldmkit.diffusion.schedule import NoiseSchedule, ScheduleConfig
from ldmkit.models.unet import UNet, unet_preset
from ldmkit.training.stages import PixelDDPMStage
from ldmkit.training.trainer import TrainConfig, Trainer, finish_distributed, init_distributed, world


def tiny_stage(seed: int = 0) -> PixelDDPMStage:
    torch.manual_seed(seed)
    config = unet_preset("pixel_ddpm", in_channels=1, out_channels=1, block_channels=(8, 16), layers_per_block=1,
                         attention_levels=(False, True), num_heads=(1, 1), norm_groups=4, dropout=0.0,
                         num_class_embeds=4, sample_size=8)
    images = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)
    labels = torch.arange(32) % 3
    schedule = NoiseSchedule(ScheduleConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02))
    return PixelDDPMStage(UNet(config), schedule, images, labels, null_class=3)


class SlowStage:
    """Delegates to a stage and sleeps in each loss call, so kills land mid-run."""

    def __init__(self, stage, delay: float) -> None:
        self._stage, self._delay = stage, delay
        self.name, self.model = stage.name, stage.model

    def __len__(self) -> int:
        return len(self._stage)

    def batch(self, indices):
        return self._stage.batch(indices)

    def loss(self, model, batch, rand):
        time.sleep(self._delay)
        return self._stage.loss(model, batch, rand)

    def sample(self, model, step):
        return None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("steps", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--checkpoint-every", type=int, default=1000)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--slow", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    init_distributed()
    stage = tiny_stage()
    if args.slow:
        stage = SlowStage(stage, args.slow)
    config = TrainConfig(steps=args.steps, batch_size=8, micro_batch_size=args.micro_batch_size, lr=1e-2,
                         warmup_steps=2, checkpoint_every=args.checkpoint_every, keep_checkpoints=2)
    trainer = Trainer(stage, config, args.run_dir, progress=False)
    if args.resume:
        trainer.resume()
    trainer.train()
    if world()[0] == 0:
        torch.save({"model": trainer.model.state_dict(), "history": torch.tensor(trainer.history)},
                   f"{args.run_dir}/final.pt")
    finish_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
