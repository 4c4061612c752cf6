"""Evaluation: the packaged classifiers, judge(), text alignment, FID, prompts, the eval plumbing."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.data.shapes import BACKGROUND, COLORS, Scene, ShapeObject, heldout_prompts, parse_caption, render
from ldmkit.errors import InvalidArgument
from ldmkit.evaluation import alignment, digits_classifier, evaluate, geometry_judge, shapes_classifier
from ldmkit.evaluation.common import ASSETS, augment, gaussian_blur
from ldmkit.evaluation.fid import fid_from_features, frechet_distance
from ldmkit.evaluation.scenes import scene_for_prompt

TEST_SEED = 4242  # a seed the classifiers never trained with


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def classifier():
    """The alignment judge (the classifier most tests here exercise)."""
    return shapes_classifier.load_shapes_judge()


@pytest.fixture(scope="module")
def fid_classifier():
    return shapes_classifier.load_shapes_classifier()


@pytest.fixture(scope="module", params=["judge", "fid"])
def either_classifier(request):
    """Each packaged shapes classifier in turn: both must read scenes right."""
    load = shapes_classifier.load_shapes_judge if request.param == "judge" else shapes_classifier.load_shapes_classifier
    return load()


def renders(prompt: str, count: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [render(scene_for_prompt(prompt, rng)) for _ in range(count)]


# -- the shapes classifier ----------------------------------------------------------------------


def test_assets_are_packaged_and_small():
    for name in (shapes_classifier.ASSET_NAME, shapes_classifier.JUDGE_ASSET_NAME, digits_classifier.ASSET_NAME):
        path = ASSETS / name
        assert path.is_file(), f"{name} is missing: retrain it with `ldmkit eval classifier`"
        assert path.stat().st_size < 1_000_000


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_classifier_reads_fresh_scenes(either_classifier, split):
    scenes = shapes_classifier.fresh_scenes(TEST_SEED, 400, split)
    assert {len(s.objects) for s in scenes} == {1, 2}
    acc = shapes_classifier.scene_accuracy(either_classifier, scenes)
    assert acc["exact_scene"] >= 0.98, acc
    assert acc["center_mae"] < 0.03, acc


def test_classifier_reads_degraded_scenes(either_classifier):
    """Mild blur, noise and color shifts (the defects of generated samples) barely matter."""
    scenes = shapes_classifier.fresh_scenes(TEST_SEED + 1, 300, "train")
    clean = shapes_classifier.render_batch(scenes)
    degraded = augment(clean, torch.Generator().manual_seed(0), probability=1.0)
    assert shapes_classifier.scene_accuracy(either_classifier, scenes, degraded)["exact_scene"] >= 0.95


def two_tone_scenes(seed: int, count: int) -> tuple[list[Scene], torch.Tensor]:
    """Fresh data-set scenes, each with one object painted in two colours (scenes.two_tone)."""
    from ldmkit.data.imagefolder import pil_to_tensor
    from ldmkit.evaluation.scenes import two_tone

    rng = np.random.default_rng(seed)
    scenes = shapes_classifier.fresh_scenes(seed, count, "train")
    images = []
    for scene in scenes:
        image = np.array(render(scene))
        two_tone(image, scene.objects[rng.integers(len(scene.objects))], rng)
        images.append(pil_to_tensor(Image.fromarray(image)))
    return scenes, torch.stack(images)


def test_two_tone_paints_a_minority_of_one_object_in_another_palette_colour():
    from ldmkit.evaluation.scenes import two_tone

    rng = np.random.default_rng(TEST_SEED)
    square = ShapeObject("square", "orange", "large", (0.5, 0.5))
    clean = np.array(render(Scene((square,))))
    shares = []
    for _ in range(50):
        image = clean.copy()
        two_tone(image, square, rng)
        changed = (image != clean).any(-1)
        assert not (changed & (clean == BACKGROUND).all(-1)).any()  # only the object's own pixels
        shares.append(changed.sum() / (clean != BACKGROUND).any(-1).sum())
        nearest = geometry_judge.nearest_palette_index(image)[(clean != BACKGROUND).any(-1)]
        assert np.bincount(nearest, minlength=7).argmax() == list(COLORS).index("orange")  # still mostly orange
    assert 0.05 < np.median(shares) < 0.6 and max(shares) > 0.3  # some soft edges change more than the share


def test_the_judge_trains_on_two_tone_scenes_and_reads_the_occupancy_map():
    rng = lambda: np.random.default_rng(TEST_SEED)  # noqa: E731
    scenes = shapes_classifier.fresh_scenes(TEST_SEED, 8, "train")
    plain, toned = (shapes_classifier.render_pool(scenes, 64, f, rng()) for f in (0.0, 1.0))
    assert torch.equal(plain, shapes_classifier.render_batch(scenes).add(1).mul(127.5).round().to(torch.uint8))
    assert all(not torch.equal(a, b) for a, b in zip(plain, toned))  # every scene has a two-tone object
    judge = shapes_classifier.train_shapes_classifier(steps=1, pool_size=8, **shapes_classifier.JUDGE_TRAINING)
    assert judge.config.occupancy and judge.trunk[0].in_channels == 2
    assert shapes_classifier.load_shapes_judge().config.occupancy  # the packaged judge is one
    assert not shapes_classifier.load_shapes_classifier().config.occupancy


def test_judge_reads_a_two_tone_object_as_the_colour_most_of_it_has(classifier):
    """Generated objects are sometimes two-toned (an orange square with a yellow rim); the judge
    (and the rule-based judge) read them as their main colour."""
    scenes, images = two_tone_scenes(TEST_SEED + 2, 300)
    assert shapes_classifier.scene_accuracy(classifier, scenes, images)["exact_scene"] >= 0.93
    found = geometry_judge.detect_many(images)
    want = [sorted((o.color, o.shape) for o in s.objects) for s in scenes]
    assert np.mean([sorted((o.color, o.shape) for o in f) == w for f, w in zip(found, want)]) >= 0.95


def test_classifier_counts_free_scenes(either_classifier):
    """Empty canvases and three objects are counted, so judge() can reject them."""
    blank = Scene(())
    three = Scene((ShapeObject("circle", "red", "small", (0.2, 0.2)),
                   ShapeObject("square", "blue", "small", (0.8, 0.2)),
                   ShapeObject("triangle", "green", "large", (0.5, 0.7))))
    found = shapes_classifier.detect(either_classifier, [render(blank), render(three)])
    assert found[0] == []
    seen = sorted((o.color, o.shape) for o in found[1])
    assert seen == [("blue", "square"), ("green", "triangle"), ("red", "circle")]


# -- judge --------------------------------------------------------------------------------------

RIGHT_PROMPTS = [
    "a red circle", "a large purple triangle", "a small orange circle", "an orange square",
    "a blue square to the left of a yellow triangle", "a green circle above a green square",
    "a purple triangle below an orange circle", "a red square to the right of a blue square",
]


def test_judge_accepts_renderings_of_the_prompt(classifier):
    prompts = [p for p in RIGHT_PROMPTS for _ in range(8)]
    images = [im for p in RIGHT_PROMPTS for im in renders(p, 8, TEST_SEED)]
    verdicts = alignment.judge_many(prompts, images, classifier)
    wrong = [(v["prompt"], v["detected"]) for v in verdicts if not v["correct"]]
    assert not wrong
    one = alignment.judge("a large purple triangle", images[8], classifier)
    assert one["correct"] and one["size"] and one["relation"] is None


# (prompt, scene drawn instead, the attribute that must fail)
WRONG = [
    ("a red circle", "a blue circle", "color"),
    ("a red circle", "a red square", "shape"),
    ("a large green square", "a small green square", "size"),
    ("a small yellow triangle", "a large yellow triangle", "size"),
    ("a red circle to the left of a blue square", "a red circle to the right of a blue square", "relation"),
    ("a green circle above a purple triangle", "a green circle below a purple triangle", "relation"),
    ("a red circle", "a red circle to the left of a green triangle", "count"),
    ("a blue square above a red circle", "a blue square", "count"),
    ("a blue square to the left of a red circle", "a red square to the left of a blue circle", "objects"),
]


@pytest.mark.parametrize("prompt, drawn, attribute", WRONG)
def test_judge_rejects_wrong_scenes(classifier, prompt, drawn, attribute):
    images = renders(drawn, 6, TEST_SEED)
    for verdict in alignment.judge_many([prompt] * len(images), images, classifier):
        assert verdict[attribute] is False and verdict["correct"] is False, verdict


def test_judge_rejects_blank_and_repeated_objects(classifier):
    blank = render(Scene(()))
    twice = render(Scene((ShapeObject("circle", "red", "small", (0.25, 0.5)),
                          ShapeObject("circle", "red", "small", (0.75, 0.5)))))
    assert not alignment.judge("a red circle", blank, classifier)["count"]
    verdict = alignment.judge("a red circle", twice, classifier)
    assert not verdict["count"] and not verdict["correct"]


def test_judge_rejects_relation_within_the_margin(classifier):
    """Centroids 0.05 apart do not make "to the left of", though the objects are right."""
    close = Scene((ShapeObject("circle", "red", "small", (0.45, 0.2)),
                   ShapeObject("square", "blue", "small", (0.5, 0.8))))
    verdict = alignment.judge("a red circle to the left of a blue square", render(close), classifier)
    assert verdict["objects"] and not verdict["relation"]


def test_judge_accepts_tensors_and_other_sizes(classifier):
    image = renders("a yellow square", 1, TEST_SEED)[0]
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1  # (3, 64, 64)
    assert alignment.judge("a yellow square", x, classifier)["correct"]
    assert alignment.judge("a yellow square", image.resize((128, 128)), classifier)["correct"]


def test_judge_refuses_prompts_outside_the_grammar(classifier):
    with pytest.raises(InvalidArgument):
        alignment.judge("a cat", renders("a red circle", 1, 0)[0], classifier)


def test_text_alignment_reports_groups_and_attributes(classifier):
    right = renders("a large red square", 3, 1) + renders("a blue circle above a red square", 3, 2)
    wrong = renders("a small red square", 1, 3) + renders("a blue circle below a red square", 1, 4)
    prompts = ["a large red square"] * 4 + ["a blue circle above a red square"] * 4
    report = alignment.text_alignment(prompts, right[:3] + wrong[:1] + right[3:] + wrong[1:], classifier)
    assert report["one_object"]["correct"] == pytest.approx(0.75)
    assert report["two_object"]["correct"] == pytest.approx(0.75)
    assert report["one_object"]["attributes"]["size"] == pytest.approx(0.75)
    assert report["one_object"]["attributes"]["relation"] is None
    assert report["two_object"]["attributes"]["relation"] == pytest.approx(0.75)
    assert report["two_object"]["relation_where_objects_right"] == pytest.approx(0.75)  # the wrong one: objects right
    assert report["one_object"]["relation_where_objects_right"] is None
    assert report["all"]["attributes"]["count"] == 1.0 and report["all"]["images"] == 8


# -- prompts ------------------------------------------------------------------------------------


def test_evaluation_prompts_are_away_from_training_captions():
    held = alignment.evaluation_prompts("heldout")
    assert held == heldout_prompts()
    singles, pairs = alignment.training_prompts()
    assert not set(held) & (set(singles) | set(pairs))
    train = alignment.evaluation_prompts("train", seed=1)
    assert not set(train) & set(held) and len(set(train)) == len(train)
    assert sum(parse_caption(p).relation is None for p in train) == 18
    assert train == alignment.evaluation_prompts("train", seed=1)


# -- FID ----------------------------------------------------------------------------------------


def test_frechet_distance_of_identical_gaussians_is_zero():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=g, dtype=torch.float64)
    mu, sigma = torch.randn(16, generator=g, dtype=torch.float64), a @ a.T / 16
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_diagonal_gaussians_matches_closed_form():
    """For diagonal covariances d^2 = |mu1 - mu2|^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2."""
    g = torch.Generator().manual_seed(1)
    mu1, mu2 = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    s1, s2 = torch.rand(8, generator=g, dtype=torch.float64) * 3, torch.rand(8, generator=g, dtype=torch.float64)
    expected = (mu1 - mu2).square().sum() + (s1.sqrt() - s2.sqrt()).square().sum()
    assert frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(float(expected), rel=1e-9)


def test_fid_of_features_from_one_distribution_is_small():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4000, 4, generator=g), torch.randn(4000, 4, generator=g)
    assert fid_from_features(x, y) < 0.02
    assert fid_from_features(x, y + 1) == pytest.approx(4.0, abs=0.1)


def test_shapes_fid_sanity(fid_classifier):
    prompts = alignment.evaluation_prompts("heldout")
    real = evaluate.real_images_for_prompts(prompts, 2, seed=1)
    real2 = evaluate.real_images_for_prompts(prompts, 2, seed=2)
    x = shapes_classifier.to_input(real2)
    blurred = gaussian_blur(x, 2.0, radius=4)
    noisy = (x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    same = evaluate.shapes_fid(real, real2, fid_classifier)
    blur_fid, noise_fid = (evaluate.shapes_fid(real, x, fid_classifier) for x in (blurred, noisy))
    print(f"shapes FID: real vs real {same:.3f}, vs blurred {blur_fid:.3f}, vs noisy {noise_fid:.3f}")
    assert same < 0.2 * blur_fid and same < 0.2 * noise_fid


# -- the evaluation loop, with a stand-in pipeline ----------------------------------------------


class RenderingPipe:
    """Stands in for StableDiffusion: draws each prompt perfectly (or with swapped colors)."""

    default_size = 64

    def __init__(self, swap_colors: bool = False) -> None:
        self.swap_colors = swap_colors
        self.calls = []

    def txt2img(self, prompts, *, sampler, steps, cfg_scale, cfg_rescale, height, width, seed):
        self.calls.append(len(prompts))
        images = []
        for prompt, generator in zip(prompts, seed):
            rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=generator)))
            scene = scene_for_prompt(prompt, rng)
            if self.swap_colors:
                scene = Scene(tuple(ShapeObject(o.shape, "green" if o.color != "green" else "red", o.size, o.center)
                                    for o in scene.objects), scene.relation, scene.size_stated)
            images.append(render(scene, height))
        return images


def test_evaluate_shapes_model_with_a_perfect_pipe(classifier):
    prompts = alignment.evaluation_prompts("train", num_one=4, num_two=6)
    pipe = RenderingPipe()
    report = evaluate.evaluate_shapes_model(pipe, prompts, num_per_prompt=2, batch_size=8, judge=classifier,
                                            min_real_images=50)
    assert pipe.calls == [8, 8, 4]
    assert report["alignment"]["one_object"]["correct"] == 1.0
    assert report["alignment"]["two_object"]["correct"] == 1.0
    assert report["settings"]["num_per_prompt"] == 2 and len(report["judgements"]) == 20
    assert report["geometry_check"]["alignment"]["all"]["correct"] == 1.0
    assert report["geometry_check"]["agreement"] == {"one_object": 1.0, "two_object": 1.0, "all": 1.0}
    bad = evaluate.evaluate_shapes_model(RenderingPipe(swap_colors=True), prompts, 2, judge=classifier,
                                         min_real_images=50)
    assert bad["alignment"]["all"]["attributes"]["color"] == 0.0
    assert bad["geometry_check"]["alignment"]["all"]["attributes"]["color"] == 0.0


def test_eval_cli_rejects_bad_options():
    from ldmkit.evaluation.cli import add_eval, run_eval

    parser = argparse.ArgumentParser()
    add_eval(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "shapes", "--num-per-prompt", "0"])
    with pytest.raises(InvalidArgument, match="num-per-prompt"):
        run_eval(args)
    args = parser.parse_args(["eval", "shapes", "--out", "report.txt"])
    with pytest.raises(InvalidArgument, match="json"):
        run_eval(args)


# -- digits -------------------------------------------------------------------------------------


def test_digits_classifier_and_sampler_evaluation():
    from ldmkit.data.digits import DigitsDataset

    model = digits_classifier.load_digits_classifier()
    assert digits_classifier.test_accuracy(model) >= 0.95
    data = DigitsDataset(size=16, split="all")
    images, labels = data.images, torch.from_numpy(data.labels)
    g = torch.Generator().manual_seed(0)

    def real_sampler(wanted: torch.Tensor) -> torch.Tensor:
        """A "model" that returns real digits of the asked class."""
        picks = [int(torch.nonzero(labels == k)[torch.randint(int((labels == k).sum()), (1,), generator=g)])
                 for k in wanted.tolist()]
        return images[picks]

    good = digits_classifier.evaluate_digits_sampler(real_sampler, per_class=30, classifier=model)
    noise = digits_classifier.evaluate_digits_sampler(
        lambda y: torch.rand(len(y), 1, 16, 16, generator=g) * 2 - 1, per_class=30, classifier=model)
    assert good["accuracy"] >= 0.95 and noise["accuracy"] < 0.4
    assert good["fid"] < 0.2 * noise["fid"]


def test_evaluate_shapes_model_runs_a_real_pipeline(classifier):
    """A tiny random-weight StableDiffusion goes through the same calls as a trained one."""
    from dataclasses import replace

    from ldmkit.diffusion.schedule import NoiseSchedule, ScheduleConfig
    from ldmkit.models.clip import CLIPTextConfig, CLIPTextModel
    from ldmkit.models.tokenizer import CLIPTokenizer
    from ldmkit.models.unet import UNet, unet_preset
    from ldmkit.models.vae import VAE_PRESETS, AutoencoderKL
    from ldmkit.pipelines.stable_diffusion import StableDiffusion

    torch.manual_seed(0)
    text = replace(CLIPTextConfig.preset("tiny"), vocab_size=49408, eos_token_id=49407, pad_token_id=49407)
    pipe = StableDiffusion(UNet(unet_preset("tiny")), AutoencoderKL(VAE_PRESETS["tiny"]), CLIPTextModel(text),
                           CLIPTokenizer.from_openai_bpe(), NoiseSchedule(ScheduleConfig()))
    prompts = ["a red circle", "a blue square above a red circle"]
    report = evaluate.evaluate_shapes_model(pipe, prompts, num_per_prompt=2, steps=2, judge=classifier,
                                            min_real_images=20, keep_images=True)
    assert len(report["images"]) == 4 and report["images"][0].size == (pipe.default_size,) * 2
    assert report["alignment"]["all"]["images"] == 4 and np.isfinite(report["fid"])


def test_eval_cli_scores_a_prompts_file_and_saves_the_judged_images(tmp_path, capsys):
    """The independent checker's path: its own prompts in, every judged image out as a PNG
    whose embedded prompt and seed match the verdict that names it."""
    from ldmkit.cli import main
    from ldmkit.pipelines.output import read_parameters

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# checker's prompts\na green triangle\n\na purple square below a yellow circle\n")
    out, images = tmp_path / "report.json", tmp_path / "images"
    assert main(["eval", "shapes", "--prompts-file", str(prompts), "--num-per-prompt", "2", "--steps", "2",
                 "--seed", "5", "--precision", "fp32", "--out", str(out), "--save-images", str(images)]) == 0
    report = json.loads(out.read_text())["file"]
    verdicts = report["judgements"]
    assert [v["prompt"] for v in verdicts] == ["a green triangle"] * 2 + ["a purple square below a yellow circle"] * 2
    assert sorted(p.name for p in images.iterdir()) == [v["file"] for v in verdicts]
    for k, v in enumerate(verdicts):
        params = read_parameters(images / v["file"])
        assert params["prompt"] == v["prompt"] and params["seed"] == 5 + k and params["steps"] == 2

    capsys.readouterr()
    prompts.write_text("a red circle\na circle that is red\n")
    assert main(["eval", "shapes", "--prompts-file", str(prompts)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prompt 2" in err[0] and "outside the grammar" in err[0]
    assert main(["eval", "shapes", "--prompts-file", str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err


# -- the rule-based cross-check ----------------------------------------------------------------


def test_geometry_judge_reads_clean_renderings_exactly():
    """On the renderer's own images the rule-based judge finds exactly the drawn objects."""
    from ldmkit.data.shapes import sample_scene
    from ldmkit.evaluation.geometry_judge import detect_geometric

    for i in range(150):
        scene = sample_scene(np.random.default_rng([11, i]), 0.5, "train")
        found = detect_geometric(np.asarray(render(scene, 64)))
        assert sorted((o.color, o.shape, o.size) for o in found) == \
            sorted((o.color, o.shape, o.size) for o in scene.objects), scene
        for o in scene.objects:
            match = next(f for f in found if (f.color, f.shape) == (o.color, o.shape))
            assert abs(match.center[0] - o.center[0]) < 0.03 and abs(match.center[1] - o.center[1]) < 0.03


def test_geometry_judge_ignores_specks_and_tolerates_off_colours():
    from ldmkit.evaluation.geometry_judge import detect_geometric

    scene = Scene((ShapeObject("circle", "red", "large", (0.5, 0.5)),))
    image = np.asarray(render(scene, 64)).copy()
    image[2:4, 2:4] = (40, 80, 220)  # a 4-pixel blue speck: noise, not an object
    rng = np.random.default_rng(0)
    noisy = np.clip(image.astype(int) + rng.integers(-25, 26, image.shape), 0, 255).astype(np.uint8)
    found = detect_geometric(noisy)
    assert [(o.color, o.shape, o.size) for o in found] == [("red", "circle", "large")]


def test_geometry_judge_reads_a_shaded_object_as_one_object_of_its_main_colour():
    """A generated blue square with a darker band that lies nearer purple is one blue square."""
    from ldmkit.evaluation.geometry_judge import detect_geometric

    image = np.asarray(render(Scene((ShapeObject("square", "blue", "large", (0.5, 0.5)),)), 64)).copy()
    ys, xs = np.nonzero((image != 255).any(-1))
    band = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.min() + 6))
    image[band] = (120, 60, 190)  # nearest palette colour: purple
    found = detect_geometric(image)
    assert [(o.color, o.shape, o.size) for o in found] == [("blue", "square", "large")]
