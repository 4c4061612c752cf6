"""AutoencoderKL parity against diffusers (random weights, fp32): encode, decode, posterior,
sliced and tiled modes; presets; the tile stitching geometry."""

import pytest
import torch
import torch.nn.functional as F

from ldmkit.checkpoints.keys_unet_vae import vae_config_from_diffusers, vae_config_to_diffusers
from ldmkit.errors import InvalidArgument
from ldmkit.models.vae import AutoencoderKL, DiagonalGaussian, _tiled, vae_preset

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4
SMALL = dict(
    block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8,
    latent_channels=4, sample_size=32,
)


@pytest.fixture(scope="module")
def pair():
    """(diffusers model, our model with its weights loaded strictly)."""
    torch.manual_seed(0)
    theirs = diffusers.AutoencoderKL(**SMALL).eval()
    ours = AutoencoderKL(vae_config_from_diffusers(dict(theirs.config))).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def _max_err(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.oracle
def test_encode_decode_match_diffusers(pair):
    theirs, ours = pair
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 24, generator=g) * 2 - 1
    z = torch.randn(2, 4, 8, 6, generator=g)
    with torch.no_grad():
        post_t, post_o = theirs.encode(x).latent_dist, ours.encode(x)
        errors = {
            "mean": _max_err(post_o.mean, post_t.mean),
            "logvar": _max_err(post_o.logvar, post_t.logvar),
            "kl": _max_err(post_o.kl(), post_t.kl()),
            "decode": _max_err(ours.decode(z), theirs.decode(z).sample),
            "sample": _max_err(
                post_o.sample(torch.Generator().manual_seed(7)),
                post_t.sample(torch.Generator().manual_seed(7)),
            ),
        }
    print("max abs errors", {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) < TOL
    assert post_o.mode() is post_o.mean


@pytest.mark.oracle
def test_tiled_matches_diffusers(pair):
    """Tiles of 32 px (8 latents) on a 72x64 image: 3x3 overlapping tiles, same blending."""
    theirs, ours = pair
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, 72, 64, generator=g) * 2 - 1
    z = torch.randn(1, 4, 18, 16, generator=g)
    theirs.enable_tiling()
    theirs.tile_sample_min_size, theirs.tile_latent_min_size = 32, 8
    with torch.no_grad():
        enc, enc_t = ours.encode(x, tile_size=32), theirs.encode(x).latent_dist
        dec = ours.decode(z, tile_size=32)
        assert enc.mean.shape == (1, 4, 18, 16) and dec.shape == (1, 3, 72, 64)
        err_enc = max(_max_err(enc.mean, enc_t.mean), _max_err(enc.logvar, enc_t.logvar))
        err_dec = _max_err(dec, theirs.decode(z).sample)
    theirs.disable_tiling()
    print(f"tiled vs diffusers tiled: encode {err_enc:.1e}, decode {err_dec:.1e}")
    assert err_enc < TOL and err_dec < TOL


def test_tiled_stays_close_to_plain(pair):
    """Tiles of 64 px on a 96x80 image (2x2 tiles) against the untiled result.

    Tolerance: per-tile GroupNorm statistics, attention within a tile and zero padding at tile
    borders make tiles differ from the whole; a random-weight network amplifies this far more
    than a trained VAE, so the bounds are relative mean abs differences of 0.15 (encode) and
    0.45 (decode), and the blended seams must beat tiling without overlap.
    """
    _, ours = pair
    g = torch.Generator().manual_seed(4)
    x = torch.rand(1, 3, 96, 80, generator=g) * 2 - 1
    z = torch.randn(1, 4, 24, 20, generator=g)

    def rel(a, b):
        return ((a - b).abs().mean() / b.abs().mean()).item()

    with torch.no_grad():
        plain_enc, plain_dec = ours.encode(x).mean, ours.decode(z)
        enc = rel(ours.encode(x, tile_size=64).mean, plain_enc)
        dec = rel(ours.decode(z, tile_size=64), plain_dec)
        hard_enc = rel(ours.encode(x, tile_size=64, tile_overlap=0.0).mean, plain_enc)
        hard_dec = rel(ours.decode(z, tile_size=64, tile_overlap=0.0), plain_dec)
    print(f"relative mean abs diff to plain: encode {enc:.3f} (no overlap {hard_enc:.3f}), "
          f"decode {dec:.3f} (no overlap {hard_dec:.3f})")
    assert enc < min(0.15, hard_enc) and dec < min(0.45, hard_dec)


def test_tile_stitching_is_exact_for_local_maps():
    """For a pointwise map the overlapping tiles agree, so stitching + blending is exact;
    for a 4x average pool (an 'encoder' of the tile grid) too, when tiles align."""
    x = torch.randn(2, 3, 70, 54)
    pointwise = _tiled(x, lambda t: 2 * t + 1, 16, 16, 0.25)
    assert torch.allclose(pointwise, 2 * x + 1, atol=1e-6)
    y = torch.randn(1, 2, 96, 80)
    pooled = _tiled(y, lambda t: F.avg_pool2d(t, 4), 32, 8, 0.25)
    assert torch.allclose(pooled, F.avg_pool2d(y, 4), atol=1e-6)
    upsampled = _tiled(y[:, :, :24, :20], lambda t: F.interpolate(t, scale_factor=4.0), 8, 32, 0.25)
    assert torch.allclose(upsampled, F.interpolate(y[:, :, :24, :20], scale_factor=4.0), atol=1e-6)


def test_sliced_equals_batched(pair):
    _, ours = pair
    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    z = torch.randn(3, 4, 8, 8, generator=g)
    with torch.no_grad():
        enc_err = _max_err(ours.encode(x, sliced=True).mean, ours.encode(x).mean)
        dec_err = _max_err(ours.decode(z, sliced=True), ours.decode(z))
        tiled_sliced = ours.decode(torch.randn(2, 4, 12, 12, generator=g), sliced=True, tile_size=32)
    print(f"sliced vs batched: encode {enc_err:.1e}, decode {dec_err:.1e}")
    assert enc_err < 1e-5 and dec_err < 1e-5 and tiled_sliced.shape == (2, 3, 48, 48)


def test_posterior_clamps_logvar_and_uses_the_generator():
    moments = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 50.0)], dim=1)
    post = DiagonalGaussian(moments)
    assert post.logvar.max().item() == 20.0
    small = DiagonalGaussian(torch.cat([torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), -60.0)], 1))
    assert small.logvar.min().item() == -30.0 and torch.allclose(small.sample(), small.mean)
    a = post.sample(torch.Generator().manual_seed(0))
    b = post.sample(torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert DiagonalGaussian(torch.zeros(2, 8, 3, 3)).kl().tolist() == [0.0, 0.0]


def test_sd_preset_has_diffusers_shapes():
    cfg = vae_preset("sd")
    d = vae_config_to_diffusers(cfg)
    d.pop("_class_name")
    with torch.device("meta"):
        ours, theirs = AutoencoderKL(cfg), diffusers.AutoencoderKL(**d)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(theirs)
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863
    assert vae_config_from_diffusers(dict(theirs.config)) == cfg
    assert cfg.scaling_factor == 0.18215 and cfg.downscale == 8


def test_tiny_preset_round_trip_shapes():
    model = AutoencoderKL(vae_preset("tiny")).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 16, 16) * 2 - 1, sample_posterior=True,
                    generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 16, 16)
    with pytest.raises(InvalidArgument, match="preset"):
        vae_preset("sdxl")
    with pytest.raises(InvalidArgument, match="z must be"):
        model.decode(torch.randn(1, 3, 8, 8))
    with pytest.raises(InvalidArgument, match="tile_size"):
        model.decode(torch.randn(1, 4, 8, 8), tile_size=15)
    with pytest.raises(InvalidArgument, match="tile_overlap"):
        model.encode(torch.randn(1, 3, 8, 8), tile_size=4, tile_overlap=1.0)
