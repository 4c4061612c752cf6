"""Inference on x86 CPUs through oneDNN with weights laid out once.

A plain `nn.Conv2d` or `nn.Linear` on the CPU hands oneDNN its weight in PyTorch's layout, and
oneDNN reorders it into its blocked layout on every call: for the SD 1.5 U-Net that is 1.7 GB of
bf16 weights read and rewritten per step, most of it from main memory. `prepack(model)` does that
reorder once, and replaces in place

- every `nn.Conv2d` (zero padding) by `PackedConv2d`,
- every `nn.Linear` by `PackedLinear`,
- every GEGLU feed-forward projection by `PackedGEGLU`: the gate and value halves as two GEMMs,
  GELU fused into the gate's and the product into the value's (oneDNN post-ops), instead of one
  wide GEMM, a copy of the bias, a GELU pass and a product pass.

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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import GEGLU

_MKLDNN = torch.ops.mkldnn


def available() -> bool:
    """Whether this PyTorch build has oneDNN and the fused inference kernels."""
    return (torch.backends.mkldnn.is_available()
            and all(hasattr(_MKLDNN, op) for op in ("_convolution_pointwise", "_linear_pointwise",
                                                   "_reorder_linear_weight")))


def _needs_grad(x: Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


class PackedConv2d(nn.Module):
    """A frozen zero-padded Conv2d whose weight is in oneDNN's layout (output channels_last)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        weight = conv.weight.detach()
        self.packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
            weight.to_mkldnn(), self.padding, self.stride, self.dilation, self.groups, None)
        self.bias = None if conv.bias is None else conv.bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        if _needs_grad(x):
            return F.conv2d(x, self.packed.to_dense(), self.bias, self.stride, self.padding, self.dilation,
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


def _packed(module: nn.Module) -> nn.Module | None:
    """The packed replacement of `module`, or None to leave it (and look inside it)."""
    if isinstance(module, GEGLU):
        return PackedGEGLU(module)
    if type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return PackedConv2d(module)
    if type(module) is nn.Linear:
        return PackedLinear(module.weight, module.bias)
    return None


@torch.no_grad()
def prepack(model: nn.Module) -> nn.Module:
    """Replace `model`'s convolutions, linear layers and GEGLUs by packed ones, in place (see the
    module docstring); returns `model`. CPU models only; a build without oneDNN is an error."""
    if not available():
        raise RuntimeError("this PyTorch build has no oneDNN inference kernels; run the model unpacked")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("prepack is for models on the CPU")
    _pack_children(model)
    return model


def _pack_children(parent: nn.Module) -> None:
    for name, child in list(parent.named_children()):
        replacement = _packed(child)
        if replacement is None:
            _pack_children(child)
        else:
            setattr(parent, name, replacement)
