"""Pure-PyTorch reference backend for routed block-sparse attention (SPEC section 3).

Exact (float64 math for float64 inputs, float32 otherwise) and memory-bounded: query regions are
processed a few at a time, and only the key regions routed to those few are gathered
(``CHUNK_ELEMENTS`` logits per step, whatever the map size or top-k). The backward recomputes the
probabilities of each step from the saved log-sum-exp and scatters the key / value gradients back
onto their regions (``index_add_``), so a region routed to by many query regions accumulates
exactly.

Layout, shared with the Triton backend and the tests' brute-force oracle: tokens are region-major,
``[B, R, T, heads, head_dim]``; query region ``r`` of batch element ``b`` attends to the
concatenated tokens of key regions ``indices[b, r, 0], ..., indices[b, r, topk - 1]`` (in that
order; duplicates count twice), or to every region in order when ``indices`` is None.
"""
from typing import Optional

import torch
from torch import Tensor

from .neighborhood_reference import lse_dtype

__all__ = ["routing_reference_fwd", "routing_reference_bwd", "CHUNK_ELEMENTS"]

CHUNK_ELEMENTS = 1 << 22


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _regions_per_step(q: Tensor, keys: int) -> int:
    B, _, T, heads, _ = q.shape
    return max(1, CHUNK_ELEMENTS // max(1, B * T * heads * keys))


def _routed(t: Tensor, idx: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """Keys (or values) of the routed regions, ``[B, r, K * T, heads, D]`` (``r = 1`` when dense)."""
    B, R, T, heads, D = t.shape
    if idx is None:
        return t.reshape(B, 1, R * T, heads, D).to(dtype)
    batch = torch.arange(B, device=t.device)[:, None, None]
    sel = t[batch, idx]  # [B, r, K, T, heads, D]
    return sel.reshape(B, idx.shape[1], idx.shape[2] * T, heads, D).to(dtype)


def _steps(q: Tensor, k: Tensor, indices: Optional[Tensor]):
    R = q.shape[1]
    topk = R if indices is None else indices.shape[-1]
    step = _regions_per_step(q, topk * k.shape[2])
    for r0 in range(0, R, step):
        r1 = min(R, r0 + step)
        yield r0, r1, None if indices is None else indices[:, r0:r1].long()


def routing_reference_fwd(q: Tensor, k: Tensor, v: Tensor, indices: Optional[Tensor], scale: float):
    """``(out [B, R, T, heads, Dv], lse [B, R, T, heads])`` of :func:`foveal.kernels.routed_attention`."""
    dtype = _math_dtype(q.dtype)
    B, R, T, heads, _ = q.shape
    out = q.new_empty(B, R, T, heads, v.shape[-1])
    lse = q.new_empty(B, R, T, heads, dtype=lse_dtype(q.dtype))
    for r0, r1, idx in _steps(q, k, indices):
        qc = q[:, r0:r1].to(dtype)
        kc, vc = _routed(k, idx, dtype), _routed(v, idx, dtype)
        s = torch.einsum("brqhd,brkhd->brhqk", qc, kc) * scale
        m = torch.logsumexp(s, dim=-1)  # [B, r, heads, T]
        p = torch.exp(s - m[..., None])
        out[:, r0:r1] = torch.einsum("brhqk,brkhe->brqhe", p, vc).to(out.dtype)
        lse[:, r0:r1] = m.transpose(-1, -2).to(lse.dtype)
    return out, lse


def _scatter(grad: Tensor, idx: Optional[Tensor], full: Tensor) -> None:
    """Adds routed-region gradients ``[B, r, K * T, heads, D]`` onto ``full`` ``[B, R, T, heads, D]``."""
    B, R, T, heads, D = full.shape
    if idx is None:
        full += grad.reshape(B, -1, R, T, heads, D).sum(1)
        return
    flat = (idx + torch.arange(B, device=idx.device)[:, None, None] * R).reshape(-1)
    full.view(B * R, T, heads, D).index_add_(0, flat, grad.reshape(-1, T, heads, D))


def routing_reference_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, indices: Optional[Tensor],
                          out: Tensor, lse: Tensor, grad_lse: Optional[Tensor], scale: float):
    """``(dq, dk, dv)`` of :func:`routing_reference_fwd`; ``grad_lse`` (or None) is the gradient of ``lse``."""
    dtype = _math_dtype(q.dtype)
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=dtype, device=v.device)
    for r0, r1, idx in _steps(q, k, indices):
        qc, do = q[:, r0:r1].to(dtype), grad_out[:, r0:r1].to(dtype)
        kc, vc = _routed(k, idx, dtype), _routed(v, idx, dtype)
        m = lse[:, r0:r1].to(dtype).transpose(-1, -2)  # [B, r, heads, T]
        p = torch.exp(torch.einsum("brqhd,brkhd->brhqk", qc, kc) * scale - m[..., None])
        _scatter(torch.einsum("brhqk,brqhe->brkhe", p, do), idx, dv)
        dp = torch.einsum("brqhe,brkhe->brhqk", do, vc)
        delta = (do * out[:, r0:r1].to(dtype)).sum(-1).transpose(-1, -2)  # [B, r, heads, T]
        if grad_lse is not None:
            delta = delta - grad_lse[:, r0:r1].to(dtype).transpose(-1, -2)
        ds = p * (dp - delta[..., None]) * scale
        dq[:, r0:r1] = torch.einsum("brhqk,brkhd->brqhd", ds, kc).to(dq.dtype)
        _scatter(torch.einsum("brhqk,brqhd->brkhd", ds, qc), idx, dk)
    return dq, dk.to(k.dtype), dv.to(v.dtype)
