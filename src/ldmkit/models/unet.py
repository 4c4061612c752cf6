"""One configurable U-Net: the latent U-Net of Stable Diffusion, the pixel-space DDPM U-Net, and
the diffusion course's minimal conv U-Net.

- `architecture="unet"` is the ResNet/attention U-Net of DDPM (Ho et al. 2020) as extended by
  latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
  Models"): ResNet blocks with a sinusoidal time embedding, attention at chosen levels, skip
  connections by concatenation. With `context_dim` set, the attention is a spatial transformer
  with cross-attention on the text context (SD 1.x / 2.x, diffusers' UNet2DConditionModel);
  with `context_dim=None` it is GroupNorm + self-attention (DDPM, diffusers' UNet2DModel).
- `architecture="basic"` is the "BasicUNet" of the Hugging Face diffusion course (unit 1): three
  5x5 convs down with max-pooling, three up with nearest upsampling, additive skips, SiLU, and
  no time input. It shares the config and the `forward` signature but none of the blocks: it is
  built and run by its own two short methods rather than bent into the ResNet U-Net's blocks,
  which keeps both paths readable.

Attribute names mirror diffusers' state-dict keys, so diffusers weights load with
`load_state_dict(strict=True)` and zero renames (the basic U-Net mirrors the course's
`down_layers` / `up_layers`). CompVis names are translated in `ldmkit.checkpoints.keys_unet_vae`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmkit.errors import InvalidArgument, check_choice
from ldmkit.kernels import group_norm
from ldmkit.models.layers import (
    Attention,
    BasicTransformerBlock,
    Downsample,
    MidBlock,
    ResnetBlock,
    SpatialSelfAttention,
    SpatialTransformer,
    TimestepEmbedding,
    Upsample,
    repeat_rows,
    timestep_embedding,
)

ARCHITECTURES = ("unet", "basic")


@dataclass(frozen=True)
class UNetConfig:
    """Everything that fixes the U-Net's shape. Lists are turned into tuples, an int `num_heads`
    into one value per level, so configs read from JSON compare equal to presets."""

    architecture: str = "unet"  # "unet" (ResNet/attention U-Net) or "basic" (course BasicUNet)
    in_channels: int = 4  # channels of x: 4 latents; 9 for inpainting (latents, mask, masked)
    out_channels: int = 4  # channels of the prediction
    block_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # channels per resolution level
    layers_per_block: int = 2  # ResNet blocks per level going down (one more going up)
    attention_levels: tuple[bool, ...] = (True, True, True, False)  # attention at each level
    mid_attention: bool = True  # attention between the two ResNet blocks of the middle
    num_heads: tuple[int, ...] = (8, 8, 8, 8)  # attention heads per level; the middle uses the last
    context_dim: int | None = 768  # cross-attention context width; None: plain self-attention
    linear_projection: bool = False  # transformer proj_in/out as Linear (SD 2.x), else 1x1 conv
    transformer_layers: int = 1  # transformer blocks inside each spatial transformer
    norm_groups: int = 32  # GroupNorm groups everywhere
    norm_eps: float = 1e-5  # GroupNorm epsilon of ResNet blocks, pixel attention and output
    flip_sin_to_cos: bool = True  # timestep features ordered [cos, sin] (SD and diffusers)
    freq_shift: float = 0.0  # timestep frequency shift; 1 gives the original DDPM frequencies
    time_embed_dim: int | None = None  # time embedding width; None: 4 * block_channels[0]
    num_class_embeds: int | None = None  # size of the class-label table; None: no labels
    dropout: float = 0.0  # dropout inside the ResNet blocks (training only)
    sample_size: int | None = None  # side of x at training (informational, kept in configs)
    kernel_size: int = 5  # conv kernel of the "basic" architecture only

    def __post_init__(self) -> None:
        check_choice("U-Net architecture", self.architecture, ARCHITECTURES)
        n = len(self.block_channels)
        heads = self.num_heads
        if isinstance(heads, int):
            heads = (heads,) * n
        object.__setattr__(self, "block_channels", tuple(self.block_channels))
        object.__setattr__(self, "attention_levels", tuple(bool(a) for a in self.attention_levels))
        object.__setattr__(self, "num_heads", tuple(heads))
        if self.architecture == "basic":
            if n < 2:
                raise InvalidArgument("the basic U-Net needs at least 2 block_channels")
            return
        if not (len(self.attention_levels) == len(self.num_heads) == n):
            raise InvalidArgument(
                f"block_channels, attention_levels and num_heads need one entry per level ({n}); "
                f"got {len(self.attention_levels)} attention_levels, {len(self.num_heads)} num_heads"
            )
        for ch, heads_here in zip(self.block_channels, self.num_heads):
            if ch % self.norm_groups:
                raise InvalidArgument(f"channels {ch} not divisible by norm_groups {self.norm_groups}")
            if ch % heads_here:
                raise InvalidArgument(f"channels {ch} not divisible by num_heads {heads_here}")

    @property
    def temb_dim(self) -> int:
        """Width of the time embedding fed to every ResNet block."""
        return self.time_embed_dim or 4 * self.block_channels[0]


UNET_PRESETS: dict[str, UNetConfig] = {
    # Stable Diffusion 1.x (CompVis/stable-diffusion-v1-4, v1-5): CLIP ViT-L/14 context.
    "sd15": UNetConfig(sample_size=64),
    # Stable Diffusion 2.x: 64-dim heads (5/10/20/20), linear projections, OpenCLIP ViT-H context.
    "sd2": UNetConfig(num_heads=(5, 10, 20, 20), context_dim=1024, linear_projection=True, sample_size=96),
    # SD 1.5 inpainting: x is [noisy latents, mask, masked-image latents] on channels.
    "sd15_inpaint": UNetConfig(in_channels=9, sample_size=64),
    # A small SD-shaped model for tests: 3 levels, cross-attention on a 32-wide context.
    "tiny": UNetConfig(
        block_channels=(32, 64, 64),
        layers_per_block=1,
        attention_levels=(True, True, False),
        num_heads=(2, 2, 2),
        context_dim=32,
        norm_groups=8,
        sample_size=16,
    ),
    # Pixel-space DDPM (Ho et al. 2020, CIFAR-10 32x32 model): self-attention at 16x16.
    "pixel_ddpm": UNetConfig(
        in_channels=3,
        out_channels=3,
        block_channels=(128, 256, 256, 256),
        attention_levels=(False, True, False, False),
        num_heads=(1, 1, 1, 1),
        context_dim=None,
        dropout=0.1,
        sample_size=32,
    ),
    # The diffusion course's BasicUNet (unit 1): convs 32/64/64, kernel 5, no time input.
    "minimal": UNetConfig(
        architecture="basic",
        in_channels=1,
        out_channels=1,
        block_channels=(32, 64, 64),
        attention_levels=(False, False, False),
        num_heads=(1, 1, 1),
        context_dim=None,
        mid_attention=False,
        sample_size=28,
    ),
}


def unet_preset(name: str, **overrides) -> UNetConfig:
    """The preset `name` (see UNET_PRESETS) with any fields replaced, e.g.
    `unet_preset("pixel_ddpm", attention_levels=(False, True, True, False), num_class_embeds=10)`."""
    check_choice("U-Net preset", name, tuple(UNET_PRESETS))
    known = {f.name for f in fields(UNetConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise InvalidArgument(f"unknown UNetConfig field(s): {', '.join(unknown)}")
    return replace(UNET_PRESETS[name], **overrides)


class DownBlock(nn.Module):
    """ResNet blocks (each followed by attention if the level has it), then a stride-2 conv.

    Returns the output and every intermediate output, which the up path takes as skips.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        config: UNetConfig,
        make_attention: Callable[[int], nn.Module] | None,
        downsample: bool,
    ):
        super().__init__()
        c = config
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, c.temb_dim,
                        c.norm_groups, c.norm_eps, c.dropout)
            for i in range(c.layers_per_block)
        )
        n_attn = c.layers_per_block if make_attention is not None else 0
        self.attentions = nn.ModuleList(make_attention(out_channels) for _ in range(n_attn))
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])

    def forward(self, x: Tensor, temb: Tensor, context: Tensor | None, start: int = 0) -> tuple[Tensor, list[Tensor]]:
        """From layer `start` on (the layers before it already ran: `UNet._shared_start`)."""
        skips = []
        for i, resnet in enumerate(self.resnets[start:], start):
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[i](x, context)
            skips.append(x)
        for down in self.downsamplers:
            x = down(x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """ResNet blocks on [x, skip] concatenated on channels (each followed by attention if the
    level has it), then nearest 2x upsampling + conv to the size of the next skip."""

    def __init__(
        self,
        in_channels: int,
        skip_channels: list[int],
        out_channels: int,
        config: UNetConfig,
        make_attention: Callable[[int], nn.Module] | None,
        upsample: bool,
    ):
        super().__init__()
        c = config
        self.resnets = nn.ModuleList(
            ResnetBlock((in_channels if i == 0 else out_channels) + skip, out_channels, c.temb_dim,
                        c.norm_groups, c.norm_eps, c.dropout)
            for i, skip in enumerate(skip_channels)
        )
        n_attn = len(skip_channels) if make_attention is not None else 0
        self.attentions = nn.ModuleList(make_attention(out_channels) for _ in range(n_attn))
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x: Tensor, skips: list[Tensor], temb: Tensor, context: Tensor | None) -> Tensor:
        """Pops its skips off the end of `skips` (the down path's outputs, in order)."""
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[i](x, context)
        for up in self.upsamplers:
            x = up(x, size=skips[-1].shape[-2:])
        return x


def _reuse_context(attentions: Iterable[Attention], on: bool) -> None:
    """Set cross-attentions to keep (or not) their context's keys and values, none kept yet."""
    for attention in attentions:
        attention.reuses_context, attention.context_kv = on, None


class UNet(nn.Module):
    """The U-Net denoiser: `forward(x, t, context, class_labels)` -> prediction shaped like x
    with `out_channels` channels (eps, v or x0, depending on how it was trained)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self._memo_attentions: list[Attention] | None = None  # the cross-attentions, in `reusing_context`
        self._memo_context: Tensor | None = None  # the context whose keys and values they hold
        if config.architecture == "basic":
            self._build_basic(config)
        else:
            self._build_unet(config)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the network computes in: its parameters' (norms keep theirs when
        `models.onednn.prepack` has replaced the convolutions and linear layers)."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    # --- the ResNet/attention U-Net (DDPM, LDM) ---------------------------------------------

    def _make_attention(self, level: int, mid: bool = False) -> Callable[[int], nn.Module] | None:
        """A factory for the attention module of a level (or the middle), or None if it has none."""
        c = self.config
        if not (c.mid_attention if mid else c.attention_levels[level]):
            return None
        heads = c.num_heads[level]
        if c.context_dim is None:
            return lambda ch: SpatialSelfAttention(ch, heads, c.norm_groups, c.norm_eps)
        return lambda ch: SpatialTransformer(
            ch, heads, c.context_dim, c.transformer_layers, c.norm_groups, c.linear_projection
        )

    def _build_unet(self, c: UNetConfig) -> None:
        chans, n = c.block_channels, len(c.block_channels)
        self.conv_in = nn.Conv2d(c.in_channels, chans[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chans[0], c.temb_dim)
        if c.num_class_embeds is not None:
            self.class_embedding = nn.Embedding(c.num_class_embeds, c.temb_dim)

        skip_channels = [chans[0]]  # channels of the tensors the down path leaves for the up path
        self.down_blocks = nn.ModuleList()
        for level, ch in enumerate(chans):
            last = level == n - 1
            prev = chans[max(level - 1, 0)]
            self.down_blocks.append(DownBlock(prev, ch, c, self._make_attention(level), not last))
            skip_channels += [ch] * (c.layers_per_block + (0 if last else 1))

        mid_attention = self._make_attention(n - 1, mid=True)
        self.mid_block = MidBlock(
            chans[-1], c.temb_dim, mid_attention(chans[-1]) if mid_attention else None,
            c.norm_groups, c.norm_eps, c.dropout,
        )

        self.up_blocks = nn.ModuleList()
        ch_in = chans[-1]
        for level in reversed(range(n)):
            skips = [skip_channels.pop() for _ in range(c.layers_per_block + 1)]
            self.up_blocks.append(
                UpBlock(ch_in, skips, chans[level], c, self._make_attention(level), level > 0)
            )
            ch_in = chans[level]

        self.conv_norm_out = nn.GroupNorm(c.norm_groups, chans[0], eps=c.norm_eps)
        self.conv_out = nn.Conv2d(chans[0], c.out_channels, 3, padding=1)

    def _embed_time(self, x: Tensor, t: Tensor | float | None, class_labels: Tensor | None) -> Tensor:
        """(B, temb_dim) embedding of timesteps t (scalar or (B,), fractional allowed) + labels."""
        if t is None:
            raise InvalidArgument("this U-Net needs a timestep t (a number or a (B,) tensor)")
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)  # (B,)
        if t.shape != (b,):
            raise InvalidArgument(f"t must be a scalar or shaped ({b},), got {tuple(t.shape)}")
        c = self.config
        feats = timestep_embedding(t, c.block_channels[0], c.flip_sin_to_cos, c.freq_shift)
        temb = self.time_embedding(feats.to(self.dtype))  # (B, temb_dim)
        if c.num_class_embeds is None:
            if class_labels is not None:
                raise InvalidArgument("class_labels given, but this U-Net has no class embedding")
            return temb
        if class_labels is None:
            raise InvalidArgument("this U-Net is class-conditional: pass class_labels (B,)")
        return temb + self.class_embedding(class_labels.to(x.device)).to(temb.dtype)

    def _check_context(self, context: Tensor | None, batch: int) -> None:
        c = self.config
        cross = c.context_dim is not None and (any(c.attention_levels) or c.mid_attention)
        if not cross:
            if context is not None:
                raise InvalidArgument("context given, but this U-Net has no cross-attention")
            return
        if context is None or context.ndim != 3 or context.shape[-1] != c.context_dim or len(context) != batch:
            got = None if context is None else tuple(context.shape)
            raise InvalidArgument(f"context must be ({batch}, M, {c.context_dim}), one per latent; got {got}")

    @contextmanager
    def reusing_context(self) -> Iterator[None]:
        """Within this block, each cross-attention projects a text context to keys and values once
        and reuses them while the calls pass an equal context, as a sampler does at every step
        (SD 1.5: 32 projections, about 6 ms of a 1 s step on 2 cores). Calls that need gradients
        project as usual. The weights must not change inside the block."""
        outer = self._memo_attentions, self._memo_context
        attentions = [b.attn2 for b in self.modules() if isinstance(b, BasicTransformerBlock)]
        self._memo_attentions, self._memo_context = attentions, None
        _reuse_context(attentions, True)
        try:
            yield
        finally:
            _reuse_context(attentions, False)
            self._memo_attentions, self._memo_context = outer
            _reuse_context(outer[0] or (), True)  # an enclosing block's, emptied

    def _remember_context(self, context: Tensor | None) -> None:
        """Inside `reusing_context`: the cross-attentions forget the keys and values of any other
        context than this call's."""
        if self._memo_attentions is None or context is None or torch.is_grad_enabled():
            return
        seen = self._memo_context
        if seen is not None and seen.shape == context.shape and seen.dtype == context.dtype and torch.equal(seen, context):
            return
        self._memo_context = context.clone()  # a copy: the caller may change its tensor in place
        _reuse_context(self._memo_attentions, True)

    def _forward_unet(
        self, x: Tensor, t: Tensor | float | None, context: Tensor | None, class_labels: Tensor | None
    ) -> Tensor:
        temb = self._embed_time(x, t, class_labels)
        self._check_context(context, x.shape[0])
        self._remember_context(context)
        if self._halves_repeat(x, temb, context):
            h, skips = self._shared_start(x[:x.shape[0] // 2], temb, context)
        else:
            h = self.conv_in(x)  # (B, C0, H, W)
            skips = [h]
            h, block_skips = self.down_blocks[0](h, temb, context)
            skips += block_skips
        for block in self.down_blocks[1:]:
            h, block_skips = block(h, temb, context)
            skips += block_skips
        h = self.mid_block(h, temb, context)  # (B, C_last, H/2^(n-1), W/2^(n-1))
        for block in self.up_blocks:
            h = block(h, skips, temb, context)
        return self.conv_out(group_norm(h, self.conv_norm_out, silu=True))  # (B, out_channels, H, W)

    def _halves_repeat(self, x: Tensor, temb: Tensor, context: Tensor | None) -> bool:
        """Whether x is a CFG batch [x', x'] at one timestep per latent (temb [e, e]) whose first layers
        may run once for both halves: in inference, where the first down block has cross-attention."""
        b = x.shape[0] // 2
        first = self.down_blocks[0]
        return (x.shape[0] % 2 == 0 and b > 0 and context is not None and len(first.attentions) > 0
                and isinstance(first.attentions[0], SpatialTransformer)
                and not self.training and not torch.is_grad_enabled()
                and torch.equal(x[:b], x[b:]) and torch.equal(temb[:b], temb[b:]))

    def _shared_start(self, x: Tensor, temb: Tensor, context: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The first down block on one half x of a CFG batch whose halves are the same latents:
        everything before the first cross-attention (conv_in, a ResNet block, the self-attention)
        sees the same input in both halves, so it runs once (in SD 1.5 at 512x512, 3% of a step's
        work), and the rows are doubled where the two contexts come in. Returns (h, skips) of the
        whole batch, as the first down block would."""
        first = self.down_blocks[0]
        h = self.conv_in(x)  # (B/2, C0, H, W)
        skips = [repeat_rows(h, context.shape[0])]
        h = first.resnets[0](h, temb[:x.shape[0]])
        h = first.attentions[0](h, context)  # (B, C0, H, W): the rows split at its cross-attention
        skips.append(h)
        h, block_skips = first(h, temb, context, start=1)
        return h, skips + block_skips

    # --- the course's BasicUNet -------------------------------------------------------------

    def _build_basic(self, c: UNetConfig) -> None:
        down = (c.in_channels, *c.block_channels)  # e.g. 1 -> 32 -> 64 -> 64
        up = (*reversed(c.block_channels), c.out_channels)  # e.g. 64 -> 64 -> 32 -> 1
        pad = c.kernel_size // 2
        self.down_layers = nn.ModuleList(
            nn.Conv2d(a, b, c.kernel_size, padding=pad) for a, b in zip(down[:-1], down[1:])
        )
        self.up_layers = nn.ModuleList(
            nn.Conv2d(a, b, c.kernel_size, padding=pad) for a, b in zip(up[:-1], up[1:])
        )

    def _forward_basic(self, x: Tensor) -> Tensor:
        skips = []
        for i, conv in enumerate(self.down_layers):
            x = F.silu(conv(x))
            if i < len(self.down_layers) - 1:
                skips.append(x)
                x = F.max_pool2d(x, 2)  # (B, C, H/2, W/2)
        for i, conv in enumerate(self.up_layers):
            if i > 0:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest") + skips.pop()  # (B, C, 2H, 2W)
            x = F.silu(conv(x))
        return x

    # --- entry point --------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        t: Tensor | float | None = None,
        context: Tensor | None = None,
        class_labels: Tensor | None = None,
    ) -> Tensor:
        """Predict from x (B, in_channels, H, W) at timesteps t (scalar or (B,), may be
        fractional), with text context (B, M, context_dim) for cross-attention models and
        class_labels (B,) for class-conditional ones. The basic architecture ignores t."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise InvalidArgument(
                f"x must be (B, {self.config.in_channels}, H, W); got {tuple(x.shape)}"
            )
        if self.config.architecture == "basic":
            if context is not None or class_labels is not None:
                raise InvalidArgument("the basic U-Net takes no context or class_labels")
            return self._forward_basic(x)
        return self._forward_unet(x, t, context, class_labels)
