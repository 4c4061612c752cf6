"""A `.ckpt` that inflates to gigabytes from a small file is refused before memory grows.

Protection: `io.check_zip_expansion` reads the zip central directory and refuses archives that
claim over 100x their size uncompressed (torch inflates a deflated `data.pkl` fully into memory;
its own saves are stored, about 1x). Storages whose pickled size lies are torch's own business
(mmap-ed slices and size checks); they are measured here too so a regression would show.
"""

import zipfile
import zlib

import pytest
import torch

from ldmkit.checkpoints import io
from ldmkit.errors import CheckpointError

from trust.forge import deflated_zeros, run_measured, write_zip, zip_entries_of_torch_save

BOMB_MIB = 1024  # what the bomb's data.pkl inflates to (about 1 MiB on disk)
PEAK_CAP_MIB = 700  # python + torch + ldmkit use about 250 MiB; inflating the bomb needs 2 GiB+


def _long1(n: int) -> bytes:
    """The pickle opcode LONG1 for `n` (replaces a small BININT1 size in torch's data.pkl)."""
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _with_pickle(entries, stored: bytes, method: int = zipfile.ZIP_STORED, size: int | None = None):
    """write_zip `entries` with data.pkl replaced by `stored` (inflating to `size` bytes).

    The CRC is of `stored`: right for stored records, wrong for the bomb, which a naive loader
    inflates in full before it could notice.
    """
    size = len(stored) if size is None else size
    return [(e[0], stored, method, zlib.crc32(stored), size) if e[0].endswith("/data.pkl") else e for e in entries]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """{label: path} of small files that would make a naive loader allocate gigabytes."""
    root = tmp_path_factory.mktemp("bombs")
    seven = {"w": torch.arange(7.0)}  # its data.pkl spells the storage size and shape as K\x07
    entries = zip_entries_of_torch_save(seven, root / "seven.ckpt")
    pickled = next(stored for name, stored, *_ in entries if name.endswith("/data.pkl"))
    # data.pkl deflated: a 1 MiB file that inflates to BOMB_MIB of zeros
    write_zip(root / "bomb.ckpt", _with_pickle(entries, deflated_zeros(BOMB_MIB), zlib.DEFLATED, BOMB_MIB << 20))
    # data.pkl claims a 2**40-element storage (and shape) for the 7 stored floats
    write_zip(root / "lying_zip.ckpt", _with_pickle(entries, pickled.replace(b"K\x07", _long1(1 << 40))))
    # the same lie in torch's legacy (pre-zip) format
    torch.save(seven, root / "legacy.ckpt", _use_new_zipfile_serialization=False)
    legacy = (root / "legacy.ckpt").read_bytes().replace(b"K\x07", _long1(1 << 31))
    (root / "lying_legacy.ckpt").write_bytes(legacy)
    return {label: root / f"{label}.ckpt" for label in ("bomb", "lying_zip", "lying_legacy")}


def test_hostile_files_are_refused_with_bounded_memory(hostile):
    """All three in one fresh process: each gives a CheckpointError, peak RSS stays under the cap."""
    paths = {label: str(path) for label, path in hostile.items()}
    out, peak = run_measured(f"""
        from ldmkit.checkpoints import io
        from ldmkit.errors import CheckpointError
        for label, path in {paths!r}.items():
            try:
                io.load_pickle(path)
                print(label, "LOADED")
            except CheckpointError as e:
                print(label, "REFUSED", e)
    """)
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert all(v.startswith("REFUSED") for v in lines.values()), out
    assert "bomb.ckpt: zip records claim" in lines["bomb"] and "zip bomb" in lines["bomb"]
    assert peak < PEAK_CAP_MIB, f"peak RSS {peak} MiB while loading hostile files"


def test_bomb_is_refused_from_the_central_directory_alone(hostile):
    """The refusal names the file and the claim; torch never opens the archive."""
    with pytest.raises(CheckpointError, match=r"bomb\.ckpt: zip records claim 10737\d+ bytes uncompressed"):
        io.check_zip_expansion(hostile["bomb"])


def test_damaged_zip_is_one_clear_error(tmp_path):
    path = tmp_path / "cut.ckpt"
    torch.save({"w": torch.zeros(3)}, path)
    path.write_bytes(path.read_bytes()[:200])  # the zip magic survives, the central directory not
    with pytest.raises(CheckpointError, match=r"cut\.ckpt: damaged zip archive"):
        io.load_pickle(path)


def test_real_torch_saves_pass_the_expansion_check(tmp_path, tiny_state_dict):
    torch.save({"state_dict": tiny_state_dict}, tmp_path / "real.ckpt")
    io.check_zip_expansion(tmp_path / "real.ckpt")
    assert set(io.read_state_dict(tmp_path / "real.ckpt")) == set(tiny_state_dict)
