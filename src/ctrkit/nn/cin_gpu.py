"""xDeepFM's CIN layer on a GPU without its outer product in memory.

A CIN layer maps X^{k-1} [B, Hp, D] and X^0 [B, m, D] to X^k_h = sum_{i,j} W_{h,i,j} X^{k-1}_i * X^0_j. Written as
a 1x1 convolution it materialises the outer product [B, Hp * m, D]: 3.2 GB in bf16 for a batch of 65,536 Criteo
rows (39 fields, 16 dims), written and read in the forward pass and again in the backward pass, which makes the
layer memory-bound at a few percent of the GPU's matrix rate. Here, with every (row, embedding dim) pair as one
row n = b * D + e of X [N = B * D, Hp] and X0 [N, m], Triton kernels form the outer products block by block in
registers and feed them straight to the tensor cores: one product kernel for the output and both input
gradients, one for the weight gradient. The tensors stay in the embeddings' [B, fields, D] layout
(row n's column c at b * stride + c * D + e): nothing is transposed around the layer, and the gradient of x0
comes back in the layout the embedding's backward pass reads.

* forward: out[n, :] = sum over blocks of i: (X[n, i] * X0[n, j])_{(i, j)} @ Wp[(i, j), :], x0's columns as a
  power-of-two block and a tail, two products (:func:`split_fields`);
* input gradients: the same product with the roles turned, dX0[n, :] = (X[n, i] * dOut[n, h])_{(i, h)} @
  W[(i, h), :] and dX[n, :] = (X0[n, j] * dOut[n, h])_{(j, h)} @ W[(j, h), :], with Wp laid out for each. The
  sums over h and over the other side's columns both run on the tensor cores. (Computing G_i = dOut @ Wp[i]^T
  one i at a time and reducing G_i * X0 and G_i * X[:, i] outside the tensor cores took 1.27 ms of a
  65,536-row xDeepFM step on an H200.)
* weight gradient: dW[(i, h), j] = sum_n (X[n, i] * dOut[n, h]) X0[n, j], split over row ranges and summed
  after: with the (i, h) pairs on one side, a block of programs covers as many i's against x0's MP columns as the
  forward's blocks of (i, j) pairs do against H outputs, so each row's x0 and dOut tiles are read by half as many
  programs at xDeepFM's 39 fields and 32 maps. Here and in dX0's output, x0's columns are the forward's block
  and a tail of at least 16 (32 + 16 at 39 fields, not 64). Fewer reads did not make it faster: on an H100 at
  65,536 rows it took 0.643 ms a step, the (i, j)-pairs kernel against dOut's columns before it 0.600 ms. The
  input gradients with the roles turned did gain: with the forward, their products took 1.295 ms a step
  against 1.776 ms for the kernels before them.

``Wp`` is the weight laid out [Hp (padded to the block), m (padded to BP + TAIL, :func:`split_fields`),
H (padded)], zeros in the padding. The op is a ``torch.library`` custom op with its own backward, so torch.compile
and CUDA graphs treat it as one opaque call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch: the CIN runs as a convolution
    triton = None

AVAILABLE = triton is not None
BLOCK_N = 128  # rows per program in bf16 / fp16 (see _rows)
BLOCK_N_FP32 = 64
SPLIT_PROGRAMS = 528  # weight-gradient programs to aim for: four per multiprocessor of an H100 / H200


def _p2(n: int) -> int:
    """The next power of two from 16 (the smallest side of a tensor-core product)."""
    return max(16, 1 << (max(n, 1) - 1).bit_length())


def per_block(width: int) -> int:
    """How many blocks of ``width`` columns one product takes side by side: 256 columns (at least one block)."""
    return max(1, 256 // width)


def split_fields(m: int) -> tuple[int, int]:
    """(BP, TAIL): x0's m columns as a power-of-two block BP (at least 16) and a power-of-two tail for the rest (0
    if none), each its own tensor-core product in the forward pass. Padding m to one power of two wastes the
    rest: at 39 fields, 64 columns where 32 + 8 = 40 do (the products' k side padded 37.5% less)."""
    bp = max(16, 1 << (max(m, 1).bit_length() - 1))
    rest = m - bp
    if rest <= 0:
        return bp, 0
    return bp, max(1 << (rest - 1).bit_length(), -(-16 // per_block(bp)))  # the tail's product is at least 16 deep


def layout(m: int, hp: int, h: int) -> tuple[int, int, int, int]:
    """(MP, IB, Hp padded, HP2): the padded field count (BP + TAIL of :func:`split_fields`), the i's per block,
    Hp rounded up to a whole block, and the padded output width."""
    bp, tail = split_fields(m)
    ib = per_block(bp)
    return bp + tail, ib, -(-hp // ib) * ib, _p2(h)


def pad_weight(weight: torch.Tensor, hp: int, m: int, dtype: torch.dtype) -> torch.Tensor:
    """A Conv1d weight [H, Hp * m, 1] (channel i * m + j) as Wp [Hp padded, MP, HP2] in ``dtype``; differentiable."""
    h = weight.shape[0]
    mp, _, hp_pad, hp2 = layout(m, hp, h)
    w = weight.reshape(h, hp, m).permute(1, 2, 0)
    return F.pad(w, (0, hp2 - h, 0, mp - m, 0, hp_pad - hp)).to(dtype).contiguous()


if AVAILABLE:
    @triton.jit
    def _at(rows, cols, d, sb):  # type: ignore[no-untyped-def]
        """Offsets of (row n = b * d + e, column c) in a [B, C, d] tensor whose batch stride is ``sb``."""
        rows = rows.to(tl.int64)
        return (rows // d)[:, None] * sb + cols[None, :] * d + (rows % d)[:, None]

    @triton.jit
    def _x0_tile(x0_ptr, start, n, m, d, sb0, BN: tl.constexpr, MP: tl.constexpr):  # type: ignore[no-untyped-def]
        """Rows start..start+BN: their indices, which exist, and x0's tile [BN, MP] (zeros past m)."""
        rows = start + tl.arange(0, BN)
        live = rows < n
        j = tl.arange(0, MP)
        x0 = tl.load(x0_ptr + _at(rows, j, d, sb0), mask=live[:, None] & (j < m)[None, :], other=0.0)
        return rows, live, x0

    @triton.jit
    def _x_block(x_ptr, rows, live, hp, ib, d, sbx, IB: tl.constexpr):  # type: ignore[no-untyped-def]
        """Block ``ib`` of x's columns at the rows: column indices, where they exist, x [BN, IB] (0 past hp)."""
        i = ib * IB + tl.arange(0, IB)
        at = live[:, None] & (i < hp)[None, :]
        return i, at, tl.load(x_ptr + _at(rows, i, d, sbx), mask=at, other=0.0)

    @triton.jit
    def _mma(acc, a, b, IEEE: tl.constexpr):  # type: ignore[no-untyped-def]
        """acc + a @ b on the tensor cores (full fp32 products where IEEE)."""
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
        return acc

    @triton.jit
    def _block_dot(acc, acc2, z, w_ptr, w_rows, oo, o2, ws, IEEE: tl.constexpr,  # type: ignore[no-untyped-def]
                   OUT_TAIL: tl.constexpr):
        """(acc + z @ W[w_rows, oo], acc2 + z @ W[w_rows, o2] if OUT_TAIL): a block's outer products z against
        their rows of the weight (row stride ws), the output's columns as a block and a tail."""
        acc = _mma(acc, z, tl.load(w_ptr + w_rows[:, None] * ws + oo[None, :]), IEEE)
        if OUT_TAIL > 0:
            acc2 = _mma(acc2, z, tl.load(w_ptr + w_rows[:, None] * ws + o2[None, :]), IEEE)
        return acc, acc2

    @triton.jit
    def _products(a_ptr, b_ptr, w_ptr, out_ptr, n, a_cols, b_cols, out_cols, d,  # type: ignore[no-untyped-def]
                  sa, sb, so, n_blocks, IEEE: tl.constexpr, BP: tl.constexpr, TAIL: tl.constexpr,
                  IB: tl.constexpr, OUTP: tl.constexpr, OUT_TAIL: tl.constexpr, BN: tl.constexpr):
        """out[n, :] = sum over blocks of IB of a's columns: (A[n, a] * B[n, b])_{(a, b)} @ W[(a, b), :], the outer
        product formed in registers; A, B and out in the [B, columns, d] layout with batch strides sa, sb, so.
        B's columns are a block of BP and, if TAIL > 0, a tail of TAIL after it, each its own product; W's rows
        are (a, b) with b over BP + TAIL. The output's columns are a block of OUTP and, if OUT_TAIL > 0 (then at
        least 16), a tail of OUT_TAIL, each its own product; W's rows are OUTP + OUT_TAIL wide."""
        rows, live, b = _x0_tile(b_ptr, tl.program_id(0) * BN, n, b_cols, d, sb, BN, BP)
        kk = tl.arange(0, IB * BP)
        w_rows = (kk // BP) * (BP + TAIL) + kk % BP
        oo = tl.arange(0, OUTP)
        o2 = OUTP + tl.arange(0, OUT_TAIL + 16 * (OUT_TAIL == 0))  # the output's tail (16 unused columns if none)
        if TAIL > 0:
            tt = BP + tl.arange(0, TAIL)
            b2 = tl.load(b_ptr + _at(rows, tt, d, sb), mask=live[:, None] & (tt < b_cols)[None, :], other=0.0)
            k2 = tl.arange(0, IB * TAIL)
            w2_rows = (k2 // TAIL) * (BP + TAIL) + BP + k2 % TAIL
        acc = tl.zeros((BN, OUTP), tl.float32)
        acc2 = tl.zeros((BN, OUT_TAIL + 16 * (OUT_TAIL == 0)), tl.float32)
        ws = OUTP + OUT_TAIL
        for ib in range(n_blocks):
            ab = _x_block(a_ptr, rows, live, a_cols, ib, d, sa, IB)[2]
            base = ib * IB * (BP + TAIL)
            z = tl.reshape(ab[:, :, None] * b[:, None, :], (BN, IB * BP))
            acc, acc2 = _block_dot(acc, acc2, z, w_ptr, base + w_rows, oo, o2, ws, IEEE, OUT_TAIL)
            if TAIL > 0:
                z2 = tl.reshape(ab[:, :, None] * b2[:, None, :], (BN, IB * TAIL))
                acc, acc2 = _block_dot(acc, acc2, z2, w_ptr, base + w2_rows, oo, o2, ws, IEEE, OUT_TAIL)
        tl.store(out_ptr + _at(rows, oo, d, so), acc.to(out_ptr.dtype.element_ty),
                 mask=live[:, None] & (oo < out_cols)[None, :])
        if OUT_TAIL > 0:
            tl.store(out_ptr + _at(rows, o2, d, so), acc2.to(out_ptr.dtype.element_ty),
                     mask=live[:, None] & (o2 < out_cols)[None, :])

    @triton.jit
    def _backward_weight(dout_ptr, x_ptr, x0_ptr, part_ptr, n, hp, m, h, d, sbx, sb0,  # type: ignore[no-untyped-def]
                         n_blocks, split, IEEE: tl.constexpr, BP: tl.constexpr, TAIL: tl.constexpr,
                         IB: tl.constexpr, HP2: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr):
        # part[sp, (i, h), j] = sum over this program's rows of (X[n, i] * dOut[n, h]) X0[n, j], for a block of IB
        # i's: with x0 as the product's other side, a block covers IB * HP2 (i, h) pairs against x0's columns, a
        # block of BP and a tail of TAIL (0 or at least 16) after it, each its own product
        ib = tl.program_id(0)
        sp = tl.program_id(1)
        kk = tl.arange(0, IB * HP2)
        jj = tl.arange(0, BP)
        hh = tl.arange(0, HP2)
        at = part_ptr + sp * KP * (BP + TAIL) + (ib * IB * HP2 + kk)[:, None] * (BP + TAIL)
        acc = tl.zeros((IB * HP2, BP), tl.float32)
        if TAIL > 0:
            tt = BP + tl.arange(0, TAIL)
            acc2 = tl.zeros((IB * HP2, TAIL), tl.float32)
        for nb in range(sp, n_blocks, split):
            rows, live, x0 = _x0_tile(x0_ptr, nb * BN, n, m, d, sb0, BN, BP)
            d_out = tl.load(dout_ptr + _at(rows, hh, d, h * d), mask=live[:, None] & (hh < h)[None, :],
                            other=0.0)
            xb = _x_block(x_ptr, rows, live, hp, ib, d, sbx, IB)[2]
            z = tl.trans(tl.reshape(xb[:, :, None] * d_out[:, None, :], (BN, IB * HP2)))
            acc = _mma(acc, z, x0, IEEE)
            if TAIL > 0:
                x0b = tl.load(x0_ptr + _at(rows, tt, d, sb0), mask=live[:, None] & (tt < m)[None, :], other=0.0)
                acc2 = _mma(acc2, z, x0b, IEEE)
        tl.store(at + jj[None, :], acc)
        if TAIL > 0:
            tl.store(at + tt[None, :], acc2)


def _rows(dtype: torch.dtype) -> int:
    """Rows per program: 128 in bf16 / fp16 (on an H100 at xDeepFM's 39 fields, the layer's forward plus backward
    took 2.83 ms a step against 3.05 ms at 64), 64 in fp32, whose tiles are twice as large."""
    return BLOCK_N_FP32 if dtype == torch.float32 else BLOCK_N


def _check(x: torch.Tensor, x0: torch.Tensor, wp: torch.Tensor) -> tuple[int, int, int, int, int, int, int]:
    """(N = B * D, Hp, m, MP, IB, Hp padded, D) after checking the layouts the kernels read."""
    if not AVAILABLE:
        raise RuntimeError("the fused CIN needs Triton (a CUDA build of torch)")
    if (x.dim() != 3 or x0.dim() != 3 or x.shape[0] != x0.shape[0] or x.shape[2] != x0.shape[2]
            or not x0.is_contiguous() or x.stride()[1:] != (x.shape[2], 1)):
        raise ValueError(f"x [B, Hp, D] (each row's [Hp, D] contiguous) and x0 [B, m, D] (contiguous) must have the "
                         f"same B and D, got {tuple(x.shape)} with strides {x.stride()} and {tuple(x0.shape)}")
    b, hp, d = x.shape
    m = x0.shape[1]
    mp, ib, hp_pad, _ = layout(m, hp, 1)
    if wp.shape[:2] != (hp_pad, mp) or not wp.is_contiguous():
        raise ValueError(f"the padded weight must be [{hp_pad}, {mp}, H], got {tuple(wp.shape)}")
    return b * d, hp, m, mp, ib, hp_pad, d


@torch.library.custom_op("ctrkit::cin_layer", mutates_args=())
def cin_layer(x: torch.Tensor, x0: torch.Tensor, wp: torch.Tensor, h: int) -> torch.Tensor:
    """One CIN layer: x [B, Hp, D] (a view with any batch stride), x0 [B, m, D] and the padded weight ``wp``
    (:func:`pad_weight`) -> [B, h, D], in x's dtype (bf16 products accumulated in fp32; fp32 inputs multiply in
    full fp32). Every tensor keeps the embeddings' [B, fields, D] layout, so nothing is transposed around it."""
    n, hp, m, mp, ib, hp_pad, d = _check(x, x0, wp)
    tail = split_fields(m)[1]
    out = torch.empty((x.shape[0], h, d), dtype=x.dtype, device=x.device)
    if n:
        bn = _rows(x.dtype)
        _products[(triton.cdiv(n, bn),)](x, x0, wp, out, n, hp, m, h, d, x.stride(0), x0.stride(0), h * d,
                                         hp_pad // ib, IEEE=x.dtype == torch.float32, BP=mp - tail, TAIL=tail, IB=ib,
                                         OUTP=wp.shape[2], OUT_TAIL=0, BN=bn)
    return out


@cin_layer.register_fake
def _(x: torch.Tensor, x0: torch.Tensor, wp: torch.Tensor, h: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], h, x.shape[2]))


@torch.library.custom_op("ctrkit::cin_layer_backward", mutates_args=())
def cin_layer_backward(d_out: torch.Tensor, x: torch.Tensor, x0: torch.Tensor,
                       wp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx [B, Hp, D] contiguous, dx0, dwp) of :func:`cin_layer` given the gradient of its output."""
    n, hp, m, mp, _, hp_pad, d = _check(x, x0, wp)
    h, hp2 = d_out.shape[1], wp.shape[2]
    d_out = d_out.to(x.dtype).contiguous()
    dx, dx0 = x.new_empty(x.shape), torch.empty_like(x0)
    bn = _rows(x.dtype)
    n_blocks = triton.cdiv(n, bn) if n else 0
    ieee = x.dtype == torch.float32
    # every product here pairs a side's columns with dOut's: blocks of ib_h columns, (column, h) pairs
    ib_h = per_block(hp2)
    hp_h = -(-hp // ib_h) * ib_h
    split = max(1, min(n_blocks, SPLIT_PROGRAMS // (hp_h // ib_h)))
    bp, tail = split_fields(m)
    tail_w = max(tail, 16) if tail else 0  # x0's columns as a block and a tail where a product's side: at least 16
    part = torch.zeros((split, hp_h * hp2, bp + tail_w), dtype=torch.float32, device=x.device)
    if n:
        # dX0 = (X (x) dOut) @ W[(i, h), j] and dX = (X0 (x) dOut) @ W[(j, h), i]: the forward's product with
        # the roles turned, each weight laid out (and padded) for it
        outp, m_blocks = _p2(hp), -(-m // ib_h)
        w = wp[:hp, :m]
        w_dx0 = F.pad(w.transpose(1, 2), (0, bp + tail_w - m, 0, 0, 0, hp_h - hp)).contiguous()
        w_dx = F.pad(w.permute(1, 2, 0), (0, outp - hp, 0, 0, 0, m_blocks * ib_h - m)).contiguous()
        _products[(n_blocks,)](x, d_out, w_dx0, dx0, n, hp, h, m, d, x.stride(0), h * d, m * d, hp_h // ib_h,
                               IEEE=ieee, BP=hp2, TAIL=0, IB=ib_h, OUTP=bp, OUT_TAIL=tail_w, BN=bn)
        _products[(n_blocks,)](x0, d_out, w_dx, dx, n, m, h, hp, d, x0.stride(0), h * d, hp * d, m_blocks,
                               IEEE=ieee, BP=hp2, TAIL=0, IB=ib_h, OUTP=outp, OUT_TAIL=0, BN=bn)
        _backward_weight[(hp_h // ib_h, split)](d_out, x, x0, part, n, hp, m, h, d, x.stride(0), x0.stride(0),
                                                n_blocks, split, IEEE=ieee, BP=bp, TAIL=tail_w, IB=ib_h, HP2=hp2,
                                                BN=bn,
                                                KP=hp_h * hp2, num_warps=8)  # a 256 x MP fp32 accumulator
    dw = part.sum(0).view(hp_h, hp2, bp + tail_w).transpose(1, 2)[:hp, :m]  # [(i, h), j] -> [i, j, h]
    return dx, dx0, F.pad(dw, (0, 0, 0, mp - m, 0, hp_pad - hp)).contiguous()


@cin_layer_backward.register_fake
def _(d_out: torch.Tensor, x: torch.Tensor, x0: torch.Tensor,
      wp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape), torch.empty_like(x0), wp.new_empty(wp.shape, dtype=torch.float32)


def _setup(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
    x, x0, wp, _ = inputs
    ctx.save_for_backward(x, x0, wp)


def _grads(ctx: torch.autograd.function.FunctionCtx,
           d_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
    x, x0, wp = ctx.saved_tensors  # type: ignore[attr-defined]
    dx, dx0, dwp = cin_layer_backward(d_out, x, x0, wp)
    return dx, dx0, dwp.to(wp.dtype), None


torch.library.register_autograd("ctrkit::cin_layer", _grads, setup_context=_setup)


def cin(x0: torch.Tensor, weights: list[torch.Tensor], split_half: bool) -> torch.Tensor:
    """The CIN of :class:`ctrkit.nn.interactions.CIN` over x0 [B, m, D] with its Conv1d weights, on the fused
    kernels: the pooled outputs [B, sum of output maps] in fp32. Products run in bf16 under autocast."""
    m = x0.shape[1]
    kind = x0.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x0.dtype
    base = x0.to(dtype).contiguous()
    x, pooled = base, []
    for k, weight in enumerate(weights):
        h = weight.shape[0]
        out = cin_layer(x, base, pad_weight(weight, x.shape[1], m, dtype), h)
        if split_half and k < len(weights) - 1:
            x, direct = out[:, :h // 2], out[:, h // 2:]
        else:
            x = direct = out
        pooled.append(direct.float().sum(dim=2))
    return torch.cat(pooled, dim=1)
