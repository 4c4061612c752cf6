"""One trainer for every stage: AdamW, warm-up + cosine learning rate, EMA weights, gradient
accumulation, clipping, bf16/fp16 autocast, atomic checkpoints with exact resume, TensorBoard
scalars, sample grids, and data parallelism under `torchrun`.

A stage (see `stages.py`) supplies the model, the data and the loss; the trainer owns the loop.

Reproducibility without shared RNG state: every random number a loss draws comes from
`RowRandom`, one generator per *global row* of the step's batch, seeded by (seed, step, row).
So a step's randomness is the same whether the batch runs in one piece, in accumulated
micro-batches or spread over ranks, and a resumed run draws exactly what the uninterrupted
run would have drawn. The data order is a seeded permutation per epoch; the data position is
(epoch, offset), saved with the checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ..errors import InvalidArgument, LdmkitError, check_choice
from ..pipelines.output import save_png
from .tensorboard import EventWriter

PRECISIONS = ("fp32", "bf16", "fp16")
CHECKPOINT_RE = re.compile(r"^step-(\d{8})\.pt$")


class TrainingError(LdmkitError):
    """Training cannot go on: divergence, a checkpoint that cannot be written or resumed."""


@dataclass(frozen=True)
class TrainConfig:
    """How to optimise; what to optimise comes from the stage."""

    steps: int = 1000  # optimizer steps
    batch_size: int = 64  # global batch per optimizer step (all ranks, all micro-batches)
    micro_batch_size: int | None = None  # rows per forward pass on one rank; None: the whole share
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    warmup_steps: int = 100  # linear warm-up from 0 to lr
    min_lr_ratio: float = 0.0  # the cosine decays to lr * min_lr_ratio at the last step
    ema_decay: float | None = 0.999  # EMA of the weights (with 1 + step / 10 + step warm-up); None: off
    grad_clip: float | None = 1.0  # clip the global gradient norm; None: off
    precision: str = "fp32"  # "fp32", "bf16" (autocast, CPU or CUDA) or "fp16" (autocast + scaler, CUDA)
    # conv weights, hence activations, stored NHWC: oneDNN's convolutions run faster that way (the
    # bundled U-Net's fp32 step: 0.158 s against 0.180 s); models without convolutions are unchanged
    channels_last: bool = True
    seed: int = 0  # seeds the initial weights, the data order and every row's noise
    checkpoint_every: int = 500  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    sample_every: int = 0  # steps between sample grids; 0: only at the end
    log_every: int = 10  # steps between TensorBoard scalars

    def __post_init__(self) -> None:
        check_choice("precision", self.precision, PRECISIONS)
        object.__setattr__(self, "betas", tuple(self.betas))
        for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise InvalidArgument(f"micro_batch_size must be at least 1, got {self.micro_batch_size}")
        if not self.lr > 0:
            raise InvalidArgument(f"lr must be positive, got {self.lr}")


class Stage(Protocol):
    """What the trainer needs from a stage."""

    name: str
    model: nn.Module  # the trainable network (EMA and checkpoints follow it)

    def __len__(self) -> int: ...  # rows of training data

    def batch(self, indices: list[int]) -> dict: ...  # the rows at these data indices

    def loss(self, model: nn.Module, batch: dict, rand: RowRandom) -> tuple[torch.Tensor, dict]:
        """Per-row losses (B,) (or a scalar mean over the micro-batch) and extra scalars to log."""
        ...

    def sample(self, model: nn.Module, step: int):  # a PIL image to look at, or None
        ...


# -- randomness and data order -----------------------------------------------------------------


class RowRandom:
    """Random numbers for the rows of one step, each row from its own generator (see module doc)."""

    def __init__(self, seed: int, step: int, rows: list[int], device: torch.device | str = "cpu") -> None:
        self.generators = [torch.Generator().manual_seed(_mix(seed, step, row)) for row in rows]
        self.device = device

    def randn(self, *shape: int) -> torch.Tensor:
        """(B, *shape) standard normal."""
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators]).to(self.device)

    def rand(self) -> torch.Tensor:
        """(B,) uniform in [0, 1)."""
        return torch.cat([torch.rand(1, generator=g) for g in self.generators]).to(self.device)

    def randint(self, high: int) -> torch.Tensor:
        """(B,) integers in [0, high)."""
        return torch.cat([torch.randint(high, (1,), generator=g) for g in self.generators]).to(self.device)


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (splitmix64-style), so nearby inputs give unrelated seeds."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


@dataclass
class DataOrder:
    """A seeded permutation of the data per epoch, walked batch by batch; (epoch, offset) is the state."""

    size: int
    seed: int
    epoch: int = 0
    offset: int = 0
    _perm: torch.Tensor | None = field(default=None, repr=False)

    def _permutation(self) -> torch.Tensor:
        if self._perm is None:
            self._perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(_mix(self.seed, self.epoch)))
        return self._perm

    def next_batch(self, n: int) -> list[int]:
        indices: list[int] = []
        while len(indices) < n:
            take = min(n - len(indices), self.size - self.offset)
            indices += self._permutation()[self.offset:self.offset + take].tolist()
            self.offset += take
            if self.offset == self.size:
                self.epoch, self.offset, self._perm = self.epoch + 1, 0, None
        return indices

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset, self._perm = int(state["epoch"]), int(state["offset"]), None


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up to 1, then a half cosine down to `min_lr_ratio` at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# -- distributed helpers -----------------------------------------------------------------------


def world() -> tuple[int, int]:
    """(rank, world size): from torch.distributed once initialised, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> None:
    """Join the process group `torchrun` describes (gloo on CPU, NCCL on CUDA); no-op when alone."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2 or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def finish_distributed() -> None:
    """Leave the process group once every rank is done; no-op when alone. A rank that exits with
    the group still open can close its sockets while another rank still reads them, and gloo then
    aborts that rank (SIGABRT) after a run that succeeded."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# -- checkpoints -------------------------------------------------------------------------------


def checkpoint_paths(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first (temp files of interrupted saves ignored)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name)[1]))


def save_checkpoint_atomic(state: dict, path: Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename: a reader sees the old
    file or the complete new one, never a partial one. A failed write (full disk) leaves the
    previous checkpoints untouched and raises TrainingError."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise TrainingError(f"could not write checkpoint {path} ({e.strerror or e}); the previous checkpoint is kept") from None


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by `save_checkpoint_atomic`, read without unpickling code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise TrainingError(f"cannot resume: checkpoint {path} is unreadable ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise TrainingError(f"cannot resume: {path} is not an ldmkit training checkpoint")
    return state


# -- the trainer -------------------------------------------------------------------------------


class Trainer:
    """Runs `config.steps` optimizer steps of `stage` and writes everything under `run_dir`:

        run_dir/config.json            the stage name and TrainConfig
        run_dir/checkpoints/step-*.pt  model, EMA, optimizer, LR schedule, RNG, data position
        run_dir/samples/step-*.png     sample grids (with parameters embedded)
        run_dir/events.out.tfevents.*  TensorBoard scalars: loss, lr, grad norm, it/s
    """

    def __init__(self, stage: Stage, config: TrainConfig, run_dir: str | Path, device: str | torch.device = "cpu",
                 progress: bool = True, label: str | None = None) -> None:
        self.stage, self.config = stage, config
        self.label = label or stage.name  # the progress bar's name: a stage may train twice (a warm restart)
        self.run_dir = Path(run_dir)
        self.device = torch.device(device)
        self.rank, self.world_size = world()
        self.progress = progress and self.rank == 0
        if config.batch_size % self.world_size:
            raise InvalidArgument(f"batch_size {config.batch_size} is not divisible by {self.world_size} processes")
        if config.precision == "fp16" and self.device.type != "cuda":
            raise InvalidArgument("fp16 training needs CUDA; use bf16 on a CPU")
        memory_format = torch.channels_last if config.channels_last else torch.preserve_format
        self.model = stage.model.to(self.device, memory_format=memory_format)
        self.ema = None
        if config.ema_decay is not None:
            self.ema = _frozen_copy(self.model)
        self.parallel = self.model
        if self.world_size > 1:
            self.parallel = nn.parallel.DistributedDataParallel(self.model)
        decay, no_decay = _param_groups(self.model)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=config.betas,
            fused=self.device.type in ("cpu", "cuda"),  # one kernel for all tensors: ~6% of a small model's step
        )
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, config))
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.precision == "fp16")
        self.order = DataOrder(len(stage), config.seed)
        self.step = 0
        self.history: list[float] = []  # loss per step (the global batch's mean)
        torch.manual_seed(_mix(config.seed, 1))  # dropout and other global-RNG users; saved with checkpoints

    # -- state ---------------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def state_dict(self) -> dict:
        return {
            "stage": self.stage.name,
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "data": self.order.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "history": torch.tensor(self.history, dtype=torch.float64),
            "config": json.dumps(asdict(self.config)),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("stage") != self.stage.name:
            raise TrainingError(f"cannot resume: the checkpoint is of stage {state.get('stage')!r}, not {self.stage.name!r}")
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.order.load_state_dict(state["data"])
        torch.set_rng_state(state["torch_rng"])
        self.history = state["history"].tolist()
        self.step = int(state["step"])

    def resume(self) -> None:
        """Continue from the newest complete checkpoint; none, or an unreadable one, is an error
        (never a silent fresh start)."""
        paths = checkpoint_paths(self.checkpoint_dir)
        if not paths:
            raise TrainingError(f"cannot resume: no checkpoint in {self.checkpoint_dir}")
        self.load_state_dict(load_checkpoint(paths[-1]))

    def save_checkpoint(self) -> Path | None:
        if self.rank != 0:
            return None
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = self.checkpoint_dir / f"step-{self.step:08d}.pt"
        save_checkpoint_atomic(self.state_dict(), path)
        for old in checkpoint_paths(self.checkpoint_dir)[:-self.config.keep_checkpoints]:
            old.unlink(missing_ok=True)
        return path

    def _clean_partial_saves(self) -> None:
        if self.rank == 0 and self.checkpoint_dir.is_dir():
            for tmp in self.checkpoint_dir.glob(".step-*.pt.tmp"):
                tmp.unlink(missing_ok=True)

    # -- the loop ------------------------------------------------------------------------------

    def train(self) -> nn.Module:
        """Train to `config.steps`; returns the EMA model (or the model when EMA is off)."""
        self._clean_partial_saves()
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(
                json.dumps({"stage": self.stage.name, **asdict(self.config)}, indent=2) + "\n")
        writer = EventWriter(self.run_dir) if self.rank == 0 else None
        bar = tqdm(total=self.config.steps, initial=self.step, desc=f"training {self.label}",
                   unit="step", disable=not self.progress)
        try:
            while self.step < self.config.steps:
                started = time.perf_counter()
                loss, logs = self._one_step()
                self.step += 1
                self.history.append(loss)
                bar.update()
                bar.set_postfix(loss=f"{loss:.4f}")
                if writer is not None and (self.step % self.config.log_every == 0 or self.step == self.config.steps):
                    scalars = {"loss": loss, "lr": self.lr_schedule.get_last_lr()[0],
                               "steps_per_s": 1 / (time.perf_counter() - started), **logs}
                    for tag, value in scalars.items():
                        writer.scalar(f"{self.stage.name}/{tag}", value, self.step)
                    writer.flush()
                if self.step % self.config.checkpoint_every == 0 or self.step == self.config.steps:
                    self.save_checkpoint()
                if self.step == self.config.steps or (self.config.sample_every and self.step % self.config.sample_every == 0):
                    self._save_samples()
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        return self.ema if self.ema is not None else self.model

    def _one_step(self) -> tuple[float, dict]:
        """One optimizer step over the global batch: this rank's share, in micro-batches."""
        cfg = self.config
        rows = self.order.next_batch(cfg.batch_size)  # the same list on every rank
        share = list(range(self.rank, cfg.batch_size, self.world_size))  # global row numbers of this rank
        micro = cfg.micro_batch_size or len(share)
        chunks = [share[i:i + micro] for i in range(0, len(share), micro)]
        self.optimizer.zero_grad(set_to_none=True)
        total, logs = torch.zeros((), dtype=torch.float64), {}
        for k, chunk in enumerate(chunks):
            batch = _to_device(self.stage.batch([rows[r] for r in chunk]), self.device)
            rand = RowRandom(cfg.seed, self.step, chunk, self.device)
            sync = k == len(chunks) - 1 or self.world_size == 1
            with (contextlib.nullcontext() if sync else self.parallel.no_sync()), self._autocast():
                per_row, logs = self.stage.loss(self.parallel, batch, rand)
                # sum over rows / global batch, times world size because DDP averages gradients
                weight = self.world_size / cfg.batch_size
                loss = per_row.float().sum() * weight if per_row.ndim else per_row.float() * len(chunk) * weight
            self.scaler.scale(loss).backward()
            total += loss.detach().double().cpu() / self.world_size
        if self.world_size > 1:
            dist.all_reduce(total)
        if not torch.isfinite(total):
            raise TrainingError(
                f"training diverged at step {self.step + 1} (loss is {total.item()}); the weights were not "
                f"saved; the last good checkpoint is in {self.checkpoint_dir} (lower --lr or use fp32)"
            )
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_schedule.step()
        self._update_ema()
        return total.item(), {**{k: float(v) for k, v in logs.items()}, "grad_norm": float(grad_norm)}

    def _autocast(self):
        if self.config.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        decay = min(self.config.ema_decay, (1 + self.step) / (10 + self.step))
        torch._foreach_lerp_(list(self.ema.parameters()), [p.detach() for p in self.model.parameters()], 1 - decay)
        for b_ema, b in zip(self.ema.buffers(), self.model.buffers()):
            b_ema.copy_(b)

    def _save_samples(self) -> None:
        if self.rank != 0:
            return
        model = self.ema if self.ema is not None else self.model
        was_training = model.training
        model.eval()
        image = self.stage.sample(model, self.step)
        model.train(was_training)
        if image is not None:
            save_png(image, self.run_dir / "samples" / f"step-{self.step:08d}.png",
                     {"stage": self.stage.name, "step": self.step, "seed": self.config.seed})


def _frozen_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).requires_grad_(False).eval()


def _param_groups(model: nn.Module) -> tuple[list, list]:
    """Weight decay on matrices and conv kernels only, not on biases, norms and embeddings' 1-D tensors."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return decay, no_decay


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
