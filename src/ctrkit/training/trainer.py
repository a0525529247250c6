"""Training loop: BCE-family losses, Adam or Adagrad, early stopping on validation, restore-best, checkpoints.

The trainer owns the optimizer and the device, not the model. Embedding tables with sparse gradients get
the row-sparse variant of the optimizer (:class:`RowSparseOptimizer`: lazy Adam, the update of torch's
SparseAdam, or Adagrad), so a step costs what the batch touches, not what the vocabulary holds.

Launched by ``torchrun``, it trains data-parallel (:mod:`ctrkit.training.distributed`): each rank steps on its
share of every global batch of ``batch_size`` rows; rank 0 computes the validation metrics over the whole
validation set and sends them to the others (so every rank takes the same early-stopping decision), and writes
the checkpoints, which resume on any number of ranks. With TorchRec tables (``embedding_backend="torchrec"``)
every rank takes part in each validation lookup and writes its shards of each checkpoint (a distributed
checkpoint, :func:`~ctrkit.training.checkpoint.save_sharded_checkpoint`, which also resumes on any number of
ranks), and the tables are gathered back into plain ones at the end.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ctrkit.data.dataset import BatchIterator, EncodedData
from ctrkit.devices import check_device, cpu_has_bf16, eval_rows
from ctrkit.evaluate import fast
from ctrkit.models.base import CTRModel
from ctrkit.training import sharded
from ctrkit.training.checkpoint import (check_backend, load_checkpoint, load_sharded_checkpoint, rng_states,
                                       save_checkpoint, save_sharded_checkpoint, set_rng_states)
from ctrkit.training.distributed import broadcast, setup, total
from ctrkit.training.losses import make_loss
from ctrkit.training.sampling import init_output_bias, prior_logit
from ctrkit.training.step import COMPILE, LARGE_BATCH, TrainStep, large_batch_rule

OPTIMIZERS = ("adam", "adagrad", "rowwise_adagrad")
PRECISIONS = ("auto", "fp32", "bf16")
BF16_MIN_ROWS = 1_000_000  # training rows from which "auto" turns bf16 on for a CPU


def resolve_precision(precision: str, device: torch.device, rows: int | None = None) -> str:
    """"auto" is bf16 autocast on a GPU from Ampere on, and on a CPU with bf16 units once the training set has
    ``BF16_MIN_ROWS`` rows (``rows`` None: any size); fp32 elsewhere.

    On a CPU, bf16 pays where epochs are long and costs where the log is small: on an AVX512-BF16 host it halved
    DeepFM's step on 1M synthetic Criteo rows at the same test AUC (0.7793 against 0.7794), while on Frappe's 202k
    rows FinalMLP lost 0.0004 test AUC over three seeds to save seconds.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    big = rows is None or rows >= BF16_MIN_ROWS
    return "bf16" if device.type == "cpu" and big and cpu_has_bf16() else "fp32"


MONITORS = ("auto", "auc", "logloss", "auc-logloss")
FEW_POSITIVES = 300  # below this many validation positives, "auto" stops on logloss: AUC is too noisy


@dataclass
class TrainConfig:
    """How to train. The defaults are a well-tuned starting point for the model zoo's defaults.

    ``loss``: "bce", "weighted" (positives count ``pos_weight`` times) or "focal" (``focal_alpha``,
    ``focal_gamma``). ``monitor``: what early stopping watches on validation; "auto" is logloss when the
    validation rows hold fewer than ``FEW_POSITIVES`` positives and AUC otherwise. ``min_delta``: an epoch
    counts as an improvement only when it beats the best monitored figure by more than this (so gains below the
    validation split's noise neither keep the learning rate up nor postpone the stop). ``logit_shift`` is added to
    the model's logit before validation metrics (the exact correction of downsampling and class weights), so
    the monitor sees what will be served. ``init_bias`` starts the output bias at the log-odds the loss expects
    from the training labels. ``validate_start`` scores the model before the first epoch too, so that a start
    already fitted (the exact first-order fit of a small log) stays if no epoch beats it. With ``checkpoint_dir``, a checkpoint is written every ``checkpoint_every``
    steps (0: none within an epoch) and after each epoch; ``resume`` continues from the one there.
    ``embedding_backend`` "torchrec" shards the embedding tables over the ranks with TorchRec
    (:mod:`ctrkit.training.sharded`; its checkpoints are distributed ones, of a large-batch rule only the dense
    part applies).
    """

    epochs: int = 30
    batch_size: int = 4096
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    patience: int = 2
    min_delta: float = 0.0
    lr_decay: float = 0.1
    min_lr: float = 1e-6
    restore_best: bool = True
    monitor: str = "auto"
    seed: int = 0
    device: str = "cpu"
    eval_batch_size: int | None = None
    max_seconds: float | None = None
    progress: bool = True
    precision: str = "auto"
    large_batch: str = "auto"
    compile: str = "auto"
    loss: str = "bce"
    pos_weight: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    logit_shift: float = 0.0
    init_bias: bool = True
    validate_start: bool = False
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    embedding_backend: str = "plain"

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.embedding_backend not in sharded.BACKENDS:
            raise ValueError(f"embedding_backend must be one of {sharded.BACKENDS}, got {self.embedding_backend!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.monitor not in MONITORS:
            raise ValueError(f"monitor must be one of {MONITORS}, got {self.monitor!r}")
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
        if not self.min_delta >= 0:
            raise ValueError(f"min_delta must be >= 0, got {self.min_delta}")
        if self.weight_decay < 0 or self.min_lr < 0:
            raise ValueError(f"weight_decay and min_lr must be >= 0, got {self.weight_decay} and {self.min_lr}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0 when set, got {self.max_seconds}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.seed < 0:  # NumPy's generators take none below 0
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not self.pos_weight > 0:
            raise ValueError(f"pos_weight must be > 0, got {self.pos_weight}")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("resume needs a checkpoint folder (checkpoint_dir)")
        make_loss(self.loss, self.pos_weight, self.focal_alpha, self.focal_gamma)  # validates the loss settings

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
    monitor: str = "auc"

    @property
    def samples_per_s(self) -> float:
        """Training samples per second of pure training steps (validation excluded)."""
        return self.samples / self.train_seconds if self.train_seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """The ``train`` block of ``metrics.json``."""
        return {"seconds": round(self.seconds, 3), "train_seconds": round(self.train_seconds, 3),
                "samples_per_s": round(self.samples_per_s, 1), "epochs": self.epochs, "precision": self.precision,
                "best_epoch": self.best_epoch, "monitor": self.monitor, "history": self.history}


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so CPU runs repeat exactly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def predict_logits(model: CTRModel, data: EncodedData, batch_size: int | None = None,
                   device: str | torch.device = "cpu") -> np.ndarray:
    """The model's logits for every row of ``data`` (eval mode, no gradients), in row order: [n], or [n, T] for a
    model with T heads; ``batch_size`` None is the validation default of the device."""
    batch_size = eval_rows(device, batch_size)
    was_training = model.training
    model.eval()
    out = np.empty(0, dtype=np.float64)
    pos = 0
    for batch in BatchIterator(data, batch_size=batch_size, shuffle=False, device=device, resident=False,
                               block_rows=batch_size, window_blocks=1):
        z = model(batch).double().cpu().numpy()
        if pos == 0:
            out = np.empty((len(data), *z.shape[1:]), dtype=np.float64)
        out[pos:pos + len(z)] = z
        pos += len(z)
    model.train(was_training)
    return out


def predict_proba(model: CTRModel, data: EncodedData, batch_size: int | None = None,
                  device: str | torch.device = "cpu", logit_shift: float = 0.0) -> np.ndarray:
    """Click probabilities for every row of ``data``, in row order; ``logit_shift`` is added to each logit."""
    z = predict_logits(model, data, batch_size, device) + logit_shift
    return 1.0 / (1.0 + np.exp(-z))


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


def _run_identity(cfg: TrainConfig, model: torch.nn.Module, targets: str) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it: the model and its settings, the training
    settings that decide which rows each step sees and how the weights move, and the training targets (a digest:
    the same rows learning another teacher's probabilities are another run)."""
    config = getattr(model, "config", None)
    return {**{k: v for k, v in cfg.to_dict().items() if k in ("batch_size", "seed", "loss", "optimizer", "lr")},
            "model": getattr(model, "name", "") or type(model).__name__,
            "model settings": config.to_dict() if hasattr(config, "to_dict") else None,
            "training targets (digest)": targets}


def _pairs(saved: Any, now: Any) -> list[tuple[str, Any, Any]]:
    """("", saved, now), or (key, saved value, now value) per key when both are dicts (a model's settings)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [(k, saved.get(k), now.get(k)) for k in dict.fromkeys([*saved, *now])]
    return [("", saved, now)]


def resolve_monitor(monitor: str, valid_positives: int) -> str:
    """"auto" is logloss with fewer than ``FEW_POSITIVES`` validation positives (their AUC is noise), else AUC."""
    if monitor != "auto":
        return monitor
    return "logloss" if valid_positives < FEW_POSITIVES else "auc"


def _score(monitor: str, m: dict[str, Any]) -> float:
    """The monitored figure, oriented so that higher is better."""
    if monitor == "auc":
        return m["auc"]
    if monitor == "logloss":
        return -m["logloss"]
    return m["auc"] - m["logloss"]


def _better(new: float, best: float | None, min_delta: float = 0.0) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(new)
    return new > best + min_delta


def _cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _snapshot(model: CTRModel, device: torch.device) -> dict[str, torch.Tensor]:
    """A copy of the weights: on the device when a copy takes under a quarter of its free memory (a GPU copies
    in microseconds what the host takes a tenth of a second for), else in host memory."""
    state = model.state_dict()
    if device.type == "cuda":
        size = sum(v.numel() * v.element_size() for v in state.values())
        if size < torch.cuda.mem_get_info(device)[0] // 4:
            return {k: v.detach().clone() for k, v in state.items()}
    return _cpu_copy(state)


def _valid_logits(model: CTRModel, step: TrainStep, batches: BatchIterator) -> torch.Tensor:
    """The model's logits over every validation batch, in order, left where the batches are, through the
    step's eval forward (compiled where the step is, in its precision)."""
    was_training = model.training
    model.eval()
    out = torch.cat([step.logits(b) for b in batches])
    model.train(was_training)
    return out


def train(model: CTRModel, train_data: EncodedData, valid_data: EncodedData | None = None,
          config: TrainConfig | None = None,
          on_epoch: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Fit ``model`` in place; with validation data, stop early and restore the best epoch's weights.

    A loss that becomes NaN or infinite raises :class:`TrainingDiverged` before any checkpoint could hold
    the damaged weights.
    """
    cfg = config or TrainConfig()
    if valid_data is not None and len(valid_data) == 0:
        valid_data = None  # nothing to stop on: train every epoch, like without validation
    seed_everything(cfg.seed)
    world, device = setup(cfg.device)
    loss_fn = make_loss(cfg.loss, cfg.pos_weight, cfg.focal_alpha, cfg.focal_gamma)
    model.fit_features(train_data)
    if cfg.init_bias and cfg.loss != "focal" and not getattr(model, "multi_head", False):
        clicks = np.asarray(train_data.label)  # a one-head model of multi-label data learns the first label
        init_output_bias(model, prior_logit(clicks if clicks.ndim == 1 else clicks[:, 0], train_data.weight,
                                            cfg.pos_weight if cfg.loss == "weighted" else 1.0))
    torchrec = cfg.embedding_backend == "torchrec"
    if torchrec:
        sharded.to_device(model, device)  # tables built on "meta" are allocated by the sharding
    else:
        model.to(device)
    lr = cfg.lr
    precision = resolve_precision(cfg.precision, device, len(train_data))
    batches = BatchIterator(train_data, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed, device=device,
                            rank=world.rank, world_size=world.size)
    rule = large_batch_rule(cfg.large_batch, cfg.batch_size, device, warmup_steps=len(batches))
    if torchrec and rule is not None and cfg.large_batch == "auto":  # the fused table update has no row rule
        rule = replace(rule, cowclip=False, row_lr_power=0.0, scale_l2=False)
    train_step = TrainStep(model, device, lr=cfg.lr, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay,
                           bf16=precision == "bf16", rule=rule, compile="off" if torchrec else cfg.compile,
                           loss=loss_fn, ddp=world.distributed, embedding_backend=cfg.embedding_backend)
    # a captured step replays for batches of its shape only: the last batch of an epoch is filled up to it
    batches.fill_last = train_step.graphs
    valid_label = None if valid_data is None else np.asarray(valid_data.label)
    valid_batches: BatchIterator | None = None
    valid_y: torch.Tensor | None = None
    valid_w: torch.Tensor | None = None
    monitor = resolve_monitor(cfg.monitor, 0 if valid_label is None else  # clicks: the first label
                              int((valid_label if valid_label.ndim == 1 else valid_label[:, 0]).sum()))
    result = TrainResult(precision=precision, monitor=monitor)
    best: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs = 0
    first_epoch, skip, global_step = 1, 0, 0
    steps_before = 0  # steps of the run before this process (train_step counts from 1 in each process)
    loss_sum, loss_rows, n_seen = 0.0, 0, 0
    in_epoch: list[Any] = [0.0, 0, 0]  # a resumed epoch's running loss and rows
    epoch_rng = batches.rng_state()  # the shuffling state at the start of the current epoch
    ckpt_dir = cfg.checkpoint_dir
    last_ckpt = "none"
    targets = hashlib.sha1(np.ascontiguousarray(train_data.label)).hexdigest()[:16] if ckpt_dir else ""

    def checkpoint(epoch: int, step: int, done: bool) -> None:
        nonlocal last_ckpt
        if ckpt_dir is None:
            return
        last_ckpt = f"{ckpt_dir}/last.pt (epoch {epoch}, step {step})"
        if not (world.main or torchrec):  # every rank writes its shards of a sharded checkpoint
            return
        state = {
            "epoch": epoch, "step": step, "epoch_done": done, "global_step": global_step,
            "rng": rng_states(), "batches_rng": batches.rng_state() if done else epoch_rng,
            "in_epoch": [loss_sum, loss_rows, n_seen], "best": best, "bad_epochs": bad_epochs, "lr": lr,
            "result": {"history": result.history, "best_epoch": result.best_epoch,
                       "best_valid": result.best_valid, "epochs": result.epochs,
                       "train_seconds": result.train_seconds, "samples": result.samples},
            "n_train": len(train_data), "config": _run_identity(cfg, model, targets)}
        if torchrec:  # the weights, fused optimizer state and best weights go to DCP, as shards
            save_sharded_checkpoint(ckpt_dir, {**state, "optimizers": train_step.state_dict(),
                                               "has_best_state": best_state is not None},
                                    sharded.checkpoint_state(model, best_state))
            return
        save_checkpoint(ckpt_dir, {**state, "model": _cpu_copy(model.state_dict()),
                                   "optimizers": train_step.state_dict(),
                                   "best_state": None if best_state is None else _cpu_copy(best_state)})

    if cfg.resume:
        state = load_checkpoint(ckpt_dir)  # type: ignore[arg-type]
        if state is not None:
            check_backend(ckpt_dir, state, cfg.embedding_backend)  # type: ignore[arg-type]
            saved, now = state["config"], _run_identity(cfg, model, targets)  # an older one names fewer
            differ = {f"{k} {kk}" if kk else k: (a, b) for k in saved for kk, a, b in _pairs(saved[k], now.get(k))
                      if a != b}
            if state["n_train"] != len(train_data):
                differ["training rows"] = (state["n_train"], len(train_data))
            if differ:
                raise RuntimeError(f"the checkpoint in {ckpt_dir} belongs to another run; --resume continues a run "
                                   "with its own data and settings. Differences (checkpoint, now): "
                                   + "; ".join(f"{k}: {a!r}, {b!r}" for k, (a, b) in differ.items()))
            if torchrec:  # every rank reads the rows of its own shards, however many ranks wrote them
                best_state = sharded.load_checkpoint_state(
                    model, lambda shards: load_sharded_checkpoint(ckpt_dir, state, shards),  # type: ignore[arg-type]
                    state["has_best_state"])
            else:
                try:
                    model.load_state_dict(state["model"])
                except RuntimeError as exc:  # a checkpoint from before the model was part of the run's identity
                    raise RuntimeError(f"the checkpoint in {ckpt_dir} holds another model's weights; --resume "
                                       f"continues a run with its own model ({str(exc).splitlines()[0]})") from None
                best_state = state["best_state"]
            train_step.load_state_dict(state["optimizers"])
            best, bad_epochs, lr = state["best"], state["bad_epochs"], state["lr"]
            if lr != cfg.lr:
                train_step.set_lr(lr)
            for k, v in state["result"].items():
                setattr(result, k, v)
            global_step = steps_before = state["global_step"]
            batches.set_rng_state(state["batches_rng"])
            epoch_rng = state["batches_rng"]
            if state["epoch_done"]:
                first_epoch = state["epoch"] + 1
            else:
                first_epoch, skip = state["epoch"], state["step"]
            resumed_rng, in_epoch = state["rng"], state["in_epoch"]
            last_ckpt = f"{ckpt_dir}/last.pt (epoch {state['epoch']}, step {state['step']})"
            if first_epoch > cfg.epochs or (state["epoch_done"] and valid_data is not None
                                            and bad_epochs >= cfg.patience):
                first_epoch = cfg.epochs + 1  # the run had finished: only restore the best weights
            set_rng_states(resumed_rng)
    t_start = time.perf_counter()
    check_every = 1 if device.type == "cpu" else 20  # on a GPU, a read queued behind the steps (no sync)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), disable=not cfg.progress, transient=True)

    def check_finite(epoch: int, wait: bool = True) -> None:
        bad = train_step.first_nonfinite(wait)
        if bad is not None:
            raise TrainingDiverged(f"the training loss is NaN or infinite at step {steps_before + bad} "
                                   f"(epoch {epoch}); "
                                   f"stopped. Last good checkpoint: {last_ckpt}. Lower --lr, or look for "
                                   "extreme values in the data")

    def validate() -> dict[str, Any]:
        """The validation figures of the model as it is (computed on the main process, shared with the rest)."""
        nonlocal valid_batches, valid_y, valid_w
        assert valid_data is not None
        m = None
        if world.main or torchrec:  # a lookup in sharded tables takes every rank
            if valid_batches is None:  # built once: on a GPU the rows then stay on the device
                valid_batches = BatchIterator(valid_data, batch_size=eval_rows(device, cfg.eval_batch_size),
                                              device=device)
                valid_y = torch.tensor(np.asarray(valid_data.label), device=device)
                valid_w = None if valid_data.weight is None else torch.tensor(np.asarray(valid_data.weight),
                                                                               device=device)
            logits = _valid_logits(model, train_step, valid_batches)
            if world.main:
                p = torch.sigmoid(logits.double() + cfg.logit_shift)
                m = fast.evaluate_heads(valid_y, p, model.spec.label_names, weight=valid_w)
        return broadcast(m)

    def keep_if_best(m: dict[str, Any], epoch: int) -> bool:
        """Whether ``m`` beats the best so far by more than ``min_delta`` (several heads: their mean); if so,
        remember it and the weights."""
        nonlocal best, bad_epochs, best_state
        score = float(np.mean([_score(monitor, h) for h in m.get("heads", {"": m}).values()]))
        if not _better(score, best, cfg.min_delta):
            return False
        best, bad_epochs = score, 0
        result.best_epoch, result.best_valid = epoch, m
        if cfg.restore_best:
            best_state = sharded.snapshot(model) if torchrec else _snapshot(model, device)
        return True

    if cfg.validate_start and valid_data is not None and first_epoch == 1 and not skip:
        m0 = validate()
        keep_if_best(m0, 0)
        result.history.append({"epoch": 0, "lr": lr, "valid": {k: m0[k] for k in ("auc", "logloss", "ece",
                                                                                     "pred_actual_ratio")}})

    def read_loss() -> float | None:
        """Fold the mean loss of the steps since the last read into the epoch's (one term per read)."""
        nonlocal loss_sum, loss_rows
        mean = train_step.loss_mean()
        if mean is not None:
            loss_sum, loss_rows = loss_sum + mean, loss_rows + 1
        return mean

    try:
        with progress:
            for epoch in range(first_epoch, cfg.epochs + 1):
                model.train()
                task = progress.add_task(f"epoch {epoch}", total=len(batches), info="")
                t0 = time.perf_counter()
                loss_sum, loss_rows, n_seen = in_epoch if skip else (0.0, 0, 0)
                if skip == 0:
                    epoch_rng = batches.rng_state()
                stream = iter(batches)
                if skip:
                    rng_now = rng_states()  # skipping batches draws from no global generator, but be exact anyway
                    for _ in range(skip):
                        next(stream)
                    set_rng_states(rng_now)
                for step, batch in enumerate(stream, start=skip):
                    if len(batch.label) < 2:
                        continue  # a single row cannot be batch-normalised; it is one row of one epoch
                    train_step(batch)
                    if batches.into is None and train_step.inputs is not None:
                        batches.into = train_step.inputs  # from now on batches are gathered into the step's inputs
                    global_step += 1
                    n_seen += len(batch.label)
                    if global_step % check_every == 0:
                        check_finite(epoch, wait=False)
                    if step % 20 == 0 and (mean := read_loss()) is not None:
                        progress.update(task, completed=step + 1, info=f"loss {mean:.4f}  "
                                        f"{n_seen / max(time.perf_counter() - t0, 1e-9):,.0f}/s")
                    if cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0 and step + 1 < len(batches):
                        check_finite(epoch)
                        read_loss()
                        checkpoint(epoch, step + 1, False)
                    if cfg.max_seconds is not None and broadcast(time.perf_counter() - t_start > cfg.max_seconds):
                        break
                else:
                    n_seen -= batches.repeated  # the rows of a filled last batch that the epoch had trained
                skip = 0
                read_loss()
                check_finite(epoch)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # the epoch's steps are queued; its time is when they are done
                train_time = time.perf_counter() - t0
                n_seen = int(total(n_seen))  # the rows of every rank
                progress.remove_task(task)
                result.train_seconds += train_time
                result.samples += n_seen
                result.epochs = epoch
                record: dict[str, Any] = {"epoch": epoch, "lr": lr, "train_seconds": round(train_time, 3),
                                          "samples_per_s": round(n_seen / max(train_time, 1e-9), 1),
                                          "train_loss": loss_sum / loss_rows if loss_rows else float("nan")}
                if valid_data is not None:
                    m = validate()
                    record["valid"] = {k: m[k] for k in ("auc", "logloss", "ece", "pred_actual_ratio")}
                    if not keep_if_best(m, epoch):
                        bad_epochs += 1
                        if cfg.lr_decay < 1.0 and lr > cfg.min_lr:
                            lr = max(lr * cfg.lr_decay, cfg.min_lr)
                            train_step.set_lr(lr)
                result.history.append(record)
                checkpoint(epoch, len(batches), True)
                if on_epoch is not None:
                    on_epoch(record)
                if valid_data is not None and bad_epochs >= cfg.patience:
                    break
                if cfg.max_seconds is not None and broadcast(time.perf_counter() - t_start > cfg.max_seconds):
                    break
    except BaseException:
        train_step.close()  # give the model back as it was built (its tables' own lookups)
        raise
    if best_state is not None and torchrec:
        sharded.restore(model, best_state)  # into the shards, before close() gathers them
    elif best_state is not None:
        model.load_state_dict(best_state)
    train_step.close()
    if best_state is None and valid_data is None:
        result.best_epoch = result.epochs
    result.seconds = time.perf_counter() - t_start
    model.eval()
    return result
