"""Fused Triton routed block-sparse attention (BiFormer's BRA core, SPEC section 3): forward and backward.

Algorithm. The key sequence of query region ``r`` is the ``L = topk * T_k`` tokens of its routed
regions, position ``n`` being token ``n % T_k`` of region ``indices[b, r, n // T_k]`` (region
``n // T_k`` itself on the dense path, ``L = R * T_k``). Programs read those tokens straight from
the region-major key / value tensors through the index: no gathered copy of the routed regions
exists anywhere (the gather is the memory and backward bottleneck of the official code).

One program owns one (batch, head) and either ``BLOCK_M`` queries of one region (large regions,
several programs per region) or ``GROUP`` whole regions packed into one tile (small regions: 4 or
16 tokens would leave most of a tensor-core tile idle). A packed tile walks the ``GROUP`` key
sequences side by side: each step loads ``BLOCK_N / GROUP`` positions of every region's sequence,
and the logits between a query and the keys of another region of the tile are masked
(block-diagonal). Online softmax in base 2; the log-sum-exp is saved.

Backward, flash-attention style, ``delta = rowsum(dO * O) - dLSE``. Key regions of more than 8
tokens: one kernel on the forward's programs recomputes ``P`` from the log-sum-exp, accumulates
``dQ`` in registers and adds each step's ``dK`` / ``dV`` onto float32 buffers with atomics (a key
region is routed to by a data-dependent set of query regions; at these sizes only a few, so the
atomics rarely collide). Small key regions (BiFormer's stage 3: 4 tokens, routed to by a third of
the map) take two kernels instead, as the atomics there collide: dQ (the forward's programs, also
writing ``delta``), and dK/dV with one program per packed key tile that walks the query regions,
skipping those whose routing list names none of its regions; a region named twice in a list
counts twice (the pair's probabilities are weighted by the multiplicity). dK and dV are then
written once in their dtype. A third form, dQ then a dK/dV kernel that visits only the query
regions listed for its key region in a reverse routing map (a sort of the routing entries), serves
one-region key tiles under ``torch.use_deterministic_algorithms(True)`` (``_unpacked_bwd``).
(Measured on an H200: the atomic kernel is 3-30x faster than the scan at BiFormer's stage 1-2
and COCO shapes and 1.2-1.5x faster than the reverse map; the scan is 1.6x faster than the atomic
kernel at stage 3 @ 224.)

Precision: fp16/bf16 operands with fp32 accumulation; fp32 inputs use tf32 when
``torch.backends.cuda.matmul.allow_tf32`` is set and exact fp32 products otherwise. Head dims (q/k
and v separately) are padded to a power of two (at least 16) and masked. With ``TRITON_INTERPRET=1``
set before triton is imported, the kernels run in Triton's interpreter on CPU tensors.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .backends import triton_device_reason
from .dispatch import like_fake
from .launch import INTERPRETING, Launcher, aligned, on_device
from .neighborhood_reference import lse_dtype

__all__ = ["routing_triton_probe", "routing_triton_fwd", "routing_triton_bwd", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return INTERPRETING  # a constant (see foveal.kernels.launch)


# -- device helpers -------------------------------------------------------------------------------

@triton.jit
def _query_rows(pid_m, N_MT, R, T, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    # the tile's rows: (group of each row inside the tile, region, token, valid)
    offs_m = tl.arange(0, BLOCK_M)
    if GROUP == 1:
        region = pid_m // N_MT + offs_m * 0
        token = (pid_m % N_MT) * BLOCK_M + offs_m
        grp = offs_m * 0
        ok = token < T
    else:
        grp = offs_m // T
        region = pid_m * GROUP + grp
        token = offs_m % T
        ok = (grp < GROUP) & (region < R)
    return grp, region, token, ok


@triton.jit
def _first_region(pid_m, N_MT, GROUP: tl.constexpr):
    # the tile's first query region (the one region of an unpacked tile)
    if GROUP == 1:
        first = pid_m // N_MT
    else:
        first = pid_m * GROUP
    return first


@triton.jit
def _key_cols(n0, r_first, b, IDX, stride_ib, stride_ir, stride_ik, R, TK, L,
              DENSE: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    # the step's key columns: (group inside the tile, key region, key token, valid)
    offs_n = tl.arange(0, BLOCK_N)
    if GROUP == 1:
        grp = offs_n * 0
        pos = n0 + offs_n
    else:
        grp = offs_n // (BLOCK_N // GROUP)
        pos = n0 + offs_n % (BLOCK_N // GROUP)
    q_region = r_first + grp
    ok = (pos < L) & (q_region < R)
    if DENSE:
        region = pos // TK
    else:
        region = tl.load(IDX + b * stride_ib + q_region * stride_ir + (pos // TK) * stride_ik, mask=ok, other=0)
    return grp, region, pos % TK, ok


@triton.jit
def _load_rows(ptr, b, region, token, h, ok, stride_b, stride_r, stride_t, stride_h, stride_d,
               DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    row = b.to(tl.int64) * stride_b + region.to(tl.int64) * stride_r + token * stride_t + h * stride_h
    mask = ok[:, None] & (offs_d[None, :] < DIM)
    return tl.load(ptr + row[:, None] + offs_d[None, :] * stride_d, mask=mask, other=0.0)


# -- forward --------------------------------------------------------------------------------------

@triton.jit
def _routing_fwd(
    Q, K, V, IDX, O, LSE,  #
    stride_qb, stride_qr, stride_qt, stride_qh, stride_qd,  #
    stride_kb, stride_kr, stride_kt, stride_kh, stride_kd,  #
    stride_vb, stride_vr, stride_vt, stride_vh, stride_vd,  #
    stride_ob, stride_or, stride_ot, stride_oh, stride_od,  #
    stride_ib, stride_ir, stride_ik,  #
    HEADS, R, T, TK, L, N_MT, qk_scale,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, DENSE: tl.constexpr,  #
    DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // HEADS
    h = tl.program_id(1) % HEADS
    grp_m, region_m, token_m, ok_m = _query_rows(pid_m, N_MT, R, T, GROUP, BLOCK_M)
    r_first = _first_region(pid_m, N_MT, GROUP)
    q = _load_rows(Q, b, region_m, token_m, h, ok_m, stride_qb, stride_qr, stride_qt, stride_qh, stride_qd,
                   HEAD_DIM, BLOCK_D)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: fully masked padding rows stay NaN-free
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    step = BLOCK_N // GROUP
    for n0 in range(0, L, step):
        grp_n, region_n, token_n, ok_n = _key_cols(n0, r_first, b, IDX, stride_ib, stride_ir, stride_ik, R, TK, L,
                                                   DENSE, GROUP, BLOCK_N)
        k = _load_rows(K, b, region_n, token_n, h, ok_n, stride_kb, stride_kr, stride_kt, stride_kh, stride_kd,
                       HEAD_DIM, BLOCK_D)
        v = _load_rows(V, b, region_n, token_n, h, ok_n, stride_vb, stride_vr, stride_vt, stride_vh, stride_vd,
                       HEAD_DIM_V, BLOCK_DV)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        valid = ok_n[None, :] & (grp_m[:, None] == grp_n[None, :])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    offs_dv = tl.arange(0, BLOCK_DV)
    row_o = b.to(tl.int64) * stride_ob + region_m.to(tl.int64) * stride_or + token_m * stride_ot + h * stride_oh
    tl.store(O + row_o[:, None] + offs_dv[None, :] * stride_od, out.to(O.dtype.element_ty),
             mask=ok_m[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    # lse is contiguous [B, R, T, heads]; m_i is in base 2 (qk_scale carries log2 e)
    lse = (m_i + tl.math.log2(l_safe)) / 1.4426950408889634
    tl.store(LSE + ((b.to(tl.int64) * R + region_m) * T + token_m) * HEADS + h, lse, mask=ok_m)


# -- backward -------------------------------------------------------------------------------------

@triton.jit
def _routing_bwd_dq(
    Q, K, V, IDX, O, DO, LSE, GLSE, DELTA, DQ,  #
    stride_qb, stride_qr, stride_qt, stride_qh, stride_qd,  #
    stride_kb, stride_kr, stride_kt, stride_kh, stride_kd,  #
    stride_vb, stride_vr, stride_vt, stride_vh, stride_vd,  #
    stride_ob, stride_or, stride_ot, stride_oh, stride_od,  #
    stride_gb, stride_gr, stride_gt, stride_gh, stride_gd,  #
    stride_dqb, stride_dqr, stride_dqt, stride_dqh, stride_dqd,  #
    stride_ib, stride_ir, stride_ik,  #
    HEADS, R, T, TK, L, N_MT, sm_scale, qk_scale,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, DENSE: tl.constexpr,  #
    HAS_GLSE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # the forward's programs: dQ in registers; writes delta = rowsum(dO * O) - dLSE for the dK/dV kernel
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // HEADS
    h = tl.program_id(1) % HEADS
    grp_m, region_m, token_m, ok_m = _query_rows(pid_m, N_MT, R, T, GROUP, BLOCK_M)
    r_first = _first_region(pid_m, N_MT, GROUP)
    q = _load_rows(Q, b, region_m, token_m, h, ok_m, stride_qb, stride_qr, stride_qt, stride_qh, stride_qd,
                   HEAD_DIM, BLOCK_D)
    do = _load_rows(DO, b, region_m, token_m, h, ok_m, stride_gb, stride_gr, stride_gt, stride_gh, stride_gd,
                    HEAD_DIM_V, BLOCK_DV)
    o = _load_rows(O, b, region_m, token_m, h, ok_m, stride_ob, stride_or, stride_ot, stride_oh, stride_od,
                   HEAD_DIM_V, BLOCK_DV)
    row_l = ((b.to(tl.int64) * R + region_m) * T + token_m) * HEADS + h
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    if HAS_GLSE:
        delta -= tl.load(GLSE + row_l, mask=ok_m, other=0.0)
    tl.store(DELTA + row_l, delta, mask=ok_m)
    lse = tl.load(LSE + row_l, mask=ok_m, other=0.0) * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    step = BLOCK_N // GROUP
    for n0 in range(0, L, step):
        grp_n, region_n, token_n, ok_n = _key_cols(n0, r_first, b, IDX, stride_ib, stride_ir, stride_ik, R, TK, L,
                                                   DENSE, GROUP, BLOCK_N)
        k = _load_rows(K, b, region_n, token_n, h, ok_n, stride_kb, stride_kr, stride_kt, stride_kh, stride_kd,
                       HEAD_DIM, BLOCK_D)
        v = _load_rows(V, b, region_n, token_n, h, ok_n, stride_vb, stride_vr, stride_vt, stride_vh, stride_vd,
                       HEAD_DIM_V, BLOCK_DV)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        valid = ok_m[:, None] & ok_n[None, :] & (grp_m[:, None] == grp_n[None, :])
        p = tl.where(valid, tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    row_q = b.to(tl.int64) * stride_dqb + region_m.to(tl.int64) * stride_dqr + token_m * stride_dqt + h * stride_dqh
    tl.store(DQ + row_q[:, None] + offs_d[None, :] * stride_dqd, (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=ok_m[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, b, region_q, token_q, h, ok_q, weight,
               stride_qb, stride_qr, stride_qt, stride_qh, stride_qd,
               stride_gb, stride_gr, stride_gt, stride_gh, stride_gd, HEADS, R, T, qk_scale,
               HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               DOT_PREC: tl.constexpr):
    # one query chunk's contribution to a key tile's dK (unscaled) and dV; ``weight`` [keys, queries]
    # is each pair's multiplicity (0: not routed)
    q = _load_rows(Q, b, region_q, token_q, h, ok_q, stride_qb, stride_qr, stride_qt, stride_qh, stride_qd,
                   HEAD_DIM, BLOCK_D)
    do = _load_rows(DO, b, region_q, token_q, h, ok_q, stride_gb, stride_gr, stride_gt, stride_gh, stride_gd,
                    HEAD_DIM_V, BLOCK_DV)
    row_l = ((b.to(tl.int64) * R + region_q) * T + token_q) * HEADS + h
    lse = tl.load(LSE + row_l, mask=ok_q, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row_l, mask=ok_q, other=0.0)
    st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
    pt = tl.where(weight > 0, tl.math.exp2(st - lse[None, :]), 0.0) * weight
    dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    dst = pt * (dpt - delta[None, :])
    dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _store_dkdv(DK, DV, dk, dv, b, region_k, token_k, h, ok_k, sm_scale,
                stride_dkb, stride_dkr, stride_dkt, stride_dkh, stride_dkd,
                stride_dvb, stride_dvr, stride_dvt, stride_dvh, stride_dvd,
                HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row = b.to(tl.int64) * stride_dkb + region_k.to(tl.int64) * stride_dkr + token_k * stride_dkt + h * stride_dkh
    tl.store(DK + row[:, None] + offs_d[None, :] * stride_dkd, (dk * sm_scale).to(DK.dtype.element_ty),
             mask=ok_k[:, None] & (offs_d[None, :] < HEAD_DIM))
    row = b.to(tl.int64) * stride_dvb + region_k.to(tl.int64) * stride_dvr + token_k * stride_dvt + h * stride_dvh
    tl.store(DV + row[:, None] + offs_dv[None, :] * stride_dvd, dv.to(DV.dtype.element_ty),
             mask=ok_k[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _routing_bwd_dkdv(
    Q, K, V, IDX, DO, LSE, DELTA, DK, DV,  #
    stride_qb, stride_qr, stride_qt, stride_qh, stride_qd,  #
    stride_kb, stride_kr, stride_kt, stride_kh, stride_kd,  #
    stride_vb, stride_vr, stride_vt, stride_vh, stride_vd,  #
    stride_gb, stride_gr, stride_gt, stride_gh, stride_gd,  #
    stride_dkb, stride_dkr, stride_dkt, stride_dkh, stride_dkd,  #
    stride_dvb, stride_dvr, stride_dvt, stride_dvh, stride_dvd,  #
    stride_ib, stride_ir, stride_ik,  #
    HEADS, R, T, TK, TOPK, N_KT, N_QC, N_QT, sm_scale, qk_scale,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,  #
    BLOCK_M: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_Q: tl.constexpr,  #
    DENSE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # One program owns a tile of keys (BLOCK_M keys of one region, or GROUP_K whole small regions)
    # and walks every query chunk (BLOCK_N queries of one region, or GROUP_Q small regions), skipping
    # chunks that route to none of its regions. The multiplicity of each (key region, query region)
    # pair (how often the region appears in the query region's list: duplicates count) weights the
    # pair's probabilities, so dK and dV are written once, in their dtype, without atomics.
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // HEADS
    h = tl.program_id(1) % HEADS
    grp_k, region_k, token_k, ok_k = _query_rows(pid_m, N_KT, R, TK, GROUP_K, BLOCK_M)
    k = _load_rows(K, b, region_k, token_k, h, ok_k, stride_kb, stride_kr, stride_kt, stride_kh, stride_kd,
                   HEAD_DIM, BLOCK_D)
    v = _load_rows(V, b, region_k, token_k, h, ok_k, stride_vb, stride_vr, stride_vt, stride_vh, stride_vd,
                   HEAD_DIM_V, BLOCK_DV)
    dk = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for c in range(0, N_QC):
        grp_q, region_q, token_q, ok_q = _query_rows(c, N_QT, R, T, GROUP_Q, BLOCK_N)
        if DENSE:
            mult = (ok_k[:, None] & ok_q[None, :]).to(tl.float32)
        else:
            count = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
            for j in range(0, TOPK):
                routed = tl.load(IDX + b * stride_ib + region_q * stride_ir + j * stride_ik, mask=ok_q, other=-1)
                count += (routed[None, :] == region_k[:, None]).to(tl.int32)
            mult = tl.where(ok_k[:, None] & ok_q[None, :], count, 0).to(tl.float32)
        if tl.max(tl.max(mult, 1), 0) > 0:
            dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, b, region_q, token_q, h, ok_q, mult,
                                stride_qb, stride_qr, stride_qt, stride_qh, stride_qd,
                                stride_gb, stride_gr, stride_gt, stride_gh, stride_gd, HEADS, R, T, qk_scale,
                                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, DOT_PREC)
    _store_dkdv(DK, DV, dk, dv, b, region_k, token_k, h, ok_k, sm_scale,
                stride_dkb, stride_dkr, stride_dkt, stride_dkh, stride_dkd,
                stride_dvb, stride_dvr, stride_dvt, stride_dvh, stride_dvd, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)


@triton.jit
def _routing_bwd_dkdv_rev(
    Q, K, V, REV, OFF, DO, LSE, DELTA, DK, DV,  #
    stride_qb, stride_qr, stride_qt, stride_qh, stride_qd,  #
    stride_kb, stride_kr, stride_kt, stride_kh, stride_kd,  #
    stride_vb, stride_vr, stride_vt, stride_vh, stride_vd,  #
    stride_gb, stride_gr, stride_gt, stride_gh, stride_gd,  #
    stride_dkb, stride_dkr, stride_dkt, stride_dkh, stride_dkd,  #
    stride_dvb, stride_dvr, stride_dvt, stride_dvh, stride_dvd,  #
    HEADS, R, T, TK, N_KT, N_QT, N_ENTRIES, sm_scale, qk_scale,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # One program owns BLOCK_M keys of one key region and visits only the query regions that route
    # to it: entries OFF[b, r] .. OFF[b, r + 1] of the reverse routing map REV [B, R * topk] (query
    # regions grouped by the key region they name; a region named twice is listed twice, so it
    # counts twice). dK and dV are written once, in their dtype.
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // HEADS
    h = tl.program_id(1) % HEADS
    grp_k, region_k, token_k, ok_k = _query_rows(pid_m, N_KT, R, TK, 1, BLOCK_M)
    k = _load_rows(K, b, region_k, token_k, h, ok_k, stride_kb, stride_kr, stride_kt, stride_kh, stride_kd,
                   HEAD_DIM, BLOCK_D)
    v = _load_rows(V, b, region_k, token_k, h, ok_k, stride_vb, stride_vr, stride_vt, stride_vh, stride_vd,
                   HEAD_DIM_V, BLOCK_DV)
    dk = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    r = pid_m // N_KT
    start = tl.load(OFF + b * (R + 1) + r)
    stop = tl.load(OFF + b * (R + 1) + r + 1)
    offs_n = tl.arange(0, BLOCK_N)
    for e in range(start, stop):
        region_q = tl.load(REV + b.to(tl.int64) * N_ENTRIES + e) + offs_n * 0
        for qt in range(0, N_QT):
            token_q = qt * BLOCK_N + offs_n
            ok_q = token_q < T
            pair = (ok_k[:, None] & ok_q[None, :]).to(tl.float32)
            dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, b, region_q, token_q, h, ok_q, pair,
                                stride_qb, stride_qr, stride_qt, stride_qh, stride_qd,
                                stride_gb, stride_gr, stride_gt, stride_gh, stride_gd, HEADS, R, T, qk_scale,
                                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, DOT_PREC)
    _store_dkdv(DK, DV, dk, dv, b, region_k, token_k, h, ok_k, sm_scale,
                stride_dkb, stride_dkr, stride_dkt, stride_dkh, stride_dkd,
                stride_dvb, stride_dvr, stride_dvt, stride_dvh, stride_dvd, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)


@triton.jit
def _routing_bwd_atomic(
    Q, K, V, IDX, DO, LSE, DELTA, DQ, DK, DV,  #
    stride_qb, stride_qr, stride_qt, stride_qh, stride_qd,  #
    stride_kb, stride_kr, stride_kt, stride_kh, stride_kd,  #
    stride_vb, stride_vr, stride_vt, stride_vh, stride_vd,  #
    stride_ob, stride_or, stride_ot, stride_oh, stride_od,  #
    stride_dqb, stride_dqr, stride_dqt, stride_dqh, stride_dqd,  #
    stride_ib, stride_ir, stride_ik,  #
    HEADS, R, T, TK, L, N_MT, sm_scale, qk_scale,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, DENSE: tl.constexpr,  #
    DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // HEADS
    h = tl.program_id(1) % HEADS
    grp_m, region_m, token_m, ok_m = _query_rows(pid_m, N_MT, R, T, GROUP, BLOCK_M)
    r_first = _first_region(pid_m, N_MT, GROUP)
    q = _load_rows(Q, b, region_m, token_m, h, ok_m, stride_qb, stride_qr, stride_qt, stride_qh, stride_qd,
                   HEAD_DIM, BLOCK_D)
    do = _load_rows(DO, b, region_m, token_m, h, ok_m, stride_ob, stride_or, stride_ot, stride_oh, stride_od,
                    HEAD_DIM_V, BLOCK_DV)
    row_l = ((b.to(tl.int64) * R + region_m) * T + token_m) * HEADS + h
    lse = tl.load(LSE + row_l, mask=ok_m, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row_l, mask=ok_m, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    step = BLOCK_N // GROUP
    for n0 in range(0, L, step):
        grp_n, region_n, token_n, ok_n = _key_cols(n0, r_first, b, IDX, stride_ib, stride_ir, stride_ik, R, TK, L,
                                                   DENSE, GROUP, BLOCK_N)
        k = _load_rows(K, b, region_n, token_n, h, ok_n, stride_kb, stride_kr, stride_kt, stride_kh, stride_kd,
                       HEAD_DIM, BLOCK_D)
        v = _load_rows(V, b, region_n, token_n, h, ok_n, stride_vb, stride_vr, stride_vt, stride_vh, stride_vd,
                       HEAD_DIM_V, BLOCK_DV)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        valid = ok_m[:, None] & ok_n[None, :] & (grp_m[:, None] == grp_n[None, :])
        p = tl.where(valid, tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
        # dK / dV (contiguous float32 [B, R, T_k, heads, D]): routed regions are shared, hence atomics
        dv_part = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
        dk_part = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC) * sm_scale
        row_k = (((b.to(tl.int64) * R + region_n) * TK + token_n) * HEADS + h)
        tl.atomic_add(DV + row_k[:, None] * HEAD_DIM_V + offs_dv[None, :], dv_part,
                      mask=ok_n[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
        tl.atomic_add(DK + row_k[:, None] * HEAD_DIM + offs_d[None, :], dk_part,
                      mask=ok_n[:, None] & (offs_d[None, :] < HEAD_DIM))
    row_q = b.to(tl.int64) * stride_dqb + region_m.to(tl.int64) * stride_dqr + token_m * stride_dqt + h * stride_dqh
    tl.store(DQ + row_q[:, None] + offs_d[None, :] * stride_dqd, (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=ok_m[:, None] & (offs_d[None, :] < HEAD_DIM))


# -- host side ------------------------------------------------------------------------------------

_FWD = Launcher(_routing_fwd)
_DQ = Launcher(_routing_bwd_dq)
_DKDV = Launcher(_routing_bwd_dkdv)
_BWD_ATOMIC = Launcher(_routing_bwd_atomic)
_DKDV_REV = Launcher(_routing_bwd_dkdv_rev)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(n))


def _tiles(T: int, Tk: int, L: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, GROUP, num_warps)``. Regions of up to 8 tokens are packed ``GROUP`` to a
    16-row tile (the smallest tensor-core tile), larger ones take tiles of up to 64 queries. Tests
    replace this function to force other tilings."""
    if T <= 8:
        group = 16 // triton.next_power_of_2(T)
        return 16, 64, group, 4
    return min(64, _pow2(T)), 64, 1, 4


def _kv_tiles(T: int, Tk: int) -> tuple[int, int, int, int, int]:
    """``(BLOCK_M, GROUP_K, BLOCK_N, GROUP_Q, num_warps)`` of the dK/dV kernel: its key tile (as
    :func:`_tiles` packs query tiles) and the query chunk it takes per step (``GROUP_Q`` small
    regions packed, or up to 64 queries of one region). Tests replace it to force other tilings."""
    if Tk <= 8:
        group_k = 16 // triton.next_power_of_2(Tk)
        block_m = 16
    else:
        group_k, block_m = 1, min(64, _pow2(Tk))
    if T <= 8:
        group_q = 16 // triton.next_power_of_2(T)
        block_n = 16
    else:
        group_q, block_n = 1, min(64, _pow2(T))
    return block_m, group_k, block_n, group_q, 4


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def routing_triton_probe(q, k, v, indices) -> Optional[str]:
    """None when the Triton backend can run the call, otherwise the reason it cannot."""
    reason = triton_device_reason(q, _interpreting())
    if reason is not None:
        return reason
    if q.dtype not in _DTYPES:
        return f"supports float16, bfloat16 and float32, got dtype={q.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim must be <= {MAX_HEAD_DIM}, got q.shape[-1]={q.shape[-1]}, v.shape[-1]={v.shape[-1]}"
    return None


def _plan(q, k, v, indices):
    B, R, T, heads, D = q.shape
    Tk = k.shape[2]
    dense = indices is None
    L = (R if dense else indices.shape[-1]) * Tk
    block_m, block_n, group, warps = _tiles(T, Tk, L)
    if group > 1:
        n_mt, n_prog = 1, triton.cdiv(R, group)
        block_m = _pow2(group * T, block_m)
    else:
        n_mt = triton.cdiv(T, block_m)
        n_prog = R * n_mt
    idx = q.new_zeros(1, 1, 1, dtype=torch.int32) if dense else indices
    consts = (D, v.shape[-1], _pow2(D), _pow2(v.shape[-1]), block_m, block_n, group, dense,
              _dot_precision(q.dtype))
    return B, R, T, heads, Tk, L, n_mt, n_prog, idx, consts, warps


def _key(kind, *tensors, extra=()):
    return (kind,) + tuple((t.dtype, t.shape, t.stride()) for t in tensors) + (aligned(*tensors),) + tuple(extra)


def routing_triton_fwd(q, k, v, indices, scale: float):
    """``(out, lse)``; see ``foveal::routed_attention_fwd``."""
    B, R, T, heads, Tk, L, n_mt, n_prog, idx, consts, warps = _plan(q, k, v, indices)
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    lse = q.new_empty(q.shape[:-1], dtype=lse_dtype(q.dtype))
    args = (q, k, v, idx, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *idx.stride(),
            heads, R, T, Tk, L, n_mt, scale * _LOG2E, *consts)
    with on_device(q.device):
        _FWD((n_prog, B * heads), args, _key("fwd", q, k, v, idx, out, extra=(heads, R, T, Tk, L) + consts),
             num_warps=warps, num_stages=2)
    return out, lse


def routing_triton_bwd(grad_out, q, k, v, indices, out, lse, grad_lse, scale: float):
    """``(dq, dk, dv)``; see ``foveal::routed_attention_bwd``.

    Key regions of more than 8 tokens (one region per key tile): one kernel on the forward's
    programs, dK / dV added with float32 atomics (few conflicts: a region is routed to by a handful
    of query regions). Smaller key regions (packed key tiles, routed by many query regions, where
    the atomics collide): two launches, dQ (which also writes ``delta``) and dK/dV (one program per
    key tile over the query regions routing to it), no atomics.
    """
    B, R, T, heads, Tk, L, n_mt, n_prog, idx, consts, warps = _plan(q, k, v, indices)
    block_m, group_k, block_n, group_q, kv_warps = _kv_tiles(T, Tk)
    dense = indices is None
    path = "scan" if group_k > 1 else _unpacked_bwd(dense)
    if path == "atomic" and torch.are_deterministic_algorithms_enabled():
        path = "reverse"  # no atomics: the same gradients on every run
    if path == "reverse" and dense:
        path = "scan"
    if path == "atomic":
        return _bwd_atomic(grad_out, q, k, v, idx, out, lse, grad_lse, scale, B, R, T, heads, Tk, L, n_mt,
                           n_prog, consts, warps)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)  # the fake's layouts
    lse = lse.contiguous()
    glse = lse if grad_lse is None else grad_lse.float().contiguous()
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    args = (q, k, v, idx, out, grad_out, lse, glse, delta, dq, *q.stride(), *k.stride(), *v.stride(),
            *out.stride(), *grad_out.stride(), *dq.stride(), *idx.stride(), heads, R, T, Tk, L, n_mt, scale,
            scale * _LOG2E, *consts[:-1], grad_lse is not None, consts[-1])
    if group_k > 1:
        n_kt, n_kprog = 1, triton.cdiv(R, group_k)
        block_m = _pow2(group_k * Tk, block_m)
    else:
        n_kt = triton.cdiv(Tk, block_m)
        n_kprog = R * n_kt
    if group_q > 1:
        n_qt, n_qc = 1, triton.cdiv(R, group_q)
        block_n = _pow2(group_q * T, block_n)
    else:
        n_qt = triton.cdiv(T, block_n)
        n_qc = R * n_qt
    topk = R if dense else indices.shape[-1]
    kv_consts = (*consts[:4], block_m, group_k, block_n, group_q, dense, consts[-1])
    kv_args = (q, k, v, idx, grad_out, lse, delta, dk, dv, *q.stride(), *k.stride(), *v.stride(),
               *grad_out.stride(), *dk.stride(), *dv.stride(), *idx.stride(), heads, R, T, Tk, topk, n_kt, n_qc,
               n_qt, scale, scale * _LOG2E, *kv_consts)
    with on_device(q.device):
        _DQ((n_prog, B * heads), args,
            _key("dq", q, k, v, idx, out, grad_out, dq, lse, glse, extra=(heads, R, T, Tk, L) + consts),
            num_warps=warps, num_stages=2)
        if path == "reverse":
            rev, off = _reverse_map(indices, R)
            rev_consts = (*consts[:4], block_m, block_n, consts[-1])
            rev_args = (q, k, v, rev, off, grad_out, lse, delta, dk, dv, *q.stride(), *k.stride(), *v.stride(),
                        *grad_out.stride(), *dk.stride(), *dv.stride(), heads, R, T, Tk, n_kt, n_qt,
                        rev.shape[1], scale, scale * _LOG2E, *rev_consts)
            _DKDV_REV((n_kprog, B * heads), rev_args,
                      _key("dkdv_rev", q, k, v, grad_out, dk, dv, lse, extra=(heads, R, T, Tk, n_kt, n_qt,
                                                                             rev.shape[1]) + rev_consts),
                      num_warps=kv_warps, num_stages=2)
            return dq, dk, dv
        _DKDV((n_kprog, B * heads), kv_args,
              _key("dkdv", q, k, v, idx, grad_out, dk, dv, lse, extra=(heads, R, T, Tk, topk, n_kt, n_qc, n_qt)
                   + kv_consts), num_warps=kv_warps, num_stages=2)
    return dq, dk, dv


def _unpacked_bwd(dense: bool) -> str:
    """The backward of one-region key tiles: ``"atomic"`` (one kernel, float32 atomics) or
    ``"reverse"`` (dQ, then dK/dV over a reverse routing map: no atomics, a few small index
    kernels; on an H200 1.2-1.5x slower than the atomic kernel at BiFormer's shapes, a third of its
    memory). Deterministic mode takes the reverse map whatever this says; the dense case has no
    routing to reverse. Tests and ``tools/bench_routing.py --bwd`` replace it to force either."""
    return "atomic"


def _reverse_map(indices: torch.Tensor, R: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rev [B, R * topk] int32, off [B, R + 1] int32)``: the query region of every routing entry,
    grouped by the key region it names (stable: in query-region order), and where each key
    region's group starts."""
    B, _, topk = indices.shape
    flat = indices.reshape(B, R * topk)
    order = torch.sort(flat, dim=1, stable=True).indices
    rev = torch.div(order, topk, rounding_mode="floor").to(torch.int32)
    counts = torch.zeros(B, R, dtype=torch.int32, device=indices.device)
    counts.scatter_add_(1, flat.long(), torch.ones(flat.shape, dtype=torch.int32, device=indices.device))
    off = torch.zeros(B, R + 1, dtype=torch.int32, device=indices.device)
    off[:, 1:] = torch.cumsum(counts, 1, dtype=torch.int32)
    return rev.contiguous(), off


def _bwd_atomic(grad_out, q, k, v, idx, out, lse, grad_lse, scale, B, R, T, heads, Tk, L, n_mt, n_prog, consts,
                warps):
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    delta = (grad_out.float() * out.float()).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    delta = delta.contiguous()
    lse = lse.contiguous()
    args = (q, k, v, idx, grad_out, lse, delta, dq, dk, dv, *q.stride(), *k.stride(), *v.stride(),
            *grad_out.stride(), *dq.stride(), *idx.stride(), heads, R, T, Tk, L, n_mt, scale, scale * _LOG2E, *consts)
    with on_device(q.device):
        _BWD_ATOMIC((n_prog, B * heads), args,
                    _key("bwd", q, k, v, idx, grad_out, dq, lse, delta, extra=(heads, R, T, Tk, L) + consts),
                    num_warps=warps, num_stages=2)
    return dq, like_fake(dk, k), like_fake(dv, v)

