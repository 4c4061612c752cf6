"""Pixel-space recipes on scikit-learn's digits: the class-conditional DDPM, and the course's
minimal example (basic U-Net, linear noise mix).

    ldmkit train digits   -> a 16x16 class-conditional U-Net, sampled with DPM-Solver++(2M) + CFG
    ldmkit train minimal  -> the basic U-Net predicting clean digits
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import make_grid
from ..data.digits import DigitsDataset
from ..diffusion.denoiser import Denoiser, classifier_free_guidance
from ..diffusion.guidance import dynamic_thresholding
from ..diffusion.samplers import gaussian_noise
from ..diffusion.sampling import make_plan
from ..diffusion.schedule import NoiseSchedule, ScheduleConfig
from ..models.unet import UNet, unet_preset
from .stages import MinimalStage, PixelDDPMStage
from .trainer import TrainConfig, Trainer

NULL_CLASS = 10  # the "no label" class used for classifier-free guidance
SIZE = 16  # digits are upsampled from 8x8
DIGITS_TRAIN = TrainConfig(steps=600, batch_size=64, lr=2e-3, warmup_steps=30, ema_decay=0.999,
                           checkpoint_every=200)
DIGITS_SCHEDULE = ScheduleConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                 timestep_spacing="trailing", steps_offset=0)


def digits_unet() -> UNet:
    config = unet_preset("pixel_ddpm", in_channels=1, out_channels=1, block_channels=(32, 64, 64),
                         layers_per_block=1, attention_levels=(False, True, False), num_heads=(1, 1, 1),
                         norm_groups=8, dropout=0.0, num_class_embeds=NULL_CLASS + 1, sample_size=SIZE)
    return UNet(config)


def digits_tensors(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    data = DigitsDataset(size=SIZE, split=split)
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    labels = torch.tensor([data[i]["label"] for i in range(len(data))])
    return images, labels


@torch.no_grad()
def sample_digits(model: UNet, schedule: NoiseSchedule, labels: torch.Tensor, steps: int = 25,
                  cfg_scale: float = 2.0, seed: int = 0, progress=None,
                  threshold: float | None = None) -> torch.Tensor:
    """Class-conditional samples (B, 1, 16, 16) in [-1, 1], DPM-Solver++(2M) with Karras sigmas;
    `threshold` (e.g. 0.995) applies Imagen's dynamic thresholding at that percentile, which keeps
    high guidance scales from saturating pixels."""
    plan = make_plan("dpmpp_2m", schedule, steps, karras=True)
    denoiser = Denoiser(model, schedule, quantize_timesteps=plan.quantize_timesteps)
    guided = classifier_free_guidance(denoiser, {"class_labels": labels},
                                      {"class_labels": torch.full_like(labels, NULL_CLASS)}, cfg_scale)
    if threshold is not None:
        guided = dynamic_thresholding(guided, threshold)
    x = gaussian_noise((len(labels), 1, SIZE, SIZE), torch.Generator().manual_seed(seed)) * plan.init_noise_scale
    x = plan.run(guided, x, callback=progress)
    return plan.to_vp(x).clamp(-1, 1)


def train_digits(run_dir: str | Path, config: TrainConfig = DIGITS_TRAIN, resume: bool = False) -> UNet:
    """Train the class-conditional digits DDPM; progress grids show each digit in a column."""
    schedule = NoiseSchedule(DIGITS_SCHEDULE)
    images, labels = digits_tensors()
    grid_labels = torch.arange(10).repeat(4)

    def sampler(model):
        return make_grid(sample_digits(model, schedule, grid_labels), nrow=10)

    torch.manual_seed(config.seed)
    stage = PixelDDPMStage(digits_unet(), schedule, images, labels, NULL_CLASS, sampler=sampler)
    trainer = Trainer(stage, config, run_dir)
    if resume:
        trainer.resume()
    return trainer.train()


def train_minimal(run_dir: str | Path, config: TrainConfig, resume: bool = False) -> UNet:
    """The course's first model on 28x28 digits (upsampled), predicting the clean image."""
    data = DigitsDataset(size=28, split="train")
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    torch.manual_seed(config.seed)
    trainer = Trainer(MinimalStage(UNet(unet_preset("minimal")), images), config, run_dir)
    if resume:
        trainer.resume()
    return trainer.train()
