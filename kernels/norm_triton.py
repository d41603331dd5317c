"""Fused residual add + LayerNorm over the last dim (Triton): forward and backward.

Forward. Each program takes ``BLOCK_M`` rows (one row per index of the leading dims), each row
whole: ``BLOCK_C`` is the next power of two of ``C``, the tail masked. ``s = x + residual`` is
added in float32 and rounded once to the promoted dtype, as torch's add does; the statistics are
taken from the rounded ``s`` in float32 (mean, then the mean square of ``s - mean``: two passes
over registers, no Welford); ``h = (s - mean) * rstd * weight + bias`` is written once, in the
output dtype. ``s`` (only when there is a residual) and the float32 ``mean`` and ``rstd`` are
written for the backward.

Backward. With ``g = weight * grad_h`` and ``xhat = (s - mean) * rstd`` recomputed from the
saved statistics, ``ds = grad_s + rstd * (g - mean(g) - xhat * mean(xhat * g))`` is written as
the gradient of ``x`` (and once more in the residual's dtype when that differs). A fixed number
of programs (a few per SM) loop over the row blocks; each keeps its ``dweight`` / ``dbias`` sums
in registers and writes them once, to its own row of a ``[programs, C]`` float32 buffer that the
host sums: deterministic, no atomics.

Layout. The last dim must be unit-stride (the launchers copy a tensor whose last dim is not). The
leading dims of the tensors a kernel reads are collapsed jointly into at most three (size,
per-tensor stride) groups, so slices and crops of channels-last maps are read in place; a tensor
that needs more groups is copied. Outputs are contiguous.

Tiles come from a small table keyed by ``BLOCK_C`` (``_TILES``). When ``TRITON_INTERPRET=1`` is
set before triton is imported, the kernels run in Triton's interpreter and accept CPU tensors:
that is how the CPU tests check them.
"""
import functools
import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import INTERPRETING, Launcher

__all__ = ["add_layer_norm_triton_probe", "add_layer_norm_triton_fwd", "add_layer_norm_triton_bwd", "MAX_C"]

MAX_C = 16384  # one row per program lives in registers
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return INTERPRETING  # a constant (see foveal.kernels.launch)


# -- device helpers -------------------------------------------------------------------------------

@triton.jit
def _row_offsets(rows, n1, n2, stride0, stride1, stride2):
    # offset of each row's first channel, rows = (i0 * n1 + i1) * n2 + i2 (int64: maps > 2^31 elements)
    rows = rows.to(tl.int64)
    rest = rows // n2
    return (rest // n1) * stride0 + (rest % n1) * stride1 + (rows % n2) * stride2


@triton.jit
def _tile_mask(row_ok, cols, C, EVEN_C: tl.constexpr):
    # a mask that depends on the row only keeps the accesses vectorized
    if EVEN_C:
        return row_ok[:, None]
    else:
        return row_ok[:, None] & (cols[None, :] < C)


# -- kernels --------------------------------------------------------------------------------------

@triton.jit
def _add_ln_fwd(
    X, R, W, B, S, H, MEAN, RSTD,  #
    n_rows, C, n1, n2,  #
    stride_x0, stride_x1, stride_x2,  #
    stride_r0, stride_r1, stride_r2,  #
    eps,  #
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,  #
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    mask = _tile_mask(row_ok, cols, C, EVEN_C)
    offs_x = _row_offsets(rows, n1, n2, stride_x0, stride_x1, stride_x2)[:, None] + cols[None, :]
    offs_out = rows.to(tl.int64)[:, None] * C + cols[None, :]
    x = tl.load(X + offs_x, mask=mask, other=0.)
    if HAS_RES:
        offs_r = _row_offsets(rows, n1, n2, stride_r0, stride_r1, stride_r2)[:, None] + cols[None, :]
        r = tl.load(R + offs_r, mask=mask, other=0.)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + offs_out, s, mask=mask)
        s = s.to(tl.float32)  # the statistics see the rounded sum, as an unfused LayerNorm does
    else:
        s = x.to(tl.float32)
    mean = tl.sum(s, axis=1) / C
    centered = tl.where(mask, s - mean[:, None], 0.)
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / C + eps)
    h = centered * rstd[:, None]
    if HAS_W:
        h = h * tl.load(W + cols, mask=cols < C, other=0.).to(tl.float32)[None, :]
    if HAS_B:
        h = h + tl.load(B + cols, mask=cols < C, other=0.).to(tl.float32)[None, :]
    tl.store(H + offs_out, h.to(H.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _add_ln_bwd(
    DH, DS, S, W, MEAN, RSTD, DX, DR, DW, DB,  #
    n_rows, C, n1, n2,  #
    stride_dh0, stride_dh1, stride_dh2,  #
    stride_ds0, stride_ds1, stride_ds2,  #
    stride_s0, stride_s1, stride_s2,  #
    HAS_DS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, WRITE_DR: tl.constexpr,  #
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    if HAS_W:
        w = tl.load(W + cols, mask=cols < C, other=0.).to(tl.float32)
    dw = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for start in range(pid * BLOCK_M, n_rows, tl.num_programs(0) * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        mask = _tile_mask(row_ok, cols, C, EVEN_C)
        offs_s = _row_offsets(rows, n1, n2, stride_s0, stride_s1, stride_s2)[:, None] + cols[None, :]
        offs_dh = _row_offsets(rows, n1, n2, stride_dh0, stride_dh1, stride_dh2)[:, None] + cols[None, :]
        s = tl.load(S + offs_s, mask=mask, other=0.).to(tl.float32)
        dh = tl.load(DH + offs_dh, mask=mask, other=0.).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.)
        xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.)
        if HAS_W:
            g = dh * w[None, :]
        else:
            g = dh
        mean_xg = tl.sum(xhat * g, axis=1) / C
        mean_g = tl.sum(g, axis=1) / C
        ds = (g - (xhat * mean_xg[:, None] + mean_g[:, None])) * rstd[:, None]
        if HAS_DS:
            offs_ds = _row_offsets(rows, n1, n2, stride_ds0, stride_ds1, stride_ds2)[:, None] + cols[None, :]
            ds += tl.load(DS + offs_ds, mask=mask, other=0.).to(tl.float32)
        offs_out = rows.to(tl.int64)[:, None] * C + cols[None, :]
        tl.store(DX + offs_out, ds.to(DX.dtype.element_ty), mask=mask)
        if WRITE_DR:
            tl.store(DR + offs_out, ds.to(DR.dtype.element_ty), mask=mask)
        if HAS_W:
            dw += dh * xhat
        if HAS_B:
            db += dh
    # padded rows and columns hold zeros: they add nothing and are not stored
    if HAS_W:
        tl.store(DW + pid * C + cols, tl.sum(dw, axis=0), mask=cols < C)
    if HAS_B:
        tl.store(DB + pid * C + cols, tl.sum(db, axis=0), mask=cols < C)


# -- host side ------------------------------------------------------------------------------------

# BLOCK_C (C rounded up to a power of two) -> forward (BLOCK_M, num_warps), backward (BLOCK_M,
# num_warps): about 4096 elements per forward program and 2048 per backward program (which holds
# more live tiles, the dweight / dbias sums among them); wide rows take more warps, not more rows.
# Not tuned on hardware yet: tools/bench_norm.py measures them.
_TILES = (
    (64, (64, 4), (32, 4)),
    (128, (32, 4), (16, 4)),
    (256, (16, 4), (8, 4)),
    (512, (8, 4), (4, 4)),
    (1024, (4, 4), (2, 4)),
    (2048, (2, 8), (1, 8)),
    (4096, (1, 8), (1, 8)),
    (MAX_C, (1, 16), (1, 16)),
)
_PROGRAMS_PER_SM = 4  # backward: persistent programs, each with a dweight / dbias partial row
_INTERPRETER_PROGRAMS = 3  # CPU (interpreter): several programs, so the loop and the partial sums are exercised


def _tiles(C: int):
    block_c = 1 << (C - 1).bit_length()  # next power of two; triton.next_power_of_2 costs a microsecond a call
    for limit, fwd, bwd in _TILES:
        if block_c <= limit:
            return block_c, fwd, bwd
    raise AssertionError(f"C={C} exceeds MAX_C={MAX_C}: the probe declines it")


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _max_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return _PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return _INTERPRETER_PROGRAMS


def _unit_last(t: Optional[Tensor]) -> Optional[Tensor]:
    if t is None or t.stride(-1) == 1 or t.shape[-1] == 1:
        return t
    return t.contiguous()


def _spec(tensors, ints, flags) -> tuple:
    # what the kernels specialize on (launch.Launcher): dtypes, integer values, pointer alignment
    bits = 0
    for t in tensors:
        bits |= t.data_ptr()
    return (tuple(t.dtype for t in tensors), ints, flags, bits & 15 == 0)


def _row_layout(tensors: Sequence[Optional[Tensor]]):
    """Rows ``(i0 * n1 + i1) * n2 + i2`` over the leading dims of the same-shaped ``tensors``.

    Returns ``(tensors, n1, n2, strides)``: the tensors (a non-contiguous one copied only when its
    dims need more than three groups), the two inner group sizes and the three group strides of
    every tensor in order (zeros for a None entry). Merging adjacent dims needs every tensor to
    allow it; size-1 dims are dropped.
    """
    present = [t for t in tensors if t is not None]
    shape = present[0].shape
    if all(t.is_contiguous() for t in present):
        row = (shape[-1], 0, 0)
        return tensors, 1, 1, [x for t in tensors for x in (row if t is not None else (0, 0, 0))]
    sizes, strides = [], []  # groups, outermost first; strides[g] holds each tensor's stride
    for dim in range(len(shape) - 1):
        n = shape[dim]
        if n == 1:
            continue
        st = [t.stride(dim) for t in present]
        if sizes and all(prev == s * n for prev, s in zip(strides[-1], st)):
            sizes[-1] *= n
            strides[-1] = st
        else:
            sizes.append(n)
            strides.append(st)
    if len(sizes) > 3:
        return _row_layout([None if t is None else t.contiguous() for t in tensors])
    sizes += [1] * (3 - len(sizes))
    strides += [[0] * len(present)] * (3 - len(strides))
    flat, i = [], 0
    for t in tensors:
        if t is None:
            flat += [0, 0, 0]
        else:
            flat += [strides[g][i] for g in range(3)]
            i += 1
    return tensors, sizes[1], sizes[2], flat


def add_layer_norm_triton_probe(x, residual, weight, bias, *, out_dtype) -> Optional[str]:
    """None when the Triton backend can run the call, otherwise the reason it cannot."""
    if not x.is_cuda:
        if not x.is_cpu:
            return f"needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got device={x.device}"
        if not _interpreting():
            if os.environ.get("TRITON_INTERPRET", "0") == "1":
                return ("CPU tensors need Triton's interpreter, but TRITON_INTERPRET=1 was set after triton was "
                        "imported; set it before the first import")
            return "CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1 before importing triton)"
    for name, t in (("x", x), ("residual", residual), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in _DTYPES:
            return f"supports float16, bfloat16 and float32, got {name}.dtype={t.dtype}"
    if out_dtype not in _DTYPES:
        return f"writes float16, bfloat16 or float32, got out_dtype={out_dtype}"
    if x.shape[-1] > MAX_C:
        return f"holds a row in registers: the last dim must be <= {MAX_C}, got x.shape[-1]={x.shape[-1]}"
    return None


def add_layer_norm_triton_fwd(x, residual, weight, bias, eps: float, out_dtype: torch.dtype):
    """``(h, s, mean, rstd)``; ``s`` is None without a residual. See ``foveal::add_layer_norm_fwd``."""
    C = x.shape[-1]
    (x, residual), n1, n2, strides = _row_layout((_unit_last(x), _unit_last(residual)))
    h = torch.empty_like(x, dtype=out_dtype, memory_format=torch.contiguous_format)
    s = None if residual is None else torch.empty_like(
        x, dtype=torch.promote_types(x.dtype, residual.dtype), memory_format=torch.contiguous_format)
    n_rows = x.numel() // C
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if n_rows:
        block_c, (block_m, num_warps), _ = _tiles(C)
        tensors = (x, x if residual is None else residual, x if weight is None else weight,
                   x if bias is None else bias, h if s is None else s, h, mean, rstd)
        flags = (residual is not None, weight is not None, bias is not None, block_m, block_c, C == block_c)
        _FWD(((n_rows + block_m - 1) // block_m,), (*tensors, n_rows, C, n1, n2, *strides, eps, *flags),
             _spec(tensors, (n_rows, C, n1, n2, *strides), flags), num_warps=num_warps)
    return h, s, mean, rstd


def add_layer_norm_triton_bwd(grad_h, grad_s, s, weight, mean, rstd, x_dtype: torch.dtype,
                              dres_dtype: Optional[torch.dtype], bias_dtype: Optional[torch.dtype]):
    """``(dx, dres, dweight, dbias)``, None where absent. See ``foveal::add_layer_norm_bwd``."""
    C = s.shape[-1]
    (grad_h, grad_s, s), n1, n2, strides = _row_layout((_unit_last(grad_h), _unit_last(grad_s), _unit_last(s)))
    dx = torch.empty_like(s, dtype=x_dtype, memory_format=torch.contiguous_format)
    dres = None if dres_dtype is None else torch.empty_like(s, dtype=dres_dtype, memory_format=torch.contiguous_format)
    n_rows = mean.numel()
    block_c, _, (block_m, num_warps) = _tiles(C)
    programs = min((n_rows + block_m - 1) // block_m, _max_programs(s.device))
    dw = None if weight is None else torch.empty(programs, C, dtype=torch.float32, device=s.device)
    db = None if bias_dtype is None else torch.empty(programs, C, dtype=torch.float32, device=s.device)
    if programs:
        tensors = (grad_h, s if grad_s is None else grad_s, s, s if weight is None else weight, mean, rstd,
                   dx, dx if dres is None else dres, dx if dw is None else dw, dx if db is None else db)
        flags = (grad_s is not None, weight is not None, bias_dtype is not None, dres is not None,
                 block_m, block_c, C == block_c)
        _BWD((programs,), (*tensors, n_rows, C, n1, n2, *strides, *flags),
             _spec(tensors, (n_rows, C, n1, n2, *strides), flags), num_warps=num_warps)
    dweight = None if dw is None else _to(dw.sum(0), weight.dtype)
    dbias = None if db is None else _to(db.sum(0), bias_dtype)
    return dx, dres, dweight, dbias


def _to(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # a no-op .to still costs a microsecond


_FWD = Launcher(_add_ln_fwd)
_BWD = Launcher(_add_ln_bwd)
