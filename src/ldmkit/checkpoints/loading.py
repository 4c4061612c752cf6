"""Whole Stable Diffusion checkpoints: a diffusers folder or a CompVis/LDM single file in, the
four models and the noise schedule out (`load_pipeline_components`), and back to either layout
(`save_diffusers`, `save_single_file`).

Formats read:

- diffusers folder: `model_index.json`, `unet/` and `vae/` (`config.json` +
  `diffusion_pytorch_model.safetensors` or `.bin`), `text_encoder/` (transformers `config.json`
  + `model.safetensors` or `pytorch_model.bin`), `tokenizer/` (`vocab.json` + `merges.txt`),
  `scheduler/scheduler_config.json`.
- CLIP alone (`load_clip`, `save_clip`): a transformers CLIPModel folder, `config.json` +
  `model.safetensors` or `pytorch_model.bin`, whose keys are ldmkit's own.
- single file (`.safetensors`, `.ckpt`, `.pt`, `.pth`, `.bin`): the U-Net under
  `model.diffusion_model.`, the VAE under `first_stage_model.`, the text encoder under
  `cond_stage_model.transformer.` (SD 1.x, OpenAI CLIP ViT-L) or `cond_stage_model.model.`
  (SD 2.x, OpenCLIP ViT-H). Everything else (EMA copies, schedule buffers, VAE loss) is ignored.

Detection from a single file's tensors (each overridable by a keyword flag):

- architecture: "sd1" for the CompVis CLIP layout, "sd2" for OpenCLIP. It fixes what tensors
  cannot show: U-Net heads (SD 1.x: 8 per level; SD 2.x: 64-wide heads), the text activation
  and the tokenizer's padding.
- inpainting: the U-Net takes 9 input channels (latents, mask, masked-image latents). Shapes
  cannot be overridden, so `inpainting=` is checked against the tensors.
- prediction type, in order: the `prediction_type=` flag; ldmkit's own safetensors metadata
  (`ldmkit.prediction_type`); a `v_pred` marker tensor; the heuristic "SD 2.x => v_prediction"
  (the 768-v models), except SD 2.x inpainting and files whose `global_step` is 875000 (the
  512-base model), which are epsilon; SD 1.x => epsilon. SD 2.x 512-base files without that
  step need `prediction_type="epsilon"`.
- SD 2.x text tower: original files hold all 24 OpenCLIP layers plus `text_projection`; SD uses
  the penultimate layer, so the full tower is kept with `skip_last_layers=1`. A file without
  `text_projection` (converted from a diffusers folder, whose tower is already cut) uses all of
  its layers.

Weights are assigned into models built on the meta device (`load_state_dict(assign=True)`), so
no second full copy is made; missing, unexpected, wrongly shaped and non-finite weights raise one
CheckpointError naming a few of them.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..diffusion.schedule import PREDICTION_TYPES, ScheduleConfig
from ..errors import CheckpointError, InvalidArgument, LdmkitError, check_choice
from ..models.clip import (
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    clip_config_from_transformers,
    clip_config_to_transformers,
    text_config_from_transformers,
    text_config_to_transformers,
)
from ..models.tokenizer import TOKENIZER_JSON, CLIPTokenizer, load_tokenizer
from ..models.unet import UNet, UNetConfig
from ..models.vae import AutoencoderKL, VAEConfig
from . import keys_clip
from .io import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    check_finite,
    check_readable_file,
    load_pickle,
    read_safetensors,
    read_safetensors_metadata,
    save_safetensors,
    state_dict_from_object,
    write_text_atomic,
)
from .keys_unet_vae import (
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

ARCHITECTURES = ("sd1", "sd2")
SINGLE_FILE_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
SD2_BASE_GLOBAL_STEP = 875000  # global_step of stable-diffusion-2-base (epsilon, 512 px)
DIFFUSERS_VERSION = "0.30.0"  # written into configs we save; any recent diffusers reads them
_VAE_IGNORED_PREFIX = "loss."  # the VAE's training loss (LPIPS, discriminator) in some files
_SD_HEAD_WIDTH = 64  # SD 2.x U-Net heads and every CLIP text head are 64 wide
_SD1_HEADS = 8  # SD 1.x U-Net: 8 heads at every level


@dataclass
class Components:
    """The parts of a Stable Diffusion model, ready to run."""

    unet: UNet  # the noise predictor
    vae: AutoencoderKL  # image <-> latent autoencoder
    text_encoder: CLIPTextModel  # prompt ids -> context
    tokenizer: CLIPTokenizer  # prompt -> ids
    schedule_config: ScheduleConfig  # how the U-Net was trained to be noised (incl. prediction type)
    source_format: str = "diffusers"  # "diffusers" folder or "single_file"
    architecture: str = "sd1"  # "sd1" (OpenAI CLIP) or "sd2" (OpenCLIP)

    @property
    def prediction_type(self) -> str:
        return self.schedule_config.prediction_type

    @property
    def inpainting(self) -> bool:
        return self.unet.config.in_channels == 9

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def describe(self) -> dict:
        """A JSON-friendly summary of what was loaded."""
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        text = self.text_encoder.config
        return {
            "format": self.source_format,
            "architecture": self.architecture,
            "prediction_type": self.prediction_type,
            "inpainting": self.inpainting,
            "unet_in_channels": self.unet.config.in_channels,
            "context_dim": self.unet.config.context_dim,
            "text_layers": text.num_hidden_layers - text.skip_last_layers,
            "parameters": {
                "unet": count(self.unet),
                "vae": count(self.vae),
                "text_encoder": count(self.text_encoder),
            },
            "dtype": str(self.dtype).removeprefix("torch."),
        }


def load_pipeline_components(
    path: str | Path,
    *,
    prediction_type: str | None = None,
    arch: str | None = None,
    inpainting: bool | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Components:
    """Load a diffusers folder or a CompVis/LDM single file (see the module docstring).

    `prediction_type` ("epsilon", "v_prediction", "sample") and `arch` ("sd1", "sd2") override
    what is detected; `inpainting` must agree with the weights. Floating-point weights are cast
    to `dtype` and placed on `device` as they are assigned.
    """
    if prediction_type is not None:
        check_choice("prediction type", prediction_type, PREDICTION_TYPES)
    if arch is not None:
        check_choice("architecture", arch, ARCHITECTURES)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidArgument(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    path = Path(path)
    if path.is_dir():
        comps = _load_diffusers(path, arch, dtype, device)
    else:
        if path.exists() and path.suffix not in SINGLE_FILE_SUFFIXES:
            raise CheckpointError(
                f"{path}: not a diffusers folder or a single-file checkpoint "
                f"(expected a folder or one of {', '.join(SINGLE_FILE_SUFFIXES)})"
            )
        comps = _load_single_file(path, prediction_type, arch, dtype, device)
    if prediction_type is not None:
        comps.schedule_config = replace(comps.schedule_config, prediction_type=prediction_type)
    if inpainting is not None and inpainting != comps.inpainting:
        raise CheckpointError(
            f"{path}: inpainting={inpainting} requested, but the U-Net takes "
            f"{comps.unet.config.in_channels} input channels ({'' if comps.inpainting else 'not '}inpainting)"
        )
    return comps


# -- building models from state dicts ------------------------------------------------------------


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


@contextmanager
def _random_init_skipped():
    """torch.nn.init's fills do nothing inside: a model built on the meta device to receive loaded
    weights has nothing to fill, and `normal_` on a meta tensor would import torch._dynamo
    (about 1.7 s of a cold `ldmkit generate`) to do nothing."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def build_model(
    cls: type[nn.Module],
    config,
    state: dict[str, torch.Tensor],
    *,
    source: str,
    what: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """`cls(config)` built on the meta device with `state` assigned in (no second copy).

    Missing, unexpected, wrongly shaped or non-finite (NaN/Inf) weights raise one CheckpointError
    naming `source`, `what` and a few of the keys.
    """
    with torch.device("meta"), _random_init_skipped():
        model = cls(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(shape)}"
        for k, shape in expected.items()
        if k in state and state[k].shape != shape
    ]
    problems = [
        f"{len(keys)} {label}: {_few(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", wrong))
        if keys
    ]
    if problems:
        raise CheckpointError(f"{source}: {what} weights do not fit the model; " + "; ".join(problems))
    check_finite(state, source, what)
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# -- diffusers folders ---------------------------------------------------------------------------

_UNET_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                 "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")
_TEXT_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors", "pytorch_model.fp16.bin")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix in SAFETENSORS_SUFFIXES:
        return read_safetensors(path)
    return state_dict_from_object(load_pickle(path), path)


def _component_weights(folder: Path, names: tuple[str, ...]) -> tuple[Path, dict[str, torch.Tensor]]:
    for name in names:
        if (folder / name).is_file():
            return folder / name, _read_weights_file(folder / name)
    if any(folder.glob("*.index.json")):
        raise CheckpointError(f"{folder}: sharded weights are not supported yet")
    raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(names[:2])})")


def _config_error(path: Path, e: LdmkitError) -> CheckpointError:
    return CheckpointError(f"{path}: {e}")


def _load_diffusers(folder: Path, arch: str | None, dtype, device) -> Components:
    if not (folder / "model_index.json").is_file() and not (folder / "unet" / "config.json").is_file():
        raise CheckpointError(f"{folder}: not a diffusers folder (no model_index.json)")
    if (folder / "model_index.json").is_file():
        index = _read_json(folder / "model_index.json")
        if "unet" not in index or "vae" not in index or "text_encoder" not in index:
            raise CheckpointError(
                f"{folder}/model_index.json: not a Stable Diffusion pipeline (needs unet, vae, text_encoder)"
            )
    try:
        unet_cfg = unet_config_from_diffusers(_read_json(folder / "unet" / "config.json"))
    except LdmkitError as e:
        raise _config_error(folder / "unet" / "config.json", e) from None
    if unet_cfg.context_dim is None:
        raise CheckpointError(f"{folder}/unet/config.json: not a text-conditioned U-Net")
    try:
        vae_cfg = vae_config_from_diffusers(_read_json(folder / "vae" / "config.json"))
        text_cfg = text_config_from_transformers(_read_json(folder / "text_encoder" / "config.json"))
    except LdmkitError as e:
        raise _config_error(folder, e) from None
    unet_path, unet_sd = _component_weights(folder / "unet", _UNET_WEIGHTS)
    unet = build_model(UNet, unet_cfg, unet_sd, source=str(unet_path), what="U-Net", dtype=dtype, device=device)
    del unet_sd
    vae_path, vae_sd = _component_weights(folder / "vae", _UNET_WEIGHTS)
    vae = build_model(AutoencoderKL, vae_cfg, vae_sd, source=str(vae_path), what="VAE", dtype=dtype, device=device)
    del vae_sd
    text_path, text_sd = _component_weights(folder / "text_encoder", _TEXT_WEIGHTS)
    try:
        text_sd = keys_clip.to_ldmkit(text_sd)
    except LdmkitError as e:
        raise _config_error(text_path, e) from None
    text = build_model(CLIPTextModel, text_cfg, text_sd, source=str(text_path), what="text encoder",
                       dtype=dtype, device=device)
    detected = "sd2" if unet_cfg.linear_projection or text_cfg.hidden_act == "gelu" else "sd1"
    tokenizer = _tokenizer_from_folder(folder, detected)
    _check_vocab(tokenizer, text_cfg, folder)
    schedule_path = folder / "scheduler" / "scheduler_config.json"
    try:
        schedule = ScheduleConfig.from_dict(_read_json(schedule_path)) if schedule_path.is_file() else ScheduleConfig()
    except (LdmkitError, TypeError) as e:
        raise CheckpointError(f"{schedule_path}: {e}") from None
    return Components(unet, vae, text, tokenizer, schedule, "diffusers", arch or detected)


def _tokenizer_from_folder(folder: Path, arch: str) -> CLIPTokenizer:
    """`tokenizer/` in either layout (vocab.json + merges.txt, or transformers 5's tokenizer.json);
    with neither, the bundled OpenAI vocabulary padded as `arch` pads."""
    tok_dir = folder / "tokenizer"
    if (tok_dir / "vocab.json").is_file() or (tok_dir / TOKENIZER_JSON).is_file():
        try:
            return load_tokenizer(tok_dir)
        except LdmkitError as e:
            raise CheckpointError(f"{tok_dir}: {e}") from None
    return load_tokenizer(None, pad=_pad(arch))


def _pad(arch: str) -> str:
    return "zero" if arch == "sd2" else "end"


def _check_vocab(tokenizer: CLIPTokenizer, text_cfg: CLIPTextConfig, source) -> None:
    if tokenizer.vocab_size > text_cfg.vocab_size:
        raise CheckpointError(
            f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the text encoder "
            f"embeds only {text_cfg.vocab_size}"
        )


# -- CLIP alone (transformers' CLIPModel folder) -------------------------------------------------


def load_clip(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> CLIPModel:
    """A transformers CLIPModel folder (`config.json` + weights) as ldmkit's CLIPModel, for
    zero-shot classification, retrieval or CLIP guidance."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (a CLIP model is a config.json and its weights)")
    config_path = folder / "config.json"
    raw = _read_json(config_path)
    if raw.get("model_type", "clip") != "clip" or "vision_config" not in raw:
        raise CheckpointError(f"{config_path}: not a CLIPModel config (needs text_config and vision_config)")
    try:
        config = clip_config_from_transformers(raw)
    except LdmkitError as e:
        raise _config_error(config_path, e) from None
    path, state = _component_weights(folder, _TEXT_WEIGHTS)
    state = keys_clip.drop_position_ids(state)
    return build_model(CLIPModel, config, state, source=str(path), what="CLIP", dtype=dtype, device=device)


def save_clip(model: CLIPModel, folder: str | Path) -> None:
    """Write `model` as a transformers CLIPModel folder (each file atomically)."""
    folder = Path(folder)
    config = clip_config_to_transformers(model.config)
    write_text_atomic(folder / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_safetensors(model.state_dict(), folder / "model.safetensors")


# -- single files: detection ------------------------------------------------------------------------


def _count(sd, pattern: str) -> int:
    found = [int(m.group(1)) for k in sd if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def unet_config_from_ldm(sd: dict[str, torch.Tensor], arch: str) -> UNetConfig:
    """A UNetConfig read off LDM U-Net tensors (keys without `model.diffusion_model.`).

    Heads are not visible in the tensors: `arch` decides (sd1: 8 per level; sd2: 64 wide).
    GroupNorm groups are SD's 32.
    """
    conv_in = sd.get("input_blocks.0.0.weight")
    if conv_in is None:
        raise CheckpointError("no U-Net input_blocks.0.0.weight")
    levels: list[list[tuple[int, bool]]] = [[]]
    i = 1
    while True:
        if f"input_blocks.{i}.0.op.weight" in sd:
            levels.append([])
        elif f"input_blocks.{i}.0.out_layers.3.weight" in sd:
            channels = sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0]
            levels[-1].append((channels, f"input_blocks.{i}.1.proj_in.weight" in sd))
        else:
            break
        i += 1
    per = len(levels[0])
    if per == 0 or any(len(level) != per for level in levels):
        raise CheckpointError("U-Net input_blocks do not have the same number of blocks per level")
    channels = tuple(level[0][0] for level in levels)
    attention = tuple(level[0][1] for level in levels)
    to_k = next((k for k in sd if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((k for k in sd if k.endswith(".proj_in.weight")), None)
    if to_k is None or proj_in is None:
        raise CheckpointError("the U-Net has no cross-attention (not a Stable Diffusion U-Net)")
    first_attn = proj_in.rsplit(".proj_in.weight", 1)[0]
    layers = _count(sd, re.escape(first_attn) + r"\.transformer_blocks\.(\d+)\.")
    if arch == "sd2":
        heads = tuple(max(c // _SD_HEAD_WIDTH, 1) for c in channels)
    else:
        heads = tuple(_SD1_HEADS if c % _SD1_HEADS == 0 else 1 for c in channels)
    time_dim = sd["time_embed.0.weight"].shape[0]
    label = sd.get("label_emb.weight")
    return UNetConfig(
        in_channels=conv_in.shape[1], out_channels=sd["out.2.weight"].shape[0], block_channels=channels,
        layers_per_block=per, attention_levels=attention, mid_attention="middle_block.1.proj_in.weight" in sd,
        num_heads=heads, context_dim=sd[to_k].shape[1], linear_projection=sd[proj_in].ndim == 2,
        transformer_layers=layers, time_embed_dim=None if time_dim == 4 * channels[0] else time_dim,
        num_class_embeds=None if label is None else label.shape[0],
        sample_size=96 if arch == "sd2" and conv_in.shape[1] == 4 else 64,
    )


def vae_config_from_ldm(sd: dict[str, torch.Tensor]) -> VAEConfig:
    """A VAEConfig read off LDM VAE tensors (keys without `first_stage_model.`)."""
    levels = _count(sd, r"encoder\.down\.(\d+)\.")
    per = _count(sd, r"encoder\.down\.0\.block\.(\d+)\.")
    if levels == 0 or "encoder.conv_out.weight" not in sd:
        raise CheckpointError("no VAE weights under first_stage_model.")
    return VAEConfig(
        in_channels=sd["encoder.conv_in.weight"].shape[1], out_channels=sd["decoder.conv_out.weight"].shape[0],
        latent_channels=sd["encoder.conv_out.weight"].shape[0] // 2,  # the encoder outputs mean and logvar
        block_channels=tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)),
        layers_per_block=per, mid_attention="encoder.mid.attn_1.q.weight" in sd,
        use_quant_conv="quant_conv.weight" in sd,
    )


def _text_from_single_file(sd, layout: str, arch: str) -> tuple[CLIPTextConfig, dict[str, torch.Tensor]]:
    if layout == "compvis":
        ours = keys_clip.compvis_to_ldmkit(sd)
    else:
        ours = keys_clip.openclip_to_ldmkit(sd)
        ours.pop("logit_scale", None)
    shapes = keys_clip.text_shapes_from_state_dict(ours, head_dim=_SD_HEAD_WIDTH)
    shapes["num_attention_heads"] = max(shapes["num_attention_heads"], 1)
    projection = shapes.pop("projection_dim")
    openclip = layout == "openclip"
    config = CLIPTextConfig(
        **shapes,
        hidden_act="gelu" if openclip else "quick_gelu",
        projection_dim=projection,
        # a full OpenCLIP tower (with its projection): SD 2.x uses the penultimate layer
        skip_last_layers=1 if openclip and projection is not None else 0,
        pad_token_id=0 if _pad(arch) == "zero" else CLIPTextConfig.eos_token_id,
    )
    return config, ours


def _detect_prediction_type(sd, arch: str, inpainting: bool, metadata: dict, global_step) -> str:
    if metadata.get("ldmkit.prediction_type") in PREDICTION_TYPES:
        return metadata["ldmkit.prediction_type"]
    if "v_pred" in sd:
        return "v_prediction"
    if arch == "sd2" and not inpainting and global_step != SD2_BASE_GLOBAL_STEP:
        return "v_prediction"
    return "epsilon"


def _load_single_file(path: Path, prediction_type, arch, dtype, device) -> Components:
    path = check_readable_file(path)
    metadata: dict[str, str] = {}
    global_step = None
    if path.suffix in SAFETENSORS_SUFFIXES:
        sd = read_safetensors(path)
        metadata = read_safetensors_metadata(path)
    else:
        obj = load_pickle(path)
        if isinstance(obj, dict):
            step = obj.get("global_step")
            global_step = int(step) if step is not None and not isinstance(step, dict) else None
        sd = state_dict_from_object(obj, path)
    layout = keys_clip.detect_clip_layout(sd)
    if layout not in ("compvis", "openclip") or not any(k.startswith(UNET_LDM_PREFIX) for k in sd):
        raise CheckpointError(
            f"{path}: not a Stable Diffusion single file (needs {UNET_LDM_PREFIX}*, {VAE_LDM_PREFIX}* "
            f"and {keys_clip.COMPVIS_PREFIX}* or {keys_clip.OPENCLIP_PREFIX}* tensors)"
        )
    if layout == "openclip" and not any(k.startswith(keys_clip.OPENCLIP_PREFIX) for k in sd):
        raise CheckpointError(f"{path}: OpenCLIP weights must be under {keys_clip.OPENCLIP_PREFIX}")
    detected = "sd1" if layout == "compvis" else "sd2"
    arch = arch or detected
    try:
        unet_ldm = strip_prefix(sd, UNET_LDM_PREFIX)
        unet_cfg = unet_config_from_ldm(unet_ldm, arch)
        unet_sd = unet_ldm_to_ours(unet_ldm, unet_cfg)
        vae_ldm = {k: v for k, v in strip_prefix(sd, VAE_LDM_PREFIX).items() if not k.startswith(_VAE_IGNORED_PREFIX)}
        vae_cfg = vae_config_from_ldm(vae_ldm)
        vae_sd = vae_ldm_to_ours(vae_ldm)
        text_cfg, text_sd = _text_from_single_file(sd, layout, arch)
    except LdmkitError as e:
        raise CheckpointError(f"{path}: {e}") from None
    source = str(path)
    unet = build_model(UNet, unet_cfg, unet_sd, source=source, what="U-Net", dtype=dtype, device=device)
    vae = build_model(AutoencoderKL, vae_cfg, vae_sd, source=source, what="VAE", dtype=dtype, device=device)
    text = build_model(CLIPTextModel, text_cfg, text_sd, source=source, what="text encoder", dtype=dtype, device=device)
    tokenizer = load_tokenizer(None, pad=_pad(arch))
    _check_vocab(tokenizer, text_cfg, path)
    schedule = ScheduleConfig()
    if "ldmkit.schedule" in metadata:
        try:
            schedule = ScheduleConfig.from_dict(json.loads(metadata["ldmkit.schedule"]))
        except (ValueError, TypeError, LdmkitError) as e:
            raise CheckpointError(f"{path}: bad ldmkit.schedule metadata ({e})") from None
    predicted = prediction_type or _detect_prediction_type(sd, arch, unet_cfg.in_channels == 9, metadata, global_step)
    schedule = replace(schedule, prediction_type=predicted)
    return Components(unet, vae, text, tokenizer, schedule, "single_file", arch)


# -- saving -------------------------------------------------------------------------------------


def _diffusers_text(comps: Components) -> tuple[CLIPTextConfig, dict[str, torch.Tensor]]:
    """The text tower as diffusers ships it: skipped layers and the projection left out."""
    cfg = comps.text_encoder.config
    sd = comps.text_encoder.state_dict()
    keep = cfg.num_hidden_layers - cfg.skip_last_layers
    layer = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.")
    sd = {
        k: v for k, v in sd.items()
        if not k.startswith("text_projection") and not ((m := layer.match(k)) and int(m[1]) >= keep)
    }
    return replace(cfg, num_hidden_layers=keep, skip_last_layers=0, projection_dim=None), sd


def save_diffusers(components: Components, folder: str | Path) -> None:
    """Write a diffusers Stable Diffusion folder (weights as safetensors, each file atomically)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InvalidArgument(f"{folder}: exists and is not a folder")
    c = components
    dump = lambda d: json.dumps(d, indent=2, sort_keys=True) + "\n"  # noqa: E731
    version = {"_diffusers_version": DIFFUSERS_VERSION}
    unet_cfg = {**unet_config_to_diffusers(c.unet.config), **version}
    write_text_atomic(folder / "unet" / "config.json", dump(unet_cfg))
    save_safetensors(c.unet.state_dict(), folder / "unet" / "diffusion_pytorch_model.safetensors")
    write_text_atomic(folder / "vae" / "config.json", dump({**vae_config_to_diffusers(c.vae.config), **version}))
    save_safetensors(c.vae.state_dict(), folder / "vae" / "diffusion_pytorch_model.safetensors")
    text_cfg, text_sd = _diffusers_text(c)
    text_json = text_config_to_transformers(text_cfg) | {"pad_token_id": 1, "bos_token_id": 0}
    text_json["torch_dtype"] = str(c.dtype).removeprefix("torch.")
    write_text_atomic(folder / "text_encoder" / "config.json", dump(text_json))
    save_safetensors(text_sd, folder / "text_encoder" / "model.safetensors")
    c.tokenizer.save(folder / "tokenizer")
    scheduler = {"_class_name": "DDIMScheduler", **version, **c.schedule_config.to_dict(), "clip_sample": False}
    write_text_atomic(folder / "scheduler" / "scheduler_config.json", dump(scheduler))
    index = {
        "_class_name": "StableDiffusionInpaintPipeline" if c.inpainting else "StableDiffusionPipeline",
        **version,
        "feature_extractor": [None, None],
        "safety_checker": [None, None],
        "requires_safety_checker": False,
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", text_json["architectures"][0]],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    write_text_atomic(folder / "model_index.json", dump(index))


def single_file_state_dict(components: Components) -> dict[str, torch.Tensor]:
    """All weights under CompVis/LDM names (OpenAI CLIP text towers as SD 1.x, OpenCLIP as SD 2.x)."""
    c = components
    sd = add_prefix(unet_ours_to_ldm(c.unet.state_dict(), c.unet.config), UNET_LDM_PREFIX)
    sd |= add_prefix(vae_ours_to_ldm(c.vae.state_dict()), VAE_LDM_PREFIX)
    text = c.text_encoder.state_dict()
    if c.text_encoder.config.hidden_act == "gelu":  # OpenCLIP tower (SD 2.x)
        sd |= keys_clip.ldmkit_to_openclip(text)
    else:
        sd |= keys_clip.ldmkit_to_compvis(text)
    return sd


def save_single_file(components: Components, path: str | Path) -> None:
    """Write one CompVis/LDM-layout `.safetensors` file (atomically).

    The prediction type and schedule go into the header metadata (`ldmkit.prediction_type`,
    `ldmkit.schedule`), which ldmkit reads back and other tools ignore.
    """
    path = Path(path)
    if path.suffix not in SAFETENSORS_SUFFIXES:
        raise InvalidArgument(f"{path}: single files are written as .safetensors only")
    metadata = {
        "format": "pt",
        "ldmkit.architecture": components.architecture,
        "ldmkit.prediction_type": components.prediction_type,
        "ldmkit.schedule": json.dumps(components.schedule_config.to_dict()),
    }
    save_safetensors(single_file_state_dict(components), path, metadata=metadata)


__all__ = [
    "ARCHITECTURES", "Components", "build_model", "load_clip", "load_pipeline_components", "save_clip",
    "save_diffusers", "save_single_file", "single_file_state_dict", "unet_config_from_ldm", "vae_config_from_ldm",
]
