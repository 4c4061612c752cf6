"""CLIP towers: parity with transformers on random weights, key layouts, and the helpers."""

import json
import types

import pytest
import torch

from ldmkit.checkpoints import keys_clip
from ldmkit.errors import CheckpointError, InvalidArgument
from ldmkit.models.clip import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    clip_config_from_transformers,
    clip_config_to_transformers,
    clip_preprocess,
    config_from_dict,
    config_to_dict,
    contrastive_loss,
    retrieve,
    text_config_from_transformers,
    text_config_to_transformers,
    vision_config_from_transformers,
    vision_config_to_transformers,
    zero_shot_classify,
)
from ldmkit.models.tokenizer import train_bpe

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.oracle

TOL = 1e-4
VOCAB, EOS = 120, 100  # the end token is not the largest id, so "first end token" != "argmax"


def text_config(**overrides) -> CLIPTextConfig:
    base = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=20, eos_token_id=EOS, pad_token_id=EOS,
    )
    return CLIPTextConfig(**{**base, **overrides})


VISION = CLIPVisionConfig(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
    image_size=32, patch_size=8, projection_dim=16,
)


def hf_config(cls, ours: dict):
    return cls(**{k: v for k, v in ours.items() if k != "model_type"})


def random_ids(batch=3, length=20, end_at=(5, 11, 19), pad=EOS, generator_seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(generator_seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    ids[ids == EOS] = EOS + 1
    for row, end in enumerate(end_at[:batch]):
        ids[row, end] = EOS
        ids[row, end + 1 :] = pad
    return ids


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def hf_text_model(config: CLIPTextConfig, with_projection: bool):
    torch.manual_seed(0)
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    return cls(hf_config(transformers.CLIPTextConfig, text_config_to_transformers(config))).eval()


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("with_projection", [False, True])
def test_text_model_matches_transformers(act, with_projection):
    config = text_config(hidden_act=act, projection_dim=16 if with_projection else None)
    hf = hf_text_model(config, with_projection)
    ours = CLIPTextModel(config).eval()
    # transformers 5 saves a bare CLIPTextModel without the `text_model.` level: rename that one.
    state = hf.state_dict() if with_projection else keys_clip.to_ldmkit(hf.state_dict())
    ours.load_state_dict(state, strict=True)
    ids = random_ids()
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        out = ours(ids)
        penultimate = ours(ids, skip_last_layers=1)
    assert len(out.hidden_states) == len(ref.hidden_states) == 4
    assert max_err(out.last_hidden_state, ref.last_hidden_state) < TOL
    assert max_err(out.hidden_states[-2], ref.hidden_states[-2]) < TOL  # penultimate, no final LN
    # SD 2 (CompVis "penultimate"): the second-to-last layer's output through the final LayerNorm
    final_ln = (hf.text_model if with_projection else hf).final_layer_norm
    assert max_err(penultimate.last_hidden_state, final_ln(ref.hidden_states[-2])) < TOL
    if with_projection:
        assert max_err(out.text_embeds, ref.text_embeds) < TOL
    else:
        assert out.text_embeds is None
        assert max_err(out.pooled, ref.pooler_output) < TOL


def test_text_model_legacy_argmax_pooling_and_padding_mask():
    # Old config.json files (SD 1.x/2.x diffusers folders) say eos_token_id = 2: pool at argmax(ids).
    hf_dict = {**text_config_to_transformers(text_config()), "eos_token_id": 2}
    config = text_config_from_transformers(hf_dict)
    assert config.pooling == "argmax"
    torch.manual_seed(1)
    hf = transformers.CLIPTextModel(hf_config(transformers.CLIPTextConfig, hf_dict)).eval()
    ours = CLIPTextModel(config).eval()
    ours.load_state_dict(keys_clip.to_ldmkit(hf.state_dict()), strict=True)
    ids = random_ids(pad=0).clamp(max=EOS - 1)  # ids below the end token, padded with 0 as in SD 2
    ids[torch.arange(3), torch.tensor([5, 11, 19])] = EOS  # argmax finds the end token
    mask = (torch.arange(20)[None] <= torch.tensor([5, 11, 19])[:, None]).long()
    with torch.no_grad():
        ref, out = hf(ids), ours(ids)
        ref_masked, out_masked = hf(ids, attention_mask=mask), ours(ids, attention_mask=mask)
    assert max_err(out.pooled, ref.pooler_output) < TOL
    assert max_err(out_masked.last_hidden_state, ref_masked.last_hidden_state) < TOL


def test_vision_model_matches_transformers():
    torch.manual_seed(0)
    hf_cfg = hf_config(transformers.CLIPVisionConfig, vision_config_to_transformers(VISION))
    hf = transformers.CLIPVisionModelWithProjection(hf_cfg).eval()
    ours = CLIPVisionModel(VISION).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, out = hf(pixel_values=pixels, output_hidden_states=True), ours(pixels)
    assert max_err(out.last_hidden_state, ref.last_hidden_state) < TOL
    assert max_err(out.hidden_states[-2], ref.hidden_states[-2]) < TOL
    assert max_err(out.image_embeds, ref.image_embeds) < TOL
    with pytest.raises(InvalidArgument):
        ours(torch.randn(1, 3, 48, 48))


@pytest.fixture(scope="module")
def clip_pair():
    config = CLIPConfig(text=text_config(hidden_act="gelu"), vision=VISION, projection_dim=16)
    torch.manual_seed(0)
    hf_cfg = hf_config(transformers.CLIPConfig, clip_config_to_transformers(config))
    hf = transformers.CLIPModel(hf_cfg).eval()
    ours = CLIPModel(config).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def test_clip_model_logits_and_loss_match_transformers(clip_pair):
    hf, ours = clip_pair
    ids, pixels = random_ids(), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, return_loss=True)
        out = ours(ids, pixels, return_loss=True)
        text = ours.encode_text(ids)
        image = ours.encode_image(pixels)
        ref_text = hf.get_text_features(input_ids=ids).pooler_output
        ref_image = hf.get_image_features(pixel_values=pixels).pooler_output
    assert max_err(text, ref_text) < TOL and max_err(image, ref_image) < TOL
    assert max_err(out.text_embeds, ref.text_embeds) < TOL
    assert max_err(out.image_embeds, ref.image_embeds) < TOL
    assert max_err(out.logits_per_text, ref.logits_per_text) < TOL
    assert max_err(out.logits_per_image, ref.logits_per_image) < TOL
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5
    assert abs(contrastive_loss(ref.logits_per_text).item() - ref.loss.item()) < 1e-6


def test_transformers_clip_folder_loads_and_saves(clip_pair, tmp_path):
    """(c) of the checkpoint formats: a transformers CLIPModel folder in, and back out."""
    from ldmkit.checkpoints.loading import load_clip, save_clip

    hf, ours = clip_pair
    hf.save_pretrained(tmp_path / "hf")
    loaded = load_clip(tmp_path / "hf")
    ids, pixels = random_ids(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref_text = hf.get_text_features(input_ids=ids).pooler_output
        ref_image = hf.get_image_features(pixel_values=pixels).pooler_output
        assert max_err(loaded.encode_text(ids), ref_text) < TOL
        assert max_err(loaded.encode_image(pixels), ref_image) < TOL
        save_clip(loaded, tmp_path / "ours")
        back = transformers.CLIPModel.from_pretrained(tmp_path / "ours").eval()
        assert max_err(back.get_text_features(input_ids=ids).pooler_output, ref_text) < TOL
        assert max_err(back.get_image_features(pixel_values=pixels).pooler_output, ref_image) < TOL
    (tmp_path / "text_only").mkdir()
    (tmp_path / "text_only" / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    with pytest.raises(CheckpointError, match="not a CLIPModel config"):
        load_clip(tmp_path / "text_only")
    with pytest.raises(CheckpointError, match="not a folder"):
        load_clip(tmp_path / "missing")


def test_config_translation_round_trips():
    text = (transformers.CLIPTextConfig, text_config_to_transformers, text_config_from_transformers)
    vision = (transformers.CLIPVisionConfig, vision_config_to_transformers, vision_config_from_transformers)
    for ours, (cls, to_hf, from_hf) in [(text_config(projection_dim=16), text), (text_config(), text), (VISION, vision)]:
        hf_dict = hf_config(cls, to_hf(ours)).to_dict()
        assert from_hf(hf_dict) == ours
    vision = CLIPVisionConfig(**{**VISION.__dict__, "projection_dim": None})
    clip = CLIPConfig(text=text_config(), vision=vision, projection_dim=16, logit_scale_init=2.0)
    hf_dict = hf_config(transformers.CLIPConfig, clip_config_to_transformers(clip)).to_dict()
    assert clip_config_from_transformers(hf_dict) == clip
    assert config_from_dict(CLIPConfig, json.loads(json.dumps(config_to_dict(clip)))) == clip
    with pytest.raises(InvalidArgument):
        config_from_dict(CLIPTextConfig, {"hidden_size": 8, "colour": "red"})
    assert text_config_from_transformers({"hidden_act": "gelu"}).hidden_size == 512  # transformers' defaults
    assert CLIPTextConfig.preset("sd15_text").hidden_size == 768
    with pytest.raises(InvalidArgument):
        text_config(hidden_act="relu")
    with pytest.raises(InvalidArgument):
        CLIPTextConfig.preset("sd3")


def test_openclip_keys_round_trip(clip_pair):
    _, ours = clip_pair
    state = ours.state_dict()
    theirs = keys_clip.ldmkit_to_openclip(state)
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in theirs
    assert "cond_stage_model.model.visual.transformer.resblocks.1.mlp.c_fc.weight" in theirs
    assert theirs["cond_stage_model.model.text_projection"].shape == (32, 16)  # (D, P) in OpenCLIP
    assert keys_clip.detect_clip_layout(theirs) == "openclip"
    back = keys_clip.to_ldmkit(theirs)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    bare = keys_clip.ldmkit_to_openclip(state, prefix="")
    assert keys_clip.detect_clip_layout(bare) == "openclip"
    assert keys_clip.openclip_to_ldmkit(bare, prefix="").keys() == state.keys()
    with pytest.raises(CheckpointError):
        keys_clip.openclip_to_ldmkit({**theirs, "cond_stage_model.model.mystery": torch.zeros(1)})


def test_openclip_conversion_matches_diffusers_and_sd2_penultimate():
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    config = text_config(num_hidden_layers=24, hidden_act="gelu", projection_dim=32, skip_last_layers=1)
    torch.manual_seed(0)
    full = CLIPTextModel(config).eval()
    sd2_file = {**keys_clip.ldmkit_to_openclip(full.state_dict()), "first_stage_model.x": torch.zeros(1)}
    sd2_file["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    # diffusers needs only config.hidden_size from the model it is given: no hub access
    stub = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=32))
    expected = single_file.convert_open_clip_checkpoint(stub, sd2_file)
    converted = keys_clip.openclip_to_ldmkit(sd2_file, drop_last_layers=1)
    assert converted.pop("text_projection.weight").shape == (32, 32)
    assert converted.pop("logit_scale").item() == pytest.approx(4.6)
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)
    # The 23-layer diffusers-style model equals the 24-layer model run with skip_last_layers=1.
    short = CLIPTextModel(text_config(num_hidden_layers=23, hidden_act="gelu")).eval()
    short.load_state_dict(converted, strict=True)
    ids = random_ids(pad=0)
    with torch.no_grad():
        assert max_err(short(ids).last_hidden_state, full(ids).last_hidden_state) < TOL


def test_compvis_keys_match_diffusers():
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    state = CLIPTextModel(text_config()).state_dict()
    sd1_file = {**keys_clip.ldmkit_to_compvis(state), "model.diffusion_model.x": torch.zeros(1)}
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in sd1_file
    assert keys_clip.detect_clip_layout(sd1_file) == "compvis"
    converted = keys_clip.to_ldmkit(sd1_file)
    expected = single_file.convert_ldm_clip_checkpoint(sd1_file)
    assert converted.keys() == expected.keys() == state.keys()
    assert keys_clip.text_shapes_from_state_dict(converted, head_dim=8)["num_attention_heads"] == 4
    assert keys_clip.detect_clip_layout({"unet.x": torch.zeros(1)}) is None


def test_zero_shot_classify_and_retrieve():
    prompts = [["a photo of a cube", "a cube"], "a photo of a sphere", "a photo of a cone"]
    tokenizer = train_bpe(["a photo of a cube", "a photo of a sphere", "a photo of a cone"], min_frequency=1)
    config = CLIPConfig(
        text=text_config(
            vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id, max_position_embeddings=77
        ),
        vision=VISION,
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    images = torch.rand(4, 3, 40, 48) * 2 - 1
    probs = zero_shot_classify(model, tokenizer, images, prompts)
    assert probs.shape == (4, 3) and torch.allclose(probs.sum(-1), torch.ones(4))
    with torch.no_grad():  # the same by hand, for the single-prompt classes
        image = model.encode_image(clip_preprocess(images, 32), normalize=True)
        text = model.encode_text(tokenizer(prompts[1:]), normalize=True)
    logits = (model.logit_scale.exp() * image @ text.t()).softmax(-1)
    assert torch.allclose(probs[:, 1:] / probs[:, 1:].sum(-1, keepdim=True), logits, atol=1e-5)

    scores, index = retrieve(model, tokenizer(prompts[1:]), images, k=2)
    assert scores.shape == index.shape == (2, 2)
    assert torch.equal(index, (text @ image.t()).topk(2, dim=-1).indices)
    assert torch.allclose(scores, (text @ image.t()).topk(2, dim=-1).values, atol=1e-5)
    with pytest.raises(InvalidArgument):
        retrieve(model, text, image, k=9)


def test_clip_preprocess_normalises():
    gray = torch.zeros(1, 3, 224, 224)  # 0 in [-1, 1] is mid-gray
    out = clip_preprocess(gray)
    expected = (0.5 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711]
    )
    assert torch.allclose(out[0, :, 0, 0], expected, atol=1e-6)
    assert clip_preprocess(torch.zeros(2, 3, 100, 300), 64).shape == (2, 3, 64, 64)


def test_contrastive_loss_with_extra_negative_texts():
    """Texts after the images' count are negatives for the images only: the text->image half
    ignores them, the image->text half ranks each image's caption against them too."""
    torch.manual_seed(0)
    logits = torch.randn(5, 3)  # 3 captions, 2 extra negatives, 3 images
    labels = torch.arange(3)
    expected = (torch.nn.functional.cross_entropy(logits[:3], labels)
                + torch.nn.functional.cross_entropy(logits.t(), labels)) / 2
    assert torch.allclose(contrastive_loss(logits), expected)
    assert torch.allclose(contrastive_loss(logits[:3]), contrastive_loss(logits[:3].clone()))
    easy, hard = logits.clone(), logits.clone()
    easy[3:], hard[3:] = -10.0, 10.0  # negatives far from / close to every image
    assert contrastive_loss(hard) > contrastive_loss(easy) > contrastive_loss(logits[:3]) - 1e-6
    with pytest.raises(InvalidArgument, match="every image needs its text"):
        contrastive_loss(torch.randn(2, 3))
