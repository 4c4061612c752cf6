"""The recipe of the bundled text-to-image model: VAE, CLIP and U-Net trained from scratch on the
`shapes` data set at 64x64, in stages, on a laptop CPU.

    1. render `scenes` training scenes once (uint8), learn a word-level BPE vocabulary from
       their captions;
    2. VAE (4x downscale, 4 latent channels: 64x64x3 -> 16x16x4), L1 + small KL;
    3. CLIP (text and ViT image towers) with the contrastive loss, two-object captions' hard
       negatives (`data.shapes.hard_negatives`) among the texts, and the word-keeping term with
       context (each word's state names it and the words before it, so an object's tokens carry
       the relation); zero-shot accuracy and hard-negative accuracy on held-out scenes are logged;
    4. the latent scaling factor measured as 1 / std of the latents;
    5. the text-conditioned U-Net on frozen-VAE latents and frozen-CLIP context (the last hidden
       state, as SD 1.x), 10% caption dropout, v target on a zero-terminal-SNR schedule, half of
       its rows at the noisiest tenth of the timesteps (where a two-object layout is decided);
       then two warm restarts with a fifth of the rows there (the colours come back);
    6. the VAE decoder fine-tuned alone on whole images (the encoder, hence the latent space the
       U-Net learned, unchanged), as SD's ft-MSE decoder was;
    7. everything saved as a diffusers-layout folder (`ldmkit generate --model` reads it), plus
       `training.json` with the recipe and a log summary.

`ldmkit train shapes-model --out DIR` runs it; `--quick` shrinks every stage for tests.
`--continue-from MODEL --unet-steps N` trains an existing model's U-Net further on the same data
(`continue_unet`), the way the bundled model's later U-Net steps were added.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..checkpoints.loading import Components, load_pipeline_components, save_diffusers
from ..data import make_grid
from ..data.shapes import ShapesDataset, caption, hard_negatives
from ..diffusion.schedule import NoiseSchedule, ScheduleConfig
from ..models.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig
from ..models.tokenizer import CLIPTokenizer, train_bpe
from ..models.unet import UNet, UNetConfig
from ..models.vae import VAEConfig
from ..pipelines.load import write_recommended_cfg_scale
from ..pipelines.stable_diffusion import StableDiffusion
from .stages import CLIPStage, LatentUNetStage, VAEStage, images_to_uint8, measure_scaling_factor, uint8_to_images
from .trainer import TrainConfig, Trainer, save_checkpoint_atomic

CONTEXT_LENGTH = 16  # tokens per prompt: the longest shapes caption is 13 with start and end
SAMPLE_PROMPTS = (
    "a red circle", "a large blue square", "a small green triangle", "an orange circle",
    "a red circle to the left of a blue square", "a yellow triangle above a purple circle",
    "a green square below an orange triangle", "a blue circle to the right of a red triangle",
)
# v targets on SD's betas rescaled to zero terminal SNR (Lin et al. 2024): the last training step
# is pure noise, so the layout must come from the caption, and the noisiest steps keep their weight
V_ZERO_SNR_SCHEDULE = ScheduleConfig(prediction_type="v_prediction", timestep_spacing="trailing",
                                     rescale_betas_zero_snr=True)
SD_SCHEDULE = ScheduleConfig()  # SD 1.x: scaled_linear betas, epsilon target (an ablation here)
SCHEDULES = {"v-zero-snr": V_ZERO_SNR_SCHEDULE, "sd": SD_SCHEDULE}  # `ldmkit train --schedule`
# a warm restart of a trained U-Net: fresh AdamW and cosine at half the peak rate, EMA from its weights
UNET_CONTINUE_TRAIN = TrainConfig(steps=8000, batch_size=32, lr=5e-4, warmup_steps=100, ema_decay=0.999,
                                  checkpoint_every=250, sample_every=1000)


@dataclass(frozen=True)
class ShapesModelRecipe:
    """Every choice of the bundled model; saved with it in training.json."""

    scenes: int = 20_000  # training scenes rendered once
    image_size: int = 64  # canvas side
    seed: int = 0  # seeds data, weights and noise of every stage
    vae: VAEConfig = VAEConfig(block_channels=(32, 64, 64), layers_per_block=1, norm_groups=16,
                               latent_channels=4, mid_attention=False, sample_size=64)
    # 2,400 steps, not 800: at 800 the autoencoder alone lost a colour in a quarter of two-object
    # scenes (seed 0; 3% with seed 1), a ceiling on the whole model that varied by run (README)
    vae_train: TrainConfig = TrainConfig(steps=2400, batch_size=16, lr=2e-3, warmup_steps=30,
                                         ema_decay=None, checkpoint_every=100)
    vae_crop: int = 32  # the VAE trains on random 32x32 crops: a quarter of the cost per step
    kl_weight: float = 1e-6  # LDM's weight of the summed KL against the summed L1
    decoder_train: TrainConfig = TrainConfig(steps=600, batch_size=8, lr=1e-3, warmup_steps=20,
                                             ema_decay=None, checkpoint_every=100)  # full 64x64 images
    # the guidance its models are judged at and recommend (generation.json): on 144 prompts the
    # bundled model had one object right in 99% of images at 4-5, 94% at SD's 7.5 (README)
    cfg_scale: float = 5.0
    clip_width: int = 128  # both towers
    clip_layers: int = 3  # both towers
    clip_train: TrainConfig = TrainConfig(steps=1500, batch_size=64, lr=1e-3, warmup_steps=50,
                                          weight_decay=0.1, ema_decay=None, checkpoint_every=250)
    clip_hard_negatives: bool = True  # NegCLIP: each two-object caption's reversed/rebound versions
    clip_token_loss: float = 1.0  # weight of CLIPStage's word-keeping term (0: off)
    clip_token_context: int = 4  # with it: how many earlier words each state must also name
    unet: UNetConfig = UNetConfig(in_channels=4, out_channels=4, block_channels=(32, 64, 64),
                                  layers_per_block=1, attention_levels=(False, True, True), num_heads=(2, 4, 4),
                                  context_dim=128, norm_groups=16, sample_size=16)
    unet_train: TrainConfig = TrainConfig(steps=12_000, batch_size=32, lr=1e-3, warmup_steps=200,
                                          ema_decay=0.999, checkpoint_every=250, sample_every=1000)
    caption_dropout: float = 0.1  # captions replaced by "" so classifier-free guidance works
    snr_gamma: float | None = None  # Min-SNR-gamma loss weights (Hang et al. 2023); None: plain MSE (see README)
    high_noise_fraction: float = 0.5  # of U-Net rows, timestep from the noisiest tenth (LatentUNetStage)
    # then warm restarts of the U-Net, one after the other, with fewer rows at the noisiest tenth:
    # with half there the relations hold but colours suffer; the restarts bring the colours back,
    # and a second one lifted held-out two-object prompts from 0.57 to 0.72 and 0.90 in two runs (README)
    unet_refine_trains: tuple[TrainConfig, ...] = (replace(UNET_CONTINUE_TRAIN, steps=6000),) * 2
    refine_high_noise_fraction: float = 0.2
    schedule: ScheduleConfig = V_ZERO_SNR_SCHEDULE

    def quick(self) -> ShapesModelRecipe:
        """A seconds-long version for tests: tiny data, a few steps per stage."""
        short = lambda c: replace(c, steps=3, warmup_steps=1, checkpoint_every=3, sample_every=0)  # noqa: E731
        return replace(self, scenes=64, vae_train=short(self.vae_train), decoder_train=short(self.decoder_train),
                       clip_train=replace(short(self.clip_train), batch_size=16),
                       unet_train=replace(short(self.unet_train), batch_size=8),
                       unet_refine_trains=tuple(replace(short(c), batch_size=8) for c in self.unet_refine_trains))


def render_scenes(count: int, size: int, seed: int, one_object_fraction: float = 0.5) -> tuple[torch.Tensor, list[str]]:
    """`count` train-split scenes as uint8 (N, 3, size, size) and their captions."""
    data = ShapesDataset(size=size, length=count, seed=seed, split="train", one_object_fraction=one_object_fraction)
    images = torch.stack([images_to_uint8(data[i]["image"]) for i in range(count)])
    return images, [caption(data.scene(i)) for i in range(count)]


def cached_scenes(run_dir: Path, recipe: ShapesModelRecipe) -> dict:
    """The recipe's training scenes {"images", "captions"}, rendered once per run folder."""
    return _cached(run_dir / f"scenes-{recipe.scenes}-{recipe.image_size}-{recipe.seed}.pt",
                   lambda: dict(zip(("images", "captions"), render_scenes(recipe.scenes, recipe.image_size,
                                                                                recipe.seed))))


def shapes_tokenizer(captions: list[str]) -> CLIPTokenizer:
    """A word-level vocabulary of the captions (unseen words still spell out byte by byte)."""
    return train_bpe(sorted(set(captions)), num_merges=None, min_frequency=1, context_length=CONTEXT_LENGTH)


def clip_config(recipe: ShapesModelRecipe, tokenizer: CLIPTokenizer) -> CLIPConfig:
    w, n = recipe.clip_width, recipe.clip_layers
    text = CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=w, intermediate_size=4 * w, num_hidden_layers=n,
                          num_attention_heads=4, max_position_embeddings=CONTEXT_LENGTH,
                          eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    vision = CLIPVisionConfig(hidden_size=w, intermediate_size=4 * w, num_hidden_layers=n, num_attention_heads=4,
                              image_size=recipe.image_size, patch_size=8, projection_dim=None)
    return CLIPConfig(text=text, vision=vision, projection_dim=w)


def text_encoder_from_clip(clip: CLIPModel) -> CLIPTextModel:
    """The text tower alone (with its projection), as pipelines use it."""
    text = CLIPTextModel(replace(clip.config.text, projection_dim=clip.config.projection_dim))
    state = {k: v for k, v in clip.state_dict().items() if k.startswith(("text_model.", "text_projection."))}
    text.load_state_dict(state)
    return text.requires_grad_(False).eval()


def zero_shot_set(recipe: ShapesModelRecipe, count: int = 256):
    """Held-out one-object scenes and the 18 "a {color} {shape}" class prompts."""
    from ..data.shapes import COLORS, SHAPES, article

    data = ShapesDataset(size=recipe.image_size, length=count, seed=recipe.seed + 1, split="train",
                         one_object_fraction=1.0)
    classes = [(c, s) for c in COLORS for s in SHAPES]
    prompts = [f"{article(c)} {c} {s}" for c, s in classes]
    images, labels = [], []
    for i in range(count):
        obj = data.scene(i).objects[0]
        images.append(images_to_uint8(data[i]["image"]))
        labels.append(classes.index((obj.color, obj.shape)))
    return torch.stack(images), labels, prompts


def hard_negative_set(recipe: ShapesModelRecipe, count: int = 300) -> tuple[torch.Tensor, list[str]]:
    """Fresh two-object scenes (uint8; not training images) and their captions, for
    CLIPStage.hard_negative_accuracy."""
    return render_scenes(count, recipe.image_size, recipe.seed + 5, one_object_fraction=0.0)


@torch.no_grad()
def autoencoder_alignment(vae, recipe: ShapesModelRecipe, count: int = 400) -> float:
    """The fraction of fresh two-object scenes (not training images) whose VAE reconstruction
    (posterior mode, decoded, rounded to uint8) the shapes judge still reads as fully matching
    the caption: the ceiling the autoencoder puts on the U-Net's two-object score."""
    from ..evaluation.alignment import text_alignment
    from ..evaluation.shapes_classifier import load_shapes_judge

    images, captions = render_scenes(count, recipe.image_size, recipe.seed + 6, one_object_fraction=0.0)
    x = uint8_to_images(images)
    decoded = torch.cat([vae.decode(vae.encode(x[i:i + 100]).mode()) for i in range(0, count, 100)])
    rounded = uint8_to_images(images_to_uint8(decoded))
    return round(text_alignment(captions, rounded, load_shapes_judge())["two_object"]["correct"], 4)


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor, scaling: float, batch_size: int = 256):
    """Posterior means and stds of every image, times the scaling factor."""
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        posterior = vae.encode(uint8_to_images(images[i:i + batch_size]))
        means.append(posterior.mean * scaling)
        stds.append(posterior.std * scaling)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def encode_captions(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, captions: list[str]):
    """(caption index per row, contexts (K, T, D) of the distinct captions, the empty caption's context)."""
    distinct = sorted(set(captions))
    index = {c: i for i, c in enumerate(distinct)}
    contexts = text_encoder(tokenizer(distinct)).last_hidden_state
    empty = text_encoder(tokenizer([""])).last_hidden_state[0]
    return torch.tensor([index[c] for c in captions]), contexts, empty


def train_shapes_model(out: str | Path, run_dir: str | Path, recipe: ShapesModelRecipe = ShapesModelRecipe(),
                       resume: bool = False, progress: bool = True) -> Path:
    """Run the whole recipe; write the model folder `out`; returns it. Stage runs (checkpoints,
    samples, TensorBoard) go under `run_dir/<stage>`; with `resume`, each stage continues from
    its newest checkpoint when it has one."""
    out, run_dir = Path(out), Path(run_dir)
    started, summary = time.time(), {}
    scenes = cached_scenes(run_dir, recipe)
    images, captions = scenes["images"], scenes["captions"]
    tokenizer = shapes_tokenizer(captions)

    def run(stage, config: TrainConfig, name: str | None = None):
        name = name or stage.name  # the stage's folder under run_dir and its key in the summary
        trainer = Trainer(stage, config, run_dir / name, progress=progress, label=name)
        if resume and (run_dir / name / "checkpoints").is_dir():
            trainer.resume()
        stage_start = time.time()
        model = trainer.train()
        summary[name] = {"steps": config.steps, "final_loss": _tail_mean(trainer.history),
                         "minutes": round((time.time() - stage_start) / 60, 2)}
        return model

    torch.manual_seed(recipe.seed)  # each stage's initial weights from its own seed, whatever ran before
    vae_stage = VAEStage(recipe.vae, images, kl_weight=recipe.kl_weight, crop_size=recipe.vae_crop)
    vae = run(vae_stage, recipe.vae_train).vae.eval()
    torch.manual_seed(recipe.seed + 1)
    clip_stage = CLIPStage(CLIPModel(clip_config(recipe, tokenizer)), tokenizer, images, captions,
                           zero_shot=zero_shot_set(recipe),
                           hard_negatives=hard_negatives if recipe.clip_hard_negatives else None,
                           token_loss_weight=recipe.clip_token_loss, token_context=recipe.clip_token_context)
    clip = run(clip_stage, recipe.clip_train).eval()
    summary["clip"]["zero_shot_accuracy_18_classes"] = clip_stage.zero_shot_accuracy(clip)
    summary["clip"]["hard_negative_accuracy"] = clip_stage.hard_negative_accuracy(clip, *hard_negative_set(recipe),
                                                                                 hard_negatives)
    text_encoder = text_encoder_from_clip(clip)

    def encode_inputs() -> dict:
        scaling = measure_scaling_factor(vae, images[:2048], torch.Generator().manual_seed(recipe.seed))
        mean, std = encode_dataset(vae, images, scaling)
        caption_ids, contexts, empty = encode_captions(text_encoder, tokenizer, captions)
        return {"scaling": torch.tensor(scaling), "mean": mean, "std": std, "caption_ids": caption_ids,
                "contexts": contexts, "empty": empty}

    # the frozen networks' outputs, cached for a resumed run (valid while the VAE and CLIP are)
    inputs_path = run_dir / "unet_inputs.pt"
    inputs = _cached(inputs_path, encode_inputs) if resume else _save(encode_inputs(), inputs_path)
    scaling = float(inputs["scaling"])
    vae.config = replace(vae.config, scaling_factor=scaling)
    summary["vae"]["scaling_factor"] = scaling
    schedule = NoiseSchedule(recipe.schedule)

    def sampler(unet):
        pipe = StableDiffusion(unet, vae, text_encoder, tokenizer, schedule)
        x = pipe.txt2img(list(SAMPLE_PROMPTS), sampler="dpmpp_2m", steps=20, cfg_scale=recipe.cfg_scale,
                         height=recipe.image_size, width=recipe.image_size, seed=recipe.seed, output="tensor")
        return make_grid(x * 2 - 1, nrow=4)

    torch.manual_seed(recipe.seed + 2)
    unet = run(_unet_stage(UNet(recipe.unet), schedule, inputs, recipe, recipe.high_noise_fraction, sampler),
               recipe.unet_train).eval()
    for i, refine_train in enumerate(recipe.unet_refine_trains):  # warm restarts, as `continue_unet` does them
        unet = unet.train().requires_grad_(True)
        unet = run(_unet_stage(unet, schedule, inputs, recipe, recipe.refine_high_noise_fraction, sampler),
                   refine_train, name="unet_refine" + (f"_{i + 1}" if i else "")).eval()
    # the decoder alone, on whole images: sharper colours and edges, same latent space
    vae = run(VAEStage(recipe.vae, images, decoder_of=vae), recipe.decoder_train).vae.eval()
    summary["vae_decoder"]["reconstructed_two_object_correct"] = autoencoder_alignment(vae, recipe,
                                                                                       min(400, recipe.scenes))

    components = Components(unet, vae.requires_grad_(False), text_encoder, tokenizer, recipe.schedule)
    save_diffusers(components, out)
    write_recommended_cfg_scale(out, recipe.cfg_scale)
    summary["total_minutes"] = round((time.time() - started) / 60, 2)
    (out / "training.json").write_text(json.dumps({"recipe": _jsonable(asdict(recipe)), "summary": summary},
                                                  indent=2) + "\n")
    return out


def continue_unet(model: str | Path, out: str | Path, run_dir: str | Path,
                  train: TrainConfig = UNET_CONTINUE_TRAIN, recipe: ShapesModelRecipe = ShapesModelRecipe(),
                  resume: bool = False, progress: bool = True) -> Path:
    """Train the U-Net of the shapes model folder `model` further on the recipe's data, its VAE,
    text encoder and tokenizer frozen: a warm restart (a fresh optimizer and learning-rate
    schedule; the EMA starts from the model's weights). Writes the model folder `out`, whose
    training.json adds this stage to `model`'s."""
    model, out, run_dir = Path(model), Path(out), Path(run_dir)
    started = time.time()
    comps = load_pipeline_components(model)
    scenes = cached_scenes(run_dir, recipe)
    scaling = comps.vae.config.scaling_factor

    def encode_inputs() -> dict:
        mean, std = encode_dataset(comps.vae, scenes["images"], scaling)
        caption_ids, contexts, empty = encode_captions(comps.text_encoder, comps.tokenizer, scenes["captions"])
        return {"mean": mean, "std": std, "caption_ids": caption_ids, "contexts": contexts, "empty": empty}

    inputs_path = run_dir / "unet_inputs.pt"
    inputs = _cached(inputs_path, encode_inputs) if resume else _save(encode_inputs(), inputs_path)
    schedule = NoiseSchedule(comps.schedule_config)
    stage = _unet_stage(comps.unet.train().requires_grad_(True), schedule, inputs, recipe, recipe.high_noise_fraction)
    trainer = Trainer(stage, train, run_dir / "unet", progress=progress)
    if resume and (run_dir / "unet" / "checkpoints").is_dir():
        trainer.resume()
    unet = trainer.train().eval().requires_grad_(False)
    save_diffusers(replace(comps, unet=unet), out)
    write_recommended_cfg_scale(out, recipe.cfg_scale)
    log = json.loads((model / "training.json").read_text()) if (model / "training.json").is_file() else {}
    log.setdefault("summary", {}).setdefault("unet_continued", []).append({
        "from": str(model), "train": _jsonable(asdict(train)), "caption_dropout": recipe.caption_dropout,
        "snr_gamma": recipe.snr_gamma, "high_noise_fraction": recipe.high_noise_fraction,
        "final_loss": _tail_mean(trainer.history),
        "minutes": round((time.time() - started) / 60, 2)})
    (out / "training.json").write_text(json.dumps(log, indent=2) + "\n")
    return out


def _unet_stage(unet: UNet, schedule: NoiseSchedule, inputs: dict, recipe: ShapesModelRecipe,
                high_noise_fraction: float, sampler=None) -> LatentUNetStage:
    """The U-Net stage on the encoded data set `inputs` (latent means and stds, caption contexts)."""
    return LatentUNetStage(unet, schedule, inputs["mean"], inputs["std"], inputs["caption_ids"], inputs["contexts"],
                           inputs["empty"], caption_dropout=recipe.caption_dropout, snr_gamma=recipe.snr_gamma,
                           high_noise_fraction=high_noise_fraction, sampler=sampler)


def _save(value: dict, path: Path) -> dict:
    """Write `value` with torch.save atomically (temp file, then rename); returns it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint_atomic(value, path)
    return value


def _cached(path: Path, compute) -> dict:
    """`compute()`, stored at `path` the first time and read back (weights only) afterwards."""
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    return _save(compute(), path)


def _tail_mean(history: list[float], n: int = 50) -> float | None:
    tail = history[-n:]
    return round(sum(tail) / len(tail), 5) if tail else None


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
