"""Additive logit tables for the fused neighborhood-attention kernels.

A program of the Triton kernels pairs a tile of rows (queries in the forward and dQ kernels, keys in
the dK/dV kernel) with the box of columns they need, streamed in blocks of ``BLOCK_N`` slots. Which
(row, column) pairs are neighbors, and their relative-bias index, depend only on where the tile sits
relative to the borders of its dilation group: every interior tile looks the same. Per axis, tiles
fall into a few *classes* (the interior, a few near each border, ragged groups); a class is the
per-axis matrix ``rel[row slot, box slot]`` (``-1`` off the window) plus the box extent. The
product of the per-axis classes gives the classes of the whole tile.

For each class and block this module builds, once per geometry and launch configuration, the flat
relative-bias index of every (row, slot) pair of the block, with a sentinel past the table for pairs
that are masked (off the window, past the box, tail rows). Per call, the kernels receive
``log2(e) * rpb`` gathered through it, with ``-inf`` at the sentinel (or a cached 0 / ``-inf`` table
when there is no bias): one contiguous, vectorized load and one add per logit replace the per-pair
window tests and the bias gather. Tables are small for the tile shapes used (a few classes per axis);
:func:`plan` returns ``None`` when one would exceed ``TABLE_BYTES`` and the kernels fall back to
computing masks in place.
"""
import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch

from .neighborhood_reference import group_windows

__all__ = ["TablePlan", "plan", "logit_values", "bias_table", "table_dtype", "TABLE_BYTES"]

# Upper bound on one call's table (bytes, all heads); above it the kernels compute masks in place.
TABLE_BYTES = 64 << 20


def _query_range(j0: int, j1: int, group_len: int, kernel: int, stride: int, causal: bool):
    # the dK/dV kernel's inverse window rule (inclusive query range of the key tile [j0, j1]),
    # written out identically so the tables match the boxes the kernel iterates over
    if causal:
        lo = j0
        t = j1 + kernel - 1
        hi = ((t - stride + 1) // stride) * stride + stride - 1
        hi = group_len - 1 if group_len - 1 <= t else min(hi, group_len - 1)
    else:
        wl = kernel // 2
        a = j0 - kernel + 1 + wl - stride // 2
        lo = ((a + stride - 1) // stride) * stride if a > 0 else 0
        lo = 0 if j0 - kernel + 1 <= 0 else min(lo, group_len - 1)
        t = j1 + wl
        hi = ((t - stride // 2) // stride) * stride + stride - 1
        hi = group_len - 1 if (j1 >= group_len - kernel or group_len - 1 <= t) else min(hi, group_len - 1)
    return lo, hi


def _axis_classes(length: int, kernel: int, dilation: int, stride: int, causal: bool, tile: int, n_tiles: int,
                  keys_major: bool):
    """Classes of the tiles along one axis.

    Returns ``(ids, mats)``: ``ids[g * n_tiles + t]`` is the class of tile ``t`` of dilation group
    ``g``; ``mats[c]`` is the ``[tile, extent]`` relative index (``-1`` masked) of class ``c``.
    """
    seen, mats, ids = {}, [], []
    slots = torch.arange(tile)
    for g in range(dilation):
        glen = (length - g + dilation - 1) // dilation
        start, end = group_windows(glen, kernel, stride, causal)
        for t in range(n_tiles):
            first, last = min(t * tile, glen - 1), min(t * tile + tile - 1, glen - 1)
            rows = t * tile + slots
            ok = rows < glen
            rows = rows.clamp(max=glen - 1)
            if keys_major:  # rows are keys, the box holds the queries that attend them
                b0, b1 = _query_range(first, last, glen, kernel, stride, causal)
                cols = torch.arange(b0, b1 + 1)
                inwin = (start[cols][None, :] <= rows[:, None]) & (rows[:, None] < end[cols][None, :])
                rel = rows[:, None] - cols[None, :] + kernel - 1
            else:  # rows are queries, the box holds their keys
                cols = torch.arange(int(start[first]), int(end[last]))
                inwin = (start[rows][:, None] <= cols[None, :]) & (cols[None, :] < end[rows][:, None])
                rel = cols[None, :] - rows[:, None] + kernel - 1
            mat = torch.where(inwin & ok[:, None], rel, -1)
            key = (mat.shape[1], mat.numpy().tobytes())
            if key not in seen:
                seen[key] = len(mats)
                mats.append(mat)
            ids.append(seen[key])
    return ids, mats


def _box_slots(extent: tuple, n_it: int, block_n: int, wz: int, ndim: int):
    """Box coordinates ``(lx, ly, lz, valid)`` of the ``n_it * block_n`` slots (the kernels' layout)."""
    ex, ey, ez = extent
    offs = torch.arange(block_n)
    it = torch.arange(n_it)[:, None]
    if wz == 0:
        slot = it * block_n + offs[None, :]
        lz, line = slot % ez, slot // ez
    else:
        n_zseg = -(-ez // wz)
        nl = block_n // wz
        line = (it // n_zseg) * nl + offs[None, :] // wz
        lz = (it % n_zseg) * wz + offs[None, :] % wz
    if ndim == 3:
        lx, ly = line // ey, line % ey
    else:
        lx, ly = torch.zeros_like(line), line
    valid = (line < ex * ey) & (lz < ez)
    return lx.reshape(-1), ly.reshape(-1), lz.reshape(-1), valid.reshape(-1)


def _n_it(extent: tuple, block_n: int, wz: int) -> int:
    ex, ey, ez = extent
    if wz == 0:
        return -(-(ex * ey * ez) // block_n)
    return -(-(ex * ey) // (block_n // wz)) * -(-ez // wz)


@dataclass(frozen=True)
class TablePlan:
    """Per-axis class ids (``cls``, int32, x then y then z) and the flat index table ``index``
    ``[classes, n_it_max, BLOCK_M, BLOCK_N]`` (int64, ``n_rel`` where masked) on the device."""

    cls: torch.Tensor
    n_classes: tuple  # per axis
    index: torch.Tensor
    n_rel: int
    combo_stride: int  # elements per class: n_it_max * BLOCK_M * BLOCK_N
    masks: dict  # dtype -> cached 0 / -inf table (no bias)
    flat_index: torch.Tensor  # index.view(-1), for the per-call gather


@functools.lru_cache(maxsize=256)
def _plan(geo, tile: tuple, n_tiles: tuple, block_n: int, wz: int, keys_major: bool, heads: int, elem: int,
          device: torch.device) -> Optional[TablePlan]:
    axes = [_axis_classes(L, k, d, s, c, t, n, keys_major)
            for L, k, d, s, c, t, n in zip(geo.sizes, geo.kernel, geo.dilation, geo.stride, geo.causal, tile, n_tiles)]
    extents = [[m.shape[1] for m in mats] for _, mats in axes]
    n_combo = math.prod(len(mats) for _, mats in axes)
    block_m = math.prod(tile)
    n_it_max = max(_n_it((ex, ey, ez), block_n, wz) for ex in extents[0] for ey in extents[1] for ez in extents[2])
    if n_combo * n_it_max * block_m * block_n * elem * heads > TABLE_BYTES:
        return None
    rx, ry, rz = (2 * k - 1 for k in geo.kernel)
    n_rel = rx * ry * rz
    m = torch.arange(block_m)
    mx, my, mz = m // (tile[1] * tile[2]), (m // tile[2]) % tile[1], m % tile[2]
    index = torch.full((n_combo, n_it_max, block_m, block_n), n_rel, dtype=torch.long)
    combo = 0
    for cx, matx in enumerate(axes[0][1]):
        for cy, maty in enumerate(axes[1][1]):
            for cz, matz in enumerate(axes[2][1]):
                extent = (matx.shape[1], maty.shape[1], matz.shape[1])
                n_it = _n_it(extent, block_n, wz)
                lx, ly, lz, valid = _box_slots(extent, n_it, block_n, wz, geo.ndim)
                lx, ly, lz = (torch.where(valid, a, 0) for a in (lx, ly, lz))
                ix, iy, iz = matx[mx][:, lx], maty[my][:, ly], matz[mz][:, lz]  # [BLOCK_M, n_it * BLOCK_N]
                ok = valid[None, :] & (ix >= 0) & (iy >= 0) & (iz >= 0)
                flat = torch.where(ok, (ix * ry + iy) * rz + iz, n_rel)
                index[combo, :n_it] = flat.view(block_m, n_it, block_n).transpose(0, 1)
                combo += 1
    cls = torch.tensor([i for ids, _ in axes for i in ids], dtype=torch.int32)
    index = index.to(device)
    return TablePlan(cls=cls.to(device), n_classes=tuple(len(mats) for _, mats in axes), index=index,
                     n_rel=n_rel, combo_stride=n_it_max * block_m * block_n, masks={}, flat_index=index.view(-1))


def plan(geo, cfg, keys_major: bool, heads: int, dtype: torch.dtype, device: torch.device) -> Optional[TablePlan]:
    """The table layout of one launch (cached), or ``None`` when the table would be too large."""
    n_tiles = tuple(-(-g // t) for g, t in zip(geo.group_sizes, cfg.tile))
    elem = dtype.itemsize
    return _plan(geo, tuple(cfg.tile), n_tiles, cfg.block_n, cfg.wz, keys_major, heads, elem, device)


def table_dtype(q_dtype: torch.dtype) -> torch.dtype:
    """Logit terms are stored in the input precision (float32 for float32 inputs)."""
    return torch.float32 if q_dtype == torch.float32 else q_dtype


def logit_values(rpb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[heads, n_rel + 1]``: ``log2(e) * rpb`` flattened, then ``-inf`` (the masked sentinel)."""
    # few small ops: this runs once per call, and models make tens of calls per step
    scaled = (rpb.reshape(rpb.shape[0], -1) * 1.4426950408889634).to(dtype)
    return torch.nn.functional.pad(scaled, (0, 1), value=float("-inf"))


def bias_table(p: TablePlan, values: Optional[torch.Tensor], dtype: torch.dtype):
    """``(table, head_stride)``: the base-2 logit terms of every (row, slot) pair of the plan, from
    :func:`logit_values` (``None``: no bias, a cached 0 / ``-inf`` table shared by the heads)."""
    if values is None:
        table = p.masks.get(dtype)
        if table is None:
            zero = torch.zeros(p.n_rel + 1, dtype=dtype, device=p.index.device)
            zero[-1] = float("-inf")
            table = p.masks[dtype] = zero[p.index]
        return table, 0
    return torch.index_select(values, 1, p.flat_index), p.flat_index.numel()
