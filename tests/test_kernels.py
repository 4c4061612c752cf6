"""`ldmkit.kernels.attention`: the AMX flash-attention kernel gives PyTorch's attention to bf16
accuracy at every size it takes, hands everything else to PyTorch unchanged, and is what the
U-Net's attention runs on in bf16 inference."""

import pytest
import torch
import torch.nn.functional as F

from ldmkit import kernels
from ldmkit.models.layers import Attention

amx = pytest.mark.skipif(not kernels.amx_attention_available(), reason="no AMX, g++ or Linux here")


def heads(batch: int, tokens: int, nh: int, width: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """(B, H, N, D) bf16 laid out as (B, N, H, D), the way Attention's projections are."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, tokens, nh, width, generator=g) * scale).bfloat16().transpose(1, 2)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref).norm() / ref.norm())


@amx
@pytest.mark.parametrize("b,h,n,m,d,dv", [
    (2, 8, 1024, 1024, 40, 40),  # SD 1.x's head width; whole key blocks
    (1, 5, 300, 300, 64, 64),  # SD 2.x's; ragged blocks of queries and keys
    (2, 3, 1000, 77, 64, 64),  # cross-attention on a CLIP context
    (1, 2, 257, 600, 18, 5),  # narrow widths, a value width apart from the key width
    (1, 1, 256, 256, 8, 24),
])
def test_amx_attention_matches_pytorch(b, h, n, m, d, dv):
    q, k, v = heads(b, n, h, d, 2.0, 1), heads(b, m, h, d, 1.0, 2), heads(b, m, h, dv, 1.0, 3)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    theirs = rel_err(F.scaled_dot_product_attention(q, k, v), ref)
    ours = kernels.attention(q, k, v)
    assert ours.shape == ref.shape and ours.dtype == torch.bfloat16
    assert rel_err(ours, ref) < max(2 * theirs, 4e-3)  # PyTorch's bf16 kernel: 1.7e-3 to 1.9e-3


@amx
def test_amx_attention_with_scores_too_large_for_a_fixed_bound():
    """|q||k| far above the largest score: the kernel keeps a running row max instead."""
    q, k, v = heads(1, 512, 2, 40, 40.0, 1), heads(1, 512, 2, 40, 4.0, 2), heads(1, 512, 2, 40, 1.0, 3)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert rel_err(kernels.attention(q, k, v), ref) < 4e-3


@amx
def test_amx_attention_writes_tokens_then_heads():
    q = heads(2, 512, 4, 40)
    out = kernels.attention(q, q, q)
    assert out.transpose(1, 2).is_contiguous()  # (B, N, H, dv): Attention's reshape is free


@pytest.mark.parametrize("case", ["fp32", "grad", "wide", "odd", "small"])
def test_attention_leaves_other_work_to_pytorch(case):
    q = heads(1, 512, 2, 40)
    if case == "fp32":
        q = q.float()
    elif case == "grad":
        q = q.float().requires_grad_().bfloat16()
    elif case == "wide":
        q = heads(1, 512, 1, 80)
    elif case == "odd":
        q = heads(1, 512, 2, 17)
    else:
        q = heads(1, 64, 2, 40)
    assert torch.equal(kernels.attention(q, q, q), F.scaled_dot_product_attention(q, q, q))


def test_attention_switch_off_gives_pytorch():
    q = heads(1, 512, 2, 40)
    previous = kernels.set_amx_attention(False)
    try:
        assert torch.equal(kernels.attention(q, q, q), F.scaled_dot_product_attention(q, q, q))
    finally:
        kernels.set_amx_attention(previous)


@amx
def test_attention_module_runs_on_the_kernel():
    torch.manual_seed(0)
    layer = Attention(320, heads=8, head_dim=40).bfloat16().eval()
    x = torch.randn(2, 1024, 320).bfloat16()
    with torch.no_grad():
        ours = layer(x)
        kernels.set_amx_attention(False)
        try:
            theirs = layer(x)
        finally:
            kernels.set_amx_attention(True)
        ref = Attention.forward(layer.float(), x.float())
    assert not torch.equal(ours, theirs)  # a different kernel ran
    assert rel_err(ours, ref) < 2 * rel_err(theirs, ref) + 1e-3
