"""Fused Triton halo attention (HaloNet, SPEC section 2): forward and backward.

Algorithm. One program owns ``BLOCK_M`` queries of one query block (``(b / s)^2`` queries, row
major; a block larger than ``BLOCK_M`` takes several programs) of one (batch, head). It walks its
``win x win`` window (``win = b + 2h``) a few window rows at a time: a step is ``ROWS`` rows of
``win`` keys, each padded to a power of two (``ROWS`` up to a 64-key tile: HaloNet's 14-key rows
alone would leave the tensor cores mostly idle), read straight from the key map (no unfolded copy
of the windows exists anywhere). Window positions off the map load as zero keys and values and
are *not* masked: their logit is the positional term alone, as in timm's zero-padded layer; only
the padding slots of a row (and the rows past the window) are masked. Online softmax in base 2; the log-sum-exp is saved.

Positional logits are decomposed (BoTNet): ``<q, rel_h[ky - qy + win - 1]> + <q, rel_w[kx - qx +
win - 1]>``. Both products against the whole tables, ``q @ rel^T`` (``[queries, 2win - 1]`` each,
float32, already multiplied by the positional scale), are one small matmul on the host side; the
kernels gather from them by pointer (the height term is one value per query and window row, the
width term one ``[BLOCK_M, BLOCK_N]`` tile per program, the same on every row).

Backward, flash-attention style, ``delta = rowsum(dO * O) - dLSE``:

- ``_halo_bwd_dq`` (query programs, as the forward) computes ``delta``, recomputes ``P`` from the
  log-sum-exp, accumulates ``dQ`` and the gradients of the two positional tables' products: per
  query, the height gradient of window row ``ky`` is the row sum of ``dS`` over that row's slots of
  the step (one store, each table slot is hit by exactly one row) and the width gradient sums
  ``dS`` over rows (one store at the end). The host turns them into ``dq`` and ``drel`` with two
  small matmuls. By default (``_fused_bwd``) the same kernel adds each step's ``dK`` / ``dV`` onto
  float32 buffers with atomics (a key lies in the windows of a few query blocks); where the map is
  one block held by one program, it stores them directly.
- The other form, ``_halo_bwd_dkdv`` after it (key programs: ``BLOCK_N`` keys of one key block),
  visits the query blocks whose windows contain its keys (the block itself and ``ceil(h / b)``
  neighbours per side), recomputes ``P`` for the keys that lie in each window, and accumulates
  ``dK`` and ``dV`` without atomics.

Precision: fp16/bf16 operands with fp32 accumulation; fp32 inputs use tf32 when
``torch.backends.cuda.matmul.allow_tf32`` is set and exact fp32 products otherwise. Head dims are
padded to a power of two (at least 16) and masked. With ``TRITON_INTERPRET=1`` set before triton
is imported, the kernels run in Triton's interpreter on CPU tensors (how the CPU tests run them).
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .backends import triton_device_reason
from .launch import INTERPRETING, Launcher, aligned, on_device
from .neighborhood_reference import lse_dtype

__all__ = ["halo_triton_probe", "halo_triton_fwd", "halo_triton_bwd", "MAX_HEAD_DIM", "MAX_WINDOW"]

MAX_HEAD_DIM = 256
MAX_WINDOW = 128  # a window row is one key tile
_LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return INTERPRETING  # a constant (see foveal.kernels.launch)


# -- device helpers -------------------------------------------------------------------------------

@triton.jit
def _query_tile(pid_m, N_MT, NBX, BQ, BLOCK_M: tl.constexpr):
    # the program's query block (by, bx), its tile's queries (qy, qx inside the block) and their mask
    block = pid_m // N_MT
    offs_m = (pid_m % N_MT) * BLOCK_M + tl.arange(0, BLOCK_M)
    return block // NBX, block % NBX, offs_m // BQ, offs_m % BQ, offs_m < BQ * BQ


@triton.jit
def _load_rows(ptr, row_off, row_ok, stride_d, DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (offs_d[None, :] < DIM)
    return tl.load(ptr + row_off[:, None] + offs_d[None, :] * stride_d, mask=mask, other=0.0)


# -- forward --------------------------------------------------------------------------------------

@triton.jit
def _halo_fwd(
    Q, K, V, QRH, QRW, O, LSE,  #
    stride_qb, stride_qy, stride_qx, stride_qh, stride_qd,  #
    stride_kb, stride_ky, stride_kx, stride_kh, stride_kd,  #
    stride_vb, stride_vy, stride_vx, stride_vh, stride_vd,  #
    stride_ob, stride_oy, stride_ox, stride_oh, stride_od,  #
    HEADS, H, W, NBX, BQ, N_MT, scale_log2,  #
    BLOCK: tl.constexpr, HALO: tl.constexpr, WIN: tl.constexpr, HAS_REL: tl.constexpr,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b_idx, h_idx = (pid_bh // HEADS).to(tl.int64), pid_bh % HEADS
    by, bx, qy, qx, m_ok = _query_tile(pid_m, N_MT, NBX, BQ, BLOCK_M)
    gy, gx = by * BQ + qy, bx * BQ + qx  # query coordinates on the (strided) query map
    q_row = b_idx * stride_qb + gy * stride_qy + gx * stride_qx + h_idx * stride_qh
    q = _load_rows(Q, q_row, m_ok, stride_qd, HEAD_DIM, BLOCK_D)  # q stays in registers

    # a step takes ROWS window rows, each padded to WP = BLOCK_N // ROWS slots
    WP: tl.constexpr = BLOCK_N // ROWS
    offs_n = tl.arange(0, BLOCK_N)
    row, col = offs_n // WP, offs_n % WP
    col_ok = col < WIN
    y0, x0 = by * BLOCK - HALO, bx * BLOCK - HALO  # window origin on the key map
    ax = x0 + col
    rel_row = ((b_idx * (H // BLOCK * BQ) + gy) * (W // BLOCK * BQ) + gx) * HEADS + h_idx  # QR* row of the query
    rel_base = rel_row[:, None] * (2 * WIN - 1) + WIN - 1
    if HAS_REL:
        # width term: the same [BLOCK_M, BLOCK_N] tile on every step
        pos_w = tl.load(QRW + rel_base + col[None, :] - qx[:, None], mask=m_ok[:, None] & col_ok[None, :],
                        other=0.0) * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for ky0 in range(0, WIN, ROWS):
        ky = ky0 + row
        n_ok = col_ok & (ky < WIN)
        ay = y0 + ky
        inside = n_ok & (ax >= 0) & (ax < W) & (ay >= 0) & (ay < H)  # off-map keys and values load as 0, not masked
        k = _load_rows(K, b_idx * stride_kb + ay * stride_ky + ax * stride_kx + h_idx * stride_kh, inside,
                       stride_kd, HEAD_DIM, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        if HAS_REL:
            if ROWS == 1:  # one height slot per query
                pos_h = tl.load(QRH + rel_row * (2 * WIN - 1) + ky0 - qy + WIN - 1, mask=m_ok, other=0.0)[:, None]
            else:
                pos_h = tl.load(QRH + rel_base + ky[None, :] - qy[:, None], mask=m_ok[:, None] & n_ok[None, :],
                                other=0.0)
            s += pos_h * 1.4426950408889634 + pos_w
        s = tl.where(n_ok[None, :], s, float("-inf"))  # only the padding slots
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(V, b_idx * stride_vb + ay * stride_vy + ax * stride_vx + h_idx * stride_vh, inside,
                       stride_vd, HEAD_DIM_V, BLOCK_DV)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    acc = acc / l_i[:, None]
    offs_dv = tl.arange(0, BLOCK_DV)
    o_row = b_idx * stride_ob + gy * stride_oy + gx * stride_ox + h_idx * stride_oh
    tl.store(O + o_row[:, None] + offs_dv[None, :] * stride_od, acc.to(O.dtype.element_ty),
             mask=m_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    # the log-sum-exp in natural units, [B, Hq, Wq, heads] contiguous (the QR* row order)
    tl.store(LSE + rel_row, (m_i + tl.log2(l_i)) / 1.4426950408889634, mask=m_ok)


# -- backward -------------------------------------------------------------------------------------

@triton.jit
def _halo_bwd_dq(
    Q, K, V, QRH, QRW, O, DO, LSE, GLSE, DELTA, DQ, DQRH, DQRW, DK, DV,  #
    stride_qb, stride_qy, stride_qx, stride_qh, stride_qd,  #
    stride_kb, stride_ky, stride_kx, stride_kh, stride_kd,  #
    stride_vb, stride_vy, stride_vx, stride_vh, stride_vd,  #
    stride_ob, stride_oy, stride_ox, stride_oh, stride_od,  #
    stride_gb, stride_gy, stride_gx, stride_gh, stride_gd,  #
    HEADS, H, W, NBX, BQ, N_MT, scale, scale_log2,  #
    BLOCK: tl.constexpr, HALO: tl.constexpr, WIN: tl.constexpr, HAS_REL: tl.constexpr,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, HAS_GLSE: tl.constexpr,  #
    FUSED: tl.constexpr, ONE_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # O (strides stride_o*) and dO (stride_g*) are [B, Hq, Wq, heads, Dv]; dQ is contiguous. Computes
    # delta = rowsum(dO * O) - dLSE; FUSED: also adds dK / dV (contiguous float32 [B, H, W, heads, D*])
    # with atomics (a key lies in the windows of a few query blocks; ONE_WINDOW: plain stores in their
    # dtype), else stores delta for _halo_bwd_dkdv.
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b_idx, h_idx = (pid_bh // HEADS).to(tl.int64), pid_bh % HEADS
    by, bx, qy, qx, m_ok = _query_tile(pid_m, N_MT, NBX, BQ, BLOCK_M)
    gy, gx = by * BQ + qy, bx * BQ + qx
    q = _load_rows(Q, b_idx * stride_qb + gy * stride_qy + gx * stride_qx + h_idx * stride_qh, m_ok, stride_qd,
                   HEAD_DIM, BLOCK_D)
    do = _load_rows(DO, b_idx * stride_gb + gy * stride_gy + gx * stride_gx + h_idx * stride_gh, m_ok, stride_gd,
                    HEAD_DIM_V, BLOCK_DV)
    o = _load_rows(O, b_idx * stride_ob + gy * stride_oy + gx * stride_ox + h_idx * stride_oh, m_ok, stride_od,
                   HEAD_DIM_V, BLOCK_DV)
    rel_row = ((b_idx * (H // BLOCK * BQ) + gy) * (W // BLOCK * BQ) + gx) * HEADS + h_idx
    lse2 = tl.load(LSE + rel_row, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    if HAS_GLSE:
        delta -= tl.load(GLSE + rel_row, mask=m_ok, other=0.0)
    if not FUSED:
        tl.store(DELTA + rel_row, delta, mask=m_ok)
    offs_d, offs_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)

    WP: tl.constexpr = BLOCK_N // ROWS
    offs_n = tl.arange(0, BLOCK_N)
    row, col = offs_n // WP, offs_n % WP
    col_ok = col < WIN
    y0, x0 = by * BLOCK - HALO, bx * BLOCK - HALO
    ax = x0 + col
    rel_base = rel_row[:, None] * (2 * WIN - 1) + WIN - 1
    if HAS_REL:
        pos_w = tl.load(QRW + rel_base + col[None, :] - qx[:, None], mask=m_ok[:, None] & col_ok[None, :],
                        other=0.0) * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dpos_w = tl.zeros([BLOCK_M, WP], tl.float32)
    offs_r, offs_c = tl.arange(0, ROWS), tl.arange(0, WP)
    for ky0 in range(0, WIN, ROWS):
        ky = ky0 + row
        n_ok = col_ok & (ky < WIN)
        ay = y0 + ky
        inside = n_ok & (ax >= 0) & (ax < W) & (ay >= 0) & (ay < H)
        k = _load_rows(K, b_idx * stride_kb + ay * stride_ky + ax * stride_kx + h_idx * stride_kh, inside,
                       stride_kd, HEAD_DIM, BLOCK_D)
        v = _load_rows(V, b_idx * stride_vb + ay * stride_vy + ax * stride_vx + h_idx * stride_vh, inside,
                       stride_vd, HEAD_DIM_V, BLOCK_DV)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        if HAS_REL:
            if ROWS == 1:
                pos_h = tl.load(QRH + rel_row * (2 * WIN - 1) + ky0 - qy + WIN - 1, mask=m_ok, other=0.0)[:, None]
            else:
                pos_h = tl.load(QRH + rel_base + ky[None, :] - qy[:, None], mask=m_ok[:, None] & n_ok[None, :],
                                other=0.0)
            s += pos_h * 1.4426950408889634 + pos_w
        p = tl.where(n_ok[None, :] & m_ok[:, None], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
        if FUSED:  # off-map window positions are zero padding: no gradient
            key_row = ((b_idx * H + ay) * W + ax) * HEADS + h_idx
            dv_ptrs = DV + key_row[:, None] * HEAD_DIM_V + offs_dv[None, :]
            dv_part = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
            dv_mask = inside[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
            dk_ptrs = DK + key_row[:, None] * HEAD_DIM + offs_d[None, :]
            dk_part = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC) * scale
            dk_mask = inside[:, None] & (offs_d[None, :] < HEAD_DIM)
            if ONE_WINDOW:  # the map is one block and one program holds it: each key is visited once
                tl.store(dv_ptrs, dv_part.to(DV.dtype.element_ty), mask=dv_mask)
                tl.store(dk_ptrs, dk_part.to(DK.dtype.element_ty), mask=dk_mask)
            else:
                tl.atomic_add(dv_ptrs, dv_part, mask=dv_mask, sem="relaxed")
                tl.atomic_add(dk_ptrs, dk_part, mask=dk_mask, sem="relaxed")
        if HAS_REL:
            # each (query, height slot) is hit by exactly one window row: a plain store of the row sums
            if ROWS == 1:
                tl.store(DQRH + rel_row * (2 * WIN - 1) + ky0 - qy + WIN - 1, tl.sum(ds, 1), mask=m_ok)
                dpos_w += ds
            else:
                ds3 = tl.reshape(ds, (BLOCK_M, ROWS, WP))
                rows_h = ky0 + offs_r
                tl.store(DQRH + rel_base + rows_h[None, :] - qy[:, None], tl.sum(ds3, 2),
                         mask=m_ok[:, None] & (rows_h[None, :] < WIN))
                dpos_w += tl.sum(ds3, 1)
    dq_row = (b_idx * (H // BLOCK * BQ) * (W // BLOCK * BQ) + gy * (W // BLOCK * BQ) + gx) * HEADS * HEAD_DIM + h_idx * HEAD_DIM
    tl.store(DQ + dq_row[:, None] + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=m_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    if HAS_REL:
        tl.store(DQRW + rel_base + offs_c[None, :] - qx[:, None], dpos_w, mask=m_ok[:, None] & (offs_c[None, :] < WIN))


@triton.jit
def _halo_bwd_dkdv(
    Q, K, V, QRH, QRW, DO, LSE, DELTA, DK, DV,  #
    stride_qb, stride_qy, stride_qx, stride_qh, stride_qd,  #
    stride_kb, stride_ky, stride_kx, stride_kh, stride_kd,  #
    stride_vb, stride_vy, stride_vx, stride_vh, stride_vd,  #
    stride_ob, stride_oy, stride_ox, stride_oh, stride_od,  #
    HEADS, H, W, NBX, NBY, BQ, N_MT, N_NT, scale, scale_log2,  #
    BLOCK: tl.constexpr, HALO: tl.constexpr, WIN: tl.constexpr, REACH: tl.constexpr, HAS_REL: tl.constexpr,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # one program: BLOCK_N keys (row major) of key block (kby, kbx); dK, dV contiguous [B, H, W, heads, D*]
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    b_idx, h_idx = (pid_bh // HEADS).to(tl.int64), pid_bh % HEADS
    block = pid_n // N_NT
    kby, kbx = block // NBX, block % NBX
    offs_n = (pid_n % N_NT) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < BLOCK * BLOCK
    ay, ax = kby * BLOCK + offs_n // BLOCK, kbx * BLOCK + offs_n % BLOCK
    k = _load_rows(K, b_idx * stride_kb + ay * stride_ky + ax * stride_kx + h_idx * stride_kh, n_ok, stride_kd,
                   HEAD_DIM, BLOCK_D)
    v = _load_rows(V, b_idx * stride_vb + ay * stride_vy + ax * stride_vx + h_idx * stride_vh, n_ok, stride_vd,
                   HEAD_DIM_V, BLOCK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    offs_m0 = tl.arange(0, BLOCK_M)
    HQ, WQ = H // BLOCK * BQ, W // BLOCK * BQ
    for dby in range(-REACH, REACH + 1):
        for dbx in range(-REACH, REACH + 1):
            by, bx = kby + dby, kbx + dbx
            if (by >= 0) & (by < NBY) & (bx >= 0) & (bx < NBX):
                wy, wx = ay - (by * BLOCK - HALO), ax - (bx * BLOCK - HALO)  # window coordinates of the keys
                key_in = n_ok & (wy >= 0) & (wy < WIN) & (wx >= 0) & (wx < WIN)
                for mt in range(N_MT):
                    offs_m = mt * BLOCK_M + offs_m0
                    m_ok = offs_m < BQ * BQ
                    qy, qx = offs_m // BQ, offs_m % BQ
                    gy, gx = by * BQ + qy, bx * BQ + qx
                    q = _load_rows(Q, b_idx * stride_qb + gy * stride_qy + gx * stride_qx + h_idx * stride_qh, m_ok,
                                   stride_qd, HEAD_DIM, BLOCK_D)
                    do = _load_rows(DO, b_idx * stride_ob + gy * stride_oy + gx * stride_ox + h_idx * stride_oh,
                                    m_ok, stride_od, HEAD_DIM_V, BLOCK_DV)
                    rel_row = ((b_idx * HQ + gy) * WQ + gx) * HEADS + h_idx
                    lse2 = tl.load(LSE + rel_row, mask=m_ok, other=0.0) * 1.4426950408889634
                    delta = tl.load(DELTA + rel_row, mask=m_ok, other=0.0)
                    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
                    pair = m_ok[:, None] & key_in[None, :]
                    if HAS_REL:
                        base = rel_row[:, None] * (2 * WIN - 1) + WIN - 1
                        pos = tl.load(QRH + base + wy[None, :] - qy[:, None], mask=pair, other=0.0)
                        pos += tl.load(QRW + base + wx[None, :] - qx[:, None], mask=pair, other=0.0)
                        s += pos * 1.4426950408889634
                    p = tl.where(pair, tl.exp2(s - lse2[:, None]), 0.0)
                    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
                    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
                    ds = p * (dp - delta[:, None])
                    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
    key_row = ((b_idx * H + ay) * W + ax) * HEADS + h_idx
    offs_d, offs_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    tl.store(DK + key_row[:, None] * HEAD_DIM + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=n_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(DV + key_row[:, None] * HEAD_DIM_V + offs_dv[None, :], dv.to(DV.dtype.element_ty),
             mask=n_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


# -- host side ------------------------------------------------------------------------------------

_FWD = Launcher(_halo_fwd)
_DQ = Launcher(_halo_bwd_dq)
_DKDV = Launcher(_halo_bwd_dkdv)

# Tiles per problem: (BLOCK_M, num_warps). Tests replace _tiles to force small tiles.
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(n))


def _tiles(queries: int, keys: int, win: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N for dK/dV, num_warps)``: a whole query block per program up to 128 queries."""
    block_m = min(128, _pow2(queries))
    block_n = min(64, _pow2(keys))
    return block_m, block_n, 4 if block_m <= 64 else 8


def _rows(win: int, head_dim: int) -> int:
    """Window rows per step of the query kernels, each padded to a power of two. Head dims of 64 and
    more stack rows up to a 64-key tile; smaller ones take one row per step (measured on an H200 at
    halonet50ts's layers, 14-key rows: 4 rows per step made head dim 64 1.37x faster forward and
    1.13x forward+backward, but head dim 32 1.15-1.20x slower, its extra positional gather costing
    more than the wider tile gains). Tests replace it."""
    return max(1, 64 // _pow2(win)) if head_dim >= 64 else 1


def _row_step(win: int, head_dim: int) -> dict:
    rows = _rows(win, head_dim)
    return dict(BLOCK_N=rows * _pow2(win), ROWS=rows)


def _fused_bwd(programs: int, block_size: int, halo_size: int) -> bool:
    """Whether the backward is one kernel on the query programs adding dK / dV with float32 atomics
    (each key lies in the windows of ``(1 + 2h / b)^2`` query blocks on average, so the atomics
    rarely collide), rather than dQ then a dK/dV kernel on key programs, which recomputes ``P``
    for every neighbouring query block whose window holds any of its keys (at b = 8, h = 3 it
    computes 9 whole block pairs for about 3 blocks' worth of window). Measured on an H200 at
    halonet50ts's three layer shapes (batch 256, bf16), forward+backward of the layer: 7.60 ->
    5.53, 3.50 -> 2.86, 3.08 -> 2.47 ms, so it is the default. Tests replace it to force either."""
    return True


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def halo_triton_probe(q, k, v, rel_h, rel_w, *, block_size, halo_size, stride) -> Optional[str]:
    """None when the Triton backend can run the call, otherwise the reason it cannot."""
    reason = triton_device_reason(q, _interpreting())
    if reason is not None:
        return reason
    if q.dtype not in _DTYPES:
        return f"supports float16, bfloat16 and float32, got dtype={q.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim must be <= {MAX_HEAD_DIM}, got q.shape[-1]={q.shape[-1]}, v.shape[-1]={v.shape[-1]}"
    if block_size + 2 * halo_size > MAX_WINDOW:
        return f"block_size + 2 * halo_size must be <= {MAX_WINDOW}, got {block_size + 2 * halo_size}"
    return None


def _rel_products(q, rel_h, rel_w, scale: float, scale_rel: bool):
    """``c * q @ rel^T`` for both tables, float32 ``[B, Hq, Wq, heads, 2win - 1]`` contiguous."""
    c = scale if scale_rel else 1.0
    qf = q.float()
    return ((torch.matmul(qf, rel_h.float().t()) * c).contiguous(),
            (torch.matmul(qf, rel_w.float().t()) * c).contiguous())


def _common(q, k, v, block_size, halo_size, stride):
    B, H, W, heads, D = k.shape
    bq = block_size // stride
    win = block_size + 2 * halo_size
    block_m, block_n, warps = _tiles(bq * bq, block_size * block_size, win)
    n_mt = triton.cdiv(bq * bq, block_m)
    n_blocks = (H // block_size) * (W // block_size)
    geo = dict(BLOCK=block_size, HALO=halo_size, WIN=win, HEAD_DIM=D, HEAD_DIM_V=v.shape[-1], BLOCK_D=_pow2(D),
               BLOCK_DV=_pow2(v.shape[-1]), BLOCK_M=block_m, DOT_PREC=_dot_precision(q.dtype))
    return B, H, W, heads, bq, win, n_mt, n_blocks, block_n, warps, geo


def _constexprs(launcher: Launcher, **values) -> tuple:
    """The constexpr values in the kernel's signature order (launches pass every argument by position)."""
    names = [n for n in launcher.param_names if n in values]
    assert len(names) == len(values), f"unknown constexprs {set(values) - set(names)}"
    return tuple(values[n] for n in names)


def _key(kind, *tensors, extra=()):
    return (kind,) + tuple((t.dtype, t.shape, t.stride()) for t in tensors) + (aligned(*tensors),) + tuple(extra)


def halo_triton_fwd(q, k, v, rel_h, rel_w, block_size: int, halo_size: int, stride: int, scale: float,
                    scale_rel: bool):
    """``(out, lse)``; see ``foveal::halo_fwd``."""
    B, H, W, heads, bq, win, n_mt, n_blocks, _, warps, geo = _common(q, k, v, block_size, halo_size, stride)
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    lse = q.new_empty(q.shape[:-1], dtype=lse_dtype(q.dtype))
    if q.numel() == 0 or v.numel() == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    has_rel = rel_h is not None
    qrh, qrw = _rel_products(q, rel_h, rel_w, scale, scale_rel) if has_rel else (lse, lse)
    consts = _constexprs(_FWD, **geo, HAS_REL=has_rel, **_row_step(win, max(q.shape[-1], v.shape[-1])))
    args = (q, k, v, qrh, qrw, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            heads, H, W, W // block_size, bq, n_mt, scale * _LOG2E, *consts)
    with on_device(q.device):
        _FWD((n_blocks * n_mt, B * heads), args, _key("fwd", q, k, v, qrh, out, extra=consts),
             num_warps=warps, num_stages=2)
    return out, lse


def halo_triton_bwd(grad_out, q, k, v, rel_h, rel_w, out, lse, grad_lse, block_size: int, halo_size: int,
                    stride: int, scale: float, scale_rel: bool):
    """``(dq, dk, dv, drel_h, drel_w)``; see ``foveal::halo_bwd``."""
    B, H, W, heads, bq, win, n_mt, n_blocks, block_n, warps, geo = _common(q, k, v, block_size, halo_size, stride)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    has_rel = rel_h is not None
    # the fused form's float32 atomics make dK / dV differ between runs at rounding level
    fused = _fused_bwd(B * heads * n_blocks, block_size, halo_size) and not torch.are_deterministic_algorithms_enabled()
    one_window = fused and n_blocks == 1 and n_mt == 1  # every key in the one window of one program
    if fused and not one_window and q.numel() and v.numel():  # float32 atomics, contiguous [B, H, W, heads, D*]
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    else:
        dk = torch.empty_like(k, memory_format=torch.contiguous_format)
        dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if q.numel() == 0 or v.numel() == 0:
        zeros = (torch.zeros_like(rel_h), torch.zeros_like(rel_w)) if has_rel else (None, None)
        return (dq.zero_(), dk.zero_(), dv.zero_()) + zeros
    lse = lse.contiguous()
    glse = lse if grad_lse is None else grad_lse.float().contiguous()
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    if has_rel:
        qrh, qrw = _rel_products(q, rel_h, rel_w, scale, scale_rel)
        dqrh, dqrw = torch.zeros_like(qrh), torch.zeros_like(qrw)
    else:
        qrh = qrw = dqrh = dqrw = delta
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    consts = _constexprs(_DQ, **geo, HAS_REL=has_rel, **_row_step(win, max(q.shape[-1], v.shape[-1])),
                         HAS_GLSE=grad_lse is not None, FUSED=fused, ONE_WINDOW=one_window)
    with on_device(q.device):
        args = (q, k, v, qrh, qrw, out, grad_out, lse, glse, delta, dq, dqrh, dqrw, dk, dv, *strides[:15],
                *out.stride(), *grad_out.stride(), heads, H, W, W // block_size, bq, n_mt, scale, scale * _LOG2E,
                *consts)
        _DQ((n_blocks * n_mt, B * heads), args,
            _key("dq", q, k, v, out, grad_out, dq, lse, delta, qrh, extra=consts), num_warps=warps, num_stages=2)
        if fused:
            dk, dv = dk.to(k.dtype), dv.to(v.dtype)  # no copy for one window
        else:
            n_nt = triton.cdiv(block_size * block_size, block_n)
            consts = _constexprs(_DKDV, **geo, REACH=math.ceil(halo_size / block_size), HAS_REL=has_rel,
                                 BLOCK_N=block_n)
            args = (q, k, v, qrh, qrw, grad_out, lse, delta, dk, dv, *strides,
                    heads, H, W, W // block_size, H // block_size, bq, n_mt, n_nt, scale, scale * _LOG2E, *consts)
            _DKDV((n_blocks * n_nt, B * heads), args,
                  _key("dkdv", q, k, v, grad_out, dk, dv, lse, delta, qrh, extra=consts),
                  num_warps=warps, num_stages=2)
    drh = drw = None
    if has_rel:
        c = scale if scale_rel else 1.0
        qf = q.float()
        dq = (dq.float() + torch.matmul(dqrh, rel_h.float()) * c + torch.matmul(dqrw, rel_w.float()) * c).to(q.dtype)
        drh = (torch.einsum("...r,...d->rd", dqrh, qf) * c).to(rel_h.dtype)
        drw = (torch.einsum("...r,...d->rd", dqrw, qf) * c).to(rel_w.dtype)
    return dq, dk, dv, drh, drw
