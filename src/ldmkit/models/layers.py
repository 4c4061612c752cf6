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


# Nearest 2x upsampling then a 3x3 convolution (padding 1), per output parity: output row 2i + py
# sees upsampled rows 2i + py - 1 .. 2i + py + 1, which are low-resolution rows i - 1 + py and i + py,
# the first under tap 0 (py = 0) or taps 0 and 1 (py = 1), the second under taps 1 and 2 or tap 2.
# _PARITY_TAPS[py][a][tap]: whether the tap falls on low-resolution row i - 1 + py + a. Columns alike.
_PARITY_TAPS = ((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1))


def upsample_phase_weight(weight: Tensor) -> Tensor:
    """The 3x3 kernel (O, C, 3, 3) of a convolution after nearest 2x upsampling as the 2x2 kernels
    (4 O, C, 2, 2) that give its four output parities (py, px) from the low-resolution map, parity
    2 py + px in output channels [(2 py + px) O, (2 py + px + 1) O): a 2x2 convolution with padding 1
    of the H x W map has output (i + py, j + px) of parity (py, px) at (2i + py, 2j + px). The taps
    are summed in float32 and rounded once."""
    taps = torch.tensor(_PARITY_TAPS, dtype=torch.float32)  # (parity, a, tap)
    phases = torch.einsum("pay,ocyx,qbx->pqocab", taps, weight.detach().float(), taps)  # (2, 2, O, C, 2, 2)
    return phases.reshape(4 * weight.shape[0], weight.shape[1], 2, 2).to(weight.dtype)


def scatter_parities(o: Tensor, h: int, w: int, memory_format: torch.memory_format = torch.channels_last) -> Tensor:
    """The upsampled map (B, C, 2h, 2w) from the parities' 2x2 convolution output o
    (B, 4 C, h + 1, w + 1) (see `upsample_phase_weight`)."""
    b, c = o.shape[0], o.shape[1] // 4
    out = torch.empty(b, c, 2 * h, 2 * w, dtype=o.dtype, device=o.device, memory_format=memory_format)
    for py in (0, 1):
        for px in (0, 1):
            p = 2 * py + px
            out[:, :, py::2, px::2] = o[:, p * c:(p + 1) * c, py:py + h, px:px + w]
    return out


# Input pixels (batch x H x W) from which `Upsample` runs its parities on the CPU. On AMD Zen 5
# (2026-12-07, SD's VAE decoder, medians of 3) they took about half the plain way's time at every
# upsampler: 512 channels from 64x64, 45 against 87 ms in bf16 (93 against 188 in float32); from
# 128x128, 170-189 against 339 ms (360-374 against 726); 256 channels from 256x256, 176-179 against
# 334-350 ms (308-346 against 652-694). Smaller maps were not measured this way (see
# `onednn.PHASES_MIN_PIXELS` for the packed layers').
PARITY_MIN_PIXELS = 4096


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling (or to `size`, to meet an odd-sized skip), then 3x3 conv.

    On the CPU, inference at exactly 2x on a map of at least `PARITY_MIN_PIXELS` pixels runs instead
    as one 2x2 convolution of the low-resolution map that gives the four output parities
    (`upsample_phase_weight`): 16 multiply-adds per output pixel and channel pair instead of 36,
    and no upsampled copy of the input. The parities' weight is derived once per weight tensor
    (16/9 of its memory) and kept."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self._phase_source: tuple | None = None  # the conv's (weight, its version, bias, its version) they came from
        self._phases: tuple[Tensor, Tensor | None] | None = None  # the parities' weight and bias

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if self._takes_parities(x, size):
            weight, bias = self._phase_weights()
            layout = torch.contiguous_format if x.is_contiguous() else torch.channels_last  # x's, as the plain way's
            return scatter_parities(F.conv2d(x, weight, bias, padding=1), x.shape[2], x.shape[3], layout)
        return Upsample.plain(self.conv, x, size)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_phase_source": None, "_phases": None}  # derived, not saved

    @staticmethod
    def plain(conv: nn.Module, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """Nearest upsampling to `size` (None: 2x), then `conv`: the way without parities."""
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        else:
            x = F.interpolate(x, size=size, mode="nearest")  # (B, C, *size)
        return conv(x)

    def _takes_parities(self, x: Tensor, size: tuple[int, int] | None) -> bool:
        b, _, h, w = x.shape
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.conv.weight.requires_grad)
        return (type(self.conv) is nn.Conv2d and x.device.type == "cpu" and not needs_grad
                and b * h * w >= PARITY_MIN_PIXELS and (size is None or tuple(size) == (2 * h, 2 * w)))

    def _phase_weights(self) -> tuple[Tensor, Tensor | None]:
        """The parities' weight and bias for the conv's current ones: derived again when either is
        another tensor (`.to()`, a loaded one) or was changed in place."""
        weight, bias = self.conv.weight, self.conv.bias
        source = self._phase_source
        if (source is None or source[0] is not weight or source[1] != weight._version or source[2] is not bias
                or (bias is not None and source[3] != bias._version)):
            self._phase_source = (weight, weight._version, bias, None if bias is None else bias._version)
            self._phases = (upsample_phase_weight(weight).contiguous(memory_format=torch.channels_last),
                            None if bias is None else bias.detach().repeat(4))
        return self._phases


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
