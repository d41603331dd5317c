"""Fused Triton neighborhood attention (NA / DiNA / GNA, 1-D/2-D/3-D): forward and backward.

Algorithm. Every rank is run as 3-D (missing axes have length 1). A dilation group (one residue
per axis, SPEC section 1) is an independent dense sub-map, so dilation, ragged groups included,
only changes the addressing: coordinates inside a group are ``c``, the tensor coordinate is
``c * dilation + group``. Queries are processed in tiles that are boxes of the sub-map
(``TX x TY x TZ``); the window start and end are monotone in the query coordinate, so the keys a
tile needs form a box too (``[start(first), end(last))`` per axis, ``T + k - 1`` wide for
stride 1). The forward streams that key box in blocks of ``BLOCK_N`` (flattened, or as lines of
``WZ`` keys along z), computes ``S = Q K^T`` on tensor cores, masks every (query, key) pair with
the exact window rule (per axis ``0 <= key - start(query) < end(query) - start(query)``, which
also covers stride and causal), adds the relative positional bias by a gather from the ``rpb``
table, and runs an online softmax in base 2. It saves the log-sum-exp; no ``N x k^n`` tensor is
ever written.

A window that covers the whole map (the 7x7 stage of NAT) is the same kernel with one tile per
map, i.e. a dense fused attention. The backward is two kernels:

- ``_na_bwd_dq`` (query tiles, as the forward) computes ``delta = rowsum(dO * O) - dLSE``,
  recomputes ``P`` from the log-sum-exp, accumulates ``dQ`` and, when there is a bias, its
  gradient. dRPB is fused: each key block is read as ``NL`` lines of ``WZ`` keys along z, so the
  relative z offset of a (query, key) pair is ``key slot - query column + c``, the same on every
  line. ``dS`` is permuted to rows (query line, key line) x columns (query z, key slot) and
  multiplied by a one-hot Toeplitz matrix that sums each diagonal into its z offset; a second
  one-hot product adds the rows into a ``[RXYP, RZP]`` register accumulator indexed by the (x, y)
  offset. The one-hot operands are exact; ``dS`` enters rounded to the input dtype for fp16/bf16
  inputs (as it enters the dQ product; twice the tensor-core rate of tf32) and as tf32x3 for fp32
  inputs; the row sums of the second product stay fp32 (tf32). (1-D maps and tiles with fewer than 16 line pairs gather the
  per-row shift instead.) Each program writes its accumulator once: into its own row of a
  partial buffer summed in a fixed order when ``torch.are_deterministic_algorithms_enabled()``,
  else with one ``atomic_add`` per entry. No (query, neighbor) tensor is ever stored.
- ``_na_bwd_dkdv`` (key tiles) inverts the window rule in closed form (``_query_range``) to find
  the box of queries that attend a key tile and accumulates ``dK`` and ``dV``.

Precision: fp16/bf16 operands with fp32 accumulation; fp32 inputs use tf32 tensor cores when
``torch.backends.cuda.matmul.allow_tf32`` is set and exact fp32 products otherwise. Head dims are
padded to a power of two (at least 16) and masked; every tail (map edges, ragged groups, partial
key blocks) is masked, so any map size works.

Tiles are chosen per problem by a small autotuner (``_tuned``) over ``_candidates`` and cached by
shape; ``FOVEAL_NA_AUTOTUNE=0`` takes the first candidate. Masks and the bias normally come from
per-class logit tables (``neighborhood_tables.py``: one contiguous load per logit instead of the
window tests and the bias gather above); ``FOVEAL_NA_TABLES=0`` or a table over its size bound
takes the in-kernel path. When ``TRITON_INTERPRET=1`` is set
before triton is imported, the kernels run in Triton's interpreter and accept CPU tensors: that
is how the CPU tests check them. Measured numbers per version: ``docs/benchmarks.md``.
"""
import functools
import itertools
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from . import neighborhood_tables as tables
from .backends import logger
from .dispatch import env
from .launch import INTERPRETING, Launcher, aligned, on_device, persistent
from .neighborhood_reference import lse_dtype

__all__ = ["na_triton_probe", "na_triton_fwd", "na_triton_bwd", "MAX_HEAD_DIM", "MAX_RPB_SPAN", "MAX_RPB_ROW"]

MAX_HEAD_DIM = 256
# The fused dRPB keeps a padded [RXYP, RZP] table of relative offsets per program: bounds on it.
MAX_RPB_SPAN = 4096
MAX_RPB_ROW = 64
_LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return INTERPRETING  # a constant (see foveal.kernels.launch)


# -- device helpers -------------------------------------------------------------------------------

@triton.jit
def _window(c, group_len, kernel, stride, CAUSAL: tl.constexpr):
    # SPEC section 1 window [start, end) of group coordinate c (tensor or scalar, c < group_len)
    if CAUSAL:
        leader = tl.minimum((c // stride) * stride + stride - 1, group_len - 1)
        start = tl.maximum(leader - kernel + 1, 0)
        end = tl.minimum(c + 1, group_len)
    else:
        leader = tl.minimum((c // stride) * stride + stride // 2, group_len - 1)
        start = tl.minimum(tl.maximum(leader - kernel // 2, 0), group_len - kernel)
        end = start + kernel
    return start, end


@triton.jit
def _query_range(j0, j1, group_len, kernel, stride, CAUSAL: tl.constexpr):
    # inclusive range of queries whose window holds a key in [j0, j1]: the window rule inverted
    # (start and end are monotone in the query, so the answer is an interval)
    if CAUSAL:
        lo = j0
        t = j1 + kernel - 1
        hi = ((t - stride + 1) // stride) * stride + stride - 1
        hi = tl.where(group_len - 1 <= t, group_len - 1, tl.minimum(hi, group_len - 1))
    else:
        wl = kernel // 2
        a = j0 - kernel + 1 + wl - stride // 2
        lo = tl.where(a > 0, ((a + stride - 1) // stride) * stride, 0)
        lo = tl.where(j0 - kernel + 1 <= 0, 0, tl.minimum(lo, group_len - 1))
        t = j1 + wl
        hi = ((t - stride // 2) // stride) * stride + stride - 1
        hi = tl.where((j1 >= group_len - kernel) | (group_len - 1 <= t), group_len - 1, tl.minimum(hi, group_len - 1))
    return lo, hi


@triton.jit
def _row_mask(row_ok, offs, DIM: tl.constexpr, BLOCK: tl.constexpr):
    # [rows, BLOCK] access mask; when the head dim needs no padding it depends on the row only,
    # which keeps the accesses vectorized (and the loads eligible for cp.async)
    if DIM == BLOCK:
        return row_ok[:, None]
    else:
        return row_ok[:, None] & (offs[None, :] < DIM)


@triton.jit
def _decompose_pid(pid, HEADS, n_tiles_x, n_tiles_y, n_tiles_z, DIL_X, DIL_Y, DIL_Z):
    # program order: (batch, head) outermost, then dilation group, then tile (neighbours share keys)
    n_tiles = n_tiles_x * n_tiles_y * n_tiles_z
    t = pid % n_tiles
    rest = pid // n_tiles
    n_groups = DIL_X * DIL_Y * DIL_Z
    g = rest % n_groups
    bh = rest // n_groups
    return (bh // HEADS, bh % HEADS,
            g // (DIL_Y * DIL_Z), (g // DIL_Z) % DIL_Y, g % DIL_Z,
            t // (n_tiles_y * n_tiles_z), (t // n_tiles_z) % n_tiles_y, t % n_tiles_z)


@triton.jit
def _box_block(it, x0, y0, z0, ex, ey, ez, n_zseg, BLOCK: tl.constexpr, WZ: tl.constexpr, NDIM: tl.constexpr):
    # coordinates of block `it` of the box [x0, x0+ex) x [y0, y0+ey) x [z0, z0+ez):
    # WZ > 0: BLOCK // WZ lines (x, y) of WZ slots along z (no division below 3-D);
    # WZ == 0: the box flattened, z fastest (denser for windows that fit no power of two)
    offs = tl.arange(0, BLOCK)
    if WZ == 0:
        slot = it * BLOCK + offs
        cz = slot % ez
        line = slot // ez
    else:
        NL: tl.constexpr = BLOCK // WZ
        line = (it // n_zseg) * NL + offs // WZ
        cz = (it % n_zseg) * WZ + offs % WZ
    if NDIM == 3:
        cx = line // ey
        cy = line % ey
    else:
        cx = tl.zeros_like(line)
        cy = line
    valid = (line < ex * ey) & (cz < ez)
    return x0 + cx, y0 + cy, z0 + cz, valid


@triton.jit
def _box_iters(ex, ey, ez, BLOCK: tl.constexpr, WZ: tl.constexpr):
    if WZ == 0:
        n_zseg = 1
        n_it = tl.cdiv(ex * ey * ez, BLOCK)
    else:
        NL: tl.constexpr = BLOCK // WZ
        n_zseg = tl.cdiv(ez, WZ)
        n_it = tl.cdiv(ex * ey, NL) * n_zseg
    return n_it, n_zseg


@triton.jit
def _pair_mask(kx, ky, kz, sx, sy, sz, wx, wy, wz, NDIM: tl.constexpr):
    # k*: key coordinates [1 or N, ...]; s*/w*: window start / width of the paired query.
    # One unsigned compare per axis: 0 <= key - start < width. A zero width masks the query.
    m = (kz - sz).to(tl.uint32) < wz.to(tl.uint32)
    if NDIM >= 2:
        m = m & ((ky - sy).to(tl.uint32) < wy.to(tl.uint32))
    if NDIM >= 3:
        m = m & ((kx - sx).to(tl.uint32) < wx.to(tl.uint32))
    return m


@triton.jit
def _rel_index(cx, cy, cz, KER_X, KER_Y, KER_Z):
    # the coordinate-dependent part of the flat rpb index (key part minus query part)
    RY = 2 * KER_Y - 1
    RZ = 2 * KER_Z - 1
    return (cx * RY + cy) * RZ + cz


@triton.jit
def _drpb_block(ds, acc, cz, x0q, y0q, z0q, it, n_zseg, kbx0, kby0, kbz0, ex, ey,
                KER_X, KER_Y, KER_Z,
                TX: tl.constexpr, TY: tl.constexpr, TZ: tl.constexpr, BLOCK_N: tl.constexpr,
                WZ: tl.constexpr, RXYP: tl.constexpr, RZP: tl.constexpr, NDIM: tl.constexpr,
                DRPB_PREC: tl.constexpr):
    # Adds this block's dS (zero off the windows) into acc[rel_xy, rel_z]. The block holds NL
    # key lines of WZ keys along z. The relative z offset of query column mz and key slot zz is
    # zz - mz + c, the same for every line: a one-hot Toeplitz product sums dS over (mz, zz) into
    # rows (query line, key line); a second one-hot product adds the rows into their (x, y) offset.
    NL: tl.constexpr = BLOCK_N // WZ
    QL: tl.constexpr = TX * TY
    zbase = kbz0 + (it % n_zseg) * WZ
    if QL * NL >= 16 and TZ * WZ * RZP <= 8192:
        h = tl.reshape(tl.permute(tl.reshape(ds, [QL, TZ, NL, WZ]), (0, 2, 1, 3)), [QL * NL, TZ * WZ])
        t = tl.arange(0, TZ * WZ)
        rel_z = (t % WZ) - (t // WZ) + (zbase - z0q + KER_Z - 1)
        toeplitz = (rel_z[:, None] == tl.arange(0, RZP)[None, :]).to(tl.float32)
        # [QL * NL, RZP]; the one-hot operand is exact. Half inputs: dS enters rounded to the input
        # dtype, as it does in the dQ product; fp32 inputs: tf32x3
        if DRPB_PREC == "half":
            h = tl.dot(h, toeplitz.to(h.dtype))
        else:
            h = tl.dot(h, toeplitz, input_precision=DRPB_PREC)
    else:
        # few rows (tl.dot needs 16) or a large Toeplitz operand: gather the per-row shift into columns
        col = tl.arange(0, NL * RZP)
        line_local = col // RZP
        r = col % RZP
        zz = cz[:, None] + r[None, :] - (KER_Z - 1) - zbase
        ok = (zz >= 0) & (zz < WZ) & (r[None, :] < 2 * KER_Z - 1)
        idx = line_local[None, :] * WZ + tl.where(ok, zz, 0)
        g = tl.where(ok, tl.gather(ds, idx, axis=1).to(tl.float32), 0.0)
        h = tl.reshape(tl.sum(tl.reshape(g, [QL, TZ, NL * RZP]), axis=1), [QL * NL, RZP])
    if NDIM == 1:
        acc += tl.sum(h, axis=0)[None, :]
    else:
        j = tl.arange(0, QL * NL)
        qline = j // NL
        line = (it // n_zseg) * NL + j % NL
        rx = kbx0 + line // ey - (x0q + qline // TY) + KER_X - 1
        ry = kby0 + line % ey - (y0q + qline % TY) + KER_Y - 1
        ok_line = (line < ex * ey) & (rx >= 0) & (rx < 2 * KER_X - 1) & (ry >= 0) & (ry < 2 * KER_Y - 1)
        rxy = rx * (2 * KER_Y - 1) + ry
        onehot = ((tl.arange(0, RXYP)[:, None] == rxy[None, :]) & ok_line[None, :]).to(tl.float32)
        if QL * NL >= 16:
            acc += tl.dot(onehot, h, input_precision="tf32" if DRPB_PREC == "half" else DRPB_PREC)
        else:
            acc += tl.sum(onehot[:, :, None] * h[None, :, :], axis=1)
    return acc


@triton.jit
def _table_rows(TAB, CLS, h64, stride_tab_h, tab_class_stride, NCLS_Y, NCLS_Z, gx, gy, gz, tx, ty, tz,
                n_tiles_x, n_tiles_y, n_tiles_z, DIL_X, DIL_Y, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # [BLOCK_M, BLOCK_N] pointers into block 0 of this program's logit table (neighborhood_tables.py):
    # the tile's class combines its per-axis classes (ids stored x, then y, then z, each [group, tile])
    oy = DIL_X * n_tiles_x
    oz = oy + DIL_Y * n_tiles_y
    cls = ((tl.load(CLS + gx * n_tiles_x + tx) * NCLS_Y + tl.load(CLS + oy + gy * n_tiles_y + ty)) * NCLS_Z
           + tl.load(CLS + oz + gz * n_tiles_z + tz))
    rows = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    return TAB + h64 * stride_tab_h + cls.to(tl.int64) * tab_class_stride + rows


# -- forward --------------------------------------------------------------------------------------

@triton.jit
def _na_fwd(
    Q, K, V, RPB, O, LSE, TAB, CLS,  #
    stride_qb, stride_qx, stride_qy, stride_qz, stride_qh, stride_qd,  #
    stride_kb, stride_kx, stride_ky, stride_kz, stride_kh, stride_kd,  #
    stride_vb, stride_vx, stride_vy, stride_vz, stride_vh, stride_vd,  #
    stride_ob, stride_ox, stride_oy, stride_oz, stride_oh, stride_od,  #
    stride_lb, stride_lx, stride_ly, stride_lz, stride_lh,  #
    HEADS, SIZE_X, SIZE_Y, SIZE_Z,  #
    KER_X, KER_Y, KER_Z, DIL_X, DIL_Y, DIL_Z, STR_X, STR_Y, STR_Z,  #
    qk_scale, n_tiles_x, n_tiles_y, n_tiles_z,  #
    stride_tab_h, tab_class_stride, NCLS_Y, NCLS_Z,  #
    CAUSAL_X: tl.constexpr, CAUSAL_Y: tl.constexpr, CAUSAL_Z: tl.constexpr,  #
    NDIM: tl.constexpr, HAS_RPB: tl.constexpr, SCALE_POSITIVE: tl.constexpr, USE_TABLE: tl.constexpr,  #
    TX: tl.constexpr, TY: tl.constexpr, TZ: tl.constexpr, BLOCK_N: tl.constexpr, WZ: tl.constexpr,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,  #
    DOT_PREC: tl.constexpr,
):
    BLOCK_M: tl.constexpr = TX * TY * TZ
    b, h, gx, gy, gz, tx, ty, tz = _decompose_pid(tl.program_id(0), HEADS, n_tiles_x, n_tiles_y, n_tiles_z,
                                                  DIL_X, DIL_Y, DIL_Z)
    lgx = (SIZE_X - gx + DIL_X - 1) // DIL_X
    lgy = (SIZE_Y - gy + DIL_Y - 1) // DIL_Y
    lgz = (SIZE_Z - gz + DIL_Z - 1) // DIL_Z

    # query tile: group coordinates, validity, windows
    m = tl.arange(0, BLOCK_M)
    cx = tx * TX + m // (TY * TZ)
    cy = ty * TY + (m // TZ) % TY
    cz = tz * TZ + m % TZ
    q_ok = (cx < lgx) & (cy < lgy) & (cz < lgz)
    cx = tl.minimum(cx, lgx - 1)
    cy = tl.minimum(cy, lgy - 1)
    cz = tl.minimum(cz, lgz - 1)
    sx, ex_q = _window(cx, lgx, KER_X, STR_X, CAUSAL_X)
    sy, ey_q = _window(cy, lgy, KER_Y, STR_Y, CAUSAL_Y)
    sz, ez_q = _window(cz, lgz, KER_Z, STR_Z, CAUSAL_Z)
    wz = tl.where(q_ok, ez_q - sz, 0)

    # the key box of the tile
    kbx0, _ = _window(tl.minimum(tx * TX, lgx - 1), lgx, KER_X, STR_X, CAUSAL_X)
    _, kbx1 = _window(tl.minimum(tx * TX + TX - 1, lgx - 1), lgx, KER_X, STR_X, CAUSAL_X)
    kby0, _ = _window(tl.minimum(ty * TY, lgy - 1), lgy, KER_Y, STR_Y, CAUSAL_Y)
    _, kby1 = _window(tl.minimum(ty * TY + TY - 1, lgy - 1), lgy, KER_Y, STR_Y, CAUSAL_Y)
    kbz0, _ = _window(tl.minimum(tz * TZ, lgz - 1), lgz, KER_Z, STR_Z, CAUSAL_Z)
    _, kbz1 = _window(tl.minimum(tz * TZ + TZ - 1, lgz - 1), lgz, KER_Z, STR_Z, CAUSAL_Z)
    n_it, n_zseg = _box_iters(kbx1 - kbx0, kby1 - kby0, kbz1 - kbz0, BLOCK_N, WZ)

    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_row = (cx * DIL_X + gx).to(tl.int64) * stride_qx + (cy * DIL_Y + gy) * stride_qy + (cz * DIL_Z + gz) * stride_qz
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + q_row[:, None] + offs_d[None, :] * stride_qd,
                mask=_row_mask(q_ok, offs_d, HEAD_DIM, BLOCK_D), other=0.0)
    k_base = K + b64 * stride_kb + h64 * stride_kh
    v_base = V + b64 * stride_vb + h64 * stride_vh
    if HAS_RPB:
        rpb_base = RPB + h64 * ((2 * KER_X - 1) * (2 * KER_Y - 1) * (2 * KER_Z - 1))
        q_rel = _rel_index(KER_X - 1 - cx, KER_Y - 1 - cy, KER_Z - 1 - cz, KER_X, KER_Y, KER_Z)

    if USE_TABLE:
        tab = _table_rows(TAB, CLS, h64, stride_tab_h, tab_class_stride, NCLS_Y, NCLS_Z, gx, gy, gz, tx, ty, tz,
                          n_tiles_x, n_tiles_y, n_tiles_z, DIL_X, DIL_Y, BLOCK_M, BLOCK_N)
    # without a bias the scale is applied inside exp2's FMA (the row max is taken unscaled)
    PRESCALE: tl.constexpr = HAS_RPB or USE_TABLE or not SCALE_POSITIVE

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for it in range(0, n_it):
        kx, ky, kz, k_ok = _box_block(it, kbx0, kby0, kbz0, kbx1 - kbx0, kby1 - kby0, kbz1 - kbz0, n_zseg, BLOCK_N, WZ, NDIM)
        k_row = (kx * DIL_X + gx).to(tl.int64) * stride_kx + (ky * DIL_Y + gy) * stride_ky + (kz * DIL_Z + gz) * stride_kz
        v_row = (kx * DIL_X + gx).to(tl.int64) * stride_vx + (ky * DIL_Y + gy) * stride_vy + (kz * DIL_Z + gz) * stride_vz
        k = tl.load(k_base + k_row[:, None] + offs_d[None, :] * stride_kd,
                    mask=_row_mask(k_ok, offs_d, HEAD_DIM, BLOCK_D), other=0.0)
        v = tl.load(v_base + v_row[:, None] + offs_dv[None, :] * stride_vd,
                    mask=_row_mask(k_ok, offs_dv, HEAD_DIM_V, BLOCK_DV), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if USE_TABLE:  # bias and mask in one contiguous load
            s = s * qk_scale + tl.load(tab + it * (BLOCK_M * BLOCK_N)).to(tl.float32)
        else:
            if HAS_RPB:
                rel = q_rel[:, None] + _rel_index(kx, ky, kz, KER_X, KER_Y, KER_Z)[None, :]
            kz = tl.where(k_ok, kz, -(1 << 24))  # slots past the box fail the z test
            inwin = _pair_mask(kx[None, :], ky[None, :], kz[None, :], sx[:, None], sy[:, None], sz[:, None],
                               (ex_q - sx)[:, None], (ey_q - sy)[:, None], wz[:, None], NDIM)
            if HAS_RPB:  # the masked load also masks: off-window logits get -inf
                s = s * qk_scale + tl.load(rpb_base + rel, mask=inwin, other=float("-inf"))
            elif PRESCALE:
                s = tl.where(inwin, s * qk_scale, float("-inf"))
            else:
                s = tl.where(inwin, s, float("-inf"))
        if PRESCALE:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
            p = tl.math.exp2(s - m_use[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s * qk_scale - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_row = (cx * DIL_X + gx).to(tl.int64) * stride_ox + (cy * DIL_Y + gy) * stride_oy + (cz * DIL_Z + gz) * stride_oz
    tl.store(O + b64 * stride_ob + h64 * stride_oh + o_row[:, None] + offs_dv[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=_row_mask(q_ok, offs_dv, HEAD_DIM_V, BLOCK_DV))
    l_row = (cx * DIL_X + gx).to(tl.int64) * stride_lx + (cy * DIL_Y + gy) * stride_ly + (cz * DIL_Z + gz) * stride_lz
    lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453
    tl.store(LSE + b64 * stride_lb + h64 * stride_lh + l_row, lse, mask=q_ok)


# -- backward -------------------------------------------------------------------------------------

@triton.jit
def _na_bwd_dq(
    Q, K, V, RPB, O, DO, LSE, DLSE, DELTA, DQ, DRPB, TAB, CLS,  #
    stride_qb, stride_qx, stride_qy, stride_qz, stride_qh, stride_qd,  #
    stride_kb, stride_kx, stride_ky, stride_kz, stride_kh, stride_kd,  #
    stride_vb, stride_vx, stride_vy, stride_vz, stride_vh, stride_vd,  #
    stride_ob, stride_ox, stride_oy, stride_oz, stride_oh, stride_od,  #
    stride_dob, stride_dox, stride_doy, stride_doz, stride_doh, stride_dod,  #
    stride_lb, stride_lx, stride_ly, stride_lz, stride_lh,  #
    stride_glb, stride_glx, stride_gly, stride_glz, stride_glh,  #
    stride_dqb, stride_dqx, stride_dqy, stride_dqz, stride_dqh, stride_dqd,  #
    HEADS, SIZE_X, SIZE_Y, SIZE_Z,  #
    KER_X, KER_Y, KER_Z, DIL_X, DIL_Y, DIL_Z, STR_X, STR_Y, STR_Z,  #
    qk_scale, scale, n_tiles_x, n_tiles_y, n_tiles_z,  #
    stride_tab_h, tab_class_stride, NCLS_Y, NCLS_Z,  #
    CAUSAL_X: tl.constexpr, CAUSAL_Y: tl.constexpr, CAUSAL_Z: tl.constexpr,  #
    NDIM: tl.constexpr, HAS_RPB: tl.constexpr, HAS_DLSE: tl.constexpr, DRPB_PARTIAL: tl.constexpr,  #
    USE_TABLE: tl.constexpr,  #
    TX: tl.constexpr, TY: tl.constexpr, TZ: tl.constexpr, BLOCK_N: tl.constexpr, WZ: tl.constexpr,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,  #
    DOT_PREC: tl.constexpr,  #
    RXYP: tl.constexpr, RZP: tl.constexpr, DRPB_PREC: tl.constexpr,
):
    BLOCK_M: tl.constexpr = TX * TY * TZ
    pid = tl.program_id(0)
    b, h, gx, gy, gz, tx, ty, tz = _decompose_pid(pid, HEADS, n_tiles_x, n_tiles_y, n_tiles_z, DIL_X, DIL_Y, DIL_Z)
    lgx = (SIZE_X - gx + DIL_X - 1) // DIL_X
    lgy = (SIZE_Y - gy + DIL_Y - 1) // DIL_Y
    lgz = (SIZE_Z - gz + DIL_Z - 1) // DIL_Z

    m = tl.arange(0, BLOCK_M)
    cx = tx * TX + m // (TY * TZ)
    cy = ty * TY + (m // TZ) % TY
    cz = tz * TZ + m % TZ
    q_ok = (cx < lgx) & (cy < lgy) & (cz < lgz)
    cx = tl.minimum(cx, lgx - 1)
    cy = tl.minimum(cy, lgy - 1)
    cz = tl.minimum(cz, lgz - 1)
    sx, ex_q = _window(cx, lgx, KER_X, STR_X, CAUSAL_X)
    sy, ey_q = _window(cy, lgy, KER_Y, STR_Y, CAUSAL_Y)
    sz, ez_q = _window(cz, lgz, KER_Z, STR_Z, CAUSAL_Z)
    wz = tl.where(q_ok, ez_q - sz, 0)  # zero width: tail queries get P = 0 (nothing reaches dRPB)

    kbx0, _ = _window(tl.minimum(tx * TX, lgx - 1), lgx, KER_X, STR_X, CAUSAL_X)
    _, kbx1 = _window(tl.minimum(tx * TX + TX - 1, lgx - 1), lgx, KER_X, STR_X, CAUSAL_X)
    kby0, _ = _window(tl.minimum(ty * TY, lgy - 1), lgy, KER_Y, STR_Y, CAUSAL_Y)
    _, kby1 = _window(tl.minimum(ty * TY + TY - 1, lgy - 1), lgy, KER_Y, STR_Y, CAUSAL_Y)
    kbz0, _ = _window(tl.minimum(tz * TZ, lgz - 1), lgz, KER_Z, STR_Z, CAUSAL_Z)
    _, kbz1 = _window(tl.minimum(tz * TZ + TZ - 1, lgz - 1), lgz, KER_Z, STR_Z, CAUSAL_Z)
    n_it, n_zseg = _box_iters(kbx1 - kbx0, kby1 - kby0, kbz1 - kbz0, BLOCK_N, WZ)

    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    ix = (cx * DIL_X + gx).to(tl.int64)
    iy = cy * DIL_Y + gy
    iz = cz * DIL_Z + gz
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + (ix * stride_qx + iy * stride_qy + iz * stride_qz)[:, None]
                + offs_d[None, :] * stride_qd, mask=_row_mask(q_ok, offs_d, HEAD_DIM, BLOCK_D), other=0.0)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + (ix * stride_dox + iy * stride_doy + iz * stride_doz)[:, None]
                 + offs_dv[None, :] * stride_dod, mask=_row_mask(q_ok, offs_dv, HEAD_DIM_V, BLOCK_DV), other=0.0)
    o = tl.load(O + b64 * stride_ob + h64 * stride_oh + (ix * stride_ox + iy * stride_oy + iz * stride_oz)[:, None]
                + offs_dv[None, :] * stride_od, mask=_row_mask(q_ok, offs_dv, HEAD_DIM_V, BLOCK_DV), other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + b64 * stride_glb + h64 * stride_glh + ix * stride_glx + iy * stride_gly + iz * stride_glz,
                         mask=q_ok, other=0.0).to(tl.float32)
    # delta is kept contiguous [B, heads, X, Y, Z] for the dK/dV kernel
    tl.store(DELTA + (b64 * HEADS + h64) * (SIZE_X * SIZE_Y * SIZE_Z) + (ix * SIZE_Y + iy) * SIZE_Z + iz, delta, mask=q_ok)
    lse2 = tl.load(LSE + b64 * stride_lb + h64 * stride_lh + ix * stride_lx + iy * stride_ly + iz * stride_lz,
                   mask=q_ok, other=0.0) * 1.4426950408889634

    k_base = K + b64 * stride_kb + h64 * stride_kh
    v_base = V + b64 * stride_vb + h64 * stride_vh
    if HAS_RPB:
        rpb_base = RPB + h64 * ((2 * KER_X - 1) * (2 * KER_Y - 1) * (2 * KER_Z - 1))
        q_rel = _rel_index(KER_X - 1 - cx, KER_Y - 1 - cy, KER_Z - 1 - cz, KER_X, KER_Y, KER_Z)
        drpb_acc = tl.zeros([RXYP, RZP], tl.float32)
    if USE_TABLE:
        tab = _table_rows(TAB, CLS, h64, stride_tab_h, tab_class_stride, NCLS_Y, NCLS_Z, gx, gy, gz, tx, ty, tz,
                          n_tiles_x, n_tiles_y, n_tiles_z, DIL_X, DIL_Y, BLOCK_M, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for it in range(0, n_it):
        kx, ky, kz, k_ok = _box_block(it, kbx0, kby0, kbz0, kbx1 - kbx0, kby1 - kby0, kbz1 - kbz0, n_zseg, BLOCK_N, WZ, NDIM)
        k_row = (kx * DIL_X + gx).to(tl.int64) * stride_kx + (ky * DIL_Y + gy) * stride_ky + (kz * DIL_Z + gz) * stride_kz
        v_row = (kx * DIL_X + gx).to(tl.int64) * stride_vx + (ky * DIL_Y + gy) * stride_vy + (kz * DIL_Z + gz) * stride_vz
        k = tl.load(k_base + k_row[:, None] + offs_d[None, :] * stride_kd, mask=_row_mask(k_ok, offs_d, HEAD_DIM, BLOCK_D), other=0.0)
        v = tl.load(v_base + v_row[:, None] + offs_dv[None, :] * stride_vd, mask=_row_mask(k_ok, offs_dv, HEAD_DIM_V, BLOCK_DV), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if USE_TABLE:
            s = s * qk_scale + tl.load(tab + it * (BLOCK_M * BLOCK_N)).to(tl.float32)
        else:
            if HAS_RPB:
                rel = q_rel[:, None] + _rel_index(kx, ky, kz, KER_X, KER_Y, KER_Z)[None, :]
            kz = tl.where(k_ok, kz, -(1 << 24))
            inwin = _pair_mask(kx[None, :], ky[None, :], kz[None, :], sx[:, None], sy[:, None], sz[:, None],
                               (ex_q - sx)[:, None], (ey_q - sy)[:, None], wz[:, None], NDIM)
            if HAS_RPB:
                s = s * qk_scale + tl.load(rpb_base + rel, mask=inwin, other=float("-inf"))
            else:
                s = tl.where(inwin, s * qk_scale, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        ds_op = ds.to(k.dtype)
        dq += tl.dot(ds_op, k, input_precision=DOT_PREC)
        if HAS_RPB:
            drpb_acc = _drpb_block(ds_op if DRPB_PREC == "half" else ds, drpb_acc, cz, tx * TX, ty * TY, tz * TZ, it, n_zseg, kbx0, kby0, kbz0,
                                   kbx1 - kbx0, kby1 - kby0, KER_X, KER_Y, KER_Z,
                                   TX, TY, TZ, BLOCK_N, WZ, RXYP, RZP, NDIM, DRPB_PREC)

    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + (ix * stride_dqx + iy * stride_dqy + iz * stride_dqz)[:, None]
             + offs_d[None, :] * stride_dqd, (dq * scale).to(DQ.dtype.element_ty), mask=_row_mask(q_ok, offs_d, HEAD_DIM, BLOCK_D))
    if HAS_RPB:
        RZ = 2 * KER_Z - 1
        n_rel = (2 * KER_X - 1) * (2 * KER_Y - 1) * RZ
        rows = tl.arange(0, RXYP)[:, None]
        cols = tl.arange(0, RZP)[None, :]
        r_ok = (rows < (2 * KER_X - 1) * (2 * KER_Y - 1)) & (cols < RZ)
        if DRPB_PARTIAL:
            tl.store(DRPB + pid.to(tl.int64) * n_rel + rows * RZ + cols, drpb_acc, mask=r_ok)
        else:
            tl.atomic_add(DRPB + h64 * n_rel + rows * RZ + cols, drpb_acc, mask=r_ok, sem="relaxed")


@triton.jit
def _na_bwd_dkdv(
    Q, K, V, RPB, DO, LSE, DELTA, DK, DV, TAB, CLS,  #
    stride_qb, stride_qx, stride_qy, stride_qz, stride_qh, stride_qd,  #
    stride_kb, stride_kx, stride_ky, stride_kz, stride_kh, stride_kd,  #
    stride_vb, stride_vx, stride_vy, stride_vz, stride_vh, stride_vd,  #
    stride_dob, stride_dox, stride_doy, stride_doz, stride_doh, stride_dod,  #
    stride_lb, stride_lx, stride_ly, stride_lz, stride_lh,  #
    stride_dkb, stride_dkx, stride_dky, stride_dkz, stride_dkh, stride_dkd,  #
    stride_dvb, stride_dvx, stride_dvy, stride_dvz, stride_dvh, stride_dvd,  #
    HEADS, SIZE_X, SIZE_Y, SIZE_Z,  #
    KER_X, KER_Y, KER_Z, DIL_X, DIL_Y, DIL_Z, STR_X, STR_Y, STR_Z,  #
    qk_scale, scale, n_tiles_x, n_tiles_y, n_tiles_z,  #
    stride_tab_h, tab_class_stride, NCLS_Y, NCLS_Z,  #
    CAUSAL_X: tl.constexpr, CAUSAL_Y: tl.constexpr, CAUSAL_Z: tl.constexpr,  #
    NDIM: tl.constexpr, HAS_RPB: tl.constexpr, USE_TABLE: tl.constexpr,  #
    TX: tl.constexpr, TY: tl.constexpr, TZ: tl.constexpr, BLOCK_N: tl.constexpr, WZ: tl.constexpr,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,  #
    DOT_PREC: tl.constexpr,
):
    # key tile major: T* is the key tile, BLOCK_N the query block
    BLOCK_M: tl.constexpr = TX * TY * TZ
    b, h, gx, gy, gz, tx, ty, tz = _decompose_pid(tl.program_id(0), HEADS, n_tiles_x, n_tiles_y, n_tiles_z,
                                                  DIL_X, DIL_Y, DIL_Z)
    lgx = (SIZE_X - gx + DIL_X - 1) // DIL_X
    lgy = (SIZE_Y - gy + DIL_Y - 1) // DIL_Y
    lgz = (SIZE_Z - gz + DIL_Z - 1) // DIL_Z

    m = tl.arange(0, BLOCK_M)
    jx = tx * TX + m // (TY * TZ)
    jy = ty * TY + (m // TZ) % TY
    jz = tz * TZ + m % TZ
    k_ok = (jx < lgx) & (jy < lgy) & (jz < lgz)
    jz_m = tl.where(k_ok, jz, -(1 << 24))  # tail keys match no query

    qbx0, qbx1 = _query_range(tl.minimum(tx * TX, lgx - 1), tl.minimum(tx * TX + TX - 1, lgx - 1), lgx, KER_X, STR_X, CAUSAL_X)
    qby0, qby1 = _query_range(tl.minimum(ty * TY, lgy - 1), tl.minimum(ty * TY + TY - 1, lgy - 1), lgy, KER_Y, STR_Y, CAUSAL_Y)
    qbz0, qbz1 = _query_range(tl.minimum(tz * TZ, lgz - 1), tl.minimum(tz * TZ + TZ - 1, lgz - 1), lgz, KER_Z, STR_Z, CAUSAL_Z)
    n_it, n_zseg = _box_iters(qbx1 - qbx0 + 1, qby1 - qby0 + 1, qbz1 - qbz0 + 1, BLOCK_N, WZ)

    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    ix = (jx * DIL_X + gx).to(tl.int64)
    iy = jy * DIL_Y + gy
    iz = jz * DIL_Z + gz
    k = tl.load(K + b64 * stride_kb + h64 * stride_kh + (ix * stride_kx + iy * stride_ky + iz * stride_kz)[:, None]
                + offs_d[None, :] * stride_kd, mask=_row_mask(k_ok, offs_d, HEAD_DIM, BLOCK_D), other=0.0)
    v = tl.load(V + b64 * stride_vb + h64 * stride_vh + (ix * stride_vx + iy * stride_vy + iz * stride_vz)[:, None]
                + offs_dv[None, :] * stride_vd, mask=_row_mask(k_ok, offs_dv, HEAD_DIM_V, BLOCK_DV), other=0.0)
    q_base = Q + b64 * stride_qb + h64 * stride_qh
    do_base = DO + b64 * stride_dob + h64 * stride_doh
    lse_base = LSE + b64 * stride_lb + h64 * stride_lh
    delta_base = DELTA + (b64 * HEADS + h64) * (SIZE_X * SIZE_Y * SIZE_Z)
    if HAS_RPB:
        rpb_base = RPB + h64 * ((2 * KER_X - 1) * (2 * KER_Y - 1) * (2 * KER_Z - 1))
        k_rel = _rel_index(jx + KER_X - 1, jy + KER_Y - 1, jz + KER_Z - 1, KER_X, KER_Y, KER_Z)

    if USE_TABLE:
        tab = _table_rows(TAB, CLS, h64, stride_tab_h, tab_class_stride, NCLS_Y, NCLS_Z, gx, gy, gz, tx, ty, tz,
                          n_tiles_x, n_tiles_y, n_tiles_z, DIL_X, DIL_Y, BLOCK_M, BLOCK_N)
    dk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for it in range(0, n_it):
        qx, qy, qz, q_ok = _box_block(it, qbx0, qby0, qbz0, qbx1 - qbx0 + 1, qby1 - qby0 + 1, qbz1 - qbz0 + 1,
                                      n_zseg, BLOCK_N, WZ, NDIM)
        qx = tl.minimum(qx, lgx - 1)
        qy = tl.minimum(qy, lgy - 1)
        qz = tl.minimum(qz, lgz - 1)
        rx = (qx * DIL_X + gx).to(tl.int64)
        ry = qy * DIL_Y + gy
        rz = qz * DIL_Z + gz
        qt = tl.load(q_base + (rx * stride_qx + ry * stride_qy + rz * stride_qz)[:, None] + offs_d[None, :] * stride_qd,
                     mask=_row_mask(q_ok, offs_d, HEAD_DIM, BLOCK_D), other=0.0)
        dot_ = tl.load(do_base + (rx * stride_dox + ry * stride_doy + rz * stride_doz)[:, None] + offs_dv[None, :] * stride_dod,
                       mask=_row_mask(q_ok, offs_dv, HEAD_DIM_V, BLOCK_DV), other=0.0)
        lse2 = tl.load(lse_base + rx * stride_lx + ry * stride_ly + rz * stride_lz, mask=q_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_base + (rx * SIZE_Y + ry) * SIZE_Z + rz, mask=q_ok, other=0.0)
        st = tl.dot(k, tl.trans(qt), input_precision=DOT_PREC)  # [keys, queries]
        if USE_TABLE:
            st = st * qk_scale + tl.load(tab + it * (BLOCK_M * BLOCK_N)).to(tl.float32)
        else:
            if HAS_RPB:
                rel = k_rel[:, None] - _rel_index(qx, qy, qz, KER_X, KER_Y, KER_Z)[None, :]
            sx, ex_q = _window(qx, lgx, KER_X, STR_X, CAUSAL_X)
            sy, ey_q = _window(qy, lgy, KER_Y, STR_Y, CAUSAL_Y)
            sz, ez_q = _window(qz, lgz, KER_Z, STR_Z, CAUSAL_Z)
            wz = tl.where(q_ok, ez_q - sz, 0)
            inwin = _pair_mask(jx[:, None], jy[:, None], jz_m[:, None], sx[None, :], sy[None, :], sz[None, :],
                               (ex_q - sx)[None, :], (ey_q - sy)[None, :], wz[None, :], NDIM)
            if HAS_RPB:
                st = st * qk_scale + tl.load(rpb_base + rel, mask=inwin, other=float("-inf"))
            else:
                st = tl.where(inwin, st * qk_scale, float("-inf"))
        pt = tl.math.exp2(st - lse2[None, :])
        dv += tl.dot(pt.to(dot_.dtype), dot_, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(dot_), input_precision=DOT_PREC)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(qt.dtype), qt, input_precision=DOT_PREC)

    tl.store(DK + b64 * stride_dkb + h64 * stride_dkh + (ix * stride_dkx + iy * stride_dky + iz * stride_dkz)[:, None]
             + offs_d[None, :] * stride_dkd, (dk * scale).to(DK.dtype.element_ty), mask=_row_mask(k_ok, offs_d, HEAD_DIM, BLOCK_D))
    tl.store(DV + b64 * stride_dvb + h64 * stride_dvh + (ix * stride_dvx + iy * stride_dvy + iz * stride_dvz)[:, None]
             + offs_dv[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=_row_mask(k_ok, offs_dv, HEAD_DIM_V, BLOCK_DV))


# -- logit tables ---------------------------------------------------------------------------------

@triton.jit
def _na_logit_table(RPB, IDX, TAB, ZERO, n_idx, n_rel, n_zero, BLOCK: tl.constexpr):
    # TAB[h, i] = log2(e) * rpb[h, IDX[i]], or -inf where IDX[i] is the masked sentinel n_rel: one
    # launch per call builds the table the attention kernels load (neighborhood_tables.py). The
    # backward's launch also zeroes the dRPB accumulator ZERO [heads, n_zero] (no memset launch).
    h = tl.program_id(1).to(tl.int64)
    if n_zero > 0:
        if tl.program_id(0) == 0:
            for start in range(0, n_zero, BLOCK):
                zo = start + tl.arange(0, BLOCK)
                tl.store(ZERO + h * n_zero + zo, tl.zeros([BLOCK], tl.float32), mask=zo < n_zero)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_idx
    idx = tl.load(IDX + offs, mask=ok, other=0)
    hit = ok & (idx < n_rel)
    val = tl.load(RPB + h * n_rel + idx, mask=hit, other=0.0).to(tl.float32) * 1.4426950408889634
    tl.store(TAB + h * n_idx + offs, tl.where(hit, val, float("-inf")).to(TAB.dtype.element_ty), mask=ok)


# -- host side ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Geometry:
    """One call mapped to 3-D (missing leading axes have length 1)."""

    ndim: int
    sizes: tuple
    kernel: tuple
    dilation: tuple
    stride: tuple
    causal: tuple

    @property
    def group_sizes(self) -> tuple:  # the largest dilation group per axis
        return tuple(-(-L // d) for L, d in zip(self.sizes, self.dilation))

    @property
    def rel_shape(self) -> tuple:
        return tuple(2 * k - 1 for k in self.kernel)


def _geometry(q, kernel_size, dilation, stride, is_causal) -> _Geometry:
    return _geometry_of(tuple(q.shape[1:-2]), tuple(kernel_size), tuple(dilation), tuple(stride), tuple(is_causal))


@functools.lru_cache(maxsize=1024)
def _geometry_of(spatial, kernel_size, dilation, stride, is_causal) -> _Geometry:
    n = len(spatial)
    pad = 3 - n
    return _Geometry(
        ndim=n,
        sizes=(1,) * pad + spatial,
        kernel=(1,) * pad + tuple(int(k) for k in kernel_size),
        dilation=(1,) * pad + tuple(int(d) for d in dilation),
        stride=(1,) * pad + tuple(int(s) for s in stride),
        causal=(False,) * pad + tuple(bool(c) for c in is_causal),
    )


def _strides(t: torch.Tensor, n: int, with_last: bool = True) -> tuple:
    """Strides of ``[B, *spatial, h(, D)]`` as (b, x, y, z, h(, d)), 0 for the missing axes."""
    s = t.stride()
    spatial = (0,) * (3 - n) + tuple(s[1:1 + n])
    return (s[0],) + spatial + tuple(s[1 + n:]) if with_last else (s[0],) + spatial + (s[1 + n],)


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@functools.lru_cache(maxsize=1024)
def _rpb_pads(geo: _Geometry) -> tuple:
    rx, ry, rz = geo.rel_shape
    rxyp = 1 if geo.ndim == 1 else max(16, _next_pow2(rx * ry))
    return rxyp, max(16, _next_pow2(rz))


@dataclass(frozen=True)
class _Config:
    tile: tuple  # (TX, TY, TZ)
    block_n: int
    wz: int  # 0: key box flattened; > 0: lines of wz keys along z
    num_warps: int
    num_stages: int

    def n_tiles(self, geo: _Geometry) -> tuple:
        return tuple(-(-g // t) for g, t in zip(geo.group_sizes, self.tile))


# Query (or key) tile shapes per rank, best first: boxes keep the key box of a tile small; small
# tiles waste fewer masked slots, larger ones re-read fewer keys.
_TILES = {
    1: ((1, 1, 64), (1, 1, 128)),
    2: ((1, 8, 8), (1, 4, 8), (1, 8, 16), (1, 16, 16)),
    3: ((2, 4, 8), (1, 8, 8), (2, 8, 8)),
}


def _fit_tile(tile, geo: _Geometry) -> tuple:
    # no axis of the tile longer than the (largest) group needs, and at least 16 rows for tl.dot
    tile = [min(t, _next_pow2(g)) for t, g in zip(tile, geo.group_sizes)]
    while math.prod(tile) < 16:
        a = max(range(3), key=lambda i: (geo.group_sizes[i] > tile[i], i))
        tile[a] *= 2
    return tuple(tile)


def _box_extent(tile, geo: _Geometry) -> tuple:
    """Extent of a tile's key box (or of a key tile's query box) away from the borders."""
    return tuple(min(t + k - 1, g) for t, k, g in zip(tile, geo.kernel, geo.group_sizes))


def _layouts(tile, geo: _Geometry, big_d: bool) -> list:
    """(block_n, wz, padded slots) of a tile's box: per block size the line layout with the fewest
    padded slots, kept within 15% of the best, and the flattened layout when it pads 15% less
    (lines need no integer division, so they win ties)."""
    ex, ey, ez = _box_extent(tile, geo)
    lines = ex * ey
    block_ns = (64,) if big_d or geo.ndim == 1 else (32, 64)
    per_bn, flat = [], None
    for bn in block_ns:
        best = None
        for wz in (8, 16, 32, 64, 128):
            if wz > bn or (wz > 8 and wz // 2 >= ez):
                continue
            nl = bn // wz
            slots = -(-lines // nl) * nl * -(-ez // wz) * wz
            if best is None or slots < best[2]:
                best = (bn, wz, slots)
        per_bn.append(best)
        slots = -(-(lines * ez) // bn) * bn
        if flat is None or slots < flat[2]:
            flat = (bn, 0, slots)
    fewest = min(x[2] for x in per_bn)
    out = [x for x in per_bn if x[2] <= 1.15 * fewest]
    if flat[2] < 0.85 * fewest:
        out.append(flat)
    return out


def _candidates(kind: str, geo: _Geometry, head_dim: int, has_rpb: bool) -> list:
    """The autotuning space of one kernel for one problem (first = the untuned default)."""
    out = []
    big_d = head_dim > 64
    for tile in _TILES[geo.ndim]:
        if big_d and math.prod(tile) < 64:
            continue
        tile = _fit_tile(tile, geo)
        bm = math.prod(tile)
        warps = 8 if bm * max(head_dim, 64) >= 128 * 128 else 4
        if kind == "dq" and has_rpb:
            # lines along z for the fused dRPB: at least 16 (query line, key line) pairs a block
            wz = min(_next_pow2(_box_extent(tile, geo)[2]), 128)
            nl = 1 if geo.ndim == 1 else max(1, 16 // (tile[0] * tile[1]))
            out.append(_Config(tile, max(16, wz * nl), wz, warps, 2))
            continue
        for bn, wz, slots in _layouts(tile, geo, big_d):
            stages = 1 if slots <= bn else (2 if big_d or slots <= 2 * bn else 3)  # short loops: less smem
            out.append(_Config(tile, bn, wz, warps, stages))
    return list(dict.fromkeys(out))


# Per problem (shapes, dtypes, options): the tuned config; per call signature (the problem plus
# strides, alignment and scale): a ready launch plan. One dict, so resetting it resets both.
_TUNED: dict = {}
_MAX_PLANS = 4096


def _autotune_enabled() -> bool:
    return os.environ.get("FOVEAL_NA_AUTOTUNE", "1") != "0"


def _tuned(key, candidates, launch) -> _Config:
    """Best config for ``key``: ``candidates()`` timed once with do_bench, then cached."""
    best = _TUNED.get(key)
    if best is not None:
        return best
    configs = candidates()
    if _interpreting() or len(configs) == 1 or not _autotune_enabled():
        best = configs[0]
    else:
        times = []
        for cfg in configs:
            try:
                times.append(triton.testing.do_bench(lambda: launch(cfg), warmup=5, rep=20, return_mode="median"))
            except triton.runtime.errors.OutOfResources:
                times.append(float("inf"))
        best = configs[min(range(len(configs)), key=times.__getitem__)]
        logger.debug("neighborhood triton autotune %s: %s", key,
                     ", ".join(f"{c.tile}/{c.block_n}/{c.wz}/w{c.num_warps}s{c.num_stages}={t:.4f}ms"
                               for c, t in zip(configs, times)))
    _TUNED[key] = best
    return best


def _rpb_log2(rpb: torch.Tensor) -> torch.Tensor:
    # the in-kernel path works in base 2: the bias enters pre-multiplied by log2(e), in float32
    return (rpb.to(torch.float32) * _LOG2E).contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _problem_key(kind, q, v, geo, has_rpb, prec, tables_on, extra=()):
    return (kind, geo, q.shape, v.shape[-1], q.dtype, has_rpb, prec, tables_on) + tuple(extra)


def _common_args(geo: _Geometry, heads: int):
    return (heads, *geo.sizes, *geo.kernel, *geo.dilation, *geo.stride)


def _grid(cfg: _Config, geo: _Geometry, batch: int, heads: int) -> tuple:
    return (batch * heads * math.prod(geo.dilation) * math.prod(cfg.n_tiles(geo)),)


def _block_d(d: int) -> int:
    return max(16, _next_pow2(d))


def _tables_enabled() -> bool:
    return env("FOVEAL_NA_TABLES", "1") != "0"


@dataclass(frozen=True)
class _Setup:
    """The tensor-independent part of one launch: grid, tile counts and the table plan."""

    grid: tuple
    n_tiles: tuple
    plan: Optional[tables.TablePlan]  # None: masks (and the bias) computed in the kernel


@functools.lru_cache(maxsize=256)  # the bound of the table-plan cache, whose plans it holds
def _setup(geo: _Geometry, cfg: _Config, batch: int, heads: int, keys_major: bool, table_heads: int,
           table_dtype: torch.dtype, device: torch.device, tables_on: bool) -> _Setup:
    # the table plan's device tensors are kept between calls: built outside any CUDA-graph pool
    plan = (persistent(device, lambda: tables.plan(geo, cfg, keys_major, table_heads, table_dtype, device))
            if tables_on else None)
    return _Setup(_grid(cfg, geo, batch, heads), cfg.n_tiles(geo), plan)


_TABLE_BLOCK = 1024


def _logit_table(setup: _Setup, rpb: Optional[torch.Tensor], dtype: torch.dtype):
    """``(table, head stride)`` of one launch: the base-2 bias of every (row, slot) pair of the plan
    built by one kernel from ``rpb``, or (no bias) a cached 0 / ``-inf`` table shared by the heads."""
    p = setup.plan
    if rpb is None:
        table = p.masks.get(dtype)
        if table is None:
            table = p.masks[dtype] = persistent(p.index.device, lambda: tables.bias_table(p, None, dtype)[0])
        return table, 0
    return _bias_table(p.flat_index, p.n_rel, rpb, dtype), p.flat_index.numel()


def _bias_table(index: torch.Tensor, n_rel: int, rpb: torch.Tensor, dtype: torch.dtype,
                zero: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[heads, len(index)]``: the base-2 bias at every flat ``index`` entry (-inf at the masked
    sentinel ``n_rel``), built by one launch that also zeroes ``zero`` ``[heads, n_rel]`` if given."""
    n_idx = index.numel()
    heads = rpb.shape[0]
    r = rpb if rpb.is_contiguous() else rpb.contiguous()
    table = torch.empty(heads, n_idx, dtype=dtype, device=r.device)
    n_zero = 0 if zero is None else n_rel
    _TABLE((-(-n_idx // _TABLE_BLOCK), heads),
           (r, index, table, _empty(r, torch.float32) if zero is None else zero, n_idx, n_rel, n_zero, _TABLE_BLOCK),
           (n_idx, n_rel, n_zero, r.dtype, dtype, r.data_ptr() & 15 == 0), num_warps=4)
    return table


_EMPTY: dict = {}


def _empty(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # a 0-element placeholder for an unused pointer argument (no memory: safe to keep)
    key = (like.device, dtype)
    t = _EMPTY.get(key)
    if t is None:
        t = _EMPTY[key] = torch.empty(0, dtype=dtype, device=like.device)
    return t


class _Plan:
    """One kernel launch, ready but for its tensors: ``args`` follow the tensor arguments."""

    __slots__ = ("setup", "cfg", "args", "key")
    _ids = itertools.count()

    def __init__(self, setup: _Setup, cfg: _Config, args: tuple):
        self.setup, self.cfg, self.args = setup, cfg, args
        self.key = next(self._ids)  # the launcher's specialization key: a plan fixes every argument's

    def launch(self, launcher: Launcher, tensors: tuple) -> None:
        launcher(self.setup.grid, tensors + self.args, self.key, num_warps=self.cfg.num_warps,
                 num_stages=self.cfg.num_stages)


def _remember(key, plan):
    if len(_TUNED) > _MAX_PLANS:
        _TUNED.clear()
    _TUNED[key] = plan
    return plan


def _call_key(kind, q, k, v, rpb, kernel_size, dilation, stride, is_causal, scale, extra):
    # everything a launch plan depends on; tensors enter through shape, strides, dtype, alignment
    return (kind, q.shape, q.stride(), k.stride(), v.shape, v.stride(), q.dtype, q.device,
            None if rpb is None else rpb.dtype, tuple(kernel_size), tuple(dilation), tuple(stride),
            tuple(is_causal), scale, _tables_enabled(),
            q.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32,
            (q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15 == 0, extra)


def na_triton_probe(q, k, v, rpb, *, kernel_size, dilation, stride, is_causal) -> Optional[str]:
    """None when the Triton backend can run the call, otherwise the reason it cannot."""
    if not q.is_cuda:
        if not q.is_cpu:
            return f"needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got device={q.device}"
        if not _interpreting():
            if os.environ.get("TRITON_INTERPRET", "0") == "1":
                return ("CPU tensors need Triton's interpreter, but TRITON_INTERPRET=1 was set after triton was "
                        "imported; set it before the first import")
            return "CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1 before importing triton)"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"supports float16, bfloat16 and float32, got dtype={q.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim must be <= {MAX_HEAD_DIM}, got q.shape[-1]={q.shape[-1]}, v.shape[-1]={v.shape[-1]}"
    if rpb is not None:
        geo = _geometry(q, kernel_size, dilation, stride, is_causal)
        rxyp, rzp = _rpb_pads(geo)
        if rzp > MAX_RPB_ROW or rxyp * rzp > MAX_RPB_SPAN:
            return (f"the fused dRPB holds at most {MAX_RPB_SPAN} padded relative offsets, at most {MAX_RPB_ROW} "
                    f"along the last axis, got rpb.shape={list(rpb.shape)} ({rxyp} x {rzp} padded)")
    return None


@dataclass(frozen=True)
class _Problem:
    """What the forward and backward plans of one call share: sizes, precision and table set-up."""

    geo: _Geometry
    batch: int
    heads: int
    D: int
    Dv: int
    has_rpb: bool
    prec: str
    tables_on: bool
    tdtype: torch.dtype
    device: torch.device

    def setup(self, cfg: _Config, keys_major: bool) -> _Setup:
        table_heads = self.heads if self.has_rpb and self.tables_on else 1
        return _setup(self.geo, cfg, self.batch, self.heads, keys_major, table_heads, self.tdtype, self.device,
                      self.tables_on)

    def table_args(self, setup: _Setup, head_stride: Optional[int] = None) -> tuple:
        # (head stride of the logit table, class-combination stride, classes along y and z)
        p = setup.plan
        if p is None:
            return 0, 0, 1, 1
        if head_stride is None:
            head_stride = p.flat_index.numel()
        return (head_stride if self.has_rpb else 0), p.combo_stride, p.n_classes[1], p.n_classes[2]

    def block_args(self, cfg: _Config) -> tuple:
        return (*cfg.tile, cfg.block_n, cfg.wz, self.D, self.Dv, _block_d(self.D), _block_d(self.Dv), self.prec)

    def key(self, kind: str, q, v, extra=()) -> tuple:
        return _problem_key(kind, q, v, self.geo, self.has_rpb, self.prec, self.tables_on, extra)

    def candidates(self, kind: str) -> list:
        return _candidates(kind, self.geo, max(self.D, self.Dv), self.has_rpb)


def _problem(q, v, rpb, geo: _Geometry) -> _Problem:
    return _Problem(geo, q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1], rpb is not None,
                    _dot_precision(q.dtype), _tables_enabled(), tables.table_dtype(q.dtype), q.device)


def _fwd_plan(q, k, v, rpb, out, lse, geo, scale) -> tuple:
    """(plan, table dtype) of a forward call; tunes the config on first sight of the problem."""
    pr = _problem(q, v, rpb, geo)
    n = geo.ndim
    strides = (*_strides(q, n), *_strides(k, n), *_strides(v, n), *_strides(out, n), *_strides(lse, n, False))

    def tail(cfg):
        setup = pr.setup(cfg, False)
        return setup, (*strides, *_common_args(geo, pr.heads), scale * _LOG2E, *setup.n_tiles,
                       *pr.table_args(setup), *geo.causal, n, pr.has_rpb, scale > 0, setup.plan is not None,
                       *pr.block_args(cfg))

    def trial(cfg):  # one launch through the JIT, for the autotuner
        setup, args = tail(cfg)
        _FWD.fn[setup.grid](*_fwd_tensors(setup, q, k, v, rpb, out, lse, pr.tdtype), *args,
                            num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    cfg = _tuned(pr.key("fwd", q, v), lambda: pr.candidates("fwd"), trial)
    setup, args = tail(cfg)
    return _Plan(setup, cfg, args), pr.tdtype


def _fwd_tensors(setup, q, k, v, rpb, out, lse, tdtype) -> tuple:
    if setup.plan is None:
        empty = _empty(q, torch.int32)
        return q, k, v, (_rpb_log2(rpb) if rpb is not None else _empty(q, q.dtype)), out, lse, empty, empty
    tab, _ = _logit_table(setup, rpb, tdtype)
    return q, k, v, _empty(q, q.dtype), out, lse, tab, setup.plan.cls


def na_triton_fwd(q, k, v, rpb, kernel_size: Sequence[int], dilation: Sequence[int], stride: Sequence[int],
                  is_causal: Sequence[bool], scale: float, *, out=None, lse=None):
    """Returns ``(out [B, *spatial, h, Dv] in q.dtype, lse [B, *spatial, h])``.

    ``out`` and ``lse`` may be given (any strides); every element is written.
    """
    given = None if out is None and lse is None else (
        None if out is None else (out.stride(), aligned(out)), None if lse is None else (lse.stride(), aligned(lse)))
    key = _call_key("fwd", q, k, v, rpb, kernel_size, dilation, stride, is_causal, scale, given)
    if out is None:
        out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty(q.shape[:-1], dtype=lse_dtype(q.dtype), device=q.device)
    if q.numel() == 0 or v.numel() == 0:
        return out, lse
    with on_device(q.device):
        entry = _TUNED.get(key)
        if entry is None:
            geo = _geometry(q, kernel_size, dilation, stride, is_causal)
            entry = _remember(key, _fwd_plan(q, k, v, rpb, out, lse, geo, scale))
        plan, tdtype = entry
        plan.launch(_FWD, _fwd_tensors(plan.setup, q, k, v, rpb, out, lse, tdtype))
    return out, lse


class _BwdPlan:
    """Both backward launches of one call signature. With a bias, one table launch per call builds
    the logit tables of both kernels (``index``: their flat indexes, dQ's first, ``kv_offset``:
    where dK/dV's start) and zeroes the atomic dRPB accumulator, which shares one float32
    allocation with ``delta`` (``delta_numel`` elements, 16-byte aligned after them)."""

    __slots__ = ("dq", "dkdv", "tdtype", "delta_shape", "delta_numel", "n_rel", "deterministic", "index",
                 "kv_offset")

    def __init__(self, dq, dkdv, tdtype, delta_shape, n_rel, deterministic, index, kv_offset):
        self.dq, self.dkdv, self.tdtype = dq, dkdv, tdtype
        self.delta_shape, self.n_rel, self.deterministic = delta_shape, n_rel, deterministic
        self.delta_numel = -(-math.prod(delta_shape) // 4) * 4
        self.index, self.kv_offset = index, kv_offset


def _bwd_plan(grad_out, q, k, v, rpb, out, lse, glse, has_dlse, dq, dk, dv, geo, scale, deterministic) -> _BwdPlan:
    pr = _problem(q, v, rpb, geo)
    n = geo.ndim
    rxyp, rzp = _rpb_pads(geo) if pr.has_rpb else (1, 1)
    n_rel = math.prod(geo.rel_shape)
    common = (*_common_args(geo, pr.heads), scale * _LOG2E, scale)
    dq_strides = (*_strides(q, n), *_strides(k, n), *_strides(v, n), *_strides(out, n), *_strides(grad_out, n),
                  *_strides(lse, n, False), *_strides(glse, n, False), *_strides(dq, n))
    dkdv_strides = (*_strides(q, n), *_strides(k, n), *_strides(v, n), *_strides(grad_out, n),
                    *_strides(lse, n, False), *_strides(dk, n), *_strides(dv, n))
    delta = torch.empty(pr.batch, pr.heads, *geo.sizes, dtype=torch.float32, device=q.device)

    def tail(cfg, keys_major, head_stride=None):
        setup = pr.setup(cfg, keys_major)
        head = (*(dkdv_strides if keys_major else dq_strides), *common, *setup.n_tiles,
                *pr.table_args(setup, head_stride), *geo.causal, n, pr.has_rpb)
        tabled = setup.plan is not None
        if keys_major:
            return setup, head + (tabled,) + pr.block_args(cfg)
        return setup, head + (has_dlse, deterministic, tabled) + pr.block_args(cfg) + (
            rxyp, rzp, "tf32x3" if q.dtype == torch.float32 else "half")

    def trial_dq(cfg):
        setup, args = tail(cfg, False)
        buf = _drpb_target(setup, q, pr.heads, n_rel, pr.has_rpb, deterministic)
        _DQ.fn[setup.grid](*_dq_tensors(setup, q, k, v, rpb, out, grad_out, lse, glse, delta, dq, buf, pr.tdtype),
                           *args, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    def trial_dkdv(cfg):
        setup, args = tail(cfg, True)
        _DKDV.fn[setup.grid](*_dkdv_tensors(setup, q, k, v, rpb, grad_out, lse, delta, dk, dv, pr.tdtype), *args,
                             num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    extra = (has_dlse, deterministic)
    cfg_dq = _tuned(pr.key("dq", q, v, extra), lambda: pr.candidates("dq"), trial_dq)
    trial_dq(cfg_dq)  # delta for the dK/dV autotuner
    cfg_kv = _tuned(pr.key("dkdv", q, v, extra), lambda: pr.candidates("dkdv"), trial_dkdv)
    index = None
    kv_offset = 0
    if pr.has_rpb:  # one table for both kernels
        plans = [pr.setup(cfg, km).plan for cfg, km in ((cfg_dq, False), (cfg_kv, True))]
        parts = [p.flat_index for p in plans if p is not None]
        if parts:
            index = persistent(q.device, lambda: torch.cat(parts))
            kv_offset = parts[0].numel() if plans[0] is not None else 0
    head_stride = None if index is None else index.numel()
    setup_dq, args_dq = tail(cfg_dq, False, head_stride)
    setup_kv, args_kv = tail(cfg_kv, True, head_stride)
    return _BwdPlan(_Plan(setup_dq, cfg_dq, args_dq), _Plan(setup_kv, cfg_kv, args_kv), pr.tdtype,
                    tuple(delta.shape), n_rel, deterministic, index, kv_offset)


def _drpb_target(setup: _Setup, q, heads: int, n_rel: int, has_rpb: bool, deterministic: bool):
    # deterministic: one row per program, summed in a fixed order; else atomics into [h, n_rel]
    if not has_rpb:
        return _empty(q, torch.float32)
    if deterministic:
        return torch.empty(setup.grid[0], n_rel, dtype=torch.float32, device=q.device)
    return torch.zeros(heads, n_rel, dtype=torch.float32, device=q.device)


def _dq_tensors(setup, q, k, v, rpb, out, grad_out, lse, glse, delta, dq, buf, tdtype, tab=None) -> tuple:
    if setup.plan is None:
        empty = _empty(q, torch.int32)
        r = _rpb_log2(rpb) if rpb is not None else _empty(q, q.dtype)
        return q, k, v, r, out, grad_out, lse, glse, delta, dq, buf, empty, empty
    if tab is None:
        tab, _ = _logit_table(setup, rpb, tdtype)
    return q, k, v, _empty(q, q.dtype), out, grad_out, lse, glse, delta, dq, buf, tab, setup.plan.cls


def _dkdv_tensors(setup, q, k, v, rpb, grad_out, lse, delta, dk, dv, tdtype, tab=None) -> tuple:
    if setup.plan is None:
        empty = _empty(q, torch.int32)
        r = _rpb_log2(rpb) if rpb is not None else _empty(q, q.dtype)
        return q, k, v, r, grad_out, lse, delta, dk, dv, empty, empty
    if tab is None:
        tab, _ = _logit_table(setup, rpb, tdtype)
    return q, k, v, _empty(q, q.dtype), grad_out, lse, delta, dk, dv, tab, setup.plan.cls


def na_triton_bwd(grad_out, q, k, v, rpb, out, lse, grad_lse, kernel_size: Sequence[int], dilation: Sequence[int],
                  stride: Sequence[int], is_causal: Sequence[bool], scale: float, *, dq=None, dk=None, dv=None):
    """Returns ``(dq, dk, dv, drpb)``; ``drpb`` (dtype of ``rpb``) is None when ``rpb`` is None.

    ``dq``, ``dk`` and ``dv`` may be given (any strides); every element is written.
    """
    dq = torch.empty_like(q, memory_format=torch.contiguous_format) if dq is None else dq
    dk = torch.empty_like(k, memory_format=torch.contiguous_format) if dk is None else dk
    dv = torch.empty_like(v, memory_format=torch.contiguous_format) if dv is None else dv
    has_rpb = rpb is not None
    if q.numel() == 0 or v.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), (torch.zeros_like(rpb) if has_rpb else None)
    glse = grad_lse if grad_lse is not None else lse
    deterministic = torch.are_deterministic_algorithms_enabled()
    key = _call_key("bwd", q, k, v, rpb, kernel_size, dilation, stride, is_causal, scale,
                    (grad_out.stride(), out.stride(), lse.stride(), glse.stride(), grad_lse is not None,
                     dq.stride(), dk.stride(), dv.stride(), aligned(grad_out, out, lse, glse, dq, dk, dv),
                     deterministic))
    with on_device(q.device):
        plan = _TUNED.get(key)
        if plan is None:
            geo = _geometry(q, kernel_size, dilation, stride, is_causal)
            plan = _remember(key, _bwd_plan(grad_out, q, k, v, rpb, out, lse, glse, grad_lse is not None,
                                            dq, dk, dv, geo, scale, deterministic))
        heads = q.shape[-2]
        atomic = has_rpb and not deterministic
        dn = plan.delta_numel
        scratch = torch.empty(dn + (heads * plan.n_rel if atomic else 0), dtype=torch.float32, device=q.device)
        delta = scratch[:math.prod(plan.delta_shape)].view(plan.delta_shape)
        buf = scratch[dn:].view(heads, plan.n_rel) if atomic else _drpb_target(
            plan.dq.setup, q, heads, plan.n_rel, has_rpb, deterministic)
        tab_dq = tab_kv = None
        if plan.index is not None:
            tab = _bias_table(plan.index, plan.n_rel, rpb, plan.tdtype, buf if atomic else None)
            tab_dq = tab if plan.dq.setup.plan is not None else None
            tab_kv = tab[:, plan.kv_offset:] if plan.dkdv.setup.plan is not None else None
        elif atomic:
            buf.zero_()
        plan.dq.launch(_DQ, _dq_tensors(plan.dq.setup, q, k, v, rpb, out, grad_out, lse, glse, delta, dq, buf,
                                        plan.tdtype, tab_dq))
        plan.dkdv.launch(_DKDV, _dkdv_tensors(plan.dkdv.setup, q, k, v, rpb, grad_out, lse, delta, dk, dv,
                                              plan.tdtype, tab_kv))
    drpb = None
    if has_rpb:
        total = buf.view(q.shape[0], heads, -1, plan.n_rel).sum((0, 2)) if deterministic else buf
        drpb = total.view(rpb.shape)
        if drpb.dtype != rpb.dtype:
            drpb = drpb.to(rpb.dtype)
    return dq, dk, dv, drpb


_FWD = Launcher(_na_fwd)
_DQ = Launcher(_na_bwd_dq)
_DKDV = Launcher(_na_bwd_dkdv)
_TABLE = Launcher(_na_logit_table)
