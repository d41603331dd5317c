"""Pure-PyTorch reference backend for neighborhood attention (NA / DiNA / GNA, 1-D/2-D/3-D).

Exact (computes in float64 for float64 inputs, float32 otherwise) and memory-bounded: queries are
processed in chunks, each chunk gathers only its own neighbors' keys and values, so the extra
memory of one step is about ``CHUNK_ELEMENTS`` elements per gathered tensor whatever the map size.
The backward recomputes the probabilities from the saved log-sum-exp, chunk by chunk, and
scatters dK, dV and dRPB with ``index_add_`` (deterministic on CPU).

When the window covers every axis (kernel == axis length, not causal) NA is dense attention with a
relative bias; that case skips the gather.

The window rule (SPEC section 1) lives in :func:`axis_windows`; the Triton backend and the tests'
oracle are checked against it.
"""
import math
from typing import Optional, Sequence

import torch

__all__ = ["axis_windows", "lse_dtype", "na_reference_fwd", "na_reference_bwd", "CHUNK_ELEMENTS"]

# Elements per gathered chunk tensor (64 MiB in float32): bounds the reference's extra memory.
CHUNK_ELEMENTS = 1 << 24


def axis_windows(length: int, kernel: int, dilation: int, stride: int, causal: bool, device=None):
    """Neighbors of every query coordinate along one axis.

    Returns:
        nbr: ``[length, kernel]`` int64 key coordinates (slots past a causal window's end repeat a
            valid key and are flagged in ``valid``).
        valid: ``[length, kernel]`` bool.
        rel: ``[length, kernel]`` int64 relative-bias index ``(key - query) / dilation + kernel - 1``.
    """
    i = torch.arange(length, device=device)
    group = i % dilation
    c = i // dilation
    group_len = (length - group + dilation - 1) // dilation
    slots = torch.arange(kernel, device=device)
    if causal:
        leader = torch.minimum((c // stride) * stride + stride - 1, group_len - 1)
        start = (leader - kernel + 1).clamp(min=0)
        end = torch.minimum(c + 1, group_len)
    else:
        leader = torch.minimum((c // stride) * stride + stride // 2, group_len - 1)
        start = torch.minimum((leader - kernel // 2).clamp(min=0), group_len - kernel)
        end = start + kernel
    j = start[:, None] + slots[None, :]
    valid = j < end[:, None]
    j = torch.where(valid, j, start[:, None])
    nbr = j * dilation + group[:, None]
    rel = (nbr - i[:, None]) // dilation + kernel - 1
    return nbr, valid, rel


class _Windows:
    """Per-axis window tables of one call, combined into flat key indices for a query chunk."""

    def __init__(self, spatial, kernel_size, dilation, stride, is_causal, device):
        self.spatial = tuple(spatial)
        self.kernel_size = tuple(kernel_size)
        self.tables = [
            axis_windows(L, k, d, s, c, device)
            for L, k, d, s, c in zip(spatial, kernel_size, dilation, stride, is_causal)
        ]
        self.masked = any(is_causal)
        self.num_keys = math.prod(kernel_size)

    def chunk(self, q_index: torch.Tensor):
        """Flat key index, validity and flat RPB index, each ``[len(q_index), prod(kernel)]``."""
        n = len(self.spatial)
        coords = []
        rest = q_index
        for L in reversed(self.spatial):
            coords.append(rest % L)
            rest = rest // L
        coords.reverse()
        key = rel = valid = None
        for a, ((nbr, val, rl), k, L) in enumerate(zip(self.tables, self.kernel_size, self.spatial)):
            shape = [q_index.numel()] + [1] * n
            shape[1 + a] = k
            key_a = nbr[coords[a]].view(shape)
            rel_a = rl[coords[a]].view(shape)
            val_a = val[coords[a]].view(shape)
            key = key_a if key is None else key * L + key_a
            rel = rel_a if rel is None else rel * (2 * k - 1) + rel_a
            valid = val_a if valid is None else valid & val_a
        nq = q_index.numel()
        return key.reshape(nq, -1), valid.reshape(nq, -1), rel.reshape(nq, -1)


def _is_dense(spatial, kernel_size, is_causal) -> bool:
    return not any(is_causal) and tuple(spatial) == tuple(kernel_size)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved/returned log-sum-exp for inputs of ``dtype`` (every backend uses it)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``[B, *spatial, h, D]`` -> ``[B, N, h, D]`` (a view whenever the strides allow it)."""
    return x.reshape(x.shape[0], -1, x.shape[-2], x.shape[-1])


def _chunk_size(batch: int, keys: int, heads: int, head_dim: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, batch * keys * heads * max(head_dim, 1)))


def _dense_rel(spatial, kernel_size, device) -> torch.Tensor:
    """``[N, N]`` flat RPB index of every (query, key) pair when the window is the whole map."""
    rel = None
    for L, k in zip(spatial, kernel_size):
        i = torch.arange(L, device=device)
        rel_a = i[None, :] - i[:, None] + k - 1
        rel = rel_a if rel is None else (rel[:, None, :, None] * (2 * k - 1) + rel_a[None, :, None, :]).flatten(0, 1).flatten(1, 2)
    return rel


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
    spatial = q.shape[1:-2]
    B, heads, Dv = q.shape[0], q.shape[-2], v.shape[-1]
    cd = _compute_dtype(q.dtype)
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    N = qf.shape[1]
    out = torch.empty(B, N, heads, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, N, heads, dtype=lse_dtype(q.dtype), device=q.device)
    rpb_flat = None if rpb is None else rpb.reshape(heads, -1).to(cd)
    dense = _is_dense(spatial, kernel_size, is_causal)
    if dense:
        kd, vd = kf.to(cd), vf.to(cd)
        rel_all = None if rpb is None else _dense_rel(spatial, kernel_size, q.device)
        step = _chunk_size(B, N, heads, 1)
    else:
        win = _Windows(spatial, kernel_size, dilation, stride, is_causal, q.device)
        step = _chunk_size(B, win.num_keys, heads, max(q.shape[-1], Dv))
    for s0 in range(0, N, step):
        s1 = min(N, s0 + step)
        qc = qf[:, s0:s1].to(cd) * scale
        if dense:
            logits = torch.einsum("bqhd,bkhd->bqhk", qc, kd)
            if rpb_flat is not None:
                logits = logits + rpb_flat[:, rel_all[s0:s1]].transpose(0, 1)
        else:
            key, valid, rel = win.chunk(torch.arange(s0, s1, device=q.device))
            kg, vg = kf[:, key].to(cd), vf[:, key].to(cd)
            logits = torch.einsum("bqhd,bqkhd->bqhk", qc, kg)
            if rpb_flat is not None:
                logits = logits + rpb_flat[:, rel].transpose(0, 1)
            if win.masked:
                logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
        m = torch.logsumexp(logits, dim=-1)
        p = torch.exp(logits - m[..., None])
        if dense:
            out[:, s0:s1] = torch.einsum("bqhk,bkhd->bqhd", p, vd).to(q.dtype)
        else:
            out[:, s0:s1] = torch.einsum("bqhk,bqkhd->bqhd", p, vg).to(q.dtype)
        lse[:, s0:s1] = m
    return out.view(*q.shape[:-1], Dv), lse.view(q.shape[:-1])


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
    spatial = q.shape[1:-2]
    B, heads, D, Dv = q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1]
    cd = _compute_dtype(q.dtype)
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    dof, of, lsef = _flat(grad_out), _flat(out), lse.reshape(B, -1, heads)
    glsef = None if grad_lse is None else grad_lse.reshape(B, -1, heads)
    N = qf.shape[1]
    dq = torch.empty(B, N, heads, D, dtype=q.dtype, device=q.device)
    dk = torch.zeros(B, N, heads, D, dtype=cd, device=q.device)
    dv = torch.zeros(B, N, heads, Dv, dtype=cd, device=q.device)
    rpb_flat = None if rpb is None else rpb.reshape(heads, -1).to(cd)
    drpb = None if rpb is None else torch.zeros_like(rpb_flat)
    dense = _is_dense(spatial, kernel_size, is_causal)
    if dense:
        kd, vd = kf.to(cd), vf.to(cd)
        rel_all = None if rpb is None else _dense_rel(spatial, kernel_size, q.device)
        step = _chunk_size(B, N, heads, 1)
    else:
        win = _Windows(spatial, kernel_size, dilation, stride, is_causal, q.device)
        step = _chunk_size(B, win.num_keys, heads, max(D, Dv))
    for s0 in range(0, N, step):
        s1 = min(N, s0 + step)
        qc = qf[:, s0:s1].to(cd)
        doc = dof[:, s0:s1].to(cd)
        delta = (doc * of[:, s0:s1].to(cd)).sum(-1)
        if glsef is not None:
            delta = delta - glsef[:, s0:s1].to(cd)
        if dense:
            logits = torch.einsum("bqhd,bkhd->bqhk", qc * scale, kd)
            if rpb_flat is not None:
                rel = rel_all[s0:s1]
                logits = logits + rpb_flat[:, rel].transpose(0, 1)
            p = torch.exp(logits - lsef[:, s0:s1, :, None].to(cd))
            dp = torch.einsum("bqhd,bkhd->bqhk", doc, vd)
            ds = p * (dp - delta[..., None])
            dq[:, s0:s1] = (torch.einsum("bqhk,bkhd->bqhd", ds, kd) * scale).to(q.dtype)
            dk += torch.einsum("bqhk,bqhd->bkhd", ds, qc) * scale
            dv += torch.einsum("bqhk,bqhd->bkhd", p, doc)
        else:
            key, valid, rel = win.chunk(torch.arange(s0, s1, device=q.device))
            kg, vg = kf[:, key].to(cd), vf[:, key].to(cd)
            logits = torch.einsum("bqhd,bqkhd->bqhk", qc * scale, kg)
            if rpb_flat is not None:
                logits = logits + rpb_flat[:, rel].transpose(0, 1)
            if win.masked:
                logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
            p = torch.exp(logits - lsef[:, s0:s1, :, None].to(cd))
            dp = torch.einsum("bqhd,bqkhd->bqhk", doc, vg)
            ds = p * (dp - delta[..., None])
            dq[:, s0:s1] = (torch.einsum("bqhk,bqkhd->bqhd", ds, kg) * scale).to(q.dtype)
            nk = key.numel()
            dk.index_add_(1, key.reshape(-1), torch.einsum("bqhk,bqhd->bqkhd", ds, qc).reshape(B, nk, heads, D), alpha=scale)
            dv.index_add_(1, key.reshape(-1), torch.einsum("bqhk,bqhd->bqkhd", p, doc).reshape(B, nk, heads, Dv))
        if drpb is not None:
            drpb.index_add_(1, rel.reshape(-1), ds.sum(0).transpose(0, 1).reshape(heads, -1))
    dq = dq.view(q.shape)
    dk = dk.to(k.dtype).view(k.shape)
    dv = dv.to(v.dtype).view(v.shape)
    if drpb is not None:
        drpb = drpb.to(rpb.dtype).view(rpb.shape)
    return dq, dk, dv, drpb
