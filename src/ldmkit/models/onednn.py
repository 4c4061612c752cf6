"""Inference on x86 CPUs through oneDNN with weights laid out once.

A plain `nn.Conv2d` or `nn.Linear` on the CPU hands oneDNN its weight in PyTorch's layout, and
oneDNN reorders it into its blocked layout on every call: for the SD 1.5 U-Net that is 1.7 GB of
bf16 weights read and rewritten per step, most of it from main memory. `prepack(model)` does that
reorder once, and replaces in place

- every `nn.Conv2d` (zero padding) by `PackedConv2d` (its weight laid out for an input size where
  the CPU has no AMX: see `_layout_input_size`), except the weight-heavy 3x3 ones (stride 1,
  at least `AMX_CONV_MIN_CHANNELS` output channels) where the CPU has AMX: those by `AmxConv2d`,
  our own kernel (`kernels.conv3x3`), which ran the SD 1.5 U-Net's 1280-channel convolutions at
  16x16 and 8x8 in 0.6-0.75 of oneDNN's time (LDMKIT_CONV_KERNEL=0: oneDNN for all, GEGLUs too),
  and, with `prepack(model, winograd=True)` (the default where the CPU has no AMX), the bf16 3x3
  ones (stride 1, at least `WINOGRAD_MIN_CHANNELS` channels) by `WinogradConv2d`: Winograd's
  F(2x2, 3x3) on maps from `WINOGRAD_MIN_PIXELS` on, 1.7-2 times as fast as oneDNN's direct way
  on AMD Zen 5, at 0.5% relative error against 0.17% (LDMKIT_WINOGRAD_KERNEL=0: never),
- every `nn.Linear` by `PackedLinear`,
- every GEGLU feed-forward projection, where the CPU has AMX, by `AmxGEGLU`: one GEMM on our
  kernel (`kernels.geglu`) with the bias, GELU and product in its epilogue; elsewhere by
  `PackedGEGLU`: the gate and value halves as two oneDNN GEMMs, GELU fused into the gate's and the
  product into the value's (post-ops). Either instead of one wide GEMM, a copy of the bias, a GELU
  pass and a product pass,
- every `layers.Upsample` (nearest 2x, then a 3x3 convolution) by `PackedUpsample`: 2x2
  convolutions of the low-resolution map that give the four output parities, with 4/9 of the
  multiply-adds and no upsampled copy (on our AMX kernel where the 3x3 convolution would be, else
  on oneDNN for maps large enough).

`winograd_convolutions(model)` gives only the bf16 3x3 convolutions to `WinogradConv2d`, where the
CPU has no AMX. For the SD VAE on AMD Zen 5 its decode at 512x512 took 3.66 s against 5.18
(encode 1.91 against 2.74), at 0.62/255 mean error against 0.52, but the transformed weights and
bands raised a fresh `ldmkit generate`'s peak RSS over its 6 GB target, so `load_pipeline` leaves
the VAE direct.

Packed convolutions and linear layers also take a residual (`forward_plus(x, residual)`): the
sum `residual + layer(x)` is a post-op of the GEMM, not a pass of its own over the activations
(`layers.plus_output` uses it wherever a U-Net adds a layer's output to a residual).

These are the kernels inductor's freezing pass picks (`torch.ops.mkldnn._convolution_pointwise`,
`_linear_pointwise`), called from eager code so there is no compile step. The results equal the
plain layers' up to the order of float additions (bitwise for convolutions here).

The packed model is for inference: its state_dict no longer holds the packed weights, and `.to()`
does not move them. Gradients still flow to the inputs (CLIP and classifier guidance
differentiate through the U-Net): with grad enabled, a packed layer unpacks its weight for that
call and runs the ordinary differentiable op.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from ..cpu import cpu_has_amx
from .layers import GEGLU, Upsample, scatter_parities, upsample_phase_weight

_MKLDNN = torch.ops.mkldnn
# Output channels from which a 3x3 convolution goes to `AmxConv2d`. In the SD 1.5 U-Net step (512x512,
# batch 2; one run each way on a busy machine) it beat oneDNN on the 1280-channel convolutions
# (16x16: 5.8 against 9.2 ms, 7.7 against 10.8 with the residual; 8x8: 2.6-3.0 against 4.2; 2560
# input channels at 16x16: 17.1 against 17.8; the 1280-channel upsampler at 32x32: 28.1 against
# 30.6) and lost to it on the narrower, larger maps (320 channels at 64x64 with the residual: 8.9
# against 6.8 ms; 640 at 32x32: 7.1 against 6.4).
AMX_CONV_MIN_CHANNELS = 1024
# Input pixels (batch x H x W) from which `PackedUpsample` runs its parities on oneDNN, as one 2x2
# convolution: its weights are 16/9 of the 3x3 kernel's, which a small map does not repay. In the
# SD 1.5 U-Net (bf16, batch 2, medians of 10): 640 channels at 32x32 10.5-11.6 against 19.3-20.3 ms
# the plain way, 1280 at 16x16 18.1-18.7 against 25.5-25.6, but 1280 at 8x8 9.6-10.5 against 6.2.
# On our AMX kernel (1280 channels, `kernels.upsample_conv3x3`) the parities paid at every size:
# in the step 11.3 against 23.8 ms at 16x16 (oneDNN's parities), 4.1 against 6.5 ms at 8x8 (plain).
PHASES_MIN_PIXELS = 512
# Where the CPU has no AMX, bf16 3x3 convolutions with at least this many input and output channels
# go to `WinogradConv2d`, which takes Winograd's way on maps of at least `WINOGRAD_MIN_PIXELS` (H x W):
# SD 1.5's 64x64 to 16x16 levels, not its 8x8 one (see the class). Not measured on AMX CPUs,
# where the wide convolutions have our AMX kernel: there they stay on it and oneDNN unless
# `prepack(model, winograd=True)` asks (the benchmark's variant for measuring it there).
WINOGRAD_MIN_CHANNELS = 64
WINOGRAD_MIN_PIXELS = 256
# Most bytes of transformed input and products that one band of a Winograd convolution holds: a
# larger map goes through in bands of tile rows, so its transforms never take more memory than this
# (unbanded, the SD VAE's 128 channels at 512x512 would hold 537 MB, at 1024x1024 2.1 GB). Smaller
# bands cost speed, their GEMMs being shorter: on Zen 5 that convolution took 145 ms whole, 156 in
# bands of 128 MiB, 196 of 64, 275 of 4; no SD 1.5 U-Net convolution at 512x512 needs a second band.
WINOGRAD_BAND_BYTES = 128 << 20


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this PyTorch build has oneDNN and the fused inference kernels, and whether this CPU
    runs them in `dtype`: oneDNN's bf16 needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, which AVX2-only
    CPUs such as AMD's Zen 3 lack."""
    kernels_built = (torch.backends.mkldnn.is_available()
                     and all(hasattr(_MKLDNN, op) for op in ("_convolution_pointwise", "_linear_pointwise",
                                                            "_reorder_linear_weight")))
    return kernels_built and (dtype != torch.bfloat16 or _bf16_reorders())


@functools.cache
def _bf16_reorders() -> bool:
    """Whether oneDNN lays out a bf16 weight here (it refuses on CPUs whose ISA it has no bf16 code for)."""
    try:
        _MKLDNN._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16), None)
    except RuntimeError:
        return False
    return True


def _needs_grad(x: Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _layout_input_size(conv: nn.Conv2d) -> list[int] | None:
    """The input size oneDNN lays a packed convolution weight out for: none where the CPU has AMX,
    else a small map. Without one, on AMD Zen 5 (AVX512-BF16, no AMX; 2026-12-07) the reorder chose
    layouts the convolution kernels did not take (AcdB48a2b for every 1x1 weight, AcdB32a2b for the
    320-channel 3x3 ones, where they want AcdB64a2b), so every call reordered the weight again:
    54 reorders in an SD 1.5 U-Net step, 1.41 s of it (a 1280-channel 1x1 convolution at 16x16:
    41 ms a call against 1.9 ms). For any input size tried (batch 2, 32x32 or 64x64) the layouts
    matched at every shape of the step, 8x8 to 64x64. On AMX the layouts chosen without one
    ran the step 22% faster than channels_last layers; not measured with one, they stay."""
    return None if cpu_has_amx() else [2, conv.in_channels, 32, 32]


class PackedConv2d(nn.Module):
    """A frozen zero-padded Conv2d whose weight is in oneDNN's layout (output channels_last)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        weight = conv.weight.detach()
        self.packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
            weight.to_mkldnn(), self.padding, self.stride, self.dilation, self.groups, _layout_input_size(conv))
        self.bias = None if conv.bias is None else conv.bias.detach()

    def dense_weight(self) -> Tensor:
        """The weight in PyTorch's layout, (O, C / groups, kh, kw)."""
        return self.packed.to_dense()

    def forward(self, x: Tensor) -> Tensor:
        if _needs_grad(x):
            return F.conv2d(x, self.dense_weight(), self.bias, self.stride, self.padding, self.dilation,
                            self.groups)
        return _MKLDNN._convolution_pointwise(x, self.packed, self.bias, self.padding, self.stride,
                                              self.dilation, self.groups, "none", [], "")

    def forward_plus(self, x: Tensor, residual: Tensor) -> Tensor:
        """residual + self(x), the sum fused into the convolution."""
        if _needs_grad(x) or _needs_grad(residual):
            return residual + self(x)
        residual = residual.contiguous(memory_format=torch.channels_last)  # the output's layout, whatever x's
        return _MKLDNN._convolution_pointwise.binary(x, residual, self.packed, self.bias, self.padding, self.stride,
                                                     self.dilation, self.groups, "add", None, None, [], None)


class WinogradConv2d(nn.Module):
    """A frozen bf16 3x3 convolution (stride 1, zero padding 1) as Winograd's F(2x2, 3x3) on a CPU
    without AMX: the input's tile transforms (`kernels.winograd_input`), 16 packed oneDNN GEMMs, one
    per position of the 4x4 transform, and the output transforms with the bias and any residual
    (`kernels.winograd_output`). 16 multiply-adds per output tile and channel pair against the
    direct way's 36.

    On AMD Zen 5 (2026-12-07, SD 1.5 U-Net shapes, batch 2, against `PackedConv2d`): 1.7-2.0 times
    as fast from 16x16 maps up (320 channels at 64x64 19.9 against 34.4 ms, 1280 at 16x16 17.6
    against 32.2), 1.45 at 8x8, slower at 7x7 with 320 channels. The rounding of the transforms
    to bf16 adds error: 0.50% relative against 0.17% for the direct way in bf16.

    Its transformed weight takes 16/9 of the direct one's memory, which at 8x8 (half of SD 1.5's
    3x3 weights) would buy little, so the first call without gradients fixes the way: Winograd's on
    maps of at least `min_pixels` (H x W), else the direct convolution made at the start, whose
    weight Winograd's way then releases."""

    def __init__(self, conv: nn.Conv2d, min_pixels: int = WINOGRAD_MIN_PIXELS):
        super().__init__()
        self.min_pixels = min_pixels
        # the direct way: our AMX kernel where it takes the convolution (wide ones on small maps), else oneDNN
        self.direct: AmxConv2d | PackedConv2d | None = AmxConv2d(conv) if _amx_conv_takes(conv) else PackedConv2d(conv)
        self.positions: list[Tensor] | None = None  # the 16 GEMMs' packed (O, C) weights, once chosen
        self.bias = None if conv.bias is None else conv.bias.detach()
        self.bias32 = (torch.zeros(conv.out_channels) if conv.bias is None else conv.bias.detach().float()).contiguous()
        self.decided = False

    def dense_weight(self) -> Tensor:
        """The weight in PyTorch's layout, (O, C, 3, 3): exact on the direct way, to the transform's
        bf16 rounding on Winograd's."""
        if self.direct is not None:
            return self.direct.dense_weight()
        transform = torch.stack([packed.to_dense() for packed in self.positions])  # (16, O, C)
        return kernels.winograd_weight_inverse(transform).to(torch.bfloat16)

    def to_conv2d(self) -> nn.Conv2d:
        """This convolution as a plain bf16 `nn.Conv2d` (the weight as `dense_weight` gives it)."""
        weight = self.dense_weight()
        conv = nn.Conv2d(weight.shape[1], weight.shape[0], 3, padding=1, bias=self.bias is not None,
                         dtype=weight.dtype)
        conv.weight.copy_(weight)
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return conv

    def _decide(self, x: Tensor) -> None:
        if x.shape[2] * x.shape[3] >= self.min_pixels:
            transform = kernels.winograd_weight(self.direct.dense_weight())  # (16, O, C)
            self.positions = [_MKLDNN._reorder_linear_weight(u, None) for u in transform]
            self.direct = None
        self.decided = True

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_plus(x, None)

    def forward_plus(self, x: Tensor, residual: Tensor | None) -> Tensor:
        """residual + self(x) (self(x) alone for None), the sum in the output transform."""
        if _needs_grad(x) or (residual is not None and _needs_grad(residual)):
            out = F.conv2d(x, self.dense_weight(), self.bias, padding=1)
            return out if residual is None else residual + out
        if not self.decided:
            self._decide(x)
        if self.direct is not None:
            return self.direct(x) if residual is None else self.direct.forward_plus(x, residual)
        b, c, h, w = x.shape
        x = x.contiguous(memory_format=torch.channels_last)
        if residual is not None:
            residual = residual.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        out = torch.empty(b, self.bias32.shape[0], h, w, dtype=torch.bfloat16, memory_format=torch.channels_last)
        rows = kernels.winograd_tile_rows(b, h)
        row_bytes = 16 * ((w + 1) // 2) * (c + out.shape[1]) * 2  # one tile row's transforms and products, bf16
        band = max(1, WINOGRAD_BAND_BYTES // row_bytes)
        for first in range(0, rows, band):
            span = (first, min(first + band, rows))
            v = kernels.winograd_input(x, span)
            products = [_MKLDNN._linear_pointwise(v[p], weight, None, "none", [], "")
                        for p, weight in enumerate(self.positions)]
            kernels.winograd_output(products, (b, h, w), self.bias32, residual, span, out)
        return out


class AmxConv2d(nn.Module):
    """A frozen 3x3 convolution (stride 1, zero padding 1) on our AMX kernel, `kernels.conv3x3`,
    its weight in the kernel's tiles (output channels_last)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.tiles = kernels.pack_conv3x3_weight(conv.weight)
        bias = torch.zeros(conv.out_channels) if conv.bias is None else conv.bias.detach()
        self.bias = bias.to(conv.weight.dtype)  # the layer's own precision, for the differentiable path
        self.bias32 = bias.float().contiguous()  # what the kernel adds

    def dense_weight(self) -> Tensor:
        """The weight in PyTorch's layout, (O, C, 3, 3)."""
        return kernels.unpack_conv3x3_weight(self.tiles)

    def forward(self, x: Tensor) -> Tensor:
        if _needs_grad(x):
            return F.conv2d(x, self.dense_weight(), self.bias, padding=1)
        return kernels.conv3x3(x, self.tiles, self.bias32)

    def forward_plus(self, x: Tensor, residual: Tensor) -> Tensor:
        """residual + self(x), the sum fused into the convolution's output."""
        if _needs_grad(x) or _needs_grad(residual):
            return residual + self(x)
        return kernels.conv3x3(x, self.tiles, self.bias32, residual)


def _plain_3x3(conv: nn.Conv2d) -> bool:
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def _winograd_takes(conv: nn.Conv2d, winograd: bool | None) -> bool:
    """Whether `prepack(..., winograd)` gives `conv` to `WinogradConv2d` (None: where the CPU has no AMX)."""
    wanted = not cpu_has_amx() if winograd is None else winograd
    return (wanted and _plain_3x3(conv) and conv.weight.dtype == torch.bfloat16
            and min(conv.in_channels, conv.out_channels) >= WINOGRAD_MIN_CHANNELS
            and kernels.winograd_kernel_available())


def _amx_conv_takes(conv: nn.Conv2d) -> bool:
    return (_plain_3x3(conv) and conv.weight.dtype == torch.bfloat16
            and conv.in_channels % 32 == 0 and conv.out_channels % 64 == 0
            and conv.out_channels >= AMX_CONV_MIN_CHANNELS and kernels.conv_kernel_available())


class PackedLinear(nn.Module):
    """A frozen linear layer (weight (out, in), bias (out,) or None) in oneDNN's layout."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        self.packed = _MKLDNN._reorder_linear_weight(weight.detach().contiguous(), None)
        self.bias = None if bias is None else bias.detach().contiguous()

    def forward(self, x: Tensor) -> Tensor:
        if _needs_grad(x):
            return F.linear(x, self.packed.to_dense(), self.bias)
        # the kernel reads its input as dense rows: a strided view gives wrong results
        return _MKLDNN._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def forward_plus(self, x: Tensor, residual: Tensor) -> Tensor:
        """residual + self(x), the sum fused into the GEMM."""
        if _needs_grad(x) or _needs_grad(residual):
            return residual + self(x)
        return _MKLDNN._linear_pointwise.binary(x.contiguous(), residual.contiguous(), self.packed, self.bias, "add")


class PackedGEGLU(nn.Module):
    """GEGLU (value * GELU(gate)) as two packed GEMMs with fused post-ops."""

    def __init__(self, geglu: GEGLU):
        super().__init__()
        weight, bias = geglu.proj.weight.detach(), geglu.proj.bias.detach()
        inner = weight.shape[0] // 2  # proj's output is [value, gate]
        self.value = PackedLinear(weight[:inner], bias[:inner])
        self.gate = PackedLinear(weight[inner:], bias[inner:])

    def forward(self, x: Tensor) -> Tensor:
        if _needs_grad(x):
            return self.value(x) * F.gelu(self.gate(x))
        x = x.contiguous()
        gate = _MKLDNN._linear_pointwise(x, self.gate.packed, self.gate.bias, "gelu", [None], "none")
        return _MKLDNN._linear_pointwise.binary(x, gate, self.value.packed, self.value.bias, "mul")


class AmxGEGLU(nn.Module):
    """GEGLU (value * GELU(gate)) as one GEMM on our AMX kernel, `kernels.geglu`: the projection's
    weight in the kernel's tiles, the GELU and the product in the GEMM's epilogue, rounded to bf16
    once. In the SD 1.5 U-Net step (medians of 16 calls each) 8.1 against 9.5 ms for oneDNN's two
    GEMMs at 4,096 tokens, 7.0 against 7.7 at 1,024, 6.8 against 8.1 at 256: 112 against 129 ms."""

    def __init__(self, geglu: GEGLU):
        super().__init__()
        self.tiles, self.bias32 = kernels.pack_geglu_weight(geglu.proj.weight, geglu.proj.bias)
        self.bias = geglu.proj.bias.detach()  # the layer's own precision, for the differentiable path

    def forward(self, x: Tensor) -> Tensor:
        if _needs_grad(x):
            return GEGLU.apply_projection(F.linear(x, kernels.unpack_geglu_weight(self.tiles), self.bias))
        return kernels.geglu(x, self.tiles, self.bias32)


def _amx_geglu_takes(geglu: GEGLU) -> bool:
    proj = geglu.proj
    return (proj.weight.dtype == torch.bfloat16 and proj.bias is not None and proj.in_features % 32 == 0
            and proj.out_features % 64 == 0 and kernels.conv_kernel_available())


class PackedUpsample(nn.Module):
    """`layers.Upsample` (nearest 2x, then a 3x3 convolution) as 2x2 convolutions of the
    low-resolution map that give its four output parities (`upsample_phase_weight`): 16
    multiply-adds per output pixel and channel pair instead of 36 (SD 1.5's 640-channel upsampler to
    64x64: 60 GFLOP a step, in 2.1 times fewer), and no upsampled copy of the input. Where the plain
    way's convolution is an `AmxConv2d`, the parities run on our kernel (`kernels.upsample_conv3x3`,
    written in place into the upsampled map); elsewhere as one oneDNN convolution into 4x the
    channels, copied out per parity, from `PHASES_MIN_PIXELS` on. Sizes other than exactly 2x (to
    meet an odd skip), smaller maps on oneDNN's way and calls that need gradients take the plain
    way."""

    def __init__(self, up: Upsample):
        super().__init__()
        # the plain way's convolution, under Upsample's name; never Winograd's, whose weight comes
        # back only to its rounding, and whose 4 multiply-adds per output pixel the parities match
        self.conv = AmxConv2d(up.conv) if _amx_conv_takes(up.conv) else PackedConv2d(up.conv)
        # made at the first call that takes them: 16/9 of the weight's memory
        self.phases: PackedConv2d | None = None
        self.phase_tiles: Tensor | None = None

    def _phase_conv(self) -> PackedConv2d:
        if self.phases is None:
            weight, bias = upsample_phase_weight(self.conv.dense_weight()), self.conv.bias
            conv = nn.Conv2d(weight.shape[1], weight.shape[0], 2, padding=1, bias=bias is not None, device="meta")
            conv.weight = nn.Parameter(weight, requires_grad=False)
            if bias is not None:
                conv.bias = nn.Parameter(bias.repeat(4), requires_grad=False)
            self.phases = PackedConv2d(conv)
        return self.phases

    def _amx_phase_tiles(self) -> Tensor:
        if self.phase_tiles is None:
            self.phase_tiles = kernels.pack_parity_weight(upsample_phase_weight(self.conv.dense_weight()))
        return self.phase_tiles

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        b, _, h, w = x.shape
        if _needs_grad(x) or (size is not None and tuple(size) != (2 * h, 2 * w)):
            return Upsample.plain(self.conv, x, size)
        if isinstance(self.conv, AmxConv2d):
            return kernels.upsample_conv3x3(x, self._amx_phase_tiles(), self.conv.bias32)
        if b * h * w < PHASES_MIN_PIXELS:
            return Upsample.plain(self.conv, x, size)
        return scatter_parities(self._phase_conv()(x), h, w)


def _packed(module: nn.Module, winograd: bool | None) -> nn.Module | None:
    """The packed replacement of `module`, or None to leave it (and look inside it)."""
    if isinstance(module, GEGLU):
        return AmxGEGLU(module) if _amx_geglu_takes(module) else PackedGEGLU(module)
    if type(module) is Upsample and _plain_3x3(module.conv):
        return PackedUpsample(module)
    if type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        if _winograd_takes(module, winograd):
            return WinogradConv2d(module)
        return AmxConv2d(module) if _amx_conv_takes(module) else PackedConv2d(module)
    if type(module) is nn.Linear:
        return PackedLinear(module.weight, module.bias)
    return None


@torch.no_grad()
def prepack(model: nn.Module, winograd: bool | None = None) -> nn.Module:
    """Replace `model`'s convolutions, linear layers and GEGLUs by packed ones, in place (see the
    module docstring); returns `model`. `winograd`: whether bf16 3x3 convolutions may take
    Winograd's way (`WinogradConv2d`); None: where the CPU has no AMX, the only place it was
    measured to pay. CPU models only; a build without oneDNN is an error."""
    if not available():
        raise RuntimeError("this PyTorch build has no oneDNN inference kernels; run the model unpacked")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("prepack is for models on the CPU")
    if any(p.dtype == torch.bfloat16 for p in model.parameters()) and not available(torch.bfloat16):
        raise RuntimeError("oneDNN has no bf16 kernels for this CPU (they need AVX-512 or AVX-NE-CONVERT); "
                           "run the bf16 model unpacked")
    _replace_children(model, lambda module: _packed(module, winograd))
    return model


@torch.no_grad()
def winograd_convolutions(model: nn.Module) -> int:
    """Replace, in place, `model`'s bf16 3x3 convolutions that `prepack` would give to
    `WinogradConv2d` (where the CPU has no AMX) by it, leaving every other layer as it is; returns
    how many. For the VAE, whose other layers gain little from packing: its decoder's 3x3
    convolutions are most of its work. The upsamplers' convolutions stay, their parities
    (`layers.Upsample`) already taking 16 multiply-adds per output instead of 36. A model so
    changed is copied by `plain_copy`, not `copy.deepcopy` (oneDNN's packed weights are opaque)."""
    def replacement(module: nn.Module) -> nn.Module | None:
        if isinstance(module, Upsample):
            return module  # kept whole
        return WinogradConv2d(module) if type(module) is nn.Conv2d and _winograd_takes(module, None) else None

    return _replace_children(model, replacement)


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose `WinogradConv2d` layers are plain `nn.Conv2d` again (see its
    `to_conv2d`): what a float32 retry of a bf16 model can be made from with `.float()`."""
    memo = {id(m): m.to_conv2d() for m in model.modules() if isinstance(m, WinogradConv2d)}
    return copy.deepcopy(model, memo)


def _replace_children(parent: nn.Module, replacement) -> int:
    """Put `replacement(child)` in place of each child of `parent` (itself: kept, None: looked
    inside, recursively); returns how many were replaced."""
    count = 0
    for name, child in list(parent.named_children()):
        new = replacement(child)
        if new is None:
            count += _replace_children(child, replacement)
        elif new is not child:
            setattr(parent, name, new)
            count += 1
    return count
