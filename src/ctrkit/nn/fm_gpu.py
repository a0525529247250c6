"""The FM terms of field vectors on a GPU in one pass over them, with the copy an MLP reads beside them.

For field vectors emb [B, F, D] (and the numeric fields given only by their sums, ``extra`` [B, D] and
``extra_sq`` [B]) one Triton kernel reads each row's [F, D] block once and writes the FM pairwise term, the squared
norm (an L2 penalty's input), the sum of the vectors (which the backward pass needs) and, for a DeepFM, the
vectors again in the MLP's dtype (bf16 under autocast): the copy that the MLP's first layer reads. One more kernel
gives the vectors' gradient from the pairwise and square terms' gradients and the MLP's: d pair / d e_i = s - e_i,
d sq / d e_i = 2 e_i.

Compiled, the same arithmetic took four passes over the gathered vectors in a DeepFM step (85 + 37 + 96 + 13 us of
a 65,536-row step on an H100, each pass gathering the table rows again) and two in its backward (44 + 88 us).
The ops are ``torch.library`` custom ops with their own backward, so torch.compile and CUDA graphs treat them as
opaque calls.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch: the FM terms run as torch operations
    triton = None

AVAILABLE = triton is not None
ROWS = 16  # rows per program: with 26 fields of 16 dims, 8k values in registers over four warps


if AVAILABLE:
    @triton.jit
    def _block(rows, n, f_count, d_count, FP: tl.constexpr, DP: tl.constexpr):  # type: ignore[no-untyped-def]
        # offsets of each row's [F, D] values within a row of F * D, and their mask
        f = tl.arange(0, FP)
        d = tl.arange(0, DP)
        at = f[None, :, None] * d_count + d[None, None, :]
        ok = (rows < n)[:, None, None] & (f < f_count)[None, :, None] & (d < d_count)[None, None, :]
        return at, ok

    @triton.jit
    def _forward(emb_ptr, extra_ptr, extra_sq_ptr, pair_ptr, sq_ptr, s_ptr, copy_ptr,  # type: ignore[no-untyped-def]
                 n, f_count, d_count, emb_stride, extra_stride, extra_sq_stride, HAS_EXTRA: tl.constexpr,
                 COPY: tl.constexpr, FP: tl.constexpr, DP: tl.constexpr, BB: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BB + tl.arange(0, BB)
        at, ok = _block(rows, n, f_count, d_count, FP, DP)
        e = tl.load(emb_ptr + rows[:, None, None] * emb_stride + at, mask=ok, other=0.0).to(tl.float32)
        s = tl.sum(e, axis=1)
        sq = tl.sum(tl.sum(e * e, axis=2), axis=1)
        d = tl.arange(0, DP)
        row_ok = rows < n
        sd = rows[:, None] * d_count + d[None, :]
        sd_ok = row_ok[:, None] & (d < d_count)[None, :]
        if HAS_EXTRA:
            s += tl.load(extra_ptr + rows[:, None] * extra_stride + d[None, :], mask=sd_ok, other=0.0).to(tl.float32)
            sq += tl.load(extra_sq_ptr + rows * extra_sq_stride, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(pair_ptr + rows, 0.5 * (tl.sum(s * s, axis=1) - sq), mask=row_ok)
        tl.store(sq_ptr + rows, sq, mask=row_ok)
        tl.store(s_ptr + sd, s, mask=sd_ok)
        if COPY:
            tl.store(copy_ptr + rows[:, None, None] * (f_count * d_count) + at,
                     e.to(copy_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _backward(emb_ptr, s_ptr, g_pair_ptr, g_sq_ptr, g_copy_ptr, out_ptr,  # type: ignore[no-untyped-def]
                  n, f_count, d_count, emb_stride, HAS_COPY: tl.constexpr,
                  FP: tl.constexpr, DP: tl.constexpr, BB: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BB + tl.arange(0, BB)
        at, ok = _block(rows, n, f_count, d_count, FP, DP)
        e = tl.load(emb_ptr + rows[:, None, None] * emb_stride + at, mask=ok, other=0.0).to(tl.float32)
        d = tl.arange(0, DP)
        row_ok = rows < n
        s = tl.load(s_ptr + rows[:, None] * d_count + d[None, :], mask=row_ok[:, None] & (d < d_count)[None, :],
                    other=0.0)
        g_pair = tl.load(g_pair_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        g_sq = tl.load(g_sq_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        g = g_pair[:, None, None] * s[:, None, :] + e * (2.0 * g_sq - g_pair)[:, None, None]
        flat = rows[:, None, None] * (f_count * d_count) + at
        if HAS_COPY:
            g += tl.load(g_copy_ptr + flat, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + flat, g, mask=ok)


def _p2(n: int) -> int:
    return max(2, 1 << (max(n, 1) - 1).bit_length())


def _check(emb: torch.Tensor) -> tuple[int, int, int]:
    if not AVAILABLE:
        raise RuntimeError("the fused FM terms need Triton (a CUDA build of torch)")
    if emb.dim() != 3 or emb.stride()[1:] != (emb.shape[2], 1):
        raise ValueError(f"emb must be [B, F, D] with each row's [F, D] contiguous, got {tuple(emb.shape)} "
                         f"with strides {emb.stride()}")
    return emb.shape[0], emb.shape[1], emb.shape[2]


@torch.library.custom_op("ctrkit::fm_terms", mutates_args=())
def fm_terms(emb: torch.Tensor, extra: torch.Tensor | None, extra_sq: torch.Tensor | None,
             copy_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pairwise term [B], squared norm [B], sum of the vectors [B, D], in float32; the vectors [B, F, D] in
    ``copy_dtype``, or an empty tensor where it is None) of emb [B, F, D] plus the fields given by their sums."""
    n, f, d = _check(emb)
    pair = torch.empty(n, dtype=torch.float32, device=emb.device)
    sq, s = torch.empty_like(pair), torch.empty((n, d), dtype=torch.float32, device=emb.device)
    copy = emb.new_empty((n, f, d) if copy_dtype is not None else (0,), dtype=copy_dtype or emb.dtype)
    if n:
        has_extra = extra is not None and extra_sq is not None
        if has_extra:  # read with their row strides: views of one product (numeric_sums) need no copy
            extra = extra if extra.stride(1) == 1 else extra.contiguous()
        ex, ex_sq = (extra, extra_sq) if has_extra else (pair, pair)
        _forward[(triton.cdiv(n, ROWS),)](emb, ex, ex_sq, pair, sq, s, copy, n, f, d, emb.stride(0), ex.stride(0),
                                          ex_sq.stride(0), HAS_EXTRA=has_extra, COPY=copy_dtype is not None,
                                          FP=_p2(f), DP=_p2(d), BB=ROWS)
    return pair, sq, s, copy


@fm_terms.register_fake
def _(emb: torch.Tensor, extra: torch.Tensor | None, extra_sq: torch.Tensor | None,
      copy_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n, f, d = emb.shape
    pair = emb.new_empty(n, dtype=torch.float32)
    return (pair, pair.new_empty(n), pair.new_empty((n, d)),
            emb.new_empty((n, f, d) if copy_dtype is not None else (0,), dtype=copy_dtype or emb.dtype))


@torch.library.custom_op("ctrkit::fm_terms_backward", mutates_args=())
def fm_terms_backward(emb: torch.Tensor, s: torch.Tensor, g_pair: torch.Tensor, g_sq: torch.Tensor,
                      g_copy: torch.Tensor | None) -> torch.Tensor:
    """The gradient [B, F, D] (float32, contiguous) of the vectors of :func:`fm_terms` given its outputs'."""
    n, f, d = _check(emb)
    out = torch.empty((n, f, d), dtype=torch.float32, device=emb.device)
    if n:
        has_copy = g_copy is not None
        _backward[(triton.cdiv(n, ROWS),)](emb, s, g_pair.contiguous(), g_sq.contiguous(),
                                           g_copy.contiguous() if has_copy else out, out, n, f, d, emb.stride(0),
                                           HAS_COPY=has_copy, FP=_p2(f), DP=_p2(d), BB=ROWS)
    return out


@fm_terms_backward.register_fake
def _(emb: torch.Tensor, s: torch.Tensor, g_pair: torch.Tensor, g_sq: torch.Tensor,
      g_copy: torch.Tensor | None) -> torch.Tensor:
    return emb.new_empty(emb.shape, dtype=torch.float32)


def _setup(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    emb, extra, _, _ = inputs
    ctx.save_for_backward(emb, output[2])
    ctx.extra = extra is not None  # type: ignore[attr-defined]


def _grads(ctx: torch.autograd.function.FunctionCtx, g_pair: torch.Tensor | None, g_sq: torch.Tensor | None,
           _g_s: torch.Tensor | None, g_copy: torch.Tensor | None
           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, None]:
    emb, s = ctx.saved_tensors  # type: ignore[attr-defined]
    zero = s.new_zeros(s.shape[0])
    g_pair = zero if g_pair is None else g_pair.float()
    g_sq = zero if g_sq is None else g_sq.float()
    g_copy = g_copy if g_copy is not None and g_copy.numel() else None
    g_emb = fm_terms_backward(emb, s, g_pair, g_sq, g_copy).to(emb.dtype)
    if not ctx.extra:  # type: ignore[attr-defined]
        return g_emb, None, None, None
    return g_emb, g_pair.unsqueeze(1) * s, g_sq - 0.5 * g_pair, None


torch.library.register_autograd("ctrkit::fm_terms", _grads, setup_context=_setup)
