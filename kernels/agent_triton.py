"""Fused Triton agent attention (SPEC section 4): forward and backward.

Algorithm, per batch element and head, ``n`` agents (padded to ``BLOCK_A``, a power of two of at
least 16, masked) against ``N`` tokens:

- Stage 1 (agents attend the tokens, softmax over ``N``): the tokens are split over ``SPLITS``
  programs per (batch, head); each walks its share of the keys in ``BLOCK_N`` steps with every agent
  in its tile (online softmax in base 2) and leaves a partial maximum, sum and weighted value sum;
  a combine kernel merges the splits into ``V_A`` and the agents' log-sum-exp. With one split the
  stage kernel writes them itself. Detection maps (tens of thousands of tokens at batch 2) take many
  splits, classification maps at batch 128 one.
- Stage 2 (tokens attend the agents, softmax over ``n``): one program per ``BLOCK_M`` queries holds
  the whole agent set and ``V_A``; the softmax is exact in one pass.

The biases (``[heads, n, N]`` and ``[heads, N, n]``, broadcast over the batch) are read inside the
kernels at the logits' positions, never expanded.

Backward, with ``delta = rowsum(P * dP)`` formed in registers (each softmax row is whole in one
program for stage 2, and ``rowsum(dV_A * V_A)`` for stage 1): the stage-2 kernel recomputes ``P``
from the saved log-sum-exp, writes ``dQ`` and accumulates ``dA`` and ``dV_A``; the stage-1 kernel
then recomputes stage 1 token tile by token tile (transposed: rows are tokens), writes ``dK`` and
``dV`` and accumulates ``dA``. Both backward kernels own a token tile and a group of batch elements
and loop over the group, so the bias gradient (summed over the batch) is accumulated in registers
and written once per group (float32 atomics only between groups); ``dA`` / ``dV_A`` are summed over
the token tiles with float32 atomics, or, for small batches (a program then owns one batch element
and a run of tiles), accumulated in registers over the run first.

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

__all__ = ["agent_triton_probe", "agent_triton_fwd", "agent_triton_bwd", "MAX_HEAD_DIM", "MAX_AGENTS"]

MAX_HEAD_DIM = 128
MAX_AGENTS = 256
_LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return INTERPRETING  # a constant (see foveal.kernels.launch)


# -- device helpers -------------------------------------------------------------------------------

@triton.jit
def _load_tile(ptr, b, rows, h, ok, stride_b, stride_t, stride_h, stride_d, DIM: tl.constexpr,
               BLOCK_D: tl.constexpr):
    # rows of one (batch, head) of a [B, tokens, heads, D] tensor as a [rows, BLOCK_D] tile
    offs_d = tl.arange(0, BLOCK_D)
    row = b.to(tl.int64) * stride_b + rows.to(tl.int64) * stride_t + h * stride_h
    mask = ok[:, None] & (offs_d[None, :] < DIM)
    return tl.load(ptr + row[:, None] + offs_d[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def _store_tile(ptr, val, b, rows, h, ok, stride_b, stride_t, stride_h, stride_d, DIM: tl.constexpr,
                BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    row = b.to(tl.int64) * stride_b + rows.to(tl.int64) * stride_t + h * stride_h
    tl.store(ptr + row[:, None] + offs_d[None, :] * stride_d, val.to(ptr.dtype.element_ty),
             mask=ok[:, None] & (offs_d[None, :] < DIM))


@triton.jit
def _agent_rows(ptr, bh, n, offs_a, ok_a, DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    # pointers and mask of the [BLOCK_A, BLOCK_D] rows of one (batch, head) of a contiguous
    # [B * heads, n, DIM] buffer (V_A, dV_A, dA: float32)
    offs_d = tl.arange(0, BLOCK_D)
    row = (bh.to(tl.int64) * n + offs_a) * DIM
    return ptr + row[:, None] + offs_d[None, :], ok_a[:, None] & (offs_d[None, :] < DIM)


@triton.jit
def _bias_tile(ptr, h, offs_a, ok_a, offs_t, ok_t, stride_h, stride_a, stride_t):
    # a [tokens, agents] tile of a bias table (either layout: the strides say which), float32
    mask = ok_t[:, None] & ok_a[None, :]
    offs = h * stride_h + offs_t[:, None].to(tl.int64) * stride_t + offs_a[None, :] * stride_a
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


# -- forward, stage 1: agents attend the tokens ------------------------------------------------------

@triton.jit
def _agent_fwd_agents(
    K, V, A, BIAS, VA, LSE, PM, PL, PACC,  #
    stride_kb, stride_kt, stride_kh, stride_kd,  #
    stride_vb, stride_vt, stride_vh, stride_vd,  #
    stride_ab, stride_an, stride_ah, stride_ad,  #
    stride_bh, stride_ba, stride_bt,  #
    HEADS, N, N_AG, SPLIT_LEN, qk_scale,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,  #
    BLOCK_A: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,  #
    DOT_PREC: tl.constexpr,
):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HEADS
    h = bh % HEADS
    offs_a = tl.arange(0, BLOCK_A)
    ok_a = offs_a < N_AG
    a = _load_tile(A, b, offs_a, h, ok_a, stride_ab, stride_an, stride_ah, stride_ad, HEAD_DIM, BLOCK_D)
    m_i = tl.full([BLOCK_A], -1.0e30, dtype=tl.float32)  # finite: padded agent rows stay NaN-free
    l_i = tl.zeros([BLOCK_A], dtype=tl.float32)
    acc = tl.zeros([BLOCK_A, BLOCK_DV], dtype=tl.float32)
    start = split * SPLIT_LEN
    stop = tl.minimum(start + SPLIT_LEN, N)
    for t0 in range(start, stop, BLOCK_N):
        offs_t = t0 + tl.arange(0, BLOCK_N)
        ok_t = offs_t < stop
        k = _load_tile(K, b, offs_t, h, ok_t, stride_kb, stride_kt, stride_kh, stride_kd, HEAD_DIM, BLOCK_D)
        v = _load_tile(V, b, offs_t, h, ok_t, stride_vb, stride_vt, stride_vh, stride_vd, HEAD_DIM_V, BLOCK_DV)
        s = tl.dot(a, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BLOCK_A, BLOCK_N], base 2
        if HAS_BIAS:
            s += tl.trans(_bias_tile(BIAS, h, offs_a, ok_a, offs_t, ok_t, stride_bh, stride_ba, stride_bt)) * 1.4426950408889634
        s = tl.where(ok_t[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    if SPLITS == 1:
        ptrs, mask = _agent_rows(VA, bh, N_AG, offs_a, ok_a, HEAD_DIM_V, BLOCK_DV)
        tl.store(ptrs, acc / l_i[:, None], mask=mask)
        tl.store(LSE + bh.to(tl.int64) * N_AG + offs_a, (m_i + tl.math.log2(l_i)) / 1.4426950408889634, mask=ok_a)
    else:  # partials [B * heads, SPLITS, BLOCK_A(, BLOCK_DV)], merged by _agent_fwd_combine
        row = (bh.to(tl.int64) * SPLITS + split) * BLOCK_A + offs_a
        tl.store(PM + row, m_i)
        tl.store(PL + row, l_i)
        tl.store(PACC + row[:, None] * BLOCK_DV + tl.arange(0, BLOCK_DV)[None, :], acc)


@triton.jit
def _agent_fwd_combine(
    PM, PL, PACC, VA, LSE, N_AG,  #
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_A: tl.constexpr, SPLITS: tl.constexpr,
):
    bh = tl.program_id(0)
    offs_a = tl.arange(0, BLOCK_A)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_i = tl.full([BLOCK_A], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_A], dtype=tl.float32)
    acc = tl.zeros([BLOCK_A, BLOCK_DV], dtype=tl.float32)
    for split in range(SPLITS):
        row = (bh.to(tl.int64) * SPLITS + split) * BLOCK_A + offs_a
        m_s = tl.load(PM + row)
        m_new = tl.maximum(m_i, m_s)
        alpha = tl.math.exp2(m_i - m_new)
        beta = tl.math.exp2(m_s - m_new)
        l_i = l_i * alpha + tl.load(PL + row) * beta
        acc = acc * alpha[:, None] + tl.load(PACC + row[:, None] * BLOCK_DV + offs_dv[None, :]) * beta[:, None]
        m_i = m_new
    ok_a = offs_a < N_AG
    ptrs, mask = _agent_rows(VA, bh, N_AG, offs_a, ok_a, HEAD_DIM_V, BLOCK_DV)
    tl.store(ptrs, acc / l_i[:, None], mask=mask)
    tl.store(LSE + bh.to(tl.int64) * N_AG + offs_a, (m_i + tl.math.log2(l_i)) / 1.4426950408889634, mask=ok_a)


# -- forward, stage 2: tokens attend the agents ------------------------------------------------------

@triton.jit
def _agent_fwd_queries(
    Q, A, VA, BIAS, O, LSE,  #
    stride_qb, stride_qt, stride_qh, stride_qd,  #
    stride_ab, stride_an, stride_ah, stride_ad,  #
    stride_ob, stride_ot, stride_oh, stride_od,  #
    stride_bh, stride_bt, stride_ba,  #
    HEADS, N, N_AG, qk_scale,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,  #
    BLOCK_A: tl.constexpr, BLOCK_M: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
):
    bh = tl.program_id(1)
    b = bh // HEADS
    h = bh % HEADS
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok_m = offs_m < N
    offs_a = tl.arange(0, BLOCK_A)
    ok_a = offs_a < N_AG
    q = _load_tile(Q, b, offs_m, h, ok_m, stride_qb, stride_qt, stride_qh, stride_qd, HEAD_DIM, BLOCK_D)
    a = _load_tile(A, b, offs_a, h, ok_a, stride_ab, stride_an, stride_ah, stride_ad, HEAD_DIM, BLOCK_D)
    ptrs, mask = _agent_rows(VA, bh, N_AG, offs_a, ok_a, HEAD_DIM_V, BLOCK_DV)
    va = tl.load(ptrs, mask=mask, other=0.0).to(q.dtype)
    s = tl.dot(q, tl.trans(a), input_precision=DOT_PREC) * qk_scale  # [BLOCK_M, BLOCK_A], base 2
    if HAS_BIAS:
        s += _bias_tile(BIAS, h, offs_a, ok_a, offs_m, ok_m, stride_bh, stride_ba, stride_bt) * 1.4426950408889634
    s = tl.where(ok_a[None, :], s, float("-inf"))
    m = tl.max(s, 1)
    p = tl.math.exp2(s - m[:, None])
    l = tl.sum(p, 1)
    out = tl.dot(p.to(q.dtype), va, input_precision=DOT_PREC) / l[:, None]
    _store_tile(O, out, b, offs_m, h, ok_m, stride_ob, stride_ot, stride_oh, stride_od, HEAD_DIM_V, BLOCK_DV)
    tl.store(LSE + bh.to(tl.int64) * N + offs_m, (m + tl.math.log2(l)) / 1.4426950408889634, mask=ok_m)


# -- backward -------------------------------------------------------------------------------------
# Both kernels: program (tile run, head, batch group); loops over the run's tiles, and inside over
# the group's batch elements. ONE_BATCH (groups of one): dA / dV_A stay in registers over the run.

@triton.jit
def _agent_bwd_queries(
    Q, A, VA, BIAS, DO, LSE, DQ, DA, DVA, DBIAS,  #
    stride_qb, stride_qt, stride_qh, stride_qd,  #
    stride_ab, stride_an, stride_ah, stride_ad,  #
    stride_ob, stride_ot, stride_oh, stride_od,  #
    stride_dqb, stride_dqt, stride_dqh, stride_dqd,  #
    stride_bh, stride_bt, stride_ba,  #
    B, HEADS, N, N_AG, GROUP_B, sm_scale, qk_scale,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,  #
    BLOCK_A: tl.constexpr, BLOCK_M: tl.constexpr, TILES: tl.constexpr, ONE_BATCH: tl.constexpr,  #
    HAS_BIAS: tl.constexpr, GRAD_BIAS: tl.constexpr, ATOMIC_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
):
    h = tl.program_id(1)
    b_start = tl.program_id(2) * GROUP_B
    b_stop = tl.minimum(b_start + GROUP_B, B)
    offs_a = tl.arange(0, BLOCK_A)
    ok_a = offs_a < N_AG
    da_acc = tl.zeros([BLOCK_A, BLOCK_D], dtype=tl.float32)
    dva_acc = tl.zeros([BLOCK_A, BLOCK_DV], dtype=tl.float32)
    for tile in range(TILES):
        offs_m = (tl.program_id(0) * TILES + tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        ok_m = offs_m < N
        valid = ok_m[:, None] & ok_a[None, :]
        if HAS_BIAS:
            bias = _bias_tile(BIAS, h, offs_a, ok_a, offs_m, ok_m, stride_bh, stride_ba, stride_bt) * 1.4426950408889634
        dbias = tl.zeros([BLOCK_M, BLOCK_A], dtype=tl.float32)
        for i in range(0, b_stop - b_start):
            b = b_start + i  # a tensor under the interpreter too (its range yields ints)
            bh = b * HEADS + h
            q = _load_tile(Q, b, offs_m, h, ok_m, stride_qb, stride_qt, stride_qh, stride_qd, HEAD_DIM, BLOCK_D)
            do = _load_tile(DO, b, offs_m, h, ok_m, stride_ob, stride_ot, stride_oh, stride_od, HEAD_DIM_V, BLOCK_DV)
            a = _load_tile(A, b, offs_a, h, ok_a, stride_ab, stride_an, stride_ah, stride_ad, HEAD_DIM, BLOCK_D)
            ptrs, mask = _agent_rows(VA, bh, N_AG, offs_a, ok_a, HEAD_DIM_V, BLOCK_DV)
            va = tl.load(ptrs, mask=mask, other=0.0).to(q.dtype)
            lse = tl.load(LSE + bh.to(tl.int64) * N + offs_m, mask=ok_m, other=0.0) * 1.4426950408889634
            s = tl.dot(q, tl.trans(a), input_precision=DOT_PREC) * qk_scale
            if HAS_BIAS:
                s += bias
            p = tl.where(valid, tl.math.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(va), input_precision=DOT_PREC)
            ds = p * (dp - tl.sum(p * dp, 1)[:, None])  # rowsum(P * dP) = rowsum(dO * O)
            if GRAD_BIAS:
                dbias += ds
            dq = tl.dot(ds.to(a.dtype), a, input_precision=DOT_PREC) * sm_scale
            _store_tile(DQ, dq, b, offs_m, h, ok_m, stride_dqb, stride_dqt, stride_dqh, stride_dqd, HEAD_DIM, BLOCK_D)
            da_part = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC) * sm_scale
            dva_part = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
            if ONE_BATCH:
                da_acc += da_part
                dva_acc += dva_part
            else:
                ptrs, mask = _agent_rows(DA, bh, N_AG, offs_a, ok_a, HEAD_DIM, BLOCK_D)
                tl.atomic_add(ptrs, da_part, mask=mask)
                ptrs, mask = _agent_rows(DVA, bh, N_AG, offs_a, ok_a, HEAD_DIM_V, BLOCK_DV)
                tl.atomic_add(ptrs, dva_part, mask=mask)
        if GRAD_BIAS:  # contiguous float32 [heads, N, n]
            offs = (h * N + offs_m[:, None].to(tl.int64)) * N_AG + offs_a[None, :]
            if ATOMIC_BIAS:
                tl.atomic_add(DBIAS + offs, dbias, mask=valid)
            else:
                tl.store(DBIAS + offs, dbias, mask=valid)
    if ONE_BATCH:
        bh = b_start * HEADS + h
        ptrs, mask = _agent_rows(DA, bh, N_AG, offs_a, ok_a, HEAD_DIM, BLOCK_D)
        tl.atomic_add(ptrs, da_acc, mask=mask)
        ptrs, mask = _agent_rows(DVA, bh, N_AG, offs_a, ok_a, HEAD_DIM_V, BLOCK_DV)
        tl.atomic_add(ptrs, dva_acc, mask=mask)


@triton.jit
def _agent_bwd_tokens(
    K, V, A, VA, DVA, BIAS, LSE, DK, DV, DA, DBIAS,  #
    stride_kb, stride_kt, stride_kh, stride_kd,  #
    stride_vb, stride_vt, stride_vh, stride_vd,  #
    stride_ab, stride_an, stride_ah, stride_ad,  #
    stride_dkb, stride_dkt, stride_dkh, stride_dkd,  #
    stride_dvb, stride_dvt, stride_dvh, stride_dvd,  #
    stride_bh, stride_ba, stride_bt,  #
    B, HEADS, N, N_AG, GROUP_B, sm_scale, qk_scale,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,  #
    BLOCK_A: tl.constexpr, BLOCK_M: tl.constexpr, TILES: tl.constexpr, ONE_BATCH: tl.constexpr,  #
    HAS_BIAS: tl.constexpr, GRAD_BIAS: tl.constexpr, ATOMIC_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # stage 1 transposed: rows are tokens, columns agents; the agents' softmax runs down the columns
    h = tl.program_id(1)
    b_start = tl.program_id(2) * GROUP_B
    b_stop = tl.minimum(b_start + GROUP_B, B)
    offs_a = tl.arange(0, BLOCK_A)
    ok_a = offs_a < N_AG
    da_acc = tl.zeros([BLOCK_A, BLOCK_D], dtype=tl.float32)
    for tile in range(TILES):
        offs_t = (tl.program_id(0) * TILES + tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        ok_t = offs_t < N
        valid = ok_t[:, None] & ok_a[None, :]
        if HAS_BIAS:
            bias = _bias_tile(BIAS, h, offs_a, ok_a, offs_t, ok_t, stride_bh, stride_ba, stride_bt) * 1.4426950408889634
        dbias = tl.zeros([BLOCK_M, BLOCK_A], dtype=tl.float32)
        for i in range(0, b_stop - b_start):
            b = b_start + i  # a tensor under the interpreter too (its range yields ints)
            bh = b * HEADS + h
            k = _load_tile(K, b, offs_t, h, ok_t, stride_kb, stride_kt, stride_kh, stride_kd, HEAD_DIM, BLOCK_D)
            v = _load_tile(V, b, offs_t, h, ok_t, stride_vb, stride_vt, stride_vh, stride_vd, HEAD_DIM_V, BLOCK_DV)
            a = _load_tile(A, b, offs_a, h, ok_a, stride_ab, stride_an, stride_ah, stride_ad, HEAD_DIM, BLOCK_D)
            ptrs, mask = _agent_rows(VA, bh, N_AG, offs_a, ok_a, HEAD_DIM_V, BLOCK_DV)
            va = tl.load(ptrs, mask=mask, other=0.0)
            ptrs, mask = _agent_rows(DVA, bh, N_AG, offs_a, ok_a, HEAD_DIM_V, BLOCK_DV)
            dva = tl.load(ptrs, mask=mask, other=0.0)
            delta = tl.sum(dva * va, 1)  # [BLOCK_A]
            dva = dva.to(k.dtype)
            lse = tl.load(LSE + bh.to(tl.int64) * N_AG + offs_a, mask=ok_a, other=0.0) * 1.4426950408889634
            s = tl.dot(k, tl.trans(a), input_precision=DOT_PREC) * qk_scale  # [BLOCK_M, BLOCK_A]
            if HAS_BIAS:
                s += bias
            p = tl.where(valid, tl.math.exp2(s - lse[None, :]), 0.0)
            dp = tl.dot(v, tl.trans(dva), input_precision=DOT_PREC)
            ds = p * (dp - delta[None, :])
            if GRAD_BIAS:
                dbias += ds
            dk = tl.dot(ds.to(a.dtype), a, input_precision=DOT_PREC) * sm_scale
            _store_tile(DK, dk, b, offs_t, h, ok_t, stride_dkb, stride_dkt, stride_dkh, stride_dkd, HEAD_DIM, BLOCK_D)
            dv = tl.dot(p.to(dva.dtype), dva, input_precision=DOT_PREC)
            _store_tile(DV, dv, b, offs_t, h, ok_t, stride_dvb, stride_dvt, stride_dvh, stride_dvd, HEAD_DIM_V,
                        BLOCK_DV)
            da_part = tl.dot(tl.trans(ds.to(k.dtype)), k, input_precision=DOT_PREC) * sm_scale
            if ONE_BATCH:
                da_acc += da_part
            else:
                ptrs, mask = _agent_rows(DA, bh, N_AG, offs_a, ok_a, HEAD_DIM, BLOCK_D)
                tl.atomic_add(ptrs, da_part, mask=mask)
        if GRAD_BIAS:  # contiguous float32 [heads, n, N]
            offs = (h * N_AG + offs_a[None, :].to(tl.int64)) * N + offs_t[:, None]
            if ATOMIC_BIAS:
                tl.atomic_add(DBIAS + offs, dbias, mask=valid)
            else:
                tl.store(DBIAS + offs, dbias, mask=valid)
    if ONE_BATCH:
        ptrs, mask = _agent_rows(DA, b_start * HEADS + h, N_AG, offs_a, ok_a, HEAD_DIM, BLOCK_D)
        tl.atomic_add(ptrs, da_acc, mask=mask)


# -- host side ------------------------------------------------------------------------------------

_FWD_AGENTS = Launcher(_agent_fwd_agents)
_FWD_COMBINE = Launcher(_agent_fwd_combine)
_FWD_QUERIES = Launcher(_agent_fwd_queries)
_BWD_QUERIES = Launcher(_agent_bwd_queries)
_BWD_TOKENS = Launcher(_agent_bwd_tokens)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SM_COUNT: dict = {}




def _pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(n))


# programs wanted per SM: stage 1's forward splits, and the backward's batch groups / tile runs
_FWD_WAVES = 2
_BWD_WAVES = 4  # H200, 2 / 4 / 8 / 16 / 32 tried: 4 was at or near the best at every benchmark shape


def _bwd_stages(block_a: int, block_d: int) -> int:
    """Software-pipelining stages of the backward kernels: their agent-sized tiles (A, V_A, dV_A) are
    loaded per batch element, and two stages of them overflow shared memory from 256 agents of
    float32 head dim 64 (``block_d`` counts 16-bit elements, as in :func:`_tiles`)."""
    return 1 if block_a * block_d >= 256 * 128 else 2


def _programs_wanted(device: torch.device, waves: int) -> int:
    """About ``waves`` programs per SM on the device (a fixed number under the interpreter)."""
    if device.type != "cuda":
        return 8
    count = _SM_COUNT.get(device.index)
    if count is None:
        count = _SM_COUNT[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return waves * count


def _tiles(block_a: int, block_d: int) -> tuple[int, int, int]:
    """``(BLOCK_N of stage 1's forward, BLOCK_M of the token tiles, num_warps)``; ``block_d`` counts
    16-bit elements (a float32 head dim counts twice); tests replace it."""
    if block_a * block_d >= 256 * 128:  # e.g. 196+ float32 agents of head dim 64: 32-row tiles overflow shared memory
        return 16, 16, 8
    if block_a >= 128 or block_d >= 128:
        return 32, 32, 8
    return 64, 64, 4


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def agent_triton_probe(q, k, v, agents, bias_ak, bias_qa) -> Optional[str]:
    """None when the Triton backend can run the call, otherwise the reason it cannot."""
    reason = triton_device_reason(q, _interpreting())
    if reason is not None:
        return reason
    if q.dtype not in _DTYPES:
        return f"supports float16, bfloat16 and float32, got dtype={q.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim must be <= {MAX_HEAD_DIM}, got q.shape[-1]={q.shape[-1]}, v.shape[-1]={v.shape[-1]}"
    if agents.shape[1] > MAX_AGENTS:
        return f"supports up to {MAX_AGENTS} agents, got agents.shape[1]={agents.shape[1]}"
    return None


def _consts(q, v, agents):
    D, Dv, n = q.shape[-1], v.shape[-1], agents.shape[1]
    block_a, block_d, block_dv = _pow2(n), _pow2(D), _pow2(Dv)
    block_n, block_m, warps = _tiles(block_a, max(block_d, block_dv) * q.element_size() // 2)
    return D, Dv, n, block_a, block_d, block_dv, block_n, block_m, warps


def _bias_args(bias: Optional[torch.Tensor], dummy: torch.Tensor):
    if bias is None:
        return dummy, 0, 0, 0
    return (bias, *bias.stride())


def _key(kind, *tensors, extra=()):
    return (kind,) + tuple((t.dtype, t.shape, t.stride()) for t in tensors) + (aligned(*tensors),) + tuple(extra)


def agent_triton_fwd(q, k, v, agents, bias_ak, bias_qa, scale: float):
    """``(out, va, lse_agent, lse_query)``; see ``foveal::agent_attention_fwd``."""
    B, N, heads, _ = q.shape
    D, Dv, n, block_a, block_d, block_dv, block_n, block_m, warps = _consts(q, v, agents)
    prec = _dot_precision(q.dtype)
    ld = lse_dtype(q.dtype)
    va = q.new_empty(B, heads, n, Dv, dtype=ld)
    lse_a = q.new_empty(B, heads, n, dtype=ld)
    out = q.new_empty(B, N, heads, Dv)
    lse_q = q.new_empty(B, heads, N, dtype=ld)
    # stage 1: enough token splits to fill the device
    steps = triton.cdiv(N, block_n)
    splits = max(1, min(steps, triton.cdiv(_programs_wanted(q.device, _FWD_WAVES), B * heads)))
    split_len = triton.cdiv(steps, splits) * block_n
    splits = triton.cdiv(N, split_len)
    if splits > 1:
        pm = q.new_empty(B * heads, splits, block_a, dtype=torch.float32)
        pl = torch.empty_like(pm)
        pacc = q.new_empty(B * heads, splits, block_a, block_dv, dtype=torch.float32)
    else:
        pm = pl = pacc = va
    bak, *bak_strides = _bias_args(bias_ak, q)
    bqa, *bqa_strides = _bias_args(bias_qa, q)
    consts1 = (D, Dv, block_d, block_dv, block_a, block_n, splits, bias_ak is not None, prec)
    args = (k, v, agents, bak, va, lse_a, pm, pl, pacc, *k.stride(), *v.stride(), *agents.stride(), *bak_strides,
            heads, N, n, split_len, scale * _LOG2E, *consts1)
    with on_device(q.device):
        _FWD_AGENTS((splits, B * heads), args,
                    _key("fwd1", k, v, agents, bak, extra=(heads, N, n, split_len) + consts1),
                    num_warps=warps, num_stages=2)
        if splits > 1:
            consts_c = (Dv, block_dv, block_a, splits)
            _FWD_COMBINE((B * heads,), (pm, pl, pacc, va, lse_a, n, *consts_c), ("comb", n) + consts_c, num_warps=4)
        consts2 = (D, Dv, block_d, block_dv, block_a, block_m, bias_qa is not None, prec)
        args = (q, agents, va, bqa, out, lse_q, *q.stride(), *agents.stride(), *out.stride(), *bqa_strides,
                heads, N, n, scale * _LOG2E, *consts2)
        _FWD_QUERIES((triton.cdiv(N, block_m), B * heads), args,
                     _key("fwd2", q, agents, bqa, out, extra=(heads, N, n) + consts2), num_warps=warps, num_stages=2)
    return out, va, lse_a, lse_q


def _bwd_grid(B: int, heads: int, n_tiles: int, device: torch.device):
    """``(grid, tiles per program, batch elements per group, one batch per group)``."""
    wanted = _programs_wanted(device, _BWD_WAVES)
    if B >= 8:  # many batch elements: one tile per program, the batch split into groups
        groups = max(1, min(B, triton.cdiv(wanted, n_tiles * heads)))
        group_b = triton.cdiv(B, groups)
        return (n_tiles, heads, triton.cdiv(B, group_b)), 1, group_b, False
    runs = max(1, min(n_tiles, triton.cdiv(wanted, B * heads)))
    tiles = triton.cdiv(n_tiles, runs)
    return (triton.cdiv(n_tiles, tiles), heads, B), tiles, 1, True


def agent_triton_bwd(grad_out, q, k, v, agents, bias_ak, bias_qa, va, lse_agent, lse_query, scale: float,
                     grad_bias: bool = True):
    """``(dq, dk, dv, dagents, dbias_ak, dbias_qa)``; see ``foveal::agent_attention_bwd``."""
    B, N, heads, _ = q.shape
    D, Dv, n, block_a, block_d, block_dv, block_n, block_m, warps = _consts(q, v, agents)
    prec = _dot_precision(q.dtype)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)  # the fake's layouts
    da = q.new_zeros(B, heads, n, D, dtype=torch.float32)
    dva = q.new_zeros(B, heads, n, Dv, dtype=torch.float32)
    n_tiles = triton.cdiv(N, block_m)
    grid, tiles, group_b, one_batch = _bwd_grid(B, heads, n_tiles, q.device)
    atomic_bias = grid[2] > 1
    new_bias = torch.zeros if atomic_bias else torch.empty
    dbqa = new_bias(bias_qa.shape, dtype=torch.float32, device=q.device) if grad_bias and bias_qa is not None else None
    dbak = new_bias(bias_ak.shape, dtype=torch.float32, device=q.device) if grad_bias and bias_ak is not None else None
    bak, *bak_strides = _bias_args(bias_ak, q)
    bqa, *bqa_strides = _bias_args(bias_qa, q)
    lse_agent, lse_query, va = lse_agent.contiguous(), lse_query.contiguous(), va.contiguous()
    plan = (B, heads, N, n, group_b)
    with on_device(q.device):
        consts = (D, Dv, block_d, block_dv, block_a, block_m, tiles, one_batch, bias_qa is not None,
                  dbqa is not None, atomic_bias, prec)
        args = (q, agents, va, bqa, grad_out, lse_query, dq, da, dva, q if dbqa is None else dbqa, *q.stride(),
                *agents.stride(), *grad_out.stride(), *dq.stride(), *bqa_strides, *plan, scale, scale * _LOG2E, *consts)
        stages = _bwd_stages(block_a, max(block_d, block_dv) * q.element_size() // 2)
        _BWD_QUERIES(grid, args, _key("bwd2", q, agents, bqa, grad_out, dq, extra=plan + consts),
                     num_warps=warps, num_stages=stages)
        consts = (D, Dv, block_d, block_dv, block_a, block_m, tiles, one_batch, bias_ak is not None,
                  dbak is not None, atomic_bias, prec)
        args = (k, v, agents, va, dva, bak, lse_agent, dk, dv, da, k if dbak is None else dbak, *k.stride(),
                *v.stride(), *agents.stride(), *dk.stride(), *dv.stride(), *bak_strides, *plan, scale,
                scale * _LOG2E, *consts)
        _BWD_TOKENS(grid, args, _key("bwd1", k, v, agents, bak, dk, dv, extra=plan + consts),
                    num_warps=warps, num_stages=stages)
    return (dq, dk, dv, like_fake(da.transpose(1, 2), agents), None if dbak is None else like_fake(dbak, bias_ak),
            None if dbqa is None else like_fake(dbqa, bias_qa))

