"""`layers.Upsample`'s parity path (2x2 convolutions of the low-resolution map for the four output
parities) against nearest upsampling followed by the 3x3 convolution, and when it is taken."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from ldmkit.models import onednn
from ldmkit.models.layers import PARITY_MIN_PIXELS, Upsample, upsample_phase_weight

CL = torch.channels_last
NEEDS_BF16 = pytest.mark.skipif(not onednn.available(torch.bfloat16), reason="oneDNN has no bf16 kernels for this CPU")


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().float(), ref.detach().float()
    return float((a - ref).norm() / ref.norm())


def upsampled_then_conv(up: Upsample, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), up.conv.weight, up.conv.bias, padding=1)


def big_input(channels: int, dtype: torch.dtype, layout=torch.contiguous_format) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    side = int(PARITY_MIN_PIXELS ** 0.5)  # exactly the threshold, with an odd width to check the edges
    return torch.randn(1, channels, side, side + 1, generator=g).to(dtype).contiguous(memory_format=layout)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), pytest.param(torch.bfloat16, 1e-2, marks=NEEDS_BF16)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
def test_upsample_parities_give_nearest_upsampling_then_the_convolution(dtype, tol, layout):
    torch.manual_seed(0)
    up = Upsample(16).eval().to(dtype)
    x = big_input(16, dtype, layout)
    with torch.no_grad():
        got = up(x)
        assert up._phases is not None  # the parity path ran
        ref = upsampled_then_conv(up, x)
    assert got.shape == ref.shape == (1, 16, 2 * x.shape[2], 2 * x.shape[3]) and got.dtype == dtype
    assert got.is_contiguous(memory_format=layout)  # x's layout, as the plain way gives
    assert rel_err(got, ref) < tol
    if dtype == torch.bfloat16:  # and as close to the float32 result as the plain bf16 way
        exact = upsampled_then_conv(copy.deepcopy(up).float(), x.float())
        assert rel_err(got, exact) < 1.5 * rel_err(ref, exact) + 1e-3


def test_upsample_takes_the_plain_way_for_small_maps_other_sizes_and_gradients():
    torch.manual_seed(0)
    up = Upsample(8).eval()
    small = torch.randn(1, 8, 8, 8)  # under PARITY_MIN_PIXELS
    x = big_input(8, torch.float32)
    with torch.no_grad():
        assert rel_err(up(small), upsampled_then_conv(up, small)) < 1e-6 and up._phases is None
        odd = (2 * x.shape[2] - 1, 2 * x.shape[3])  # to meet an odd-sized skip
        expected = F.conv2d(F.interpolate(x, size=odd, mode="nearest"), up.conv.weight, up.conv.bias, padding=1)
        assert rel_err(up(x, size=odd), expected) < 1e-6 and up._phases is None
    x.requires_grad_(True)
    out = up(x)  # with gradients: the plain way, differentiable as ever
    assert up._phases is None
    out.square().sum().backward()
    assert x.grad is not None and up.conv.weight.grad is not None


def test_upsample_parities_follow_the_weights_they_come_from():
    """The parities' weight is kept between calls, and derived again when the convolution's weight
    or bias changes in place, is replaced, or the module is copied and cast."""
    torch.manual_seed(0)
    up = Upsample(8).eval()
    x = big_input(8, torch.float32)
    with torch.no_grad():
        up(x)
        kept = up._phases[0]
        up(x)
        assert up._phases[0] is kept  # not derived at every call
        up.conv.weight.mul_(-2.0)
        assert rel_err(up(x), upsampled_then_conv(up, x)) < 1e-5
        up.conv.bias.add_(1.0)
        assert rel_err(up(x), upsampled_then_conv(up, x)) < 1e-5
        up.load_state_dict({k: torch.randn_like(v) for k, v in up.state_dict().items()}, assign=True)
        assert rel_err(up(x), upsampled_then_conv(up, x)) < 1e-5
        doubled = copy.deepcopy(up).double()
        assert doubled(x.double()).dtype == torch.float64
        assert rel_err(doubled(x.double()), upsampled_then_conv(doubled, x.double())) < 1e-6
    buffer = io.BytesIO()
    torch.save(up, buffer)  # a whole module still pickles (its kept parities are left out)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded._phases is None


def test_upsample_phase_weight_sums_the_taps_each_parity_sees():
    weight = torch.arange(9.0).view(1, 1, 3, 3)  # rows (0 1 2) (3 4 5) (6 7 8)
    phases = upsample_phase_weight(weight).view(2, 2, 2, 2)  # (py, px, a, b)
    assert phases[0, 0].tolist() == [[0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]]
    assert phases[1, 1].tolist() == [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8]]
