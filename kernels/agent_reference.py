"""Pure-PyTorch reference backend for agent attention (SPEC section 4).

Per batch element ``b`` and head ``h``, with agents ``A`` (``n`` rows), queries ``Q`` and keys ``K``
(``N`` rows each) and values ``V``::

    V_A = softmax_N(scale * A K^T + bias_ak[h]) V      stage 1: agents attend the tokens
    O   = softmax_n(scale * Q A^T + bias_qa[h]) V_A    stage 2: tokens attend the agents

Exact (float64 math for float64 inputs, float32 otherwise) and memory-bounded: every step holds at
most ``CHUNK_ELEMENTS`` logits, a few batch elements times a range of tokens. Stage 1's softmax
runs over all ``N`` tokens, so its steps walk the tokens with a running maximum and sum (the split
softmax the Triton kernels use). The forward returns what the backward needs besides the inputs:
``V_A`` and the log-sum-exps of both stages; the backward recomputes each step's probabilities from
them. The bias gradients are summed over the batch (the biases are broadcast over it).

Saved layouts, shared with the Triton backend (contiguous, in :func:`lse_dtype`):
``va [B, heads, n, Dv]``, ``lse_agent [B, heads, n]``, ``lse_query [B, heads, N]``.
"""
from typing import Optional

import torch
from torch import Tensor

from .neighborhood_reference import lse_dtype

__all__ = ["agent_reference_fwd", "agent_reference_bwd", "CHUNK_ELEMENTS"]

CHUNK_ELEMENTS = 1 << 22


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _steps(B: int, N: int, per_token: int):
    """``(b0, b1, t0, t1)`` ranges holding at most ``CHUNK_ELEMENTS`` logits of ``per_token`` each:
    whole token ranges for a few batch elements, or one batch element and a range of tokens."""
    tokens = max(1, CHUNK_ELEMENTS // max(1, per_token))
    if tokens >= N:
        batch = max(1, tokens // N)
        for b0 in range(0, B, batch):
            yield b0, min(B, b0 + batch), 0, N
        return
    for b0 in range(B):
        for t0 in range(0, N, tokens):
            yield b0, b0 + 1, t0, min(N, t0 + tokens)


def _heads_first(t: Tensor, b0: int, b1: int, t0: int, t1: int, dtype: torch.dtype) -> Tensor:
    """``t[b0:b1, t0:t1]`` (``[B, N, heads, D]``) as ``[b, heads, tokens, D]`` in ``dtype``."""
    return t[b0:b1, t0:t1].to(dtype).transpose(1, 2)


def agent_reference_fwd(q: Tensor, k: Tensor, v: Tensor, agents: Tensor, bias_ak: Optional[Tensor],
                        bias_qa: Optional[Tensor], scale: float):
    """``(out [B, N, heads, Dv], va, lse_agent, lse_query)`` of :func:`foveal.kernels.agent_attention`."""
    dtype = _math_dtype(q.dtype)
    B, N, heads, _ = q.shape
    n, Dv = agents.shape[1], v.shape[-1]
    va = torch.zeros(B, heads, n, Dv, dtype=dtype, device=q.device)
    lse_a = torch.full((B, heads, n), float("-inf"), dtype=dtype, device=q.device)
    a_all = agents.to(dtype).transpose(1, 2)  # [B, heads, n, D]
    # stage 1: running log-sum-exp over token steps; va holds the weighted sum scaled by exp(-lse)
    for b0, b1, t0, t1 in _steps(B, N, heads * n):
        kc, vc = _heads_first(k, b0, b1, t0, t1, dtype), _heads_first(v, b0, b1, t0, t1, dtype)
        s = torch.matmul(a_all[b0:b1], kc.transpose(-1, -2)) * scale  # [b, heads, n, tokens]
        if bias_ak is not None:
            s = s + bias_ak[:, :, t0:t1].to(dtype)
        m_step = torch.logsumexp(s, -1)
        m_old = lse_a[b0:b1]
        m_new = torch.logaddexp(m_old, m_step)
        p = torch.exp(s - m_new[..., None])
        va[b0:b1] = va[b0:b1] * torch.exp(m_old - m_new)[..., None] + torch.matmul(p, vc)
        lse_a[b0:b1] = m_new
    out = q.new_empty(B, N, heads, Dv)
    lse_q = torch.empty(B, heads, N, dtype=dtype, device=q.device)
    # stage 2: every token's softmax is over the n agents, so the steps are independent
    for b0, b1, t0, t1 in _steps(B, N, heads * n):
        qc = _heads_first(q, b0, b1, t0, t1, dtype)
        s = torch.matmul(qc, a_all[b0:b1].transpose(-1, -2)) * scale  # [b, heads, tokens, n]
        if bias_qa is not None:
            s = s + bias_qa[:, t0:t1].to(dtype)
        m = torch.logsumexp(s, -1)
        p = torch.exp(s - m[..., None])
        out[b0:b1, t0:t1] = torch.matmul(p, va[b0:b1]).transpose(1, 2).to(out.dtype)
        lse_q[b0:b1, :, t0:t1] = m
    ld = lse_dtype(q.dtype)
    return out, va.to(ld), lse_a.to(ld), lse_q.to(ld)


def agent_reference_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, agents: Tensor,
                        bias_ak: Optional[Tensor], bias_qa: Optional[Tensor], va: Tensor,
                        lse_agent: Tensor, lse_query: Tensor, scale: float, grad_bias: bool = True):
    """``(dq, dk, dv, dagents, dbias_ak, dbias_qa)`` of :func:`agent_reference_fwd`; a bias gradient
    is None when that bias is None or ``grad_bias`` is False."""
    dtype = _math_dtype(q.dtype)
    B, N, heads, _ = q.shape
    n = agents.shape[1]
    a_all = agents.to(dtype).transpose(1, 2)  # [B, heads, n, D]
    va = va.to(dtype)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    da = torch.zeros(B, heads, n, q.shape[-1], dtype=dtype, device=q.device)
    dva = torch.zeros_like(va)
    dbqa = None if bias_qa is None or not grad_bias else torch.zeros(bias_qa.shape, dtype=dtype, device=q.device)
    dbak = None if bias_ak is None or not grad_bias else torch.zeros(bias_ak.shape, dtype=dtype, device=q.device)
    # stage 2 first: it yields the gradient of va that stage 1 needs
    for b0, b1, t0, t1 in _steps(B, N, heads * n):
        qc, do = _heads_first(q, b0, b1, t0, t1, dtype), _heads_first(grad_out, b0, b1, t0, t1, dtype)
        a = a_all[b0:b1]
        s = torch.matmul(qc, a.transpose(-1, -2)) * scale
        if bias_qa is not None:
            s = s + bias_qa[:, t0:t1].to(dtype)
        p = torch.exp(s - lse_query[b0:b1, :, t0:t1].to(dtype)[..., None])  # [b, heads, tokens, n]
        dp = torch.matmul(do, va[b0:b1].transpose(-1, -2))
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))  # rowsum(P * dP) = rowsum(dO * O)
        dq[b0:b1, t0:t1] = (torch.matmul(ds, a) * scale).transpose(1, 2).to(dq.dtype)
        da[b0:b1] += torch.matmul(ds.transpose(-1, -2), qc) * scale
        dva[b0:b1] += torch.matmul(p.transpose(-1, -2), do)
        if dbqa is not None:
            dbqa[:, t0:t1] += ds.sum(0)
    delta = (dva * va).sum(-1, keepdim=True)  # [B, heads, n, 1]
    for b0, b1, t0, t1 in _steps(B, N, heads * n):
        kc, vc = _heads_first(k, b0, b1, t0, t1, dtype), _heads_first(v, b0, b1, t0, t1, dtype)
        a = a_all[b0:b1]
        s = torch.matmul(a, kc.transpose(-1, -2)) * scale
        if bias_ak is not None:
            s = s + bias_ak[:, :, t0:t1].to(dtype)
        p = torch.exp(s - lse_agent[b0:b1].to(dtype)[..., None])  # [b, heads, n, tokens]
        dp = torch.matmul(dva[b0:b1], vc.transpose(-1, -2))
        ds = p * (dp - delta[b0:b1])
        dk[b0:b1, t0:t1] = (torch.matmul(ds.transpose(-1, -2), a) * scale).transpose(1, 2).to(dk.dtype)
        dv[b0:b1, t0:t1] = torch.matmul(p.transpose(-1, -2), dva[b0:b1]).transpose(1, 2).to(dv.dtype)
        da[b0:b1] += torch.matmul(ds, kc) * scale
        if dbak is not None:
            dbak[:, :, t0:t1] += ds.sum(0)
    return (dq, dk, dv, da.transpose(1, 2).to(agents.dtype),
            None if dbak is None else dbak.to(bias_ak.dtype), None if dbqa is None else dbqa.to(bias_qa.dtype))
