"""Builders of hostile and legitimate checkpoint files for the trust tests.

Each builder writes bytes by hand (or through a fake module) so the tests control exactly what a
loader meets; none of them needs diffusers, transformers or pytorch_lightning.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import types
import zlib
from pathlib import Path

import torch

# -- a tiny Stable Diffusion 1.x-shaped model, ldmkit only ------------------------------------------


def tiny_components():
    """Random-weight ldmkit Components shaped like SD 1.x (so single-file detection works)."""
    from ldmkit.checkpoints.loading import Components
    from ldmkit.diffusion.schedule import ScheduleConfig
    from ldmkit.models.clip import CLIPTextConfig, CLIPTextModel
    from ldmkit.models.tokenizer import load_tokenizer
    from ldmkit.models.unet import UNet, UNetConfig
    from ldmkit.models.vae import AutoencoderKL, VAEConfig

    torch.manual_seed(0)
    unet = UNet(UNetConfig(block_channels=(32, 64), layers_per_block=1, attention_levels=(True, False),
                           num_heads=8, context_dim=64, sample_size=64))
    vae = AutoencoderKL(VAEConfig(block_channels=(32, 64), layers_per_block=1, sample_size=16))
    text = CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=1))
    return Components(unet.eval(), vae.eval(), text.eval(), load_tokenizer(None, pad="end"), ScheduleConfig(),
                      source_format="single_file", architecture="sd1")


# -- safetensors by hand ------------------------------------------------------------------------


def safetensors_bytes(header: dict | bytes, data: bytes, header_len: int | None = None) -> bytes:
    """8-byte little-endian header length + header + data; `header_len` may lie about the length."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def two_tensor_file() -> tuple[dict, bytes]:
    """(header, data) of a valid file: a = 2 float32, b = 3 int64."""
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "I64", "shape": [3], "data_offsets": [8, 32]},
    }
    data = struct.pack("<2f", 1.0, 2.0) + struct.pack("<3q", 1, 2, 3)
    return header, data


# -- zip archives by hand (torch's format is a plain zip) -------------------------------------------


def deflated_zeros(mebibytes: int) -> bytes:
    """A raw deflate stream of `mebibytes` MiB of zeros, built in milliseconds.

    After a full flush the compressor forgets its history, so every further MiB of zeros
    compresses to the same bytes: compress one block and repeat it (about 1 KiB per MiB).
    """
    zeros = bytes(1 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    return first + again * (mebibytes - 1) + c.flush()


def write_zip(path: Path, entries: list[tuple[str, bytes, int, int, int]]) -> None:
    """A zip of (name, bytes as stored, method, crc32, uncompressed size) entries, no zip64."""
    body, central = b"", b""
    for name, stored, method, crc, size in entries:
        fields = struct.pack("<HHHHHIIIHH", 20, 0, method, 0, 0x21, crc, len(stored), size, len(name), 0)
        central += struct.pack("<IH", 0x02014B50, 20) + fields + struct.pack("<HHHII", 0, 0, 0, 0, len(body))
        central += name.encode()
        body += struct.pack("<I", 0x04034B50) + fields + name.encode() + stored
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), len(body), 0)
    path.write_bytes(body + central + end)


def zip_entries_of_torch_save(obj, path: Path) -> list[tuple[str, bytes, int, int, int]]:
    """`torch.save(obj)` as write_zip entries (all stored, as torch writes them)."""
    import zipfile

    torch.save(obj, path)
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i), zipfile.ZIP_STORED, i.CRC, i.file_size) for i in z.infolist()]


# -- a pickle naming pytorch_lightning, saved without it ------------------------------------------------

LIGHTNING_MODULES = ("pytorch_lightning", "pytorch_lightning.callbacks",
                     "pytorch_lightning.callbacks.model_checkpoint")


def save_with_fake_lightning(build, path: Path) -> None:
    """torch.save(build(ModelCheckpoint)) with a fake pytorch_lightning importable only meanwhile."""
    assert not any(name in sys.modules for name in LIGHTNING_MODULES)
    modules = {name: types.ModuleType(name) for name in LIGHTNING_MODULES}
    cls = type("ModelCheckpoint", (), {"__module__": LIGHTNING_MODULES[-1]})
    modules[LIGHTNING_MODULES[-1]].ModelCheckpoint = cls
    sys.modules.update(modules)
    try:
        torch.save(build(cls), path)
    finally:
        for name in LIGHTNING_MODULES:
            del sys.modules[name]


# -- measuring a loader in a fresh process ------------------------------------------------------------


def run_measured(code: str, timeout: float = 60) -> tuple[str, int]:
    """Run `code` in a fresh interpreter; (its stdout, its peak resident memory in MiB).

    The peak is VmHWM from /proc: ru_maxrss survives exec, so a child of a big pytest process
    would report the parent's peak.
    """
    wrapped = textwrap.dedent(code) + textwrap.dedent("""
        import re
        status = open("/proc/self/status").read()
        print("PEAK_MIB", int(re.search(r"VmHWM:\\s+(\\d+) kB", status)[1]) // 1024)
    """)
    proc = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out, _, peak = proc.stdout.rpartition("PEAK_MIB ")
    return out, int(peak)
