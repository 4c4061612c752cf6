"""A `.ckpt` whose pickle would run code is refused before anything runs, naming the global.

Protection: `io.load_pickle` unpickles only with `torch.load(weights_only=True)` under ldmkit's
small allow-list, applied with a context manager so torch's process-wide list stays untouched.
"""

import builtins
import os

import pytest
import torch

from ldmkit.checkpoints import io
from ldmkit.checkpoints.loading import load_pipeline_components
from ldmkit.errors import CheckpointError


class _RunsCommand:
    """Pickles as a call to os.system: unpickling it would create the sentinel file."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


class _OpensFile:
    """Pickles as a call to open(sentinel, "w"): unpickling it would create the file."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (builtins.open, (self.sentinel, "w"))


@pytest.mark.parametrize("payload,global_name", [
    (_RunsCommand, r"(posix|nt|os)\.system"),
    (_OpensFile, r"(io|_io|builtins)\.open"),
])
def test_code_running_pickle_is_refused_and_never_runs(tmp_path, payload, global_name):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    # hidden where a real checkpoint keeps its weights, next to a legitimate tensor
    torch.save({"state_dict": {"w": torch.zeros(2), "x": payload(sentinel)}}, path)
    for load in (io.load_pickle, io.read_state_dict, load_pipeline_components):
        with pytest.raises(CheckpointError, match=rf"evil\.ckpt: refused to unpickle global {global_name}"):
            load(path)
        assert not sentinel.exists()


def test_refusal_is_one_error_without_a_chained_traceback(tmp_path):
    torch.save({"x": _RunsCommand(tmp_path / "pwned")}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as caught:
        io.load_pickle(tmp_path / "evil.pt")
    assert caught.value.__suppress_context__ and "\n" not in str(caught.value)


def test_allow_list_does_not_leak_into_torch_process_wide_list(tmp_path):
    """ldmkit's stubs are allowed only inside load_pickle: a later plain torch.load is unchanged."""
    # torch keeps the list in a set internally, so its order may change when the context manager
    # restores it: compare the members, not the order
    before = torch.serialization.get_safe_globals()
    torch.save({"w": torch.ones(1)}, tmp_path / "ok.pt")
    io.load_pickle(tmp_path / "ok.pt")
    after = torch.serialization.get_safe_globals()
    assert len(after) == len(before) and set(after) == set(before)
