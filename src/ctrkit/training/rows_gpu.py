"""Fused row updates of embedding tables on a GPU: lazy Adam / Adagrad (and CowClip) at the batch's rows.

A batch of B rows and F fields reads B * F table rows, many of them repeated. The portable update
(:func:`~ctrkit.training.optim.update_rows_`) gathers weight, gradient and moments at every position, updates
them and scatters them back, in separate kernels so that repeated rows write identical values; on a GPU the
gathers of [B * F, dim] blocks dominate a large batch's step. Here two Triton kernels do the same work with one
read and one write of each distinct row:

* ``claim``: each block of positions, sorted by row, writes one of its positions per distinct row into
  ``owner[row]``; one of a repeated row's positions wins. With CowClip it also counts each row's uses, one atomic
  add per row and block (Criteo-shaped batches put tens of thousands of positions on a few rows).
* ``update``: the position that owns its row reads the row's summed gradient (the table's dense gradient),
  weight and moments, clips, updates and writes them back; the other positions do nothing.

Both have static shapes and no host synchronisation, so a CUDA graph can hold them.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch: the portable update is used instead
    triton = None

AVAILABLE = triton is not None
BLOCK_POSITIONS = 1024


if AVAILABLE:
    @triton.jit
    def _max(a, b):  # type: ignore[no-untyped-def]
        return tl.maximum(a, b)

    @triton.jit
    def _claim(rows_ptr, owner_ptr, counts_ptr, n,  # type: ignore[no-untyped-def]
               COUNT: tl.constexpr, BLOCK: tl.constexpr, SHIFT: tl.constexpr):
        # The block's positions sorted by row (key = row * BLOCK + position in the block, BLOCK = 2 ** SHIFT): the
        # last position of each run of equal rows stores itself as the row's owner and adds the run's length to
        # the row's count, so a row that fills the block costs one store and one atomic add, not BLOCK of each.
        i = tl.arange(0, BLOCK)
        offs = tl.program_id(0) * BLOCK + i
        mask = offs < n
        r = tl.load(rows_ptr + offs, mask=mask, other=0).to(tl.int64)
        key = tl.sort(tl.where(mask, r, -1) * BLOCK + i.to(tl.int64))  # masked positions first, as row -1
        row = key >> SHIFT
        prev = tl.gather(row, tl.maximum(i - 1, 0), 0)
        nxt = tl.gather(row, tl.minimum(i + 1, BLOCK - 1), 0)
        last = ((row != nxt) | (i == BLOCK - 1)) & (row >= 0)
        pos = tl.program_id(0) * BLOCK + (key & (BLOCK - 1)).to(tl.int32)
        tl.store(owner_ptr + row, pos, mask=last)
        if COUNT:
            first = tl.associative_scan(tl.where((row != prev) | (i == 0), i, 0), 0, _max)
            tl.atomic_add(counts_ptr + row, (i - first + 1).to(tl.float32), mask=last, sem="relaxed")

    @triton.jit
    def _update(rows_ptr, owner_ptr, counts_ptr, w_ptr, g_ptr, s1_ptr, s2_ptr, lr_ptr,  # type: ignore[no-untyped-def]
                n, dim, b1, b2, eps, clip_ratio, clip_floor, lr_cap, lr_power, ADAM: tl.constexpr,
                CLIP: tl.constexpr, COUNT_LR: tl.constexpr, COUNTS: tl.constexpr, RESET: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        offs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        in_range = offs < n
        r = tl.load(rows_ptr + offs, mask=in_range, other=0).to(tl.int64)
        own = tl.load(owner_ptr + r, mask=in_range, other=-1)
        active = in_range & (own == offs)
        cols = tl.arange(0, BLOCK_D)
        m2 = active[:, None] & (cols < dim)[None, :]
        at = r[:, None] * dim + cols[None, :]
        g = tl.load(g_ptr + at, mask=m2, other=0.0)
        w = tl.load(w_ptr + at, mask=m2, other=0.0)
        lr = tl.load(lr_ptr).to(tl.float32)
        if COUNTS:
            cnt = tl.load(counts_ptr + r, mask=active, other=1.0)
            if RESET:
                tl.store(counts_ptr + r, 0.0, mask=active)
        if CLIP:
            g_norm = tl.sqrt(tl.sum(g * g, axis=1))
            limit = cnt * tl.maximum(clip_ratio * tl.sqrt(tl.sum(w * w, axis=1)), clip_floor)
            g = g * (limit / tl.maximum(g_norm, limit))[:, None]
        if COUNT_LR:
            row_lr = (lr * tl.exp2(lr_power * tl.log2(tl.minimum(cnt, lr_cap))))[:, None]
        else:
            row_lr = lr
        s1 = tl.load(s1_ptr + at, mask=m2, other=0.0)
        if ADAM:
            s2 = tl.load(s2_ptr + at, mask=m2, other=0.0)
            s1 = b1 * s1 + (1.0 - b1) * g
            s2 = b2 * s2 + (1.0 - b2) * g * g
            w = w - row_lr * (s1 / (tl.sqrt(s2) + eps))
            tl.store(s2_ptr + at, s2, mask=m2)
        else:
            s1 = s1 + g * g
            w = w - row_lr * (g / (tl.sqrt(s1) + eps))
        tl.store(s1_ptr + at, s1, mask=m2)
        tl.store(w_ptr + at, w, mask=m2)


def claim(rows: torch.Tensor, owner: torch.Tensor, counts: torch.Tensor | None) -> None:
    """Mark one owning position per distinct row of ``rows`` in ``owner`` (int32, one per table row); with
    ``counts`` (float32, zero on entry) also count each row's uses."""
    n = rows.numel()
    grid = (triton.cdiv(n, BLOCK_POSITIONS),)
    _claim[grid](rows, owner, owner if counts is None else counts, n, COUNT=counts is not None,
                 BLOCK=BLOCK_POSITIONS, SHIFT=BLOCK_POSITIONS.bit_length() - 1)


def update(weight: torch.Tensor, grad: torch.Tensor, state: tuple[torch.Tensor, ...], rows: torch.Tensor,
           owner: torch.Tensor, lr: torch.Tensor, rule: str, b1: float, b2: float, eps: float,
           counts: torch.Tensor | None = None, clip: tuple[float, float] | None = None,
           row_lr: tuple[float, float] | None = None, reset: bool = True) -> None:
    """Update ``weight`` [rows, dim] and its ``state`` at the distinct rows of ``rows`` (after :func:`claim`).

    ``lr`` is a device scalar (Adam's already bias-corrected); ``clip`` = (ratio, floor) applies CowClip with
    ``counts``; ``row_lr`` = (cap, power) multiplies a row's learning rate by min(count, cap) ** power. The call
    zeroes ``counts`` again at the rows it read when ``reset``.
    """
    if not (weight.is_contiguous() and grad.is_contiguous() and all(s.is_contiguous() for s in state)):
        raise ValueError("fused row updates need contiguous weight, gradient and state")
    n, dim = rows.numel(), weight.shape[1]
    block_d = max(triton.next_power_of_2(dim), 2)
    block_r = max(16, min(256, 4096 // block_d))
    adam = rule == "adam"
    s1 = state[0]
    s2 = state[1] if adam else s1
    ratio, floor = clip if clip is not None else (0.0, 0.0)
    cap, power = row_lr if row_lr is not None else (1.0, 0.0)
    if (clip is not None or row_lr is not None) and counts is None:
        raise ValueError("CowClip and count-scaled learning rates need the rows' counts")
    grid = (triton.cdiv(n, block_r),)
    _update[grid](rows, owner, counts if counts is not None else s1, weight, grad, s1, s2, lr, n, dim,
                  b1, b2, eps, ratio, floor, cap, power, ADAM=adam, CLIP=clip is not None,
                  COUNT_LR=row_lr is not None,
                  COUNTS=clip is not None or row_lr is not None, RESET=reset, BLOCK_R=block_r, BLOCK_D=block_d)
