"""A noise-conditional classifier p(y | x, sigma) for classifier guidance, and its training loop.

Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs on Image Synthesis", section 4.1) train a
classifier on noised images x_t with the diffusion model's noise distribution, conditioned on t,
and guide sampling with its gradient (diffusion/guidance.py: classifier_guidance). Here the
classifier takes the samplers' VE view x = x0 + sigma * n and sigma, scales the input by
c_in = 1 / sqrt(1 + sigma^2) (the DDPM sample, unit-ish variance at every noise level) and
conditions every ResNet block on c_noise = log(sigma) / 4 (Karras et al. 2022, EDM, table 1).
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion.schedule import NoiseSchedule
from .layers import ResnetBlock, TimestepEmbedding


@dataclass(frozen=True)
class NoisyClassifierConfig:
    in_channels: int = 1  # image channels (1 for the digits)
    num_classes: int = 10  # K, the number of logits
    channels: tuple[int, ...] = (32, 64)  # width of each level; every level after the first halves H, W
    sigma_embed_dim: int = 64  # width of the noise-level embedding fed to the ResNet blocks
    norm_groups: int = 8  # GroupNorm groups


class NoisyClassifier(nn.Module):
    """(x (B, C, H, W) VE view, sigma (B,)) -> class logits (B, K): an encoder of ResNet blocks
    conditioned on the noise level, global average pooling, a linear head."""

    def __init__(self, config: NoisyClassifierConfig = NoisyClassifierConfig()) -> None:
        super().__init__()
        self.config = config
        c = config.channels
        self.sigma_embed = TimestepEmbedding(1, config.sigma_embed_dim)
        self.conv_in = nn.Conv2d(config.in_channels, c[0], 3, padding=1)
        self.blocks = nn.ModuleList(
            ResnetBlock(c[max(i - 1, 0)], c[i], config.sigma_embed_dim, groups=config.norm_groups)
            for i in range(len(c)))
        self.norm_out = nn.GroupNorm(config.norm_groups, c[-1])
        self.head = nn.Linear(c[-1], config.num_classes)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        c_in = (1 + sigma**2).rsqrt().reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
        emb = self.sigma_embed((sigma.log() / 4)[:, None])  # (B, E)
        h = self.conv_in(x.float() * c_in)
        for i, block in enumerate(self.blocks):
            h = h if i == 0 else F.avg_pool2d(h, 2)  # (B, C, H / 2^i, W / 2^i)
            h = block(h, emb)
        h = F.silu(self.norm_out(h)).mean(dim=(2, 3))  # (B, C)
        return self.head(h)


def train_noisy_classifier(
    model: nn.Module,
    data: torch.Tensor,  # clean samples (N, ...) in the model's data range
    labels: torch.Tensor,  # (N,) int class of each sample
    schedule: NoiseSchedule,  # noise levels are drawn from its training sigmas, t uniform
    steps: int = 300,  # optimizer steps
    batch_size: int = 64,  # samples per step
    lr: float = 2e-3,  # AdamW learning rate (cosine decay to 0)
    seed: int = 0,  # seeds batches and noise
) -> nn.Module:
    """Train `model(x, sigma) -> logits` with cross-entropy on x = x0 + sigma * n, sigma the
    schedule's sigma at a uniformly drawn training timestep (Dhariwal & Nichol 2021, section 4.1).
    Returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(data), (batch_size,), generator=gen)
        t = torch.randint(schedule.num_train_timesteps, (batch_size,), generator=gen)
        sigma = schedule.sigmas[t].float()  # (B,)
        x0 = data[idx].float()
        x = x0 + sigma.reshape(-1, *([1] * (x0.ndim - 1))) * torch.randn(x0.shape, generator=gen)
        loss = F.cross_entropy(model(x, sigma), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        decay.step()
    return model.eval()
