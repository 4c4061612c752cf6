"""`ldmkit.cpu.keep_freed_memory`: glibc's malloc told to keep freed large blocks, so a tensor
made again at every call is not page-faulted in afresh each time, and `load_pipeline` doing it;
`import ldmkit` asking PyTorch for huge pages; and the channels_last layout `load_pipeline` gives
float32 models on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldmkit.cpu import HUGE_PAGES_VARIABLE, linux_huge_page_mode
from ldmkit.pipelines import load

# In a fresh process (the test process's malloc has its own history): a 64 MiB tensor made, filled
# and freed 16 times; the minor page faults of the last four. Kept, the first calls still fault:
# a freed block is a few bytes short of the next aligned request (posix_memalign asks for more),
# so the heap grows until freed neighbours have merged (measured: 8 calls, 450 MiB of heap).
FAULTS = """
import json, resource, sys, torch
from ldmkit.cpu import keep_freed_memory
applied = keep_freed_memory(sys.argv[1] == "keep")
def make():
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
for _ in range(12):
    make()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    make()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def faults(mode: str) -> dict:
    env = {**os.environ, HUGE_PAGES_VARIABLE: "0"}  # 4 KiB pages: the faults counted are malloc's alone
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, timeout=120, check=True,
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and ru_minflt are Linux's")
def test_kept_memory_is_reused_without_page_faults():
    kept, settled = faults("keep"), faults("settled")
    if not kept["applied"]:
        pytest.skip("the C library is not glibc")
    # 64 MiB is above glibc's settled mmap threshold (32 MiB): unmapped when freed, faulted in again
    # (16,384 faults of 4 KiB pages per call, fewer with transparent huge pages); kept, none
    assert kept["faults"] < 100, kept
    assert settled["faults"] > 10 * max(kept["faults"], 1), (kept, settled)


@pytest.mark.parametrize("env,device,expected", [(None, "cpu", True), ("0", "cpu", False), ("1", "cpu", True)])
def test_load_pipeline_keeps_freed_memory_on_the_cpu_unless_told_not_to(monkeypatch, env, device, expected):
    calls = []
    monkeypatch.setattr(load, "keep_freed_memory", lambda keep=True: calls.append(keep) or True)
    if env is None:
        monkeypatch.delenv("LDMKIT_KEEP_FREED_MEMORY", raising=False)
    else:
        monkeypatch.setenv("LDMKIT_KEEP_FREED_MEMORY", env)
    load.load_pipeline(None, precision="fp32", device=device)
    assert calls == ([True] if expected else [])


def test_load_pipeline_runs_float32_channels_last_on_the_cpu_with_the_same_images():
    pipe = load.load_pipeline(None, precision="fp32", device="cpu")
    cl = torch.channels_last
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=cl)
    assert pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=cl)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, pipe.latent_channels, 16, 16, generator=g)
    ctx = torch.randn(2, 77, pipe.unet.config.context_dim, generator=g)
    kwargs = dict(sampler="dpmpp_2m", steps=6, cfg_scale=5.0, num_images=2, seed=3, output="tensor")
    prompt = "a red circle to the left of a blue square"
    with torch.no_grad():
        eps_laid_out = pipe.unet(x, 500.0, ctx)
    images_laid_out = pipe.txt2img(prompt, **kwargs)
    pipe.unet.to(memory_format=torch.contiguous_format)
    pipe.vae.to(memory_format=torch.contiguous_format)
    assert not pipe.unet.conv_in.weight.is_contiguous(memory_format=cl)
    with torch.no_grad():
        eps = pipe.unet(x, 500.0, ctx)
    images = pipe.txt2img(prompt, **kwargs)
    assert (eps_laid_out - eps).norm() / eps.norm() < 1e-5  # one call: the order of float sums only
    # sampling amplifies that at a few edge pixels of this small model's two-tone shapes (measured:
    # 0.14% of values off by more than 0.01, mean 0.024/255); bf16 moves its images by 3.7/255
    diff = (images_laid_out - images).abs()
    assert diff.mean() < 1e-3 and (diff > 0.01).float().mean() < 0.01


# In a fresh process: what `import ldmkit` leaves in the environment, and how much of a 64 MiB tensor
# made after it is backed by huge pages (kB, from /proc/self/smaps_rollup)
HUGE = """
import json, os, sys
if sys.argv[1] == "torch-first":
    import torch
import ldmkit, torch
x = torch.ones(64 << 20, dtype=torch.uint8)
rollup = open("/proc/self/smaps_rollup").read()
huge = next(int(l.split()[1]) for l in rollup.splitlines() if l.startswith("AnonHugePages:"))
print(json.dumps({"variable": os.environ.get("THP_MEM_ALLOC_ENABLE"), "huge_kb": huge}))
"""


def huge_pages(order: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != HUGE_PAGES_VARIABLE} | env
    out = subprocess.run([sys.executable, "-c", HUGE, order], capture_output=True, text=True, timeout=120, check=True,
                         env=environ)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="Linux's smaps_rollup")
def test_import_ldmkit_asks_pytorch_for_huge_pages_unless_told_not_to():
    asked, refused, late = huge_pages("ldmkit-first"), huge_pages("ldmkit-first", THP_MEM_ALLOC_ENABLE="0"), \
        huge_pages("torch-first")
    assert asked["variable"] == "1" and refused["variable"] == "0" and late["variable"] is None
    mode = linux_huge_page_mode()
    if mode == "madvise":  # huge pages only on request: none unasked
        assert refused["huge_kb"] == 0 and late["huge_kb"] == 0, (refused, late)
    if mode in ("madvise", "always"):  # else the request changes nothing, which is the point of it there
        assert asked["huge_kb"] >= 32 << 10, asked  # at least half the tensor in 2 MiB pages
