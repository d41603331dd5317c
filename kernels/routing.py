"""Routed block-sparse attention (bi-level routing attention of BiFormer; SPEC section 3).

Tokens are grouped by region, region-major ``[B, R, T, heads, head_dim]``. Each query region
attends to the tokens of its own list of ``topk`` key regions, given per batch element and query
region and shared by the heads; ``indices=None`` is the dense case (every region routed, the
path BiFormer takes when top-k covers the map). Backends read the routed regions in place: the
Triton kernels index them inside the kernel, so no top-k-fold copy of the keys and values (the
memory and backward bottleneck of the gather formulation) is ever made. The geometry is written
out in :mod:`foveal.kernels.routing_reference`.

The ops are the torch custom ops ``foveal::routed_attention_fwd`` / ``_bwd`` with fake
implementations, autograd and FLOP formulas, so ``torch.compile(fullgraph=True)``, the meta device
and export see one opaque op; eager calls on plain tensors skip the dispatcher (see
:mod:`foveal.kernels.dispatch`). Backends plug in through ``ROUTING_BACKENDS``.
"""
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .backends import BACKEND_ENV, Backend, BackendRegistry
from .checks import check_scale_arg, check_tensors
from .dispatch import CheckCache, custom_op, eager_ok, env
from .neighborhood_reference import lse_dtype
from .routing_reference import routing_reference_bwd, routing_reference_fwd

__all__ = ["routed_attention", "ROUTING_BACKENDS"]

_OP = "routed_attention"


def _reference_probe(*tensors, **cfg) -> Optional[str]:
    return None


ROUTING_BACKENDS = BackendRegistry("routed_attention")
ROUTING_BACKENDS.register(Backend("reference", _reference_probe, routing_reference_fwd, routing_reference_bwd))

try:  # the Triton backend is optional: foveal imports without triton
    from .routing_triton import routing_triton_bwd, routing_triton_fwd, routing_triton_probe
except ImportError as _err:  # pragma: no cover - depends on the environment
    from .backends import logger as _logger

    _logger.debug("routed_attention: Triton backend unavailable: %s", _err)
else:
    ROUTING_BACKENDS.register(Backend("triton", routing_triton_probe, routing_triton_fwd, routing_triton_bwd),
                              first=True)


# -- custom ops -----------------------------------------------------------------------------------

@custom_op("foveal::routed_attention_fwd")
def _routing_fwd(q: Tensor, k: Tensor, v: Tensor, indices: Optional[Tensor], scale: float,
                 backend: str) -> tuple[Tensor, Tensor]:
    return ROUTING_BACKENDS[backend].fwd(q, k, v, indices, scale)


@_routing_fwd.register_fake
def _routing_fwd_fake(q, k, v, indices, scale, backend):
    return q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(q.shape[:-1], dtype=lse_dtype(q.dtype))


@custom_op("foveal::routed_attention_bwd")
def _routing_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, indices: Optional[Tensor], out: Tensor,
                 lse: Tensor, grad_lse: Optional[Tensor], scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return ROUTING_BACKENDS[backend].bwd(grad_out, q, k, v, indices, out, lse, grad_lse, scale)


@_routing_bwd.register_fake
def _routing_bwd_fake(grad_out, q, k, v, indices, out, lse, grad_lse, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, indices, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, indices, out, lse)
    ctx.cfg = (scale, backend)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, indices, out, lse = ctx.saved_tensors
    dq, dk, dv = _routing_bwd(grad_out, q, k, v, indices, out, lse, grad_lse, *ctx.cfg)
    return dq, dk, dv, None, None, None


_routing_fwd.register_autograd(_backward, _setup_context)


class _EagerRouting(torch.autograd.Function):
    """``foveal::routed_attention_fwd`` and its autograd without the custom-op dispatcher."""

    @staticmethod
    def forward(ctx, q, k, v, indices, scale, backend):
        out, lse = ROUTING_BACKENDS[backend].fwd(q, k, v, indices, scale)
        ctx.save_for_backward(q, k, v, indices, out, lse)
        ctx.cfg = (scale, backend)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, indices, out, lse = ctx.saved_tensors
        scale, backend = ctx.cfg
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = ROUTING_BACKENDS[backend].bwd(grad_out, q, k, v, indices, out, lse, grad_lse, scale)
        return dq, dk, dv, None, None, None


# -- FLOP counting --------------------------------------------------------------------------------
# The convention of foveal::na_fwd: 2 FLOPs per multiply-add over the attended (query, key) pairs,
# forward QK^T and PV, backward twice that. Routing itself (region means, affinity, top-k) is the
# layer's, not the op's.

def _routing_flops(q_shape, k_shape, v_shape, indices_shape) -> int:
    B, R, T, heads, D = q_shape
    topk = R if indices_shape is None else indices_shape[-1]
    return 2 * B * R * T * heads * topk * k_shape[2] * (D + v_shape[-1])


@register_flop_formula(torch.ops.foveal.routed_attention_fwd)
def _routing_fwd_flop(q_shape, k_shape, v_shape, indices_shape, scale, backend, out_shape=None, **kwargs) -> int:
    return _routing_flops(q_shape, k_shape, v_shape, indices_shape)


@register_flop_formula(torch.ops.foveal.routed_attention_bwd)
def _routing_bwd_flop(grad_out_shape, q_shape, k_shape, v_shape, indices_shape, out_shape_, lse_shape,
                      grad_lse_shape, scale, backend, out_shape=None, **kwargs) -> int:
    return 2 * _routing_flops(q_shape, k_shape, v_shape, indices_shape)


# -- checks ---------------------------------------------------------------------------------------

_CHECKED = CheckCache()
_INDEX_DTYPES = (torch.int32, torch.int64)


def _check_call(q, k, v, indices, scale, backend):
    """Validates one call (shapes and dtypes, not index values); returns (backend name, scale)."""
    check_tensors(_OP, ("q", "k", "v"), (q, k, v), 5)
    B, R, T, heads, D = q.shape
    if k.shape[:2] != q.shape[:2] or k.shape[3:] != q.shape[3:]:
        raise ValueError(f"{_OP}: k must be [B, R, T_k, heads, head_dim] with B, R, heads and head_dim of q, "
                         f"got k.shape={tuple(k.shape)}, q.shape={tuple(q.shape)}")
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"{_OP}: v must match k in every dimension but the last (head_dim_v), "
                         f"got v.shape={tuple(v.shape)}, k.shape={tuple(k.shape)}")
    if min(q.shape) == 0 or min(k.shape) == 0 or v.shape[-1] == 0:
        raise ValueError(f"{_OP}: empty inputs are not supported, got q.shape={tuple(q.shape)}, "
                         f"k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}")
    if indices is not None:
        if not isinstance(indices, Tensor):
            raise TypeError(f"{_OP}: indices must be a torch.Tensor or None, got {type(indices).__name__}")
        if indices.dtype not in _INDEX_DTYPES:
            raise TypeError(f"{_OP}: indices must be int32 or int64, got indices.dtype={indices.dtype}")
        if indices.dim() != 3 or tuple(indices.shape[:2]) != (B, R):
            raise ValueError(f"{_OP}: indices must have shape [B, R, topk] = [{B}, {R}, topk] for "
                             f"q.shape={tuple(q.shape)}, got indices.shape={tuple(indices.shape)}")
        if not 1 <= indices.shape[-1] <= R:
            raise ValueError(f"{_OP}: topk (the last dim of indices) must be in [1, R={R}], "
                             f"got indices.shape={tuple(indices.shape)}")
        if indices.device != q.device:
            raise ValueError(f"{_OP}: indices must be on the device of q, got indices.device={indices.device}, "
                             f"q.device={q.device}")
    scale = check_scale_arg(_OP, scale, D)
    return ROUTING_BACKENDS.choose(backend, q, k, v, indices), scale


def _check_index_values(indices: Tensor, regions: int) -> None:
    bad = (indices < 0) | (indices >= regions)
    if bool(bad.any()):
        first = indices[bad][0].item()
        raise ValueError(f"{_OP}: every index must be a region in [0, R={regions}), got {first} "
                         f"(pass check_indices=False only for indices valid by construction)")


# -- public API -----------------------------------------------------------------------------------

def routed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    indices: Optional[Tensor],
    scale: Optional[float] = None,
    return_lse: bool = False,
    *,
    backend: str = "auto",
    check_indices: bool = True,
):
    """Routed block-sparse attention over region-major tokens (BiFormer's token-to-token stage).

    Query region ``r`` of batch element ``b`` attends, for every head, to the concatenated tokens of
    the key regions ``indices[b, r, :]``::

        out[b, r, i, h] = softmax_j(scale * <q[b, r, i, h], k[b, g(j), t(j), h]>) @ v[b, g(j), t(j), h]

    with key position ``j`` running over ``topk * T_k`` tokens, ``g(j) = indices[b, r, j // T_k]`` and
    ``t(j) = j % T_k``. No mask and no bias; a duplicated index counts its region twice.

    Args:
        q: queries ``[B, R, T, heads, head_dim]``, floating point, region-major (``R`` regions of ``T``
            tokens); a strided view (e.g. a slice of a fused qkv projection) is read in place.
        k: keys ``[B, R, T_k, heads, head_dim]``, the dtype and device of ``q``.
        v: values ``[B, R, T_k, heads, head_dim_v]``; ``head_dim_v`` may differ from ``head_dim``.
        indices: routed key regions ``[B, R, topk]`` (int32 or int64, values in ``[0, R)``,
            ``1 <= topk <= R``), shared by the heads; not differentiated. ``None`` routes every
            query region to all ``R`` regions (the dense path).
        scale: logit scale, default ``head_dim ** -0.5`` (an explicit 0.0 is honoured). BiFormer
            passes ``C_qk ** -0.5``, the full width (SPEC section 3).
        return_lse: also return the log-sum-exp of the logits ``[B, R, T, heads]`` (float32;
            float64 for float64 inputs).

    Other Parameters:
        backend: ``"auto"`` (the best backend that can run the call; the environment variable
            ``FOVEAL_BACKEND`` overrides it), ``"reference"`` (pure PyTorch, any device) or
            ``"triton"``. An unavailable backend raises with the reason.
        check_indices: verify that every index is in ``[0, R)`` (one device sync on CUDA). Callers
            whose indices are valid by construction (``torch.topk``) pass False.

    Returns:
        ``out`` ``[B, R, T, heads, head_dim_v]`` in the dtype of ``q``, or ``(out, lse)`` when
        ``return_lse``.

    Raises:
        TypeError: a non-tensor or non-floating input, non-integer indices, or a badly typed argument.
        ValueError: shape/dtype/device mismatch, badly shaped indices, or (with ``check_indices``)
            an index outside ``[0, R)``.

    Example:
        >>> q = k = v = torch.randn(2, 49, 4, 8, 32)
        >>> idx = torch.randint(0, 49, (2, 49, 16))
        >>> routed_attention(q, k, v, idx).shape
        torch.Size([2, 49, 4, 8, 32])
    """
    resolved = key = None
    if not torch.compiler.is_compiling():  # dynamo folds the checks into the graph instead
        try:
            key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
                   None if indices is None else (indices.shape, indices.dtype, indices.device),
                   scale, backend, env(BACKEND_ENV))
            resolved = _CHECKED.get(key)
        except (AttributeError, TypeError):  # not tensors, or unhashable arguments: the checks say why
            key = None
    if resolved is None:
        resolved = _check_call(q, k, v, indices, scale, backend)
        if key is not None:
            _CHECKED.put(key, resolved)
    if not isinstance(return_lse, bool):
        raise TypeError(f"{_OP}: return_lse must be a bool, got {type(return_lse).__name__}")
    if check_indices and indices is not None and not torch.compiler.is_compiling() and not indices.is_meta \
            and eager_ok(indices):
        _check_index_values(indices, q.shape[1])
    name, scale = resolved
    args = (q, k, v, indices, scale, name)
    if not eager_ok(q, k, v, indices):
        out, lse = _routing_fwd(*args)
    elif torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        out, lse = _EagerRouting.apply(*args)
    else:  # nothing to differentiate: no autograd node
        out, lse = ROUTING_BACKENDS[name].fwd(*args[:-1])
    return (out, lse) if return_lse else out
