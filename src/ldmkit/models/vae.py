"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models", sec. 3 and appendix G).

The encoder maps an image in [-1, 1] to the mean and log-variance of a diagonal Gaussian over
latents 8x smaller (for SD); the decoder maps latents back to an image. `encode` and `decode`
work in the VAE's own latent scale: multiply by `config.scaling_factor` before the U-Net and
divide after, as SD does (LDM sec. 4.3.2).

For memory, `encode` / `decode` can run one image at a time (`sliced=True`) and over
overlapping tiles (`tile_size=...`) whose overlaps are blended linearly so seams do not show;
the tiling follows diffusers' AutoencoderKL.tiled_encode / tiled_decode exactly, so results
match it. Attribute names mirror diffusers' AutoencoderKL keys (zero renames).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor, nn

from ldmkit.errors import InvalidArgument, check_choice
from ldmkit.kernels import group_norm
from ldmkit.models.layers import Downsample, MidBlock, ResnetBlock, SpatialSelfAttention, Upsample


@dataclass(frozen=True)
class VAEConfig:
    """Everything that fixes the autoencoder's shape, plus the latent scaling of the model."""

    in_channels: int = 3  # image channels in
    out_channels: int = 3  # image channels out
    latent_channels: int = 4  # channels of the latent z
    block_channels: tuple[int, ...] = (128, 256, 512, 512)  # channels per level; downscale 2^(n-1)
    layers_per_block: int = 2  # ResNet blocks per encoder level (decoder levels have one more)
    norm_groups: int = 32  # GroupNorm groups everywhere
    mid_attention: bool = True  # self-attention in the middle blocks
    use_quant_conv: bool = True  # the 1x1 convs on the moments (quant_conv) and on z (post_quant_conv)
    scaling_factor: float = 0.18215  # z_unet = z * scaling_factor (0.18215 for SD 1.x and 2.x)
    sample_size: int = 512  # training image side; the default tile size of tiled encode/decode

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_channels", tuple(self.block_channels))
        for ch in self.block_channels:
            if ch % self.norm_groups:
                raise InvalidArgument(f"channels {ch} not divisible by norm_groups {self.norm_groups}")

    @property
    def downscale(self) -> int:
        """Image side / latent side."""
        return 2 ** (len(self.block_channels) - 1)


VAE_PRESETS: dict[str, VAEConfig] = {
    # The SD 1.x / 2.x autoencoder (kl-f8): 8x downscale, 4 latent channels.
    "sd": VAEConfig(),
    # A small model for tests: 2x downscale.
    "tiny": VAEConfig(block_channels=(32, 64), layers_per_block=1, norm_groups=8, sample_size=32),
}


def vae_preset(name: str, **overrides) -> VAEConfig:
    """The preset `name` (see VAE_PRESETS) with any fields replaced."""
    check_choice("VAE preset", name, tuple(VAE_PRESETS))
    unknown = sorted(set(overrides) - {f.name for f in fields(VAEConfig)})
    if unknown:
        raise InvalidArgument(f"unknown VAEConfig field(s): {', '.join(unknown)}")
    return replace(VAE_PRESETS[name], **overrides)


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(exp(logvar))) from the encoder's moments (B, 2C, h, w)
    (Kingma & Welling 2014, "Auto-Encoding Variational Bayes"). logvar is clamped to [-30, 20]."""

    def __init__(self, moments: Tensor):
        mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """z = mean + std * noise; the noise is drawn on the generator's device (CPU seeds
        reproduce across devices) and moved to the mean's device."""
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> Tensor:
        """The most likely latent: the mean."""
        return self.mean

    def kl(self) -> Tensor:
        """KL(q(z|x) || N(0, I)) summed over (C, h, w): a (B,) tensor."""
        return 0.5 * torch.sum(self.mean**2 + self.var - 1.0 - self.logvar, dim=(1, 2, 3))


class EncoderBlock(nn.Module):
    """ResNet blocks (no time input), then a stride-2 conv unless it is the last level."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, None, groups, eps=1e-6) for i in range(layers)
        )
        self.downsamplers = nn.ModuleList([Downsample(out_ch, padding=0)] if downsample else [])

    def forward(self, x: Tensor) -> Tensor:
        for layer in (*self.resnets, *self.downsamplers):
            x = layer(x)
        return x


class DecoderBlock(nn.Module):
    """ResNet blocks (no time input), then nearest 2x upsampling + conv unless it is the last."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, None, groups, eps=1e-6) for i in range(layers)
        )
        self.upsamplers = nn.ModuleList([Upsample(out_ch)] if upsample else [])

    def forward(self, x: Tensor) -> Tensor:
        for layer in (*self.resnets, *self.upsamplers):
            x = layer(x)
        return x


def _mid_block(channels: int, config: VAEConfig) -> MidBlock:
    attention = None
    if config.mid_attention:  # one head over all channels
        attention = SpatialSelfAttention(channels, 1, config.norm_groups, eps=1e-6)
    return MidBlock(channels, None, attention, config.norm_groups, eps=1e-6)


class Encoder(nn.Module):
    """Image (B, in, H, W) -> moments (B, 2*latent, H/f, W/f) before quant_conv."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        chans, n = c.block_channels, len(c.block_channels)
        self.conv_in = nn.Conv2d(c.in_channels, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderBlock(chans[max(i - 1, 0)], chans[i], c.layers_per_block, c.norm_groups, i < n - 1)
            for i in range(n)
        )
        self.mid_block = _mid_block(chans[-1], c)
        self.conv_norm_out = nn.GroupNorm(c.norm_groups, chans[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chans[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(group_norm(h, self.conv_norm_out, silu=True))


class Decoder(nn.Module):
    """Latent (B, latent, h, w) after post_quant_conv -> image (B, out, h*f, w*f)."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        rev, n = tuple(reversed(c.block_channels)), len(c.block_channels)
        self.conv_in = nn.Conv2d(c.latent_channels, rev[0], 3, padding=1)
        self.mid_block = _mid_block(rev[0], c)
        self.up_blocks = nn.ModuleList(
            DecoderBlock(rev[max(i - 1, 0)], rev[i], c.layers_per_block + 1, c.norm_groups, i < n - 1)
            for i in range(n)
        )
        self.conv_norm_out = nn.GroupNorm(c.norm_groups, rev[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(rev[-1], c.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(group_norm(h, self.conv_norm_out, silu=True))


def _blend_v(above: Tensor, below: Tensor, extent: int) -> Tensor:
    """Cross-fade the top `extent` rows of `below` from the bottom rows of `above` (linear ramp)."""
    extent = min(above.shape[2], below.shape[2], extent)
    if extent == 0:
        return below
    w = torch.arange(extent, device=below.device, dtype=below.dtype).div(extent)[:, None]  # (e, 1)
    top = above[:, :, -extent:, :] * (1 - w) + below[:, :, :extent, :] * w  # (B, C, e, W)
    return torch.cat([top, below[:, :, extent:, :]], dim=2)  # (B, C, H, W)


def _blend_h(left: Tensor, right: Tensor, extent: int) -> Tensor:
    """Cross-fade the left `extent` columns of `right` from the right columns of `left`."""
    extent = min(left.shape[3], right.shape[3], extent)
    if extent == 0:
        return right
    w = torch.arange(extent, device=right.device, dtype=right.dtype).div(extent)  # (e,)
    side = left[:, :, :, -extent:] * (1 - w) + right[:, :, :, :extent] * w  # (B, C, H, e)
    return torch.cat([side, right[:, :, :, extent:]], dim=3)  # (B, C, H, W)


def _tiled(x: Tensor, fn, tile_in: int, tile_out: int, overlap: float) -> Tensor:
    """Run `fn` on overlapping tiles of x and stitch the outputs.

    Tiles of side `tile_in` start every `tile_in * (1 - overlap)` pixels; each output tile (side
    `tile_out`) is blended with its already-blended upper and left neighbours over
    `tile_out * overlap` pixels, then cropped to `tile_out * (1 - overlap)` and concatenated.
    """
    stride = int(tile_in * (1 - overlap))
    extent = int(tile_out * overlap)
    keep = tile_out - extent
    if stride <= 0:
        raise InvalidArgument(f"tile_overlap {overlap} leaves no stride for tiles of {tile_in}")
    grid = [
        [fn(x[:, :, i : i + tile_in, j : j + tile_in]) for j in range(0, x.shape[3], stride)]
        for i in range(0, x.shape[2], stride)
    ]
    rows = []
    for i, row in enumerate(grid):
        for j in range(len(row)):
            if i > 0:
                row[j] = _blend_v(grid[i - 1][j], row[j], extent)
            if j > 0:
                row[j] = _blend_h(row[j - 1], row[j], extent)
        rows.append(torch.cat([tile[:, :, :keep, :keep] for tile in row], dim=3))  # (B, C, keep, W')
    return torch.cat(rows, dim=2)  # (B, C, H', W')


class AutoencoderKL(nn.Module):
    """The SD autoencoder: `encode(x) -> DiagonalGaussian`, `decode(z) -> image`."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        k = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * k, 2 * k, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(k, k, 1) if config.use_quant_conv else None

    def _check_input(self, t: Tensor, channels: int, what: str) -> None:
        if t.ndim != 4 or t.shape[1] != channels:
            raise InvalidArgument(f"{what} must be (B, {channels}, H, W); got {tuple(t.shape)}")

    def _check_tiling(self, tile_size: int | None, tile_overlap: float) -> None:
        f = self.config.downscale
        if tile_size is not None and (tile_size <= 0 or tile_size % f):
            raise InvalidArgument(f"tile_size must be a positive multiple of {f}; got {tile_size}")
        if not 0.0 <= tile_overlap < 1.0:
            raise InvalidArgument(f"tile_overlap must be in [0, 1); got {tile_overlap}")

    def _moments(self, x: Tensor) -> Tensor:
        h = self.encoder(x)  # (B, 2*latent, H/f, W/f)
        return h if self.quant_conv is None else self.quant_conv(h)

    def _decode(self, z: Tensor) -> Tensor:
        z = z if self.post_quant_conv is None else self.post_quant_conv(z)
        return self.decoder(z)  # (B, out, h*f, w*f)

    def encode(
        self, x: Tensor, sliced: bool = False, tile_size: int | None = None, tile_overlap: float = 0.25
    ) -> DiagonalGaussian:
        """Posterior q(z|x) for images x (B, in, H, W) in [-1, 1].

        sliced: encode one image at a time (less memory, same result).
        tile_size: if set and H or W exceeds it, encode overlapping tiles of this many pixels
        and blend their moments over `tile_overlap` of a tile (bounded memory; near, not equal,
        to the untiled result because GroupNorm statistics are per tile).
        """
        self._check_input(x, self.config.in_channels, "x")
        self._check_tiling(tile_size, tile_overlap)

        def run(batch: Tensor) -> Tensor:
            if tile_size is not None and max(batch.shape[-2:]) > tile_size:
                tile_latent = tile_size // self.config.downscale
                return _tiled(batch, self._moments, tile_size, tile_latent, tile_overlap)
            return self._moments(batch)

        if sliced and x.shape[0] > 1:
            return DiagonalGaussian(torch.cat([run(xi) for xi in x.split(1)]))
        return DiagonalGaussian(run(x))

    def decode(
        self, z: Tensor, sliced: bool = False, tile_size: int | None = None, tile_overlap: float = 0.25
    ) -> Tensor:
        """Images (B, out, h*f, w*f) from latents z (B, latent, h, w) in the VAE's scale
        (divide U-Net latents by `config.scaling_factor` first).

        sliced: decode one latent at a time. tile_size: image-space tile side (the latent tile
        is tile_size / f); tiles overlap by `tile_overlap` and are blended linearly.
        """
        self._check_input(z, self.config.latent_channels, "z")
        self._check_tiling(tile_size, tile_overlap)

        def run(batch: Tensor) -> Tensor:
            tile_latent = None if tile_size is None else tile_size // self.config.downscale
            if tile_latent is not None and max(batch.shape[-2:]) > tile_latent:
                return _tiled(batch, self._decode, tile_latent, tile_size, tile_overlap)
            return self._decode(batch)

        if sliced and z.shape[0] > 1:
            return torch.cat([run(zi) for zi in z.split(1)])
        return run(z)

    def forward(
        self, x: Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Reconstruct x: decode a sample of the posterior (or its mode)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)
