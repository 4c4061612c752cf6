"""Prepacked oneDNN layers (`ldmkit.models.onednn`): the same outputs and input gradients as the
plain layers, at any input size, and what `load_pipeline` does with them on the CPU."""

import copy
import os

import pytest
import torch
from torch import nn

from ldmkit import kernels
from ldmkit.models import onednn
from ldmkit.models.layers import GEGLU, Upsample
from ldmkit.models.unet import UNet, unet_preset

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this PyTorch build has no oneDNN kernels")

CL = torch.channels_last
# oneDNN's bf16 needs AVX-512 or AVX-NE-CONVERT: AVX2-only CPUs (AMD Zen 3) run these in float32 only
NEEDS_BF16 = pytest.mark.skipif(not onednn.available(torch.bfloat16), reason="oneDNN has no bf16 kernels for this CPU")


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().float(), ref.detach().float()
    return float((a - ref).norm() / ref.norm())


def tiny_unet(dtype: torch.dtype) -> UNet:
    torch.manual_seed(0)
    return UNet(unet_preset("tiny")).eval().to(dtype)


def unet_inputs(batch: int, height: int, width: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, height, width, generator=g).to(dtype)
    ctx = torch.randn(batch, 77, tiny_unet(dtype).config.context_dim, generator=g).to(dtype)
    return x, torch.linspace(10.0, 900.0, batch), ctx


def plain_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear, GEGLU)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), pytest.param(torch.bfloat16, 2e-2, marks=NEEDS_BF16)])
@pytest.mark.parametrize("shape", [(2, 16, 16), (3, 24, 40)])  # the size packed for, and others
def test_packed_unet_matches_the_plain_one(dtype, tol, shape):
    plain = tiny_unet(dtype)
    packed = onednn.prepack(copy.deepcopy(plain))
    assert plain_layers(packed) == [] and plain_layers(plain)  # every conv, linear and GEGLU replaced
    x, t, ctx = unet_inputs(*shape, dtype)
    with torch.no_grad():
        ref, out = plain(x, t, ctx), packed(x, t, ctx)
        cl_out = packed(x.contiguous(memory_format=CL), t, ctx)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < tol and rel_err(cl_out, ref) < tol
    if dtype == torch.bfloat16:
        assert rel_err(out, plain.float()(x.float(), t, ctx.float())) < tol  # and the float32 result


@pytest.mark.skipif(not kernels.conv_kernel_available(), reason="no AMX, g++ or Linux here")
def test_prepack_gives_wide_3x3_convolutions_to_the_amx_kernel(monkeypatch):
    """The tiny U-Net's convolutions are narrow: with the threshold lowered, its bf16 3x3 ones (and
    only those) run on kernels.conv3x3, with the plain model's outputs and input gradients."""
    monkeypatch.setattr(onednn, "AMX_CONV_MIN_CHANNELS", 32)
    plain = tiny_unet(torch.bfloat16)
    packed = onednn.prepack(copy.deepcopy(plain))
    amx = [name for name, m in packed.named_modules() if isinstance(m, onednn.AmxConv2d)]
    convs = [name for name, m in plain.named_modules() if isinstance(m, nn.Conv2d)
             and m.kernel_size == (3, 3) and m.stride == (1, 1) and m.out_channels % 64 == 0 and m.in_channels % 32 == 0]
    assert amx == convs and amx
    x, t, ctx = unet_inputs(2, 16, 16, torch.bfloat16)
    with torch.no_grad():
        ref, out = plain(x, t, ctx), packed(x, t, ctx)
    assert rel_err(out, ref) < 2e-2
    grads = []
    for model in (plain, packed):
        x_in = x.clone().requires_grad_(True)
        (model(x_in, t, ctx).float() ** 2).sum().backward()
        grads.append(x_in.grad)
    assert rel_err(grads[1], grads[0]) < 2e-2


def test_gradients_flow_through_packed_layers_to_the_input():
    """CLIP and classifier guidance differentiate the denoiser with respect to x."""
    plain = tiny_unet(torch.float32)
    packed = onednn.prepack(copy.deepcopy(plain))
    x, t, ctx = unet_inputs(2, 16, 16, torch.float32)
    grads = []
    for model in (plain, packed):
        x_in = x.clone().requires_grad_(True)
        (model(x_in, t, ctx) ** 2).sum().backward()
        grads.append(x_in.grad)
    assert rel_err(grads[1], grads[0]) < 1e-5


def test_packed_geglu_fuses_gelu_and_product_exactly_enough():
    torch.manual_seed(0)
    geglu = GEGLU(32, 128).eval()
    x = torch.randn(2, 50, 32)
    view = torch.randn(2, 32, 50).transpose(1, 2)  # (2, 50, 32), not row-contiguous
    packed = onednn.PackedGEGLU(geglu)
    with torch.no_grad():
        assert rel_err(packed(x), geglu(x)) < 1e-5
        assert rel_err(packed(view), geglu(view)) < 1e-5


@pytest.mark.skipif(not kernels.conv_kernel_available(), reason="no AMX, g++ or Linux here")
def test_prepack_gives_bf16_geglus_to_the_amx_kernel_with_the_plain_outputs_and_gradients():
    plain = tiny_unet(torch.bfloat16)
    packed = onednn.prepack(copy.deepcopy(plain))
    geglus = [name for name, m in plain.named_modules() if isinstance(m, GEGLU)]
    assert geglus and [name for name, m in packed.named_modules() if isinstance(m, onednn.AmxGEGLU)] == geglus
    assert not any(isinstance(m, onednn.AmxGEGLU) for m in onednn.prepack(tiny_unet(torch.float32)).modules())
    geglu, amx = plain.get_submodule(geglus[0]), packed.get_submodule(geglus[0])
    x = torch.randn(2, 40, geglu.proj.in_features).bfloat16()
    with torch.no_grad():
        assert rel_err(amx(x), copy.deepcopy(geglu).float()(x.float())) < 3e-3
    grads = []
    for layer in (geglu, amx):
        x_in = x.clone().requires_grad_(True)
        (layer(x_in).float() ** 2).sum().backward()
        grads.append(x_in.grad)
    assert rel_err(grads[1], grads[0]) < 1e-2


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), pytest.param(torch.bfloat16, 1e-2, marks=NEEDS_BF16)])
def test_packed_upsample_gives_the_plain_result_through_its_parities(dtype, tol):
    torch.manual_seed(0)
    up = Upsample(64).eval().to(dtype)
    packed = onednn.PackedUpsample(up)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, 16, 20, generator=g).to(dtype).contiguous(memory_format=CL)  # 640 pixels: the parities
    small = torch.randn(1, 64, 8, 8, generator=g).to(dtype)  # 64 pixels: the plain way
    with torch.no_grad():
        assert packed.phases is None and rel_err(packed(small), up(small)) < tol and packed.phases is None
        got = packed(x)
        assert packed.phases is not None  # made at the first call that takes it
        assert got.shape == (2, 64, 32, 40) and got.is_contiguous(memory_format=CL)
        assert rel_err(got, up(x)) < tol
        assert rel_err(packed(x, size=(31, 40)), up(x, size=(31, 40))) < tol  # to meet an odd skip
        assert rel_err(packed(x, size=(32, 40)), up(x, size=(32, 40))) < tol
    x.requires_grad_(True)
    packed(x).float().square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.skipif(not kernels.conv_kernel_available(), reason="no AMX, g++ or Linux here")
def test_packed_upsample_runs_its_parities_on_the_amx_kernel_where_its_convolution_is_there(monkeypatch):
    monkeypatch.setattr(onednn, "AMX_CONV_MIN_CHANNELS", 64)
    torch.manual_seed(0)
    up = Upsample(64).eval().bfloat16()
    packed = onednn.PackedUpsample(up)
    assert isinstance(packed.conv, onednn.AmxConv2d)
    calls = []
    monkeypatch.setattr(kernels, "upsample_conv3x3", lambda *a, f=kernels.upsample_conv3x3: calls.append(1) or f(*a))
    small = torch.randn(1, 64, 5, 7).bfloat16()  # 35 pixels: small maps too
    with torch.no_grad():
        assert rel_err(packed(small), up(small)) < 1e-2 and calls == [1]
        assert packed.phases is None  # not oneDNN's
        assert rel_err(packed(small, size=(9, 14)), up(small, size=(9, 14))) < 1e-2 and calls == [1]  # plain


def test_strided_inputs_give_the_plain_result():
    """The oneDNN linear kernel reads dense rows: views must be made contiguous first."""
    torch.manual_seed(0)
    linear = nn.Linear(24, 16)
    x = torch.randn(3, 24, 40).transpose(1, 2)  # (3, 40, 24), not row-contiguous
    with torch.no_grad():
        assert rel_err(onednn.PackedLinear(linear.weight, linear.bias)(x), linear(x)) < 1e-6


def test_prepack_refuses_models_off_the_cpu_and_builds_without_onednn(monkeypatch):
    with pytest.raises(ValueError, match="on the CPU"):
        onednn.prepack(nn.Linear(2, 2, device="meta"))
    monkeypatch.setattr(onednn, "available", lambda: False)
    with pytest.raises(RuntimeError, match="no oneDNN"):
        onednn.prepack(nn.Linear(2, 2))


@NEEDS_BF16
def test_load_pipeline_prepacks_the_bf16_cpu_unet_and_keeps_its_images():
    from ldmkit.pipelines.load import load_pipeline

    packed = load_pipeline(None, precision="bf16", device="cpu", prepack=True)
    plain = load_pipeline(None, precision="bf16", device="cpu", prepack=False)
    fp32 = load_pipeline(None, precision="fp32", device="cpu")
    assert plain_layers(packed.unet) == [] and plain_layers(plain.unet) and plain_layers(fp32.unet)
    assert packed.vae.decoder.conv_in.weight.is_contiguous(memory_format=CL)
    assert plain.unet.conv_in.weight.is_contiguous(memory_format=CL)
    kwargs = dict(sampler="dpmpp_2m", steps=8, cfg_scale=5.0, num_images=2, seed=3, output="tensor")
    prompt = "a red circle to the left of a blue square"
    a, b, c = (p.txt2img(prompt, **kwargs) for p in (packed, plain, fp32))
    # bf16 itself moves this small model's images by a few /255 from float32 (measured 3.7 for
    # the plain layers); the packed layers, which round less often, must not move them further
    off_packed, off_plain = ((x - c).abs().mean() * 255 for x in (a, b))
    assert off_packed < 1.2 * off_plain + 0.5, (off_packed, off_plain)


@NEEDS_BF16
@pytest.mark.parametrize("amx", [True, False])
def test_load_pipeline_prepacks_the_bf16_unet_by_default_with_or_without_amx(monkeypatch, amx):
    from ldmkit.pipelines import load

    monkeypatch.setattr(onednn, "cpu_has_amx", lambda: amx)
    pipe = load.load_pipeline(None, precision="bf16", device="cpu")
    assert plain_layers(pipe.unet) == [] and any(isinstance(m, onednn.PackedConv2d) for m in pipe.unet.modules())


REORDER_PROBE = """
import torch
from ldmkit.models import onednn
x = torch.randn(2, 320, 16, 16).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
layers = [onednn.PackedConv2d(torch.nn.Conv2d(320, 320, k, padding=k // 2).to(torch.bfloat16)) for k in (1, 3)]
with torch.inference_mode():
    for layer in layers:
        layer(x)
    print("CALLS", flush=True)
    for layer in layers:
        layer(x)
"""


@NEEDS_BF16
@pytest.mark.skipif(onednn.cpu_has_amx(),
                    reason="on AMX the weights are laid out without an input size, as measured fast")
def test_packed_convolution_weights_are_not_reordered_again_at_each_call():
    """Laid out without an input size, oneDNN's packed 1x1 and 320-channel 3x3 weights came out in
    layouts AMD Zen 5's kernels did not take, so every call reordered them again (41 ms a call for
    a 1280-channel 1x1 convolution at 16x16, against 1.9 ms). After the first calls, none may."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", REORDER_PROBE], capture_output=True, text=True, check=True,
                          env={**os.environ, "ONEDNN_VERBOSE": "1"})
    later = proc.stdout.split("CALLS", 1)[1].splitlines()
    assert any(",exec,cpu,convolution," in line for line in later)  # the probe does see oneDNN's calls
    assert [line for line in later if ",exec,cpu,reorder," in line] == []


def test_without_onednn_bf16_prepack_says_so_and_load_pipeline_keeps_plain_layers(monkeypatch):
    """On a CPU oneDNN has no bf16 code for, prepacking a bf16 model is a one-line error, and
    load_pipeline asked to prepack keeps the plain channels_last layers (which PyTorch still runs)."""
    from ldmkit.pipelines.load import load_pipeline

    monkeypatch.setattr(onednn, "_bf16_reorders", lambda: False)
    assert onednn.available() and not onednn.available(torch.bfloat16)
    with pytest.raises(RuntimeError, match="no bf16 kernels for this CPU"):
        onednn.prepack(nn.Linear(2, 2).to(torch.bfloat16))
    onednn.prepack(nn.Linear(2, 2))  # float32 still packs
    pipe = load_pipeline(None, precision="bf16", device="cpu", prepack=True)
    assert plain_layers(pipe.unet) and pipe.unet.conv_in.weight.is_contiguous(memory_format=CL)
