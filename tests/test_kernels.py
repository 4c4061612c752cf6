"""`ldmkit.kernels`: the flash-attention kernel (its products on AMX tiles or as AVX512-BF16 dot
products, each tested where the CPU has it) gives PyTorch's attention, and the GroupNorm
kernel PyTorch's GroupNorm (with the shift before and SiLU after), the LayerNorm kernel
PyTorch's LayerNorm, the AMX 3x3 convolution F.conv2d (also after nearest 2x upsampling, by
output parities) and the AMX GEGLU PyTorch's GEGLU, to bf16 accuracy at every size they take;
the first three hand everything else to PyTorch unchanged, and all are what the U-Net and the
VAE run on in bf16 inference."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from ldmkit import kernels
from ldmkit.models.layers import GEGLU, Attention, BasicTransformerBlock, ResnetBlock

attention_kernel = pytest.mark.skipif(not kernels.attention_kernel(), reason="no AVX512-BF16, g++ or Linux here")
# the product paths this CPU runs: amx=True takes AMX tiles where they are, amx=False never
PATHS = [pytest.param(False, id="avx512_bf16")] + ([pytest.param(True, id="amx")]
                                                   if kernels.attention_kernel() == "amx" else [])
norm_kernel = pytest.mark.skipif(not kernels.group_norm_kernel_available(), reason="no AVX-512 BF16, g++ or Linux here")
conv_kernel = pytest.mark.skipif(not kernels.conv_kernel_available(), reason="no AMX, g++ or Linux here")
layer_norm_kernel = pytest.mark.skipif(not kernels.layer_norm_kernel_available(),
                                       reason="no AVX-512 BF16, g++ or Linux here")


@contextlib.contextmanager
def switched_off(switch):
    """One of our kernels off for the block (`kernels.set_attention_kernel` and the like): PyTorch runs."""
    previous = switch(False)
    try:
        yield
    finally:
        switch(previous)


def heads(batch: int, tokens: int, nh: int, width: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """(B, H, N, D) bf16 laid out as (B, N, H, D), the way Attention's projections are."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, tokens, nh, width, generator=g) * scale).bfloat16().transpose(1, 2)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref).norm() / ref.norm())


@attention_kernel
@pytest.mark.parametrize("amx", PATHS)
@pytest.mark.parametrize("b,h,n,m,d,dv", [
    (2, 8, 1024, 1024, 40, 40),  # SD 1.x's head width; whole key blocks
    (1, 2, 200, 300, 34, 34),  # widths past 32 narrowed to a tail of 2 (one pair)
    (1, 2, 130, 260, 50, 20),  # a tail of 18 with a narrow value
    (1, 2, 130, 260, 40, 50),  # four value tiles: no narrowing
    (1, 5, 300, 300, 64, 64),  # SD 2.x's; ragged blocks of queries and keys
    (2, 3, 1000, 77, 64, 64),  # cross-attention on a CLIP context
    (2, 8, 1024, 77, 80, 80),  # SD 1.x's wider heads: query tiles reloaded, output in two passes
    (1, 3, 256, 300, 160, 160),
    (1, 2, 100, 520, 96, 136),  # a value width apart, not a multiple of 64
    (1, 2, 257, 600, 18, 5),  # narrow widths, a value width apart from the key width
    (1, 1, 256, 256, 8, 24),
])
def test_attention_kernel_matches_pytorch(b, h, n, m, d, dv, amx):
    q, k, v = heads(b, n, h, d, 2.0, 1), heads(b, m, h, d, 1.0, 2), heads(b, m, h, dv, 1.0, 3)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    theirs = rel_err(F.scaled_dot_product_attention(q, k, v), ref)
    ours = kernels.attention(q, k, v, amx=amx)
    assert ours.shape == ref.shape and ours.dtype == torch.bfloat16
    assert rel_err(ours, ref) < max(2 * theirs, 4e-3)  # PyTorch's bf16 kernel: 1.7e-3 to 1.9e-3


@attention_kernel
@pytest.mark.parametrize("amx", PATHS)
@pytest.mark.parametrize("d,m", [(40, 512), (80, 512), (40, 300)])
def test_attention_kernel_with_scores_too_large_for_a_fixed_bound(d, m, amx):
    """|q||k| far above the largest score: the kernel keeps a running row max instead."""
    q, k, v = heads(1, 512, 2, d, 40.0, 1), heads(1, m, 2, d, 4.0, 2), heads(1, m, 2, d, 1.0, 3)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert rel_err(kernels.attention(q, k, v, amx=amx), ref) < 4e-3


@attention_kernel
@pytest.mark.parametrize("amx", PATHS)
def test_attention_kernel_writes_tokens_then_heads(amx):
    q = heads(2, 512, 4, 40)
    out = kernels.attention(q, q, q, amx=amx)
    assert out.transpose(1, 2).is_contiguous()  # (B, N, H, dv): Attention's reshape is free


@pytest.mark.parametrize("case", ["fp32", "grad", "wide", "odd", "small"])
def test_attention_leaves_other_work_to_pytorch(case):
    q = heads(1, 512, 2, 40)
    if case == "fp32":
        q = q.float()
    elif case == "grad":
        q = q.float().requires_grad_().bfloat16()
    elif case == "wide":
        q = heads(1, 512, 1, 192)
    elif case == "odd":
        q = heads(1, 512, 2, 17)
    else:
        q = heads(1, 64, 2, 40)
    assert torch.equal(kernels.attention(q, q, q), F.scaled_dot_product_attention(q, q, q))


def test_attention_switch_off_gives_pytorch():
    q = heads(1, 512, 2, 40)
    with switched_off(kernels.set_attention_kernel):
        assert torch.equal(kernels.attention(q, q, q), F.scaled_dot_product_attention(q, q, q))


@attention_kernel
def test_attention_module_runs_on_the_kernel():
    torch.manual_seed(0)
    layer = Attention(320, heads=8, head_dim=40).bfloat16().eval()
    x = torch.randn(2, 1024, 320).bfloat16()
    with torch.no_grad():
        ours = layer(x)
        kernels.set_attention_kernel(False)
        try:
            theirs = layer(x)
        finally:
            kernels.set_attention_kernel(True)
        ref = Attention.forward(layer.float(), x.float())
    assert not torch.equal(ours, theirs)  # a different kernel ran
    assert rel_err(ours, ref) < 2 * rel_err(theirs, ref) + 1e-3


# -- GroupNorm ---------------------------------------------------------------------------------


def feature_map(shape, channels_last: bool, mean: float = 0.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3 + mean).bfloat16()
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def random_norm(groups: int, channels: int, seed: int = 0) -> torch.nn.GroupNorm:
    torch.manual_seed(seed)
    norm = torch.nn.GroupNorm(groups, channels, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    return norm


def count_module_calls(*modules: torch.nn.Module) -> list:
    """A list that grows by one each time PyTorch runs one of `modules` (the kernel bypasses them)."""
    calls = []
    for module in modules:
        module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def norm_reference(x, norm, silu, shift):
    """float32 PyTorch on the same bf16 inputs."""
    with torch.no_grad():
        y = norm.float()(x.float() + (0 if shift is None else shift.float()[:, :, None, None]))
    return F.silu(y) if silu else y


@norm_kernel
@pytest.mark.parametrize("shape,groups", [
    ((2, 320, 64, 64), 32),  # SD 1.5's first level
    ((2, 1280, 8, 8), 32),  # its deepest: few pixels, many channels
    ((1, 35, 7, 5), 5),  # ragged: channels and pixels not multiples of 16
])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("silu,with_shift", [(False, False), (True, False), (True, True)])
def test_group_norm_kernel_matches_pytorch(shape, groups, channels_last, silu, with_shift):
    x = feature_map(shape, channels_last, mean=5.0)  # a mean well above the spread: no cancellation
    norm = random_norm(groups, shape[1])
    shift = torch.randn(shape[:2], generator=torch.Generator().manual_seed(1)) * 4 if with_shift else None
    ref = norm_reference(x, norm, silu, shift)
    pytorch_calls = count_module_calls(norm.bfloat16())
    with torch.no_grad():
        ours = kernels.group_norm(x, norm, silu=silu, shift=shift)
        assert not pytorch_calls
        with switched_off(kernels.set_group_norm_kernel):
            theirs = kernels.group_norm(x, norm, silu=silu, shift=shift)  # PyTorch's bf16 modules
        assert pytorch_calls
    assert ours.dtype == torch.bfloat16 and ours.shape == x.shape
    assert ours.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert rel_err(ours, ref) < max(rel_err(theirs, ref), 3e-3)  # PyTorch's bf16 path: 2.2e-3 to 5e-3


@norm_kernel
def test_group_norm_kernel_keeps_a_tiny_spread_under_a_large_mean():
    """Variance from sums around each channel's first value: a spread of 0.7 under a mean of 100
    (bf16's steps there are 0.5) is normalised as float32 does it."""
    g = torch.Generator().manual_seed(0)
    x = (100 + torch.randint(-2, 3, (1, 64, 16, 16), generator=g) * 0.5).bfloat16()
    norm = random_norm(8, 64)
    ref = norm_reference(x, norm, False, None)
    with torch.no_grad():
        ours = kernels.group_norm(x, norm.bfloat16())
    assert rel_err(ours, ref) < 3e-3


@norm_kernel
@pytest.mark.parametrize("change", ["in place", "in place, inference tensors", "replaced"])
def test_group_norm_kernel_sees_changed_weights(change):
    """The kernel's float32 copy of the scale and offset is cached per module: weights changed in
    place (a LoRA merge, a loaded state dict) or replaced must reach the next call."""
    x = feature_map((1, 32, 8, 8), False)
    inference = change == "in place, inference tensors"
    with torch.inference_mode(inference):
        norm = random_norm(8, 32).bfloat16()
    with torch.inference_mode() if inference else torch.no_grad():
        before = kernels.group_norm(x, norm)
        if change == "replaced":
            norm.weight, norm.bias = (torch.nn.Parameter(p * 2) for p in (norm.weight, norm.bias))
        else:
            norm.weight.mul_(2)
            norm.bias.mul_(2)
        after = kernels.group_norm(x, norm)
    assert torch.equal(after, 2 * before)  # doubling is exact in bf16


@pytest.mark.parametrize("case", ["fp32", "grad", "strided"])
def test_group_norm_leaves_other_work_to_pytorch(case):
    x, norm = feature_map((1, 32, 8, 8), False), random_norm(8, 32).bfloat16()
    pytorch_calls = count_module_calls(norm)
    if case == "fp32":
        x, norm = x.float(), norm.float()
    elif case == "grad":
        x = x.float().requires_grad_().bfloat16()
    else:
        x = x[:, :, :, ::2]
    assert torch.equal(kernels.group_norm(x, norm, silu=True), F.silu(norm(x)))
    assert len(pytorch_calls) == 2


@norm_kernel
def test_resnet_block_runs_on_the_group_norm_kernel():
    torch.manual_seed(0)
    block = ResnetBlock(64, 128, temb_channels=96, groups=32).bfloat16().eval()
    x = feature_map((2, 64, 16, 16), True)
    temb = torch.randn(2, 96).bfloat16()
    pytorch_calls = count_module_calls(block.norm1, block.norm2)
    with torch.no_grad():
        ours = block(x, temb)
        assert not pytorch_calls
        with switched_off(kernels.set_group_norm_kernel):
            theirs = block(x, temb)
        assert len(pytorch_calls) == 2  # the switch off: PyTorch ran both norms
        ref = ResnetBlock.forward(block.float(), x.float(), temb.float())
    assert rel_err(ours, ref) < 2 * rel_err(theirs, ref) + 1e-3


def random_layer_norm(width: int, seed: int = 0) -> torch.nn.LayerNorm:
    torch.manual_seed(seed)
    norm = torch.nn.LayerNorm(width)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.5)
        norm.bias.normal_()
    return norm


@layer_norm_kernel
@pytest.mark.parametrize("shape", [
    (2, 4096, 320),  # SD 1.5's first level
    (2, 256, 1280),  # its third
    (3, 77, 768),  # CLIP's text tokens
    (5, 7, 33),  # ragged: a width not a multiple of 16
])
def test_layer_norm_kernel_matches_pytorch(shape):
    x = feature_map(shape, False, mean=5.0)  # a mean well above the spread: no cancellation
    norm = random_layer_norm(shape[-1])
    with torch.no_grad():
        ref = norm(x.float())
        norm.bfloat16()
        pytorch_calls = count_module_calls(norm)
        ours = kernels.layer_norm(x, norm)
        assert not pytorch_calls
        with switched_off(kernels.set_layer_norm_kernel):
            theirs = kernels.layer_norm(x, norm)  # PyTorch's bf16 module
        assert pytorch_calls
    assert ours.dtype == torch.bfloat16 and ours.shape == x.shape
    assert rel_err(ours, ref) < max(rel_err(theirs, ref), 3e-3)


@layer_norm_kernel
def test_layer_norm_kernel_keeps_a_tiny_spread_under_a_large_mean():
    """The variance is taken around the mean: a spread of 0.7 under a mean of 100 (bf16's steps
    there are 0.5) is normalised as float32 does it."""
    g = torch.Generator().manual_seed(0)
    x = (100 + torch.randint(-2, 3, (4, 320), generator=g) * 0.5).bfloat16()
    norm = random_layer_norm(320)
    with torch.no_grad():
        ref = norm(x.float())
        ours = kernels.layer_norm(x, norm.bfloat16())
    assert rel_err(ours, ref) < 3e-3


@pytest.mark.parametrize("case", ["fp32", "grad", "strided", "2-D shape"])
def test_layer_norm_leaves_other_work_to_pytorch(case):
    x, norm = feature_map((2, 8, 32), False), random_layer_norm(32).bfloat16()
    if case == "fp32":
        x, norm = x.float(), norm.float()
    elif case == "grad":
        x = x.float().requires_grad_().bfloat16()
    elif case == "strided":
        x = feature_map((2, 8, 64), False)[..., ::2]
    else:
        norm = torch.nn.LayerNorm((8, 32)).bfloat16()
    pytorch_calls = count_module_calls(norm)
    assert torch.equal(kernels.layer_norm(x, norm), norm(x))
    assert len(pytorch_calls) == 2


@layer_norm_kernel
def test_transformer_block_runs_on_the_layer_norm_kernel():
    torch.manual_seed(0)
    block = BasicTransformerBlock(64, heads=2, head_dim=32, context_dim=48).bfloat16().eval()
    x = feature_map((2, 100, 64), False)
    context = torch.randn(2, 7, 48).bfloat16()
    pytorch_calls = count_module_calls(block.norm1, block.norm2, block.norm3)
    with torch.no_grad():
        ours = block(x, context)
        assert not pytorch_calls
        with switched_off(kernels.set_layer_norm_kernel):
            theirs = block(x, context)
        assert len(pytorch_calls) == 3  # the switch off: PyTorch ran the three norms
        ref = BasicTransformerBlock.forward(block.float(), x.float(), context.float())
    assert rel_err(ours, ref) < 2 * rel_err(theirs, ref) + 1e-3


def test_conv3x3_weight_tiles_round_trip():
    w = torch.randn(64, 96, 3, 3).bfloat16()
    tiles = kernels.pack_conv3x3_weight(w)
    assert tiles.shape == (4, 27, 16, 16, 2)  # (O/16, 9C/32, pairs, output channels, pair)
    # tile (o // 16, k // 32), row (k % 32) // 2, column o % 16, pair k % 2 with k = (dy, dx, c)
    o, dy, dx, c = 21, 2, 1, 77
    k = (3 * dy + dx) * 96 + c
    assert tiles[o // 16, k // 32, (k % 32) // 2, o % 16, k % 2] == w[o, c, dy, dx]
    assert torch.equal(kernels.unpack_conv3x3_weight(tiles), w)


@conv_kernel
@pytest.mark.parametrize("shape,out_channels", [
    ((2, 64, 16, 16), 128),  # tiles of whole image rows
    ((2, 1280, 8, 8), 1280),  # SD 1.5's deepest level: tiles over padded rows, border columns dropped
    ((2, 2560, 16, 16), 1280),  # its widest input: more than fits in L2
    ((1, 32, 5, 7), 64),  # ragged: one image row and a part in a tile, the last tile partly past the image
    ((1, 32, 40, 40), 64),  # 1,600 rows: several groups of rows per pass over the weights
    ((3, 32, 16, 64), 64),  # 3,072 rows of whole-row tiles
])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_conv3x3_kernel_matches_pytorch(shape, out_channels, channels_last, with_residual):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(shape[1], out_channels, 3, padding=1).bfloat16()
    x = feature_map(shape, channels_last)
    residual = feature_map((shape[0], out_channels, *shape[2:]), True, seed=1) if with_residual else None
    with torch.no_grad():
        ref = F.conv2d(x.float(), conv.weight.float(), conv.bias.float(), padding=1)
        theirs = conv(x)
        if residual is not None:
            ref, theirs = ref + residual.float(), theirs + residual
        ours = kernels.conv3x3(x, kernels.pack_conv3x3_weight(conv.weight), conv.bias.float(), residual)
    assert ours.dtype == torch.bfloat16 and ours.shape == ref.shape
    assert ours.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(ours, ref) < max(rel_err(theirs, ref), 3e-3)  # one bf16 rounding: 1.7e-3


def test_geglu_weight_tiles_take_each_32_channels_values_then_gates():
    w, b = torch.randn(2 * 96, 64).bfloat16(), torch.randn(2 * 96)
    tiles, bias = kernels.pack_geglu_weight(w, b)
    assert tiles.shape == (12, 2, 16, 16, 2) and bias.dtype == torch.float32
    # packed column 64 q + j: value channel 32 q + j for j < 32, gate channel 32 q + j - 32 after
    packed = kernels.unpack_linear_weight(tiles)
    assert torch.equal(packed[64 + 5], w[32 + 5]) and torch.equal(packed[64 + 32 + 5], w[96 + 32 + 5])
    assert bias[64 + 32 + 5] == b[96 + 32 + 5].float()
    assert torch.equal(kernels.unpack_geglu_weight(tiles), w)


@conv_kernel
@pytest.mark.parametrize("shape,inner", [
    ((2, 256, 320), 1280),  # an SD 1.5 feed-forward's input width and expansion
    ((2, 77, 64), 96),  # ragged: the last tile partly past the rows; three quads of columns
    ((5, 32), 64),  # fewer rows than a tile
    ((1600, 32), 64),  # several groups of rows per pass over the weights
])
def test_geglu_kernel_matches_pytorch(shape, inner):
    torch.manual_seed(0)
    geglu = GEGLU(shape[-1], inner).bfloat16()
    x = (torch.randn(shape) * 2).bfloat16()
    with torch.no_grad():
        ref = GEGLU.apply_projection(F.linear(x.float(), geglu.proj.weight.float(), geglu.proj.bias.float()))
        theirs = geglu(x)
        ours = kernels.geglu(x, *kernels.pack_geglu_weight(geglu.proj.weight, geglu.proj.bias))
    assert ours.dtype == torch.bfloat16 and ours.shape == ref.shape
    assert rel_err(ours, ref) < max(rel_err(theirs, ref), 3e-3)  # one bf16 rounding, where PyTorch rounds thrice


@conv_kernel
def test_geglu_kernel_gelu_is_exact_to_bf16_rounding():
    """Values of 1 and gates equal to the input: the output is GELU(x), rounded once. Where the exact
    GELU lies near the middle between two bf16 numbers the approximation may round the other way."""
    x = torch.linspace(-12, 12, 32 * 301).bfloat16().reshape(-1, 32)
    x[0, :4] = torch.tensor([0.0, -0.0, 1e-30, -1e-30])
    weight = torch.cat([torch.zeros(32, 32), torch.eye(32)]).bfloat16()  # [value; gate]
    bias = torch.cat([torch.ones(32), torch.zeros(32)])
    with torch.no_grad():
        ours = kernels.geglu(x, *kernels.pack_geglu_weight(weight, bias)).float()
    exact = x.double() * torch.special.erfc(-x.double() / 2 ** 0.5) / 2  # F.gelu's 1 + erf cancels far left
    ulp = torch.finfo(torch.bfloat16).eps * exact.abs().clamp(min=1e-30)
    # at most one bf16 step from the exact value, but far left, where GELU is below 1e-8 and A&S's
    # erfc loses relative accuracy (1-3% at x < -5)
    assert ((ours - exact).abs() <= ulp + 1e-8).all()
    # and nearly always the nearest (98.4% here: exp2_approx's 8e-5 tips values near a midpoint)
    meaningful = exact.abs() > 1e-6
    assert (ours == exact.bfloat16().double())[meaningful].double().mean() > 0.97


@conv_kernel
@pytest.mark.parametrize("shape,out_channels", [
    ((2, 1280, 8, 8), 1280),  # SD 1.5's deepest upsampler: tiles over padded rows
    ((2, 64, 16, 16), 128),  # tiles of whole image rows
    ((1, 32, 5, 7), 64),  # ragged
])
def test_upsample_conv3x3_kernel_matches_upsampling_then_conv(shape, out_channels):
    from ldmkit.models.layers import upsample_phase_weight
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(shape[1], out_channels, 3, padding=1).bfloat16()
    x = feature_map(shape, channels_last=True)
    tiles = kernels.pack_parity_weight(upsample_phase_weight(conv.weight))
    with torch.no_grad():
        up = F.interpolate(x, scale_factor=2, mode="nearest")
        ref = F.conv2d(up.float(), conv.weight.float(), conv.bias.float(), padding=1)
        ours = kernels.upsample_conv3x3(x, tiles, conv.bias.float())
        theirs = conv(up)
    assert ours.shape == ref.shape and ours.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(ours, ref) < max(rel_err(theirs, ref), 3e-3)
