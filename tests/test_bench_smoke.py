"""bench/run.py --smoke: every workload, variant, check and report section runs on tiny models.

The numbers of a smoke run mean nothing; this only keeps the benchmark script from rotting
between the (long, manual) real measurements.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldmkit import kernels
from ldmkit.cpu import cpu_has_amx
from ldmkit.models import onednn

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
PACKED = onednn.available(torch.bfloat16)  # "ldmkit bf16 packed": where oneDNN has bf16 kernels for this CPU
VARIANTS = ("diffusers fp32", "diffusers bf16 autocast", "ldmkit fp32", "ldmkit fp32 CL", "ldmkit bf16 CL",
            *(("ldmkit bf16 packed",) if PACKED else ()))


@pytest.mark.slow
@pytest.mark.oracle
def test_bench_smoke_writes_the_report(tmp_path):
    out = tmp_path / "RESULTS.md"
    cmd = [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--runs", "1", "--skip-pipeline",
           "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    assert report in proc.stdout  # the same report is printed

    rows = [line for line in report.splitlines() if line.startswith("| ")]
    gn_kernel = kernels.group_norm_kernel_available()  # + "... PyTorch GN" variants
    winograd = PACKED and kernels.winograd_kernel_available()  # + "..., Winograd" or "..., direct 3x3"
    # + "... distinct latents" with packed, + "... SDPA"
    unet_variants = 5 + 2 * PACKED + bool(kernels.attention_kernel()) + gn_kernel + winograd
    vae_winograd = winograd and not cpu_has_amx()  # + "ldmkit bf16 CL Winograd" (the tiny VAE has 64-channel convolutions)
    vae_variants = 5 + gn_kernel + vae_winograd
    for workload, variants in (("U-Net step", unet_variants), ("VAE decode", vae_variants), ("text encode", 4)):
        timed = [r for r in rows if r.startswith(f"| {workload} ")]
        assert len(timed) == variants, f"{workload}: {timed}"
        assert not any("failed:" in r for r in timed), timed
    for variant in VARIANTS:
        assert any(f"| {variant} " in r for r in rows), variant
    assert not any(r.startswith("| txt2img ") for r in rows) and "- txt2img:" not in report  # --skip-pipeline
    assert "## `ldmkit generate` in a fresh process" in report
    cli_run = next(r for r in rows if r.startswith("| run 1 "))
    total, image = (float(c) for c in cli_run.split("|")[2:4])  # seconds in main, of them in txt2img
    assert 0 < image < total

    # the quality checks with targets pass even on tiny random models
    checks = {r.split("|")[1].strip(): r for r in rows if "vs" in r and ("pass" in r or "FAIL" in r)}
    assert any(k.startswith("U-Net ldmkit bf16 CL vs ldmkit fp32") for k in checks), checks
    assert not PACKED or any(k.startswith("U-Net ldmkit bf16 packed vs ldmkit fp32") for k in checks), checks
    assert any(k.startswith("VAE ldmkit bf16 CL vs ldmkit fp32") for k in checks), checks
    assert not vae_winograd or any(k.startswith("VAE ldmkit bf16 CL Winograd vs ldmkit fp32") for k in checks), checks
    assert not any("FAIL" in r for r in checks.values()), checks

    # every tiny module runs with bf16 weights and channels_last inputs
    assert "## bf16 weights + channels_last inputs on tiny modules" in report
    assert "ERROR" not in report and "NON-FINITE" not in report


@pytest.mark.skipif(not PACKED, reason="oneDNN has no bf16 kernels on this CPU")
def test_convolution_bench_times_each_way_and_adds_up_the_step():
    cmd = [sys.executable, str(ROOT / "bench" / "convs.py"), "--preset", "tiny", "--runs", "1", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| 2 x ")]
    assert rows and all(float(cells[2]) > 0 for cells in rows)  # oneDNN's direct time for every shape
    assert all((cells[4].strip() != "") == kernels.winograd_kernel_available() for cells in rows)
    per_step = [line for line in proc.stdout.splitlines() if line.startswith("per step with prepack(winograd=")]
    assert len(per_step) == 2 and sum("prepack's default here" in line for line in per_step) == 1
