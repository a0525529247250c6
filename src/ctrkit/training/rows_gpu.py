"""Fused row updates of embedding tables on a GPU: lazy Adam / Adagrad (and CowClip) at the batch's rows.

A batch of B rows and F fields reads B * F table rows, many of them repeated: Criteo-shaped batches put tens of
thousands of positions on a few rows. The training step hands over the gradient at each looked-up position
([B * F, dim], no [rows, dim] table gradient); here the positions are sorted by row once (:func:`sort_rows`,
a radix sort), and :func:`update` sums each row's run of positions and updates the row, with one read and one
write of each distinct row and no atomics:

* ``_runs``: each block of sorted positions sums its runs of equal rows in registers (a segmented scan, which
  restarts at each run's first position) and updates every row whose run starts and ends inside the block. A run
  that crosses the block's end leaves its partial sum and count with the block; the block where a row's run
  starts owns it.
* ``_spans``: each owning block adds the partial sums of the blocks its run covers (hundreds for the hottest
  rows, read in chunks) and updates the row.

All have static shapes and no host synchronisation, so a CUDA graph can hold them.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch: the portable update is used instead
    triton = None

AVAILABLE = triton is not None
BLOCK_POSITIONS = 128
WARPS = 4
SPAN_CHUNK = 64  # blocks read at once while adding up a run that crosses blocks


if AVAILABLE:
    @triton.jit
    def _max(a, b):  # type: ignore[no-untyped-def]
        return tl.maximum(a, b)

    @triton.jit
    def _segment_add(a, a_starts, b, b_starts):  # type: ignore[no-untyped-def]
        # (sum, starts a run) pairs: a run that starts in the right operand drops what came before it
        return tl.where(b_starts != 0, b, a + b), a_starts | b_starts

    @triton.jit
    def _apply(w_ptr, s1_ptr, s2_ptr, row, cols, g, cnt, m2, lr, dim, b1, b2, eps,  # type: ignore[no-untyped-def]
               clip_ratio, clip_floor, lr_cap, lr_power, ADAM: tl.constexpr, CLIP: tl.constexpr,
               COUNT_LR: tl.constexpr):
        # one update of rows ``row`` [R] with their summed gradients g [R, BLOCK_D] and uses cnt [R]
        at = row[:, None] * dim + cols[None, :]
        w = tl.load(w_ptr + at, mask=m2, other=0.0)
        s1 = tl.load(s1_ptr + at, mask=m2, other=0.0)
        if CLIP:
            g_norm = tl.sqrt(tl.sum(g * g, axis=1))
            limit = cnt * tl.maximum(clip_ratio * tl.sqrt(tl.sum(w * w, axis=1)), clip_floor)
            g = g * (limit / tl.maximum(g_norm, limit))[:, None]
        if COUNT_LR:
            row_lr = (lr * tl.exp2(lr_power * tl.log2(tl.minimum(cnt, lr_cap))))[:, None]
        else:
            row_lr = lr
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

    @triton.jit
    def _table_runs(g_ptr, w_ptr, s1_ptr, s2_ptr, part_ptr, pid, p, k, inb, start, done,  # type: ignore[no-untyped-def]
                    crossing, head_last, cnt, lr, dim, g_fields, g_stride0, g_stride1, b1, b2, eps, clip_ratio,
                    clip_floor, lr_cap, lr_power, ADAM: tl.constexpr, CLIP: tl.constexpr, COUNT_LR: tl.constexpr,
                    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
        # one table's part of a block: sum its runs, update the rows whose run ends here, leave the partial sums
        at_g = (p // g_fields) * g_stride0 + (p % g_fields) * g_stride1  # position p of a [n / F, F, dim] view
        cols = tl.arange(0, BLOCK_D)
        col_ok = (cols < dim)[None, :]
        g = tl.load(g_ptr + at_g[:, None] + cols[None, :], mask=inb[:, None] & col_ok, other=0.0).to(tl.float32)
        # each run's sums so far: a segmented scan, restarted at each run's first position (float32: its tree of
        # additions rounds no worse than a sequential float32 sum; a float64 scan made the kernel 15% slower)
        flag = tl.broadcast_to(start.to(tl.int32)[:, None], (BLOCK, BLOCK_D))
        s, _ = tl.associative_scan((g, flag), 0, _segment_add)
        _apply(w_ptr, s1_ptr, s2_ptr, k.to(tl.int64), cols, s, cnt, done[:, None] & col_ok, lr, dim, b1, b2, eps,
               clip_ratio, clip_floor, lr_cap, lr_power, ADAM, CLIP, COUNT_LR)
        part_at = part_ptr + (pid * 2) * BLOCK_D + cols[None, :] + (k * 0)[:, None]
        tl.store(part_at, s, mask=crossing[:, None])
        tl.store(part_at + BLOCK_D, s, mask=head_last[:, None])

    @triton.jit
    def _runs(keys_ptr, perm_ptr, lr_ptr, info_ptr, n, b1, b2, eps,  # type: ignore[no-untyped-def]
              clip_ratio, clip_floor, lr_cap, lr_power,
              g_ptr, w_ptr, s1_ptr, s2_ptr, part_ptr, dim, g_fields, g_stride0, g_stride1,
              g2_ptr, w2_ptr, s1b_ptr, s2b_ptr, part2_ptr, dim2, g2_fields, g2_stride0, g2_stride1,
              ADAM: tl.constexpr, CLIP: tl.constexpr, COUNT_LR: tl.constexpr, TWO: tl.constexpr,
              BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr):
        # info per block: [0] the row of a run that starts here and crosses the block's end (-1: none), [1] its
        # uses here; for a block that starts inside a run, [2] that run's uses here and [3] whether it ends here.
        # part per block and table: [0] the crossing run's sum here, [1] the sum here of the run the block starts
        # inside of. The second table (TWO), looked up with the same ids, shares the sort and the runs.
        pid = tl.program_id(0)
        i = tl.arange(0, BLOCK)
        offs = pid.to(tl.int64) * BLOCK + i
        inb = offs < n
        k = tl.load(keys_ptr + offs, mask=inb, other=-1)
        prev = tl.load(keys_ptr + offs - 1, mask=inb & (offs > 0), other=-2)
        nxt = tl.load(keys_ptr + offs + 1, mask=(offs + 1) < n, other=-3)
        start = inb & (k != prev)
        end = inb & (k != nxt)
        p = tl.load(perm_ptr + offs, mask=inb, other=0).to(tl.int64)
        first = tl.associative_scan(tl.where(start | (i == 0), i, 0), 0, _max)  # where each run enters the block
        cnt = (i - first + 1).to(tl.float32)
        block_start = pid.to(tl.int64) * BLOCK
        k0 = tl.load(keys_ptr + block_start)
        start0 = k0 != tl.load(keys_ptr + block_start - 1, mask=block_start > 0, other=-2)
        began = (first > 0) | start0  # the run started in this block, not before it
        done = end & began
        last = i == BLOCK - 1
        crossing = last & inb & ~end
        head_last = (first == 0) & ~start0 & inb & (end | last)  # the end, here, of a run begun before the block
        lr = tl.load(lr_ptr).to(tl.float32)
        _table_runs(g_ptr, w_ptr, s1_ptr, s2_ptr, part_ptr, pid, p, k, inb, start, done, crossing, head_last, cnt,
                    lr, dim, g_fields, g_stride0, g_stride1, b1, b2, eps, clip_ratio, clip_floor, lr_cap, lr_power,
                    ADAM, CLIP, COUNT_LR, BLOCK, BLOCK_D)
        if TWO:
            _table_runs(g2_ptr, w2_ptr, s1b_ptr, s2b_ptr, part2_ptr, pid, p, k, inb, start, done, crossing,
                        head_last, cnt, lr, dim2, g2_fields, g2_stride0, g2_stride1, b1, b2, eps, clip_ratio,
                        clip_floor, lr_cap, lr_power, ADAM, CLIP, COUNT_LR, BLOCK, BLOCK_D2)
        # what _spans needs, each stored by the one position that holds it (no reductions across the block)
        info_at = info_ptr + pid * 4 + i * 0
        tl.store(info_at, tl.where(crossing & began, k, -1), mask=last)
        tl.store(info_at + 1, i - first + 1, mask=crossing)
        tl.store(info_at + 2, i + 1, mask=head_last)
        tl.store(info_at + 3, end.to(tl.int32), mask=head_last)

    @triton.jit
    def _spans(lr_ptr, info_ptr, n_blocks, b1, b2, eps, clip_ratio, clip_floor,  # type: ignore[no-untyped-def]
               lr_cap, lr_power, w_ptr, s1_ptr, s2_ptr, part_ptr, dim, w2_ptr, s1b_ptr, s2b_ptr, part2_ptr, dim2,
               ADAM: tl.constexpr, CLIP: tl.constexpr, COUNT_LR: tl.constexpr, TWO: tl.constexpr,
               CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr):
        pid = tl.program_id(0)
        row = tl.load(info_ptr + pid * 4)
        if row >= 0:
            cols = tl.arange(0, BLOCK_D)
            cols2 = tl.arange(0, BLOCK_D2)
            total = tl.load(part_ptr + (pid * 2) * BLOCK_D + cols)
            total2 = tl.zeros([BLOCK_D2], tl.float32)
            if TWO:
                total2 = tl.load(part2_ptr + (pid * 2) * BLOCK_D2 + cols2)
            uses = tl.load(info_ptr + pid * 4 + 1).to(tl.float32)
            j = pid + 1
            open_run = row >= 0
            while open_run:  # the next CHUNK blocks: add each one's head up to the block where the run ends
                b = j + tl.arange(0, CHUNK)
                there = b < n_blocks
                closes = tl.load(info_ptr + b * 4 + 3, mask=there, other=1)
                stop = tl.min(tl.where(closes != 0, b, j + CHUNK), axis=0)
                take = there & (b <= stop)
                total += tl.sum(tl.load(part_ptr + (b * 2 + 1)[:, None] * BLOCK_D + cols[None, :],
                                        mask=take[:, None], other=0.0), axis=0)
                if TWO:
                    total2 += tl.sum(tl.load(part2_ptr + (b * 2 + 1)[:, None] * BLOCK_D2 + cols2[None, :],
                                             mask=take[:, None], other=0.0), axis=0)
                uses += tl.sum(tl.load(info_ptr + b * 4 + 2, mask=take, other=0), axis=0).to(tl.float32)
                open_run = stop >= j + CHUNK
                j += CHUNK
            lr = tl.load(lr_ptr).to(tl.float32)
            one = tl.full([1], 0, tl.int64) + row
            cnt = tl.full([1], 0.0, tl.float32) + uses
            _apply(w_ptr, s1_ptr, s2_ptr, one, cols, total[None, :], cnt, (cols < dim)[None, :], lr, dim, b1, b2,
                   eps, clip_ratio, clip_floor, lr_cap, lr_power, ADAM, CLIP, COUNT_LR)
            if TWO:
                _apply(w2_ptr, s1b_ptr, s2b_ptr, one, cols2, total2[None, :], cnt, (cols2 < dim2)[None, :], lr,
                       dim2, b1, b2, eps, clip_ratio, clip_floor, lr_cap, lr_power, ADAM, CLIP, COUNT_LR)


def sort_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The looked-up ``rows`` (int32 or int64) sorted, and the position each sorted key came from."""
    keys, perm = torch.sort(rows.reshape(-1))
    return keys, perm


Table = tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]  # (weight, gradient at positions, state)


def update(tables: list[Table], keys: torch.Tensor, perm: torch.Tensor, lr: torch.Tensor, rule: str, b1: float,
           b2: float, eps: float, clip: tuple[float, float] | None = None,
           row_lr: tuple[float, float] | None = None) -> None:
    """Update each table's ``weight`` [rows, dim] and its ``state`` once at each distinct row of the sorted ``keys``
    (from :func:`sort_rows`) with the sum of its ``grad`` (the gradient at each looked-up position: [n, dim], or
    [B, F, dim] with any strides but the last, such as a slice of a larger gradient) over the row's positions.

    The tables are looked up with the same ids (a model's embedding and its first-order weights): two at a time
    share one pass over the sorted positions. ``lr`` is a device scalar (Adam's already bias-corrected); ``clip`` =
    (ratio, floor) applies CowClip with each row's uses in the batch; ``row_lr`` = (cap, power) multiplies a row's
    learning rate by min(uses, cap) ** power.
    """
    n = keys.numel()
    prepared = []
    for weight, grad, state in tables:
        if not (weight.is_contiguous() and all(s.is_contiguous() for s in state)):
            raise ValueError("fused row updates need contiguous weight and state")
        dim = weight.shape[1]
        if grad.dim() != 3 or grad.stride(2) != 1:
            grad = grad.reshape(-1, 1, dim).contiguous()
        if grad.shape[0] * grad.shape[1] != n:
            raise ValueError(f"a table's gradient covers {grad.shape[0] * grad.shape[1]} positions, the sorted "
                             f"ids {n}")
        prepared.append((weight, grad, state, max(triton.next_power_of_2(dim), 2)))
    if n == 0 or not prepared:
        return
    n_blocks = triton.cdiv(n, BLOCK_POSITIONS)
    info = torch.empty(n_blocks * 4, dtype=torch.int64, device=keys.device)
    adam = rule == "adam"
    ratio, floor = clip if clip is not None else (0.0, 0.0)
    cap, power = row_lr if row_lr is not None else (1.0, 0.0)
    flags = {"ADAM": adam, "CLIP": clip is not None, "COUNT_LR": row_lr is not None}
    for pair in (prepared[i:i + 2] for i in range(0, len(prepared), 2)):
        args = []
        for weight, grad, state, block_d in pair + pair[:1] * (2 - len(pair)):  # a lone table fills both slots
            part = torch.empty(n_blocks * 2 * block_d, dtype=torch.float32, device=weight.device)
            s1 = state[0]
            args.append((weight, grad, s1, state[1] if adam else s1, part, block_d))
        (w, g, s1, s2, part, bd), (w2, g2, s1b, s2b, part2, bd2) = args
        two = len(pair) == 2
        _runs[(n_blocks,)](keys, perm, lr, info, n, b1, b2, eps, ratio, floor, cap, power,
                           g, w, s1, s2, part, w.shape[1], g.shape[1], g.stride(0), g.stride(1),
                           g2, w2, s1b, s2b, part2, w2.shape[1], g2.shape[1], g2.stride(0), g2.stride(1),
                           TWO=two, BLOCK=BLOCK_POSITIONS, BLOCK_D=bd, BLOCK_D2=bd2, num_warps=WARPS, **flags)
        _spans[(n_blocks,)](lr, info, n_blocks, b1, b2, eps, ratio, floor, cap, power,
                            w, s1, s2, part, w.shape[1], w2, s1b, s2b, part2, w2.shape[1],
                            TWO=two, CHUNK=SPAN_CHUNK, BLOCK_D=bd, BLOCK_D2=bd2, **flags)
