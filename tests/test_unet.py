"""U-Net parity against diffusers (random weights, fp32), presets, and the minimal U-Net.

Each parity test builds a diffusers model, derives our config from its config dict, loads its
state dict into ours with strict=True (no renames) and compares predictions.
"""

import gc

import pytest
import torch
from torch import nn

from ldmkit.checkpoints.keys_unet_vae import unet_config_from_diffusers, unet_config_to_diffusers
from ldmkit.errors import InvalidArgument
from ldmkit.models.layers import timestep_embedding
from ldmkit.models.unet import UNet, UNetConfig, unet_preset

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4

SMALL_SD1 = dict(
    sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=48, attention_head_dim=4, norm_num_groups=8,
)
SMALL_SD2 = dict(
    sample_size=16, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=64, attention_head_dim=[2, 2, 4, 4], use_linear_projection=True,
    upcast_attention=True, norm_num_groups=8,
)
SMALL_INPAINT = dict(SMALL_SD1, in_channels=9, out_channels=4)


def _ours_from(diffusers_model) -> UNet:
    cfg = unet_config_from_diffusers(dict(diffusers_model.config))
    ours = UNet(cfg).eval()
    ours.load_state_dict(diffusers_model.state_dict(), strict=True)
    return ours


def _seeded_pair(kwargs: dict):
    """A seeded random diffusers UNet2DConditionModel built from kwargs, and ours with its weights."""
    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(**kwargs).eval()
    return theirs, _ours_from(theirs)


@pytest.mark.oracle
@pytest.mark.parametrize("kwargs", [SMALL_SD1, SMALL_SD2, SMALL_INPAINT], ids=["sd1", "sd2", "inpaint"])
def test_conditional_unet_matches_diffusers(kwargs):
    theirs, ours = _seeded_pair(kwargs)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, kwargs.get("in_channels", 4), 16, 16, generator=g)
    ctx = torch.randn(3, 7, kwargs["cross_attention_dim"], generator=g)
    worst = 0.0
    with torch.no_grad():
        for t in (torch.tensor([0.0, 3.7, 812.25]), 999.5):
            t_theirs = t if torch.is_tensor(t) else torch.tensor(t)  # diffusers would truncate a float
            expected = theirs(x, t_theirs, ctx).sample
            got = ours(x, t, ctx)
            assert got.shape == expected.shape == (3, 4, 16, 16)
            assert expected.std() > 1e-2  # a real signal, not zeros
            worst = max(worst, (got - expected).abs().max().item())
    print(f"max abs error {worst:.2e}")
    assert worst < TOL


def _first_conv_batches(model: UNet) -> list[int]:
    """The batch sizes conv_in sees, call by call."""
    seen = []
    model.conv_in.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    return seen


@pytest.mark.oracle
@pytest.mark.parametrize("kwargs", [SMALL_SD1, SMALL_SD2, SMALL_INPAINT], ids=["sd1", "sd2", "inpaint"])
def test_cfg_batch_runs_its_shared_start_once_and_matches_diffusers(kwargs):
    # a CFG batch [x, x] under two contexts: the layers before the first cross-attention run on x
    # once, and both halves still equal diffusers' full-batch output
    theirs, ours = _seeded_pair(kwargs)
    batches = _first_conv_batches(ours)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, kwargs.get("in_channels", 4), 16, 16, generator=g).repeat(2, 1, 1, 1)  # (4, C, 16, 16)
    ctx = torch.randn(4, 7, kwargs["cross_attention_dim"], generator=g)
    t = torch.tensor([3.7, 812.25, 3.7, 812.25])
    with torch.no_grad():
        expected = theirs(x, t, ctx).sample
        got = ours(x, t, ctx)
    assert batches == [2]
    assert (expected[:2] - expected[2:]).abs().max() > 1e-2  # the contexts make the halves differ
    assert (got - expected).abs().max().item() < TOL


def test_shared_start_only_where_the_halves_repeat_in_inference():
    torch.manual_seed(0)
    model = UNet(unet_preset("tiny")).eval()
    batches = _first_conv_batches(model)
    x = torch.randn(1, 4, 8, 8).repeat(2, 1, 1, 1)
    ctx = torch.randn(2, 3, 32)
    with torch.no_grad():
        model(x, torch.tensor([5.0, 5.0]), ctx)
        model(x, torch.tensor([5.0, 6.0]), ctx)  # two timesteps
        model(torch.randn(2, 4, 8, 8), 5.0, ctx)  # two latents
    model(x, 5.0, ctx)  # grad enabled: each row must get its own gradient
    assert batches == [1, 2, 2, 2]


def test_reusing_context_projects_each_context_once():
    torch.manual_seed(0)
    model = UNet(unet_preset("tiny")).eval()
    attn2 = [m for name, m in model.named_modules() if name.endswith("attn2")]
    projections = []
    for a in attn2:
        a.to_k.register_forward_hook(lambda module, args, out: projections.append(1))
    x, ctx, other = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    with torch.no_grad():
        expected, expected_other = model(x, 5.0, ctx), model(x, 7.0, other)
        projections.clear()
        with model.reusing_context():
            first = model(x, 5.0, ctx)
            again = model(x, 7.0, ctx.clone())  # an equal context: the keys and values are kept
            assert len(projections) == len(attn2)
            changed = model(x, 7.0, other)
            assert len(projections) == 2 * len(attn2)
            other.mul_(2)  # changed in place: no longer the context the memos were made from
            model(x, 7.0, other)
            assert len(projections) == 3 * len(attn2)
            other.div_(2)
        assert all(a.context_kv is None and not a.reuses_context for a in attn2)
    assert torch.equal(first, expected) and torch.equal(changed, expected_other)
    assert torch.equal(again, model(x, 7.0, ctx).detach())
    with model.reusing_context():  # with gradients every call projects, and they flow to the context
        ctx.requires_grad_(True)
        projections.clear()
        model(x, 5.0, ctx).sum().backward()
        model(x, 5.0, ctx).sum().backward()
    assert len(projections) == 2 * len(attn2) and ctx.grad is not None


@pytest.mark.oracle
def test_conditional_unet_odd_latent_size_matches_diffusers():
    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(**SMALL_SD1).eval()
    ours = _ours_from(theirs)
    x, ctx = torch.randn(1, 4, 13, 10), torch.randn(1, 5, 48)
    with torch.no_grad():
        err = (ours(x, 11.5, ctx) - theirs(x, torch.tensor(11.5), ctx).sample).abs().max().item()
    assert err < TOL


@pytest.mark.oracle
@pytest.mark.parametrize("head_dim", [8, None])
def test_pixel_unet_with_class_labels_matches_diffusers(head_dim):
    torch.manual_seed(0)
    theirs = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64),
        layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=head_dim,
        norm_num_groups=8, num_class_embeds=10, freq_shift=1, flip_sin_to_cos=False,
    ).eval()
    ours = _ours_from(theirs)
    assert ours.config.num_heads == ((4, 8, 8) if head_dim else (1, 1, 1))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 16, 16, generator=g)
    t, labels = torch.tensor([17.5, 0.25]), torch.tensor([3, 9])
    with torch.no_grad():
        expected = theirs(x, t, class_labels=labels).sample
        got = ours(x, t, class_labels=labels)
    err = (got - expected).abs().max().item()
    print(f"max abs error {err:.2e}")
    assert expected.std() > 1e-2 and err < TOL


class CourseBasicUNet(nn.Module):
    """The reference: BasicUNet from the Hugging Face diffusion course, unit 1."""

    def __init__(self, in_channels=1, out_channels=1):
        super().__init__()
        self.down_layers = nn.ModuleList([
            nn.Conv2d(in_channels, 32, kernel_size=5, padding=2),
            nn.Conv2d(32, 64, kernel_size=5, padding=2),
            nn.Conv2d(64, 64, kernel_size=5, padding=2),
        ])
        self.up_layers = nn.ModuleList([
            nn.Conv2d(64, 64, kernel_size=5, padding=2),
            nn.Conv2d(64, 32, kernel_size=5, padding=2),
            nn.Conv2d(32, out_channels, kernel_size=5, padding=2),
        ])
        self.act = nn.SiLU()
        self.downscale = nn.MaxPool2d(2)
        self.upscale = nn.Upsample(scale_factor=2)

    def forward(self, x):
        h = []
        for i, layer in enumerate(self.down_layers):
            x = self.act(layer(x))
            if i < 2:
                h.append(x)
                x = self.downscale(x)
        for i, layer in enumerate(self.up_layers):
            if i > 0:
                x = self.upscale(x)
                x += h.pop()
            x = self.act(layer(x))
        return x


def test_minimal_unet_matches_course_basic_unet():
    torch.manual_seed(0)
    ref = CourseBasicUNet().eval()
    ours = UNet(unet_preset("minimal")).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-6)
        assert torch.allclose(ours(x, t=0.3), ref(x), atol=1e-6)  # t is accepted and ignored
    with pytest.raises(InvalidArgument):
        ours(x, context=torch.randn(4, 2, 8))


@pytest.mark.parametrize("name", ["sd15", "sd2", "sd15_inpaint", "pixel_ddpm"])
def test_presets_have_diffusers_shapes(name):
    """Full-size presets, built on the meta device: same keys and shapes as diffusers'."""
    cfg = unet_preset(name)
    d = unet_config_to_diffusers(cfg)
    cls = getattr(diffusers, d.pop("_class_name"))
    with torch.device("meta"):
        ours, theirs = UNet(cfg), cls(**d)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(theirs)
    assert unet_config_from_diffusers(dict(theirs.config)) == cfg


def test_sd15_parameter_count():
    with torch.device("meta"):
        n = sum(p.numel() for p in UNet(unet_preset("sd15")).parameters())
    assert n == 859_520_964


def test_tiny_preset_runs_and_is_differentiable():
    torch.manual_seed(0)
    model = UNet(unet_preset("tiny"))
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    out = model(x, torch.tensor([1.5, 2.5]), torch.randn(2, 3, 32))
    out.square().mean().backward()
    assert out.shape == x.shape and x.grad is not None and torch.isfinite(x.grad).all()


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 0.5, 10.25, 999.0])
    for flip, shift, dim in [(True, 0, 32), (False, 1, 33)]:
        ours = timestep_embedding(t, dim, flip, shift)
        theirs = get_timestep_embedding(t, dim, flip, shift)
        assert torch.allclose(ours, theirs, atol=1e-6)


def test_user_errors_are_ldmkit_errors():
    model = UNet(unet_preset("tiny")).eval()
    x = torch.randn(2, 4, 8, 8)
    ctx = torch.randn(2, 3, 32)
    with pytest.raises(InvalidArgument, match="context"):
        model(x, 1.0)
    with pytest.raises(InvalidArgument, match="context"):
        model(x, 1.0, torch.randn(2, 3, 16))
    with pytest.raises(InvalidArgument, match="one per latent"):
        model(x, 1.0, torch.randn(1, 3, 32))
    with pytest.raises(InvalidArgument, match="timestep"):
        model(x, None, ctx)
    with pytest.raises(InvalidArgument, match=r"\(2,\)"):
        model(x, torch.ones(3), ctx)
    with pytest.raises(InvalidArgument, match="class"):
        model(x, 1.0, ctx, class_labels=torch.tensor([1, 2]))
    with pytest.raises(InvalidArgument, match="x must be"):
        model(torch.randn(2, 3, 8, 8), 1.0, ctx)
    with pytest.raises(InvalidArgument, match="preset"):
        unet_preset("sd99")
    with pytest.raises(InvalidArgument, match="field"):
        unet_preset("tiny", heads=3)
    with pytest.raises(InvalidArgument, match="divisible"):
        UNetConfig(block_channels=(30, 60, 60, 60))
    with pytest.raises(InvalidArgument, match="architecture"):
        UNetConfig(architecture="transformer")


@pytest.mark.slow
@pytest.mark.oracle
def test_full_sd15_unet_matches_diffusers():
    """The real SD 1.5 architecture (random init), latent 8x8, batch 1."""
    torch.manual_seed(0)
    d = unet_config_to_diffusers(unet_preset("sd15"))
    d.pop("_class_name")
    theirs = diffusers.UNet2DConditionModel(**d).eval()
    with torch.device("meta"):
        ours = UNet(unet_preset("sd15"))
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)  # shares the tensors
    ours.eval()
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 768)
    with torch.no_grad():
        expected = theirs(x, torch.tensor(421.5), ctx).sample
        got = ours(x, 421.5, ctx)
    err = (got - expected).abs().max().item()
    print(f"max abs error {err:.2e}")
    del theirs, ours
    gc.collect()
    assert err < TOL


# stabilityai/stable-diffusion-2-1 unet/config.json (diffusers' "attention_head_dim" is heads here)
SD21_CONFIG = dict(
    act_fn="silu", attention_head_dim=[5, 10, 20, 20], block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False, cross_attention_dim=1024,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1, dual_cross_attention=False, flip_sin_to_cos=True, freq_shift=0, in_channels=4,
    layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32, num_class_embeds=None,
    only_cross_attention=False, out_channels=4, sample_size=96,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    upcast_attention=True, use_linear_projection=True,
)


@pytest.mark.slow
@pytest.mark.oracle
def test_full_sd21_unet_matches_diffusers():
    """The real SD 2.1 architecture (heads 5/10/20/20, linear projections, 1024-wide context),
    random init, into our "sd2" preset with strict loading; latent 32x32, batch 1."""
    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(**SD21_CONFIG).eval()
    assert unet_config_from_diffusers(dict(theirs.config)) == unet_preset("sd2")
    with torch.device("meta"):
        ours = UNet(unet_preset("sd2"))
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)  # shares the tensors
    ours.eval()
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, 1024, generator=g)
    with torch.no_grad():
        expected = theirs(x, torch.tensor(421.5), ctx).sample
        got = ours(x, 421.5, ctx)
    err = (got - expected).abs().max().item()
    print(f"max abs error {err:.2e}")
    del theirs, ours
    gc.collect()
    assert expected.std() > 1e-2 and err < TOL
