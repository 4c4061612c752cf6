"""Names for the U-Net and the VAE: diffusers configs <-> our configs, and CompVis/LDM
single-file state-dict keys <-> ours.

Our module names are diffusers' names, so a diffusers folder loads with no renames; what is
left is (1) translating `config.json` dicts to `UNetConfig` / `VAEConfig` and back, and (2) the
renaming tables for the original CompVis / Stability single files (SD 1.x, SD 2.x), where the
U-Net lives under `model.diffusion_model.` (input_blocks / middle_block / output_blocks) and
the VAE under `first_stage_model.` (encoder.down / decoder.up / mid.attn_1 with 1x1-conv q/k/v).

Convention: the `*_ldm_to_ours` / `*_ours_to_ldm` functions take and return state dicts
WITHOUT the `model.diffusion_model.` / `first_stage_model.` prefix; use `strip_prefix` and
`add_prefix` with `UNET_LDM_PREFIX` / `VAE_LDM_PREFIX` at the file boundary. They are strict:
a key that the table does not know raises CheckpointError (filter EMA or loss keys first).
Tensors are shared, not copied, except the VAE attention weights that change shape.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from ldmkit.errors import CheckpointError, InvalidArgument
from ldmkit.models.unet import UNetConfig
from ldmkit.models.vae import VAEConfig

UNET_LDM_PREFIX = "model.diffusion_model."
VAE_LDM_PREFIX = "first_stage_model."

StateDict = Mapping[str, Tensor]


def strip_prefix(sd: StateDict, prefix: str) -> dict[str, Tensor]:
    """The entries of `sd` whose key starts with `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def add_prefix(sd: StateDict, prefix: str) -> dict[str, Tensor]:
    """`sd` with `prefix` put in front of every key."""
    return {prefix + k: v for k, v in sd.items()}


# --- diffusers config.json <-> UNetConfig / VAEConfig --------------------------------------------

# Options we do not implement: a diffusers config must leave them at these values.
_UNET_FIXED = {
    "center_input_sample": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
    "class_embed_type": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "downsample_type": "conv",
    "upsample_type": "conv",
}
# Options that do not change the computation in fp32 (or at all) and are dropped.
_UNET_IGNORED = {"upcast_attention", "addition_embed_type_num_heads", "num_train_timesteps"}
# Defaults of the options we read, per diffusers class.
_COND_DEFAULTS = {
    "sample_size": None, "in_channels": 4, "out_channels": 4, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2, "dropout": 0.0, "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 1280, "transformer_layers_per_block": 1, "attention_head_dim": 8,
    "num_attention_heads": None, "use_linear_projection": False, "num_class_embeds": None,
    "time_embedding_dim": None,
}
_PIXEL_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ("DownBlock2D",) + ("AttnDownBlock2D",) * 3,
    "up_block_types": ("AttnUpBlock2D",) * 3 + ("UpBlock2D",),
    "mid_block_type": "UNetMidBlock2D", "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2, "dropout": 0.0, "attention_head_dim": 8, "norm_num_groups": 32,
    "attn_norm_num_groups": None, "norm_eps": 1e-5, "add_attention": True, "num_class_embeds": None,
    "time_embedding_dim": None,
}
_DOWN_TYPES = {True: {"cond": "CrossAttnDownBlock2D", "pixel": "AttnDownBlock2D"}, False: "DownBlock2D"}
_UP_TYPES = {True: {"cond": "CrossAttnUpBlock2D", "pixel": "AttnUpBlock2D"}, False: "UpBlock2D"}


def _block_type(table: dict, attention: bool, kind: str) -> str:
    entry = table[attention]
    return entry[kind] if isinstance(entry, dict) else entry


def _check_keys(d: Mapping, known: set, fixed: Mapping, what: str) -> None:
    """Refuse options we do not know or do not implement, in one line."""
    for key, value in d.items():
        if key.startswith("_"):
            continue
        if key in fixed:
            if value != fixed[key]:
                raise CheckpointError(f"{what} option {key}={value!r} is not supported (need {fixed[key]!r})")
        elif key not in known:
            raise CheckpointError(f"unknown {what} option {key!r}")


def _per_level(value, n: int, name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise CheckpointError(f"{name} has {len(value)} entries for {n} levels")
        return tuple(value)
    return (value,) * n


def unet_config_from_diffusers(d: Mapping) -> UNetConfig:
    """A UNetConfig from a diffusers UNet2DConditionModel or UNet2DModel config dict."""
    cls = d.get("_class_name")
    cond = cls == "UNet2DConditionModel" or (cls is None and "cross_attention_dim" in d)
    kind = "cond" if cond else "pixel"
    if cls not in (None, "UNet2DConditionModel", "UNet2DModel"):
        raise CheckpointError(f"not a U-Net config: _class_name={cls!r}")
    defaults = _COND_DEFAULTS if kind == "cond" else _PIXEL_DEFAULTS
    _check_keys(d, set(defaults) | _UNET_IGNORED, _UNET_FIXED, "U-Net")
    get = {**defaults, **d}.__getitem__
    chans = tuple(get("block_out_channels"))
    n = len(chans)
    down = tuple(get("down_block_types"))
    levels = tuple(t == _block_type(_DOWN_TYPES, True, kind) for t in down)
    if down != tuple(_block_type(_DOWN_TYPES, a, kind) for a in levels) or len(down) != n:
        raise CheckpointError(f"unsupported down_block_types {list(down)}")
    up_expected = tuple(_block_type(_UP_TYPES, a, kind) for a in reversed(levels))
    if tuple(get("up_block_types")) != up_expected:
        raise CheckpointError(f"up_block_types {list(get('up_block_types'))} do not mirror the down blocks")
    if kind == "cond":
        if get("mid_block_type") != "UNetMidBlock2DCrossAttn":
            raise CheckpointError(f"unsupported mid_block_type {get('mid_block_type')!r}")
        # diffusers' historical naming: for SD, "attention_head_dim" holds the number of heads.
        heads = _per_level(get("num_attention_heads") or get("attention_head_dim"), n, "attention heads")
        layers = set(_per_level(get("transformer_layers_per_block"), n, "transformer_layers_per_block"))
        if len(layers) != 1:
            raise CheckpointError("transformer_layers_per_block must be the same at every level")
        extra = dict(context_dim=get("cross_attention_dim"), mid_attention=True,
                     linear_projection=get("use_linear_projection"), transformer_layers=layers.pop())
    else:
        if get("mid_block_type") != "UNetMidBlock2D":
            raise CheckpointError(f"unsupported mid_block_type {get('mid_block_type')!r}")
        if get("attn_norm_num_groups") not in (None, get("norm_num_groups")):
            raise CheckpointError("attn_norm_num_groups different from norm_num_groups is not supported")
        head_dim = get("attention_head_dim")
        heads = tuple(1 if head_dim is None else max(ch // head_dim, 1) for ch in chans)
        extra = dict(context_dim=None, mid_attention=bool(get("add_attention")))
    sample_size = get("sample_size")
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    return UNetConfig(
        in_channels=get("in_channels"), out_channels=get("out_channels"), block_channels=chans,
        layers_per_block=get("layers_per_block"), attention_levels=levels, num_heads=heads,
        norm_groups=get("norm_num_groups"), norm_eps=get("norm_eps"),
        flip_sin_to_cos=get("flip_sin_to_cos"), freq_shift=get("freq_shift"),
        time_embed_dim=get("time_embedding_dim"), num_class_embeds=get("num_class_embeds"),
        dropout=get("dropout"), sample_size=sample_size, **extra,
    )


def unet_config_to_diffusers(cfg: UNetConfig) -> dict:
    """The diffusers config dict (UNet2DConditionModel if cross-attending, else UNet2DModel)."""
    if cfg.architecture != "unet":
        raise InvalidArgument(f"diffusers has no equivalent of the {cfg.architecture!r} U-Net")
    kind = "cond" if cfg.context_dim is not None else "pixel"
    d = {
        "_class_name": "UNet2DConditionModel" if kind == "cond" else "UNet2DModel",
        "sample_size": cfg.sample_size, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": [_block_type(_DOWN_TYPES, a, kind) for a in cfg.attention_levels],
        "up_block_types": [_block_type(_UP_TYPES, a, kind) for a in reversed(cfg.attention_levels)],
        "block_out_channels": list(cfg.block_channels), "layers_per_block": cfg.layers_per_block,
        "norm_num_groups": cfg.norm_groups, "norm_eps": cfg.norm_eps,
        "flip_sin_to_cos": cfg.flip_sin_to_cos, "freq_shift": cfg.freq_shift,
        "time_embedding_dim": cfg.time_embed_dim, "num_class_embeds": cfg.num_class_embeds,
        "dropout": cfg.dropout,
    }
    if kind == "cond":
        if not cfg.mid_attention:
            raise InvalidArgument("a cross-attention U-Net without mid attention has no diffusers equivalent")
        heads = cfg.num_heads
        return d | {
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "attention_head_dim": heads[0] if len(set(heads)) == 1 else list(heads),
            "cross_attention_dim": cfg.context_dim, "use_linear_projection": cfg.linear_projection,
            "transformer_layers_per_block": cfg.transformer_layers,
        }
    used = [i for i, a in enumerate(cfg.attention_levels) if a]
    used += [len(cfg.block_channels) - 1] if cfg.mid_attention else []
    head_dims = {cfg.block_channels[i] // cfg.num_heads[i] for i in used}
    if all(cfg.num_heads[i] == 1 for i in used):
        head_dim = None  # diffusers: one head of the full width at every level
    elif len(head_dims) == 1:
        head_dim = head_dims.pop()
    else:
        raise InvalidArgument("UNet2DModel needs the same head width at every attention level")
    return d | {"mid_block_type": "UNetMidBlock2D", "attention_head_dim": head_dim,
                "add_attention": cfg.mid_attention}


_VAE_FIXED = {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None}
_VAE_DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",), "block_out_channels": (64,), "layers_per_block": 1,
    "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32, "scaling_factor": 0.18215,
    "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}


def vae_config_from_diffusers(d: Mapping) -> VAEConfig:
    """A VAEConfig from a diffusers AutoencoderKL config dict."""
    if d.get("_class_name") not in (None, "AutoencoderKL"):
        raise CheckpointError(f"not an AutoencoderKL config: _class_name={d.get('_class_name')!r}")
    _check_keys(d, set(_VAE_DEFAULTS) | {"force_upcast"}, _VAE_FIXED, "VAE")
    get = {**_VAE_DEFAULTS, **d}.__getitem__
    n = len(get("block_out_channels"))
    if tuple(get("down_block_types")) != ("DownEncoderBlock2D",) * n or tuple(
        get("up_block_types")
    ) != ("UpDecoderBlock2D",) * n:
        raise CheckpointError("the VAE blocks must be DownEncoderBlock2D / UpDecoderBlock2D, one per level")
    if get("use_quant_conv") != get("use_post_quant_conv"):
        raise CheckpointError("use_quant_conv and use_post_quant_conv must agree")
    sample_size = get("sample_size")
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    return VAEConfig(
        in_channels=get("in_channels"), out_channels=get("out_channels"),
        latent_channels=get("latent_channels"), block_channels=tuple(get("block_out_channels")),
        layers_per_block=get("layers_per_block"), norm_groups=get("norm_num_groups"),
        mid_attention=get("mid_block_add_attention"), use_quant_conv=get("use_quant_conv"),
        scaling_factor=get("scaling_factor"), sample_size=sample_size,
    )


def vae_config_to_diffusers(cfg: VAEConfig) -> dict:
    """The diffusers AutoencoderKL config dict."""
    n = len(cfg.block_channels)
    return {
        "_class_name": "AutoencoderKL", "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(cfg.block_channels), "layers_per_block": cfg.layers_per_block,
        "latent_channels": cfg.latent_channels, "norm_num_groups": cfg.norm_groups,
        "sample_size": cfg.sample_size, "scaling_factor": cfg.scaling_factor,
        "use_quant_conv": cfg.use_quant_conv, "use_post_quant_conv": cfg.use_quant_conv,
        "mid_block_add_attention": cfg.mid_attention,
    }


# --- CompVis/LDM single-file keys <-> ours ---------------------------------------------------------

# Within a module, our leaf names -> LDM leaf names, by kind of module.
_LEAVES = {
    "same": None,  # identical below the prefix (convs, norms, spatial transformers)
    "resnet": {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"},
    "vae_resnet": {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                   "conv_shortcut": "nin_shortcut"},
    "vae_attn": {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"},
}


def unet_ldm_table(cfg: UNetConfig) -> list[tuple[str, str, str]]:
    """(our prefix, LDM prefix, kind) for every module of a cross-attention U-Net.

    LDM numbers the U-Net as a flat list: input_blocks.0 is conv_in; then per level
    `layers_per_block` blocks [ResBlock, SpatialTransformer?] and a Downsample (`.0.op`);
    middle_block [ResBlock, SpatialTransformer, ResBlock]; output_blocks run from the deepest
    level up, `layers_per_block + 1` per level, the Upsample (`.conv`) after the last one.
    """
    if cfg.architecture != "unet" or (cfg.context_dim is None and any(cfg.attention_levels)):
        raise InvalidArgument("the LDM key table covers the cross-attention (SD) U-Net only")
    n, per = len(cfg.block_channels), cfg.layers_per_block
    table = [("time_embedding.linear_1", "time_embed.0", "same"),
             ("time_embedding.linear_2", "time_embed.2", "same"),
             ("conv_in", "input_blocks.0.0", "same"),
             ("conv_norm_out", "out.0", "same"), ("conv_out", "out.2", "same")]
    if cfg.num_class_embeds is not None:
        table.append(("class_embedding", "label_emb", "same"))
    i = 1
    for level in range(n):
        for j in range(per):
            table.append((f"down_blocks.{level}.resnets.{j}", f"input_blocks.{i}.0", "resnet"))
            if cfg.attention_levels[level]:
                table.append((f"down_blocks.{level}.attentions.{j}", f"input_blocks.{i}.1", "same"))
            i += 1
        if level < n - 1:
            table.append((f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{i}.0.op", "same"))
            i += 1
    mid = [("mid_block.resnets.0", "resnet"), ("mid_block.resnets.1", "resnet")]
    if cfg.mid_attention:
        mid.insert(1, ("mid_block.attentions.0", "same"))
    table += [(ours, f"middle_block.{k}", kind) for k, (ours, kind) in enumerate(mid)]
    i = 0
    for b, level in enumerate(reversed(range(n))):
        for j in range(per + 1):
            table.append((f"up_blocks.{b}.resnets.{j}", f"output_blocks.{i}.0", "resnet"))
            sub = 1
            if cfg.attention_levels[level]:
                table.append((f"up_blocks.{b}.attentions.{j}", f"output_blocks.{i}.1", "same"))
                sub = 2
            if j == per and level > 0:
                table.append((f"up_blocks.{b}.upsamplers.0.conv", f"output_blocks.{i}.{sub}.conv", "same"))
            i += 1
    return table


def vae_ldm_table(levels: int, layers_per_block: int) -> list[tuple[str, str, str]]:
    """(our prefix, LDM prefix, kind) for every module of the autoencoder.

    LDM's decoder numbers its levels from the top (`up.0` is full resolution) while ours run in
    execution order (`up_blocks.0` is the deepest), hence `up.{levels - 1 - i}`.
    """
    table = [("quant_conv", "quant_conv", "same"), ("post_quant_conv", "post_quant_conv", "same")]
    for part in ("encoder", "decoder"):
        table += [(f"{part}.conv_in", f"{part}.conv_in", "same"),
                  (f"{part}.conv_out", f"{part}.conv_out", "same"),
                  (f"{part}.conv_norm_out", f"{part}.norm_out", "same"),
                  (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", "vae_resnet"),
                  (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", "vae_attn"),
                  (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", "vae_resnet")]
    for i in range(levels):
        for j in range(layers_per_block):
            table.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", "vae_resnet"))
        if i < levels - 1:
            table.append((f"encoder.down_blocks.{i}.downsamplers.0.conv",
                          f"encoder.down.{i}.downsample.conv", "same"))
    for i in range(levels):
        ldm = levels - 1 - i
        for j in range(layers_per_block + 1):
            table.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{ldm}.block.{j}", "vae_resnet"))
        if i < levels - 1:
            table.append((f"decoder.up_blocks.{i}.upsamplers.0.conv",
                          f"decoder.up.{ldm}.upsample.conv", "same"))
    return table


def _rename(sd: StateDict, table: list[tuple[str, str, str]], to_ldm: bool) -> dict[str, Tensor]:
    """Rename every key of `sd` by the longest matching module prefix of `table`."""
    src_col = 0 if to_ldm else 1
    modules = {row[src_col]: (row[1 - src_col], row[2]) for row in table}
    out, unknown = {}, []
    for key, value in sd.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in modules:
                break
        else:
            unknown.append(key)
            continue
        dst, kind = modules[prefix]
        leaf, param = ".".join(parts[cut:-1]), parts[-1]
        if _LEAVES[kind] is not None:
            leaves = _LEAVES[kind] if to_ldm else {v: k for k, v in _LEAVES[kind].items()}
            if leaf not in leaves:
                unknown.append(key)
                continue
            leaf = leaves[leaf]
        if kind == "vae_attn" and param == "weight" and not leaf.startswith(("norm", "group_norm")):
            value = value[:, :, None, None] if to_ldm else value.reshape(value.shape[0], value.shape[1])
        out[".".join(p for p in (dst, leaf, param) if p)] = value
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise CheckpointError(f"{len(unknown)} unexpected key(s) for this model: {shown}")
    return out


def unet_ldm_to_ours(sd: StateDict, cfg: UNetConfig) -> dict[str, Tensor]:
    """LDM U-Net keys (without `model.diffusion_model.`) -> ours (= diffusers')."""
    return _rename(sd, unet_ldm_table(cfg), to_ldm=False)


def unet_ours_to_ldm(sd: StateDict, cfg: UNetConfig) -> dict[str, Tensor]:
    """Our U-Net keys -> LDM keys (without `model.diffusion_model.`)."""
    return _rename(sd, unet_ldm_table(cfg), to_ldm=True)


def _count(sd: StateDict, pattern: str) -> int:
    """1 + the largest number captured by `pattern` in any key (0 if none matches)."""
    found = [int(m.group(1)) for k in sd if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def vae_ldm_to_ours(sd: StateDict) -> dict[str, Tensor]:
    """LDM VAE keys (without `first_stage_model.`) -> ours; the shape is read off the keys."""
    levels = _count(sd, r"encoder\.down\.(\d+)\.")
    per = _count(sd, r"encoder\.down\.0\.block\.(\d+)\.")
    return _rename(sd, vae_ldm_table(levels, per), to_ldm=False)


def vae_ours_to_ldm(sd: StateDict) -> dict[str, Tensor]:
    """Our VAE keys -> LDM keys (without `first_stage_model.`); q/k/v/proj_out become 1x1 convs."""
    levels = _count(sd, r"encoder\.down_blocks\.(\d+)\.")
    per = _count(sd, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    return _rename(sd, vae_ldm_table(levels, per), to_ldm=True)
