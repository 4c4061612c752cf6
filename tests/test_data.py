"""Data sets: the shapes generator against its spec, digits, image folders, IDX files, get_dataset."""

from __future__ import annotations

import gzip
import json
import re
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.data import get_dataset, make_grid, to_image
from ldmkit.data import shapes as S
from ldmkit.data.idx import IdxDataset, read_idx
from ldmkit.data.imagefolder import ImageFolderDataset
from ldmkit.errors import InvalidArgument, LdmkitError

N = 64  # canvas size for the shapes tests
WHITE = np.array([255, 255, 255], dtype=np.uint8)
# From shared/specs/shapes.md, restated here so that the tests check the code against the spec.
SPEC_PALETTE = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (240, 200, 30), "purple": (140, 60, 180), "orange": (245, 130, 30),
}
SPEC_SIDES = {"small": 0.22, "large": 0.40}


def scenes(count: int, seed: int = 0, split: str = "train", one_object_fraction: float = 0.5):
    rngs = (np.random.default_rng([seed, i]) for i in range(count))
    return [S.sample_scene(rng, one_object_fraction, split) for rng in rngs]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8)


def object_mask(obj: S.ShapeObject, size: int = N) -> np.ndarray:
    """Where the object alone paints, on an otherwise empty canvas."""
    return (pixels(S.render(S.Scene((obj,)), size)) != WHITE).any(-1)


def mask_centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return xs.mean() + 0.5, ys.mean() + 0.5  # pixel centers, in pixel units


@pytest.fixture(scope="module")
def train_scenes():
    return scenes(600)


@pytest.fixture(scope="module")
def pair_scenes():
    return scenes(200, seed=7, one_object_fraction=0.0)


# ---------------------------------------------------------------------------------------------
# shapes: determinism and captions
# ---------------------------------------------------------------------------------------------


def test_shapes_same_seed_same_pixels_different_seed_different():
    a, b = S.ShapesDataset(seed=3, length=20), S.ShapesDataset(seed=3, length=20)
    c = S.ShapesDataset(seed=4, length=20)
    for i in (0, 5, 19):
        assert torch.equal(a[i]["image"], b[i]["image"]) and a[i]["caption"] == b[i]["caption"]
    assert torch.equal(a[-1]["image"], a[19]["image"])
    differing = sum(not torch.equal(a[i]["image"], c[i]["image"]) for i in range(20))
    assert differing >= 18
    heldout = S.ShapesDataset(seed=3, length=20, split="heldout")
    assert sum(a[i]["caption"] != heldout[i]["caption"] for i in range(20)) >= 18


def test_shapes_item_protocol():
    ds = S.ShapesDataset(size=32, length=5)
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() == 1  # white background
    assert item["label"] is None and isinstance(item["caption"], str)
    assert len(ds) == 5
    with pytest.raises(IndexError):
        ds[5]
    # The tensor is exactly the rendered image.
    assert pixels(to_image(item["image"])).tolist() == pixels(S.render(ds.scene(0), 32)).tolist()


GRAMMAR = re.compile(
    r"(a|an)( (small|large))? (red|green|blue|yellow|purple|orange) (circle|square|triangle)"
    r"|(a|an) (red|green|blue|yellow|purple|orange) (circle|square|triangle)"
    r" (to the left of|to the right of|above|below)"
    r" (a|an) (red|green|blue|yellow|purple|orange) (circle|square|triangle)"
)


def test_captions_follow_the_grammar(train_scenes):
    for scene in train_scenes:
        text = S.caption(scene)
        assert GRAMMAR.fullmatch(text), text
        assert text == text.lower() and not text.endswith(".") and "  " not in text
        words = text.split()
        for art, word in zip(words, words[1:]):
            if art in ("a", "an"):
                assert art == ("an" if word == "orange" else "a"), text
    assert S.caption(S.Scene((S.ShapeObject("circle", "orange", "small", (0.5, 0.5)),))) == "an orange circle"
    big = S.Scene((S.ShapeObject("circle", "orange", "large", (0.5, 0.5)),), size_stated=True)
    assert S.caption(big) == "a large orange circle"


def test_article_by_vowel_sound():
    assert [S.article(w) for w in ("orange", "red", "ankle", "hour", "uniform", "one")] == [
        "an", "a", "an", "an", "a", "a"]


def test_parse_caption_round_trip(train_scenes):
    for scene in train_scenes:
        parsed = S.parse_caption(S.caption(scene))
        assert parsed.colors == tuple(o.color for o in scene.objects)
        assert parsed.shapes == tuple(o.shape for o in scene.objects)
        assert parsed.relation == scene.relation
        if len(scene.objects) == 1 and scene.size_stated:
            assert parsed.sizes == (scene.objects[0].size,)
        else:
            assert parsed.sizes == (None,) * len(scene.objects)
    for text in S.heldout_prompts():
        assert S.parse_caption(text)


@pytest.mark.parametrize("text", [
    "", "a orange circle", "an red circle", "a red circle.", "A red circle", "a big red circle",
    "a red circle above a red circle", "a red circle near a blue square", " a red circle",
    "a large red circle above a blue square", "a red hexagon",
])
def test_parse_caption_rejects_text_outside_the_grammar(text):
    with pytest.raises(InvalidArgument, match="shapes caption"):
        S.parse_caption(text)


def test_size_stated_in_about_half_of_one_object_captions():
    ones = scenes(2000, seed=11, one_object_fraction=1.0)
    assert all(len(s.objects) == 1 for s in ones)
    stated = sum(len(S.caption(s).split()) == 4 for s in ones) / len(ones)
    assert 0.46 <= stated <= 0.54
    # Both sizes, every color and every shape occur.
    assert {s.objects[0].size for s in ones} == set(SPEC_SIDES)
    assert {(s.objects[0].color, s.objects[0].shape) for s in ones} == {
        (c, s) for c in SPEC_PALETTE for s in S.SHAPES}


def test_one_object_fraction_is_respected():
    mixed = scenes(1000, seed=5, one_object_fraction=0.3)
    share = sum(len(s.objects) == 1 for s in mixed) / len(mixed)
    assert 0.25 <= share <= 0.35


# ---------------------------------------------------------------------------------------------
# shapes: geometry, measured on the rendered pixels
# ---------------------------------------------------------------------------------------------


def test_fill_color_at_each_object_center_is_exact(train_scenes):
    for scene in train_scenes[:200]:
        image = pixels(S.render(scene, N))
        for obj in scene.objects:
            x, y = (int(v * N) for v in obj.center)
            assert tuple(image[y, x]) == SPEC_PALETTE[obj.color], (scene, x, y)


def test_only_palette_colors_and_white_are_drawn(train_scenes):
    allowed = {tuple(WHITE.tolist())} | set(SPEC_PALETTE.values())
    for scene in train_scenes[:50]:
        colors = {tuple(c) for c in pixels(S.render(scene, N)).reshape(-1, 3).tolist()}
        assert colors <= allowed


@pytest.mark.parametrize("size", [32, 64, 96])
def test_measured_bbox_sizes_match_small_and_large(size):
    for scene in scenes(90, seed=2, one_object_fraction=1.0):
        obj = scene.objects[0]
        ys, xs = np.nonzero((pixels(S.render(scene, size)) != WHITE).any(-1))
        width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        target = SPEC_SIDES[obj.size] * size
        assert abs(width - target) <= 1 and abs(height - target) <= 1, (obj, width, height)


def test_triangles_are_isosceles_apex_up():
    obj = S.ShapeObject("triangle", "blue", "large", (0.5, 0.5))
    mask = object_mask(obj)
    rows = np.nonzero(mask.any(1))[0]
    widths = mask[rows].sum(1)
    assert widths[0] <= 2 and widths[-1] >= 25  # apex on top, full-width base at the bottom
    assert np.all(np.diff(widths) >= 0)  # widening downwards
    for r in rows:  # symmetric about the vertical axis
        xs = np.nonzero(mask[r])[0]
        assert abs((xs.min() + xs.max()) / 2 - (mask.shape[1] - 1) / 2) <= 1
    cx, cy = mask_centroid(mask)  # `center` is the area centroid
    assert abs(cx - 0.5 * N) <= 1 and abs(cy - 0.5 * N) <= 1


def test_objects_inside_canvas_and_never_overlapping(train_scenes):
    for scene in train_scenes:
        S.check_scene(scene)
        masks = [object_mask(o) for o in scene.objects]
        for obj, mask in zip(scene.objects, masks):  # not clipped by the canvas edge
            ys, xs = np.nonzero(mask)
            assert xs.max() - xs.min() + 1 == round(SPEC_SIDES[obj.size] * N)
            assert ys.max() - ys.min() + 1 == round(SPEC_SIDES[obj.size] * N)
        if len(masks) == 2:
            assert not (masks[0] & masks[1]).any(), scene
            image = pixels(S.render(scene, N))
            for obj, mask in zip(scene.objects, masks):
                assert (image[mask] == SPEC_PALETTE[obj.color]).all()
            assert (image[~(masks[0] | masks[1])] == WHITE).all()


def test_relations_hold_between_measured_centroids_with_margin(pair_scenes):
    relations = set()
    for scene in pair_scenes:
        a, b = scene.objects
        (ax, ay), (bx, by) = (mask_centroid(object_mask(o)) for o in scene.objects)
        gap = {"to the left of": bx - ax, "to the right of": ax - bx,
               "above": by - ay, "below": ay - by}[scene.relation]
        assert gap >= 0.2 * N - 1, (scene, gap)
        assert S.relation_holds(a, b, scene.relation, margin=0.2)
        relations.add(scene.relation)
    assert relations == set(S.RELATIONS)


def test_two_objects_differ_in_color_or_shape(pair_scenes):
    for scene in pair_scenes:
        a, b = scene.objects
        assert (a.color, a.shape) != (b.color, b.shape)
    assert any(a.color == b.color for a, b in (s.objects for s in pair_scenes))
    assert any(a.shape == b.shape for a, b in (s.objects for s in pair_scenes))


def test_sizes_also_vary_in_two_object_scenes(pair_scenes):
    assert {o.size for s in pair_scenes for o in s.objects} == set(SPEC_SIDES)


# ---------------------------------------------------------------------------------------------
# shapes: held-out captions
# ---------------------------------------------------------------------------------------------


def mirror(text: str) -> str:
    m = re.fullmatch(r"an? (\w+ \w+) (to the left of|to the right of|above|below) an? (\w+ \w+)", text)
    flip = {"to the left of": "to the right of", "to the right of": "to the left of",
            "above": "below", "below": "above"}
    first, second = m.group(3), m.group(1)
    return f"{S.article(first)} {first} {flip[m.group(2)]} {S.article(second)} {second}"


def test_heldout_set_is_about_ten_percent_and_closed_under_mirroring():
    prompts = S.heldout_prompts()
    assert len(prompts) == len(set(prompts))
    pairs = [p for p in prompts if len(p.split()) > 4]
    total = 6 * 3 * (6 * 3 - 1) * 4
    assert 0.06 * total <= len(pairs) <= 0.14 * total
    assert all(mirror(p) in pairs for p in pairs)
    assert {"a large purple triangle", "a small orange circle", "a large green square"} <= set(prompts)
    assert prompts == S.heldout_prompts()  # deterministic


def test_train_split_never_produces_heldout_captions():
    heldout = set(S.heldout_prompts())
    train = {S.caption(s) for s in scenes(3000, seed=1)}
    assert not train & heldout
    assert len(train) > 500  # many distinct captions were checked


def test_heldout_split_produces_only_heldout_captions():
    heldout = set(S.heldout_prompts())
    ds = S.ShapesDataset(length=300, split="heldout", seed=0)
    got = [S.caption(ds.scene(i)) for i in range(len(ds))]
    assert set(got) <= heldout
    assert len(set(got)) > 60
    for i in range(40):
        S.check_scene(ds.scene(i))


def test_shapes_bad_arguments():
    with pytest.raises(InvalidArgument, match="split"):
        S.ShapesDataset(split="test")
    with pytest.raises(InvalidArgument, match="one_object_fraction"):
        S.ShapesDataset(one_object_fraction=1.5)
    with pytest.raises(InvalidArgument, match="size"):
        S.render(scenes(1)[0], 4)


# ---------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------


def test_digits_ranges_shapes_labels_captions():
    pytest.importorskip("sklearn")
    from ldmkit.data.digits import DigitsDataset

    train, test = DigitsDataset(), DigitsDataset(split="test")
    assert len(train) + len(test) == 1797 and len(test) == 359
    item = train[0]
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
    images = train.images
    assert images.min() == -1 and images.max() <= 1 and images.max() > 0.9
    assert set(train.labels.tolist()) == set(range(10))
    for i in (0, 100, 500):
        label = train[i]["label"]
        assert isinstance(label, int) and train[i]["caption"] == f"a handwritten digit {label}"
    # Deterministic split, disjoint by content.
    assert torch.equal(DigitsDataset(split="test").images, test.images)
    train_set = {tuple(x.flatten().tolist()) for x in DigitsDataset(size=8).images}
    test_set = {tuple(x.flatten().tolist()) for x in DigitsDataset(size=8, split="test").images}
    assert len(train_set & test_set) < 5  # scikit-learn's digits hold a few exact duplicates
    rgb = DigitsDataset(size=16, channels=3)[3]["image"]
    assert rgb.shape == (3, 16, 16) and torch.equal(rgb[0], rgb[2])


# ---------------------------------------------------------------------------------------------
# image folders
# ---------------------------------------------------------------------------------------------


def save_image(path, size=(40, 30), color=(10, 200, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_imagefolder_with_metadata_jsonl(tmp_path):
    save_image(tmp_path / "a.png", (40, 30), (255, 0, 0))
    save_image(tmp_path / "sub" / "b.jpg", (30, 60), (0, 0, 255))
    save_image(tmp_path / "unlisted.png")
    lines = [{"file_name": "a.png", "text": "a red thing"}, {"file_name": "sub/b.jpg", "text": "blue"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    ds = ImageFolderDataset(tmp_path, size=16)
    assert len(ds) == 2
    item = ds[0]
    assert item["caption"] == "a red thing" and item["label"] is None
    assert item["image"].shape == (3, 16, 16)
    assert torch.allclose(item["image"][:, 8, 8], torch.tensor([1.0, -1.0, -1.0]))
    assert ds[1]["caption"] == "blue" and ds[1]["image"].shape == (3, 16, 16)


def test_imagefolder_with_txt_captions_and_crops(tmp_path):
    image = Image.new("RGB", (60, 20), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 30, 20))  # left half black, right half white
    image.save(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("half and half\n")
    save_image(tmp_path / "nested" / "y.png", (20, 20), (0, 0, 0, 0), mode="RGBA")
    ds = ImageFolderDataset(tmp_path, size=10)
    assert [r.caption for r in ds.records] == ["", "half and half"]  # sorted: nested/y.png first
    assert (ds[0]["image"] == 1).all()  # transparent pixels become white
    centered = ds[1]["image"]
    assert centered.shape == (3, 10, 10) and centered[0, 5, 0] == -1 and centered[0, 5, 9] == 1
    crops = [ImageFolderDataset(tmp_path, 10, random_crop=True,
                                generator=torch.Generator().manual_seed(s))[1]["image"] for s in range(6)]
    again = ImageFolderDataset(tmp_path, 10, random_crop=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(crops[0], again[1]["image"])
    assert len({c.mean().item() for c in crops}) > 1  # the crop position varies with the seed
    with pytest.raises(LdmkitError, match="no caption file"):
        ImageFolderDataset(tmp_path, 10, require_captions=True)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(LdmkitError, match="not found"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(LdmkitError, match="no images"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(LdmkitError, match="broken.png: cannot read image"):
        ImageFolderDataset(tmp_path)[0]
    save_image(tmp_path / "ok.png")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "ok.png", "text": "fine"}) + "\n"
        + json.dumps({"file_name": "gone.png", "text": "missing"}) + "\n")
    with pytest.raises(LdmkitError, match=r"metadata.jsonl:2: names 'gone.png'"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "metadata.jsonl").write_text("{not json\n")
    with pytest.raises(LdmkitError, match=r"metadata.jsonl:1: not valid JSON"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"text": "no file"}) + "\n")
    with pytest.raises(LdmkitError, match="file_name"):
        ImageFolderDataset(tmp_path)


# ---------------------------------------------------------------------------------------------
# IDX (MNIST / Fashion-MNIST)
# ---------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, magic: bytes | None = None) -> bytes:
    header = magic or bytes([0, 0, 0x08, array.ndim])
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def write_idx_folder(root, count=5, gz=False, prefix="train"):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    labels = np.arange(count, dtype=np.uint8) % 10
    for name, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        data = idx_bytes(array)
        if gz:
            with gzip.open(root / f"{name}.gz", "wb") as f:
                f.write(data)
        else:
            (root / name).write_bytes(data)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_idx_parsing_captions_and_padding(tmp_path, gz):
    images, labels = write_idx_folder(tmp_path, count=12, gz=gz)
    ds = IdxDataset(tmp_path, size=28)
    assert len(ds) == 12
    item = ds[3]
    assert item["label"] == 3 and item["caption"] == "a handwritten digit 3"
    expected = torch.from_numpy(images[3].astype(np.float32)) / 127.5 - 1
    assert item["image"].shape == (1, 28, 28) and torch.allclose(item["image"][0], expected)
    padded = IdxDataset(tmp_path)[3]["image"]  # default: pad to 32
    assert padded.shape == (1, 32, 32) and torch.allclose(padded[0, 2:30, 2:30], expected)
    assert (padded[0, :2] == -1).all() and (padded[0, :, 30:] == -1).all()
    resized = IdxDataset(tmp_path, fit="resize", channels=3)[3]["image"]
    assert resized.shape == (3, 32, 32) and resized.min() >= -1 and resized.max() <= 1
    fashion = IdxDataset(tmp_path, kind="fashion-mnist")
    assert fashion[7]["caption"] == "a photo of a sneaker"
    assert fashion[9]["caption"] == "a photo of an ankle boot"
    with pytest.raises(LdmkitError, match="t10k-images-idx3-ubyte"):
        IdxDataset(tmp_path, split="test")


def test_idx_raw_subfolder(tmp_path):
    write_idx_folder(tmp_path / "raw", count=3, prefix="t10k")
    assert len(IdxDataset(tmp_path, split="test")) == 3


@pytest.mark.parametrize("data, match", [
    (b"\x00\x00", "too short"),
    (bytes([1, 0, 8, 3]) + struct.pack(">3I", 1, 2, 2) + bytes(4), "magic"),
    (bytes([0, 0, 0x0D, 3]) + struct.pack(">3I", 1, 2, 2) + bytes(16), "type 0x0d"),
    (bytes([0, 0, 8, 2]) + struct.pack(">2I", 2, 2) + bytes(4), "2 dimensions, expected 3"),
    (bytes([0, 0, 8, 3]) + struct.pack(">2I", 1, 2), "header truncated"),
    (bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 2, 2) + bytes(7), "has 7 bytes"),
    (bytes([0, 0, 8, 3]) + struct.pack(">3I", 1, 2, 2) + bytes(5), "has 5 bytes"),
])
def test_idx_corrupt_headers_rejected(tmp_path, data, match):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(data)
    with pytest.raises(LdmkitError, match=match):
        read_idx(path, 3)


def test_idx_inconsistent_files_rejected(tmp_path):
    write_idx_folder(tmp_path, count=4)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(LdmkitError, match="4 images but 3 labels"):
        IdxDataset(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([0, 1, 2, 12], np.uint8)))
    with pytest.raises(LdmkitError, match="label 12"):
        IdxDataset(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x1f\x8b" + bytes(30))
    with pytest.raises(LdmkitError):
        IdxDataset(tmp_path)
    with pytest.raises(InvalidArgument, match="cannot pad"):
        write_idx_folder(tmp_path, count=4)
        IdxDataset(tmp_path, size=20)[0]


# ---------------------------------------------------------------------------------------------
# get_dataset and image helpers
# ---------------------------------------------------------------------------------------------


def test_get_dataset_resolves_specs(tmp_path):
    shapes = get_dataset("shapes", size=32, length=7)
    assert isinstance(shapes, S.ShapesDataset) and len(shapes) == 7 and shapes[0]["image"].shape[-1] == 32
    write_idx_folder(tmp_path / "mnist", count=3)
    assert get_dataset(f"mnist:{tmp_path / 'mnist'}")[1]["caption"] == "a handwritten digit 1"
    assert get_dataset(f"fashion-mnist:{tmp_path / 'mnist'}")[0]["caption"] == "a photo of a t-shirt"
    save_image(tmp_path / "folder" / "one.png")
    assert len(get_dataset(str(tmp_path / "folder"), size=8)) == 1
    with pytest.raises(InvalidArgument, match="unknown data set 'cifar'"):
        get_dataset("cifar")
    with pytest.raises(InvalidArgument, match="needs a folder"):
        get_dataset("mnist")
    with pytest.raises(LdmkitError, match="not found"):
        get_dataset(str(tmp_path / "nowhere"))


def test_to_image_and_make_grid():
    ds = S.ShapesDataset(size=16, length=5)
    assert pixels(to_image(ds[2]["image"])).tolist() == pixels(S.render(ds.scene(2), 16)).tolist()
    gray = to_image(torch.full((1, 4, 4), -1.0))
    assert gray.mode == "L" and pixels(gray).max() == 0
    grid = make_grid([ds[i]["image"] for i in range(5)], nrow=2, padding=1)
    assert grid.size == (2 * 16 + 3, 3 * 16 + 4)
    with pytest.raises(InvalidArgument):
        to_image(torch.zeros(2, 4, 4))


def test_hard_negatives_describe_a_different_scene(pair_scenes):
    """Each negative reuses the caption's words, yet is false of the rendered scene: either the
    relation fails between the same objects, or the colours sit on the other shapes."""
    rebound = 0
    for scene in pair_scenes:
        text = S.caption(scene)
        a, b = scene.objects
        negatives = S.hard_negatives(text)
        assert len(set(negatives)) == len(negatives) and text not in negatives
        reversed_, *rest = (S.parse_caption(n) for n in negatives)
        assert reversed_.objects == S.parse_caption(text).objects
        assert not S.relation_holds(a, b, reversed_.relation, margin=0.0)
        for other in rest:  # same shapes in the same places, the colours exchanged
            assert other.shapes == (a.shape, b.shape) and other.colors == (b.color, a.color)
            assert sorted(negatives[1].split()) == sorted(text.split())  # a bag of words cannot tell them apart
            rebound += 1
        assert len(rest) == (a.color != b.color and a.shape != b.shape)
    assert rebound > 0
    assert S.hard_negatives("a red circle") == [] and S.hard_negatives("a large red circle") == []
