"""Row-wise optimizers for embedding tables with sparse gradients.

A batch touches a few thousand rows of a table that may hold millions. These optimizers sum the batch's
gradient per distinct row and update only those rows (and their optimizer state), so a step costs what
the batch touches. Adam here is the "lazy" variant: moments of untouched rows are not decayed, and the
bias correction uses the global step, as in TensorFlow's LazyAdam and torch's SparseAdam. Row-wise Adagrad keeps
one accumulator per row (the mean of the row's squared gradient), not one per entry: the optimizer state of a
table with billions of rows is then a vector, not a second table (the DLRM / FBGEMM choice for large tables).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

RULES = ("adam", "adagrad", "rowwise_adagrad")
MARK_ROWS = 1 << 24
_NO_CORRECTION = torch.tensor(1e12)  # a step count whose bias corrections 1 - beta ** step are exactly 1


def cowclip(grad: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, ratio: float = 1.0,
            floor: float = 1e-5) -> torch.Tensor:
    """Adaptive column-wise clipping (CowClip, Zheng et al., AAAI 2023) of embedding-row gradients.

    Row i's gradient (summed over its ``counts[i]`` uses in the batch) is scaled down to norm at most
    ``counts[i] * max(ratio * ||w_i||, floor)``, so a large batch cannot move a rare id's embedding further,
    relative to its size, than one use of it may; ``grad`` and ``weight`` are [rows, dim].
    """
    norm = torch.linalg.vector_norm(grad, dim=1)
    limit = counts * torch.clamp(ratio * torch.linalg.vector_norm(weight, dim=1), min=floor)
    return grad * (limit / torch.maximum(norm, limit)).unsqueeze(1)


def update_rows_(p: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, state: tuple[torch.Tensor, ...],
                 rule: str, lr: float | torch.Tensor, b1: float, b2: float, eps: float) -> None:
    """One Adam (``state`` = (m, v), ``lr`` already bias-corrected), Adagrad (``state`` = (sum,)) or row-wise
    Adagrad (``state`` = (sum per row,)) update of ``p`` at ``rows`` with their summed gradients ``grad``.

    Every read happens before any write, so ``rows`` may repeat a row as long as its ``grad`` rows repeat too:
    each copy then writes the same values (the GPU path relies on this to keep shapes static).
    """
    w = p.index_select(0, rows)
    if rule == "adam":
        m_all, v_all = state
        m, v = m_all.index_select(0, rows), v_all.index_select(0, rows)
        # on a CPU, torch's fused Adam does the update in one pass instead of eight (4.5 ms of a 13 ms update of
        # 98k rows of 16 on 2 cores); its bias corrections 1 - beta ** step are made exactly 1 by a step far past
        # any real one, since ``lr`` comes corrected
        fused = type(lr) is float and p.device.type == "cpu"
        if fused:
            torch._fused_adam_([w], [grad], [m], [v], [], [_NO_CORRECTION], lr=lr, beta1=b1, beta2=b2,
                               weight_decay=0.0, eps=eps, amsgrad=False, maximize=False)
        else:
            m.mul_(b1).add_(grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        m_all.index_copy_(0, rows, m)
        v_all.index_copy_(0, rows, v)
        update = None if fused else m.div_(v.sqrt_().add_(eps)).mul_(lr)  # fused: w is updated already
    elif rule == "rowwise_adagrad":
        (acc_all,) = state
        acc = acc_all.index_select(0, rows).add_(grad.pow(2).mean(dim=1))
        acc_all.index_copy_(0, rows, acc)
        update = grad.div(acc.sqrt_().add_(eps).unsqueeze(1)).mul_(lr)
    else:
        (acc_all,) = state
        acc = acc_all.index_select(0, rows).addcmul_(grad, grad)
        acc_all.index_copy_(0, rows, acc)
        update = grad.div(acc.sqrt_().add_(eps)).mul_(lr)
    # read-modify-write of whole rows: on a CPU an order of magnitude faster than index_add_, which walks the
    # rows one at a time
    p.index_copy_(0, rows, w if update is None else w.sub_(update))


class RowSparseOptimizer(torch.optim.Optimizer):
    """Adam, Adagrad or row-wise Adagrad on 2-D parameters whose gradients are sparse COO tensors over rows.

    ``clip`` = (ratio, floor) applies :func:`cowclip` to each row's summed gradient first; ``row_lr`` = (cap,
    power) multiplies a row's learning rate by min(its uses in the batch, cap) ** power.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3, rule: str = "adam",
                 betas: tuple[float, float] = (0.9, 0.999), eps: float | None = None,
                 initial_accumulator: float = 0.0, clip: tuple[float, float] | None = None,
                 row_lr: tuple[float, float] | None = None) -> None:
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        eps = eps if eps is not None else (1e-8 if rule == "adam" else 1e-10)
        self.clip, self.row_lr = clip, row_lr
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "rule": rule,
                                  "initial_accumulator": initial_accumulator})

    @staticmethod
    def _distinct(state: dict, idx: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted distinct rows of ``idx`` and each id's position among them.

        Up to ``MARK_ROWS`` rows this uses a marker array (scatter, nonzero, gather: linear, no sort), which
        on a CPU is several times cheaper than ``torch.unique``'s sort; larger tables fall back to the sort.
        """
        if n_rows > MARK_ROWS:
            return torch.unique(idx, return_inverse=True)
        if "mark" not in state:
            state["mark"] = torch.zeros(n_rows, dtype=torch.bool, device=idx.device)
            state["pos"] = torch.zeros(n_rows, dtype=torch.int64, device=idx.device)
        mark, pos = state["mark"], state["pos"]
        # index_fill_ / index_copy_ / index_select: dedicated kernels, about twice as fast as `t[i] = v`
        mark.index_fill_(0, idx, True)
        rows = mark.nonzero().squeeze(1)
        mark.index_fill_(0, rows, False)
        pos.index_copy_(0, rows, torch.arange(len(rows), device=idx.device))
        return rows, pos.index_select(0, idx)

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        """Restore moments and step counts; the scratch buffers of :meth:`_distinct` are rebuilt on use."""
        super().load_state_dict(state_dict)
        for st in self.state.values():
            st.pop("mark", None)
            st.pop("pos", None)

    @torch.no_grad()
    def step(self, closure: object = None) -> None:  # type: ignore[override]
        """Apply one update to the rows present in each parameter's sparse gradient."""
        # tables looked up with the same ids (an FM's first- and second-order tables) share their distinct rows
        seen: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []
        for group in self.param_groups:
            lr, eps, rule = group["lr"], group["eps"], group["rule"]
            b1, b2 = group["betas"]
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if not g.is_sparse:
                    raise ValueError("RowSparseOptimizer expects sparse gradients (nn.Embedding(sparse=True))")
                idx = g._indices()[0]
                vals = g._values()
                state = self.state[p]
                hit = next(((r, i) for ids, n, r, i in seen
                            if n == p.shape[0] and ids.shape == idx.shape and torch.equal(ids, idx)), None)
                rows, inverse = hit if hit is not None else self._distinct(state, idx, p.shape[0])
                if hit is None:
                    seen.append((idx, p.shape[0], rows, inverse))
                grad = torch.zeros(len(rows), p.shape[1], dtype=vals.dtype, device=vals.device)
                grad.index_add_(0, inverse, vals)
                counts = (torch.bincount(inverse, minlength=len(rows)).to(grad.dtype)
                          if self.clip is not None or self.row_lr is not None else None)
                if self.clip is not None:
                    grad = cowclip(grad, p.index_select(0, rows), counts, *self.clip)
                if self.row_lr is not None:
                    lr = group["lr"] * counts.clamp(max=self.row_lr[0]).pow(self.row_lr[1]).unsqueeze(1)
                if rule == "adam" and "m" not in state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)
                if rule != "adam" and "sum" not in state:
                    shape = p.shape[:1] if rule == "rowwise_adagrad" else p.shape
                    state["sum"] = torch.full(shape, group["initial_accumulator"], dtype=p.dtype, device=p.device)
                if rule == "adam":
                    state["step"] += 1
                    t = state["step"]
                    scale = lr * (1 - b2 ** t) ** 0.5 / (1 - b1 ** t)
                    update_rows_(p, rows, grad, (state["m"], state["v"]), rule, scale, b1, b2, eps)
                else:
                    update_rows_(p, rows, grad, (state["sum"],), rule, lr, b1, b2, eps)
