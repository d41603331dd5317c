"""Neighborhood attention (NA), dilated NA (DiNA) and strided NA (GNA) in 1-D, 2-D and 3-D.

Every query attends to exactly the keys of its neighborhood (SPEC section 1): per axis a window of
``kernel_size`` keys taken from the query's dilation group, shifted inward at the borders (never
padded), optionally causal or strided; a key is a neighbor when it is one on every axis. An
optional relative positional bias ``rpb`` is indexed by key minus query (divided by the dilation)
and added after scaling.

The ops are the torch custom ops ``foveal::na_fwd`` / ``foveal::na_bwd`` with fake
implementations and autograd, so ``torch.compile(fullgraph=True)``, the meta device and export see
one opaque op. Backends (see :mod:`foveal.kernels.backends`) plug in through ``NA_BACKENDS``.
"""
from typing import Optional, Sequence, Union

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .backends import BACKEND_ENV, Backend, BackendRegistry
from .checks import check_axis_arg, check_bool_axis_arg, check_scale_arg, check_tensors
from .dispatch import custom_op, eager_ok as _eager_ok, env
from .neighborhood_reference import lse_dtype, na_reference_bwd, na_reference_fwd

__all__ = ["na1d", "na2d", "na3d", "neighborhood_attention", "NA_BACKENDS"]

IntOrTuple = Union[int, Sequence[int]]
BoolOrTuple = Union[bool, Sequence[bool]]


def _reference_probe(*tensors, **cfg) -> Optional[str]:
    return None


NA_BACKENDS = BackendRegistry("neighborhood_attention")
NA_BACKENDS.register(Backend("reference", _reference_probe, na_reference_fwd, na_reference_bwd))

try:  # the Triton backend is optional: foveal imports without triton
    from .neighborhood_triton import na_triton_bwd, na_triton_fwd, na_triton_probe
except ImportError as _err:  # pragma: no cover - depends on the environment
    from .backends import logger as _logger

    _logger.debug("neighborhood_attention: Triton backend unavailable: %s", _err)
else:
    NA_BACKENDS.register(Backend("triton", na_triton_probe, na_triton_fwd, na_triton_bwd), first=True)


# -- custom ops -----------------------------------------------------------------------------------

@custom_op("foveal::na_fwd")
def _na_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rpb: Optional[Tensor],
    kernel_size: list[int],
    dilation: list[int],
    stride: list[int],
    is_causal: list[bool],
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return NA_BACKENDS[backend].fwd(q, k, v, rpb, kernel_size, dilation, stride, is_causal, scale)


@_na_fwd.register_fake
def _na_fwd_fake(q, k, v, rpb, kernel_size, dilation, stride, is_causal, scale, backend):
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    lse = q.new_empty(q.shape[:-1], dtype=lse_dtype(q.dtype))
    return out, lse


@custom_op("foveal::na_bwd")
def _na_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rpb: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    grad_lse: Optional[Tensor],
    kernel_size: list[int],
    dilation: list[int],
    stride: list[int],
    is_causal: list[bool],
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, drpb = NA_BACKENDS[backend].bwd(
        grad_out, q, k, v, rpb, out, lse, grad_lse, kernel_size, dilation, stride, is_causal, scale
    )
    # custom ops cannot return None: an empty tensor stands for "no rpb"
    return dq, dk, dv, drpb if drpb is not None else q.new_empty(0)


@_na_bwd.register_fake
def _na_bwd_fake(grad_out, q, k, v, rpb, out, lse, grad_lse, kernel_size, dilation, stride, is_causal, scale, backend):
    drpb = torch.empty_like(rpb) if rpb is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), drpb


def _setup_context(ctx, inputs, output):
    q, k, v, rpb, kernel_size, dilation, stride, is_causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, rpb, out, lse)
    ctx.cfg = (kernel_size, dilation, stride, is_causal, scale, backend)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, rpb, out, lse = ctx.saved_tensors
    dq, dk, dv, drpb = _na_bwd(grad_out, q, k, v, rpb, out, lse, grad_lse, *ctx.cfg)
    return dq, dk, dv, (drpb if rpb is not None else None), None, None, None, None, None, None


_na_fwd.register_autograd(_backward, _setup_context)


class _EagerNA(torch.autograd.Function):
    """The same computation as ``foveal::na_fwd`` and its autograd, without the custom-op dispatcher.

    Eager calls on plain tensors (parameters included) that need gradients take this path, and eager
    calls with nothing to differentiate run the backend directly: the Python dispatch of a custom op
    costs more host time than a small kernel (models with tens of NA layers become host bound).
    Anything that needs to see the op (torch.compile, export, fake/meta tensors, tensor subclasses,
    dispatch modes such as the FLOP counter, functorch transforms) goes through the custom op.
    """

    @staticmethod
    def forward(ctx, q, k, v, rpb, kernel_size, dilation, stride, is_causal, scale, backend):
        out, lse = NA_BACKENDS[backend].fwd(q, k, v, rpb, kernel_size, dilation, stride, is_causal, scale)
        ctx.save_for_backward(q, k, v, rpb, out, lse)
        ctx.cfg = (kernel_size, dilation, stride, is_causal, scale, backend)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, rpb, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv, drpb = NA_BACKENDS[ctx.cfg[-1]].bwd(grad_out, q, k, v, rpb, out, lse, grad_lse, *ctx.cfg[:-1])
        return dq, dk, dv, drpb, None, None, None, None, None, None


# -- FLOP counting --------------------------------------------------------------------------------
# Convention of torch.utils.flop_counter (and of its scaled_dot_product_attention formulas): one
# multiply-add = 2 FLOPs, and only the matmul-like products over attended (query, key) pairs count:
# forward QK^T and PV = 2 * pairs * heads * (D + Dv) per batch element; backward dV, dP, dQ, dK =
# twice that (the logits it recomputes are not counted, as for flash attention). Softmax, bias and
# scale are not counted. Papers quoting fvcore "GFLOPs" count multiply-adds: halve these to compare.

def _attended_pairs(spatial, kernel_size, dilation, stride, is_causal) -> int:
    """Number of (query, key) neighbor pairs of one map (product over axes of per-axis counts)."""
    pairs = 1
    for length, k, d, s, causal in zip(spatial, kernel_size, dilation, stride, is_causal):
        if not causal:
            pairs *= length * k
            continue
        total = 0  # causal: end - start of SPEC section 1, summed over every dilation group
        for g in range(d):
            group_len = (length - g + d - 1) // d
            for c in range(group_len):
                leader = min((c // s) * s + s - 1, group_len - 1)
                total += min(c + 1, group_len) - max(leader - k + 1, 0)
        pairs *= total
    return pairs


def _na_flops(q_shape, v_shape, kernel_size, dilation, stride, is_causal) -> int:
    batch, spatial, heads, head_dim = q_shape[0], q_shape[1:-2], q_shape[-2], q_shape[-1]
    pairs = _attended_pairs(spatial, kernel_size, dilation, stride, is_causal)
    return 2 * batch * heads * (head_dim + v_shape[-1]) * pairs


@register_flop_formula(torch.ops.foveal.na_fwd)
def _na_fwd_flop(q_shape, k_shape, v_shape, rpb_shape, kernel_size, dilation, stride, is_causal, scale, backend,
                 out_shape=None, **kwargs) -> int:
    return _na_flops(q_shape, v_shape, kernel_size, dilation, stride, is_causal)


@register_flop_formula(torch.ops.foveal.na_bwd)
def _na_bwd_flop(grad_out_shape, q_shape, k_shape, v_shape, rpb_shape, out_shape_, lse_shape, grad_lse_shape,
                 kernel_size, dilation, stride, is_causal, scale, backend, out_shape=None, **kwargs) -> int:
    return 2 * _na_flops(q_shape, v_shape, kernel_size, dilation, stride, is_causal)


# Calls with the same shapes, dtypes, devices and arguments pass the same checks and pick the same
# backend: resolved once per call signature (a model makes tens of calls per step with a few).
_CHECKED: dict = {}


def _hashable(x):
    return tuple(x) if isinstance(x, list) else x


def _check_call(q, k, v, kernel_size, dilation, stride, is_causal, rpb, scale, backend, na_dim):
    """Validates one call; returns (backend name, kernel_size, dilation, stride, is_causal, scale) as
    the custom op takes them."""
    if na_dim is None:
        if not isinstance(q, Tensor):
            raise TypeError(f"neighborhood_attention: q must be a torch.Tensor, got {type(q).__name__}")
        na_dim = q.dim() - 3
    if na_dim not in (1, 2, 3):
        raise ValueError(f"neighborhood_attention: na_dim must be 1, 2 or 3, got na_dim={na_dim}")
    op = f"na{na_dim}d"
    check_tensors(op, ("q", "k", "v"), (q, k, v), na_dim + 3)
    if k.shape != q.shape:
        raise ValueError(f"{op}: k must have the shape of q, got k.shape={tuple(k.shape)}, q.shape={tuple(q.shape)}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"{op}: v must match q in every dimension but the last (head_dim), "
            f"got v.shape={tuple(v.shape)}, q.shape={tuple(q.shape)}"
        )
    spatial = tuple(q.shape[1:-2])
    heads, head_dim = q.shape[-2], q.shape[-1]
    kernel_size = check_axis_arg(op, "kernel_size", kernel_size, na_dim, 2)
    dilation = check_axis_arg(op, "dilation", dilation, na_dim, 1)
    stride = check_axis_arg(op, "stride", stride, na_dim, 1)
    is_causal = check_bool_axis_arg(op, "is_causal", is_causal, na_dim)
    for ax, (L, kk, d, s) in enumerate(zip(spatial, kernel_size, dilation, stride)):
        if kk * d > L:
            raise ValueError(
                f"{op}: kernel_size * dilation must not exceed the axis length, got "
                f"kernel_size={kk} * dilation={d} = {kk * d} > {L} on spatial axis {ax} (q.shape={tuple(q.shape)}); "
                f"pad the input (as the NAT/DiNAT layers do) or lower the dilation"
            )
        if s > kk:
            raise ValueError(f"{op}: stride must not exceed kernel_size, got stride={s} > kernel_size={kk} on spatial axis {ax}")
    if rpb is not None:
        if not isinstance(rpb, Tensor):
            raise TypeError(f"{op}: rpb must be a torch.Tensor or None, got {type(rpb).__name__}")
        expected = (heads,) + tuple(2 * kk - 1 for kk in kernel_size)
        if tuple(rpb.shape) != expected:
            raise ValueError(f"{op}: rpb must have shape [heads, 2k-1, ...] = {list(expected)}, got rpb.shape={list(rpb.shape)}")
        if rpb.dtype not in (q.dtype, torch.float32):
            raise ValueError(f"{op}: rpb must have the dtype of q or float32, got rpb.dtype={rpb.dtype}, q.dtype={q.dtype}")
        if rpb.device != q.device:
            raise ValueError(f"{op}: rpb must be on the device of q, got rpb.device={rpb.device}, q.device={q.device}")
    scale = check_scale_arg(op, scale, head_dim)
    cfg = dict(kernel_size=kernel_size, dilation=dilation, stride=stride, is_causal=is_causal)
    name = NA_BACKENDS.choose(backend, q, k, v, rpb, **cfg)
    return name, list(kernel_size), list(dilation), list(stride), list(is_causal), scale


def resolve_call(q, k, v, kernel_size, dilation, stride, is_causal, rpb, scale, backend, na_dim):
    """``(backend name, kernel_size, dilation, stride, is_causal, scale)`` of a call, as the custom op
    takes them, after its checks (once per call signature; raises as :func:`na2d` does)."""
    resolved = key = None
    if not torch.compiler.is_compiling():  # dynamo folds the checks into the graph instead
        try:
            key = (na_dim, q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
                   None if rpb is None else (rpb.shape, rpb.dtype, rpb.device), _hashable(kernel_size),
                   _hashable(dilation), _hashable(stride), _hashable(is_causal), scale, backend,
                   env(BACKEND_ENV))
            resolved = _CHECKED.get(key)
        except (AttributeError, TypeError):  # not tensors, or unhashable arguments: the checks say why
            key = None
    if resolved is None:
        resolved = _check_call(q, k, v, kernel_size, dilation, stride, is_causal, rpb, scale, backend, na_dim)
        if key is not None:
            if len(_CHECKED) > 4096:
                _CHECKED.clear()
            _CHECKED[key] = resolved
    return resolved


# -- public API -----------------------------------------------------------------------------------

def neighborhood_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel_size: IntOrTuple,
    dilation: IntOrTuple = 1,
    stride: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    rpb: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    *,
    backend: str = "auto",
    na_dim: Optional[int] = None,
):
    """Rank-generic neighborhood attention; ``na1d``/``na2d``/``na3d`` fix ``na_dim``.

    See :func:`na2d` for the arguments.
    """
    resolved = resolve_call(q, k, v, kernel_size, dilation, stride, is_causal, rpb, scale, backend, na_dim)
    if not isinstance(return_lse, bool):
        raise TypeError(f"na{q.dim() - 3 if na_dim is None else na_dim}d: return_lse must be a bool, "
                        f"got {type(return_lse).__name__}")
    name, kernel_size, dilation, stride, is_causal, scale = resolved
    args = (q, k, v, rpb, kernel_size, dilation, stride, is_causal, scale, name)
    if not _eager_ok(q, k, v, rpb):
        out, lse = _na_fwd(*args)
    elif torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                      or (rpb is not None and rpb.requires_grad)):
        out, lse = _EagerNA.apply(*args)
    else:  # nothing to differentiate: no autograd node
        out, lse = NA_BACKENDS[name].fwd(q, k, v, rpb, kernel_size, dilation, stride, is_causal, scale)
    return (out, lse) if return_lse else out


_NA_DOC = """{rank}-D neighborhood attention (NA / dilated / strided / causal), heads-last layout.

    Every query attends to the ``prod(kernel_size)`` keys of its neighborhood (fewer when causal):
    per axis, a window of ``kernel_size`` keys from the query's dilation group, shifted inward at
    the borders instead of padded. ``out = softmax(scale * q @ k^T + bias) @ v`` over those keys.

    Args:
        q: queries ``{layout}``, floating point; a strided view (e.g. a slice of a fused qkv
            projection) is read in place.
        k: keys, the shape, dtype and device of ``q``.
        v: values ``{layout_v}``.
        kernel_size: window size per axis (an int or a tuple of {rank}), each >= 2.
        dilation: dilation per axis, >= 1; ``kernel_size * dilation`` must not exceed the axis.
        stride: query stride per axis (GNA), ``1 <= stride <= kernel_size``.
        is_causal: causal masking per axis (a bool or a tuple of {rank}).
        rpb: optional relative positional bias ``{rpb}``, dtype of ``q`` or float32, indexed by
            (key - query) / dilation + kernel_size - 1 on every axis; it receives a gradient.
        scale: logit scale, default ``head_dim ** -0.5`` (an explicit 0.0 is honoured).
        return_lse: also return the log-sum-exp of the logits (float32; float64 for float64 inputs), ``{lse}``.

    Other Parameters:
        backend: ``"auto"`` (the best backend that can run the call; the environment variable
            ``FOVEAL_BACKEND`` overrides it), ``"reference"`` (pure PyTorch, any device), or
            ``"triton"`` once registered. An unavailable backend raises with the reason.

    Returns:
        ``out`` ``{layout_v}`` in the dtype of ``q``, or ``(out, lse)`` when ``return_lse``.

    Raises:
        TypeError: a non-tensor or non-floating input, or a badly typed argument.
        ValueError: shape/dtype/device mismatch, ``kernel_size * dilation`` larger than an axis,
            ``stride > kernel_size``, or a wrong ``rpb`` shape.

    Example:
        >>> q = k = v = torch.randn({example})
        >>> na{rank}d(q, k, v, kernel_size={example_k}).shape
        torch.Size([{example_shape}])
    """


def na1d(
    q: Tensor, k: Tensor, v: Tensor, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
    stride: IntOrTuple = 1, is_causal: BoolOrTuple = False, rpb: Optional[Tensor] = None,
    scale: Optional[float] = None, return_lse: bool = False, *, backend: str = "auto",
):
    return neighborhood_attention(q, k, v, kernel_size, dilation, stride, is_causal, rpb, scale, return_lse,
                                  backend=backend, na_dim=1)


def na2d(
    q: Tensor, k: Tensor, v: Tensor, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
    stride: IntOrTuple = 1, is_causal: BoolOrTuple = False, rpb: Optional[Tensor] = None,
    scale: Optional[float] = None, return_lse: bool = False, *, backend: str = "auto",
):
    return neighborhood_attention(q, k, v, kernel_size, dilation, stride, is_causal, rpb, scale, return_lse,
                                  backend=backend, na_dim=2)


def na3d(
    q: Tensor, k: Tensor, v: Tensor, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
    stride: IntOrTuple = 1, is_causal: BoolOrTuple = False, rpb: Optional[Tensor] = None,
    scale: Optional[float] = None, return_lse: bool = False, *, backend: str = "auto",
):
    return neighborhood_attention(q, k, v, kernel_size, dilation, stride, is_causal, rpb, scale, return_lse,
                                  backend=backend, na_dim=3)


for _fn, _rank, _sp, _ex, _exk in (
    (na1d, 1, "L", "2, 16, 4, 32", "5"),
    (na2d, 2, "H, W", "2, 14, 14, 4, 32", "7"),
    (na3d, 3, "X, Y, Z", "1, 8, 8, 8, 2, 16", "(3, 5, 5)"),
):
    _fn.__doc__ = _NA_DOC.format(
        rank=_rank,
        layout=f"[B, {_sp}, heads, head_dim]",
        layout_v=f"[B, {_sp}, heads, head_dim_v]",
        rpb="[heads" + ", 2k-1" * _rank + "]",
        lse=f"[B, {_sp}, heads]",
        example=_ex,
        example_k=_exk,
        example_shape=_ex,
    )
