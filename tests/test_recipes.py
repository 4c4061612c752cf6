"""The training recipes end to end from the CLI, shrunk to seconds: the shapes text-to-image
model (VAE, CLIP, U-Net, saved and loaded back) and the digits DDPM."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from ldmkit.cli import main
from ldmkit.errors import InvalidArgument
from ldmkit.pipelines.load import load_pipeline
from ldmkit.training.trainer import checkpoint_paths


@pytest.mark.slow
def test_shapes_model_recipe_writes_a_model_that_generates(tmp_path):
    out = tmp_path / "model"
    assert main(["train", "shapes-model", "--quick", "--run-dir", str(tmp_path / "runs"), "--out", str(out),
                 "--snr-gamma", "5", "--clip-context", "3", "--high-noise-fraction", "0.4"]) == 0
    log = json.loads((out / "training.json").read_text())
    summary = log["summary"]
    assert log["recipe"]["snr_gamma"] == 5.0
    assert (log["recipe"]["clip_token_loss"], log["recipe"]["clip_token_context"]) == (1.0, 3)
    assert (log["recipe"]["high_noise_fraction"], log["recipe"]["refine_high_noise_fraction"]) == (0.4, 0.2)
    assert log["recipe"]["schedule"]["prediction_type"] == "v_prediction"  # the default schedule
    assert log["recipe"]["schedule"]["rescale_betas_zero_snr"] is True
    assert set(summary) >= {"vae", "clip", "unet", "unet_refine", "unet_refine_2", "vae_decoder", "total_minutes"}
    assert summary["vae"]["scaling_factor"] > 0
    assert 0 <= summary["vae_decoder"]["reconstructed_two_object_correct"] <= 1
    for stage in ("vae", "clip", "unet", "unet_refine", "unet_refine_2"):
        assert checkpoint_paths(tmp_path / "runs" / stage / "checkpoints")
    pipe = load_pipeline(out, precision="fp32", device="cpu")
    assert pipe.vae.config.scaling_factor == pytest.approx(summary["vae"]["scaling_factor"])  # what the U-Net saw
    assert pipe.default_size == 64 and pipe.tokenizer.context_length == 16
    assert pipe.default_cfg_scale == log["recipe"]["cfg_scale"] == 5.0  # its generation.json
    images = pipe.txt2img("a red circle", sampler="dpmpp_2m", steps=2, height=64, width=64, seed=0, output="tensor")
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


@pytest.mark.slow
def test_continuing_a_models_unet_changes_only_the_unet(tmp_path):
    """--continue-from trains the U-Net further on frozen VAE / text encoder / tokenizer."""
    from ldmkit.pipelines.load import BUNDLED_MODEL

    out = tmp_path / "model"
    assert main(["train", "shapes-model", "--continue-from", str(BUNDLED_MODEL), "--quick",
                 "--run-dir", str(tmp_path / "runs"), "--out", str(out)]) == 0
    before, after = (load_pipeline(p, precision="fp32", device="cpu") for p in (BUNDLED_MODEL, out))
    changed = lambda a, b: any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(),  # noqa: E731
                                                                     b.state_dict().values()))
    assert changed(before.unet, after.unet)
    assert not changed(before.vae, after.vae) and not changed(before.text_encoder, after.text_encoder)
    assert after.vae.config.scaling_factor == before.vae.config.scaling_factor
    assert after.default_cfg_scale == before.default_cfg_scale == 5.0
    assert after.tokenizer("a red circle").tolist() == before.tokenizer("a red circle").tolist()
    log = lambda folder: json.loads((folder / "training.json").read_text())["summary"]  # noqa: E731
    earlier, continued = log(BUNDLED_MODEL).get("unet_continued", []), log(out)["unet_continued"]
    assert continued[:-1] == earlier and continued[-1]["train"]["steps"] == 3  # this stage appended
    assert continued[-1]["high_noise_fraction"] == 0.2  # a warm restart defaults to the refinement's share
    assert checkpoint_paths(tmp_path / "runs" / "unet" / "checkpoints")


def test_digits_recipe_trains_and_resumes_from_the_cli(tmp_path):
    run_dir = tmp_path / "digits"
    assert main(["train", "digits", "--steps", "2", "--batch-size", "8", "--run-dir", str(run_dir)]) == 0
    assert [p.name for p in checkpoint_paths(run_dir / "checkpoints")] == ["step-00000002.pt"]
    assert (run_dir / "samples" / "step-00000002.png").is_file()
    assert main(["train", "digits", "--steps", "3", "--batch-size", "8", "--run-dir", str(run_dir), "--resume"]) == 0
    assert checkpoint_paths(run_dir / "checkpoints")[-1].name == "step-00000003.pt"


def test_a_non_positive_snr_gamma_is_a_one_line_error(tmp_path, capsys):
    assert main(["train", "shapes-model", "--quick", "--run-dir", str(tmp_path), "--snr-gamma", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ldmkit: error: --snr-gamma must be positive, got 0.0"]
    assert not any(tmp_path.iterdir())  # refused before anything was rendered or written


def test_a_high_noise_fraction_outside_0_to_1_is_a_one_line_error(tmp_path, capsys):
    assert main(["train", "shapes-model", "--quick", "--run-dir", str(tmp_path), "--high-noise-fraction", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ldmkit: error: --high-noise-fraction must be in [0, 1], got 2.0"]
    assert not any(tmp_path.iterdir())


def test_a_non_positive_clip_context_is_a_one_line_error(tmp_path, capsys):
    assert main(["train", "shapes-model", "--quick", "--run-dir", str(tmp_path), "--clip-context", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ldmkit: error: --clip-context must be positive, got 0"]
    assert not any(tmp_path.iterdir())


def test_the_cli_offers_the_recipes_schedules_by_name():
    from ldmkit.training.cli import SCHEDULE_NAMES
    from ldmkit.training.shapes_model import SCHEDULES, ShapesModelRecipe

    assert tuple(SCHEDULES) == SCHEDULE_NAMES
    assert SCHEDULES["v-zero-snr"] == ShapesModelRecipe().schedule  # the default
    assert SCHEDULES["sd"].prediction_type == "epsilon" and not SCHEDULES["sd"].rescale_betas_zero_snr


@pytest.mark.parametrize("option, kept", [(["--clip-context", "4"], "--clip-context trains CLIP"),
                                           (["--schedule", "sd"], "--schedule sets the noise schedule")])
def test_a_clip_or_schedule_option_with_continue_from_is_a_one_line_error(tmp_path, capsys, option, kept):
    """--continue-from keeps the model's CLIP and schedule, so options for them would be silently ignored."""
    from ldmkit.pipelines.load import BUNDLED_MODEL

    assert main(["train", "shapes-model", "--continue-from", str(BUNDLED_MODEL), "--run-dir", str(tmp_path),
                 *option]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ldmkit: error: {kept}, which --continue-from keeps")
    assert not any(tmp_path.iterdir())


def test_resume_without_checkpoints_is_a_one_line_error(tmp_path, capsys):
    code = main(["train", "minimal", "--steps", "1", "--run-dir", str(tmp_path / "none"), "--resume"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ldmkit: error: cannot resume: no checkpoint")


def test_decoder_fine_tuning_keeps_the_encoder_and_so_the_latent_space(tmp_path):
    from ldmkit.models.vae import AutoencoderKL, vae_preset
    from ldmkit.training.stages import VAEStage
    from ldmkit.training.trainer import TrainConfig, Trainer

    config = vae_preset("tiny", sample_size=16)
    trained = AutoencoderKL(replace(config, scaling_factor=0.3))  # as measured on its latents
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    stage = VAEStage(config, images, decoder_of=trained)
    assert stage.name == "vae_decoder"
    vae = Trainer(stage, TrainConfig(steps=2, batch_size=4, warmup_steps=1, ema_decay=None), tmp_path,
                  progress=False).train().vae
    before, after = trained.state_dict(), vae.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith(("encoder.", "quant_conv.")))
    assert not all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("decoder."))
    assert vae.config.scaling_factor == 0.3  # the latent space is the trained VAE's, so is its scale


def test_clip_stage_adds_each_captions_hard_negatives_after_the_batch(tmp_path):
    """The batch's texts are its captions, then their hard negatives (no image of their own);
    the accuracy against them is a fraction of the images; training on them runs."""
    from ldmkit.data.shapes import hard_negatives
    from ldmkit.training.shapes_model import ShapesModelRecipe, clip_config, render_scenes, shapes_tokenizer
    from ldmkit.training.stages import CLIPStage
    from ldmkit.training.trainer import TrainConfig, Trainer
    from ldmkit.models.clip import CLIPModel

    images, captions = render_scenes(12, 64, seed=3)
    tokenizer = shapes_tokenizer(captions)
    stage = CLIPStage(CLIPModel(clip_config(ShapesModelRecipe(), tokenizer)), tokenizer, images, captions,
                      hard_negatives=hard_negatives)
    rows = list(range(12))
    ids = stage.batch(rows)["ids"]
    negatives = [n for i in rows for n in hard_negatives(captions[i])]
    assert len(negatives) > 0
    assert torch.equal(ids, tokenizer([captions[i] for i in rows] + negatives))
    accuracy = stage.hard_negative_accuracy(stage.model, images, captions, hard_negatives)
    assert 0.0 <= accuracy <= 1.0
    Trainer(stage, TrainConfig(steps=2, batch_size=6, warmup_steps=1, ema_decay=None), tmp_path, progress=False).train()


@pytest.fixture(scope="module")
def briefly_trained_clip(tmp_path_factory):
    """CLIPs trained 150 steps on 64 two-object scenes, by (word-keeping weight, context), each
    trained once for the tests that compare them; `.tokenizer` is their tokenizer."""
    from ldmkit.models.clip import CLIPModel
    from ldmkit.training.shapes_model import ShapesModelRecipe, clip_config, render_scenes, shapes_tokenizer
    from ldmkit.training.stages import CLIPStage
    from ldmkit.training.trainer import TrainConfig, Trainer

    images, captions = render_scenes(64, 64, seed=4, one_object_fraction=0.0)
    tokenizer = shapes_tokenizer(captions)
    trained = {}

    def train(weight: float, context: int = 0) -> CLIPModel:
        if (weight, context) not in trained:
            torch.manual_seed(0)
            stage = CLIPStage(CLIPModel(clip_config(ShapesModelRecipe(), tokenizer)), tokenizer, images, captions,
                              token_loss_weight=weight, token_context=context)
            Trainer(stage, TrainConfig(steps=150, batch_size=16, lr=2e-3, warmup_steps=5, ema_decay=None),
                    tmp_path_factory.mktemp("clip"), progress=False).train()
            trained[weight, context] = stage.model
        return trained[weight, context]

    train.tokenizer = tokenizer
    return train


def test_clip_stage_word_keeping_term_names_each_word_from_its_state(briefly_trained_clip):
    """The term is the cross-entropy of every word token's id read from its own last hidden state
    (start, end and padding left out), added to the contrastive loss with its weight; training
    with it makes the states name their words, so "left" and "right" stay apart."""
    from ldmkit.models.clip import CLIPModel
    from ldmkit.training.shapes_model import ShapesModelRecipe, clip_config, render_scenes, shapes_tokenizer
    from ldmkit.training.stages import CLIPStage

    images, captions = render_scenes(64, 64, seed=4, one_object_fraction=0.0)
    tokenizer = shapes_tokenizer(captions)
    torch.manual_seed(0)
    stage = CLIPStage(CLIPModel(clip_config(ShapesModelRecipe(), tokenizer)), tokenizer, images, captions,
                      token_loss_weight=0.5)
    batch = stage.batch(list(range(8)))
    total, scalars = stage.loss(stage.model, batch, None)
    out = stage.model(batch["ids"], batch["pixels"], return_loss=True)
    table = stage.model.text_model.embeddings.token_embedding.weight
    by_hand = []
    for k, (row, states) in enumerate(zip(batch["ids"].tolist(), out.text_hidden_state)):
        words = [j for j, i in enumerate(row) if i not in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)]
        assert len(words) == len(captions[k].split())  # a word-level vocabulary: one token per word
        by_hand += [torch.nn.functional.cross_entropy(states[j] @ table.t(), torch.tensor(row[j])) for j in words]
    expected = torch.stack(by_hand).mean()
    assert scalars["token_loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert total.item() == pytest.approx(out.loss.item() + 0.5 * expected.item(), rel=1e-5)

    def relation_word_states(weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """After a short training with this weight: the states of "left" and "right" in two
        captions that differ only there, and the word each of them names."""
        model = briefly_trained_clip(weight)
        with torch.no_grad():
            states = model.text_model(ids)[0][:, where]  # (2, D)
        return states, (states @ model.text_model.embeddings.token_embedding.weight.t()).argmax(-1)

    ids = tokenizer(["a red circle to the left of a blue square", "a red circle to the right of a blue square"])
    where = (ids[0] != ids[1]).nonzero()[0].item()
    kept, named = relation_word_states(1.0)
    plain, _ = relation_word_states(0.0)
    cosine = lambda s: torch.cosine_similarity(s[0], s[1], dim=0).item()  # noqa: E731
    assert torch.equal(named, ids[:, where])
    assert cosine(kept) < cosine(plain) - 0.05, (cosine(kept), cosine(plain))


def test_clip_stage_context_term_also_names_the_words_before_each_word():
    """With token_context k, a word's target is half its own word and half the up to k words
    before it (start, end and padding are not words): checked against a by-hand sum."""
    from ldmkit.models.clip import CLIPModel
    from ldmkit.training.shapes_model import ShapesModelRecipe, clip_config, render_scenes, shapes_tokenizer
    from ldmkit.training.stages import CLIPStage

    images, captions = render_scenes(8, 64, seed=4, one_object_fraction=0.5)
    tokenizer = shapes_tokenizer(captions)
    torch.manual_seed(0)
    stage = CLIPStage(CLIPModel(clip_config(ShapesModelRecipe(), tokenizer)), tokenizer, images, captions,
                      token_loss_weight=1.0, token_context=2)
    batch = stage.batch(list(range(8)))
    _, scalars = stage.loss(stage.model, batch, None)
    out = stage.model(batch["ids"], batch["pixels"], return_loss=True)
    table = stage.model.text_model.embeddings.token_embedding.weight
    special = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    by_hand = []
    for row, states in zip(batch["ids"].tolist(), out.text_hidden_state):
        words = [j for j, i in enumerate(row) if i not in special]
        for j in words:
            log_p = torch.log_softmax(states[j] @ table.t(), dim=-1)
            earlier = [row[i] for i in (j - 1, j - 2) if i in words]
            loss = -log_p[row[j]]
            if earlier:
                loss = (loss - sum(log_p[i] for i in earlier) / len(earlier)) / 2
            by_hand.append(loss)
    assert scalars["token_loss"] == pytest.approx(torch.stack(by_hand).mean().item(), rel=1e-5)
    for weight, context in ((0.0, 2), (1.0, -1)):  # a context without the term, a negative context
        with pytest.raises(InvalidArgument, match="token_context"):
            CLIPStage(stage.model, tokenizer, images, captions, token_loss_weight=weight, token_context=context)


def test_clip_stage_context_term_puts_the_relation_into_the_second_objects_state(briefly_trained_clip):
    """Trained with the context term, the last word of "... to the left of a blue square" names
    the relation before it: its state moves apart from the one in "... to the right of ...",
    more than with the word-keeping term alone, and it still names its own word."""
    tokenizer = briefly_trained_clip.tokenizer
    ids = tokenizer(["a red circle to the left of a blue square", "a red circle to the right of a blue square"])
    last = len("a red circle to the left of a blue square".split())  # the "square" token (after the start)
    assert ids[0, last + 1] == tokenizer.eos_id  # one token per word

    def last_word_states(context: int) -> tuple[torch.Tensor, torch.Tensor]:
        model = briefly_trained_clip(1.0, context)
        with torch.no_grad():
            states = model.text_model(ids)[0][:, last]  # (2, D)
        return states, (states @ model.text_model.embeddings.token_embedding.weight.t()).argmax(-1)

    with_context, named = last_word_states(4)
    plain, _ = last_word_states(0)
    cosine = lambda s: torch.cosine_similarity(s[0], s[1], dim=0).item()  # noqa: E731
    assert torch.equal(named, ids[:, last])
    # after 150 steps: 1 - cosine 0.030 with the context, 0.0003 without
    assert 1 - cosine(with_context) > max(0.01, 10 * (1 - cosine(plain))), (cosine(with_context), cosine(plain))


def test_min_snr_weighting_scales_each_rows_loss_by_its_timesteps_weight():
    """Same rows, same randomness: the weighted loss is the plain one times min(SNR, 5) / SNR,
    so a nearly clean row counts less and a noisy one (SNR below 5) counts in full."""
    from ldmkit.diffusion.forward import min_snr_weights
    from ldmkit.diffusion.schedule import NoiseSchedule
    from ldmkit.models.unet import UNet
    from ldmkit.training.shapes_model import ShapesModelRecipe
    from ldmkit.training.stages import LatentUNetStage
    from ldmkit.training.trainer import RowRandom

    torch.manual_seed(0)
    unet, schedule = UNet(ShapesModelRecipe().unet).eval(), NoiseSchedule()
    n = 48
    data = (torch.randn(n, 4, 16, 16), torch.full((n, 4, 16, 16), 0.1), torch.arange(n), torch.randn(n, 16, 128),
            torch.zeros(16, 128))

    def row_losses(gamma):
        stage = LatentUNetStage(unet, schedule, *data, caption_dropout=0.0, snr_gamma=gamma)
        with torch.no_grad():
            return stage.loss(unet, stage.batch(list(range(n))), RowRandom(7, 0, list(range(n))))[0]

    t = RowRandom(7, 0, list(range(n)))
    t.randn(4, 16, 16), t.rand()  # the stage draws these before the timesteps
    weights = min_snr_weights(schedule, t.randint(schedule.num_train_timesteps), 5.0, "epsilon").float()
    assert weights.min() < 1.0 and weights.max() == 1.0  # the draw has nearly clean rows and noisy ones
    torch.testing.assert_close(row_losses(5.0), row_losses(None) * weights)


def test_high_noise_fraction_draws_that_share_of_timesteps_from_the_noisiest_tenth():
    """The timesteps the U-Net sees: about 10% above 900 when uniform, 10% + 90% x 50% = 55% with
    half of the rows sent there; with the fraction 0 the draw is exactly the plain one."""
    from ldmkit.diffusion.schedule import NoiseSchedule
    from ldmkit.training.stages import LatentUNetStage
    from ldmkit.training.trainer import RowRandom

    n = 2000
    data = (torch.zeros(n, 4, 2, 2), torch.zeros(n, 4, 2, 2), torch.zeros(n, dtype=torch.long), torch.zeros(1, 3, 8),
            torch.zeros(3, 8))

    def timesteps_seen(fraction):
        seen = []

        def recorder(x, t, context):
            seen.append(t)
            return torch.zeros_like(x)

        stage = LatentUNetStage(None, NoiseSchedule(), *data, high_noise_fraction=fraction)
        stage.loss(recorder, stage.batch(list(range(n))), RowRandom(3, 0, list(range(n))))
        return seen[0]

    uniform, plain, half = timesteps_seen(0.0), RowRandom(3, 0, list(range(n))), timesteps_seen(0.5)
    plain.randn(4, 2, 2), plain.rand()  # the stage draws these before the timesteps
    assert torch.equal(uniform, plain.randint(1000).float())
    assert abs((uniform >= 900).float().mean().item() - 0.10) < 0.03
    assert abs((half >= 900).float().mean().item() - 0.55) < 0.04
    assert half.min() >= 0 and half.max() <= 999 and (half < 900).any()
    with pytest.raises(InvalidArgument, match="high-noise fraction"):
        LatentUNetStage(None, NoiseSchedule(), *data, high_noise_fraction=1.5)
