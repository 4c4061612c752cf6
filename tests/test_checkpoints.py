"""Whole-checkpoint loading and saving: diffusers folders, CompVis single files, legacy .ckpt
safety, and the `ldmkit info/convert` CLI.

Oracles: tiny random-weight SD 1.x- and SD 2.x-shaped diffusers pipelines (diffusers and
transformers classes, saved with `save_pretrained`); ldmkit must reproduce their modules' outputs.
The tiny models follow SD's conventions that tensors cannot show (GroupNorm 32, SD 1.x U-Net with
8 heads, SD 2.x and CLIP heads 64 wide, the OpenAI vocabulary), so single-file detection works.
"""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from ldmkit.checkpoints import io, keys_clip
from ldmkit.checkpoints.loading import (
    load_pipeline_components,
    save_diffusers,
    save_single_file,
    single_file_state_dict,
)
from ldmkit.cli import main
from ldmkit.errors import CheckpointError, InvalidArgument
from ldmkit.models.tokenizer import CLIPTokenizer

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

TOL = 1e-4


def _max_err(a, b):
    return (a - b).abs().max().item()


def _build_pipeline(kind: str, in_channels: int = 4):
    """Tiny random diffusers StableDiffusionPipeline modules (sd1 or sd2-shaped)."""
    torch.manual_seed(0)
    sd2 = kind == "sd2"
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=[1, 1] if sd2 else 8, use_linear_projection=sd2,
        norm_num_groups=32,
    ).eval()
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
        norm_num_groups=32, sample_size=16,
    ).eval()
    text_config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
        hidden_act="gelu" if sd2 else "quick_gelu", max_position_embeddings=77,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    )
    text = transformers.CLIPTextModel(text_config).eval()
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction" if sd2 else "epsilon",
    )
    return unet, vae, text, scheduler


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pipeline(request, tmp_path_factory):
    """(kind, folder, diffusers modules): a saved tiny diffusers pipeline."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    unet, vae, text, scheduler = _build_pipeline(kind)
    CLIPTokenizer.from_openai_bpe(pad="zero" if kind == "sd2" else "end").save(root / "tok")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(root / "tok")
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "folder", safe_serialization=True)
    return kind, root / "folder", (unet, vae, text)


def _inputs(in_channels: int = 4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, in_channels, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    ctx = torch.randn(2, 77, 64, generator=g)
    img = torch.randn(1, 3, 16, 16, generator=g).clamp(-1, 1)
    z = torch.randn(1, 4, 8, 8, generator=g)
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    ids[:, 0], ids[:, 9] = 49406, 49407
    return x, t, ctx, img, z, ids


def _assert_matches(comps, unet, vae, text):
    x, t, ctx, img, z, ids = _inputs(comps.unet.config.in_channels)
    with torch.no_grad():
        assert _max_err(comps.unet(x, t, ctx), unet(x, t, ctx).sample) < TOL
        assert _max_err(comps.vae.decode(z), vae.decode(z).sample) < TOL
        assert _max_err(comps.vae.encode(img).mean, vae.encode(img).latent_dist.mean) < TOL
        ours = comps.text_encoder(ids).last_hidden_state
        assert _max_err(ours, text(ids).last_hidden_state) < TOL


# -- diffusers folders -----------------------------------------------------------------------------


@pytest.mark.oracle
def test_diffusers_folder_loads_and_matches(pipeline):
    kind, folder, modules = pipeline
    comps = load_pipeline_components(folder)
    _assert_matches(comps, *modules)
    info = comps.describe()
    assert info["format"] == "diffusers"
    assert info["architecture"] == kind
    assert info["prediction_type"] == ("v_prediction" if kind == "sd2" else "epsilon")
    assert info["inpainting"] is False and info["dtype"] == "float32"
    assert info["parameters"]["unet"] == sum(p.numel() for p in modules[0].parameters())
    assert comps.tokenizer.pad_id == (0 if kind == "sd2" else 49407)
    hf_tok = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
    prompt = "a red circle above a blue square"
    expected = hf_tok([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(comps.tokenizer([prompt]), expected)
    assert all(p.device.type == "cpu" for p in comps.unet.parameters())
    # flags
    assert load_pipeline_components(folder, prediction_type="sample").prediction_type == "sample"
    with pytest.raises(CheckpointError, match="inpainting"):
        load_pipeline_components(folder, inpainting=True)
    with pytest.raises(InvalidArgument):
        load_pipeline_components(folder, arch="sdxl")
    half = load_pipeline_components(folder, dtype=torch.float16)
    assert half.describe()["dtype"] == "float16"


@pytest.mark.oracle
def test_save_diffusers_round_trips_through_diffusers(pipeline, tmp_path):
    kind, folder, modules = pipeline
    comps = load_pipeline_components(folder)
    save_diffusers(comps, tmp_path / "out")
    unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "out" / "vae").eval()
    text = transformers.CLIPTextModel.from_pretrained(tmp_path / "out" / "text_encoder").eval()
    _assert_matches(comps, unet, vae, text)
    again = load_pipeline_components(tmp_path / "out")
    assert again.describe() == comps.describe()


# -- single files -------------------------------------------------------------------------------


@pytest.mark.oracle
def test_single_file_round_trip_and_detection(pipeline, tmp_path):
    kind, folder, modules = pipeline
    comps = load_pipeline_components(folder)
    path = tmp_path / "model.safetensors"
    save_single_file(comps, path)
    sd = io.read_safetensors(path)
    assert "model.diffusion_model.input_blocks.0.0.weight" in sd
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in sd
    prefix = keys_clip.OPENCLIP_PREFIX if kind == "sd2" else keys_clip.COMPVIS_PREFIX
    assert any(k.startswith(prefix) for k in sd)
    loaded = load_pipeline_components(path)
    _assert_matches(loaded, *modules)
    assert loaded.describe() | {"format": "diffusers"} == comps.describe()
    # without ldmkit's metadata, everything is detected from the tensors alone
    bare = tmp_path / "bare.safetensors"
    io.save_safetensors(sd, bare)
    detected = load_pipeline_components(bare)
    _assert_matches(detected, *modules)
    assert detected.architecture == kind
    assert detected.prediction_type == ("v_prediction" if kind == "sd2" else "epsilon")
    # flags override
    assert load_pipeline_components(bare, prediction_type="epsilon").prediction_type == "epsilon"
    assert load_pipeline_components(bare, arch="sd2").prediction_type == "v_prediction"
    assert load_pipeline_components(path, arch="sd1").architecture == "sd1"


@pytest.mark.parametrize("preset,arch", [("sd15", "sd1"), ("sd2", "sd2"), ("sd15_inpaint", "sd1")])
def test_full_size_unet_config_is_detected_from_shapes(preset, arch):
    from ldmkit.checkpoints.keys_unet_vae import unet_ours_to_ldm
    from ldmkit.checkpoints.loading import unet_config_from_ldm
    from ldmkit.models.unet import UNet, unet_preset

    cfg = unet_preset(preset)
    with torch.device("meta"):
        ldm = unet_ours_to_ldm(UNet(cfg).state_dict(), cfg)
    assert unet_config_from_ldm(ldm, arch) == cfg


def test_single_file_detects_inpainting_and_v_pred_marker(tmp_path):
    unet, vae, text, _ = _build_pipeline("sd2", in_channels=9)
    tok = CLIPTokenizer.from_openai_bpe(pad="zero")
    folder = tmp_path / "folder"
    # assemble a diffusers folder through our own writer from loaded modules
    from ldmkit.checkpoints.loading import Components, build_model
    from ldmkit.checkpoints.keys_unet_vae import unet_config_from_diffusers, vae_config_from_diffusers
    from ldmkit.diffusion.schedule import ScheduleConfig
    from ldmkit.models.clip import CLIPTextModel, text_config_from_transformers
    from ldmkit.models.unet import UNet
    from ldmkit.models.vae import AutoencoderKL

    comps = Components(
        build_model(UNet, unet_config_from_diffusers(dict(unet.config)), unet.state_dict(), source="t", what="U-Net"),
        build_model(AutoencoderKL, vae_config_from_diffusers(dict(vae.config)), vae.state_dict(), source="t", what="VAE"),
        build_model(CLIPTextModel, text_config_from_transformers(text.config.to_dict()),
                    keys_clip.to_ldmkit(text.state_dict()), source="t", what="text"),
        tok, ScheduleConfig(), architecture="sd2",
    )
    sd = single_file_state_dict(comps)
    io.save_safetensors(sd, tmp_path / "inpaint.safetensors")
    loaded = load_pipeline_components(tmp_path / "inpaint.safetensors")
    assert loaded.inpainting and loaded.architecture == "sd2"
    assert loaded.prediction_type == "epsilon"  # SD 2.x inpainting is an epsilon model
    with pytest.raises(CheckpointError, match="inpainting"):
        load_pipeline_components(tmp_path / "inpaint.safetensors", inpainting=False)
    io.save_safetensors({**sd, "v_pred": torch.zeros(())}, tmp_path / "v.safetensors")
    assert load_pipeline_components(tmp_path / "v.safetensors").prediction_type == "v_prediction"
    save_diffusers(comps, folder)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"


def test_full_openclip_tower_uses_penultimate_layer_and_saves_as_diffusers(tmp_path, pipeline):
    """An original SD 2.x file has the whole OpenCLIP tower + projection: keep it, skip 1 layer."""
    kind, folder, modules = pipeline
    if kind != "sd2":
        pytest.skip("SD 2.x only")
    comps = load_pipeline_components(folder)
    sd = single_file_state_dict(comps)
    torch.manual_seed(3)
    extra = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                    num_attention_heads=1, hidden_act="gelu", projection_dim=64, eos_token_id=49407)
    )
    full = keys_clip.to_ldmkit(extra.state_dict())
    sd = {k: v for k, v in sd.items() if not k.startswith(keys_clip.OPENCLIP_PREFIX)}
    sd |= keys_clip.ldmkit_to_openclip(full) | {keys_clip.OPENCLIP_PREFIX + "logit_scale": torch.tensor(4.6)}
    io.save_safetensors(sd, tmp_path / "sd2.safetensors")
    loaded = load_pipeline_components(tmp_path / "sd2.safetensors")
    assert loaded.text_encoder.config.num_hidden_layers == 3
    assert loaded.text_encoder.config.skip_last_layers == 1
    assert loaded.describe()["text_layers"] == 2
    save_diffusers(loaded, tmp_path / "out")
    theirs = transformers.CLIPTextModel.from_pretrained(tmp_path / "out" / "text_encoder").eval()
    assert theirs.config.num_hidden_layers == 2
    ids = _inputs()[-1]
    with torch.no_grad():
        assert _max_err(loaded.text_encoder(ids).last_hidden_state, theirs(ids).last_hidden_state) < TOL


def test_bad_weights_are_reported(tmp_path, pipeline):
    kind, folder, _ = pipeline
    comps = load_pipeline_components(folder)
    sd = single_file_state_dict(comps)
    key = "model.diffusion_model.out.2.weight"
    io.save_safetensors({**sd, key: torch.full_like(sd[key], float("nan"))}, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match="NaN/Inf.*conv_out.weight"):
        load_pipeline_components(tmp_path / "nan.safetensors")
    bad = dict(sd)
    del bad["first_stage_model.decoder.conv_out.bias"]
    io.save_safetensors(bad, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="missing.*decoder.conv_out.bias"):
        load_pipeline_components(tmp_path / "missing.safetensors")
    io.save_safetensors({"foo": torch.zeros(1)}, tmp_path / "foo.safetensors")
    with pytest.raises(CheckpointError, match="not a Stable Diffusion single file"):
        load_pipeline_components(tmp_path / "foo.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 2000)
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_pipeline_components(tmp_path / "junk.safetensors")
    (tmp_path / "lfs.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(CheckpointError, match="git-lfs pointer"):
        load_pipeline_components(tmp_path / "lfs.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        load_pipeline_components(tmp_path / "nope.ckpt")


# -- legacy pickles -------------------------------------------------------------------------------

_PL = ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")


def _save_lightning_ckpt(obj_factory, path):
    """torch.save with a fake pytorch_lightning importable only while saving."""
    assert not any(name in sys.modules for name in _PL)
    modules = {name: types.ModuleType(name) for name in _PL}
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": _PL[-1]})
    modules[_PL[-1]].ModelCheckpoint = ModelCheckpoint
    sys.modules.update(modules)
    try:
        torch.save(obj_factory(ModelCheckpoint), path)
    finally:
        for name in _PL:
            del sys.modules[name]


def test_legit_lightning_ckpt_loads_without_lightning(tmp_path, pipeline):
    kind, folder, modules = pipeline
    if kind != "sd1":
        pytest.skip("one architecture is enough")
    sd = single_file_state_dict(load_pipeline_components(folder))

    def build(ModelCheckpoint):
        cb = ModelCheckpoint()
        cb.best_model_score = torch.tensor(0.5)
        return {"state_dict": sd, "global_step": np.int64(470000), "epoch": 6,
                "callbacks": {ModelCheckpoint: {"best_model_path": "x.ckpt"}, "instance": cb}}

    _save_lightning_ckpt(build, tmp_path / "model.ckpt")
    obj = io.load_pickle(tmp_path / "model.ckpt")
    assert int(obj["global_step"]) == 470000
    assert any(isinstance(k, type) and issubclass(k, io.LightningStub) for k in obj["callbacks"])
    comps = load_pipeline_components(tmp_path / "model.ckpt")
    _assert_matches(comps, *modules)
    assert comps.architecture == "sd1" and comps.prediction_type == "epsilon"
    assert main(["info", str(tmp_path / "model.ckpt")]) == 0


class _Evil:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_malicious_pickle_is_refused(tmp_path):
    sentinel = tmp_path / "pwned"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "x": _Evil(sentinel)}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match=r"evil\.ckpt.*global (posix|nt|os)\.system"):
        io.load_pickle(tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="system"):
        load_pipeline_components(tmp_path / "evil.ckpt")
    assert not sentinel.exists()


def test_save_safetensors_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    io.save_safetensors({"a": torch.ones(3)}, path)
    import safetensors.torch

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(RuntimeError):
        io.save_safetensors({"a": torch.zeros(3)}, path)
    assert torch.equal(io.read_safetensors(path)["a"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


# -- CLI -------------------------------------------------------------------------------------


def test_cli_info_and_convert_round_trip(pipeline, tmp_path, capsys):
    kind, folder, modules = pipeline
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"architecture: {kind}" in out and "format: diffusers" in out
    single = tmp_path / "m.safetensors"
    assert main(["convert", str(folder), str(single)]) == 0
    assert main(["info", str(single)]) == 0
    out = capsys.readouterr().out
    assert f"architecture: {kind}" in out and "format: single_file" in out
    assert main(["convert", str(single), str(tmp_path / "back")]) == 0
    _assert_matches(load_pipeline_components(tmp_path / "back"), *modules)
    diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "back")  # diffusers reads it too


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ldmkit: error: ") and err.count("\n") == 1 and "missing.safetensors" in err
    assert main(["convert", str(tmp_path), str(tmp_path / "x.ckpt")]) == 2
    assert "not supported" in capsys.readouterr().err
    proc = subprocess.run(
        [sys.executable, "-m", "ldmkit.cli", "info", str(tmp_path / "nothing")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("ldmkit: error:") and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_saved_weights_get_the_usual_permissions(tmp_path):
    from ldmkit.checkpoints.io import default_file_mode, save_safetensors

    save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == default_file_mode()
