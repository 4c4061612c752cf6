"""PNG output with embedded parameters, written atomically; the demo runs end to end."""

import os

import pytest
from PIL import Image

from ldmkit.pipelines.output import read_parameters, save_png


def test_parameters_round_trip(tmp_path):
    params = {"prompt": "a red circle", "seed": 7, "sampler": "dpmpp_2m", "size": [64, 64]}
    path = save_png(Image.new("RGB", (8, 8), "red"), tmp_path / "sub" / "a.png", params)
    assert read_parameters(path) == params
    assert Image.open(path).getpixel((0, 0)) == (255, 0, 0)
    assert [p.name for p in path.parent.iterdir()] == ["a.png"]  # no temporary file left behind


def test_a_failed_write_leaves_the_old_file_and_no_partial_file(tmp_path):
    path = save_png(Image.new("RGB", (4, 4)), tmp_path / "a.png", {"v": 1})

    class Broken:  # an image whose encoding fails half-way
        def save(self, f, **kw):
            f.write(b"\x89PNG partial")
            raise OSError("disk full")

    with pytest.raises(OSError):
        save_png(Broken(), path, {"v": 2})
    assert read_parameters(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


@pytest.mark.slow
def test_demo_generates_a_grid_from_the_bundled_model(tmp_path):
    from ldmkit import demo
    from ldmkit.pipelines.load import BUNDLED_MODEL

    if not BUNDLED_MODEL.is_dir():
        pytest.fail(f"the bundled model is missing at {BUNDLED_MODEL}")
    out = tmp_path / "grid.png"
    assert demo.main(["--steps", "2", "--per-prompt", "2", "--out", str(out)]) == 0
    params = read_parameters(out)
    assert params["sampler"] == "dpmpp_2m" and params["steps"] == 2 and len(params["model_hash"]) == 10
    side = 2 * (2 * 64 + 3 * 2)  # two 64 px images and three 2 px paddings per row, shown at 2x
    assert Image.open(out).size == (side, 2 * (len(demo.PROMPTS) * 64 + (len(demo.PROMPTS) + 1) * 2))


def test_saved_pngs_get_the_usual_permissions(tmp_path):
    path = save_png(Image.new("RGB", (4, 4)), tmp_path / "p.png", {"v": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
