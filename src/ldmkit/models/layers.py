"""Layers shared by the U-Net and the VAE.

Module and attribute names mirror the diffusers state-dict keys (`to_q`, `to_out.0`, `norm1`,
`time_emb_proj`, `proj_in`, `transformer_blocks`, ...) so that diffusers weights load with
`load_state_dict(strict=True)` and no renames; the CompVis names are handled in
`ldmkit.checkpoints.keys_unet_vae`.

References:
- Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models" (sinusoidal timestep
  embedding, ResNet blocks with time injection, self-attention at low resolution).
- Vaswani et al. 2017, "Attention Is All You Need" (sinusoidal positions, multi-head attention).
- Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"
  (the spatial transformer with cross-attention on the text context).
- Shazeer 2020, "GLU Variants Improve Transformer" (GEGLU feed-forward).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import attention, group_norm, layer_norm


def timestep_embedding(
    t: Tensor,
    dim: int,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017, sec. 3.5).

    `t` is a (B,) tensor of timesteps; returns (B, dim) float32 features
    [sin(t * f_k), cos(t * f_k)] with f_k = max_period^(-k / (dim/2 - freq_shift)).
    `flip_sin_to_cos=True` puts the cosines first (the SD / diffusers convention), and
    `freq_shift=1` gives the original DDPM frequencies (k / (dim/2 - 1)).
    """
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * k / (half - freq_shift))  # (half,)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)  # (B, 2*half)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))  # (B, dim)
    return emb


class TimestepEmbedding(nn.Module):
    """The two-layer MLP that turns sinusoidal features into the time embedding (DDPM)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def plus_output(layer: nn.Module, x: Tensor, residual: Tensor) -> Tensor:
    """residual + layer(x): one kernel when the layer fuses the sum (`onednn.PackedConv2d` and
    `PackedLinear` do), else the layer and then the sum."""
    fused = getattr(layer, "forward_plus", None)
    return residual + layer(x) if fused is None else fused(x, residual)


def repeat_rows(x: Tensor, batch: int) -> Tensor:
    """x (b, ...) as (batch, ...), `batch` a multiple of b, row j being x's row j mod b: where a CFG
    batch [uncond, cond], whose first layers ran once for both halves (`UNet`'s shared start),
    becomes two halves again."""
    return x if x.shape[0] == batch else torch.cat([x] * (batch // x.shape[0]))  # keeps channels_last


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added between (DDPM, Ho et al. 2020).

    `temb_channels=None` drops the time input (the VAE's blocks).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        groups: int = 32,
        eps: float = 1e-5,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = None if temb_channels is None else nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.conv_shortcut = None

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self.conv1(group_norm(x, self.norm1, silu=True))
        # the time embedding (B, C) is added to h inside the second norm: no pass of its own
        shift = None if self.time_emb_proj is None else self.time_emb_proj(F.silu(temb))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return plus_output(self.conv2, self.dropout(group_norm(h, self.norm2, silu=True, shift=shift)), skip)


class Attention(nn.Module):
    """Multi-head scaled dot-product attention over tokens (Vaswani et al. 2017).

    Self-attention when `context` is None, cross-attention on `context` (B, M, context_dim)
    otherwise. Runs on `kernels.attention`: our AMX kernel for bf16 inference on CPUs that have it,
    else `F.scaled_dot_product_attention`, which picks a fused kernel.
    """

    def __init__(
        self,
        query_dim: int,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        qkv_bias: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner = heads * head_dim
        kv_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(kv_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(kv_dim, inner, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(dropout)])
        # while the U-Net that owns a cross-attention says so (`UNet.reusing_context`), the keys and
        # values of its context are kept between calls in context_kv (None: not projected yet)
        self.reuses_context = False
        self.context_kv: tuple[Tensor, Tensor] | None = None

    def _keys_values(self, context: Tensor) -> tuple[Tensor, Tensor]:
        if not self.reuses_context or torch.is_grad_enabled():
            return self.to_k(context), self.to_v(context)
        if self.context_kv is None:
            self.context_kv = self.to_k(context), self.to_v(context)
        return self.context_kv

    def attend(self, x: Tensor, context: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
        """x: (B, N, query_dim), context: (B, M, context_dim) or None -> (B, N, query_dim),
        plus `residual` (B, N, query_dim) when given."""
        context = x if context is None else context
        b, n, _ = x.shape
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2)  # (B, nh, N, hd)
        k, v = self._keys_values(context)
        k = k.view(b, context.shape[1], self.heads, -1).transpose(1, 2)  # (B, nh, M, hd)
        v = v.view(b, context.shape[1], self.heads, -1).transpose(1, 2)  # (B, nh, M, hd)
        out = attention(q, k, v)  # (B, nh, N, hd)
        out = out.transpose(1, 2).reshape(b, n, -1)  # (B, N, nh*hd)
        return _project(self.to_out, out, residual)  # (B, N, query_dim)

    def forward(self, x: Tensor, context: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
        return self.attend(x, context, residual)


def _project(output_layers, x: Tensor, residual: Tensor | None) -> Tensor:
    """An output projection [linear, dropout] applied to x, plus `residual` when given."""
    linear, dropout = output_layers
    if residual is None:
        return dropout(linear(x))
    if dropout.training and dropout.p > 0:  # the sum must come after the dropout
        return residual + dropout(linear(x))
    return plus_output(linear, x, residual)


class SpatialSelfAttention(Attention):
    """GroupNorm + self-attention over the pixels of a feature map, with a residual (DDPM).

    Used at chosen resolutions by the pixel-space U-Net and in the VAE's middle block; diffusers
    stores it as an `Attention` with a `group_norm`, hence the names.
    """

    def __init__(self, channels: int, heads: int, groups: int = 32, eps: float = 1e-5):
        super().__init__(channels, heads, channels // heads, qkv_bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        tokens = group_norm(x, self.group_norm).view(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        out = self.attend(tokens)  # (B, HW, C)
        return x + out.transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)


class GEGLU(nn.Module):
    """Linear projection to 2*inner, then value * GELU(gate) (Shazeer 2020)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: Tensor) -> Tensor:
        return self.apply_projection(self.proj(x))

    @staticmethod
    def apply_projection(projected: Tensor) -> Tensor:
        """value * GELU(gate) of the projection's output [value, gate] (B, N, 2 inner)."""
        value, gate = projected.chunk(2, dim=-1)  # (B, N, inner) each
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with 4x expansion; `net` indices match diffusers (0 GEGLU, 2 out)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim)])

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """(B, N, dim) -> (B, N, dim), plus `residual` when given."""
        geglu, dropout, linear = self.net
        hidden = dropout(geglu(x))
        return linear(hidden) if residual is None else plus_output(linear, hidden, residual)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the context, GEGLU feed-forward (LDM)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = self.attn1(layer_norm(x, self.norm1), residual=x)  # (B, N, C)
        if context is not None:  # rows that a CFG batch's halves shared (UNet's shared start) split here
            x = repeat_rows(x, context.shape[0])
        x = self.attn2(layer_norm(x, self.norm2), context, residual=x)  # (B, N, C)
        return self.ff(layer_norm(x, self.norm3), residual=x)  # (B, N, C)


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on a context (LDM, sec. 3.3).

    GroupNorm, a 1x1 conv (SD 1.x) or linear (SD 2.x) projection in, `layers` transformer
    blocks, the projection out, and a residual. Named like diffusers' Transformer2DModel.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        context_dim: int,
        layers: int = 1,
        groups: int = 32,
        linear_projection: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        if linear_projection:
            self.proj_in = nn.Linear(channels, channels)
            self.proj_out = nn.Linear(channels, channels)
        else:
            self.proj_in = nn.Conv2d(channels, channels, 1)
            self.proj_out = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, channels // heads, context_dim, dropout)
            for _ in range(layers)
        )

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        tokens = group_norm(x, self.norm)
        if not self.linear_projection:
            tokens = self.proj_in(tokens)
        tokens = tokens.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
        if self.linear_projection:
            tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)  # (B, HW, C)
        if self.linear_projection:
            tokens = self.proj_out(tokens)
        out = tokens.reshape(-1, h, w, c).permute(0, 3, 1, 2)  # (B', C, H, W), B' = context's batch
        x = repeat_rows(x, out.shape[0])
        if self.linear_projection:
            return x + out
        return plus_output(self.proj_out, out, x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv. `padding=0` pads right/bottom by one first (the VAE's convention)."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))  # (B, C, H+1, W+1)
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling (or to `size`, to meet an odd-sized skip), then 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        else:
            x = F.interpolate(x, size=size, mode="nearest")  # (B, C, *size)
        return self.conv(x)


class MidBlock(nn.Module):
    """ResNet block, then (attention, ResNet block) pairs: the bottleneck of U-Net and VAE."""

    def __init__(
        self,
        channels: int,
        temb_channels: int | None,
        attention: nn.Module | None,
        groups: int = 32,
        eps: float = 1e-5,
        dropout: float = 0.0,
    ):
        super().__init__()

        def resnet() -> ResnetBlock:
            return ResnetBlock(channels, channels, temb_channels, groups, eps, dropout)

        self.attentions = nn.ModuleList([attention] if attention is not None else [])
        self.resnets = nn.ModuleList([resnet(), resnet()])

    def forward(self, x: Tensor, temb: Tensor | None = None, context: Tensor | None = None) -> Tensor:
        x = self.resnets[0](x, temb)
        for attn in self.attentions:
            x = attn(x, context)
        return self.resnets[1](x, temb)
