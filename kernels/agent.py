"""Agent attention (Agent-Swin / Agent-PVT / Agent-DeiT / Agent-CSwin; SPEC section 4).

A small set of ``n`` agent tokens (the layers pool them from the queries) stands between the
queries and the keys: the agents attend every token (softmax over the ``N`` tokens), then every
token attends the agents (softmax over the ``n`` agents). Two position biases, one per stage, are
given composed per head and broadcast over the batch; they are never materialised per batch
element (the official code's ``.repeat`` is what runs it out of memory at detection sizes).

The ops are the torch custom ops ``foveal::agent_attention_fwd`` / ``_bwd`` with fake
implementations, autograd and FLOP formulas, so ``torch.compile(fullgraph=True)``, the meta device
and export see one opaque op; eager calls on plain tensors skip the dispatcher (see
:mod:`foveal.kernels.dispatch`). Backends plug in through ``AGENT_BACKENDS``; the saved layouts
are written out in :mod:`foveal.kernels.agent_reference`.
"""
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .agent_reference import agent_reference_bwd, agent_reference_fwd
from .backends import BACKEND_ENV, Backend, BackendRegistry
from .checks import check_scale_arg, check_tensors
from .dispatch import CheckCache, custom_op, eager_ok, env
from .neighborhood_reference import lse_dtype

__all__ = ["agent_attention", "AGENT_BACKENDS"]

_OP = "agent_attention"


def _reference_probe(*tensors, **cfg) -> Optional[str]:
    return None


AGENT_BACKENDS = BackendRegistry("agent_attention")
AGENT_BACKENDS.register(Backend("reference", _reference_probe, agent_reference_fwd, agent_reference_bwd))

try:  # the Triton backend is optional: foveal imports without triton
    from .agent_triton import agent_triton_bwd, agent_triton_fwd, agent_triton_probe
except ImportError as _err:  # pragma: no cover - depends on the environment
    from .backends import logger as _logger

    _logger.debug("agent_attention: Triton backend unavailable: %s", _err)
else:
    AGENT_BACKENDS.register(Backend("triton", agent_triton_probe, agent_triton_fwd, agent_triton_bwd), first=True)


# -- custom ops -----------------------------------------------------------------------------------
# Custom ops return no None: an empty tensor stands for the gradient of an absent (or frozen) bias.

@custom_op("foveal::agent_attention_fwd")
def _agent_fwd(q: Tensor, k: Tensor, v: Tensor, agents: Tensor, bias_ak: Optional[Tensor],
               bias_qa: Optional[Tensor], scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return AGENT_BACKENDS[backend].fwd(q, k, v, agents, bias_ak, bias_qa, scale)


@_agent_fwd.register_fake
def _agent_fwd_fake(q, k, v, agents, bias_ak, bias_qa, scale, backend):
    B, N, heads, _ = q.shape
    n, Dv, ld = agents.shape[1], v.shape[-1], lse_dtype(q.dtype)
    return (q.new_empty(B, N, heads, Dv), q.new_empty(B, heads, n, Dv, dtype=ld), q.new_empty(B, heads, n, dtype=ld),
            q.new_empty(B, heads, N, dtype=ld))


@custom_op("foveal::agent_attention_bwd")
def _agent_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, agents: Tensor, bias_ak: Optional[Tensor],
               bias_qa: Optional[Tensor], va: Tensor, lse_agent: Tensor, lse_query: Tensor, scale: float,
               grad_bias: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = AGENT_BACKENDS[backend].bwd(grad_out, q, k, v, agents, bias_ak, bias_qa, va, lse_agent, lse_query,
                                        scale, grad_bias)
    return tuple(q.new_empty(0) if g is None else g for g in grads)


@_agent_bwd.register_fake
def _agent_bwd_fake(grad_out, q, k, v, agents, bias_ak, bias_qa, va, lse_agent, lse_query, scale, grad_bias, backend):
    dbak = torch.empty_like(bias_ak) if grad_bias and bias_ak is not None else q.new_empty(0)
    dbqa = torch.empty_like(bias_qa) if grad_bias and bias_qa is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(agents), dbak, dbqa


def _bias_grads_needed(needs) -> bool:
    return bool(needs[4] or needs[5])


def _setup_context(ctx, inputs, output):
    q, k, v, agents, bias_ak, bias_qa, scale, backend = inputs
    out, va, lse_a, lse_q = output
    ctx.save_for_backward(q, k, v, agents, bias_ak, bias_qa, va, lse_a, lse_q)
    ctx.cfg = (scale, backend)
    ctx.mark_non_differentiable(va, lse_a, lse_q)


def _backward(ctx, grad_out, *unused):
    q, k, v, agents, bias_ak, bias_qa, va, lse_a, lse_q = ctx.saved_tensors
    scale, backend = ctx.cfg
    needs = ctx.needs_input_grad
    grad_bias = _bias_grads_needed(needs)
    dq, dk, dv, da, dbak, dbqa = _agent_bwd(grad_out, q, k, v, agents, bias_ak, bias_qa, va, lse_a, lse_q, scale,
                                            grad_bias, backend)
    return (dq, dk, dv, da, dbak if grad_bias and bias_ak is not None else None,
            dbqa if grad_bias and bias_qa is not None else None, None, None)


_agent_fwd.register_autograd(_backward, _setup_context)


class _EagerAgent(torch.autograd.Function):
    """``foveal::agent_attention_fwd`` and its autograd without the custom-op dispatcher."""

    @staticmethod
    def forward(ctx, q, k, v, agents, bias_ak, bias_qa, scale, backend):
        out, va, lse_a, lse_q = AGENT_BACKENDS[backend].fwd(q, k, v, agents, bias_ak, bias_qa, scale)
        ctx.save_for_backward(q, k, v, agents, bias_ak, bias_qa, va, lse_a, lse_q)
        ctx.cfg = (scale, backend)
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, agents, bias_ak, bias_qa, va, lse_a, lse_q = ctx.saved_tensors
        scale, backend = ctx.cfg
        if grad_out is None:
            grad_out = q.new_zeros(*q.shape[:-1], v.shape[-1])
        grad_bias = _bias_grads_needed(ctx.needs_input_grad)
        grads = AGENT_BACKENDS[backend].bwd(grad_out, q, k, v, agents, bias_ak, bias_qa, va, lse_a, lse_q, scale,
                                            grad_bias)
        return (*grads, None, None)


# -- FLOP counting --------------------------------------------------------------------------------
# The convention of foveal::na_fwd: 2 FLOPs per multiply-add. Forward: stage 1 (agents x tokens) and
# stage 2 (tokens x agents), each a logit and a value product; backward twice that. Pooling the
# agents and composing the biases are the layer's, not the op's.

def _agent_flops(q_shape, v_shape, agents_shape) -> int:
    B, N, heads, D = q_shape
    return 4 * B * heads * N * agents_shape[1] * (D + v_shape[-1])


@register_flop_formula(torch.ops.foveal.agent_attention_fwd)
def _agent_fwd_flop(q_shape, k_shape, v_shape, agents_shape, bias_ak_shape, bias_qa_shape, scale, backend,
                    out_shape=None, **kwargs) -> int:
    return _agent_flops(q_shape, v_shape, agents_shape)


@register_flop_formula(torch.ops.foveal.agent_attention_bwd)
def _agent_bwd_flop(grad_out_shape, q_shape, k_shape, v_shape, agents_shape, bias_ak_shape, bias_qa_shape, va_shape,
                    lse_agent_shape, lse_query_shape, scale, grad_bias, backend, out_shape=None, **kwargs) -> int:
    return 2 * _agent_flops(q_shape, v_shape, agents_shape)


# -- checks ---------------------------------------------------------------------------------------

_CHECKED = CheckCache()


def _check_bias(name: str, bias, shape: tuple, layout: str, q: Tensor) -> None:
    if bias is None:
        return
    if not isinstance(bias, Tensor):
        raise TypeError(f"{_OP}: {name} must be a torch.Tensor or None, got {type(bias).__name__}")
    if bias.dtype not in (torch.float32, q.dtype):
        raise TypeError(f"{_OP}: {name} must be float32 or the dtype of q ({q.dtype}), got {name}.dtype={bias.dtype}")
    if tuple(bias.shape) != shape:
        raise ValueError(f"{_OP}: {name} must have shape {layout} = {list(shape)} (per head, broadcast over the "
                         f"batch; compose it before the call), got {name}.shape={tuple(bias.shape)}")
    if bias.device != q.device:
        raise ValueError(f"{_OP}: {name} must be on the device of q, got {name}.device={bias.device}, "
                         f"q.device={q.device}")


def _check_call(q, k, v, agents, bias_ak, bias_qa, scale, backend):
    """Validates one call; returns (backend name, scale)."""
    check_tensors(_OP, ("q", "k", "v", "agents"), (q, k, v, agents), 4)
    B, N, heads, D = q.shape
    if k.shape != q.shape:
        raise ValueError(f"{_OP}: k must have the shape of q [B, N, heads, head_dim], got k.shape={tuple(k.shape)}, "
                         f"q.shape={tuple(q.shape)}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"{_OP}: v must be [B, N, heads, head_dim_v] with B, N and heads of q, "
                         f"got v.shape={tuple(v.shape)}, q.shape={tuple(q.shape)}")
    if agents.shape[0] != B or agents.shape[2:] != q.shape[2:]:
        raise ValueError(f"{_OP}: agents must be [B, n, heads, head_dim] with B, heads and head_dim of q, "
                         f"got agents.shape={tuple(agents.shape)}, q.shape={tuple(q.shape)}")
    if min(q.shape) == 0 or v.shape[-1] == 0 or agents.shape[1] == 0:
        raise ValueError(f"{_OP}: empty inputs are not supported, got q.shape={tuple(q.shape)}, "
                         f"v.shape={tuple(v.shape)}, agents.shape={tuple(agents.shape)}")
    n = agents.shape[1]
    _check_bias("bias_ak", bias_ak, (heads, n, N), "[heads, n, N]", q)
    _check_bias("bias_qa", bias_qa, (heads, N, n), "[heads, N, n]", q)
    scale = check_scale_arg(_OP, scale, D)
    return AGENT_BACKENDS.choose(backend, q, k, v, agents, bias_ak, bias_qa), scale


def _sig(t: Optional[Tensor]):
    return None if t is None else (t.shape, t.dtype, t.device)


# -- public API -----------------------------------------------------------------------------------

def agent_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    agents: Tensor,
    bias_ak: Optional[Tensor] = None,
    bias_qa: Optional[Tensor] = None,
    scale: Optional[float] = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Agent attention: agents attend the tokens, then the tokens attend the agents (SPEC section 4).

    For every batch element ``b`` and head ``h``, with ``A = agents[b, :, h]``, ``Q = q[b, :, h]``,
    ``K = k[b, :, h]``, ``V = v[b, :, h]``::

        V_A = softmax(scale * A @ K^T + bias_ak[h]) @ V      # [n, head_dim_v], softmax over the N tokens
        out = softmax(scale * Q @ A^T + bias_qa[h]) @ V_A    # [N, head_dim_v], softmax over the n agents

    The biases are not scaled. Every input, the biases included, receives gradients.

    Args:
        q: queries ``[B, N, heads, head_dim]``, floating point (``N`` tokens of one attention
            window); a strided view (e.g. a slice of a fused qkv projection) is read in place.
        k: keys, the shape, dtype and device of ``q``.
        v: values ``[B, N, heads, head_dim_v]``; ``head_dim_v`` may differ from ``head_dim``.
        agents: agent tokens ``[B, n, heads, head_dim]`` (the layers pool them from ``q``).
        bias_ak: agent <- key logit bias ``[heads, n, N]``, float32 or the dtype of ``q``, broadcast
            over the batch (its gradient is summed over the batch), or None.
        bias_qa: query <- agent logit bias ``[heads, N, n]``, as ``bias_ak``, or None.
        scale: logit scale of both stages, default ``head_dim ** -0.5`` (an explicit 0.0 is honoured).

    Other Parameters:
        backend: ``"auto"`` (the best backend that can run the call; the environment variable
            ``FOVEAL_BACKEND`` overrides it), ``"reference"`` (pure PyTorch, any device) or
            ``"triton"``. An unavailable backend raises with the reason.

    Returns:
        ``out`` ``[B, N, heads, head_dim_v]`` in the dtype of ``q``.

    Raises:
        TypeError: a non-tensor or non-floating input, or a bias of another dtype.
        ValueError: shape/dtype/device mismatch, empty inputs, or badly shaped biases.

    Example:
        >>> q = k = v = torch.randn(2, 64, 3, 32)
        >>> agents = torch.randn(2, 9, 3, 32)
        >>> agent_attention(q, k, v, agents, torch.zeros(3, 9, 64), torch.zeros(3, 64, 9)).shape
        torch.Size([2, 64, 3, 32])
    """
    resolved = key = None
    if not torch.compiler.is_compiling():  # dynamo folds the checks into the graph instead
        try:
            key = (q.shape, k.shape, v.shape, agents.shape, q.dtype, k.dtype, v.dtype, agents.dtype, q.device,
                   k.device, v.device, agents.device, _sig(bias_ak), _sig(bias_qa), scale, backend, env(BACKEND_ENV))
            resolved = _CHECKED.get(key)
        except (AttributeError, TypeError):  # not tensors, or unhashable arguments: the checks say why
            key = None
    if resolved is None:
        resolved = _check_call(q, k, v, agents, bias_ak, bias_qa, scale, backend)
        if key is not None:
            _CHECKED.put(key, resolved)
    name, scale = resolved
    args = (q, k, v, agents, bias_ak, bias_qa, scale, name)
    if not eager_ok(q, k, v, agents, bias_ak, bias_qa):
        return _agent_fwd(*args)[0]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:6]):
        return _EagerAgent.apply(*args)
    return AGENT_BACKENDS[name].fwd(*args[:-1])[0]  # nothing to differentiate: no autograd node
