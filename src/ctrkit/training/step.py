"""The inner training step: forward, loss, backward and the optimizer updates, on a CPU or a GPU.

On a CPU the step runs eagerly, with no more threads than the process has CPUs: embedding tables with sparse
gradients get :class:`RowSparseOptimizer`, the other weights fused Adam (or Adagrad). On a GPU it is built
for the hardware: bf16 autocast for the dense layers over fp32 master weights, the forward and backward
compiled with torch.compile, each embedding table updated only at the rows the batch reads (lazy Adam /
Adagrad over static shapes, so nothing waits for the host: the table gets no gradient of its own, only the
gradient at each looked-up position, which the row update sums per row), capturable Adam for the dense
weights (its foreach form, compiled), and the whole step (copy-in, forward, backward, updates) captured once in
a CUDA graph and replayed. The loss is summed on the device and read asynchronously.

Under ``torchrun`` (``ddp=True``) the model runs in DDP and the tables keep row-sparse gradients, averaged over
the ranks by :func:`~ctrkit.training.distributed.allreduce_sparse_` before :class:`RowSparseOptimizer` applies
them (no row updates and no CUDA graph there), so every rank holds the weights one process would.

With ``embedding_backend="torchrec"`` the tables are sharded over the ranks by TorchRec and updated by FBGEMM's
fused optimizer inside the backward pass (:mod:`ctrkit.training.sharded`); the step then runs eagerly, and
TorchRec's DistributedModelParallel keeps the dense weights in DDP.

A batch ``scale`` times larger than :data:`BASE_BATCH` gets a large-batch rule (:class:`LargeBatchRule`).
"""

from __future__ import annotations

import copy
import functools
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ctrkit.devices import keep_freed_memory
from ctrkit.data.dataset import BATCH_FIELDS, Batch
from ctrkit.models.base import CTRModel
from ctrkit.training import rows_gpu, sharded
from ctrkit.training.distributed import allreduce_sparse_, wrap
from ctrkit.training.losses import Loss, bce
from ctrkit.training.optim import RowSparseOptimizer, cowclip, update_rows_


def cpu_threads() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup (container) CPU quota."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


BASE_BATCH = 4096
LARGE_BATCH = ("auto", "rows", "cowclip", "off")
COMPILE = ("auto", "on", "off", "max")
# "max": Inductor times Triton matrix products against cuBLAS for each product of the step and fuses the ReLU
# masks into the winners (a minute more of compilation; its own CUDA graphs stay off, the step captures its own)
MAX_AUTOTUNE = "max-autotune-no-cudagraphs"
WARMUP_STEPS = 3  # eager steps before a GPU step is captured: compilation and allocator warm-up happen here


@dataclass(frozen=True)
class LargeBatchRule:
    """How a batch ``scale`` times :data:`BASE_BATCH` changes the updates.

    The field defaults are CowClip's rule (Zheng et al., AAAI 2023): embedding gradients are clipped row by row
    (:func:`~ctrkit.training.optim.cowclip` with ``clip_ratio`` and ``clip_floor``) and keep their learning
    rate; the embedding L2 grows with ``scale`` (an id is seen ``scale`` times fewer steps per epoch); dense
    weights get ``sqrt(scale)`` times the learning rate, warmed up linearly over ``warmup_steps``.
    ``row_lr_power`` p > 0 also multiplies each table row's learning rate by min(uses in the batch, scale) ** p:
    a row used c times in one large batch would have been updated about min(c, scale) times by the small
    batches it replaces, while a rare id keeps its learning rate.
    """

    scale: float
    clip_ratio: float = 1.0
    clip_floor: float = 1e-5
    warmup_steps: int = 0
    cowclip: bool = True
    row_lr_power: float = 0.0
    scale_l2: bool = True

    @property
    def dense_lr_factor(self) -> float:
        """Multiplier of the dense weights' learning rate once warmed up."""
        return math.sqrt(self.scale)

    @property
    def clip(self) -> tuple[float, float] | None:
        """(ratio, floor) for :func:`~ctrkit.training.optim.cowclip`, or None without clipping."""
        return (self.clip_ratio, self.clip_floor) if self.cowclip else None

    @property
    def row_lr(self) -> tuple[float, float] | None:
        """(cap, power) of the count-scaled row learning rate, or None."""
        return (self.scale, self.row_lr_power) if self.row_lr_power > 0 else None

    @property
    def l2_factor(self) -> float:
        """Multiplier of the model's regularisation term."""
        return self.scale if self.scale_l2 else 1.0


def large_batch_rule(setting: str, batch_size: int, device: torch.device,
                     warmup_steps: int = 0) -> LargeBatchRule | None:
    """The rule for this batch size (scale = batch / :data:`BASE_BATCH`, at least 1).

    "rows" scales each table row's learning rate by its uses in the batch (up to the scale) and the dense
    learning rate by sqrt(scale), without clipping or a larger L2: on 10M synthetic Criteo rows at batch 65,536
    it kept batch 4,096's test AUC (0.7968 against 0.7973), where CowClip's rule lost 0.011 (BENCHMARKS.md).
    "cowclip" is the paper's rule; "auto" is "rows" on a GPU above :data:`BASE_BATCH`; "off" is no rule.
    """
    if setting not in LARGE_BATCH:
        raise ValueError(f"large_batch must be one of {LARGE_BATCH}, got {setting!r}")
    if setting == "off" or (setting == "auto" and (device.type != "cuda" or batch_size <= BASE_BATCH)):
        return None
    scale = max(batch_size / BASE_BATCH, 1.0)
    if setting == "cowclip":
        return LargeBatchRule(scale=scale, warmup_steps=warmup_steps)
    return LargeBatchRule(scale=scale, warmup_steps=warmup_steps, cowclip=False, row_lr_power=1.0, scale_l2=False)


def _tables(model: nn.Module) -> list[nn.Embedding]:
    """Embedding tables the model wants updated row by row: those it built with sparse gradients, unless frozen
    (``weight.requires_grad`` False: such a table is looked up as it is and never updated)."""
    return [m for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse and m.weight.requires_grad]


class TrainStep:
    """``step(batch)`` trains ``model`` on one batch; on a GPU nothing in it waits for the device.

    ``lr``, ``optimizer`` ("adam" / "adagrad" / "rowwise_adagrad", the last Adagrad for the dense weights) and
    ``weight_decay`` apply to every weight; ``rule`` is the
    large-batch rule or None; ``compile`` ("auto" = on a GPU) compiles the forward and backward ("max": with
    Inductor's autotuned matrix products, see :data:`MAX_AUTOTUNE`); ``graphs``
    captures the step in a CUDA graph and ``row_updates`` updates tables at the batch's rows from the gradients
    at the looked-up positions instead of through sparse gradients (both default to on a GPU, off with ``ddp``;
    a table must then be looked up with the batch's ids or sequence ids, whole); ``embedding_backend``
    "torchrec" shards the tables (:mod:`~ctrkit.training.sharded`; no compile, graphs or row updates, and only
    the dense part of a large-batch rule). :meth:`loss_mean` reads
    the mean loss since the last read without waiting for the device; :meth:`close` gives the model back as it was built.
    """

    def __init__(self, model: CTRModel, device: torch.device, lr: float = 1e-3, optimizer: str = "adam",
                 weight_decay: float = 0.0, bf16: bool = False, rule: LargeBatchRule | None = None,
                 compile: str = "auto", graphs: bool | None = None, row_updates: bool | None = None,
                 loss: Loss = bce, ddp: bool = False, embedding_backend: str = "plain") -> None:
        if compile not in COMPILE:
            raise ValueError(f"compile must be one of {COMPILE}, got {compile!r}")
        if embedding_backend not in sharded.BACKENDS:
            raise ValueError(f"embedding_backend must be one of {sharded.BACKENDS}, got {embedding_backend!r}")
        self.torchrec = embedding_backend == "torchrec"
        if self.torchrec:
            if graphs or row_updates or compile in ("on", "max"):
                raise ValueError("with TorchRec tables the step runs eagerly: no compile, graphs or row updates")
            if rule is not None and (rule.clip or rule.row_lr):
                raise ValueError("the large-batch rules 'rows' and 'cowclip' act on ctrkit's own row updates; "
                                 "with TorchRec tables only the dense part applies (large_batch 'auto' or 'off')")
            graphs = row_updates = False
            compile, ddp = "off", False  # DistributedModelParallel puts the dense weights in DDP itself
        self.model, self.device, self.bf16, self.rule, self.loss = model, device, bf16, rule, loss
        self.cuda = device.type == "cuda"
        if device.type == "cpu":
            keep_freed_memory()
            if torch.get_num_threads() > cpu_threads():
                torch.set_num_threads(cpu_threads())  # more threads than CPUs only adds switching
        if ddp and (graphs or row_updates):
            raise ValueError("under DDP the tables are updated from row-sparse gradients: no graphs, no row updates")
        self.ddp = ddp
        self.graphs = self.cuda and not ddp if graphs is None else graphs
        if self.graphs and not (self.cuda and (row_updates is None or row_updates)):
            raise ValueError("CUDA graphs need device='cuda' and row updates")
        self.optimizer, self.betas, self.eps = optimizer, (0.9, 0.999), 1e-8 if optimizer == "adam" else 1e-10
        self._l2_factor = rule.l2_factor if rule is not None else 1.0
        self._sharded = (sharded.shard(model, device, optimizer, lr, self.eps, self.betas) if self.torchrec
                         else None)
        tables = _tables(model)
        table_ids = {id(m.weight) for m in tables}
        dense = (sharded.dense_parameters(self._sharded) if self._sharded is not None else
                 [p for p in model.parameters() if id(p) not in table_ids and p.requires_grad])
        self._dense = dense
        self._base_lr, self._calls = lr, 0
        self._dense_lr = lr * self._warmup_factor(1)
        self._lr_dense: torch.Tensor | None = None
        self.opts: list[torch.optim.Optimizer] = []
        self._foreach: torch.optim.Optimizer | None = None  # the dense Adam that the step compiles, if any
        want_compile = compile in ("on", "max") or (compile == "auto" and self.cuda)
        self.row_updates = self.cuda and not ddp if row_updates is None else row_updates
        if self.row_updates:
            # a table's lookups give it no gradient: the gradient at each looked-up position reaches the row
            # update through a zero-stride view added to the lookup (see _table_forward and _backward_rows)
            self._tables = tables
            for k, m in enumerate(tables):
                m.sparse = False
                m.forward = functools.partial(self._table_forward, k)
            self._positions: list[dict[int, torch.Tensor]] = [{} for _ in tables]  # per table: ids rank -> view
            self._views: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}  # (table, ids shape) -> view
            self._live: list[tuple[tuple[int, int], torch.Tensor]] = []  # this batch's ((table, ids rank), view)
            self._grad_at: dict[tuple[int, int], torch.Tensor | None] = {}  # (table, ids rank) -> gradient
            self._row_state = [self._new_row_state(m.weight) for m in tables]
            # float64 scalars: the bias correction 1 - 0.999 ** t loses digits in float32
            self._lr_rows = torch.tensor(lr, dtype=torch.float64, device=device)
            self._t = torch.zeros((), dtype=torch.float64, device=device)
            # on a GPU with Triton: fused kernels over the positions sorted by row (rows_gpu); elsewhere the
            # portable update, which sums the positions into a buffer of row gradients and zeroes it after
            self._fused = self.cuda and rows_gpu.AVAILABLE and bool(tables) and optimizer != "rowwise_adagrad"
            # the positions' sort by row needs only the batch's ids: it runs on a stream of its own beside the
            # forward and backward, and the row updates wait for it
            self._sorter = torch.cuda.Stream(device) if self._fused else None
            self._grads = [] if self._fused else [torch.zeros_like(m.weight) for m in tables]
            most = max((m.weight.shape[0] for m in tables), default=0)
            self._counts = (torch.zeros(most, device=device) if rule and (rule.clip or rule.row_lr)
                            and not self._fused else None)
            if optimizer == "adam" and self.cuda:  # a device-side learning rate, so a captured step sees changes
                self._lr_dense = torch.tensor(self._dense_lr, device=device)
            elif self.cuda:
                self.graphs = False  # torch's Adagrad cannot be captured
            if dense:
                self.opts.append(self._dense_optimizer(dense, self._lr_dense if self._lr_dense is not None
                                                       else self._dense_lr, weight_decay, capturable=self.cuda,
                                                       foreach=self.cuda and want_compile))
                if self.opts[-1].defaults.get("foreach"):
                    self._foreach = self.opts[-1]
        else:
            self._tables = []
            if tables:
                self.opts.append(RowSparseOptimizer([m.weight for m in tables], lr=lr, rule=optimizer,
                                                    clip=rule.clip if rule else None,
                                                    row_lr=rule.row_lr if rule else None))
            if dense:
                self.opts.append(self._dense_optimizer(dense, self._dense_lr, weight_decay))
        self._loss_sum = torch.zeros((), device=device)
        self._step_no = torch.zeros((), dtype=torch.int64, device=device)
        self._bad = torch.full((), -1, dtype=torch.int64, device=device)
        self._loss_n = 0
        self._host: torch.Tensor | None = None
        self._event: torch.cuda.Event | None = None
        self._bad_host: torch.Tensor | None = None
        self._bad_event: torch.cuda.Event | None = None
        self._pending = 0
        self._checked = False
        if want_compile:
            # every step compiles the same method; torch caches its graphs per method and, after 8 models in one
            # process (a benchmark, a tuning run), silently runs the next ones eagerly: start each step afresh
            torch.compiler.reset()
        self._eager: dict[str, Any] = {"train": self._forward_loss, "eval": self._eval_logits}
        self._compiled: dict[str, Any] = {"train": None, "eval": None}
        if want_compile:  # the eval forward is a graph of its own: no autograd, dropout and batch norm off
            mode = MAX_AUTOTUNE if compile == "max" else None
            self._compiled = {"train": torch.compile(self._forward_loss, dynamic=False, mode=mode),
                              "eval": torch.compile(self._eval_logits, dynamic=False, mode=mode)}
            if self._foreach is not None:  # Inductor's kernels for the dense update: see _dense_optimizer
                self._eager["dense"] = self._dense_step
                self._compiled["dense"] = torch.compile(self._dense_step)
            if tables and not self.row_updates:  # inductor fails inside backward() on a sparse gradient
                warnings.warn("torch.compile cannot differentiate into sparse embedding gradients: the training "
                              "step runs eagerly (validation stays compiled)", stacklevel=2)
                self._compiled["train"] = None
        self._compiled_ok: set[str] = set()
        self._eval_rows: int | None = None
        self._widest = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: Batch | None = None
        self._sparse = [m.weight for m in tables]
        self._net: nn.Module = (self._sharded if self._sharded is not None else
                                wrap(model, device, self._sparse) if ddp else model)

    # ---- building blocks -------------------------------------------------------------------------------------

    def _dense_optimizer(self, params: list[nn.Parameter], lr: float | torch.Tensor, weight_decay: float,
                         capturable: bool = False, foreach: bool = False) -> torch.optim.Optimizer:
        """Adam (or Adagrad) for the weights outside the tables. ``foreach``: Adam's per-tensor-list form, which
        the step compiles: torch's fused kernel hands each tensor's 64k-element chunks to one thread block each
        (on an H100, 0.07 ms for an MLP's 0.5M weights, on a few of its 132 multiprocessors), where Inductor's
        kernels spread the elements over the whole GPU."""
        if self.optimizer != "adam":
            return torch.optim.Adagrad(params, lr=lr, weight_decay=weight_decay)
        if foreach:
            return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, foreach=True, capturable=capturable)
        try:  # one kernel for all tensors: about 8x cheaper than the per-tensor loop for an MLP on a CPU
            return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True, capturable=capturable)
        except RuntimeError:  # a device without a fused kernel
            return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, capturable=capturable)

    def _new_row_state(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.optimizer == "adam":
            return torch.zeros_like(weight), torch.zeros_like(weight)
        if self.optimizer == "rowwise_adagrad":
            return (torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),)
        return (torch.zeros_like(weight),)

    def _warmup_factor(self, step: int) -> float:
        rule = self.rule
        if rule is None:
            return 1.0
        ramp = min(1.0, step / rule.warmup_steps) if rule.warmup_steps > 0 else 1.0
        return rule.dense_lr_factor * ramp

    def _forward_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to report, loss to minimise) of one batch."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self._net(batch)
        loss = self.loss(logits, batch.label, batch.weight)
        reg = self.model.regularization()
        total = loss + self._l2_factor * reg if reg is not None else loss
        return loss.detach(), total

    def _eval_logits(self, batch: Batch) -> torch.Tensor:
        """The model's float32 logits of one batch in the step's precision (the model is in eval mode)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16 and self.cuda):
            return self.model(batch).float()

    def _call_compiled(self, which: str, *args: Any) -> Any:
        """``which`` ("train": (loss, total) of :meth:`_forward_loss`; "eval": :meth:`_eval_logits`; "dense": the
        dense weights' update), compiled. If compiling fails (no compiler toolchain, an op it cannot trace), say
        so once and run that part eagerly from then on: an error of the model itself then surfaces from the
        eager call."""
        eager = self._eager[which]
        fn = self._compiled.get(which)
        if fn is None:
            return eager(*args)
        if which in self._compiled_ok:
            return fn(*args)
        try:
            out = fn(*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure; the eager call below re-raises real errors
            doing = {"train": "training", "eval": "validating", "dense": "updating the dense weights"}[which]
            warnings.warn(f"torch.compile failed ({type(err).__name__}: {str(err)[:200]}); {doing} eagerly",
                          stacklevel=3)
            self._compiled[which] = None
            return eager(*args)
        self._compiled_ok.add(which)
        return out

    @torch.no_grad()
    def logits(self, batch: Batch) -> torch.Tensor:
        """The model's float32 logits of ``batch`` with the step's precision, for validation (call it with the
        model in eval mode). Compiled when the step is, for batches of the first size it sees; a shorter batch (an
        epoch's last) goes through the same compiled forward with its rows repeated up to that size, since each
        row's logit depends on that row alone (an eager pass of a GPU model costs several compiled ones); a
        longer one runs eagerly, so that nothing recompiles."""
        n = len(batch)
        if self._eval_rows is None:
            self._eval_rows = n
        if n == self._eval_rows:
            return self._call_compiled("eval", batch)
        if n > self._eval_rows or n == 0 or self._compiled.get("eval") is None:
            return self._eval_logits(batch)
        rows = torch.arange(self._eval_rows, device=batch.ids.device) % n
        return self._call_compiled("eval", Batch(**{k: None if getattr(batch, k) is None else getattr(batch, k)[rows]
                                                    for k in BATCH_FIELDS}))[:n]

    def _row_ids(self, batch: Batch) -> torch.Tensor:
        """The rows of the tables this batch can read: every id of the batch (sequence ids too), in the ids' dtype."""
        rows = batch.ids.reshape(-1)
        return rows if batch.seq is None else torch.cat([rows, batch.seq.reshape(-1)])

    def _table_forward(self, k: int, ids: torch.Tensor) -> torch.Tensor:
        """Table ``k``'s forward while this step trains it: the rows of ``ids`` plus the zero-stride view for ids
        of this shape, so that the table gets no gradient and the view gets the gradient at each position (traced
        into the compiled forward). Without gradients (validation) a plain lookup."""
        weight = self._tables[k].weight
        if not torch.is_grad_enabled():
            return F.embedding(ids, weight)
        view = self._positions[k].get(ids.dim())
        if view is None or view.shape[:-1] != ids.shape:
            raise ValueError(f"embedding table {tuple(weight.shape)} is looked up with ids of shape "
                             f"{tuple(ids.shape)}; row updates need lookups of the batch's ids or sequence ids")
        return F.embedding(ids, weight.detach()) + view

    def _set_positions(self, batch: Batch) -> None:
        """The zero-stride tensors that collect the gradient at each looked-up position of ``batch``, one per table
        and id tensor (ids, seq), kept per shape so that a full batch always sees the same ones.

        Each is a view of a one-element leaf that :meth:`_backward_rows` asks for the gradient of: it gets the
        gradient that reaches the view as it comes, and nothing flows on into the leaf."""
        self._live = []
        for k, m in enumerate(self._tables):
            for x in (batch.ids, batch.seq):
                if x is None:
                    continue
                key = (k, tuple(x.shape))
                view = self._views.get(key)
                if view is None:
                    leaf = torch.zeros(1, dtype=m.weight.dtype, device=m.weight.device, requires_grad=True)
                    view = self._views[key] = leaf.expand(*x.shape, m.weight.shape[1])
                self._positions[k][x.dim()] = view
                self._grad_at[(k, x.dim())] = None
                self._live.append(((k, x.dim()), view))

    def _backward_rows(self, total: torch.Tensor) -> None:
        """The backward pass with row updates: the dense weights' gradients into their ``.grad`` and the gradients
        at the looked-up positions kept for the row update, from one :func:`torch.autograd.grad` call. Asked for the
        views' gradients directly, autograd stops at them, where a hook on each view (passing zeros on) cost a fill, a
        sum of those zeros over every position and an accumulation into the leaf, per table and step. On the first
        step the tables are asked too: a table must get its gradient through its lookups only, or the row update
        would miss it."""
        views = [v for _, v in self._live]
        tables = [] if self._checked else [m.weight for m in self._tables]
        grads = torch.autograd.grad(total, self._dense + views + tables, allow_unused=True)
        n = len(self._dense)
        for p, g in zip(self._dense, grads[:n], strict=True):  # in the weight's layout, as backward() leaves it
            p.grad = g if g is None or g.stride() == p.stride() else torch.empty_like(p).copy_(g)
        for (key, _), g in zip(self._live, grads[n:n + len(views)], strict=True):
            self._grad_at[key] = g
        for m, g in zip(self._tables if tables else [], grads[n + len(views):], strict=True):
            if g is not None:
                raise ValueError(f"embedding table {tuple(m.weight.shape)} gets gradients outside its lookups of "
                                 "the batch's ids; build it with sparse=False")
        self._checked = True

    def _position_grads(self, k: int, batch: Batch) -> torch.Tensor | None:
        """Table ``k``'s gradient at each position of :meth:`_row_ids`, or None if nothing looked it up: [B, F, dim]
        as the backward left it (often a slice of a wider gradient) for ids alone, else [n, dim]."""
        dim = self._tables[k].weight.shape[1]
        parts = [(x, self._grad_at[(k, x.dim())]) for x in (batch.ids, batch.seq) if x is not None]
        if all(g is None for _, g in parts):
            return None
        if len(parts) == 1:
            return parts[0][1]
        return torch.cat([g.reshape(-1, dim) if g is not None else torch.zeros(x.numel(), dim, device=x.device)
                          for x, g in parts])

    def _sort_rows(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`rows_gpu.sort_rows` of the batch's rows, queued on the sorting stream where there is one (the
        caller waits for it before using the result)."""
        if self._sorter is None:
            return rows_gpu.sort_rows(self._row_ids(batch))
        main = torch.cuda.current_stream(self.device)
        self._sorter.wait_stream(main)  # the batch's ids are written on the main stream
        with torch.cuda.stream(self._sorter):
            keys, perm = rows_gpu.sort_rows(self._row_ids(batch))
        keys.record_stream(main)
        perm.record_stream(main)
        return keys, perm

    def _update_tables(self, batch: Batch, lr: torch.Tensor,
                       order: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Lazy Adam / Adagrad at the batch's rows of every table with the rows' learning rate ``lr`` (from
        :meth:`_advance`), from the gradients at its positions; ``order`` is :meth:`_sort_rows`'s, queued before the
        backward pass."""
        b1, b2 = self.betas
        live = [(k, m, g) for k, m in enumerate(self._tables) if (g := self._position_grads(k, batch)) is not None]
        clip = self.rule.clip if self.rule is not None else None
        row_lr = self.rule.row_lr if self.rule is not None else None
        if self._fused:
            keys, perm = order if order is not None else self._sort_rows(batch)
            if self._sorter is not None:
                torch.cuda.current_stream(self.device).wait_stream(self._sorter)
            rows_gpu.update([(m.weight.detach(), g, self._row_state[k]) for k, m, g in live], keys, perm, lr,
                            self.optimizer, b1, b2, self.eps, clip, row_lr)
            return
        rows = self._row_ids(batch).long()
        counts = None
        if self._counts is not None:
            self._counts.index_add_(0, rows, torch.ones_like(rows, dtype=self._counts.dtype))
            counts = self._counts.index_select(0, rows)
            self._counts.index_fill_(0, rows, 0.0)
        if row_lr is not None:
            lr = lr * counts.clamp(max=row_lr[0]).to(lr.dtype).pow(row_lr[1]).unsqueeze(1)
        for k, m, g in live:
            buf = self._grads[k]
            buf.index_add_(0, rows, g.reshape(len(rows), -1).to(buf.dtype))
            grad = buf.index_select(0, rows)
            buf.index_fill_(0, rows, 0.0)
            if clip is not None:
                grad = cowclip(grad, m.weight.index_select(0, rows), counts, *clip)
            update_rows_(m.weight, rows, grad, self._row_state[k], self.optimizer, lr, b1, b2, self.eps)

    def _advance(self, loss: torch.Tensor, total: torch.Tensor) -> torch.Tensor | None:
        """The step's bookkeeping on the device: the loss sum, the step count, the first non-finite step and, with
        row updates, the rows' step count and learning rate (Adam's bias correction folded in), which it returns."""
        self._loss_sum += loss
        self._step_no += 1
        self._bad.copy_(torch.where((self._bad < 0) & ~torch.isfinite(total), self._step_no, self._bad))
        if not self._tables:
            return None
        self._t += 1
        b1, b2 = self.betas
        if self.optimizer == "adam":
            return self._lr_rows * torch.sqrt(1 - b2 ** self._t) / (1 - b1 ** self._t)
        return self._lr_rows

    def _dense_step(self, loss: torch.Tensor, total: torch.Tensor) -> torch.Tensor | None:
        """:meth:`_advance` and the dense weights' Adam step, which the step compiles together: run eagerly, each
        scalar operation of the bookkeeping is a kernel launch of its own."""
        lr = self._advance(loss, total)
        self._foreach.step()  # type: ignore[union-attr]
        return lr

    def _run(self, batch: Batch, compiled: bool = True) -> None:
        """Forward, backward and every update, as plain device work (what the CUDA graph records)."""
        for o in self.opts:
            o.zero_grad(set_to_none=True)
        for m in self._tables:
            m.weight.grad = None
        if self._tables:
            self._set_positions(batch)
        order = self._sort_rows(batch) if self.row_updates and self._fused else None
        loss, total = self._call_compiled("train", batch) if compiled else self._forward_loss(batch)
        if self._tables:
            self._backward_rows(total)
        else:
            total.backward()
        if self.ddp and self._sparse:
            allreduce_sparse_(self._sparse)
        with torch.no_grad():
            lr = (self._call_compiled("dense", loss, total.detach()) if self._foreach is not None
                  else self._advance(loss, total.detach()))
            for o in self.opts:
                if o is not self._foreach:
                    o.step()
            if self._tables:
                self._update_tables(batch, lr, order)

    # ---- the public step ---------------------------------------------------------------------------------------

    def __call__(self, batch: Batch) -> None:
        """Train on ``batch``; the loss stays on the device (read it with :meth:`loss_mean`)."""
        self._calls += 1
        self._set_dense_lr(self._base_lr * self._warmup_factor(self._calls))
        self._loss_n += 1
        if not self.graphs:
            self._run(batch)
            return
        if self._static is not None and (batch is self._static or self._fits(batch)):
            if batch is not self._static:  # a batch gathered into the step's inputs needs no copy
                self._copy_in(batch)
            self._graph.replay()  # type: ignore[union-attr]
        elif self._static is None and self._calls > WARMUP_STEPS and len(batch) >= self._widest:
            self._capture(batch)  # the shape of a full batch, not of an epoch's last one
        elif self._static is None:  # warm-up on a side stream, as CUDA graph capture wants it
            self._widest = max(self._widest, len(batch))
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._run(batch)
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:  # a batch of another shape (the last of an epoch): eager, so that nothing recompiles
            self._run(batch, compiled=False)

    @property
    def inputs(self) -> Batch | None:
        """The captured step's input tensors, once it is captured: a batch gathered into them (``BatchIterator.into``)
        trains without the copy into them."""
        return self._static

    def _fits(self, batch: Batch) -> bool:
        s = self._static
        assert s is not None
        return all((getattr(batch, k) is None) == (getattr(s, k) is None) and
                   (getattr(batch, k) is None or getattr(batch, k).shape == getattr(s, k).shape)
                   for k in BATCH_FIELDS)

    def _copy_in(self, batch: Batch) -> None:
        s = self._static
        assert s is not None
        for k in BATCH_FIELDS:
            src = getattr(batch, k)
            if src is not None:
                getattr(s, k).copy_(src, non_blocking=True)

    def _capture(self, batch: Batch) -> None:
        """Record the step on this batch's shapes once, then replay it for this batch."""
        self._static = Batch(**{k: None if getattr(batch, k) is None else getattr(batch, k).clone()
                                for k in BATCH_FIELDS})
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._run(self._static)
        except RuntimeError as err:  # an op that cannot be captured: keep training, uncaptured
            warnings.warn(f"CUDA graph capture failed ({err}); training continues without graphs", stacklevel=2)
            self.graphs, self._static = False, None
            torch.cuda.synchronize(self.device)
            self._run(batch)
            return
        self._graph = graph
        graph.replay()  # the capture recorded the step without running it: this replay is the batch's step

    def _set_dense_lr(self, lr: float) -> None:
        """Give the dense weights' optimizer ``lr`` (a device write only when it changes)."""
        if lr == self._dense_lr:
            return
        self._dense_lr = lr
        if self._lr_dense is not None:
            self._lr_dense.fill_(lr)
            return
        for o in self.opts:
            if not isinstance(o, RowSparseOptimizer):
                for g in o.param_groups:
                    g["lr"] = lr

    def set_lr(self, lr: float) -> None:
        """A new base learning rate (after a plateau): rows get ``lr``, dense weights ``lr`` times the rule's factor."""
        self._base_lr = lr
        if self._sharded is not None:
            sharded.set_table_lr(self._sharded, lr)
        if self.row_updates:
            self._lr_rows.fill_(lr)
        for o in self.opts:
            if isinstance(o, RowSparseOptimizer):
                for g in o.param_groups:
                    g["lr"] = lr
        self._set_dense_lr(lr * self._warmup_factor(self._calls + 1))

    def loss_mean(self) -> float | None:
        """Mean training loss over the steps since the last read, or None while the device is still busy.

        On a GPU the sum is copied to pinned memory behind the queued work and read once that copy is done, so
        calling this never stalls the device.
        """
        if not self.cuda:
            if self._loss_n == 0:
                return None
            value = float(self._loss_sum) / self._loss_n
            self._loss_sum.zero_()
            self._loss_n = 0
            return value
        if self._event is None:
            self._host = torch.zeros((), pin_memory=True)
            self._event = torch.cuda.Event()
        value = None
        if self._pending and self._event.query():
            value = float(self._host) / self._pending  # type: ignore[arg-type]
            self._pending = 0
        if not self._pending and self._loss_n:
            self._host.copy_(self._loss_sum, non_blocking=True)  # type: ignore[union-attr]
            self._event.record()
            self._loss_sum.zero_()
            self._pending, self._loss_n = self._loss_n, 0
        return value

    def first_nonfinite(self, wait: bool = True) -> int | None:
        """The first step (1-based, counted since this step was built) whose loss was NaN or infinite, or None.

        Kept on the device. ``wait``: read it now, with one sync (before a checkpoint, at an epoch's end). Else, on
        a GPU, the value copied behind the steps queued at the previous such call, once that copy is done, and a
        new copy is queued: a divergence is seen a call or two late, without the device ever waiting for the host.
        """
        if wait or not self.cuda:
            bad = int(self._bad)
            return bad if bad >= 0 else None
        if self._bad_event is None:
            self._bad_host = torch.full((), -1, dtype=torch.int64, pin_memory=True)
            self._bad_event = torch.cuda.Event()
        elif not self._bad_event.query():
            return None
        bad = int(self._bad_host)  # type: ignore[arg-type]
        self._bad_host.copy_(self._bad, non_blocking=True)  # type: ignore[union-attr]
        self._bad_event.record()
        return bad if bad >= 0 else None

    def state_dict(self) -> dict[str, Any]:
        """A copy of everything the updates remember (optimizer states, row moments, step counts), for a
        checkpoint. TorchRec-sharded tables keep their fused optimizer state beside their shards
        (:func:`ctrkit.training.sharded.checkpoint_state`), not here."""
        rows = [[t.detach().cpu().clone() for t in st] for st in self._row_state] if self.row_updates else []
        return {"opts": [copy.deepcopy(o.state_dict()) for o in self.opts], "rows": rows, "calls": self._calls,
                "t": float(self._t) if self.row_updates else 0.0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` of a step built the same way."""
        if len(state["opts"]) != len(self.opts) or len(state["rows"]) != (len(self._row_state)
                                                                         if self.row_updates else 0):
            raise ValueError("the saved training state belongs to a step with other optimizers or tables")
        for o, s in zip(self.opts, state["opts"], strict=True):
            o.load_state_dict(s)
        if self.row_updates:
            for st, saved in zip(self._row_state, state["rows"], strict=True):
                for t, v in zip(st, saved, strict=True):
                    t.copy_(v)
            self._t.fill_(state["t"])
        self._calls = state["calls"]
        self._set_dense_lr(self._base_lr * self._warmup_factor(self._calls + 1))

    def close(self) -> None:
        """Wait for the queued steps, drop the graph and give the tables back their sparse gradients (TorchRec
        tables are gathered back into plain ones)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        if self._sharded is not None:
            sharded.unshard(self.model)
            self._sharded = None
            self._net = self.model
        self._graph, self._static = None, None
        for m in self._tables:
            m.weight.grad = None
            m.sparse = True
            m.__dict__.pop("forward", None)
