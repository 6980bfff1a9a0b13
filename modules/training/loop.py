"""The training loop shared by pre-training and main training.

One loop runs on one CPU or GPU, on several GPUs and on several machines:
launched by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) it joins the process group with
``init_method="env://"`` (NCCL on GPUs, gloo on CPUs) and wraps the adapter in
``DistributedDataParallel``. There is no launcher of our own.

Batches
-------
``batch_size`` is the *global* number of samples per optimizer step. It is
split into ``grad_accum`` micro-batches on each of ``world_size`` ranks, so a
rank computes ``batch_size / (grad_accum · world_size)`` samples at a time.
Which samples form step s depends only on the seed and s (:class:`BatchSchedule`:
one permutation of the dataset per epoch, seeded by (seed, epoch), the
DistributedSampler idea), and every random draw a sample needs (noise,
timestep) comes from a generator seeded by (seed, step, slot in the global
batch) (:func:`sample_generator`). Hence

* one process with the whole batch and N processes each with a share give the
  same update (up to float summation order);
* resuming at step k continues exactly as the uninterrupted run.

Each rank's loss is ``sum(per-sample losses) · world_size / batch_size``:
DDP averages gradients over ranks, so the update is the gradient of the mean
loss over the global batch whatever the split. Micro-batches before the last
one run under ``DDP.no_sync()``; the last one synchronises the accumulated
gradients. ``find_unused_parameters=True`` because a batch only runs the
experts its concepts route to; an expert no rank used keeps ``grad=None`` and
AdamW leaves it alone, as in a single process.

Checkpoints (every ``save_every`` steps, in ``OUT/checkpoint-<step>/``)
------------------------------------------------------------------------
* ``adapter.safetensors``: the adapter checkpoint format
  (:func:`.checkpoint.save_adapter_checkpoint`) with the router centroids and
  a training summary (stage, steps, loss, dataset, lr, ...);
* ``adapter-ema.safetensors``: the EMA weights, when EMA is on;
* ``training_state.safetensors`` + ``training_state.json``: optimizer,
  scheduler, step, data position, run settings (:mod:`.state`, no pickle);
  the JSON is written last, so its presence marks a complete checkpoint;
* ``rng-rank<r>.safetensors`` + ``.json``: each rank's torch CPU/CUDA, python
  ``random`` and numpy RNG states.

Next to them: ``losses.csv`` (step, epoch, loss, lr, grad norm, throughput)
and ``losses.png`` (the curves), and the final ``adapter.safetensors``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import math
import os
import re
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..adapter import ModAdapter
from ..atomic_file import atomic_replace
from ..checkpoint import load_adapter_checkpoint, save_adapter_checkpoint
from ..curve_plot import Panel, loss_panel, render_panels
from ..devices import resolve_device
from ..dtypes import auto_dtype
from ..errors import ModAdapterError
from .state import (
    RNG_FORMAT,
    TrainingStateError,
    capture_rng_state,
    load_optimizer_state,
    load_state_files,
    restore_rng_state,
    save_state_files,
)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_STEM = "training_state"
ADAPTER_FILE = "adapter.safetensors"
EMA_FILE = "adapter-ema.safetensors"
CSV_FILE = "losses.csv"
PLOT_FILE = "losses.png"
CSV_FIELDS = ("step", "epoch", "loss", "lr", "grad_norm", "samples_per_second", "elapsed_seconds")


# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------


@dataclass
class LoopConfig:
    steps: int
    batch_size: int  # global samples per optimizer step
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine | linear (after warm-up)
    min_lr_ratio: float = 0.0  # floor of cosine/linear decay, as a fraction of lr
    max_grad_norm: Optional[float] = 1.0  # None: no clipping
    ema_decay: float = 0.0  # 0: no EMA
    seed: int = 0
    save_every: int = 1000
    keep_checkpoints: int = 3  # 0 keeps all
    validate_every: int = 0  # 0: no validation images
    stop_after_step: Optional[int] = None  # stop (with a checkpoint) after this step, as a preempted job would
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, none on CPU) | no | bf16
    progress: bool = True
    prefetch: bool = True  # load the next step's samples in a thread while this step computes

    def validate(self) -> None:
        problems = []
        for name in ("steps", "batch_size", "grad_accum", "save_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "keep_checkpoints", "validate_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                problems.append(f"--{name.replace('_', '-')} must be a non-negative integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"--lr must be a positive number, got {self.lr!r}")
        if not (0 <= self.weight_decay < 1):
            problems.append(f"--weight-decay must lie in [0, 1), got {self.weight_decay!r}")
        if not (0 <= self.ema_decay < 1):
            problems.append(f"--ema-decay must lie in [0, 1) (0 turns EMA off), got {self.ema_decay!r}")
        if self.lr_schedule not in ("constant", "cosine", "linear"):
            problems.append(f"--lr-schedule must be constant, cosine or linear, got {self.lr_schedule!r}")
        if not (0 <= self.min_lr_ratio <= 1):
            problems.append(f"--min-lr-ratio must lie in [0, 1], got {self.min_lr_ratio!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            problems.append(f"--max-grad-norm must be positive (or 0 for no clipping), got {self.max_grad_norm!r}")
        if self.mixed_precision not in ("auto", "no", "bf16"):
            problems.append(f"--mixed-precision must be auto, no or bf16, got {self.mixed_precision!r}")
        if self.stop_after_step is not None and not (1 <= self.stop_after_step):
            problems.append(f"--stop-after-step must be a positive step number, got {self.stop_after_step!r}")
        if problems:
            raise ModAdapterError("invalid training settings: " + "; ".join(problems))


# --------------------------------------------------------------------------
# Distributed context
# --------------------------------------------------------------------------


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def log(self, message: str) -> None:
        if self.is_main:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()
            self.initialized_here = False


def setup_distributed(device: str = "auto") -> DistributedContext:
    """Join the torchrun process group (env://) when ``WORLD_SIZE`` > 1; pick this rank's device.

    device: ``auto`` (this rank's GPU, ``cuda:LOCAL_RANK``, when CUDA is
    available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N`` (single process).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    resolved = resolve_device(device)
    if resolved.type not in ("cpu", "cuda"):
        raise ModAdapterError(f"--device must be auto, cpu, cuda or cuda:N for training, got {device!r}")
    if resolved.type == "cuda":
        # under torchrun each rank takes its own GPU; a single process takes the one named (or the first)
        index = local_rank if world_size > 1 or resolved.index is None else resolved.index
        torch.cuda.set_device(index)
        chosen = torch.device("cuda", index)
    else:
        chosen = torch.device("cpu")
    ctx = DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=chosen)
    if world_size > 1:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ModAdapterError(
                    f"WORLD_SIZE={world_size} but {name} is not set: launch multi-process training with torchrun "
                    f"(e.g. `torchrun --nproc-per-node 8 -m mod_adapter.cli train ...`)"
                )
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo", init_method="env://",
                                    world_size=world_size, rank=rank)
            ctx.initialized_here = True
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise ModAdapterError("the existing torch.distributed process group disagrees with RANK/WORLD_SIZE")
    return ctx


# --------------------------------------------------------------------------
# Data order and per-sample randomness
# --------------------------------------------------------------------------


def _mix(*parts: Any) -> int:
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode("ascii"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_generator(seed: int, step: int, slot: int) -> torch.Generator:
    """The CPU generator of one sample of one step: the same on every rank and device."""
    return torch.Generator(device="cpu").manual_seed(_mix("sample", seed, step, slot))


class BatchSchedule:
    """Which dataset records each rank trains on at each step.

    Every epoch is one permutation of the dataset seeded by (seed, epoch); step
    s takes the global batch ``order[i·B : (i+1)·B]`` of epoch ``s // steps_per_epoch``
    (incomplete tail batches are dropped). Slot j of the global batch belongs
    to micro-batch ``j // (world_size·micro)`` and rank ``(j // micro) % world_size``.
    """

    def __init__(self, num_samples: int, batch_size: int, grad_accum: int, world_size: int, rank: int, seed: int):
        per_micro = grad_accum * world_size
        if batch_size % per_micro:
            raise ModAdapterError(
                f"--batch-size {batch_size} must be divisible by --grad-accum ({grad_accum}) × the number of processes "
                f"({world_size}) = {per_micro}, so that every process computes whole micro-batches"
            )
        if num_samples < batch_size:
            raise ModAdapterError(f"the dataset has {num_samples} record(s), fewer than --batch-size {batch_size}")
        self.num_samples, self.batch_size, self.grad_accum = num_samples, batch_size, grad_accum
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.micro = batch_size // per_micro
        self.steps_per_epoch = num_samples // batch_size
        self._epoch: Optional[int] = None
        self._order: List[int] = []

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def position_of(self, step: int) -> int:
        """Index of step's batch within its epoch."""
        return step % self.steps_per_epoch

    def _order_for(self, epoch: int) -> List[int]:
        if self._epoch != epoch:
            generator = torch.Generator(device="cpu").manual_seed(_mix("order", self.seed, epoch))
            self._order = torch.randperm(self.num_samples, generator=generator).tolist()
            self._epoch = epoch
        return self._order

    def global_batch(self, step: int) -> List[int]:
        order = self._order_for(self.epoch_of(step))
        start = self.position_of(step) * self.batch_size
        return order[start : start + self.batch_size]

    def micro_batches(self, step: int) -> List[List[Tuple[int, int]]]:
        """This rank's micro-batches of ``step``: lists of (slot in the global batch, record index)."""
        batch = self.global_batch(step)
        out = []
        for a in range(self.grad_accum):
            first = (a * self.world_size + self.rank) * self.micro
            out.append([(slot, batch[slot]) for slot in range(first, first + self.micro)])
        return out


# --------------------------------------------------------------------------
# Optimizer, schedule, EMA
# --------------------------------------------------------------------------


def make_optimizer(parameters, cfg: LoopConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(parameters), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: LoopConfig) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.lr_schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: LoopConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


class ExponentialMovingAverage:
    """EMA of the trainable parameters, kept in float32: ``ema ← decay·ema + (1−decay)·θ``."""

    def __init__(self, parameters: Sequence[torch.nn.Parameter], decay: float):
        self.parameters = list(parameters)
        self.decay = float(decay)
        self.shadow = [p.detach().float().clone() for p in self.parameters]

    @torch.no_grad()
    def update(self) -> None:
        for shadow, p in zip(self.shadow, self.parameters):
            shadow.lerp_(p.detach().float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self):
        """Within the block, the parameters hold the EMA weights."""
        saved = [p.detach().clone() for p in self.parameters]
        with torch.no_grad():
            for shadow, p in zip(self.shadow, self.parameters):
                p.copy_(shadow.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for value, p in zip(saved, self.parameters):
                    p.copy_(value)

    def load_from(self, model: torch.nn.Module, named: Dict[str, torch.Tensor]) -> None:
        names = {id(p): n for n, p in model.named_parameters()}
        for i, p in enumerate(self.parameters):
            self.shadow[i] = named[names[id(p)]].detach().float().to(p.device).clone()


# --------------------------------------------------------------------------
# Losses CSV and plot
# --------------------------------------------------------------------------


class LossLog:
    """``losses.csv`` next to the checkpoints; on resume, rows after the resumed step are dropped."""

    def __init__(self, out_dir: str, resume_step: int = 0):
        self.path = os.path.join(out_dir, CSV_FILE)
        rows = read_loss_csv(self.path) if resume_step and os.path.isfile(self.path) else []
        rows = [r for r in rows if int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: row.get(k, "") for k in CSV_FIELDS})

    def append(self, row: Dict[str, Any]) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as handle:
            csv.DictWriter(handle, fieldnames=CSV_FIELDS).writerow({k: row.get(k, "") for k in CSV_FIELDS})


def read_loss_csv(path: str) -> List[Dict[str, str]]:
    with open(path, "r", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def plot_training_curves(csv_path: str, png_path: str, title: str = "Mod-Adapter training") -> None:
    """Draw the loss (raw and smoothed) and learning-rate curves of ``losses.csv`` into a PNG (PIL only)."""
    rows = read_loss_csv(csv_path)
    steps = [int(r["step"]) for r in rows]
    image = render_panels(
        [loss_panel(steps, [float(r["loss"]) for r in rows]),
         Panel("learning rate", steps, [[float(r["lr"]) for r in rows]], [(190, 80, 20)])],
        title,
        panel_height=235,  # 900×620 for the two panels
    )
    with atomic_replace(png_path) as temp_path:
        image.save(temp_path, format="PNG")


# --------------------------------------------------------------------------
# Checkpoint folders
# --------------------------------------------------------------------------


def checkpoint_dir(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"{CHECKPOINT_PREFIX}{step:08d}")


def list_checkpoints(out_dir: str) -> List[Tuple[int, str]]:
    """Complete checkpoints (step, folder) under ``out_dir``, oldest first."""
    found = []
    if os.path.isdir(out_dir):
        for name in os.listdir(out_dir):
            match = re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"(\d+)", name)
            folder = os.path.join(out_dir, name)
            if match and os.path.isfile(os.path.join(folder, STATE_STEM + ".json")):
                found.append((int(match.group(1)), folder))
    return sorted(found)


def resolve_resume_dir(path: str) -> str:
    """A checkpoint folder, or the latest complete checkpoint of a training output folder."""
    if os.path.isfile(os.path.join(path, STATE_STEM + ".json")):
        return path
    found = list_checkpoints(path)
    if not found:
        raise ModAdapterError(
            f"--resume {path}: no complete checkpoint there (a folder with {STATE_STEM}.json, or a training output "
            f"folder with {CHECKPOINT_PREFIX}<step>/ folders)"
        )
    return found[-1][1]


def read_resume_info(path: str) -> Dict[str, Any]:
    """The run settings stored in a checkpoint's training_state.json (cheap: no tensors loaded)."""
    import json

    folder = resolve_resume_dir(path)
    with open(os.path.join(folder, STATE_STEM + ".json"), "r", encoding="utf-8") as handle:
        info = json.load(handle)
    info.pop("state", None)
    info["folder"] = folder
    return info


# --------------------------------------------------------------------------
# The task interface and the loop
# --------------------------------------------------------------------------


class TrainingTask:
    """What a stage (pre-training, main training, a toy-world model) plugs into :func:`run_training`.

    ``adapter`` is the trainable network (on the device, float32 weights); a task
    that trains another network overrides :attr:`model` and the weight-file hooks.
    ``load_items`` prepares the samples of a micro-batch on the CPU (may run
    in a thread); ``per_sample_losses`` runs them and returns one float32 loss
    per sample, calling ``model`` (the adapter, possibly DDP-wrapped) for Δ.
    """

    stage = "train"
    adapter: ModAdapter
    dataset_size: int
    dataset_fingerprint: str = ""
    validation_on_all_ranks = False

    def load_items(self, items: List[Tuple[int, int]], step: int) -> Any:
        raise NotImplementedError

    def per_sample_losses(self, model: torch.nn.Module, prepared: Any, step: int) -> torch.Tensor:
        raise NotImplementedError

    def write_validation_images(self, step: int, out_dir: str, ctx: DistributedContext) -> None:
        """Write validation images (optional)."""

    def checkpoint_metadata(self) -> Dict[str, Any]:
        """``base_model``, ``image_encoder``, ``router_info`` and ``training`` extras for the adapter checkpoint."""
        raise NotImplementedError

    # The trainable network and its weight files. The defaults are the Mod-Adapter's (the adapter checkpoint
    # format); a task that trains another network (the toy world's models) overrides these four.
    weights_file = ADAPTER_FILE
    ema_weights_file = EMA_FILE

    @property
    def model(self) -> torch.nn.Module:
        return self.adapter

    def save_weights(self, path: str, summary: Dict[str, Any]) -> None:
        """Write the current weights of :attr:`model` to ``path``, with the training summary."""
        meta = self.checkpoint_metadata()
        save_adapter_checkpoint(path, self.adapter, training=summary, base_model=meta["base_model"],
                                image_encoder=meta["image_encoder"], router_info=meta["router_info"])

    def load_weights(self, path: str) -> Dict[str, torch.Tensor]:
        """The float32 weights (named as in :attr:`model`) of a file :meth:`save_weights` wrote."""
        loaded = load_adapter_checkpoint(path, dtype=torch.float32)
        if loaded.config != self.adapter.config:
            raise TrainingStateError(f"{path} has another adapter config than this run")
        return loaded.adapter.state_dict()

    def run_settings(self) -> Dict[str, Any]:
        """Settings that must not change across a resume (compared when resuming)."""
        return {}


@dataclass
class TrainingResult:
    steps_done: int
    losses: List[float]
    out_dir: str
    final_adapter: Optional[str]
    stopped_early: bool


class _StopFlag:
    """Set by SIGTERM/SIGINT: finish the step, save a checkpoint, stop (preemption-friendly)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def install(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError):
                pass

    def _handle(self, signum, frame) -> None:
        if self.requested:  # second signal: give up at once
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nsignal {signum}: finishing this step, saving a checkpoint, then stopping "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _autocast(cfg: LoopConfig, device: torch.device):
    mode = cfg.mixed_precision
    if mode == "auto":
        mode = "bf16" if auto_dtype(device) == torch.bfloat16 else "no"
    if mode == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _save_checkpoint(task: TrainingTask, cfg: LoopConfig, ctx: DistributedContext, out_dir: str, step: int,
                     optimizer, scheduler, ema: Optional[ExponentialMovingAverage], schedule: BatchSchedule,
                     last_loss: Optional[float]) -> str:
    folder = checkpoint_dir(out_dir, step)
    if ctx.is_main:
        os.makedirs(folder, exist_ok=True)
    ctx.barrier()
    os.makedirs(folder, exist_ok=True)  # other nodes without a shared file system
    save_state_files(folder, f"rng-rank{ctx.rank}", {"rank": ctx.rank, "world_size": ctx.world_size, "step": step},
                     {"rng": capture_rng_state()}, kind=RNG_FORMAT)
    ctx.barrier()
    if ctx.is_main:
        _save_weight_files(task, cfg, ctx, folder, step, last_loss, ema)
        info = {
            "stage": task.stage,
            "step": step,
            "epoch": schedule.epoch_of(step),
            "position_in_epoch": schedule.position_of(step),
            "samples_seen": step * cfg.batch_size,
            "world_size": ctx.world_size,
            "loop": _jsonable(dataclasses.asdict(cfg)),
            "run": task.run_settings(),
            "dataset_size": task.dataset_size,
            "dataset_fingerprint": task.dataset_fingerprint,
            "ema": ema is not None,
            "last_loss": last_loss,
        }
        save_state_files(folder, STATE_STEM, info, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})
        _plot_losses(task, out_dir)
        if cfg.keep_checkpoints:
            for _, old in list_checkpoints(out_dir)[: -cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()
    return folder


def _save_weight_files(task: TrainingTask, cfg: LoopConfig, ctx: DistributedContext, folder: str, step: int,
                       last_loss: Optional[float], ema: Optional[ExponentialMovingAverage]) -> None:
    """The task's weights (the adapter: ``adapter.safetensors``, and ``adapter-ema.safetensors`` with EMA) in
    ``folder``, with the training summary."""
    summary = _training_summary(task, cfg, ctx, step, last_loss, task.checkpoint_metadata().get("training", {}))
    task.save_weights(os.path.join(folder, task.weights_file), summary)
    if ema is not None:
        with ema.swapped_in():
            task.save_weights(os.path.join(folder, task.ema_weights_file),
                              dict(summary, ema_decay=cfg.ema_decay, weights="ema"))


def _plot_losses(task: TrainingTask, out_dir: str) -> None:
    csv_path = os.path.join(out_dir, CSV_FILE)
    if os.path.isfile(csv_path):
        plot_training_curves(csv_path, os.path.join(out_dir, PLOT_FILE), title=f"Mod-Adapter {task.stage}")


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _training_summary(task, cfg, ctx, step, last_loss, extra) -> Dict[str, Any]:
    return {
        "stage": task.stage,
        "steps": step,
        "loss": last_loss,
        "lr": cfg.lr,
        "lr_schedule": cfg.lr_schedule,
        "warmup_steps": cfg.warmup_steps,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "world_size": ctx.world_size,
        "seed": cfg.seed,
        "weight_decay": cfg.weight_decay,
        "ema_decay": cfg.ema_decay,
        "dataset": {"records": task.dataset_size, "fingerprint": task.dataset_fingerprint, **extra.pop("dataset", {})},
        **extra,
    }


_RESUME_MUST_MATCH = ("batch_size", "grad_accum", "seed")


def _resume_problems(info: Dict[str, Any], stage: str, cfg: LoopConfig, dataset_size: int, fingerprint: str,
                     run: Optional[Dict[str, Any]] = None) -> List[str]:
    problems = []
    if info.get("stage") != stage:
        problems.append(f"it is a {info.get('stage')!r} checkpoint, this is {stage!r}")
    loop = info.get("loop", {})
    for key in _RESUME_MUST_MATCH:
        if loop.get(key) != getattr(cfg, key):
            problems.append(f"--{key.replace('_', '-')} was {loop.get(key)!r}, now {getattr(cfg, key)!r}")
    if bool(loop.get("ema_decay")) != bool(cfg.ema_decay):
        problems.append("EMA was " + ("on" if loop.get("ema_decay") else "off") + " and is now "
                        + ("on" if cfg.ema_decay else "off"))
    if info.get("dataset_size") != dataset_size or info.get("dataset_fingerprint") != fingerprint:
        problems.append(f"the dataset changed ({info.get('dataset_size')} records then, {dataset_size} now, "
                        f"or different contents)")
    for key, value in (run or {}).items():
        if key in info.get("run", {}) and info["run"][key] != value:
            problems.append(f"{key} was {info['run'][key]!r}, now {value!r}")
    if int(info.get("step", 0)) >= cfg.steps:
        problems.append(f"it is at step {info.get('step')} and --steps {cfg.steps} leaves nothing to do (raise --steps)")
    return problems


def _refuse_resume(folder: str, problems: List[str]) -> None:
    if problems:
        raise TrainingStateError(
            f"cannot resume from {folder} exactly: " + "; ".join(problems)
            + ". Resume with the settings of the interrupted run (or start a new run with --init from its adapter)."
        )


def precheck_resume(resume: str, stage: str, cfg: LoopConfig, dataset_size: int, fingerprint: str,
                    run: Optional[Dict[str, Any]] = None) -> str:
    """Check, from training_state.json alone (before any model is loaded), that ``resume`` can continue this run."""
    info = read_resume_info(resume)
    _refuse_resume(info["folder"], _resume_problems(info, stage, cfg, dataset_size, fingerprint, run))
    return info["folder"]


def _restore(task: TrainingTask, cfg: LoopConfig, ctx: DistributedContext, resume: str, optimizer, scheduler,
             ema: Optional[ExponentialMovingAverage]) -> int:
    folder = resolve_resume_dir(resume)
    info, tree = load_state_files(folder, STATE_STEM)
    _refuse_resume(folder, _resume_problems(info, task.stage, cfg, task.dataset_size, task.dataset_fingerprint,
                                            task.run_settings()))
    loop = info.get("loop", {})
    step = int(info["step"])
    if cfg.lr_schedule != "constant" and loop.get("steps") != cfg.steps:
        ctx.log(f"warning: --steps changed from {loop.get('steps')} to {cfg.steps}: the {cfg.lr_schedule} "
                f"learning-rate schedule is stretched from here on")
    task.model.load_state_dict(task.load_weights(os.path.join(folder, task.weights_file)))
    load_optimizer_state(optimizer, tree["optimizer"])
    scheduler.load_state_dict(tree["scheduler"])
    if ema is not None:
        ema.load_from(task.model, task.load_weights(os.path.join(folder, task.ema_weights_file)))
    rng_stem = f"rng-rank{ctx.rank}"
    if os.path.isfile(os.path.join(folder, rng_stem + ".json")):
        _, rng_tree = load_state_files(folder, rng_stem, kind=RNG_FORMAT)
        restore_rng_state(rng_tree["rng"])
    else:
        print(f"warning (rank {ctx.rank}): {folder} has no RNG state for this rank (the run had "
              f"{info.get('world_size')} process(es)); the global RNGs start fresh. Noise and timesteps are drawn "
              f"per sample from (seed, step, slot), so they are unaffected.", file=sys.stderr)
    ctx.log(f"resumed from {folder} at step {step} (epoch {info.get('epoch')}, batch {info.get('position_in_epoch')} "
            f"of the epoch)")
    return step


class _Optimisation:
    """The optimiser, its schedule and the EMA of one run, stepped together."""

    def __init__(self, adapter: torch.nn.Module, cfg: LoopConfig) -> None:
        self.trainable = [p for p in adapter.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.trainable, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.ema = ExponentialMovingAverage(self.trainable, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.max_grad_norm = cfg.max_grad_norm

    def step(self) -> Tuple[float, float]:
        """Clip, step, advance the schedule and the EMA; return (gradient norm, learning rate used)."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.max_grad_norm or float("inf"))
        self.optimizer.step()
        lr_used = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update()
        return float(grad_norm), lr_used


def _wrap_distributed(adapter: torch.nn.Module, ctx: DistributedContext) -> torch.nn.Module:
    if not ctx.distributed:
        return adapter
    from torch.nn.parallel import DistributedDataParallel

    device = ctx.device
    return DistributedDataParallel(adapter, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


def _accumulate_gradients(task: TrainingTask, cfg: LoopConfig, ctx: DistributedContext, model: torch.nn.Module,
                          prepared: List[Any], step: int) -> torch.Tensor:
    """Backward over the micro-batches of one step; return the float64 sum of this rank's per-sample losses."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for a, micro in enumerate(prepared):
        sync = contextlib.nullcontext()
        if ctx.distributed and a < len(prepared) - 1:
            sync = model.no_sync()  # gradients are all-reduced once, after the last micro-batch
        with sync:
            with _autocast(cfg, ctx.device):
                per_sample = task.per_sample_losses(model, micro, step)
            per_sample = per_sample.float()
            if not torch.isfinite(per_sample).all():
                raise ModAdapterError(
                    f"the loss became NaN/Inf at step {step + 1}; lower --lr, check the data, or resume from "
                    f"the last checkpoint"
                )
            (per_sample.sum() * (ctx.world_size / cfg.batch_size)).backward()
        loss_sum += per_sample.detach().double().sum()
    return loss_sum


def _progress_bar(task: TrainingTask, cfg: LoopConfig, ctx: DistributedContext, start: int):
    if not (ctx.is_main and cfg.progress):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, desc=task.stage, unit="step", dynamic_ncols=True)


def _record_step(log: LossLog, progress, step: int, epoch: int, loss: float, lr_used: float, grad_norm: float,
                 samples_per_second: float, elapsed_seconds: float) -> None:
    log.append({"step": step, "epoch": epoch, "loss": f"{loss:.8g}", "lr": f"{lr_used:.8g}",
                "grad_norm": f"{grad_norm:.6g}", "samples_per_second": f"{samples_per_second:.4g}",
                "elapsed_seconds": f"{elapsed_seconds:.2f}"})
    if progress is not None:
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4g}", lr=f"{lr_used:.3g}")


def run_training(task: TrainingTask, cfg: LoopConfig, out_dir: str, ctx: DistributedContext,
                 resume: Optional[str] = None, on_step: Optional[Callable[[int, float], None]] = None) -> TrainingResult:
    """Train ``task.model`` (the adapter, by default); see the module docstring."""
    cfg.validate()
    adapter = task.model
    schedule = BatchSchedule(task.dataset_size, cfg.batch_size, cfg.grad_accum, ctx.world_size, ctx.rank, cfg.seed)
    adapter.train()
    optim = _Optimisation(adapter, cfg)
    start = 0
    if resume:
        start = _restore(task, cfg, ctx, resume, optim.optimizer, optim.scheduler, optim.ema)
    if ctx.is_main:
        os.makedirs(out_dir, exist_ok=True)
    ctx.barrier()
    model = _wrap_distributed(adapter, ctx)

    log = LossLog(out_dir, resume_step=start) if ctx.is_main else None
    progress = _progress_bar(task, cfg, ctx, start)
    stop = _StopFlag()
    stop.install()
    pool = ThreadPoolExecutor(max_workers=1) if cfg.prefetch else None
    losses: List[float] = []
    last_loss: Optional[float] = None
    stopped_early = False
    end = cfg.steps if cfg.stop_after_step is None else min(cfg.steps, cfg.stop_after_step)
    started_at = time.perf_counter()

    def load(step):
        return [task.load_items(items, step) for items in schedule.micro_batches(step)]

    try:
        if cfg.validate_every and start == 0:
            _write_validation_images(task, ctx, out_dir, 0, optim.ema)
        pending = pool.submit(load, start) if pool and start < end else None
        step = start
        while step < end:
            step_started = time.perf_counter()
            prepared = pending.result() if pending is not None else load(step)
            pending = pool.submit(load, step + 1) if pool and step + 1 < end else None
            optim.optimizer.zero_grad(set_to_none=True)
            loss_sum = _accumulate_gradients(task, cfg, ctx, model, prepared, step)
            grad_norm, lr_used = optim.step()
            step += 1
            ctx.all_reduce_sum(loss_sum)
            last_loss = float(loss_sum) / cfg.batch_size
            losses.append(last_loss)
            if on_step is not None:
                on_step(step, last_loss)
            if ctx.is_main:
                _record_step(log, progress, step, schedule.epoch_of(step - 1), last_loss, lr_used, grad_norm,
                             cfg.batch_size / max(time.perf_counter() - step_started, 1e-9),
                             time.perf_counter() - started_at)
            # Every rank stops at the same step when any of them was asked to.
            stop_now = torch.tensor([1.0 if stop.requested else 0.0], device=ctx.device)
            ctx.all_reduce_sum(stop_now)
            final = step == end
            if step % cfg.save_every == 0 or final or stop_now.item() > 0:
                _save_checkpoint(task, cfg, ctx, out_dir, step, optim.optimizer, optim.scheduler, optim.ema,
                                 schedule, last_loss)
            if cfg.validate_every and (step % cfg.validate_every == 0 or step == cfg.steps):
                _write_validation_images(task, ctx, out_dir, step, optim.ema)
            if stop_now.item() > 0 and not final:
                ctx.log(f"stopped at step {step}; resume with --resume {out_dir}")
                stopped_early = True
                break
        if step < cfg.steps:
            stopped_early = True
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if progress is not None:
            progress.close()
        stop.restore()

    final_path = None if stopped_early else os.path.join(out_dir, task.weights_file)
    if not stopped_early and ctx.is_main:
        _save_weight_files(task, cfg, ctx, out_dir, step, last_loss, optim.ema)
        _plot_losses(task, out_dir)
    ctx.barrier()
    return TrainingResult(steps_done=step, losses=losses, out_dir=out_dir, final_adapter=final_path,
                          stopped_early=stopped_early)


def _write_validation_images(task: TrainingTask, ctx: DistributedContext, out_dir: str, step: int,
                             ema: Optional[ExponentialMovingAverage]) -> None:
    run_here = ctx.is_main or task.validation_on_all_ranks
    if run_here:
        was_training = task.model.training
        task.model.eval()
        try:
            with (ema.swapped_in() if ema is not None else contextlib.nullcontext()):
                task.write_validation_images(step, out_dir, ctx)
        finally:
            task.model.train(was_training)
    ctx.barrier()


def dataset_fingerprint(records: Sequence[Any], fields: Sequence[str]) -> str:
    """A hash of the records' training-relevant fields (resume refuses a changed dataset)."""
    digest = hashlib.sha256()
    for record in records:
        for name in fields:
            digest.update(str(getattr(record, name, "")).encode("utf-8", "surrogatepass"))
            digest.update(b"\x1f")
        digest.update(b"\x1e")
    return digest.hexdigest()[:32]
