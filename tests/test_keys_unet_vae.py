"""CompVis/LDM key tables and diffusers config translation for the U-Net and the VAE.

Oracle: diffusers' own single-file converters. We map a random diffusers state dict to LDM
names with our table, hand it to `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint`,
and require the original tensors back.
"""

import pytest
import torch

from ldmkit.checkpoints.keys_unet_vae import (
    UNET_LDM_PREFIX,
    VAE_LDM_PREFIX,
    add_prefix,
    strip_prefix,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_ldm_to_ours,
    unet_ours_to_ldm,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
    vae_ldm_to_ours,
    vae_ours_to_ldm,
)
from ldmkit.errors import CheckpointError, InvalidArgument
from ldmkit.models.unet import UNet, unet_preset
from ldmkit.models.vae import AutoencoderKL, vae_preset

diffusers = pytest.importorskip("diffusers")
single_file = pytest.importorskip("diffusers.loaders.single_file_utils")

SD1_SHAPED = dict(
    block_out_channels=(32, 64, 64, 64), layers_per_block=2, cross_attention_dim=32,
    attention_head_dim=4, norm_num_groups=8,
)
SD2_SHAPED = dict(
    SD1_SHAPED, attention_head_dim=[2, 2, 4, 4], use_linear_projection=True, cross_attention_dim=48
)
SD1_CLASS = dict(SD1_SHAPED, num_class_embeds=5, in_channels=9)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.oracle
@pytest.mark.parametrize("kwargs", [SD1_SHAPED, SD2_SHAPED, SD1_CLASS], ids=["sd1", "sd2", "inpaint_class"])
def test_unet_ldm_keys_agree_with_diffusers_converter(kwargs):
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(**kwargs)
    ours_sd = model.state_dict()
    cfg = unet_config_from_diffusers(dict(model.config))
    ldm = unet_ours_to_ldm(ours_sd, cfg)
    assert len(ldm) == len(ours_sd)
    converted = single_file.convert_ldm_unet_checkpoint(add_prefix(ldm, UNET_LDM_PREFIX), dict(model.config))
    assert _same(converted, ours_sd)
    assert _same(unet_ldm_to_ours(ldm, cfg), ours_sd)


def test_unet_sd15_table_has_the_known_ldm_names():
    with torch.device("meta"):
        sd = UNet(unet_preset("sd15")).state_dict()
    ldm = unet_ours_to_ldm(sd, unet_preset("sd15"))
    assert len(ldm) == 686
    for name in [
        "time_embed.0.weight", "time_embed.2.bias", "input_blocks.0.0.weight",
        "input_blocks.1.0.in_layers.0.weight", "input_blocks.1.0.emb_layers.1.weight",
        "input_blocks.1.1.proj_in.weight", "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "input_blocks.3.0.op.weight", "input_blocks.4.0.skip_connection.weight",
        "input_blocks.9.0.op.bias", "input_blocks.11.0.out_layers.3.weight",
        "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight", "middle_block.2.in_layers.2.bias",
        "output_blocks.0.0.skip_connection.weight", "output_blocks.2.1.conv.weight",
        "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight",
        "output_blocks.11.1.proj_out.weight", "out.0.weight", "out.2.bias",
    ]:
        assert name in ldm, name
    assert ldm["input_blocks.1.1.proj_in.weight"].shape == (320, 320, 1, 1)
    sd2 = unet_preset("sd2")
    with torch.device("meta"):
        ldm2 = unet_ours_to_ldm(UNet(sd2).state_dict(), sd2)
    assert ldm2["input_blocks.1.1.proj_in.weight"].shape == (320, 320)  # linear in SD 2.x


@pytest.mark.oracle
def test_vae_ldm_keys_agree_with_diffusers_converter():
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(
        block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, norm_num_groups=8,
    )
    ours_sd = model.state_dict()
    ldm = vae_ours_to_ldm(ours_sd)
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)  # 1x1 conv in LDM
    assert ldm["decoder.mid.attn_1.proj_out.weight"].shape == (64, 64, 1, 1)
    assert "decoder.up.0.block.0.nin_shortcut.weight" in ldm  # up.0 is the full-res level
    assert "decoder.up.2.upsample.conv.weight" in ldm and "decoder.up.0.upsample.conv.weight" not in ldm
    converted = single_file.convert_ldm_vae_checkpoint(add_prefix(ldm, VAE_LDM_PREFIX), dict(model.config))
    assert _same(converted, ours_sd)
    assert _same(vae_ldm_to_ours(ldm), ours_sd)


def test_vae_sd_table_has_the_known_ldm_names():
    with torch.device("meta"):
        sd = AutoencoderKL(vae_preset("sd")).state_dict()
    ldm = vae_ours_to_ldm(sd)
    assert len(ldm) == len(sd) == 248
    for name in [
        "encoder.conv_in.weight", "encoder.down.0.block.1.norm2.weight",
        "encoder.down.1.block.0.nin_shortcut.weight", "encoder.down.2.downsample.conv.weight",
        "encoder.mid.block_1.conv1.weight", "encoder.mid.attn_1.k.bias", "encoder.norm_out.weight",
        "decoder.up.3.block.2.conv2.weight", "decoder.up.3.upsample.conv.weight",
        "decoder.up.1.block.0.nin_shortcut.weight", "decoder.mid.block_2.norm1.bias",
        "decoder.norm_out.bias", "quant_conv.weight", "post_quant_conv.bias",
    ]:
        assert name in ldm, name


def test_prefix_helpers_and_strictness():
    cfg = unet_preset("tiny")
    with torch.device("meta"):
        sd = UNet(cfg).state_dict()
    full = add_prefix(unet_ours_to_ldm(sd, cfg), UNET_LDM_PREFIX) | {"cond_stage_model.x": torch.zeros(1)}
    assert unet_ldm_to_ours(strip_prefix(full, UNET_LDM_PREFIX), cfg).keys() == sd.keys()
    with pytest.raises(CheckpointError, match="unexpected"):
        unet_ldm_to_ours({"input_blocks.1.0.bogus.weight": torch.zeros(1)}, cfg)
    with pytest.raises(CheckpointError, match="unexpected"):
        vae_ldm_to_ours({"loss.logvar": torch.zeros(1)})
    with pytest.raises(InvalidArgument):
        unet_ours_to_ldm({}, unet_preset("pixel_ddpm"))
    with pytest.raises(InvalidArgument):
        unet_ours_to_ldm({}, unet_preset("minimal"))


@pytest.mark.parametrize("name", ["sd15", "sd2", "sd15_inpaint", "tiny", "pixel_ddpm"])
def test_unet_config_round_trip(name):
    cfg = unet_preset(name)
    assert unet_config_from_diffusers(unet_config_to_diffusers(cfg)) == cfg


def test_vae_config_round_trip():
    for name in ("sd", "tiny"):
        cfg = vae_preset(name)
        assert vae_config_from_diffusers(vae_config_to_diffusers(cfg)) == cfg


def test_real_sd_config_dicts():
    """The config.json of runwayml SD 1.5 and stabilityai SD 2.1 (as published) map to presets."""
    sd15 = {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
        "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False, "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
        "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    }
    assert unet_config_from_diffusers(sd15) == unet_preset("sd15")
    sd21 = dict(sd15, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, sample_size=96,
                use_linear_projection=True, upcast_attention=True, dual_cross_attention=False,
                num_class_embeds=None, only_cross_attention=False, class_embed_type=None)
    assert unet_config_from_diffusers(sd21) == unet_preset("sd2")
    vae = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
           "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
           "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
           "up_block_types": ["UpDecoderBlock2D"] * 4}
    assert vae_config_from_diffusers(vae) == vae_preset("sd")


def test_unsupported_diffusers_options_are_refused():
    base = unet_config_to_diffusers(unet_preset("tiny"))
    for bad in [{"resnet_time_scale_shift": "scale_shift"}, {"some_new_option": 1},
                {"up_block_types": ["UpBlock2D"] * 3}, {"addition_embed_type": "text_time"}]:
        with pytest.raises(CheckpointError):
            unet_config_from_diffusers(base | bad)
    with pytest.raises(CheckpointError):
        vae_config_from_diffusers(vae_config_to_diffusers(vae_preset("tiny")) | {"shift_factor": 0.1})
