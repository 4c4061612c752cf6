"""Key renaming between CLIP weight layouts and ldmkit's (= transformers') module names.

Layouts ldmkit reads (`detect_clip_layout` tells them apart from the keys and tensor shapes):

- "transformers": `text_model.embeddings.token_embedding.weight`, ... (diffusers `text_encoder/`
  folders, transformers 4 saves). Already ours: nothing to rename.
- "transformers_bare": `embeddings.token_embedding.weight`, ... (a transformers 5
  CLIPTextModel saved on its own drops the `text_model.` prefix).
- "compvis": SD 1.x single files, `cond_stage_model.transformer.text_model.*` (transformers keys
  under a prefix; very old files lack the `text_model.` level).
- "openclip": SD 2.x single files, `cond_stage_model.model.*`, or bare OpenCLIP state dicts:
  `token_embedding.weight`, `positional_embedding`, `transformer.resblocks.N.{ln_1, ln_2,
  attn.in_proj_weight (q, k, v stacked), attn.out_proj, mlp.c_fc, mlp.c_proj}`, `ln_final`,
  `text_projection` (stored (D, P), transposed relative to a Linear's weight), `logit_scale`,
  and for full models `visual.*` (conv1, class_embedding, positional_embedding, ln_pre,
  transformer, ln_post, proj).

Every function returns a new dict and leaves its input alone; tensors are shared, not copied,
except where q/k/v are split or joined.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..errors import CheckpointError

Tensor = torch.Tensor

COMPVIS_PREFIX = "cond_stage_model.transformer."  # SD 1.x CompVis single files
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x CompVis single files
LAYOUTS = ("transformers", "transformers_bare", "compvis", "openclip")

# ours (after the tower prefix) <- OpenCLIP (after the tower prefix), outside the layers
_OPENCLIP_TEXT = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_VISION = {
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.class_embedding": "class_embedding",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight",
    "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight",
    "post_layernorm.bias": "ln_post.bias",
}
# ours (inside encoder.layers.N.) <- OpenCLIP (inside transformer.resblocks.N.); q/k/v apart
_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
# OpenCLIP projections are (D, P) matrices used as x @ proj; ours are Linear weights (P, D).
_OPENCLIP_PROJECTIONS = {
    "text_projection.weight": "text_projection",
    "visual_projection.weight": "visual.proj",
}
_OPENCLIP_IGNORED = ("attn_mask",)  # a constant causal mask some versions saved
_BARE_TRANSFORMERS_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")
_RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_OUR_LAYER = re.compile(r"^(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)$")


def detect_clip_layout(state_dict: Mapping[str, Tensor]) -> str | None:
    """Which of LAYOUTS a state dict's CLIP weights use, or None when there are none.

    OpenCLIP is recognised by its stacked attention input (a (3D, D) `in_proj_weight`).
    """
    keys = state_dict.keys()
    if any(k.startswith(COMPVIS_PREFIX) for k in keys):
        return "compvis"
    for prefix in (OPENCLIP_PREFIX, ""):
        weight = state_dict.get(prefix + "transformer.resblocks.0.attn.in_proj_weight")
        if weight is not None and weight.ndim == 2 and weight.shape[0] == 3 * weight.shape[1]:
            return "openclip"
    if {"text_model.embeddings.token_embedding.weight", "vision_model.pre_layrnorm.weight"} & keys:
        return "transformers"
    if "embeddings.token_embedding.weight" in keys and "final_layer_norm.weight" in keys:
        return "transformers_bare"
    return None


def to_ldmkit(state_dict: Mapping[str, Tensor], **kwargs) -> dict[str, Tensor]:
    """Rename any detected CLIP layout to ldmkit's keys (`kwargs` go to the converter)."""
    layout = detect_clip_layout(state_dict)
    if layout is None:
        raise CheckpointError("no CLIP weights recognised in this state dict")
    if layout == "compvis":
        return compvis_to_ldmkit(state_dict, **kwargs)
    if layout == "openclip":
        prefix = OPENCLIP_PREFIX if any(k.startswith(OPENCLIP_PREFIX) for k in state_dict) else ""
        return openclip_to_ldmkit(state_dict, prefix=prefix, **kwargs)
    if layout == "transformers_bare":
        bare = _BARE_TRANSFORMERS_ROOTS
        return {("text_model." + k if k.startswith(bare) else k): v for k, v in state_dict.items()}
    return drop_position_ids(state_dict)


def drop_position_ids(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop the `position_ids` buffers that transformers < 4.31 saved (ldmkit has none)."""
    return {k: v for k, v in state_dict.items() if not k.endswith("embeddings.position_ids")}


# -- SD 1.x CompVis ---------------------------------------------------------------------------


def compvis_to_ldmkit(
    state_dict: Mapping[str, Tensor], prefix: str = COMPVIS_PREFIX
) -> dict[str, Tensor]:
    """`cond_stage_model.transformer.text_model.*` -> `text_model.*`; other keys are left out."""
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix) or key.endswith("position_ids"):
            continue
        rest = key[len(prefix) :]
        out[rest if rest.startswith("text_model.") else "text_model." + rest] = value
    return out


def ldmkit_to_compvis(
    state_dict: Mapping[str, Tensor], prefix: str = COMPVIS_PREFIX
) -> dict[str, Tensor]:
    """`text_model.*` -> `cond_stage_model.transformer.text_model.*` (SD 1.x single files)."""
    return {prefix + k: v for k, v in state_dict.items() if k.startswith("text_model.")}


# -- SD 2.x / OpenCLIP ------------------------------------------------------------------------


def openclip_to_ldmkit(
    state_dict: Mapping[str, Tensor], prefix: str = OPENCLIP_PREFIX, drop_last_layers: int = 0
) -> dict[str, Tensor]:
    """OpenCLIP keys under `prefix` -> ldmkit keys; keys outside `prefix` are left out.

    `drop_last_layers` leaves out the text tower's last layers: 1 turns SD 2's 24-layer
    ViT-H text tower into the 23-layer model that diffusers ships (same outputs as CompVis'
    "penultimate" choice). Unknown keys under `prefix` raise a CheckpointError.
    """
    items = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    text_blocks = {int(m[2]) for m in map(_RESBLOCK.match, items) if m and not m[1]}
    num_text_layers = len(text_blocks)
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in items.items():
        if key in _OPENCLIP_IGNORED:
            continue
        block = _RESBLOCK.match(key)
        if block:
            tower, index, rest = ("vision_model" if block[1] else "text_model"), int(block[2]), block[3]
            if tower == "text_model" and index >= num_text_layers - drop_last_layers:
                continue
            renamed = _layer_from_openclip(f"{tower}.encoder.layers.{index}.", rest, value)
        else:
            renamed = _top_level_from_openclip(key, value)
        if renamed is None:
            unknown.append(key)
        else:
            out.update(renamed)
    if unknown:
        raise CheckpointError(f"unknown OpenCLIP keys under {prefix!r}: {', '.join(sorted(unknown)[:5])}")
    return out


def _top_level_from_openclip(key: str, value: Tensor) -> dict[str, Tensor] | None:
    if key == "logit_scale":
        return {key: value}
    for ours, theirs in _OPENCLIP_PROJECTIONS.items():
        if key == theirs:
            return {ours: value.t().contiguous()}
    if key.startswith("visual."):
        tower, table, key = "vision_model.", _OPENCLIP_VISION, key.removeprefix("visual.")
    else:
        tower, table = "text_model.", _OPENCLIP_TEXT
    for ours, theirs in table.items():
        if key == theirs:
            return {tower + ours: value}
    return None


def _layer_from_openclip(ours_prefix: str, rest: str, value: Tensor) -> dict[str, Tensor] | None:
    """One resblock entry -> our layer keys; `attn.in_proj_*` stacks q, k, v along dim 0."""
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = rest.rsplit("_", 1)[1]  # weight | bias
        q, k, v = value.chunk(3, dim=0)  # each (D, D) or (D,)
        parts = zip("qkv", (q, k, v))
        return {f"{ours_prefix}self_attn.{name}_proj.{kind}": t.contiguous() for name, t in parts}
    module, _, kind = rest.rpartition(".")
    for ours, theirs in _OPENCLIP_LAYER.items():
        if module == theirs:
            return {f"{ours_prefix}{ours}.{kind}": value}
    return None


def ldmkit_to_openclip(
    state_dict: Mapping[str, Tensor], prefix: str = OPENCLIP_PREFIX
) -> dict[str, Tensor]:
    """ldmkit keys -> OpenCLIP keys under `prefix` (the inverse of `openclip_to_ldmkit`)."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        layer = _OUR_LAYER.match(key)
        if layer:
            tower = "visual." if layer[1] == "vision_model" else ""
            block = f"{tower}transformer.resblocks.{layer[2]}."
            module, _, kind = layer[3].rpartition(".")
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                name = module.removeprefix("self_attn.")[0]  # q | k | v
                qkv.setdefault((block, kind), {})[name] = value
                continue
            if module not in _OPENCLIP_LAYER:
                raise CheckpointError(f"no OpenCLIP name for {key!r}")
            out[f"{prefix}{block}{_OPENCLIP_LAYER[module]}.{kind}"] = value
        else:
            if key in _OPENCLIP_PROJECTIONS:
                value = value.t().contiguous()  # (P, D) -> (D, P)
            out[prefix + _top_level_to_openclip(key)] = value
    for (block, kind), parts in qkv.items():
        stacked = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # (3D, D) or (3D,)
        out[f"{prefix}{block}attn.in_proj_{kind}"] = stacked
    return out


def _top_level_to_openclip(key: str) -> str:
    if key == "logit_scale":
        return key
    if key in _OPENCLIP_PROJECTIONS:
        return _OPENCLIP_PROJECTIONS[key]
    towers = (("text_model.", _OPENCLIP_TEXT, ""), ("vision_model.", _OPENCLIP_VISION, "visual."))
    for tower, table, theirs_prefix in towers:
        rest = key.removeprefix(tower)
        if key.startswith(tower) and rest in table:
            return theirs_prefix + table[rest]
    raise CheckpointError(f"no OpenCLIP name for {key!r}")


# -- shapes -----------------------------------------------------------------------------------


def text_shapes_from_state_dict(
    state_dict: Mapping[str, Tensor], head_dim: int = 64
) -> dict[str, int | None]:
    """CLIPTextConfig shape fields read off ldmkit-keyed text weights.

    Heads cannot be seen in the tensors: they are hidden_size / head_dim (64 in every CLIP that
    SD uses). The activation cannot either: OpenAI towers use quick_gelu, OpenCLIP ones gelu.
    """
    token = state_dict.get("text_model.embeddings.token_embedding.weight")
    if token is None:
        raise CheckpointError("no text_model.embeddings.token_embedding.weight in the state dict")
    layers = {int(m[2]) for m in map(_OUR_LAYER.match, state_dict) if m and m[1] == "text_model"}
    projection = state_dict.get("text_projection.weight")
    return {
        "vocab_size": token.shape[0],
        "hidden_size": token.shape[1],
        "intermediate_size": state_dict["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        "num_hidden_layers": len(layers),
        "num_attention_heads": token.shape[1] // head_dim,
        "max_position_embeddings": state_dict["text_model.embeddings.position_embedding.weight"].shape[0],
        "projection_dim": None if projection is None else projection.shape[0],
    }
