"""Brute-force agent-attention oracle, written straight from SPEC section 4.

Explicit logits, ``torch.softmax`` and matmuls in float64 over the whole map at once, the biases
broadcast over the batch; differentiable through autograd (every input, biases included). Small
sizes only.
"""
import torch


def oracle(q, k, v, agents, bias_ak=None, bias_qa=None, scale=None):
    """q, k ``[B, N, h, D]``, v ``[B, N, h, Dv]``, agents ``[B, n, h, D]``, bias_ak ``[h, n, N]``,
    bias_qa ``[h, N, n]`` (either may be None); returns ``(out [B, N, h, Dv], va [B, h, n, Dv])``
    in float64."""
    q, k, v, agents = (t.double().transpose(1, 2) for t in (q, k, v, agents))  # [B, h, tokens, D]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits_ak = scale * agents @ k.transpose(-1, -2)  # [B, h, n, N]
    if bias_ak is not None:
        logits_ak = logits_ak + bias_ak.double()
    va = torch.softmax(logits_ak, -1) @ v
    logits_qa = scale * q @ agents.transpose(-1, -2)  # [B, h, N, n]
    if bias_qa is not None:
        logits_qa = logits_qa + bias_qa.double()
    out = torch.softmax(logits_qa, -1) @ va
    return out.transpose(1, 2), va
