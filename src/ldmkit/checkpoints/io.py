"""Reading and writing tensor files safely.

- safetensors (`.safetensors`): read with `safetensors.torch.load_file` (memory-mapped; tensors
  are materialised one at a time), written atomically (temp file in the same folder, then
  `os.replace`), with optional string metadata.
- legacy pickles (`.ckpt`, `.bin`, `.pt`, `.pth`): ONLY `torch.load(weights_only=True,
  mmap=True)`. Never `weights_only=False`: a pickle can run any code when it is loaded.

Legitimate Stable Diffusion `.ckpt` files (PyTorch Lightning saves) hold more than tensors:

- `global_step`, sometimes a numpy scalar: `numpy.core.multiarray.scalar` + `numpy.dtype` +
  a `numpy.dtypes.*DType` class. These are allowed by their real objects (numpy is a torch
  dependency here), under both the numpy 1.x (`numpy.core`) and 2.x (`numpy._core`) names.
- `callbacks`, keyed by Lightning callback *classes* (e.g.
  `pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`). pytorch_lightning need not be
  installed: torch's weights_only unpickler resolves a global by the name registered with
  `torch.serialization.safe_globals([(obj, "module.Name")])` before importing anything, so we
  register inert stand-in classes (`LightningStub` subclasses) under those exact names. A stub
  can be used as a dict key or instantiated and given state (a plain `__dict__` update), but has
  no behaviour. The allow-list is applied with the `safe_globals` context manager, so torch's
  process-wide allow-list is left alone.

Anything else the unpickler meets raises CheckpointError naming the offending global.

Before any bytes reach a third-party parser, ldmkit checks what it can cheaply:

- safetensors: `read_safetensors_header` validates the raw header (length, UTF-8 JSON, every
  tensor's dtype, shape and byte range against the file's size), so a damaged or hostile file gets
  one clear CheckpointError instead of whatever the safetensors library says.
- zip-format pickles: `check_zip_expansion` reads the zip central directory and refuses archives
  whose records would inflate far beyond the file (a zip bomb); torch stores its records
  uncompressed, so a legitimate checkpoint expands about 1x.
- weights: `check_finite` refuses NaN/Inf weights by name when a model is built (loading.py).
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"
ZIP_MAGIC = b"PK\x03\x04"  # how torch tells its zip format from the legacy pickle formats
SAFETENSORS_MAX_HEADER = 100_000_000  # bytes; the safetensors library's own limit
MAX_ZIP_EXPANSION = 100  # a zip may claim at most this many times its size (+1 MiB) uncompressed
_ZIP_SLACK = 1 << 20  # lets tiny checkpoints (small records compress well) through the ratio

# Bytes per element of the safetensors dtypes that torch can hold.
SAFETENSORS_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}

# Callback classes found in SD-era Lightning checkpoints, by their pickled name.
LIGHTNING_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.lr_monitor.LearningRateMonitor",
    "pytorch_lightning.callbacks.progress.TQDMProgressBar",
    "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
)


class LightningStub:
    """Inert stand-in for a PyTorch Lightning class named in a checkpoint (never imported)."""

    _pickled_name = "pytorch_lightning.<unknown>"

    def __repr__(self) -> str:
        return f"<stub of {self._pickled_name}>"


def _stub(name: str) -> type:
    return type(name.rsplit(".", 1)[1], (LightningStub,), {"_pickled_name": name})


_LIGHTNING_STUBS = {name: _stub(name) for name in LIGHTNING_GLOBALS}


def _numpy_globals() -> list:
    """numpy scalar reconstruction: the scalar function, np.dtype, and every DType class."""
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    out: list = [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
                 np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return out


def allowed_globals() -> list:
    """What the weights_only unpickler may meet beyond tensors (see the module docstring)."""
    return _numpy_globals() + [(cls, name) for name, cls in _LIGHTNING_STUBS.items()]


# -- helpers ----------------------------------------------------------------------------------


def check_readable_file(path: str | Path) -> Path:
    """`path` as a Path if it is a real weights file; a git-lfs pointer or missing file raises."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    if path.stat().st_size < 1024:
        with open(path, "rb") as f:
            if f.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX:
                raise CheckpointError(
                    f"{path}: is a git-lfs pointer, not the weights (run `git lfs pull` to fetch them)"
                )
    return path


def _is_safetensors(path: Path) -> bool:
    if path.suffix in SAFETENSORS_SUFFIXES:
        return True
    if path.suffix in PICKLE_SUFFIXES:
        return False
    raise CheckpointError(
        f"{path}: unknown weights file type {path.suffix!r} "
        f"(expected one of {', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)})"
    )


# -- reading ----------------------------------------------------------------------------------


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a `.safetensors` file (memory-mapped reading, CPU tensors).

    The header is validated first (`read_safetensors_header`), so the library only sees sound files.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = check_readable_file(path)
    read_safetensors_header(path)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored in a `.safetensors` header ({} when none)."""
    return dict(read_safetensors_header(path).get("__metadata__") or {})


class _Invalid(Exception):
    """A defect found in a safetensors header; `read_safetensors_header` adds the file's name."""


def read_safetensors_header(path: str | Path) -> dict:
    """The JSON header of a `.safetensors` file, checked against the format and the file's size.

    Layout: an 8-byte little-endian length N, N bytes of UTF-8 JSON, then the data. The JSON is an
    object mapping each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
    into the data), plus an optional "__metadata__" of strings. Each byte range must hold exactly
    shape x dtype, and the ranges must tile the data: no gap, no overlap, nothing past the end and
    nothing after the last tensor. Any defect raises one CheckpointError naming the file.
    """
    path = check_readable_file(path)
    try:
        header, data_len = _parse_safetensors_header(path)
        ranges = {
            name: _tensor_range(name, entry, data_len)
            for name, entry in header.items() if name != "__metadata__"
        }
        _check_tiling(ranges, data_len)
        _check_metadata(header.get("__metadata__"))
    except _Invalid as e:
        raise CheckpointError(f"{path}: not a valid safetensors file: {e}") from None
    return header


def _parse_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header JSON object, number of data bytes after it)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _Invalid(f"only {size} bytes, too short to hold the 8-byte header length")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > SAFETENSORS_MAX_HEADER:
            raise _Invalid(f"header length {header_len} is over the {SAFETENSORS_MAX_HEADER}-byte limit")
        if 8 + header_len > size:
            raise _Invalid(f"header length {header_len} runs past the end of the {size}-byte file")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError:
        raise _Invalid("header is not UTF-8 text") from None
    except (ValueError, RecursionError) as e:  # json.JSONDecodeError is a ValueError
        raise _Invalid(f"header is not JSON ({_first_line(e)})") from None
    if not isinstance(header, dict):
        raise _Invalid(f"header is a JSON {type(header).__name__}, not an object")
    return header, size - 8 - header_len


def _no_duplicate_keys(pairs: list) -> dict:
    # json.loads keeps the last of repeated keys silently; a repeated tensor name is a defect.
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        repeated = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Invalid(f"header names {_clip(repeated)} twice")
    return out


def _tensor_range(name: str, entry: object, data_len: int) -> tuple[int, int]:
    """The (begin, end) data bytes of one header entry, after checking it against its shape."""
    name = _clip(name)
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _Invalid(f"tensor {name}: entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_SIZES:
        raise _Invalid(f"tensor {name}: unsupported dtype {_clip(dtype)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _Invalid(f"tensor {name}: shape {_clip(shape)} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise _Invalid(f"tensor {name}: data_offsets {_clip(offsets)} is not [begin, end]")
    begin, end = offsets
    if begin > end:
        raise _Invalid(f"tensor {name}: data_offsets {_clip(offsets)} end before they begin")
    if end > data_len:
        raise _Invalid(f"tensor {name}: data ends at byte {_clip(end)} but only {data_len} data bytes follow "
                       "the header (truncated file?)")
    nbytes = _nbytes(shape, SAFETENSORS_DTYPE_SIZES[dtype], limit=data_len)
    if nbytes != end - begin:
        need = "more bytes than the file holds" if nbytes is None else f"{nbytes} bytes"
        raise _Invalid(f"tensor {name}: shape {_clip(shape)} of {dtype} needs {need}, but its data_offsets "
                       f"span {end - begin}")
    return begin, end


def _clip(value: object, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters: hostile headers hold megabyte-long names and shapes."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _nbytes(shape: list[int], itemsize: int, limit: int) -> int | None:
    """prod(shape) * itemsize, or None once it exceeds `limit` (absurd shapes stop early)."""
    if 0 in shape:
        return 0
    total = itemsize
    for d in shape:
        total *= d
        if total > limit:
            return None
    return total


def _check_tiling(ranges: dict[str, tuple[int, int]], data_len: int) -> None:
    """The byte ranges must cover [0, data_len) exactly once, in some order."""
    at, previous = 0, None
    for name, (begin, end) in sorted(ranges.items(), key=lambda item: item[1]):
        if begin < at:
            raise _Invalid(f"tensors {_clip(previous)} and {_clip(name)} overlap (data_offsets)")
        if begin > at:
            raise _Invalid(f"bytes {at}..{begin} before tensor {_clip(name)} belong to no tensor")
        at, previous = end, name
    if at != data_len:
        raise _Invalid(f"{data_len - at} trailing bytes after the last tensor")


def _check_metadata(metadata: object) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _Invalid("__metadata__ must map strings to strings")


_GLOBAL_IN_ERROR = re.compile(r"GLOBAL ([\w.]+)")


def load_pickle(path: str | Path) -> object:
    """Unpickle a legacy torch file with `weights_only=True` and ldmkit's small allow-list.

    Memory-mapped when the file is in torch's zip format (all files since torch 1.6); older
    tar/raw formats are read without mmap, still weights_only.
    """
    path = check_readable_file(path)
    check_zip_expansion(path)
    with torch.serialization.safe_globals(allowed_globals()):
        try:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
            message = str(e)
            found = _GLOBAL_IN_ERROR.search(message)
            if found or "weights_only" in message.lower():
                name = found[1] if found else _unsafe_global_names(path)
                raise CheckpointError(
                    f"{path}: refused to unpickle global {name} (not on ldmkit's allow-list of "
                    "tensor/numpy/Lightning names; the file may run code when loaded)"
                ) from None
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({_first_line(e)})") from None


def check_zip_expansion(path: Path) -> None:
    """Refuse a zip-format checkpoint whose records claim far more bytes than the file holds.

    torch inflates a compressed record (such as `data.pkl`) fully into memory before reading it,
    so a few megabytes of deflated zeros can claim gigabytes: a zip bomb. torch's own saves store
    every record uncompressed, so a real checkpoint claims about its own size. Only the central
    directory is read; legacy (non-zip) pickles are left to torch.
    """
    with open(path, "rb") as f:
        if f.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
            return
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            claimed = sum(info.file_size for info in archive.infolist())
    # what zipfile raises on damaged directories (NotImplementedError: an impossible zip version)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, struct.error) as e:
        raise CheckpointError(f"{path}: damaged zip archive ({_first_line(e)})") from None
    if claimed > MAX_ZIP_EXPANSION * size + _ZIP_SLACK:
        raise CheckpointError(
            f"{path}: zip records claim {claimed} bytes uncompressed from a {size}-byte file "
            f"(over {MAX_ZIP_EXPANSION}x; refused as a possible zip bomb)"
        )


def _unsafe_global_names(path: Path) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        return "<unknown>"
    allowed = {item[1] for item in allowed_globals() if isinstance(item, tuple)}
    return ", ".join(n for n in names if n not in allowed) or "<unknown>"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def state_dict_from_object(obj: object, path: str | Path) -> dict[str, torch.Tensor]:
    """The tensor dict inside an unpickled checkpoint: itself, or its `state_dict` entry."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: contains no tensors")
    return tensors


def check_finite(state: Mapping[str, torch.Tensor], source: str, what: str) -> None:
    """Raise one CheckpointError naming the floating-point tensors that hold NaN or Inf.

    Such weights load silently and only show up later as black or noise images, so they are
    refused at load time. One `aminmax` pass per tensor (NaN propagates to both ends, an Inf shows
    at one; no tensor-sized temporary, a tenth of `isfinite().all()`'s time); counts only for the
    bad ones.
    """
    bad = [(k, v) for k, v in state.items() if v.is_floating_point() and not _all_finite(v)]
    if bad:
        named = [f"{k} ({int((~torch.isfinite(v)).sum())} of {v.numel()} values)" for k, v in bad[:3]]
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise CheckpointError(
            f"{source}: {what} has NaN/Inf weights in {len(bad)} tensor(s): {', '.join(named)}{more}"
        )


def _all_finite(t: torch.Tensor) -> bool:
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` file or a legacy `.ckpt`/`.bin`/`.pt` (see `load_pickle`)."""
    path = check_readable_file(path)
    if _is_safetensors(path):
        return read_safetensors(path)
    return state_dict_from_object(load_pickle(path), path)


# -- writing ----------------------------------------------------------------------------------


def temp_file_beside(path: Path) -> tuple[int, str]:
    """A hidden temp file in `path`'s folder (so the final rename is atomic), with the permissions
    a plain open() would give: mkstemp makes owner-only files, which the rename would keep."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, default_file_mode())
    return fd, tmp


def default_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Write `state_dict` to `path` atomically: a temp file in the same folder, then os.replace.

    Tensors that share storage are written as separate contiguous copies one at a time.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    tensors = _unshare(tensors)
    fd, tmp = temp_file_beside(path)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=dict(metadata) if metadata else None)
        os.chmod(tmp, default_file_mode())  # save_file writes a file of its own in tmp's place
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory: clone all but the first of each group."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in tensors.items():
        key = (v.untyped_storage().data_ptr(), v.untyped_storage().nbytes())
        if v.numel() and key in seen:
            v = v.clone()
        elif v.numel():
            seen.add(key)
        out[k] = v
    return out


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a small text file (a JSON config) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
