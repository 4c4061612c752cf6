"""`ldmkit generate` end to end on a tiny random-weight SD-shaped model saved as a diffusers
folder: PNGs with parameters that regenerate them, img2img and inpainting, batches equal to single
runs, bad input refused in one line before the model loads, memory planning, and the float32
retry of a VAE decode that overflows in reduced precision."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import ldmkit.pipelines.load as load_module
from ldmkit.checkpoints.loading import Components, save_diffusers
from ldmkit.cli import main
from ldmkit.diffusion.schedule import ScheduleConfig
from ldmkit.errors import GenerationError, InvalidArgument, LdmkitError
from ldmkit.models.clip import CLIPTextConfig, CLIPTextModel
from ldmkit.models.tokenizer import CLIPTokenizer
from ldmkit.models.unet import UNet, unet_preset
from ldmkit.models.vae import AutoencoderKL, Decoder, vae_preset
from ldmkit.pipelines.load import load_pipeline, model_hash, resolve_device, resolve_precision, vae_dtype_for
from ldmkit.pipelines.memory import MAX_AUTO_BATCH, auto_batch_size, meminfo_available
from ldmkit.pipelines.output import read_parameters
from ldmkit.pipelines.stable_diffusion import seed_generators

SIZE = 32  # the tiny model's default: U-Net sample size 16 x VAE downscale 2
FAST = ["--steps", "2", "--sampler", "euler_a"]  # euler_a draws fresh noise: seeds matter at every step


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random SD model as a diffusers folder (VAE tiles above 32 px, the default size)."""
    torch.manual_seed(0)
    text = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    comps = Components(UNet(unet_preset("tiny")), AutoencoderKL(vae_preset("tiny")), CLIPTextModel(text),
                       CLIPTokenizer.from_openai_bpe(), ScheduleConfig())
    folder = tmp_path_factory.mktemp("tiny_sd")
    save_diffusers(comps, folder)
    return folder


@pytest.fixture(scope="module")
def pipe(model):
    return load_pipeline(model, "fp32", "cpu")


def generate(model, out, *args) -> int:
    return main(["generate", "a red square", "--model", str(model), "--out", str(out), *FAST, *args])


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def write_image(path, width: int, height: int, mode: str = "RGB") -> str:
    rng = np.random.default_rng(0)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return str(path)


def regenerate_argv(p: dict, out) -> list[str]:
    """The command line that remakes an image from its recorded parameters."""
    argv = ["generate", p["prompt"], "--model", p["model"], "--negative-prompt", p["negative_prompt"],
            "--sampler", p["sampler"], "--steps", str(p["steps"]), "--cfg-scale", str(p["cfg_scale"]),
            "--cfg-rescale", str(p["cfg_rescale"]), "--seed", str(p["seed"]), "--height", str(p["height"]), "--width", str(p["width"]),
            "--precision", p["precision"], "--device", p["device"], "--out", str(out)]
    argv += ["--karras"] if p["karras"] else []
    argv += [] if p["eta"] is None else ["--eta", str(p["eta"])]
    argv += [] if p["init_image"] is None else ["--init-image", p["init_image"], "--strength", str(p["strength"])]
    argv += [] if p["mask"] is None else ["--mask", p["mask"]]
    return argv


# -- txt2img, parameters, regeneration ------------------------------------------------------------


def test_txt2img_writes_png_with_parameters(model, tmp_path, capsys):
    out = tmp_path / "one.png"
    assert generate(model, out, "--seed", "5", "--negative-prompt", "blurry") == 0
    assert "seed 5" in capsys.readouterr().out
    assert Image.open(out).size == (SIZE, SIZE)
    p = read_parameters(out)
    assert p["seed"] == 5 and p["prompt"] == "a red square" and p["negative_prompt"] == "blurry"
    assert p["model_hash"] == model_hash(model) and len(p["model_hash"]) == 10
    assert (p["sampler"], p["steps"], p["cfg_scale"], p["width"], p["height"]) == ("euler_a", 2, 7.5, SIZE, SIZE)
    # --precision auto: bf16 on CPUs with native bf16 (AMX, AVX512-BF16), else fp32
    auto = "bf16" if load_module.cpu_has_native_bf16() else "fp32"
    assert p["precision"] == auto and p["device"] == "cpu" and p["strength"] is None


def test_a_model_folder_recommends_its_guidance_scale(model, tmp_path):
    import shutil

    from ldmkit.pipelines.load import BUNDLED_MODEL, GENERATION_FILE, recommended_cfg_scale

    assert recommended_cfg_scale(model) == 7.5  # no generation.json: SD's usual scale
    assert recommended_cfg_scale(BUNDLED_MODEL) == 5.0
    own = tmp_path / "own"
    shutil.copytree(model, own)
    (own / GENERATION_FILE).write_text('{"cfg_scale": 3.5}')
    assert generate(own, tmp_path / "a.png") == 0
    assert read_parameters(tmp_path / "a.png")["cfg_scale"] == 3.5  # used and recorded
    assert generate(own, tmp_path / "b.png", "--cfg-scale", "2") == 0
    assert read_parameters(tmp_path / "b.png")["cfg_scale"] == 2.0  # the flag wins
    assert main(["convert", str(own), str(tmp_path / "copy")]) == 0
    assert recommended_cfg_scale(tmp_path / "copy") == 3.5  # converting a folder keeps it
    for bad in ('{"cfg_scale": -1}', '{"cfg_scale": "high"}', '{"guidance": 5}', "not json"):
        (own / GENERATION_FILE).write_text(bad)
        with pytest.raises(LdmkitError, match="generation.json"):
            recommended_cfg_scale(own)


def test_random_seed_is_printed_and_recorded(model, tmp_path, capsys):
    out = tmp_path / "r.png"
    assert generate(model, out) == 0
    seed = read_parameters(out)["seed"]
    assert f"seed {seed}" in capsys.readouterr().out


def test_recorded_parameters_regenerate_identical_pixels(model, tmp_path):
    out = tmp_path / "many.png"
    assert generate(model, out, "--seed", "7", "--num-images", "3", "--batch-size", "3", "--cfg-scale", "4",
                    "--cfg-rescale", "0.5") == 0
    paths = [tmp_path / f"many-{k}.png" for k in range(3)]
    assert [read_parameters(p)["seed"] for p in paths] == [7, 8, 9]
    params = read_parameters(paths[2])
    assert params["cfg_rescale"] == 0.5
    assert main(regenerate_argv(params, tmp_path / "again.png")) == 0  # alone, not in a batch
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(paths[2]))
    assert not np.array_equal(pixels(paths[0]), pixels(paths[1]))


def test_grid_sheet(model, tmp_path):
    assert generate(model, tmp_path / "g.png", "--num-images", "3", "--grid") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g-0.png", "g-1.png", "g-2.png", "g-grid.png"]
    assert Image.open(tmp_path / "g-grid.png").size == (2 * SIZE + 3 * 2, 2 * SIZE + 3 * 2)  # 2x2, 2 px padding
    assert read_parameters(tmp_path / "g-grid.png")["num_images"] == 3


# -- img2img and inpainting ----------------------------------------------------------------------


def test_img2img_and_inpainting_from_flags(model, tmp_path):
    init = write_image(tmp_path / "init.png", 44, 40)  # cut down to 40x40 (multiples of 8)
    mask = write_image(tmp_path / "mask.png", 44, 40, "L")
    assert generate(model, tmp_path / "i2i.png", "--init-image", init, "--strength", "0.5", "--seed", "3") == 0
    p = read_parameters(tmp_path / "i2i.png")
    assert Image.open(tmp_path / "i2i.png").size == (40, 40)
    assert (p["strength"], p["init_image"], p["mask"]) == (0.5, init, None)
    assert main(regenerate_argv(p, tmp_path / "i2i_again.png")) == 0
    assert np.array_equal(pixels(tmp_path / "i2i_again.png"), pixels(tmp_path / "i2i.png"))

    assert generate(model, tmp_path / "inp.png", "--init-image", init, "--mask", mask, "--width", "32",
                    "--height", "24") == 0
    p = read_parameters(tmp_path / "inp.png")
    assert Image.open(tmp_path / "inp.png").size == (32, 24)
    assert (p["strength"], p["mask"]) == (1.0, mask)


# -- bad input -----------------------------------------------------------------------------------

BAD_INPUTS = {
    "width not a multiple of 8": ["--width", "30"],
    "zero height": ["--height", "0"],
    "negative width": ["--width", "-64"],
    "absurd size": ["--width", "8192"],
    "no steps": ["--steps", "0"],
    "too many steps": ["--steps", "1001"],
    "strength above 1": ["--init-image", "{img}", "--strength", "1.5"],
    "negative strength": ["--init-image", "{img}", "--strength", "-0.1"],
    "strength without image": ["--strength", "0.5"],
    "negative cfg": ["--cfg-scale", "-1"],
    "nan cfg": ["--cfg-scale", "nan"],
    "cfg rescale above 1": ["--cfg-rescale", "1.5"],
    "nan cfg rescale": ["--cfg-rescale", "nan"],
    "no images": ["--num-images", "0"],
    "zero batch": ["--batch-size", "0"],
    "unknown sampler": ["--sampler", "magic"],
    "steps not a number": ["--steps", "many"],
    "eta on a deterministic sampler": ["--sampler", "euler", "--eta", "0.5"],
    "karras on ddim": ["--sampler", "ddim", "--karras"],
    "negative seed": ["--seed", "-1"],
    "missing init image": ["--init-image", "{missing}"],
    "empty init image": ["--init-image", "{empty}"],
    "init image not an image": ["--init-image", "{text}"],
    "tiny init image": ["--init-image", "{tiny}"],
    "missing mask": ["--init-image", "{img}", "--mask", "{missing}"],
    "mask not an image": ["--init-image", "{img}", "--mask", "{text}"],
    "mask size differs": ["--init-image", "{img}", "--mask", "{small}"],
    "mask without init image": ["--mask", "{img}"],
    "missing model": ["--model", "{missing}"],
    "out not a png": ["--out", "{dir}/x.jpg"],
    "fp16 on the cpu": ["--precision", "fp16", "--device", "cpu"],
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_before_loading(case, model, tmp_path, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(load_module, "load_pipeline_components", no_loading)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "empty.png").write_bytes(b"")
    (inputs / "notes.png").write_text("not an image")
    files = {"img": write_image(inputs / "img.png", 32, 32), "small": write_image(inputs / "small.png", 16, 16, "L"),
             "tiny": write_image(inputs / "tiny.png", 5, 5), "empty": str(inputs / "empty.png"),
             "text": str(inputs / "notes.png"), "missing": str(tmp_path / "missing.png"), "dir": str(tmp_path / "out")}
    extra = [a.format(**files) for a in BAD_INPUTS[case]]
    argv = ["generate", "a red square", "--model", str(model), "--out", str(tmp_path / "out" / "x.png"), *extra]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("ldmkit: error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert not (tmp_path / "out").exists()


def test_errors_found_after_loading_are_one_line_too(model, tmp_path, capsys):
    init = write_image(tmp_path / "init.png", 32, 32)
    assert generate(model, tmp_path / "x.png", "--init-image", init, "--strength", "0.1") == 2  # 0 of 2 steps
    err = capsys.readouterr().err
    assert err.startswith("ldmkit: error: ") and "no step" in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_missing_bundled_model_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(load_module, "BUNDLED_MODEL", tmp_path / "shapes_model")
    assert main(["generate", "a red square", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "bundled model not found" in err and "--model" in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_python_m_ldmkit_help():
    proc = subprocess.run([sys.executable, "-m", "ldmkit", "generate", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--num-images" in proc.stdout and "SEED+k" in proc.stdout


# -- batches, memory, precision ------------------------------------------------------------------


@pytest.mark.parametrize("task", ["txt2img", "img2img"])
def test_batch_equals_single_runs(pipe, task):
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))

    def run(seed: int, count: int) -> torch.Tensor:
        kwargs = dict(sampler="euler_a", steps=3, num_images=count, seed=seed_generators(seed, count), output="tensor")
        if task == "img2img":
            return pipe.img2img("a red square", image, 0.7, **kwargs)
        return pipe.txt2img("a red square", height=SIZE, width=SIZE, **kwargs)

    batch = run(10, 3)
    singles = torch.cat([run(10 + k, 1) for k in range(3)])
    assert (batch - singles).abs().max() < 1e-4
    assert (batch[0] - batch[1]).abs().max() > 1e-2  # different seeds, different images


def test_auto_batch_size_fits_free_memory(pipe, tmp_path):
    assert auto_batch_size(pipe, SIZE, SIZE, 5, free_bytes=0) == 1  # always at least one
    assert auto_batch_size(pipe, SIZE, SIZE, 5, free_bytes=2**40) == 5
    assert auto_batch_size(pipe, SIZE, SIZE, 100, free_bytes=2**40) == MAX_AUTO_BATCH
    small = auto_batch_size(pipe, 512, 512, 100, free_bytes=2**30)
    assert 1 <= small < auto_batch_size(pipe, 64, 64, 100, free_bytes=2**30)  # bigger images, smaller batches
    (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable:   2048 kB\n")
    assert meminfo_available(tmp_path / "meminfo") == 2048 * 1024
    assert meminfo_available(tmp_path / "nothing") is None


def test_explicit_batch_size_is_honoured(model, tmp_path, capsys, monkeypatch):
    import ldmkit.pipelines.memory as memory

    monkeypatch.setattr(memory, "free_memory", lambda device: 0)  # auto would choose 1
    assert generate(model, tmp_path / "b.png", "--num-images", "2") == 0
    assert "in batches of 1" in capsys.readouterr().out
    assert generate(model, tmp_path / "b.png", "--num-images", "2", "--batch-size", "2") == 0
    assert "in batches of 2" in capsys.readouterr().out


def test_large_images_are_decoded_in_tiles(pipe, monkeypatch):
    sides = []
    original = AutoencoderKL._decode
    monkeypatch.setattr(AutoencoderKL, "_decode", lambda self, z: sides.append(tuple(z.shape)) or original(self, z))
    pipe.decode_latents(torch.zeros(2, 4, SIZE // 2, SIZE // 2))  # 32 px: one call per image (sliced)
    assert sides == [(1, 4, 16, 16)] * 2
    sides.clear()
    pipe.decode_latents(torch.zeros(1, 4, SIZE, SIZE))  # 64 px > vae_tile_size 32: tiles of 16 latents
    assert len(sides) > 1 and all(s[-2:] <= (16, 16) for s in sides)


def test_precision_and_device_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == torch.float32 and resolve_precision("bf16", cpu) == torch.bfloat16
    with pytest.raises(InvalidArgument, match="fp16 needs CUDA"):
        resolve_precision("fp16", cpu)
    monkeypatch.setattr(load_module, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(load_module, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == torch.float32
    assert resolve_precision("auto", torch.device("cuda")) == torch.float16
    assert vae_dtype_for(torch.float16) == torch.float32 and vae_dtype_for(torch.bfloat16) == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(InvalidArgument, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_that_emulates_it_says_so(model, tmp_path, monkeypatch, capsys, native):
    monkeypatch.setattr(load_module, "cpu_has_native_bf16", lambda: native)
    assert generate(model, tmp_path / "x.png", "--precision", "bf16") == 0
    assert ("bf16 is emulated" in capsys.readouterr().err) != native
    assert generate(model, tmp_path / "y.png", "--precision", "fp32") == 0
    assert "emulated" not in capsys.readouterr().err


# -- NaN / Inf -----------------------------------------------------------------------------------


def nan_decoder(monkeypatch, dtypes: tuple[torch.dtype, ...]) -> None:
    """Make the VAE decoder return NaN whenever it runs in one of `dtypes`."""
    original = Decoder.forward

    def forward(self, z):
        out = original(self, z)
        return out * float("nan") if out.dtype in dtypes else out

    monkeypatch.setattr(Decoder, "forward", forward)


def test_reduced_precision_vae_overflow_is_retried_in_float32(model, tmp_path, monkeypatch, capsys):
    bf16 = load_pipeline(model, "bf16", "cpu")
    assert bf16.vae_dtype == torch.bfloat16
    nan_decoder(monkeypatch, (torch.bfloat16,))
    images = bf16.txt2img("a red square", sampler="euler", steps=2, height=SIZE, width=SIZE, seed=1, output="tensor")
    assert torch.isfinite(images).all()
    assert bf16.vae_dtype == torch.bfloat16  # the retry used a copy
    assert generate(model, tmp_path / "bf16.png", "--precision", "bf16") == 0
    assert read_parameters(tmp_path / "bf16.png")["precision"] == "bf16"


def test_nan_everywhere_is_a_generation_error(model, tmp_path, monkeypatch, capsys):
    nan_decoder(monkeypatch, (torch.bfloat16, torch.float32))
    with pytest.raises(GenerationError, match="NaN"):
        load_pipeline(model, "bf16", "cpu").decode_latents(torch.zeros(1, 4, 16, 16))
    assert generate(model, tmp_path / "nan.png") == 2
    err = capsys.readouterr().err
    assert "ldmkit: error: " in err and "NaN" in err and "Traceback" not in err
    assert not (tmp_path / "nan.png").exists()


def test_errors_are_ldmkit_errors():
    with pytest.raises(LdmkitError):
        seed_generators(-1, 2)


def test_model_hash_is_cached_and_computed_again_when_a_weight_file_changes(model, tmp_path, monkeypatch):
    """The cached hash is the one hashing gives; an edited weight file is hashed afresh."""
    import shutil

    from ldmkit.pipelines import load as load_module

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    copy = shutil.copytree(model, tmp_path / "model")
    first = model_hash(copy)
    assert (tmp_path / "cache" / "ldmkit" / load_module.HASH_CACHE_FILE).is_file()
    hashed = []
    real = load_module._sha256_of_weights
    monkeypatch.setattr(load_module, "_sha256_of_weights", lambda *a: hashed.append(1) or real(*a))
    assert model_hash(copy) == first and not hashed  # from the cache, nothing read
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    weights.write_bytes(bytes(data))
    changed = model_hash(copy)
    assert hashed and changed != first
    (tmp_path / "cache" / "ldmkit" / load_module.HASH_CACHE_FILE).write_text("{not json")
    assert model_hash(copy) == changed  # a damaged cache is ignored and rewritten


def test_a_ctrl_c_that_python_swallows_is_raised_again_at_the_next_check():
    """A KeyboardInterrupt landing in a finalizer is dropped by Python ("Exception ignored in");
    `ldmkit generate` remembers the Ctrl-C and raises it at its next per-step check."""
    import signal

    from ldmkit.cli import _interrupt_kept

    before = signal.getsignal(signal.SIGINT)
    with _interrupt_kept() as check:
        check()  # nothing pending
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass  # as a finalizer would swallow it
        with pytest.raises(KeyboardInterrupt):
            check()
    assert signal.getsignal(signal.SIGINT) is before  # the previous handler is back
