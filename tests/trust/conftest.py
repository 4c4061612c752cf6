"""Shared fixtures of the trust tests: one tiny SD 1.x-shaped model saved as a single file."""

import pytest

from ldmkit.checkpoints import io
from ldmkit.checkpoints.loading import single_file_state_dict

from trust.forge import tiny_components


@pytest.fixture(scope="session")
def tiny_state_dict():
    """CompVis/LDM-named tensors of a tiny random SD 1.x-shaped model."""
    return single_file_state_dict(tiny_components())


@pytest.fixture(scope="session")
def tiny_single_file(tiny_state_dict, tmp_path_factory):
    """The tiny model as a `.safetensors` single file that load_pipeline_components accepts."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    io.save_safetensors(tiny_state_dict, path)
    return path


@pytest.fixture(scope="session")
def tiny_diffusers(tmp_path_factory):
    """The same tiny model as a diffusers folder (what `ldmkit generate --model` is given)."""
    from ldmkit.checkpoints.loading import save_diffusers

    folder = tmp_path_factory.mktemp("tiny_diffusers")
    save_diffusers(tiny_components(), folder)
    return folder
