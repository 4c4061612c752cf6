"""Damaged or hostile `.safetensors` files give ONE clear CheckpointError naming file and defect.

Protection: `io.read_safetensors_header` validates the raw header (8-byte length, UTF-8 JSON,
each tensor's dtype, shape and byte range, the ranges tiling the data exactly) before the
safetensors library sees the file; `io.check_readable_file` spots git-lfs pointers; and
`loading.build_model` names missing, unexpected and wrongly shaped weights.
"""

import json
import re
import struct

import pytest
import torch

from ldmkit.checkpoints import io
from ldmkit.checkpoints.loading import load_pipeline_components
from ldmkit.errors import CheckpointError

from trust.forge import safetensors_bytes, two_tensor_file


def _edited(**entries):
    """The valid two-tensor file with some header entries replaced."""
    header, data = two_tensor_file()
    return safetensors_bytes({**header, **entries}, data)


def _f32(shape, offsets):
    return {"dtype": "F32", "shape": shape, "data_offsets": offsets}


HEADER, DATA = two_tensor_file()
B = HEADER["b"]
RAW = json.dumps(HEADER).encode()

CASES = {
    "too short": (b"\x05\x00\x00", r"only 3 bytes, too short to hold the 8-byte header length"),
    "header past the end": (safetensors_bytes(HEADER, DATA, header_len=len(RAW) + 1000), r"runs past the end"),
    "header over 100 MB": (safetensors_bytes(HEADER, DATA, header_len=200_000_000), r"over the 100000000-byte limit"),
    "not UTF-8": (safetensors_bytes(b'{"\xff\xfe": 1}', b""), r"header is not UTF-8"),
    "not JSON": (safetensors_bytes(b"{not json", DATA), r"header is not JSON"),
    "deeply nested JSON": (safetensors_bytes(b"[" * 100_000, b""), r"header is not JSON"),
    "JSON list": (safetensors_bytes(b"[1, 2]", b""), r"header is a JSON list, not an object"),
    "repeated name": (safetensors_bytes(RAW[:-1] + b', "a": ' + json.dumps(HEADER["a"]).encode() + b"}", DATA),
                      r"names 'a' twice"),
    "entry without shape": (_edited(a={"dtype": "F32", "data_offsets": [0, 8]}),
                            r"'a': entry must have exactly dtype, shape and data_offsets"),
    "unknown dtype": (_edited(a={**HEADER["a"], "dtype": "F4"}), r"'a': unsupported dtype 'F4'"),
    "negative dim": (_edited(a=_f32([-2], [0, 8])), r"'a': shape \[-2\] is not a list of non-negative"),
    "float offsets": (_edited(a=_f32([2], [0, 8.0])), r"'a': data_offsets \[0, 8.0\] is not \[begin, end\]"),
    "offsets out of order": (_edited(a=_f32([2], [8, 0])), r"'a': data_offsets \[8, 0\] end before they begin"),
    "overlap": (_edited(b={**B, "data_offsets": [4, 28]}), r"tensors 'a' and 'b' overlap"),
    "gap": (safetensors_bytes({**HEADER, "b": {**B, "data_offsets": [12, 36]}}, DATA + bytes(4)),
            r"bytes 8..12 before tensor 'b' belong to no tensor"),
    "truncated": (safetensors_bytes(HEADER, DATA[:20]), r"'b': data ends at byte 32 but only 20 data bytes"),
    "trailing bytes": (safetensors_bytes(HEADER, DATA + bytes(8)), r"8 trailing bytes after the last tensor"),
    "shape x dtype != range": (_edited(a=_f32([3], [0, 8])), r"'a': shape \[3\] of F32 needs 12 bytes, .* span 8"),
    "absurd shape": (_edited(a=_f32([2**62, 2**62, 2**62], [0, 8])), r"'a': .* needs more bytes than the file holds"),
    "metadata not strings": (_edited(__metadata__={"steps": 3}), r"__metadata__ must map strings to strings"),
}


@pytest.mark.parametrize("label", CASES)
def test_defect_gives_one_clear_error_and_writes_nothing(tmp_path, label):
    content, problem = CASES[label]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    for read in (io.read_safetensors, io.read_safetensors_metadata, io.read_state_dict, load_pipeline_components):
        with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: not a valid safetensors file: "
                                                   rf".*{problem}") as caught:
            read(path)
        error = caught.value
        assert error.__cause__ is None and error.__suppress_context__ and "\n" not in str(error)
    assert [p.name for p in tmp_path.iterdir()] == ["bad.safetensors"] and path.read_bytes() == content


def test_valid_file_passes_including_space_padded_header(tmp_path):
    """The spec lets writers pad the header with spaces (for alignment); that is not a defect."""
    padded = RAW + b" " * 5
    path = tmp_path / "ok.safetensors"
    path.write_bytes(struct.pack("<Q", len(padded)) + padded + DATA)
    tensors = io.read_safetensors(path)
    assert tensors["a"].tolist() == [1.0, 2.0] and tensors["b"].tolist() == [1, 2, 3]
    assert io.read_safetensors_metadata(path) == {"format": "pt"}
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(safetensors_bytes({}, b""))
    assert io.read_safetensors(empty) == {}


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_git_lfs_pointer_is_named_as_such(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 4265380512\n")
    with pytest.raises(CheckpointError, match=rf"model\{suffix}: is a git-lfs pointer, not the weights"):
        load_pipeline_components(path)


KEY = "model.diffusion_model.out.2.bias"


@pytest.mark.parametrize("change,message", [
    ("missing", rf"U-Net weights do not fit the model; 1 missing: conv_out\.bias"),
    ("unexpected", r"1 unexpected key\(s\) for this model: extra_block\.weight"),
    ("wrong shape", r"U-Net weights do not fit the model; 1 wrongly shaped: conv_out\.bias \(5,\) != \(4,\)"),
])
def test_weights_that_do_not_fit_the_architecture_name_file_and_keys(tmp_path, tiny_state_dict, change, message):
    sd = dict(tiny_state_dict)
    if change == "missing":
        del sd[KEY]
    elif change == "unexpected":
        sd["model.diffusion_model.extra_block.weight"] = torch.zeros(1)
    else:
        sd[KEY] = torch.zeros(5)
    path = tmp_path / "misfit.safetensors"
    io.save_safetensors(sd, path)
    with pytest.raises(CheckpointError, match=rf"misfit\.safetensors: {message}"):
        load_pipeline_components(path)
