"""Fused residual add + LayerNorm over the last dim, for channels-last pre-norm blocks.

``h, s = add_layer_norm(x, residual, weight, bias)`` is ``s = x + residual`` (in the promoted
dtype: under autocast the float32 residual stream stays float32) followed by ``h = LayerNorm(s)``
with float32 statistics, ``h`` written once in the dtype the next Linear consumes. It replaces the
add, the LayerNorm (which PyTorch runs in float32 under autocast) and the cast before the Linear.

The ops are the torch custom ops ``foveal::add_layer_norm_fwd`` / ``foveal::add_layer_norm_bwd``
with fake implementations and autograd, so ``torch.compile(fullgraph=True)``, the meta device and
export see one opaque op; eager calls on plain tensors skip the dispatcher (see
:mod:`foveal.kernels.dispatch`). Backends (see :mod:`foveal.kernels.backends`) plug in through
``NORM_BACKENDS``: ``"triton"`` (``norm_triton.py``) and ``"reference"`` (below: the unfused
PyTorch composition, in float32, on any device). No FLOP formula is registered: torch's FLOP
counter counts matmul-like products only, and none of its norms.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends import BACKEND_ENV, Backend, BackendRegistry
from .dispatch import custom_op, eager_ok, env

__all__ = ["add_layer_norm", "add_layer_norm_linear", "NORM_BACKENDS", "linear_input_dtype"]


def linear_input_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a Linear consumes a ``dtype`` input in: autocast's when it is on for ``device_type``."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the statistics (mean, rstd) and of the math: float32, float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


# -- reference backend ----------------------------------------------------------------------------

def _reference_probe(x, residual, weight, bias, *, out_dtype) -> Optional[str]:
    return None


def add_layer_norm_reference_fwd(x, residual, weight, bias, eps: float, out_dtype: torch.dtype):
    """``(h, s, mean, rstd)`` by the unfused ops; ``s`` is None without a residual."""
    s = None if residual is None else torch.add(x, residual).contiguous()
    src = x if s is None else s
    compute = stats_dtype(src.dtype)
    h, mean, rstd = torch.ops.aten.native_layer_norm(
        src.to(compute), [src.shape[-1]], None if weight is None else weight.to(compute),
        None if bias is None else bias.to(compute), eps)
    return h.to(out_dtype), s, mean.view(-1), rstd.view(-1)


def add_layer_norm_reference_bwd(grad_h, grad_s, s, weight, mean, rstd, x_dtype: torch.dtype,
                                 dres_dtype: Optional[torch.dtype], bias_dtype: Optional[torch.dtype]):
    """``(dx, dres, dweight, dbias)`` by PyTorch's LayerNorm backward; None where absent."""
    compute = mean.dtype
    C = s.shape[-1]
    g = grad_h.to(compute)
    stats_shape = s.shape[:-1] + (1,)
    ds, dweight, _ = torch.ops.aten.native_layer_norm_backward(
        g, s.to(compute), [C], mean.view(stats_shape), rstd.view(stats_shape),
        None if weight is None else weight.to(compute), None, [True, weight is not None, False])
    if grad_s is not None:
        ds.add_(grad_s)  # in place: keeps the fresh gradient's contiguous layout
    dres = None if dres_dtype is None else ds.to(dres_dtype)
    dweight = None if weight is None else dweight.to(weight.dtype)
    dbias = None if bias_dtype is None else g.reshape(-1, C).sum(0).to(bias_dtype)
    return ds.to(x_dtype), dres, dweight, dbias


NORM_BACKENDS = BackendRegistry("add_layer_norm")
NORM_BACKENDS.register(Backend("reference", _reference_probe, add_layer_norm_reference_fwd,
                               add_layer_norm_reference_bwd))

try:  # the Triton backend is optional: foveal imports without triton
    from .norm_triton import add_layer_norm_triton_bwd, add_layer_norm_triton_fwd, add_layer_norm_triton_probe
except ImportError as _err:  # pragma: no cover - depends on the environment
    from .backends import logger as _logger

    _logger.debug("add_layer_norm: Triton backend unavailable: %s", _err)
else:
    NORM_BACKENDS.register(Backend("triton", add_layer_norm_triton_probe, add_layer_norm_triton_fwd,
                                   add_layer_norm_triton_bwd), first=True)


# -- custom ops -----------------------------------------------------------------------------------
# Forward: (h, s, mean, rstd), mean and rstd flat over the rows ([x.numel() // C], stats_dtype),
# saved for the backward. Backward: (dx, dres, dweight, dbias); dres is written only when the
# residual's dtype differs from x's (else the residual's gradient is dx). Custom ops return no None
# and no alias of an input: an empty tensor stands for "absent" (s without a residual, dres,
# dweight / dbias without weight / bias). The backends' launchers return None instead.

@custom_op("foveal::add_layer_norm_fwd")
def _add_layer_norm_fwd(
    x: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    out_dtype: torch.dtype,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    h, s, mean, rstd = NORM_BACKENDS[backend].fwd(x, residual, weight, bias, eps, out_dtype)
    return h, s if s is not None else x.new_empty(0), mean, rstd


@_add_layer_norm_fwd.register_fake
def _add_layer_norm_fwd_fake(x, residual, weight, bias, eps, out_dtype, backend):
    h = x.new_empty(x.shape, dtype=out_dtype)
    if residual is None:
        s, compute = x.new_empty(0), stats_dtype(x.dtype)
    else:
        s = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype))
        compute = stats_dtype(s.dtype)
    mean = x.new_empty(x.numel() // x.shape[-1], dtype=compute)
    return h, s, mean, torch.empty_like(mean)


@custom_op("foveal::add_layer_norm_bwd")
def _add_layer_norm_bwd(
    grad_h: Tensor,
    grad_s: Optional[Tensor],
    s: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    x_dtype: torch.dtype,
    dres_dtype: Optional[torch.dtype],
    bias_dtype: Optional[torch.dtype],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = NORM_BACKENDS[backend].bwd(grad_h, grad_s, s, weight, mean, rstd, x_dtype, dres_dtype, bias_dtype)
    return tuple(g if g is not None else s.new_empty(0) for g in grads)


@_add_layer_norm_bwd.register_fake
def _add_layer_norm_bwd_fake(grad_h, grad_s, s, weight, mean, rstd, x_dtype, dres_dtype, bias_dtype, backend):
    C = s.shape[-1]
    dx = s.new_empty(s.shape, dtype=x_dtype)
    dres = s.new_empty(s.shape, dtype=dres_dtype) if dres_dtype is not None else s.new_empty(0)
    dweight = torch.empty_like(weight) if weight is not None else s.new_empty(0)
    dbias = s.new_empty(C, dtype=bias_dtype) if bias_dtype is not None else s.new_empty(0)
    return dx, dres, dweight, dbias


def _grad_cfg(x, residual, bias, backend):
    """What the backward needs besides the saved tensors."""
    dres_dtype = residual.dtype if residual is not None and residual.dtype != x.dtype else None
    return x.dtype, dres_dtype, (bias.dtype if bias is not None else None), residual is not None, backend


def _input_grads(dx, dres, dweight, dbias, has_res, has_dres, has_weight, has_bias):
    return (dx, (dres if has_dres else dx) if has_res else None, dweight if has_weight else None,
            dbias if has_bias else None, None, None, None)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, out_dtype, backend = inputs
    h, s, mean, rstd = output
    ctx.save_for_backward(x if residual is None else s, weight, mean, rstd)
    ctx.cfg = _grad_cfg(x, residual, bias, backend)


def _backward(ctx, grad_h, grad_s, grad_mean, grad_rstd):
    s, weight, mean, rstd = ctx.saved_tensors
    x_dtype, dres_dtype, bias_dtype, has_res, backend = ctx.cfg
    grads = _add_layer_norm_bwd(grad_h, grad_s if has_res else None, s, weight, mean, rstd, x_dtype, dres_dtype,
                                bias_dtype, backend)
    return _input_grads(*grads, has_res, dres_dtype is not None, weight is not None, bias_dtype is not None)


_add_layer_norm_fwd.register_autograd(_backward, _setup_context)


class _EagerAddLayerNorm(torch.autograd.Function):
    """``foveal::add_layer_norm_fwd`` and its autograd without the custom-op dispatcher.

    Returns ``h`` alone without a residual (``s`` is then ``x``, outside this node), else ``(h, s)``.
    """

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, out_dtype, backend):
        h, s, mean, rstd = NORM_BACKENDS[backend].fwd(x, residual, weight, bias, eps, out_dtype)
        ctx.save_for_backward(x if s is None else s, weight, mean, rstd)
        ctx.cfg = _grad_cfg(x, residual, bias, backend)
        ctx.out_dtype = out_dtype
        ctx.set_materialize_grads(False)
        return h if s is None else (h, s)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h, grad_s=None):
        s, weight, mean, rstd = ctx.saved_tensors
        x_dtype, dres_dtype, bias_dtype, has_res, backend = ctx.cfg
        if grad_h is None:
            grad_h = torch.zeros_like(s, dtype=ctx.out_dtype)
        grads = NORM_BACKENDS[backend].bwd(grad_h, grad_s, s, weight, mean, rstd, x_dtype, dres_dtype, bias_dtype)
        return _input_grads(*grads, has_res, dres_dtype is not None, weight is not None, bias_dtype is not None)


# -- public API -----------------------------------------------------------------------------------

# call signature -> (backend, out_dtype, eps): the checks and the backend choice, once per signature
_CHECKED: dict = {}


def _meta(t: Optional[Tensor]):
    return None if t is None else (t.shape, t.dtype, t.device, type(t) is Tensor or isinstance(t, Tensor))


def _check_args(x, residual, weight, bias, eps, out_dtype) -> None:
    op = "add_layer_norm"
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must have a floating dtype, got x.dtype={x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last dim to normalize over, got x.shape={tuple(x.shape)}")
    C = x.shape[-1]
    for name, t, shape in (("residual", residual, tuple(x.shape)), ("weight", weight, (C,)), ("bias", bias, (C,))):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must have a floating dtype, got {name}.dtype={t.dtype}")
        if tuple(t.shape) != shape:
            rule = "the shape of x" if name == "residual" else "shape [C] with C = x.shape[-1]"
            raise ValueError(f"{op}: {name} must have {rule}, got {name}.shape={tuple(t.shape)}, "
                             f"x.shape={tuple(x.shape)}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} must be on the device of x, got {name}.device={t.device}, "
                             f"x.device={x.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{op}: eps must be a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{op}: eps must be finite and > 0, got eps={eps}")
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point):
        raise TypeError(f"{op}: out_dtype must be a floating torch.dtype or None, got out_dtype={out_dtype!r}")


def add_layer_norm(
    x: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float = 1e-5,
    out_dtype: Optional[torch.dtype] = None,
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Residual add then LayerNorm over the last dim: ``s = x + residual``, ``h = LayerNorm(s)``.

    ``h = (s - mean) * rstd * weight + bias`` with ``mean`` and ``rstd = 1 / sqrt(var + eps)``
    (biased variance) of each row of ``s``, computed in float32 (float64 for float64 inputs),
    rounded once to ``out_dtype``. The result matches ``s = x + residual;
    h = F.layer_norm(s, ...).to(out_dtype)`` (LayerNorm in float32 under autocast) to rounding,
    and so do the gradients of ``x``, ``residual``, ``weight`` and ``bias``, given the gradient of
    ``h`` and, when ``s`` is used further (the residual stream), the gradient of ``s``.

    Args:
        x: ``[*, C]``, floating point, any leading shape; a strided view is read in place when its
            last dim is unit-stride (else it is copied).
        residual: ``[*, C]`` like ``x`` (any floating dtype, same device), or None for no add.
            ``s = x + residual`` is computed in ``torch.promote_types(x.dtype, residual.dtype)``:
            under autocast a float32 residual stream plus a bfloat16 branch output stays float32.
        weight: ``[C]`` scale, or None (no scale).
        bias: ``[C]`` shift, or None (no shift).
        eps: added to the variance, finite and > 0.
        out_dtype: dtype of ``h``. None: what autocast feeds the next Linear, i.e.
            ``torch.get_autocast_dtype(device_type)`` when autocast is enabled for the device type
            of ``x``, else the dtype of ``s``.

    Other Parameters:
        backend: ``"auto"`` (the best backend that can run the call; the environment variable
            ``FOVEAL_BACKEND`` overrides it), ``"triton"`` (CUDA tensors, or CPU tensors under
            ``TRITON_INTERPRET=1``) or ``"reference"`` (pure PyTorch, any device). An unavailable
            backend raises with the reason.

    Returns:
        ``(h, s)``: ``h`` ``[*, C]`` contiguous in ``out_dtype``; ``s`` ``[*, C]`` contiguous in
        the promoted dtype, or ``x`` itself when ``residual`` is None. Gradients of ``x`` and
        ``residual`` come in their own dtypes.

    Raises:
        TypeError: a non-tensor or non-floating input, a non-float ``eps`` or a bad ``out_dtype``.
        ValueError: ``residual`` not of the shape of ``x``, ``weight`` / ``bias`` not ``[C]``, a
            device mismatch, an empty last dim, or ``eps`` not finite and > 0.

    Example:
        >>> x, y = torch.randn(2, 7, 7, 64), torch.randn(2, 7, 7, 64)
        >>> h, s = add_layer_norm(x, y, torch.ones(64), torch.zeros(64))
        >>> h.shape, torch.equal(s, x + y)
        (torch.Size([2, 7, 7, 64]), True)
    """
    name, out_dtype, eps = _resolve(x, residual, weight, bias, eps, out_dtype, backend)
    if not eager_ok(x, residual, weight, bias):
        h, s, _, _ = _add_layer_norm_fwd(x, residual, weight, bias, eps, out_dtype, name)
    elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, weight, bias)):
        out = _EagerAddLayerNorm.apply(x, residual, weight, bias, eps, out_dtype, name)
        h, s = (out, None) if residual is None else out
    else:  # nothing to differentiate: no autograd node
        h, s, _, _ = NORM_BACKENDS[name].fwd(x, residual, weight, bias, eps, out_dtype)
    return h, (x if residual is None else s)


def _resolve(x, residual, weight, bias, eps, out_dtype, backend) -> tuple:
    """``(backend name, out_dtype, eps)`` of a call, after its checks (once per call signature)."""
    name = key = None
    if not torch.compiler.is_compiling():  # a model calls this tens of times per step with a few signatures
        try:
            key = (x.shape, x.dtype, x.device, _meta(residual), _meta(weight), _meta(bias), eps, out_dtype, backend,
                   env(BACKEND_ENV), torch.is_autocast_enabled(x.device.type),
                   torch.get_autocast_dtype(x.device.type))
            name, out_dtype, eps = _CHECKED[key]
        except (AttributeError, TypeError, KeyError, RuntimeError):  # unusual input: the checks below decide
            name = None
    if name is None:
        _check_args(x, residual, weight, bias, eps, out_dtype)
        eps = float(eps)
        if out_dtype is None:
            s_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
            out_dtype = linear_input_dtype(x.device.type, s_dtype)
        name = NORM_BACKENDS.choose(backend, x, residual, weight, bias, out_dtype=out_dtype)
        if key is not None:
            if len(_CHECKED) > 4096:
                _CHECKED.clear()
            _CHECKED[key] = (name, out_dtype, eps)
    return name, out_dtype, eps


def add_layer_norm_linear(
    x: Tensor,
    residual: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """``s = x + residual`` and ``F.linear(LayerNorm(s), linear_weight, linear_bias)``, keeping ``s``
    but not the normalized ``h`` for the backward, which recomputes ``h`` from ``s``.

    The results are those of :func:`add_layer_norm` (``out_dtype`` None) followed by ``F.linear``;
    the gradients match theirs to rounding. A pre-norm block keeps ``s`` (the residual stream) for
    the norm's backward anyway, so the saved ``h`` (``C`` elements a token in the Linear's dtype)
    is what this saves, for one more norm pass in the backward. The single autograd node is used
    for eager calls that need gradients; elsewhere (no grad, ``torch.compile``, dispatch modes) it
    is the two ops.

    Args:
        x, residual, weight, bias, eps, backend: as for :func:`add_layer_norm` (``residual`` is required).
        linear_weight: ``[N, C]`` weight of the Linear that consumes the normalized stream.
        linear_bias: ``[N]`` bias of that Linear, or None.

    Returns:
        ``(out, s)``: ``out`` ``[*, linear_weight.shape[0]]``; ``s`` as :func:`add_layer_norm` returns it.
    """
    if not isinstance(residual, Tensor):
        raise TypeError(f"add_layer_norm_linear: residual must be a torch.Tensor, got {type(residual).__name__}")
    tensors = (x, residual, weight, bias, linear_weight, linear_bias)
    if not (eager_ok(*tensors) and torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in tensors)):
        h, s = add_layer_norm(x, residual, weight, bias, eps, backend=backend)
        return F.linear(h, linear_weight, linear_bias), s
    name, out_dtype, eps = _resolve(x, residual, weight, bias, eps, None, backend)
    return _EagerAddLayerNormLinear.apply(x, residual, weight, bias, linear_weight, linear_bias, eps, out_dtype, name)


class _EagerAddLayerNormLinear(torch.autograd.Function):
    """:func:`add_layer_norm` then ``F.linear`` as one node that saves ``s``, not the norm output."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, lin_weight, lin_bias, eps, out_dtype, backend):
        h, s, mean, rstd = NORM_BACKENDS[backend].fwd(x, residual, weight, bias, eps, out_dtype)
        ctx.lin_dtypes = (lin_weight.dtype, None if lin_bias is None else lin_bias.dtype)
        if torch.is_autocast_enabled(h.device.type):  # the casts autocast's linear makes, kept for the backward
            lin_weight = lin_weight.to(h.dtype)
            lin_bias = None if lin_bias is None else lin_bias.to(h.dtype)
        out = F.linear(h, lin_weight, lin_bias)
        ctx.save_for_backward(s, weight, bias, mean, rstd, lin_weight)
        ctx.cfg = _grad_cfg(x, residual, bias, backend)
        ctx.norm = (eps, out_dtype)
        ctx.set_materialize_grads(False)
        return out, s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_s):
        s, weight, bias, mean, rstd, lin_weight = ctx.saved_tensors
        x_dtype, dres_dtype, bias_dtype, has_res, backend = ctx.cfg
        eps, out_dtype = ctx.norm
        w_dtype, b_dtype = ctx.lin_dtypes
        grad_lw = grad_lb = None
        if grad_out is None:
            grad_h = torch.zeros_like(s, dtype=out_dtype)
        else:
            h = NORM_BACKENDS[backend].fwd(s, None, weight, bias, eps, out_dtype)[0]  # the forward's h, recomputed
            g = grad_out.reshape(-1, grad_out.shape[-1])
            grad_h = (g @ lin_weight.to(g.dtype)).view(s.shape)
            if ctx.needs_input_grad[4]:
                grad_lw = (g.t() @ h.reshape(-1, h.shape[-1]).to(g.dtype)).to(w_dtype)
            if b_dtype is not None and ctx.needs_input_grad[5]:
                grad_lb = g.sum(0).to(b_dtype)
        grads = NORM_BACKENDS[backend].bwd(grad_h, grad_s, s, weight, mean, rstd, x_dtype, dres_dtype, bias_dtype)
        dx, dres, dweight, dbias = _input_grads(*grads, has_res, dres_dtype is not None, weight is not None,
                                                bias_dtype is not None)[:4]
        return dx, dres, dweight, dbias, grad_lw, grad_lb, None, None, None
