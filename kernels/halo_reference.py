"""Pure-PyTorch reference backend for halo attention (SPEC section 2).

Exact (float64 math for float64 inputs, float32 otherwise) and memory-bounded: the query blocks
are processed a few block rows at a time, each step viewing only the key windows of those rows
(``CHUNK_ELEMENTS`` logits per step, whatever the map size). The backward recomputes the
probabilities of each step from the saved log-sum-exp and folds the window gradients back into the
padded key / value maps (``F.fold``), so overlapping windows (the halos) accumulate exactly.

Window geometry, shared with the Triton backend and the tests' brute-force oracle: the key map
``[H, W]`` is cut into ``b x b`` blocks; the queries ``[H / s, W / s]`` (``s`` the query stride)
into ``(b / s) x (b / s)`` blocks; query block ``(by, bx)`` attends to the ``win x win`` window of
key coordinates ``[by * b - h, by * b + b + h) x [bx * b - h, bx * b + b + h)``, ``win = b + 2h``.
Window positions outside the map hold zero keys and values and are *not* masked. The positional
logit of query ``(qy, qx)`` (its coordinates inside its block) and window position ``(ky, kx)``
is ``<q, rel_h[ky - qy + win - 1]> + <q, rel_w[kx - qx + win - 1]>`` (timm's ``PosEmbedRel``).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .neighborhood_reference import lse_dtype

__all__ = ["halo_reference_fwd", "halo_reference_bwd", "rel_index", "CHUNK_ELEMENTS"]

CHUNK_ELEMENTS = 1 << 22


def rel_index(query_block: int, win: int, device=None) -> Tensor:
    """``[query_block, win]`` int64 row of ``rel_h`` / ``rel_w`` for (query coordinate in its block,
    window coordinate): ``key - query + win - 1``."""
    qi = torch.arange(query_block, device=device)
    kj = torch.arange(win, device=device)
    return kj[None, :] - qi[:, None] + win - 1


def _rows_per_step(B: int, heads: int, nbx: int, queries: int, keys: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, B * heads * nbx * queries * keys))


def _to_blocks(t: Tensor, bq: int) -> Tensor:
    """``[B, nr*bq, nbx*bq, h, D]`` -> ``[B, nr, nbx, h, bq*bq, D]`` (queries of a block, row-major)."""
    B, rows, cols, heads, D = t.shape
    t = t.reshape(B, rows // bq, bq, cols // bq, bq, heads, D).permute(0, 1, 3, 5, 2, 4, 6)
    return t.reshape(B, rows // bq, cols // bq, heads, bq * bq, D)


def _from_blocks(t: Tensor, bq: int) -> Tensor:
    """The inverse of :func:`_to_blocks` (trailing dims after the query axis kept)."""
    B, nr, nbx, heads, _ = t.shape[:5]
    rest = t.shape[5:]
    t = t.reshape(B, nr, nbx, heads, bq, bq, *rest).permute(0, 1, 4, 2, 5, 3, *range(6, 6 + len(rest)))
    return t.reshape(B, nr * bq, nbx * bq, heads, *rest)


def _query_blocks(t: Tensor, bq: int) -> Tensor:
    """``[B, nr*bq, nbx*bq, h]`` per-query values -> ``[B, nr, nbx, h, bq*bq]``."""
    return _to_blocks(t[..., None], bq)[..., 0]


def _windows(t: Tensor, b: int, win: int) -> Tensor:
    """Padded rows ``[B, nr*b + 2h, W + 2h, h, D]`` -> windows ``[B, nr, nbx, h, D, win*win]`` (a view)."""
    return t.unfold(1, win, b).unfold(2, win, b).flatten(-2)


def _fold_windows(w: Tensor, b: int, win: int, rows: int, cols: int) -> Tensor:
    """Adjoint of :func:`_windows`: sums window gradients ``[B, nr, nbx, h, D, win*win]`` into the
    padded rows ``[B, rows, cols, h, D]`` (overlapping halos add up)."""
    B, nr, nbx, heads, D, _ = w.shape
    cols_ = w.permute(0, 3, 4, 5, 1, 2).reshape(B, heads * D * win * win, nr * nbx)
    out = torch.nn.functional.fold(cols_, (rows, cols), win, stride=b)  # B, h*D, rows, cols
    return out.reshape(B, heads, D, rows, cols).permute(0, 3, 4, 1, 2)


def _logits(q, kw, rel_h, rel_w, bq: int, win: int, scale: float, scale_rel: bool):
    """Logits ``[B, nr, nbx, h, bq*bq, win*win]`` of blocked queries against their windows."""
    logits = torch.matmul(q, kw) * scale
    if rel_h is not None:
        idx = rel_index(bq, win, q.device)
        lead = q.shape[:-2] + (bq, bq)
        qrh = torch.matmul(q, rel_h.t()).unflatten(-2, (bq, bq))  # ..., qy, qx, 2win-1
        qrw = torch.matmul(q, rel_w.t()).unflatten(-2, (bq, bq))
        pos_h = torch.gather(qrh, -1, idx[:, None, :].expand(*lead, win))  # ..., qy, qx, ky
        pos_w = torch.gather(qrw, -1, idx[None, :, :].expand(*lead, win))  # ..., qy, qx, kx
        pos = (pos_h[..., :, None] + pos_w[..., None, :]).flatten(-2).flatten(-3, -2)
        logits = logits + (pos * scale if scale_rel else pos)
    return logits


def _padded(t: Tensor, halo_size: int, dtype: torch.dtype) -> Tensor:
    return F.pad(t.to(dtype), (0, 0, 0, 0, halo_size, halo_size, halo_size, halo_size))


def halo_reference_fwd(q, k, v, rel_h, rel_w, block_size: int, halo_size: int, stride: int, scale: float,
                       scale_rel: bool):
    """``(out, lse)``; see ``foveal::halo_fwd``."""
    compute = lse_dtype(q.dtype)
    b, hs, bq = block_size, halo_size, block_size // stride
    win = b + 2 * hs
    B, H, W, heads, _ = k.shape
    kp, vp = _padded(k, hs, compute), _padded(v, hs, compute)
    qc = q.to(compute)
    rh = None if rel_h is None else rel_h.to(compute)
    rw = None if rel_w is None else rel_w.to(compute)
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    lse = q.new_empty(q.shape[:-1], dtype=compute)
    nby, nbx = H // b, W // b
    step = _rows_per_step(B, heads, nbx, bq * bq, win * win)
    for r0 in range(0, nby, step):
        r1 = min(nby, r0 + step)
        qs, ks = slice(r0 * bq, r1 * bq), slice(r0 * b, r1 * b + 2 * hs)
        logits = _logits(_to_blocks(qc[:, qs], bq), _windows(kp[:, ks], b, win), rh, rw, bq, win, scale, scale_rel)
        m = torch.logsumexp(logits, dim=-1)
        o = torch.matmul(torch.exp(logits - m[..., None]), _windows(vp[:, ks], b, win).transpose(-1, -2))
        out[:, qs] = _from_blocks(o, bq)
        lse[:, qs] = _from_blocks(m, bq)
    return out, lse


def halo_reference_bwd(grad_out, q, k, v, rel_h, rel_w, out, lse, grad_lse, block_size: int, halo_size: int,
                       stride: int, scale: float, scale_rel: bool):
    """``(dq, dk, dv, drel_h, drel_w)`` (``None`` for absent tables); see ``foveal::halo_bwd``.

    Per step: ``P = exp(S - lse)``, ``dV = P^T dO``, ``dS = P * (dO V^T - delta)`` with ``delta =
    rowsum(dO * O) - dLSE``, ``dQ = scale dS K + c (dR_h rel_h + dR_w rel_w)``, ``dK = scale dS^T Q``;
    ``dR_h`` / ``dR_w`` sum ``c dS`` over the other window axis into each query's table rows.
    """
    compute = lse_dtype(q.dtype)
    b, hs, bq = block_size, halo_size, block_size // stride
    win = b + 2 * hs
    B, H, W, heads, _ = k.shape
    kp, vp = _padded(k, hs, compute), _padded(v, hs, compute)
    qc = q.to(compute)
    has_rel = rel_h is not None
    rh = rel_h.to(compute) if has_rel else None
    rw = rel_w.to(compute) if has_rel else None
    dq = torch.empty_like(qc)
    dkp, dvp = torch.zeros_like(kp), torch.zeros_like(vp)
    drh = torch.zeros_like(rh) if has_rel else None
    drw = torch.zeros_like(rw) if has_rel else None
    go = grad_out.to(compute)
    delta = (go * out.to(compute)).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.to(compute)
    idx = rel_index(bq, win, q.device)
    nby, nbx = H // b, W // b
    step = _rows_per_step(B, heads, nbx, bq * bq, win * win)
    for r0 in range(0, nby, step):
        r1 = min(nby, r0 + step)
        qs, ks = slice(r0 * bq, r1 * bq), slice(r0 * b, r1 * b + 2 * hs)
        qb = _to_blocks(qc[:, qs], bq)
        kw, vw = _windows(kp[:, ks], b, win), _windows(vp[:, ks], b, win)
        p = torch.exp(_logits(qb, kw, rh, rw, bq, win, scale, scale_rel) - _query_blocks(lse[:, qs], bq)[..., None])
        gob = _to_blocks(go[:, qs], bq)
        ds = p * (torch.matmul(gob, vw) - _query_blocks(delta[:, qs], bq)[..., None])
        dvw = torch.matmul(gob.transpose(-1, -2), p)  # ..., Dv, win*win
        dkw = torch.matmul(qb.transpose(-1, -2), ds) * scale  # ..., D, win*win
        dqb = torch.matmul(ds, kw.transpose(-1, -2)) * scale
        if has_rel:
            dpos = (ds * scale if scale_rel else ds).unflatten(-1, (win, win)).unflatten(-3, (bq, bq))
            lead = dpos.shape[:-2]  # ..., qy, qx
            dqrh = torch.zeros(*lead, 2 * win - 1, dtype=compute, device=q.device)
            dqrw = torch.zeros_like(dqrh)
            dqrh.scatter_add_(-1, idx[:, None, :].expand(*lead, win), dpos.sum(-1))
            dqrw.scatter_add_(-1, idx[None, :, :].expand(*lead, win), dpos.sum(-2))
            dqrh, dqrw = dqrh.flatten(-3, -2), dqrw.flatten(-3, -2)  # ..., bq*bq, 2win-1
            dqb = dqb + torch.matmul(dqrh, rh) + torch.matmul(dqrw, rw)
            drh += torch.einsum("...mr,...md->rd", dqrh, qb)
            drw += torch.einsum("...mr,...md->rd", dqrw, qb)
        dq[:, qs] = _from_blocks(dqb, bq)
        rows, cols = kp[:, ks].shape[1:3]
        dkp[:, ks] += _fold_windows(dkw, b, win, rows, cols)
        dvp[:, ks] += _fold_windows(dvw, b, win, rows, cols)
    crop = (slice(None), slice(hs, hs + H), slice(hs, hs + W))
    dk, dv = dkp[crop].to(k.dtype), dvp[crop].to(v.dtype)
    if has_rel:
        drh, drw = drh.to(rel_h.dtype), drw.to(rel_w.dtype)
    return dq.to(q.dtype), dk, dv, drh, drw

