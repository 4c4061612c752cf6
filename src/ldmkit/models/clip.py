"""CLIP: the text tower that conditions Stable Diffusion, the vision tower, and the pair.

CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision") trains a text transformer and a vision transformer (ViT, Dosovitskiy et al. 2021)
so that matching image/text pairs have a high cosine similarity. Stable Diffusion uses the text
tower's per-token hidden states (B, 77, D) as cross-attention context:

- SD 1.x: OpenAI ViT-L/14 text tower (768 wide, 12 layers, quick_gelu), last layer + final LN.
- SD 2.x: OpenCLIP ViT-H/14 text tower (1024 wide, gelu). CompVis runs 23 of its 24 layers and then
  the final LayerNorm ("penultimate"); diffusers folders ship the same thing as a 23-layer model.
  Both are supported: a 24-layer model with `skip_last_layers=1`, or a 23-layer one.

Module names follow transformers' CLIPModel / CLIPTextModel(WithProjection) /
CLIPVisionModelWithProjection state-dict keys (`text_model.encoder.layers.0.self_attn.q_proj`,
`vision_model.pre_layrnorm` [sic], `text_projection`, `logit_scale`, ...), so their weight files
load with a strict `load_state_dict` and no renames. Other layouts (CompVis, OpenCLIP) are renamed
in `ldmkit.checkpoints.keys_clip`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgument, check_choice
from .tokenizer import CLIPTokenizer

ACTIVATIONS = ("quick_gelu", "gelu")
POOLINGS = ("eos", "argmax")
LOGIT_SCALE_INIT = 2.6592  # ln(1 / 0.07), the initial temperature of Radford et al.
# Per-channel statistics of CLIP's training images, used to normalise pixels for the vision tower.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# -- configs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CLIPTextConfig:
    """The text transformer. Field names follow transformers' CLIPTextConfig."""

    vocab_size: int = 49408  # rows of the token embedding
    hidden_size: int = 768  # width D of the residual stream
    intermediate_size: int = 3072  # width of the MLP's hidden layer
    num_hidden_layers: int = 12  # transformer layers
    num_attention_heads: int = 12  # heads; head width is hidden_size / num_attention_heads
    max_position_embeddings: int = 77  # context length T (position embedding rows)
    hidden_act: str = "quick_gelu"  # MLP activation: "quick_gelu" (OpenAI) or "gelu" (OpenCLIP)
    layer_norm_eps: float = 1e-5  # epsilon of every LayerNorm
    projection_dim: int | None = None  # width of text_projection; None: the model has none
    eos_token_id: int = 49407  # end token, whose hidden state is the pooled output
    pooling: str = "eos"  # "eos": first end token; "argmax": position of the largest id
    skip_last_layers: int = 0  # layers left out before the final LN (1: SD 2 "penultimate")
    pad_token_id: int = 49407  # id the tokenizer pads with (0 for SD 2.x); unused by the model

    def __post_init__(self) -> None:
        check_choice("hidden_act", self.hidden_act, ACTIVATIONS)
        check_choice("pooling", self.pooling, POOLINGS)
        _check_heads(self.hidden_size, self.num_attention_heads)
        if not 0 <= self.skip_last_layers < self.num_hidden_layers:
            raise InvalidArgument(
                f"skip_last_layers must be in [0, {self.num_hidden_layers}), got {self.skip_last_layers}"
            )

    @classmethod
    def preset(cls, name: str) -> CLIPTextConfig:
        """A named text tower: "sd15_text", "sd2_text", "sd2_text_openclip" or "tiny"."""
        return TEXT_PRESETS[check_choice("text preset", name, tuple(TEXT_PRESETS))]


@dataclass(frozen=True)
class CLIPVisionConfig:
    """The vision transformer. Field names follow transformers' CLIPVisionConfig."""

    hidden_size: int = 1024  # width D of the residual stream
    intermediate_size: int = 4096  # width of the MLP's hidden layer
    num_hidden_layers: int = 24  # transformer layers
    num_attention_heads: int = 16  # heads; head width is hidden_size / num_attention_heads
    num_channels: int = 3  # input image channels
    image_size: int = 224  # input height and width in pixels
    patch_size: int = 14  # side of the square patches (the patch conv's kernel and stride)
    hidden_act: str = "quick_gelu"  # MLP activation: "quick_gelu" (OpenAI) or "gelu" (OpenCLIP)
    layer_norm_eps: float = 1e-5  # epsilon of every LayerNorm
    projection_dim: int | None = 768  # width of visual_projection; None: the model has none

    def __post_init__(self) -> None:
        check_choice("hidden_act", self.hidden_act, ACTIVATIONS)
        _check_heads(self.hidden_size, self.num_attention_heads)
        if self.image_size % self.patch_size:
            raise InvalidArgument(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )

    @property
    def num_patches(self) -> int:
        """Patch tokens per image (the class token comes on top)."""
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def preset(cls, name: str) -> CLIPVisionConfig:
        """A named vision tower: "vit_l14" (OpenAI ViT-L/14) or "tiny"."""
        return VISION_PRESETS[check_choice("vision preset", name, tuple(VISION_PRESETS))]


@dataclass(frozen=True)
class CLIPConfig:
    """Both towers and the shared embedding space of a contrastive CLIP model.

    The towers' own `projection_dim` is unused here (both projections are `projection_dim`
    wide); translation from transformers leaves it None.
    """

    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)  # the text tower
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)  # the vision tower
    projection_dim: int = 768  # width of the joint embedding space (both projections)
    logit_scale_init: float = LOGIT_SCALE_INIT  # initial log of the inverse temperature

    @classmethod
    def preset(cls, name: str) -> CLIPConfig:
        """A named CLIP model: "vit_l14" (OpenAI CLIP ViT-L/14) or "tiny"."""
        return CLIP_PRESETS[check_choice("CLIP preset", name, tuple(CLIP_PRESETS))]


def _check_heads(hidden_size: int, heads: int) -> None:
    if hidden_size % heads:
        raise InvalidArgument(f"hidden_size {hidden_size} is not divisible by {heads} attention heads")


TEXT_PRESETS = {
    "sd15_text": CLIPTextConfig(),
    "sd2_text": CLIPTextConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
        hidden_act="gelu", pad_token_id=0,
    ),
    "sd2_text_openclip": CLIPTextConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        hidden_act="gelu", pad_token_id=0, skip_last_layers=1, projection_dim=1024,
    ),
    "tiny": CLIPTextConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        eos_token_id=999, pad_token_id=999,
    ),
}
VISION_PRESETS = {
    "vit_l14": CLIPVisionConfig(),
    "tiny": CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=16,
    ),
}
CLIP_PRESETS = {
    "vit_l14": CLIPConfig(vision=replace(VISION_PRESETS["vit_l14"], projection_dim=None)),
    "tiny": CLIPConfig(
        text=TEXT_PRESETS["tiny"],
        vision=replace(VISION_PRESETS["tiny"], projection_dim=None),
        projection_dim=16,
    ),
}


# -- config translation to and from transformers' config.json ----------------------------------

_TEXT_DEFAULTS_HF = {  # transformers' CLIPTextConfig defaults, for keys a config.json leaves out
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
    "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "projection_dim": 512, "eos_token_id": 49407,
}
_VISION_DEFAULTS_HF = {  # transformers' CLIPVisionConfig defaults
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "projection_dim": 512,
}
_LEGACY_EOS_ID = 2  # transformers pools at argmax(ids) when a config says eos_token_id == 2


def _with_projection(config: dict, with_projection: bool | None) -> bool:
    if with_projection is not None:
        return with_projection
    return any("WithProjection" in name for name in config.get("architectures") or ())


def text_config_from_transformers(config: dict, with_projection: bool | None = None) -> CLIPTextConfig:
    """Our CLIPTextConfig from a transformers text `config.json` dict.

    transformers always records a projection_dim; whether the weights have a text_projection is
    told by the architecture name (…WithProjection) unless `with_projection` says otherwise.
    Its pad_token_id is not trusted (SD folders say 1); ours becomes the end token, and the
    tokenizer folder's pad token is what counts (see `ldmkit.models.tokenizer`).
    """
    c = {**_TEXT_DEFAULTS_HF, **{k: v for k, v in config.items() if v is not None}}
    eos = c["eos_token_id"][0] if isinstance(c["eos_token_id"], list) else c["eos_token_id"]
    legacy = eos == _LEGACY_EOS_ID
    return CLIPTextConfig(
        **{k: c[k] for k in _TEXT_DEFAULTS_HF if k not in ("projection_dim", "eos_token_id")},
        projection_dim=c["projection_dim"] if _with_projection(config, with_projection) else None,
        eos_token_id=CLIPTextConfig.eos_token_id if legacy else eos,
        pooling="argmax" if legacy else "eos",
        pad_token_id=CLIPTextConfig.pad_token_id if legacy else eos,
    )


def text_config_to_transformers(config: CLIPTextConfig) -> dict:
    """A transformers CLIPTextConfig dict for our config (argmax pooling is written as eos id 2)."""
    out = {k: getattr(config, k) for k in _TEXT_DEFAULTS_HF if k != "projection_dim"}
    out["projection_dim"] = config.projection_dim or config.hidden_size
    out["eos_token_id"] = _LEGACY_EOS_ID if config.pooling == "argmax" else config.eos_token_id
    name = "CLIPTextModelWithProjection" if config.projection_dim else "CLIPTextModel"
    return {"architectures": [name], "model_type": "clip_text_model", **out}


def vision_config_from_transformers(
    config: dict, with_projection: bool | None = None
) -> CLIPVisionConfig:
    """Our CLIPVisionConfig from a transformers vision `config.json` dict."""
    c = {**_VISION_DEFAULTS_HF, **{k: v for k, v in config.items() if v is not None}}
    projection = c["projection_dim"] if _with_projection(config, with_projection) else None
    return CLIPVisionConfig(
        **{k: c[k] for k in _VISION_DEFAULTS_HF if k != "projection_dim"}, projection_dim=projection
    )


def vision_config_to_transformers(config: CLIPVisionConfig) -> dict:
    """A transformers CLIPVisionConfig dict for our config."""
    out = {k: getattr(config, k) for k in _VISION_DEFAULTS_HF if k != "projection_dim"}
    out["projection_dim"] = config.projection_dim or config.hidden_size
    name = "CLIPVisionModelWithProjection" if config.projection_dim else "CLIPVisionModel"
    return {"architectures": [name], "model_type": "clip_vision_model", **out}


def clip_config_from_transformers(config: dict) -> CLIPConfig:
    """Our CLIPConfig from a transformers CLIPModel `config.json` dict."""
    projection = config.get("projection_dim") or 512
    return CLIPConfig(
        text=text_config_from_transformers(config.get("text_config") or {}, with_projection=False),
        vision=vision_config_from_transformers(config.get("vision_config") or {}, with_projection=False),
        projection_dim=projection,
        logit_scale_init=config.get("logit_scale_init_value", LOGIT_SCALE_INIT),
    )


def clip_config_to_transformers(config: CLIPConfig) -> dict:
    """A transformers CLIPConfig dict for our config."""
    text = text_config_to_transformers(replace(config.text, projection_dim=config.projection_dim))
    vision = vision_config_to_transformers(replace(config.vision, projection_dim=config.projection_dim))
    for sub in (text, vision):
        sub.pop("architectures")
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "text_config": text,
        "vision_config": vision,
        "projection_dim": config.projection_dim,
        "logit_scale_init_value": config.logit_scale_init,
    }


def config_to_dict(config: CLIPTextConfig | CLIPVisionConfig | CLIPConfig) -> dict:
    """Our own JSON form of a config (plain `asdict`)."""
    return asdict(config)


def config_from_dict(cls: type, data: dict):
    """Inverse of `config_to_dict`; unknown keys are an error rather than silently dropped."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidArgument(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
    if cls is CLIPConfig:
        text, vision = CLIPTextConfig(**data["text"]), CLIPVisionConfig(**data["vision"])
        data = {**data, "text": text, "vision": vision}
    return cls(**data)


# -- layers -----------------------------------------------------------------------------------


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): OpenAI CLIP's cheap GELU approximation (Hendrycks & Gimpel 2016)."""
    return x * torch.sigmoid(1.702 * x)


def _activation(name: str):
    return quick_gelu if name == "quick_gelu" else F.gelu


class CLIPAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (Vaswani et al. 2017)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False
    ) -> torch.Tensor:
        B, T, D = x.shape
        q = self.q_proj(x).view(B, T, self.heads, D // self.heads).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.heads, D // self.heads).transpose(1, 2)  # (B, nh, T, hd)
        v = self.v_proj(x).view(B, T, self.heads, D // self.heads).transpose(1, 2)  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.out_proj(y)


class CLIPMLP(nn.Module):
    """The transformer's feed-forward block: fc1, activation, fc2."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.act = _activation(act)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """A pre-LayerNorm transformer layer: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.self_attn = CLIPAttention(dim, config.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(dim, config.intermediate_size, config.hidden_act)
        self.layer_norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False
    ) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask, causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """A stack of encoder layers that returns every intermediate hidden state."""

    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        num_layers: int | None = None,
    ) -> list[torch.Tensor]:
        """[input, after layer 1, ..., after layer num_layers] (all layers by default)."""
        states = [x]
        for layer in self.layers[:num_layers]:
            states.append(layer(states[-1], mask, causal))
        return states


# -- text tower -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CLIPTextOutput:
    """What the text tower computes. B batch, T tokens, D width, P projection width."""

    last_hidden_state: torch.Tensor  # (B, T, D) final LayerNorm of the last layer run: SD's context
    hidden_states: tuple[torch.Tensor, ...]  # (B, T, D) embeddings, then each layer run (no final LN)
    pooled: torch.Tensor  # (B, D) last_hidden_state at the end token
    text_embeds: torch.Tensor | None  # (B, P) text_projection(pooled), when the model has one


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T, context = input_ids.shape[1], self.position_embedding.num_embeddings
        if T > context:
            raise InvalidArgument(f"{T} tokens exceed the text context of {context}")
        return self.token_embedding(input_ids) + self.position_embedding.weight[:T]  # (B, T, D)


class CLIPTextTransformer(nn.Module):
    """Embeddings, a causal pre-LN transformer, and the final LayerNorm (`text_model.*` keys)."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        skip_last_layers: int | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
        """(last_hidden_state, hidden_states, pooled); see `CLIPTextOutput`."""
        depth = self.config.num_hidden_layers
        skip = self.config.skip_last_layers if skip_last_layers is None else skip_last_layers
        if not 0 <= skip < depth:
            raise InvalidArgument(f"skip_last_layers must be in [0, {depth}), got {skip}")
        x = self.embeddings(input_ids)  # (B, T, D)
        mask = None if attention_mask is None else _causal_padding_mask(attention_mask)
        states = self.encoder(x, mask, causal=mask is None, num_layers=depth - skip)
        last = self.final_layer_norm(states[-1])  # (B, T, D)
        rows = torch.arange(len(last), device=last.device)
        pooled = last[rows, self._end_positions(input_ids).to(last.device)]  # (B, D)
        return last, tuple(states), pooled

    def _end_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Index of the end token per row: its first occurrence, or the largest id (legacy rule)."""
        if self.config.pooling == "argmax":
            return input_ids.argmax(dim=-1)
        return (input_ids == self.config.eos_token_id).int().argmax(dim=-1)


def _causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, T, T) mask: a query sees earlier keys that are not padding."""
    T = attention_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()  # (T, T)
    return causal[None, None] & attention_mask.bool()[:, None, None, :]  # (B, 1, T, T)


class CLIPTextModel(nn.Module):
    """CLIP's text tower, with `text_projection` when `config.projection_dim` is set.

    Keys match transformers' CLIPTextModel (no projection) and CLIPTextModelWithProjection.
    """

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        proj = config.projection_dim
        self.text_projection = nn.Linear(config.hidden_size, proj, bias=False) if proj else None
        init_clip_weights(self)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        skip_last_layers: int | None = None,
    ) -> CLIPTextOutput:
        """Encode ids (B, T). `skip_last_layers` (default: the config's) picks the layer whose
        output, after the final LayerNorm, is `last_hidden_state` (1 = penultimate, SD 2)."""
        last, states, pooled = self.text_model(input_ids, attention_mask, skip_last_layers)
        embeds = self.text_projection(pooled) if self.text_projection is not None else None
        return CLIPTextOutput(last, states, pooled, embeds)


# -- vision tower -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CLIPVisionOutput:
    """What the vision tower computes. B batch, N = 1 + patches, D width, P projection width."""

    last_hidden_state: torch.Tensor  # (B, N, D) output of the last layer (no post-LN)
    hidden_states: tuple[torch.Tensor, ...]  # (B, N, D) pre-LN embeddings, then each layer
    pooled: torch.Tensor  # (B, D) post-LayerNorm of the class token
    image_embeds: torch.Tensor | None  # (B, P) visual_projection(pooled), when the model has one


class CLIPVisionEmbeddings(nn.Module):
    """Patch convolution, a learned class token, and learned position embeddings (ViT)."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.config = config
        D, p = config.hidden_size, config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(D))
        self.patch_embedding = nn.Conv2d(config.num_channels, D, kernel_size=p, stride=p, bias=False)
        self.position_embedding = nn.Embedding(config.num_patches + 1, D)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if pixel_values.shape[-2:] != (size, size):
            raise InvalidArgument(f"images must be {size}x{size}, got {tuple(pixel_values.shape[-2:])}")
        B = pixel_values.shape[0]
        w = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(w.dtype))  # (B, D, H/p, W/p)
        patches = patches.flatten(2).transpose(1, 2)  # (B, H*W/p^2, D)
        cls = self.class_embedding.to(patches.dtype).expand(B, 1, -1)  # (B, 1, D)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # (B, N, D)


class CLIPVisionTransformer(nn.Module):
    """Embeddings, pre-LayerNorm, transformer, post-LayerNorm on the class token."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config)
        # [sic]: transformers' spelling, kept so that its weights load unchanged
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, pixel_values: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
        """(last_hidden_state, hidden_states, pooled); see `CLIPVisionOutput`."""
        states = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))
        return states[-1], tuple(states), self.post_layernorm(states[-1][:, 0])  # pooled (B, D)


class CLIPVisionModel(nn.Module):
    """CLIP's vision tower, with `visual_projection` when `config.projection_dim` is set.

    Keys match transformers' CLIPVisionModelWithProjection (or CLIPVisionModel without it).
    Input pixels are CLIP-normalised (see `clip_preprocess`).
    """

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = CLIPVisionTransformer(config)
        proj = config.projection_dim
        self.visual_projection = nn.Linear(config.hidden_size, proj, bias=False) if proj else None
        init_clip_weights(self)

    def forward(self, pixel_values: torch.Tensor) -> CLIPVisionOutput:
        """Encode CLIP-normalised images (B, C, H, W)."""
        last, states, pooled = self.vision_model(pixel_values)
        embeds = self.visual_projection(pooled) if self.visual_projection is not None else None
        return CLIPVisionOutput(last, states, pooled, embeds)


# -- the contrastive model --------------------------------------------------------------------


@dataclass(frozen=True)
class CLIPOutput:
    """Similarities of a batch of texts and images (unit-normalised embeddings)."""

    logits_per_text: torch.Tensor  # (B_text, B_image) scaled cosine similarities
    logits_per_image: torch.Tensor  # (B_image, B_text) its transpose
    text_embeds: torch.Tensor  # (B_text, P) unit-norm text embeddings
    image_embeds: torch.Tensor  # (B_image, P) unit-norm image embeddings
    loss: torch.Tensor | None  # () symmetric contrastive loss, when asked for
    text_hidden_state: torch.Tensor | None = None  # (B_text, T, D) the text tower's last hidden state


def contrastive_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss (Radford et al. 2021, Fig. 3): the i-th text matches the
    i-th image; the mean of the text->image and image->text cross-entropies.

    Texts beyond the images' count (rows B_image onwards) match no image: they are extra
    negatives each image must rank below its own caption (NegCLIP's hard negatives)."""
    num_images = logits_per_text.shape[1]
    if len(logits_per_text) < num_images:
        raise InvalidArgument(f"{len(logits_per_text)} texts for {num_images} images: every image needs its text")
    labels = torch.arange(num_images, device=logits_per_text.device)
    text_loss = F.cross_entropy(logits_per_text[:num_images], labels)
    image_loss = F.cross_entropy(logits_per_text.t(), labels)
    return (text_loss + image_loss) / 2


class CLIPModel(nn.Module):
    """Both towers, their projections into a shared space, and a learned temperature.

    Keys match transformers' CLIPModel: text_model.*, vision_model.*, text_projection,
    visual_projection, logit_scale.
    """

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config.text)
        self.vision_model = CLIPVisionTransformer(config.vision)
        self.visual_projection = nn.Linear(config.vision.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init))
        init_clip_weights(self)

    def encode_text(self, input_ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Projected text embeddings (B, P) of ids (B, T)."""
        _, _, pooled = self.text_model(input_ids)
        return self._project_text(pooled, normalize)

    def _project_text(self, pooled: torch.Tensor, normalize: bool) -> torch.Tensor:
        embeds = self.text_projection(pooled)
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Projected image embeddings (B, P) of CLIP-normalised images (B, C, H, W)."""
        _, _, pooled = self.vision_model(pixel_values)
        embeds = self.visual_projection(pooled)
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def forward(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor, return_loss: bool = False
    ) -> CLIPOutput:
        """Scaled cosine similarities between every text and every image, and optionally the loss."""
        text_states, _, pooled = self.text_model(input_ids)  # the states too, for CLIPStage's word-keeping term
        text = self._project_text(pooled, normalize=True)  # (Bt, P)
        image = self.encode_image(pixel_values, normalize=True)  # (Bi, P)
        logits_per_text = self.logit_scale.exp() * text @ image.t()  # (Bt, Bi)
        loss = contrastive_loss(logits_per_text) if return_loss else None
        return CLIPOutput(logits_per_text, logits_per_text.t(), text, image, loss, text_states)


@torch.no_grad()
def init_clip_weights(model: nn.Module) -> None:
    """CLIP's initialisation (Radford et al. 2021 code, as transformers and OpenCLIP use it):
    normal(0.02) embeddings, width- and depth-scaled normal projections, zero biases."""
    for module in model.modules():
        if isinstance(module, CLIPTextEmbeddings):
            nn.init.normal_(module.token_embedding.weight, std=0.02)
            nn.init.normal_(module.position_embedding.weight, std=0.02)
        elif isinstance(module, CLIPVisionEmbeddings):
            nn.init.normal_(module.class_embedding, std=module.config.hidden_size**-0.5)
            nn.init.normal_(module.patch_embedding.weight, std=0.02)
            nn.init.normal_(module.position_embedding.weight, std=0.02)
        elif isinstance(module, (CLIPTextTransformer, CLIPVisionTransformer)):
            _init_layers(module.encoder, module.config.hidden_size)
    for name in ("text_projection", "visual_projection"):
        proj = getattr(model, name, None)
        if proj is not None:
            nn.init.normal_(proj.weight, std=proj.in_features**-0.5)


def _init_layers(encoder: CLIPEncoder, width: int) -> None:
    depth_scale = (2 * len(encoder.layers)) ** -0.5
    for layer in encoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            nn.init.normal_(proj.weight, std=width**-0.5 * depth_scale)
        nn.init.normal_(attn.out_proj.weight, std=width**-0.5)
        nn.init.normal_(mlp.fc1.weight, std=(2 * width) ** -0.5)
        nn.init.normal_(mlp.fc2.weight, std=width**-0.5 * depth_scale)
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, mlp.fc1, mlp.fc2):
            nn.init.zeros_(linear.bias)


# -- uses: preprocessing, zero-shot classification, retrieval ---------------------------------


def clip_preprocess(images: torch.Tensor, image_size: int = 224) -> torch.Tensor:
    """ldmkit images (B, C, H, W) in [-1, 1] -> CLIP-normalised (B, C, image_size, image_size).

    Like CLIP's preprocessing: resize the short side (bicubic, antialiased), centre crop,
    normalise with CLIP's mean/std. Resampling is torch's, not PIL's, so pixels differ slightly.
    """
    x = (images.float() + 1) / 2  # (B, C, H, W) in [0, 1]
    H, W = x.shape[-2:]
    scale = image_size / min(H, W)
    size = (max(image_size, round(H * scale)), max(image_size, round(W * scale)))
    if size != (H, W):
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    top, left = (size[0] - image_size) // 2, (size[1] - image_size) // 2
    x = x[..., top : top + image_size, left : left + image_size]  # (B, C, S, S)
    mean = torch.tensor(OPENAI_MEAN, device=x.device).view(1, -1, 1, 1)  # (1, C, 1, 1)
    std = torch.tensor(OPENAI_STD, device=x.device).view(1, -1, 1, 1)  # (1, C, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def zero_shot_classify(
    model: CLIPModel,
    tokenizer: CLIPTokenizer,
    images: torch.Tensor,
    class_prompts: Sequence[str | Sequence[str]],
) -> torch.Tensor:
    """Class probabilities (B, K) of images (B, C, H, W) in [-1, 1] (Radford et al. 2021, §3.1).

    `class_prompts[k]` is a prompt for class k ("a photo of a dog") or a list of them; a list is
    a prompt ensemble (§3.1.4): the mean of its unit text embeddings, renormalised.
    """
    if not class_prompts:
        raise InvalidArgument("zero_shot_classify needs at least one class prompt")
    device = model.logit_scale.device
    classes = []
    for prompts in class_prompts:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        text = model.encode_text(tokenizer(prompts).to(device), normalize=True)  # (n, P)
        classes.append(F.normalize(text.mean(dim=0), dim=-1))
    text = torch.stack(classes)  # (K, P)
    pixels = clip_preprocess(images.to(device), model.config.vision.image_size)
    image = model.encode_image(pixels.to(model.visual_projection.weight.dtype), normalize=True)  # (B, P)
    logits = model.logit_scale.exp() * image @ text.t()  # (B, K)
    return logits.float().softmax(dim=-1)


@torch.no_grad()
def retrieve(
    model: CLIPModel, text_emb: torch.Tensor, image_embs: torch.Tensor, k: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k images per text query by cosine similarity: (scores (Q, k), indices (Q, k)).

    `text_emb` is embeddings (P,) or (Q, P), or token ids (Q, T) which `model` encodes;
    `image_embs` is embeddings (N, P), or images (N, C, H, W) in [-1, 1] which `model` encodes.
    """
    if not text_emb.is_floating_point():
        text_emb = model.encode_text(text_emb.to(model.logit_scale.device))
    if image_embs.ndim == 4:
        pixels = clip_preprocess(image_embs.to(model.logit_scale.device), model.config.vision.image_size)
        image_embs = model.encode_image(pixels)
    text = F.normalize(text_emb.reshape(-1, text_emb.shape[-1]).float(), dim=-1)  # (Q, P)
    image = F.normalize(image_embs.float(), dim=-1)  # (N, P)
    if not 1 <= k <= len(image):
        raise InvalidArgument(f"k must be between 1 and the number of images ({len(image)}), got {k}")
    scores = text @ image.t()  # (Q, N)
    return scores.topk(k, dim=-1)
