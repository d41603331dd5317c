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

Backward, flash-attention style, two kernels. dQ takes the forward's programs, recomputes ``P`` from
the log-sum-exp, accumulates ``dQ`` in registers and writes ``delta = rowsum(dO * O) - dLSE``. dK/dV
takes one program per key tile (packed like the query tiles when regions are small) and walks the
query regions, skipping those whose routing list does not name any of its key regions; a region
named twice in a list counts twice (the pair's probabilities are weighted by the multiplicity). So
the reverse map of the routing is never built, dK and dV are written once in their dtype, and no
atomics or float32 staging buffers are needed.

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
              SHARED: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    # the step's key columns: (group inside the tile, key region, key token, valid). SHARED: every
    # row of the tile walks the same key sequence, all regions in order (dense or masked-dense)
    offs_n = tl.arange(0, BLOCK_N)
    if SHARED:
        grp = offs_n * 0
        pos = n0 + offs_n
        ok = pos < L
        region = pos // TK
    else:
        if GROUP == 1:
            grp = offs_n * 0
            pos = n0 + offs_n
        else:
            grp = offs_n // (BLOCK_N // GROUP)
            pos = n0 + offs_n % (BLOCK_N // GROUP)
        q_region = r_first + grp
        ok = (pos < L) & (q_region < R)
        region = tl.load(IDX + b * stride_ib + q_region * stride_ir + (pos // TK) * stride_ik, mask=ok, other=0)
    return grp, region, pos % TK, ok


@triton.jit
def _pair_logits(s, ok_m, region_m, grp_m, ok_n, region_n, grp_n, b, MULT, R,
                 SHARED: tl.constexpr, MASKED: tl.constexpr):
    # base-2 logits with the pair mask applied: block-diagonal for packed routed tiles; on the
    # masked-dense path the key region's multiplicity in the query region's list (0: not routed)
    # enters as log2(count) (a region named twice counts twice)
    if MASKED:
        count = tl.load(MULT + (b.to(tl.int64) * R + region_m[:, None]) * R + region_n[None, :],
                        mask=ok_m[:, None] & ok_n[None, :], other=0).to(tl.float32)
        return tl.where(count > 0, s + tl.math.log2(tl.maximum(count, 1.0)), float("-inf"))
    if SHARED:
        return tl.where(ok_n[None, :], s, float("-inf"))
    return tl.where(ok_n[None, :] & (grp_m[:, None] == grp_n[None, :]), s, float("-inf"))


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
    Q, K, V, IDX, MULT, O, LSE,  #
    stride_qb, stride_qr, stride_qt, stride_qh, stride_qd,  #
    stride_kb, stride_kr, stride_kt, stride_kh, stride_kd,  #
    stride_vb, stride_vr, stride_vt, stride_vh, stride_vd,  #
    stride_ob, stride_or, stride_ot, stride_oh, stride_od,  #
    stride_ib, stride_ir, stride_ik,  #
    HEADS, R, T, TK, L, N_MT, qk_scale,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, DENSE: tl.constexpr,  #
    MASKED: tl.constexpr, DOT_PREC: tl.constexpr,
):
    SHARED: tl.constexpr = DENSE or MASKED
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
    step = BLOCK_N if SHARED else BLOCK_N // GROUP
    for n0 in range(0, L, step):
        grp_n, region_n, token_n, ok_n = _key_cols(n0, r_first, b, IDX, stride_ib, stride_ir, stride_ik, R, TK, L,
                                                   SHARED, GROUP, BLOCK_N)
        k = _load_rows(K, b, region_n, token_n, h, ok_n, stride_kb, stride_kr, stride_kt, stride_kh, stride_kd,
                       HEAD_DIM, BLOCK_D)
        v = _load_rows(V, b, region_n, token_n, h, ok_n, stride_vb, stride_vr, stride_vt, stride_vh, stride_vd,
                       HEAD_DIM_V, BLOCK_DV)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        s = _pair_logits(s, ok_m, region_m, grp_m, ok_n, region_n, grp_n, b, MULT, R, SHARED, MASKED)
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
    Q, K, V, IDX, MULT, O, DO, LSE, GLSE, DELTA, DQ,  #
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
    MASKED: tl.constexpr, HAS_GLSE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    SHARED: tl.constexpr = DENSE or MASKED
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
    step = BLOCK_N if SHARED else BLOCK_N // GROUP
    for n0 in range(0, L, step):
        grp_n, region_n, token_n, ok_n = _key_cols(n0, r_first, b, IDX, stride_ib, stride_ir, stride_ik, R, TK, L,
                                                   SHARED, GROUP, BLOCK_N)
        k = _load_rows(K, b, region_n, token_n, h, ok_n, stride_kb, stride_kr, stride_kt, stride_kh, stride_kd,
                       HEAD_DIM, BLOCK_D)
        v = _load_rows(V, b, region_n, token_n, h, ok_n, stride_vb, stride_vr, stride_vt, stride_vh, stride_vd,
                       HEAD_DIM_V, BLOCK_DV)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        s = _pair_logits(s, ok_m, region_m, grp_m, ok_n, region_n, grp_n, b, MULT, R, SHARED, MASKED)
        p = tl.where(ok_m[:, None], tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    row_q = b.to(tl.int64) * stride_dqb + region_m.to(tl.int64) * stride_dqr + token_m * stride_dqt + h * stride_dqh
    tl.store(DQ + row_q[:, None] + offs_d[None, :] * stride_dqd, (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=ok_m[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _routing_bwd_dkdv(
    Q, K, V, MULT, DO, LSE, DELTA, DK, DV,  #
    stride_qb, stride_qr, stride_qt, stride_qh, stride_qd,  #
    stride_kb, stride_kr, stride_kt, stride_kh, stride_kd,  #
    stride_vb, stride_vr, stride_vt, stride_vh, stride_vd,  #
    stride_gb, stride_gr, stride_gt, stride_gh, stride_gd,  #
    stride_dkb, stride_dkr, stride_dkt, stride_dkh, stride_dkd,  #
    stride_dvb, stride_dvr, stride_dvt, stride_dvh, stride_dvd,  #
    HEADS, R, T, TK, N_KT, N_QC, N_QT, sm_scale, qk_scale,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,  #
    BLOCK_M: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_Q: tl.constexpr,  #
    DENSE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # One program owns a tile of keys (BLOCK_M keys of one region, or GROUP_K whole small regions)
    # and walks every query chunk (BLOCK_N queries of one region, or GROUP_Q small regions), skipping
    # chunks that route to none of its regions. The multiplicity of each (query region, key region)
    # pair (MULT [B, R, R]: how often the key region appears in the query region's list; duplicates
    # count) weights the pair's probabilities, so dK and dV are written once, in their dtype,
    # without atomics.
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
            mult = tl.load(MULT + (b.to(tl.int64) * R + region_q[None, :]) * R + region_k[:, None],
                           mask=ok_k[:, None] & ok_q[None, :], other=0).to(tl.float32)
        if tl.max(tl.max(mult, 1), 0) > 0:
            q = _load_rows(Q, b, region_q, token_q, h, ok_q, stride_qb, stride_qr, stride_qt, stride_qh, stride_qd,
                           HEAD_DIM, BLOCK_D)
            do = _load_rows(DO, b, region_q, token_q, h, ok_q, stride_gb, stride_gr, stride_gt, stride_gh,
                            stride_gd, HEAD_DIM_V, BLOCK_DV)
            row_l = ((b.to(tl.int64) * R + region_q) * T + token_q) * HEADS + h
            lse = tl.load(LSE + row_l, mask=ok_q, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + row_l, mask=ok_q, other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
            pt = tl.where(mult > 0, tl.math.exp2(st - lse[None, :]), 0.0) * mult
            dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row = b.to(tl.int64) * stride_dkb + region_k.to(tl.int64) * stride_dkr + token_k * stride_dkt + h * stride_dkh
    tl.store(DK + row[:, None] + offs_d[None, :] * stride_dkd, (dk * sm_scale).to(DK.dtype.element_ty),
             mask=ok_k[:, None] & (offs_d[None, :] < HEAD_DIM))
    row = b.to(tl.int64) * stride_dvb + region_k.to(tl.int64) * stride_dvr + token_k * stride_dvt + h * stride_dvh
    tl.store(DV + row[:, None] + offs_dv[None, :] * stride_dvd, dv.to(DV.dtype.element_ty),
             mask=ok_k[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


# -- host side ------------------------------------------------------------------------------------

_FWD = Launcher(_routing_fwd)
_DQ = Launcher(_routing_bwd_dq)
_DKDV = Launcher(_routing_bwd_dkdv)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(n))


def _pack(T: int, rows: int) -> tuple[int, int]:
    """``(tile rows, regions per tile)``: regions of up to ``rows / 2`` tokens packed whole into a
    ``rows``-row tile, larger ones split into tiles of up to 64 tokens."""
    if T <= rows // 2:
        return rows, rows // triton.next_power_of_2(T)
    return min(64, _pow2(T)), 1


def _masked(T: int, Tk: int, topk: int, R: int) -> bool:
    """The masked-dense path: tiny regions routed to a quarter of the map or more (BiFormer's stage 3
    at 224: 4-token regions, top-16 of 49). Every tile then walks all the keys in order with the
    routing as a mask: a few times the routed work, but in full tensor-core tiles instead of gathered
    4-token slivers. Tests replace it to force either path."""
    return T <= 8 and Tk <= 8 and 4 * topk >= R


def _tiles(T: int, Tk: int, L: int, shared: bool = False) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, GROUP, num_warps)`` of the forward and dQ kernels. Routed tiles pack
    regions of up to 8 tokens ``GROUP`` to a 16-row tile (each region walks its own keys, side by
    side), tiles on a shared key sequence (dense, masked-dense) pack up to 64 rows. Tests replace
    this function to force other tilings."""
    block_m, group = _pack(T, 64 if shared else 16)
    return block_m, 64, group, 4


def _kv_tiles(T: int, Tk: int, shared: bool = False) -> tuple[int, int, int, int, int]:
    """``(BLOCK_M, GROUP_K, BLOCK_N, GROUP_Q, num_warps)`` of the dK/dV kernel: its key tile (as
    :func:`_tiles` packs query tiles) and the query chunk it takes per step (``GROUP_Q`` small
    regions packed, or up to 64 queries of one region); 64-row packing when the routing is dense or
    masked-dense. Tests replace it to force other tilings."""
    rows = 64 if shared else 16
    block_m, group_k = _pack(Tk, rows)
    block_n, group_q = _pack(T, rows)
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
    masked = not dense and _masked(T, Tk, indices.shape[-1], R)
    L = (R if dense or masked else indices.shape[-1]) * Tk
    block_m, block_n, group, warps = _tiles(T, Tk, L, shared=dense or masked)
    if group > 1:
        n_mt, n_prog = 1, triton.cdiv(R, group)
        block_m = _pow2(group * T, block_m)
    else:
        n_mt = triton.cdiv(T, block_m)
        n_prog = R * n_mt
    idx = q.new_zeros(1, 1, 1, dtype=torch.int32) if dense else indices
    consts = (D, v.shape[-1], _pow2(D), _pow2(v.shape[-1]), block_m, block_n, group, dense, masked,
              _dot_precision(q.dtype))
    return B, R, T, heads, Tk, L, n_mt, n_prog, idx, masked, consts, warps


def _multiplicity(indices: Optional[torch.Tensor], R: int, like: torch.Tensor) -> torch.Tensor:
    """``[B, R, R]`` int32: how often key region ``j`` appears in the list of query region ``r``
    (a 1-element placeholder when dense)."""
    if indices is None:
        return like.new_zeros(1, dtype=torch.int32)
    idx = indices.long()
    mult = torch.zeros(idx.shape[0], R, R, dtype=torch.int32, device=idx.device)
    return mult.scatter_add_(2, idx, torch.ones(idx.shape, dtype=torch.int32, device=idx.device))


def _key(kind, *tensors, extra=()):
    return (kind,) + tuple((t.dtype, t.shape, t.stride()) for t in tensors) + (aligned(*tensors),) + tuple(extra)


def routing_triton_fwd(q, k, v, indices, scale: float):
    """``(out, lse)``; see ``foveal::routed_attention_fwd``."""
    B, R, T, heads, Tk, L, n_mt, n_prog, idx, masked, consts, warps = _plan(q, k, v, indices)
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    lse = q.new_empty(q.shape[:-1], dtype=lse_dtype(q.dtype))
    mult = _multiplicity(indices if masked else None, R, q)
    args = (q, k, v, idx, mult, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *idx.stride(),
            heads, R, T, Tk, L, n_mt, scale * _LOG2E, *consts)
    with on_device(q.device):
        _FWD((n_prog, B * heads), args, _key("fwd", q, k, v, idx, out, extra=(heads, R, T, Tk, L) + consts),
             num_warps=warps, num_stages=2)
    return out, lse


def routing_triton_bwd(grad_out, q, k, v, indices, out, lse, grad_lse, scale: float):
    """``(dq, dk, dv)``; see ``foveal::routed_attention_bwd``.

    Two launches: dQ (the forward's programs, which also write ``delta``) and dK/dV (one program
    per key tile, over the query regions routed to it); no atomics, no float32 staging copies.
    """
    B, R, T, heads, Tk, L, n_mt, n_prog, idx, masked, consts, warps = _plan(q, k, v, indices)
    dense = indices is None
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)  # the fake's layouts
    lse = lse.contiguous()
    glse = lse if grad_lse is None else grad_lse.float().contiguous()
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    mult = _multiplicity(indices, R, q)
    args = (q, k, v, idx, mult, out, grad_out, lse, glse, delta, dq, *q.stride(), *k.stride(), *v.stride(),
            *out.stride(), *grad_out.stride(), *dq.stride(), *idx.stride(), heads, R, T, Tk, L, n_mt, scale,
            scale * _LOG2E, *consts[:-1], grad_lse is not None, consts[-1])
    block_m, group_k, block_n, group_q, kv_warps = _kv_tiles(T, Tk, shared=dense or masked)
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
    kv_consts = (*consts[:4], block_m, group_k, block_n, group_q, dense, consts[-1])
    kv_args = (q, k, v, mult, grad_out, lse, delta, dk, dv, *q.stride(), *k.stride(), *v.stride(),
               *grad_out.stride(), *dk.stride(), *dv.stride(), heads, R, T, Tk, n_kt, n_qc,
               n_qt, scale, scale * _LOG2E, *kv_consts)
    with on_device(q.device):
        _DQ((n_prog, B * heads), args,
            _key("dq", q, k, v, idx, out, grad_out, dq, lse, glse, extra=(heads, R, T, Tk, L) + consts),
            num_warps=warps, num_stages=2)
        _DKDV((n_kprog, B * heads), kv_args,
              _key("dkdv", q, k, v, grad_out, dk, dv, lse, extra=(heads, R, T, Tk, n_kt, n_qc, n_qt) + kv_consts),
              num_warps=kv_warps, num_stages=2)
    return dq, dk, dv
