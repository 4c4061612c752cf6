"""Peak memory while loading a full-size SD 1.5 checkpoint (Linux only; about two minutes).

Loading should cost about one copy of the weights: models are built on the meta device and the
file's tensors assigned in. A fresh subprocess loads the checkpoint (a single safetensors file, and
a diffusers folder) and reports its peak RSS (VmHWM) minus its RSS right after the imports.
"""

import gc
import json
import os
import subprocess
import sys

import pytest
import torch

from ldmkit.checkpoints.loading import Components, save_diffusers, save_single_file
from ldmkit.diffusion.schedule import ScheduleConfig
from ldmkit.models.clip import CLIPTextConfig, CLIPTextModel
from ldmkit.models.tokenizer import load_tokenizer
from ldmkit.models.unet import UNet, unet_preset
from ldmkit.models.vae import AutoencoderKL, vae_preset

MAX_RATIO = 1.3  # allowed peak-RSS increase over the weights' byte size

# The peak is read from /proc/self/status (VmHWM), not ru_maxrss: Linux carries ru_maxrss over
# exec from the forked parent, so a child of a big pytest process would report the parent's size.
LOAD_SCRIPT = """
import json, sys
import torch, ldmkit
from ldmkit.checkpoints.loading import load_pipeline_components

def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

before = kib("VmRSS")
comps = load_pipeline_components(sys.argv[1])
params = sum(p.numel() for m in (comps.unet, comps.vae, comps.text_encoder) for p in m.parameters())
print(json.dumps({"increase": (kib("VmHWM") - before) * 1024, "params": params}))
"""


def _random_weights(cls, config):
    """`cls(config)` with random weights: one N(0, 0.02) block of 2**20 values repeated through
    every tensor (real initialisation, or normal_ on 10**9 values, takes half a minute)."""
    with torch.device("meta"):
        model = cls(config)
    model = model.to_empty(device="cpu")
    block = torch.randn(2**20, generator=torch.Generator().manual_seed(0)) * 0.02
    with torch.no_grad():
        for p in model.parameters():
            flat = p.view(-1)
            for start in range(0, flat.numel(), block.numel()):
                chunk = flat[start : start + block.numel()]
                chunk.copy_(block[: chunk.numel()])
    return model.eval()


@pytest.fixture(scope="module")
def sd15_checkpoints(tmp_path_factory):
    """(single file, diffusers folder, weight bytes) of a random-weight SD 1.5-shaped model."""
    root = tmp_path_factory.mktemp("sd15_memory")
    comps = Components(
        unet=_random_weights(UNet, unet_preset("sd15")),
        vae=_random_weights(AutoencoderKL, vae_preset("sd")),
        text_encoder=_random_weights(CLIPTextModel, CLIPTextConfig.preset("sd15_text")),
        tokenizer=load_tokenizer(None),
        schedule_config=ScheduleConfig(),
    )
    models = (comps.unet, comps.vae, comps.text_encoder)
    nbytes = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    save_single_file(comps, root / "sd15.safetensors")
    save_diffusers(comps, root / "sd15_diffusers")
    del comps, models
    gc.collect()
    yield root / "sd15.safetensors", root / "sd15_diffusers", nbytes


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("layout", ["single_file", "diffusers"])
def test_loading_peak_rss_is_about_one_copy_of_the_weights(sd15_checkpoints, layout):
    single, folder, nbytes = sd15_checkpoints
    path = single if layout == "single_file" else folder
    out = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(path)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = result["increase"] / nbytes
    print(f"{layout}: weights {nbytes / 2**30:.2f} GiB, peak RSS increase {result['increase'] / 2**30:.2f} GiB, "
          f"ratio {ratio:.2f}")
    assert result["params"] * 4 == nbytes
    assert ratio < MAX_RATIO
