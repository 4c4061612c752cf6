"""Winograd's F(2x2, 3x3) convolutions (`onednn.WinogradConv2d`, `kernels.winograd_*`) against the
convolution in float64, pixel by pixel, and when `prepack` and the first call choose them."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldmkit import kernels
from ldmkit.cpu import cpu_has_amx
from ldmkit.models import onednn
from ldmkit.models.layers import Upsample
from ldmkit.models.unet import UNet, unet_preset
from ldmkit.models.vae import AutoencoderKL, VAEConfig

pytestmark = pytest.mark.skipif(not (onednn.available(torch.bfloat16) and kernels.winograd_kernel_available()),
                                reason="no oneDNN bf16, AVX512-BF16, g++ or Linux here")
CL = torch.channels_last
BF16 = torch.bfloat16


def bf16_conv(c: int, o: int, bias: bool = True) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(c, o, 3, padding=1, bias=bias).to(BF16)


def feature_map(b: int, c: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g).to(BF16)


def exact(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    bias = None if conv.bias is None else conv.bias.double()
    return F.conv2d(x.double(), conv.weight.double(), bias, padding=1).detach()


def worst_pixel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest relative error over output pixels (each pixel's vector of channels): a wrong
    edge row or column shows here even where the whole map's error is small."""
    diff = (out.detach().double() - ref).norm(dim=1)
    return float((diff / ref.norm(dim=1).clamp_min(1e-12)).max())


@pytest.mark.parametrize("b,c,o,h,w,bias", [
    (2, 64, 64, 16, 16, True),  # the smallest map taken
    (1, 80, 72, 17, 19, True),  # odd sides; channels not a multiple of 16
    (3, 64, 96, 24, 20, False),
])
@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
def test_winograd_convolution_matches_the_exact_one_at_every_pixel(b, c, o, h, w, bias, layout):
    conv = bf16_conv(c, o, bias)
    wino = onednn.WinogradConv2d(conv)
    x = feature_map(b, c, h, w).contiguous(memory_format=layout)
    residual = feature_map(b, o, h, w, seed=2)
    with torch.no_grad():
        out, summed = wino(x), wino.forward_plus(x, residual)
        direct = onednn.PackedConv2d(conv)(x)
    assert wino.direct is None and len(wino.positions) == 16  # Winograd's way was taken
    assert out.shape == (b, o, h, w) and out.dtype == BF16 and out.is_contiguous(memory_format=CL)
    ref = exact(conv, x)
    # bf16 transforms: 0.5% relative (0.75% at the worst pixel) where the direct way's output
    # rounding gives 0.17% (0.23%)
    assert rel(out, ref) < 0.007 and worst_pixel_error(out, ref) < 0.01 and worst_pixel_error(direct, ref) < 0.004
    assert worst_pixel_error(summed, ref + residual.double()) < 0.01


@pytest.mark.parametrize("band_rows", [1, 4, 8])  # 4 and 8: bands that straddle the two images' tile rows
def test_a_large_map_goes_through_in_bands_of_tile_rows_to_the_same_output(monkeypatch, band_rows):
    b, c, o, h, w = 2, 64, 80, 17, 20  # 9 tile rows an image
    conv = bf16_conv(c, o, True)
    x, residual = feature_map(b, c, h, w), feature_map(b, o, h, w, seed=2)
    wino = onednn.WinogradConv2d(conv)
    with torch.no_grad():
        whole = wino.forward_plus(x, residual)
        monkeypatch.setattr(onednn, "WINOGRAD_BAND_BYTES", band_rows * 16 * (w // 2) * (c + o) * 2)
        banded = wino.forward_plus(x, residual)
    assert torch.equal(banded, whole)
    assert worst_pixel_error(banded, exact(conv, x) + residual.double()) < 0.01


def test_the_transforms_refuse_tile_rows_outside_the_batch():
    x = feature_map(2, 16, 6, 6)  # 6 tile rows
    assert kernels.winograd_input(x, (2, 6)).shape == (16, 4 * 3, 16)
    for rows in ((0, 7), (-1, 2), (3, 3)):
        with pytest.raises(RuntimeError, match="refused"):
            kernels.winograd_input(x, rows)


def test_small_maps_take_the_direct_way_for_good_and_large_ones_winograds():
    conv = bf16_conv(64, 64)
    side = int(onednn.WINOGRAD_MIN_PIXELS ** 0.5)
    small, large = feature_map(2, 64, side - 1, side), feature_map(2, 64, side, side)
    with torch.no_grad():
        direct, winograd = onednn.WinogradConv2d(conv), onednn.WinogradConv2d(conv)
        assert torch.equal(direct(small), onednn.PackedConv2d(conv)(small))  # the same oneDNN call
        assert torch.equal(direct(large), onednn.PackedConv2d(conv)(large))  # fixed by the first call
        assert direct.positions is None
        winograd(large)
        assert winograd.direct is None  # the oneDNN weight released
        assert worst_pixel_error(winograd(small), exact(conv, small)) < 0.01  # and smaller maps after


def test_gradients_flow_through_the_weight_given_back_from_its_transform():
    conv = bf16_conv(64, 64)
    wino = onednn.WinogradConv2d(conv)
    x = feature_map(1, 64, 16, 16)
    with torch.no_grad():
        wino(x)  # Winograd's way: the dense weight comes back from the transform
    assert rel(wino.dense_weight(), conv.weight) < 4e-3
    xg = x.clone().requires_grad_()
    out = wino(xg)
    out.float().square().sum().backward()
    xr = x.clone().requires_grad_()
    F.conv2d(xr, conv.weight, conv.bias, padding=1).float().square().sum().backward()
    assert out.requires_grad and rel(xg.grad, xr.grad) < 2e-2


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).norm() / ref.norm())


def test_the_weight_transform_and_its_inverse():
    weight = bf16_conv(32, 16).weight
    u = kernels.winograd_weight(weight)
    assert u.shape == (16, 16, 32) and u.dtype == BF16
    # U's corners are the weight's corners themselves (G's first and last rows pick g0 and g2)
    assert torch.equal(u[0], weight[:, :, 0, 0]) and torch.equal(u[15], weight[:, :, 2, 2])
    assert torch.equal(u[3], weight[:, :, 0, 2]) and torch.equal(u[12], weight[:, :, 2, 0])
    assert rel(kernels.winograd_weight_inverse(u), weight) < 4e-3


def test_winograd_output_refuses_products_of_the_wrong_shape():
    products = [torch.zeros(4, 16, dtype=BF16) for _ in range(16)]
    kernels.winograd_output(products, (1, 4, 4), torch.zeros(16))  # 4 tiles of 16 channels: fine
    with pytest.raises(RuntimeError, match="cannot make"):
        kernels.winograd_output(products, (1, 6, 4), torch.zeros(16))  # 6 tiles
    with pytest.raises(RuntimeError, match="cannot make"):
        kernels.winograd_output(products[:15], (1, 4, 4), torch.zeros(16))
    with pytest.raises(RuntimeError, match="cannot make"):
        kernels.winograd_output(products, (1, 4, 4), torch.zeros(16, dtype=BF16))


def test_prepack_gives_bf16_3x3_convolutions_to_winograd_where_asked_by_default_without_amx(monkeypatch):
    torch.manual_seed(0)
    unet = UNet(unet_preset("tiny")).eval().to(BF16)

    def winograd_convolutions(model, **how):
        packed = onednn.prepack(copy.deepcopy(model), **how)
        return [m for m in packed.modules() if isinstance(m, onednn.WinogradConv2d)]

    upsamplers = {id(m.conv) for m in unet.modules() if isinstance(m, Upsample)}  # keep their parity convolutions
    wide = [m for m in unet.modules() if type(m) is nn.Conv2d and m.kernel_size == (3, 3) and m.stride == (1, 1)
            and min(m.in_channels, m.out_channels) >= onednn.WINOGRAD_MIN_CHANNELS and id(m) not in upsamplers]
    assert wide and len(winograd_convolutions(unet, winograd=True)) == len(wide)
    assert len(winograd_convolutions(unet)) == (0 if cpu_has_amx() else len(wide))  # the default: not measured on AMX
    assert winograd_convolutions(unet, winograd=False) == []
    assert winograd_convolutions(unet.float(), winograd=True) == []  # bf16 only
    monkeypatch.setitem(kernels._enabled, "winograd", False)  # LDMKIT_WINOGRAD_KERNEL=0
    assert winograd_convolutions(unet.to(BF16), winograd=True) == []


def test_winograd_keeps_the_amx_kernel_as_its_direct_way_where_that_takes_the_convolution():
    torch.manual_seed(0)
    assert isinstance(onednn.WinogradConv2d(nn.Conv2d(64, 64, 3, padding=1).to(BF16)).direct, onednn.PackedConv2d)
    wide = nn.Conv2d(64, onednn.AMX_CONV_MIN_CHANNELS, 3, padding=1).to(BF16)
    wino = onednn.WinogradConv2d(wide)
    assert isinstance(wino.direct, onednn.AmxConv2d if kernels.conv_kernel_available() else onednn.PackedConv2d)
    small = torch.randn(2, 64, 8, 8).to(BF16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert worst_pixel_error(wino(small), exact(wide, small)) < 0.01  # the direct way, kept for good
    assert wino.direct is not None


def test_winograd_takes_its_transform_from_the_amx_kernels_weight_tiles():
    # on an AMX CPU a wide convolution's direct way is `AmxConv2d`; its tiles are plain tensors, so
    # the step from them to Winograd's way runs anywhere
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1).to(BF16)
    wino = onednn.WinogradConv2d(conv)
    wino.direct = onednn.AmxConv2d(conv)
    x = torch.randn(2, 64, 16, 16).to(BF16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert worst_pixel_error(wino(x), exact(conv, x)) < 0.01
    assert wino.direct is None


def test_a_vaes_3x3_convolutions_go_to_winograd_but_not_its_upsamplers_and_a_plain_copy_undoes_it(monkeypatch):
    monkeypatch.setattr(onednn, "cpu_has_amx", lambda: False)  # the default's choice where the CPU has no AMX
    torch.manual_seed(0)
    config = VAEConfig(block_channels=(64, 64), layers_per_block=1, sample_size=32)
    vae = AutoencoderKL(config).eval().to(BF16)
    upsamplers = {id(m.conv) for m in vae.modules() if isinstance(m, Upsample)}
    wide = [m for m in vae.modules() if type(m) is nn.Conv2d and onednn._plain_3x3(m) and id(m) not in upsamplers
            and min(m.in_channels, m.out_channels) >= onednn.WINOGRAD_MIN_CHANNELS]
    wino = copy.deepcopy(vae)
    assert wide and onednn.winograd_convolutions(wino) == len(wide)
    assert all(type(m.conv) is nn.Conv2d for m in wino.modules() if isinstance(m, Upsample))
    z = torch.randn(1, 4, 16, 16).to(BF16)
    with torch.no_grad():
        reference = vae.float().decode(z.float()).double()
        out = wino.decode(z)
        assert all(m.direct is None for m in wino.decoder.modules() if isinstance(m, onednn.WinogradConv2d))  # 16x16 up
        assert (out.double() - reference).norm() / reference.norm() < 0.02
        plain = onednn.plain_copy(wino).float()  # what the pipeline's float32 retry decodes with
        assert not any(isinstance(m, onednn.WinogradConv2d) for m in plain.modules())
        again = plain.decode(z.float()).double()
    assert (again - reference).norm() / reference.norm() < 0.01  # the weights back to bf16 rounding
    assert any(isinstance(m, onednn.WinogradConv2d) for m in wino.modules())  # the original is left as it was
    monkeypatch.setattr(onednn, "cpu_has_amx", lambda: True)
    assert onednn.winograd_convolutions(copy.deepcopy(vae.to(BF16))) == 0  # not measured on AMX: left as it is
