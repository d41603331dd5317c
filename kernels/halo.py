"""Halo attention (HaloNet; SPEC section 2), the op behind timm's ``HaloAttn``.

Non-overlapping query blocks each attend to the window of keys centred on their block, ``halo_size``
wider on every side. Window positions outside the map are zero keys with zero values and are not
masked: they get the positional logit only (timm zero-pads the projected keys and values). The
positional logit is decomposed and query dependent (BoTNet style), one height and one width table
shared by all heads. The geometry is written out in :mod:`foveal.kernels.halo_reference`.

The ops are the torch custom ops ``foveal::halo_fwd`` / ``foveal::halo_bwd`` with fake
implementations, autograd and FLOP formulas, so ``torch.compile(fullgraph=True)``, the meta device
and export see one opaque op; eager calls on plain tensors skip the dispatcher (see
:mod:`foveal.kernels.dispatch`). Backends plug in through ``HALO_BACKENDS``.
"""
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .backends import BACKEND_ENV, Backend, BackendRegistry
from .checks import check_scale_arg, check_tensors
from .dispatch import CheckCache, custom_op, eager_ok, env
from .halo_reference import halo_reference_bwd, halo_reference_fwd
from .neighborhood_reference import lse_dtype

__all__ = ["halo2d", "HALO_BACKENDS"]

_OP = "halo2d"


def _reference_probe(*tensors, **cfg) -> Optional[str]:
    return None


HALO_BACKENDS = BackendRegistry("halo_attention")
HALO_BACKENDS.register(Backend("reference", _reference_probe, halo_reference_fwd, halo_reference_bwd))

try:  # the Triton backend is optional: foveal imports without triton
    from .halo_triton import halo_triton_bwd, halo_triton_fwd, halo_triton_probe
except ImportError as _err:  # pragma: no cover - depends on the environment
    from .backends import logger as _logger

    _logger.debug("halo_attention: Triton backend unavailable: %s", _err)
else:
    HALO_BACKENDS.register(Backend("triton", halo_triton_probe, halo_triton_fwd, halo_triton_bwd), first=True)


# -- custom ops -----------------------------------------------------------------------------------
# Custom ops return no None: an empty tensor stands for the gradient of an absent rel table.

@custom_op("foveal::halo_fwd")
def _halo_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel_h: Optional[Tensor],
    rel_w: Optional[Tensor],
    block_size: int,
    halo_size: int,
    stride: int,
    scale: float,
    scale_rel: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return HALO_BACKENDS[backend].fwd(q, k, v, rel_h, rel_w, block_size, halo_size, stride, scale, scale_rel)


@_halo_fwd.register_fake
def _halo_fwd_fake(q, k, v, rel_h, rel_w, block_size, halo_size, stride, scale, scale_rel, backend):
    return q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(q.shape[:-1], dtype=lse_dtype(q.dtype))


@custom_op("foveal::halo_bwd")
def _halo_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel_h: Optional[Tensor],
    rel_w: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    grad_lse: Optional[Tensor],
    block_size: int,
    halo_size: int,
    stride: int,
    scale: float,
    scale_rel: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, drh, drw = HALO_BACKENDS[backend].bwd(grad_out, q, k, v, rel_h, rel_w, out, lse, grad_lse,
                                                      block_size, halo_size, stride, scale, scale_rel)
    empty = q.new_empty(0)
    return dq, dk, dv, empty if drh is None else drh, empty if drw is None else drw


@_halo_bwd.register_fake
def _halo_bwd_fake(grad_out, q, k, v, rel_h, rel_w, out, lse, grad_lse, block_size, halo_size, stride, scale,
                   scale_rel, backend):
    drh = q.new_empty(0) if rel_h is None else torch.empty_like(rel_h)
    drw = q.new_empty(0) if rel_w is None else torch.empty_like(rel_w)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), drh, drw


def _setup_context(ctx, inputs, output):
    q, k, v, rel_h, rel_w, *cfg = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, rel_h, rel_w, out, lse)
    ctx.cfg = tuple(cfg)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, rel_h, rel_w, out, lse = ctx.saved_tensors
    dq, dk, dv, drh, drw = _halo_bwd(grad_out, q, k, v, rel_h, rel_w, out, lse, grad_lse, *ctx.cfg)
    has_rel = rel_h is not None
    return dq, dk, dv, drh if has_rel else None, drw if has_rel else None, None, None, None, None, None, None


_halo_fwd.register_autograd(_backward, _setup_context)


class _EagerHalo(torch.autograd.Function):
    """``foveal::halo_fwd`` and its autograd without the custom-op dispatcher (eager plain tensors)."""

    @staticmethod
    def forward(ctx, q, k, v, rel_h, rel_w, block_size, halo_size, stride, scale, scale_rel, backend):
        cfg = (block_size, halo_size, stride, scale, scale_rel)
        out, lse = HALO_BACKENDS[backend].fwd(q, k, v, rel_h, rel_w, *cfg)
        ctx.save_for_backward(q, k, v, rel_h, rel_w, out, lse)
        ctx.cfg = cfg
        ctx.backend = backend
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, rel_h, rel_w, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv, drh, drw = HALO_BACKENDS[ctx.backend].bwd(grad_out, q, k, v, rel_h, rel_w, out, lse, grad_lse,
                                                              *ctx.cfg)
        return dq, dk, dv, drh, drw, None, None, None, None, None, None


# -- FLOP counting --------------------------------------------------------------------------------
# The convention of foveal::na_fwd (torch.utils.flop_counter): 2 FLOPs per multiply-add over the
# attended (query, key) pairs, forward QK^T and PV, backward twice that. Every query attends its
# whole (b + 2h)^2 window, border positions included. The positional logits (two [queries, 2win-1]
# products) are not counted, like a bias.

def _halo_flops(q_shape, v_shape, block_size, halo_size) -> int:
    batch, hq, wq, heads, head_dim = q_shape
    return 2 * batch * heads * hq * wq * (block_size + 2 * halo_size) ** 2 * (head_dim + v_shape[-1])


@register_flop_formula(torch.ops.foveal.halo_fwd)
def _halo_fwd_flop(q_shape, k_shape, v_shape, rel_h_shape, rel_w_shape, block_size, halo_size, stride, scale,
                   scale_rel, backend, out_shape=None, **kwargs) -> int:
    return _halo_flops(q_shape, v_shape, block_size, halo_size)


@register_flop_formula(torch.ops.foveal.halo_bwd)
def _halo_bwd_flop(grad_out_shape, q_shape, k_shape, v_shape, rel_h_shape, rel_w_shape, out_shape_, lse_shape,
                   grad_lse_shape, block_size, halo_size, stride, scale, scale_rel, backend, out_shape=None,
                   **kwargs) -> int:
    return 2 * _halo_flops(q_shape, v_shape, block_size, halo_size)


# -- checks ---------------------------------------------------------------------------------------

_CHECKED = CheckCache()


def _int_arg(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{_OP}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{_OP}: {name} must be >= {minimum}, got {name}={value}")
    return value


def _check_rel(name: str, rel, q: Tensor, win: int) -> None:
    if not isinstance(rel, Tensor):
        raise TypeError(f"{_OP}: {name} must be a torch.Tensor or None, got {type(rel).__name__}")
    expected = (2 * win - 1, q.shape[-1])
    if tuple(rel.shape) != expected:
        raise ValueError(f"{_OP}: {name} must have shape [2 * (block_size + 2 * halo_size) - 1, head_dim] = "
                         f"{list(expected)}, got {name}.shape={list(rel.shape)}")
    if rel.dtype not in (q.dtype, torch.float32):
        raise ValueError(f"{_OP}: {name} must have the dtype of q or float32, got {name}.dtype={rel.dtype}, "
                         f"q.dtype={q.dtype}")
    if rel.device != q.device:
        raise ValueError(f"{_OP}: {name} must be on the device of q, got {name}.device={rel.device}, "
                         f"q.device={q.device}")


def _check_call(q, k, v, block_size, halo_size, stride, rel_h, rel_w, scale, scale_rel, backend):
    """Validates one call; returns (backend name, scale) as the custom op takes them."""
    check_tensors(_OP, ("q", "k", "v"), (q, k, v), 5)
    block_size = _int_arg("block_size", block_size, 1)
    halo_size = _int_arg("halo_size", halo_size, 0)
    stride = _int_arg("stride", stride, 1)
    B, H, W, heads, D = k.shape
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"{_OP}: v must match k in every dimension but the last (head_dim_v), "
                         f"got v.shape={tuple(v.shape)}, k.shape={tuple(k.shape)}")
    if H % block_size or W % block_size:
        raise ValueError(f"{_OP}: the map must be a whole number of blocks: H and W divisible by "
                         f"block_size={block_size}, got k.shape={tuple(k.shape)} (H={H}, W={W}); "
                         f"pad or resize the input")
    if block_size % stride:
        raise ValueError(f"{_OP}: stride must divide block_size, got stride={stride}, block_size={block_size}")
    expected = (B, H // stride, W // stride, heads, D)
    if tuple(q.shape) != expected:
        raise ValueError(f"{_OP}: q must have shape [B, H / stride, W / stride, heads, head_dim] = {list(expected)} "
                         f"for k.shape={tuple(k.shape)} and stride={stride}, got q.shape={tuple(q.shape)}")
    if (rel_h is None) != (rel_w is None):
        raise ValueError(f"{_OP}: rel_h and rel_w come together (both tensors or both None), got "
                         f"rel_h={'None' if rel_h is None else 'a tensor'}, "
                         f"rel_w={'None' if rel_w is None else 'a tensor'}")
    win = block_size + 2 * halo_size
    if rel_h is not None:
        _check_rel("rel_h", rel_h, q, win)
        _check_rel("rel_w", rel_w, q, win)
    if not isinstance(scale_rel, bool):
        raise TypeError(f"{_OP}: scale_rel must be a bool, got {type(scale_rel).__name__}")
    scale = check_scale_arg(_OP, scale, D)
    cfg = dict(block_size=block_size, halo_size=halo_size, stride=stride)
    return HALO_BACKENDS.choose(backend, q, k, v, rel_h, rel_w, **cfg), scale


# -- public API -----------------------------------------------------------------------------------

def halo2d(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_size: int,
    halo_size: int,
    stride: int = 1,
    rel_h: Optional[Tensor] = None,
    rel_w: Optional[Tensor] = None,
    scale: Optional[float] = None,
    scale_rel: bool = False,
    return_lse: bool = False,
    *,
    backend: str = "auto",
):
    """2-D halo attention (HaloNet), heads-last layout; equals timm's ``HaloAttn`` core.

    The key map is cut into ``block_size`` blocks; query block ``(by, bx)`` (``block_size / stride``
    queries per side) attends to every position of the ``win x win`` window, ``win = block_size +
    2 * halo_size``, that starts ``halo_size`` above and left of key block ``(by, bx)``. Positions
    outside the map count as zero keys with zero values (not masked). For a query at ``(qy, qx)``
    inside its block and window position ``(ky, kx)``::

        logit = scale * <q, k> + c * (<q, rel_h[ky - qy + win - 1]> + <q, rel_w[kx - qx + win - 1]>)

    with ``c = scale`` when ``scale_rel`` else 1, and ``out = softmax(logits) @ v`` over the window.

    Args:
        q: queries ``[B, H / stride, W / stride, heads, head_dim]``, floating point; a strided view
            (e.g. a permuted NCHW projection) is read in place.
        k: keys ``[B, H, W, heads, head_dim]``, the dtype and device of ``q``.
        v: values ``[B, H, W, heads, head_dim_v]``.
        block_size: key block size ``b``; ``H`` and ``W`` must be multiples of it.
        halo_size: halo ``h >= 0`` added on every side of a block's window.
        stride: query stride: ``q`` is the map subsampled by ``stride`` (a divisor of ``b``), in
            blocks of ``b / stride``.
        rel_h: height table ``[2 * win - 1, head_dim]`` (dtype of ``q`` or float32), shared by the
            heads; with ``rel_w``, or both None for no positional term. Both receive gradients.
        rel_w: width table, as ``rel_h``.
        scale: logit scale, default ``head_dim ** -0.5`` (an explicit 0.0 is honoured).
        scale_rel: scale the positional logits too (timm's ``scale_pos_embed``).
        return_lse: also return the log-sum-exp of the logits ``[B, H / stride, W / stride, heads]``
            (float32; float64 for float64 inputs).

    Other Parameters:
        backend: ``"auto"`` (the best backend that can run the call; the environment variable
            ``FOVEAL_BACKEND`` overrides it), ``"reference"`` (pure PyTorch, any device) or
            ``"triton"``. An unavailable backend raises with the reason.

    Returns:
        ``out`` ``[B, H / stride, W / stride, heads, head_dim_v]`` in the dtype of ``q``, or
        ``(out, lse)`` when ``return_lse``.

    Raises:
        TypeError: a non-tensor or non-floating input, or a badly typed argument.
        ValueError: shape/dtype/device mismatch, a map that is not a whole number of blocks, a
            stride that does not divide the block, or badly shaped tables.

    Example:
        >>> q = k = v = torch.randn(2, 16, 16, 4, 16)
        >>> rel = torch.randn(2 * (8 + 2 * 3) - 1, 16)
        >>> halo2d(q, k, v, block_size=8, halo_size=3, rel_h=rel, rel_w=rel).shape
        torch.Size([2, 16, 16, 4, 16])
    """
    resolved = key = None
    if not torch.compiler.is_compiling():  # dynamo folds the checks into the graph instead
        try:
            key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
                   None if rel_h is None else (rel_h.shape, rel_h.dtype, rel_h.device),
                   None if rel_w is None else (rel_w.shape, rel_w.dtype, rel_w.device),
                   block_size, halo_size, stride, scale, scale_rel, backend, env(BACKEND_ENV))
            resolved = _CHECKED.get(key)
        except (AttributeError, TypeError):  # not tensors, or unhashable arguments: the checks say why
            key = None
    if resolved is None:
        resolved = _check_call(q, k, v, block_size, halo_size, stride, rel_h, rel_w, scale, scale_rel, backend)
        if key is not None:
            _CHECKED.put(key, resolved)
    if not isinstance(return_lse, bool):
        raise TypeError(f"{_OP}: return_lse must be a bool, got {type(return_lse).__name__}")
    name, scale = resolved
    args = (q, k, v, rel_h, rel_w, block_size, halo_size, stride, scale, scale_rel, name)
    if not eager_ok(q, k, v, rel_h, rel_w):
        out, lse = _halo_fwd(*args)
    elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, rel_h, rel_w)):
        out, lse = _EagerHalo.apply(*args)
    else:  # nothing to differentiate: no autograd node
        out, lse = HALO_BACKENDS[name].fwd(*args[:-1])
    return (out, lse) if return_lse else out
