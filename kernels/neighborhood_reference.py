"""Pure-PyTorch reference backend for neighborhood attention (NA / DiNA / GNA, 1-D/2-D/3-D).

Exact (float64 math for float64 inputs, float32 otherwise) and memory-bounded. It is organised
like the fused kernel:

- Dilation: DiNA with dilation ``d`` is plain NA run independently on each interleaved sub-grid
  ``x[g0::d0, g1::d1, ...]`` (ragged sub-grids included), so every group is a strided view, never
  a copy.
- Tiles: queries are processed in boxes of the (group) map. Window starts and ends never decrease
  along an axis, so the keys of a query box lie in one box of keys; the tile is dense attention
  of the query box against that key box, with the neighborhood as a mask and the relative bias
  gathered per (query, key) pair. Each step holds about ``CHUNK_ELEMENTS`` logits, whatever the
  map size.
- Backward: recomputes the probabilities from the saved log-sum-exp tile by tile; dK and dV are
  added into their key box, dRPB with ``index_add_`` (deterministic on CPU).

The window rule (SPEC section 1) lives in :func:`group_windows` / :func:`axis_windows`; the
Triton backend and the tests' brute-force oracle are checked against it.
"""
import math
from itertools import product
from typing import Optional, Sequence

import torch

__all__ = ["axis_windows", "group_windows", "lse_dtype", "na_reference_fwd", "na_reference_bwd", "CHUNK_ELEMENTS"]

# Logits (batch x heads x queries x keys) per tile: bounds the reference's extra memory.
CHUNK_ELEMENTS = 1 << 22


def group_windows(group_len: int, kernel: int, stride: int, causal: bool, device=None):
    """``(start, end)``, each ``[group_len]`` int64: the key range ``[start, end)`` of every query of
    one dilation group, in group coordinates. Both are non-decreasing along the axis."""
    c = torch.arange(group_len, device=device)
    if causal:
        leader = torch.clamp((c // stride) * stride + stride - 1, max=group_len - 1)
        start = (leader - kernel + 1).clamp(min=0)
        end = c + 1
    else:
        leader = torch.clamp((c // stride) * stride + stride // 2, max=group_len - 1)
        start = torch.clamp((leader - kernel // 2).clamp(min=0), max=group_len - kernel)
        end = start + kernel
    return start, end


def axis_windows(length: int, kernel: int, dilation: int, stride: int, causal: bool, device=None):
    """Neighbors of every query coordinate along one axis, in map coordinates.

    Returns:
        nbr: ``[length, kernel]`` int64 key coordinates (slots past a causal window's end repeat its
            first key and are flagged in ``valid``).
        valid: ``[length, kernel]`` bool.
        rel: ``[length, kernel]`` int64 relative-bias index ``(key - query) / dilation + kernel - 1``.
    """
    nbr = torch.empty(length, kernel, dtype=torch.long, device=device)
    valid = torch.empty(length, kernel, dtype=torch.bool, device=device)
    slots = torch.arange(kernel, device=device)
    for g in range(dilation):
        group_len = (length - g + dilation - 1) // dilation
        start, end = group_windows(group_len, kernel, stride, causal, device)
        j = start[:, None] + slots
        ok = j < end[:, None]
        nbr[g::dilation] = torch.where(ok, j, start[:, None]) * dilation + g
        valid[g::dilation] = ok
    rel = (nbr - torch.arange(length, device=device)[:, None]) // dilation + kernel - 1
    return nbr, valid, rel


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved/returned log-sum-exp for inputs of ``dtype`` (every backend uses it)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Plan:
    """Dilation groups and query tiles of one call, with each tile's key box, mask and bias index."""

    def __init__(self, spatial, kernel_size, dilation, stride, is_causal, batch, heads, device):
        self.n = len(spatial)
        self.spatial, self.kernel_size, self.dilation = tuple(spatial), tuple(kernel_size), tuple(dilation)
        self.stride, self.is_causal, self.device = tuple(stride), tuple(is_causal), device
        self.batch, self.heads = batch, heads
        self._windows = {}

    def _axis(self, a: int, group_len: int):
        key = (a, group_len)
        if key not in self._windows:
            self._windows[key] = group_windows(group_len, self.kernel_size[a], self.stride[a], self.is_causal[a], self.device)
        return self._windows[key]

    def _tile_extents(self, group_lens):
        """Query-box extent per axis (about twice the kernel, shrunk until one batch element's
        logits fit the budget) and the number of batch elements per step."""
        tile = [min(g, 2 * k) for g, k in zip(group_lens, self.kernel_size)]

        def elements(t):
            keys = math.prod(min(g, x + k - 1 + s) for x, g, k, s in zip(t, group_lens, self.kernel_size, self.stride))
            return self.heads * math.prod(t) * keys

        while elements(tile) > CHUNK_ELEMENTS and max(tile) > 1:
            a = max(range(self.n), key=lambda i: tile[i])
            tile[a] = (tile[a] + 1) // 2
        return tile, max(1, min(self.batch, CHUNK_ELEMENTS // elements(tile)))

    def groups(self):
        """Yields ``(slices, group_lens)``: a batch slice of one dilation group's strided view
        (``[batch, *spatial]`` slices) and the group's shape."""
        for g in product(*[range(d) for d in self.dilation]):
            lens = tuple((L - gi + d - 1) // d for L, gi, d in zip(self.spatial, g, self.dilation))
            step = self._tile_extents(lens)[1]
            for b0 in range(0, self.batch, step):
                yield (slice(b0, b0 + step),) + tuple(slice(gi, None, d) for gi, d in zip(g, self.dilation)), lens

    def tiles(self, group_lens):
        """Yields ``(q_slices, k_slices, mask [nq, nk] or None, rel [nq, nk])`` in group coordinates."""
        tile = self._tile_extents(group_lens)[0]
        for origin in product(*[range(0, g, t) for g, t in zip(group_lens, tile)]):
            q_sl, k_sl, masks, rels = [], [], [], []
            for a, (c0, t, g) in enumerate(zip(origin, tile, group_lens)):
                start, end = self._axis(a, g)
                c1 = min(g, c0 + t)
                j0, j1 = int(start[c0]), int(end[c1 - 1])
                q_sl.append(slice(c0, c1))
                k_sl.append(slice(j0, j1))
                j = torch.arange(j0, j1, device=self.device)
                masks.append((j >= start[c0:c1, None]) & (j < end[c0:c1, None]))
                rels.append(j - torch.arange(c0, c1, device=self.device)[:, None] + self.kernel_size[a] - 1)
            mask = rel = None
            for a in range(self.n):
                shape = [1] * (2 * self.n)
                shape[a], shape[self.n + a] = masks[a].shape
                m_a = masks[a].view(shape)
                r_a = rels[a].clamp(0, 2 * self.kernel_size[a] - 2).view(shape)
                mask = m_a if mask is None else mask & m_a
                rel = r_a if rel is None else rel * (2 * self.kernel_size[a] - 1) + r_a
            nq = math.prod(s.stop - s.start for s in q_sl)
            mask, rel = mask.reshape(nq, -1), rel.reshape(nq, -1)
            yield tuple(q_sl), tuple(k_sl), (None if bool(mask.all()) else mask), rel


def _rows(x: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    """``[B, *box, h, D]`` -> contiguous ``[B, h, n, D]`` in the compute dtype (one copy; batched
    matmuls on contiguous operands run about 3x faster on CPU than on strided ones)."""
    heads_first = x.movedim(-2, 1)
    return heads_first.to(cd, memory_format=torch.contiguous_format).reshape(x.shape[0], x.shape[-2], -1, x.shape[-1])


def _logits(qt, kt, scale, rpb_flat, rel, mask):
    logits = torch.matmul(qt * scale, kt.transpose(-1, -2))  # [B, h, nq, nk]
    if rpb_flat is not None:
        logits = logits + rpb_flat[:, rel]
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return logits


def na_reference_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rpb: Optional[torch.Tensor],
    kernel_size: Sequence[int],
    dilation: Sequence[int],
    stride: Sequence[int],
    is_causal: Sequence[bool],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out [B, *spatial, h, Dv] in q.dtype, lse [B, *spatial, h])``.

    ``lse`` is float64 for float64 inputs and float32 otherwise (see :func:`lse_dtype`).
    """
    B, heads, Dv = q.shape[0], q.shape[-2], v.shape[-1]
    cd = _compute_dtype(q.dtype)
    out = q.new_empty(*q.shape[:-1], Dv)
    lse = q.new_empty(q.shape[:-1], dtype=lse_dtype(q.dtype))
    rpb_flat = None if rpb is None else rpb.reshape(heads, -1).to(cd)
    plan = _Plan(q.shape[1:-2], kernel_size, dilation, stride, is_causal, B, heads, q.device)
    for sel, lens in plan.groups():
        qg, kg, vg, og, lg = q[sel], k[sel], v[sel], out[sel], lse[sel]
        for q_sl, k_sl, mask, rel in plan.tiles(lens):
            qi, ki = (slice(None),) + q_sl, (slice(None),) + k_sl
            logits = _logits(_rows(qg[qi], cd), _rows(kg[ki], cd), scale, rpb_flat, rel, mask)
            m = torch.logsumexp(logits, dim=-1)  # [B, h, nq]
            o = torch.matmul(torch.exp(logits - m[..., None]), _rows(vg[ki], cd))  # [B, h, nq, Dv]
            box = og[qi].shape
            og[qi] = o.transpose(1, 2).reshape(box).to(q.dtype)
            lg[qi] = m.transpose(1, 2).reshape(box[:-1]).to(lse.dtype)
    return out, lse


def na_reference_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rpb: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: Optional[torch.Tensor],
    kernel_size: Sequence[int],
    dilation: Sequence[int],
    stride: Sequence[int],
    is_causal: Sequence[bool],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Returns ``(dq, dk, dv, drpb)``; ``drpb`` is None when ``rpb`` is None.

    ``grad_lse`` (optional, the gradient reaching the returned log-sum-exp) enters through
    ``delta = rowsum(dO * O) - dLSE``, since d lse / d logit = p.
    """
    B, heads = q.shape[0], q.shape[-2]
    cd = _compute_dtype(q.dtype)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.zeros(k.shape, dtype=cd, device=k.device)
    dv = torch.zeros(v.shape, dtype=cd, device=v.device)
    rpb_flat = None if rpb is None else rpb.reshape(heads, -1).to(cd)
    drpb = None if rpb is None else torch.zeros_like(rpb_flat)
    delta = (grad_out.to(cd) * out.to(cd)).sum(-1)  # [B, *spatial, h]
    if grad_lse is not None:
        delta = delta - grad_lse.to(cd)
    plan = _Plan(q.shape[1:-2], kernel_size, dilation, stride, is_causal, B, heads, q.device)
    for sel, lens in plan.groups():
        qg, kg, vg, dog, lg, deltag = q[sel], k[sel], v[sel], grad_out[sel], lse[sel], delta[sel]
        dqg, dkg, dvg = dq[sel], dk[sel], dv[sel]
        for q_sl, k_sl, mask, rel in plan.tiles(lens):
            qi, ki = (slice(None),) + q_sl, (slice(None),) + k_sl
            qt, kt, vt, dot = _rows(qg[qi], cd), _rows(kg[ki], cd), _rows(vg[ki], cd), _rows(dog[qi], cd)
            m = lg[qi].reshape(qg.shape[0], -1, heads).transpose(1, 2).to(cd)
            dl = deltag[qi].reshape(qg.shape[0], -1, heads).transpose(1, 2)
            p = torch.exp(_logits(qt, kt, scale, rpb_flat, rel, mask) - m[..., None])  # [B, h, nq, nk]
            ds = p * (torch.matmul(dot, vt.transpose(-1, -2)) - dl[..., None])
            box_q, box_k = dqg[qi].shape, dkg[ki].shape
            dqg[qi] = (torch.matmul(ds, kt) * scale).transpose(1, 2).reshape(box_q).to(q.dtype)
            dkg[ki] += (torch.matmul(ds.transpose(-1, -2), qt) * scale).transpose(1, 2).reshape(box_k)
            dvg[ki] += torch.matmul(p.transpose(-1, -2), dot).transpose(1, 2).reshape(dvg[ki].shape)
            if drpb is not None:
                drpb.index_add_(1, rel.reshape(-1), ds.sum(0).reshape(heads, -1))
    dk, dv = dk.to(k.dtype), dv.to(v.dtype)
    if drpb is not None:
        drpb = drpb.to(rpb.dtype).view(rpb.shape)
    return dq, dk, dv, drpb
