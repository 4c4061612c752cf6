"""Fuzzing the file loaders: whatever the bytes, they raise only ldmkit's own errors, quickly.

Random bytes, structurally mutated safetensors headers and byte-mutated torch zips go through
`io.read_state_dict` and `io.read_safetensors_metadata`; each must return tensors or raise an
LdmkitError (CheckpointError), never another exception, never hang. Derandomized, so CI sees
the same examples every run.
"""

import os
from datetime import timedelta

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ldmkit.checkpoints import io
from ldmkit.errors import LdmkitError

from trust.forge import safetensors_bytes, two_tensor_file

# LDMKIT_FUZZ_EXAMPLES=5000 for a longer local run (still derandomized: raise it to see new inputs)
FUZZ = settings(
    max_examples=int(os.environ.get("LDMKIT_FUZZ_EXAMPLES", 80)),
    derandomize=True,  # the same examples on every run and machine
    database=None,
    deadline=timedelta(seconds=10),  # one tiny file per example: 10 s means a hang, even on a busy CI box
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# JSON values a mutated header field may take
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def valid_ckpt(workdir) -> bytes:
    torch.save({"state_dict": {"w": torch.arange(6.0).reshape(2, 3), "step": torch.tensor(3)}}, workdir / "v.ckpt")
    return (workdir / "v.ckpt").read_bytes()


def _load_or_refuse(path, readers=(io.read_state_dict,)):
    """Each reader returns, or raises an LdmkitError; anything else propagates and fails the test."""
    for read in readers:
        try:
            read(path)
        except LdmkitError:
            pass


def _mutate(content: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(content)
    for at, value in edits:
        out[at % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


EDITS = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8)


@FUZZ
@given(content=st.binary(max_size=256), suffix=st.sampled_from([".safetensors", ".ckpt"]))
def test_random_bytes(workdir, content, suffix):
    path = workdir / f"random{suffix}"
    path.write_bytes(content)
    _load_or_refuse(path)


@FUZZ
@given(name=st.sampled_from(["a", "b", "__metadata__"]),
       field=st.sampled_from(["dtype", "shape", "data_offsets", None]),
       value=JSON, data_cut=st.integers(0, 40))
def test_mutated_safetensors_header(workdir, name, field, value, data_cut):
    header, data = two_tensor_file()
    if field is None or name == "__metadata__":
        header[name] = value  # the whole entry replaced
    else:
        header[name] = {**header[name], field: value}
    try:
        content = safetensors_bytes(header, data[:data_cut])
    except ValueError:  # json.dumps refuses some floats/keys: nothing to test
        return
    path = workdir / "header.safetensors"
    path.write_bytes(content)
    _load_or_refuse(path, (io.read_state_dict, io.read_safetensors_metadata))


@FUZZ
@given(edits=EDITS, cut=st.none() | st.integers(0, 400))
def test_byte_mutated_safetensors(workdir, edits, cut):
    header, data = two_tensor_file()
    path = workdir / "bytes.safetensors"
    path.write_bytes(_mutate(safetensors_bytes(header, data), edits, cut))
    _load_or_refuse(path, (io.read_state_dict, io.read_safetensors_metadata))


@FUZZ
@given(edits=EDITS, cut=st.none() | st.integers(0, 2000))
def test_byte_mutated_ckpt_zip(workdir, valid_ckpt, edits, cut):
    path = workdir / "mutated.ckpt"
    path.write_bytes(_mutate(valid_ckpt, edits, cut))
    _load_or_refuse(path)
