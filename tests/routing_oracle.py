"""Brute-force routed-attention oracle, written straight from SPEC section 3 and the gather formulation.

Gathers the routed key / value regions of every query region (the top-k-fold copy the op avoids),
then runs a dense softmax per head in float64. Small sizes only.
"""
import torch


def oracle(q, k, v, indices, scale=None):
    """q ``[B, R, T, h, D]``, k ``[B, R, Tk, h, D]``, v ``[B, R, Tk, h, Dv]``, indices ``[B, R, topk]``
    or None (all regions); returns ``(out, lse)`` in float64, differentiable in q, k, v."""
    q, k, v = q.double(), k.double(), v.double()
    B, R, T, heads, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    outs, lses = [], []
    for b in range(B):
        for r in range(R):
            regions = range(R) if indices is None else [int(i) for i in indices[b, r]]
            keys = torch.cat([k[b, g] for g in regions], 0)  # [topk * Tk, h, D]
            vals = torch.cat([v[b, g] for g in regions], 0)
            logits = torch.einsum("qhd,khd->hqk", q[b, r], keys) * scale
            lse = torch.logsumexp(logits, -1)
            outs.append(torch.einsum("hqk,khe->qhe", torch.softmax(logits, -1), vals))
            lses.append(lse.transpose(0, 1))
    out = torch.stack(outs).reshape(B, R, T, heads, v.shape[-1])
    return out, torch.stack(lses).reshape(B, R, T, heads)
