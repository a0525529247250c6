"""Training loop: BCE with logits, Adam or Adagrad, early stopping on validation AUC, restore-best.

The trainer owns the optimizer and the device, not the model. Embedding tables with sparse gradients get
the row-sparse variant of the optimizer (:class:`RowSparseOptimizer`: lazy Adam, the update of torch's
SparseAdam, or Adagrad), so a step costs what the batch touches, not what the vocabulary holds.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ctrkit.data.dataset import BatchIterator, EncodedData
from ctrkit.evaluate.metrics import evaluate_heads
from ctrkit.models.base import CTRModel
from ctrkit.training.step import COMPILE, LARGE_BATCH, TrainStep, large_batch_rule

OPTIMIZERS = ("adam", "adagrad")
PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX-BF16), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" is bf16 autocast where the hardware has bf16 units (a CPU with them, a GPU from Ampere on): same
    AUC, fewer seconds; fp32 elsewhere."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"


@dataclass
class TrainConfig:
    """How to train. The defaults are a well-tuned starting point for the model zoo's defaults."""

    epochs: int = 30
    batch_size: int = 4096
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    patience: int = 2
    lr_decay: float = 0.1
    min_lr: float = 1e-6
    restore_best: bool = True
    monitor: str = "auc"
    seed: int = 0
    device: str = "cpu"
    eval_batch_size: int = 65536
    max_seconds: float | None = None
    progress: bool = True
    precision: str = "auto"
    large_batch: str = "auto"
    compile: str = "auto"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.monitor not in ("auc", "logloss"):
            raise ValueError(f"monitor must be 'auc' or 'logloss', got {self.monitor!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.large_batch not in LARGE_BATCH:
            raise ValueError(f"large_batch must be one of {LARGE_BATCH}, got {self.large_batch!r}")
        if self.compile not in COMPILE:
            raise ValueError(f"compile must be one of {COMPILE}, got {self.compile!r}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if self.patience < 1:
            # with 0 the first epoch, an improvement by definition, would already end training
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.weight_decay < 0 or self.min_lr < 0:
            raise ValueError(f"weight_decay and min_lr must be >= 0, got {self.weight_decay} and {self.min_lr}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0 when set, got {self.max_seconds}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass
class TrainResult:
    """What training did: per-epoch history, the best epoch, throughput and timing."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_valid: dict[str, Any] = field(default_factory=dict)
    epochs: int = 0
    seconds: float = 0.0
    train_seconds: float = 0.0
    samples: int = 0
    precision: str = "fp32"

    @property
    def samples_per_s(self) -> float:
        """Training samples per second of pure training steps (validation excluded)."""
        return self.samples / self.train_seconds if self.train_seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """The ``train`` block of ``metrics.json``."""
        return {"seconds": round(self.seconds, 3), "train_seconds": round(self.train_seconds, 3),
                "samples_per_s": round(self.samples_per_s, 1), "epochs": self.epochs, "precision": self.precision,
                "best_epoch": self.best_epoch, "history": self.history}


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so CPU runs repeat exactly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def predict_proba(model: CTRModel, data: EncodedData, batch_size: int = 65536,
                  device: str | torch.device = "cpu") -> np.ndarray:
    """Probabilities for every row of ``data`` (eval mode, no gradients), in row order: [n], or [n, T] for a
    model with T heads."""
    was_training = model.training
    model.eval()
    out = np.empty(0, dtype=np.float64)
    pos = 0
    for batch in BatchIterator(data, batch_size=batch_size, shuffle=False, device=device, resident=False,
                               block_rows=batch_size, window_blocks=1):
        p = torch.sigmoid(model(batch)).double().cpu().numpy()
        if pos == 0:
            out = np.empty((len(data), *p.shape[1:]), dtype=np.float64)
        out[pos:pos + len(p)] = p
        pos += len(p)
    model.train(was_training)
    return out


def _better(metric: str, new: float, best: float | None) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(new)
    return new > best if metric == "auc" else new < best


def train(model: CTRModel, train_data: EncodedData, valid_data: EncodedData | None = None,
          config: TrainConfig | None = None,
          on_epoch: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Fit ``model`` in place; with validation data, stop early and restore the best epoch's weights."""
    cfg = config or TrainConfig()
    if valid_data is not None and len(valid_data) == 0:
        valid_data = None  # nothing to stop on: train every epoch, like without validation
    seed_everything(cfg.seed)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    model.fit_features(train_data)
    model.to(device)
    lr = cfg.lr
    precision = resolve_precision(cfg.precision, device)
    batches = BatchIterator(train_data, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed, device=device)
    rule = large_batch_rule(cfg.large_batch, cfg.batch_size, device, warmup_steps=len(batches))
    train_step = TrainStep(model, device, lr=cfg.lr, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay,
                           bf16=precision == "bf16", rule=rule, compile=cfg.compile)
    result = TrainResult(precision=precision)
    best: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs = 0
    t_start = time.perf_counter()
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), disable=not cfg.progress, transient=True)
    with progress:
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            task = progress.add_task(f"epoch {epoch}", total=len(batches), info="")
            t0 = time.perf_counter()
            loss_sum, n_seen = 0.0, 0
            for step, batch in enumerate(batches):
                if len(batch.label) < 2:
                    continue  # a single row cannot be batch-normalised; it is one row of one epoch
                train_step(batch)
                n_seen += len(batch.label)
                if step % 20 == 0:
                    mean = train_step.loss_mean()
                    loss_sum = loss_sum if mean is None else mean
                    elapsed = time.perf_counter() - t0
                    progress.update(task, completed=step + 1,
                                    info=f"loss {loss_sum:.4f}  {n_seen / max(elapsed, 1e-9):,.0f}/s")
                if cfg.max_seconds is not None and time.perf_counter() - t_start > cfg.max_seconds:
                    break
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the epoch's steps are queued; its time is when they are done
            train_time = time.perf_counter() - t0
            progress.remove_task(task)
            result.train_seconds += train_time
            result.samples += n_seen
            result.epochs = epoch
            record: dict[str, Any] = {"epoch": epoch, "lr": lr, "train_seconds": round(train_time, 3),
                                      "samples_per_s": round(n_seen / max(train_time, 1e-9), 1)}
            if valid_data is not None:
                p = predict_proba(model, valid_data, cfg.eval_batch_size, device)
                m = evaluate_heads(np.asarray(valid_data.label), p, model.spec.label_names)
                record["valid"] = {k: m[k] for k in ("auc", "logloss", "ece", "pred_actual_ratio")}
                # several heads: stop on their mean
                score = float(np.mean([h[cfg.monitor] for h in m.get("heads", {"": m}).values()]))
                if _better(cfg.monitor, score, best):
                    best, bad_epochs = score, 0
                    result.best_epoch, result.best_valid = epoch, m
                    if cfg.restore_best:
                        best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                else:
                    bad_epochs += 1
                    if cfg.lr_decay < 1.0 and lr > cfg.min_lr:
                        lr = max(lr * cfg.lr_decay, cfg.min_lr)
                        train_step.set_lr(lr)
            result.history.append(record)
            if on_epoch is not None:
                on_epoch(record)
            if valid_data is not None and bad_epochs >= cfg.patience:
                break
            if cfg.max_seconds is not None and time.perf_counter() - t_start > cfg.max_seconds:
                break
    train_step.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    elif valid_data is None:
        result.best_epoch = result.epochs
    result.seconds = time.perf_counter() - t_start
    model.eval()
    return result
