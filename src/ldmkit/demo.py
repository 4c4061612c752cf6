"""`make demo`: train a small class-conditional pixel-space DDPM on scikit-learn's digits and
sample a grid of every digit with DPM-Solver++(2M) and classifier-free guidance.

This stands in for text-to-image generation with the bundled model until that model exists; it
does the whole job end to end (data, U-Net, noise schedule, training loss, sampler, guidance,
PNG with parameters) in about five minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from tqdm import tqdm

from .data import make_grid
from .data.digits import DigitsDataset
from .diffusion.denoiser import Denoiser, classifier_free_guidance
from .diffusion.forward import diffusion_loss, q_sample, training_target
from .diffusion.samplers import gaussian_noise
from .diffusion.sampling import make_plan
from .diffusion.schedule import NoiseSchedule, ScheduleConfig
from .errors import LdmkitError
from .models.unet import UNet, unet_preset
from .pipelines.output import save_png

NULL_CLASS = 10  # the "no label" class used for classifier-free guidance


def digits_unet() -> UNet:
    config = unet_preset("pixel_ddpm", in_channels=1, out_channels=1, block_channels=(32, 64, 64),
                         layers_per_block=1, attention_levels=(False, True, False), num_heads=(1, 1, 1),
                         norm_groups=8, dropout=0.0, num_class_embeds=NULL_CLASS + 1, sample_size=16)
    return UNet(config)


def train(model: UNet, schedule: NoiseSchedule, steps: int, batch_size: int, seed: int) -> UNet:
    """Train with the epsilon loss and 10% label dropout; returns EMA weights."""
    data = DigitsDataset(size=16, split="train")
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    labels = torch.tensor([data[i]["label"] for i in range(len(data))])
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    ema = copy.deepcopy(model).requires_grad_(False)
    bar = tqdm(range(steps), desc="training on digits", unit="step")
    for step in bar:
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(batch_size, generator=gen) < 0.1] = NULL_CLASS
        t = torch.randint(schedule.num_train_timesteps, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        prediction = model(q_sample(schedule, x0, t, noise), t.float(), class_labels=y)
        loss = diffusion_loss(prediction, training_target("epsilon", schedule, x0, t, noise))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return ema


@torch.no_grad()
def sample_grid(model: UNet, schedule: NoiseSchedule, per_digit: int, steps: int, cfg_scale: float, seed: int):
    model.eval()
    labels = torch.arange(10).repeat(per_digit)  # row r holds one sample of each digit
    plan = make_plan("dpmpp_2m", schedule, steps, karras=True)
    denoiser = Denoiser(model, schedule, quantize_timesteps=plan.quantize_timesteps)
    guided = classifier_free_guidance(denoiser, {"class_labels": labels},
                                      {"class_labels": torch.full_like(labels, NULL_CLASS)}, cfg_scale)
    x = gaussian_noise((len(labels), 1, 16, 16), torch.Generator().manual_seed(seed)) * plan.init_noise_scale
    bar = tqdm(total=plan.steps, desc="sampling", unit="step")
    x = plan.run(guided, x, callback=lambda i, _: bar.update())
    bar.close()
    return plan.to_vp(x).clamp(-1, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/demo_digits.png")
    args = parser.parse_args(argv)
    try:
        torch.manual_seed(args.seed)
        schedule = NoiseSchedule(ScheduleConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                                timestep_spacing="trailing", steps_offset=0))
        start = time.time()
        model = train(digits_unet(), schedule, args.steps, args.batch_size, args.seed)
        images = sample_grid(model, schedule, per_digit=8, steps=args.sample_steps, cfg_scale=args.cfg_scale,
                             seed=args.seed)
        grid = make_grid(images, nrow=10).resize((10 * 18 * 4, 8 * 18 * 4), resample=0)
        params = {"model": "digits pixel DDPM (trained by the demo)", "sampler": "dpmpp_2m", "karras": True,
                  "steps": args.sample_steps, "cfg_scale": args.cfg_scale, "seed": args.seed,
                  "training_steps": args.steps, "size": [16, 16]}
        path = save_png(grid, args.out, params)
    except LdmkitError as e:
        print(f"ldmkit: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} (rows: samples, columns: digits 0-9) in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
