"""A real Stable Diffusion `.ckpt` (a PyTorch Lightning save) still loads, with nothing imported.

Such files hold a numpy `global_step` and Lightning callback classes next to the weights. ldmkit
lets exactly those through (numpy by its real objects, Lightning names as inert stubs) so
pytorch_lightning is never needed nor imported; and every torch.load in the package is
weights_only=True.
"""

import ast
import re
import sys
from pathlib import Path

import numpy as np
import torch

import ldmkit
from ldmkit.checkpoints import io
from ldmkit.checkpoints.loading import load_pipeline_components

from trust.forge import save_with_fake_lightning


def _lightning_checkpoint(state_dict):
    def build(ModelCheckpoint):
        callback = ModelCheckpoint()
        callback.best_model_score = torch.tensor(0.25)
        return {"state_dict": state_dict, "global_step": np.int64(470000), "epoch": 6,
                "callbacks": {ModelCheckpoint: {"best_model_path": "last.ckpt"}, "instance": callback}}
    return build


def test_lightning_ckpt_loads_through_allow_list_without_lightning(tmp_path, tiny_state_dict):
    path = tmp_path / "sd.ckpt"
    save_with_fake_lightning(_lightning_checkpoint(tiny_state_dict), path)
    obj = io.load_pickle(path)
    assert int(obj["global_step"]) == 470000
    stub_keys = [k for k in obj["callbacks"] if isinstance(k, type)]
    assert stub_keys and issubclass(stub_keys[0], io.LightningStub)
    assert isinstance(obj["callbacks"]["instance"], io.LightningStub)
    comps = load_pipeline_components(path)
    assert comps.architecture == "sd1" and comps.prediction_type == "epsilon"
    weight = "model.diffusion_model.out.2.weight"
    assert torch.equal(comps.unet.state_dict()["conv_out.weight"], tiny_state_dict[weight])
    assert not any(name.startswith("pytorch_lightning") for name in sys.modules)


def _torch_load_calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
            if isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                yield node


_RAW = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"),
        ("serialization", "add_safe_globals")}  # process-wide allow-list edits count too


def _raw_unpickling(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            owner = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", None)
            if (owner, node.attr) in _RAW:
                yield f"line {node.lineno}: {owner}.{node.attr}"


def _up_to_closing_paren(text: str, start: int) -> str:
    depth = 1
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return text[start:]


def test_every_torch_load_in_the_package_is_weights_only():
    """Parses src/ldmkit/**/*.py: each torch.load( passes weights_only=True, nothing unpickles raw."""
    package = Path(ldmkit.__file__).parent
    calls = 0
    for source in sorted(package.rglob("*.py")):
        text = source.read_text(encoding="utf-8")
        tree = ast.parse(text, filename=str(source))
        for call in _torch_load_calls(tree):
            calls += 1
            flags = {kw.arg: kw.value for kw in call.keywords}
            value = flags.get("weights_only")
            assert isinstance(value, ast.Constant) and value.value is True, f"{source}:{call.lineno}"
        # and the plain grep, which also sees calls the parser pattern might miss (docstrings too)
        for at in (m.end() for m in re.finditer(r"torch\.load\(", text)):
            assert "weights_only=True" in _up_to_closing_paren(text, at), f"{source}: {text[at - 11:at + 60]}"
        assert not list(_raw_unpickling(tree)), f"{source}: {list(_raw_unpickling(tree))}"
    assert calls >= 2  # io.load_pickle's two calls at least: the scan is not vacuous
