"""Weights holding NaN or Inf are refused at load time, naming the tensors with counts.

Protection: `io.check_finite`, called by `loading.build_model` for every model it builds. Without
it such files load silently and only show up later as black or noise images.
"""

import pytest
import torch

from ldmkit.checkpoints import io
from ldmkit.checkpoints.loading import load_pipeline_components
from ldmkit.errors import CheckpointError


def test_nan_in_a_single_file_is_named_with_its_count(tmp_path, tiny_state_dict):
    sd = dict(tiny_state_dict)
    weight = sd["model.diffusion_model.out.2.weight"].clone()
    weight.view(-1)[:3] = float("nan")
    sd["model.diffusion_model.out.2.weight"] = weight
    io.save_safetensors(sd, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match=rf"nan\.safetensors: U-Net has NaN/Inf weights in 1 tensor\(s\): "
                                              rf"conv_out\.weight \(3 of {weight.numel()} values\)$"):
        load_pipeline_components(tmp_path / "nan.safetensors")


def test_fp16_overflow_to_inf_in_a_ckpt_is_refused(tmp_path, tiny_state_dict):
    """A half-precision save whose large weights overflowed: Inf in the VAE decoder."""
    sd = {k: v.half() for k, v in tiny_state_dict.items()}
    key = "first_stage_model.decoder.conv_out.bias"
    sd[key] = torch.tensor([1e5, 0.0, -1e5]).half()  # beyond fp16's 65504: +Inf, 0, -Inf
    torch.save({"state_dict": sd}, tmp_path / "half.ckpt")
    with pytest.raises(CheckpointError, match=r"half\.ckpt: VAE has NaN/Inf weights in 1 tensor\(s\): "
                                              r"decoder\.conv_out\.bias \(2 of 3 values\)"):
        load_pipeline_components(tmp_path / "half.ckpt")


def test_check_finite_lists_a_few_and_counts_the_rest():
    bad = {f"w{i}": torch.tensor([float("inf"), 1.0]) for i in range(5)}
    state = {"ok": torch.ones(2), "ids": torch.tensor([1, 2]), **bad}
    with pytest.raises(CheckpointError, match=r"^f: m has NaN/Inf weights in 5 tensor\(s\): w0 \(1 of 2 values\), "
                                              r"w1 .*, w2 .* \(\+2 more\)$"):
        io.check_finite(state, "f", "m")
    io.check_finite({"ok": torch.ones(2), "ids": torch.tensor([1, 2])}, "f", "m")  # finite: silent


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_bad_value_anywhere_in_any_float_dtype_is_found(dtype, bad):
    """The check reduces each tensor (aminmax): a single NaN, +Inf or -Inf must still show."""
    for position in (0, 4321, 9999):
        weight = torch.randn(100, 100).to(dtype)
        weight.view(-1)[position] = bad
        state = {"ok": torch.randn(3).to(dtype), "empty": torch.empty(0, dtype=dtype), "w": weight}
        with pytest.raises(CheckpointError, match=r"in 1 tensor\(s\): w \(1 of 10000 values\)"):
            io.check_finite(state, "model.safetensors", "U-Net")
    io.check_finite({"ok": torch.randn(50).to(dtype), "empty": torch.empty(0, dtype=dtype)}, "m", "U-Net")
