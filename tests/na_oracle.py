"""Brute-force neighborhood attention oracle, written straight from SPEC section 1.

Loops over every query coordinate, applies the window rule with plain integers, builds a dense
[N, N] mask (and bias), and runs dense softmax attention. Small sizes only.
"""
import itertools
import math

import torch


def axis_neighbors(i, L, k, d, s, causal):
    """Set of key coordinates a query at ``i`` attends to on one axis."""
    g, c = i % d, i // d
    Lg = math.ceil((L - g) / d)
    if causal:
        leader = min((c // s) * s + s - 1, Lg - 1)
        start, end = max(leader - k + 1, 0), min(c + 1, Lg)
    else:
        leader = min((c // s) * s + (s // 2), Lg - 1)
        start = min(max(leader - k // 2, 0), Lg - k)
        end = start + k
    return {jj * d + g for jj in range(start, end)}


def oracle(q, k, v, kernel_size, dilation, stride, is_causal, rpb=None, scale=None):
    """Dense-mask attention; q, k, v ``[B, *spatial, h, D]``, returns ``(out, lse)`` in float64."""
    spatial = q.shape[1:-2]
    n = len(spatial)
    B, h, D = q.shape[0], q.shape[-2], q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    coords = list(itertools.product(*[range(L) for L in spatial]))
    N = len(coords)
    mask = torch.zeros(N, N, dtype=torch.bool)
    bias = torch.zeros(h, N, N, dtype=torch.float64)
    index = {c: t for t, c in enumerate(coords)}
    for qi, qc in enumerate(coords):
        per_axis = [
            sorted(axis_neighbors(qc[a], spatial[a], kernel_size[a], dilation[a], stride[a], is_causal[a]))
            for a in range(n)
        ]
        for kc in itertools.product(*per_axis):
            ki = index[kc]
            mask[qi, ki] = True
            if rpb is not None:
                r = tuple((kc[a] - qc[a]) // dilation[a] + kernel_size[a] - 1 for a in range(n))
                bias[:, qi, ki] = rpb.double()[(slice(None),) + r]
    qf = q.double().reshape(B, N, h, D).transpose(1, 2)
    kf = k.double().reshape(B, N, h, D).transpose(1, 2)
    vf = v.double().reshape(B, N, h, v.shape[-1]).transpose(1, 2)
    logits = scale * qf @ kf.transpose(-1, -2) + bias
    logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, -1)
    out = torch.softmax(logits, -1) @ vf
    return out.transpose(1, 2).reshape(*q.shape[:-1], v.shape[-1]), lse.transpose(1, 2).reshape(q.shape[:-1])
