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
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"

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
    """All tensors of a `.safetensors` file (memory-mapped reading, CPU tensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = check_readable_file(path)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored in a `.safetensors` header ({} when none)."""
    from safetensors import SafetensorError, safe_open

    path = check_readable_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None


_GLOBAL_IN_ERROR = re.compile(r"GLOBAL ([\w.]+)")


def load_pickle(path: str | Path) -> object:
    """Unpickle a legacy torch file with `weights_only=True` and ldmkit's small allow-list.

    Memory-mapped when the file is in torch's zip format (all files since torch 1.6); older
    tar/raw formats are read without mmap, still weights_only.
    """
    path = check_readable_file(path)
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


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` file or a legacy `.ckpt`/`.bin`/`.pt` (see `load_pickle`)."""
    path = check_readable_file(path)
    if _is_safetensors(path):
        return read_safetensors(path)
    return state_dict_from_object(load_pickle(path), path)


# -- writing ----------------------------------------------------------------------------------


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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=dict(metadata) if metadata else None)
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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
