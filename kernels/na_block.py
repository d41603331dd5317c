"""One pre-norm neighborhood-attention transformer block (NAT / DiNAT) as one autograd node.

A NAT-T training step runs 30 such blocks. Built from modules, each block records about fifteen
autograd nodes (two norms, four Linears and their autocast casts, views, the NA op, two DropPaths)
and makes as many Python module calls; on a GPU host that costs more time per step than the GPU
needs for the block's kernels, so eager training is host bound. :func:`na_block` runs the same
computation with the kernels called directly and one hand-written backward:

    s  = x + y                        (y: the previous block's pending branch, or none)
    h1 = LayerNorm1(s)                (float32 statistics, written in the Linears' dtype)
    q, k, v = split(h1 @ Wqkv^T + bqkv)
    t  = drop1(gamma1 * (NA(q, k, v, rpb) @ Wp^T + bp))
    s' = s + t
    h2 = LayerNorm2(s')
    m  = drop2(gamma2 * (gelu(h2 @ W1^T + b1) @ W2^T + b2))
    returns (s', m)                   (the block output is s' + m; the next block adds it in its norm)

It computes what the modules compute, in the same dtypes (autocast's: the Linears and the NA op in
the autocast dtype, the residual stream in its own, LayerNorm statistics in float32), with the
same DropPath masks drawn in the same order (timm's ``drop_path`` rule), so results and gradients
match the module path to rounding. It saves less for the backward: the norm outputs are recomputed
from the residual streams (which the norm backwards keep anyway), the GELU output from its input.

The node is once-differentiable. Only eager calls on plain tensors take it; the module falls back
to its submodules under ``torch.compile``, tracing, scripting, dispatch modes, hooks, dropout and
padded maps (see ``foveal.nat.NATBlock``).
"""
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .launch import persistent
from .neighborhood import NA_BACKENDS, resolve_call
from .norm import NORM_BACKENDS, _resolve as _resolve_norm

__all__ = ["na_block", "NABlockConfig"]


class NABlockConfig(NamedTuple):
    """The non-tensor arguments of :func:`na_block`."""
    num_heads: int
    kernel_size: int
    dilation: int
    scale: Optional[float] = None
    eps1: float = 1e-5
    eps2: float = 1e-5
    approximate: str = "none"  # GELU
    drop_path1: float = 0.
    drop_path2: float = 0.
    scale_by_keep: bool = True
    backend: str = "auto"  # NA backend
    norm_backend: str = "auto"


class _Plan(NamedTuple):
    """What a call resolved: backends, NA arguments as the backends take them, compute dtype."""
    na: str
    na_args: tuple  # kernel_size, dilation, stride, is_causal, scale (lists / float)
    norm1: str
    norm2: str
    cd: torch.dtype  # the dtype the Linears consume (autocast's when it is on)
    eps1: float
    eps2: float


def _drop_mask(t: Tensor, drop_prob: float, scale_by_keep: bool) -> Tensor:
    """timm's ``drop_path`` mask for ``t`` (per sample, in ``t``'s dtype, drawn the same way)."""
    keep = 1 - drop_prob
    mask = t.new_empty((t.shape[0],) + (1,) * (t.dim() - 1)).bernoulli_(keep)
    if keep > 0.0 and scale_by_keep:
        mask.div_(keep)
    return mask


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _cast_all(ts, dtype: torch.dtype) -> list:
    """``[_cast(t, dtype) for t in ts]`` with one allocation and one multi-tensor copy for the casts
    (the weights autocast would cast one by one before each Linear)."""
    todo = [i for i, t in enumerate(ts) if t is not None and t.dtype != dtype]
    out = list(ts)
    if not todo:
        return out
    src = [ts[i] for i in todo]
    flat = torch.empty(sum(t.numel() for t in src), dtype=dtype, device=src[0].device)
    dst = [v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in src]), src)]
    torch._foreach_copy_(dst, src)
    for i, d in zip(todo, dst):
        out[i] = d
    return out


# CUDA has a matmul that rounds half-precision products to float32 once (the weight gradients of
# an autocast Linear are cast to the float32 parameter's dtype anyway)
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def _grad_mm(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """``(a @ b).to(dtype)`` for a weight gradient."""
    if _MM_OUT_DTYPE and a.is_cuda and dtype == torch.float32 and a.dtype in (torch.float16, torch.bfloat16):
        return torch.ops.aten.mm.dtype(a, b, dtype)
    out = a @ b
    return out if out.dtype == dtype else out.to(dtype)


_ONES: dict = {}


def _ones_row(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    key = (n, dtype, device)
    ones = _ONES.get(key)
    if ones is None:
        if len(_ONES) > 64:
            _ONES.clear()
        ones = _ONES[key] = persistent(device, lambda: torch.ones(1, n, dtype=dtype, device=device))
    return ones


def _grad_sum(g: Tensor, dtype: torch.dtype) -> Tensor:
    """A bias gradient ``g.sum(0)`` in ``dtype`` (accumulated in float32 at least). On CUDA a
    half-precision one is ``ones @ g`` rounded to float32 once: 1.4-2.6x faster than the column
    reduction at NAT-T's shapes on an H100 (docs/benchmarks.md)."""
    if _MM_OUT_DTYPE and g.is_cuda and dtype == torch.float32 and g.dtype in (torch.float16, torch.bfloat16):
        return torch.ops.aten.mm.dtype(_ones_row(g.shape[0], g.dtype, g.device), g, dtype)[0]
    out = g.sum(0, dtype=torch.promote_types(dtype, torch.float32))
    return out if out.dtype == dtype else out.to(dtype)


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _forward(x, y, p, cfg: NABlockConfig, training: bool, keep: bool = True):
    """The block's forward; returns ``(s2, m, saved)``: what the backward needs, its plan last
    (``saved`` is None when not ``keep``: each intermediate is then freed once it is used)."""
    (n1w, n1b, wqkv, bqkv, rpb, wp, bp, n2w, n2b, w1, b1, w2, b2, gamma1, gamma2) = p
    norm1, cd, eps1 = _resolve_norm(x, y, n1w, n1b, cfg.eps1, None, cfg.norm_backend)
    h1, s, mean1, rstd1 = NORM_BACKENDS[norm1].fwd(x, y, n1w, n1b, eps1, cd)
    if s is None:
        s = x
    B, H, W, C = s.shape
    heads = cfg.num_heads
    if C % heads or wqkv.shape[0] != 3 * C:
        raise ValueError(f"na_block: qkv_weight must be [3C, C] with num_heads dividing C, got "
                         f"qkv_weight.shape={tuple(wqkv.shape)}, C={C}, num_heads={heads}")
    wqkv, bqkv, wp, bp, w1, b1, w2, b2 = _cast_all((wqkv, bqkv, wp, bp, w1, b1, w2, b2), cd)
    qkv = F.linear(h1, wqkv, bqkv).view(B, H, W, 3, heads, C // heads)
    if not keep:
        del h1
    q, k, v = qkv.unbind(3)
    na, *na_args = resolve_call(q, k, v, cfg.kernel_size, cfg.dilation, 1, False, rpb, cfg.scale, cfg.backend, 2)
    o, lse = NA_BACKENDS[na].fwd(q, k, v, rpb, *na_args)
    if not keep:
        del qkv, q, k, v, lse
    a1 = F.linear(o.view(B, H, W, C), wp, bp)
    if not keep:
        del o
    t = a1 if gamma1 is None else gamma1 * a1
    mask1 = _drop_mask(t, cfg.drop_path1, cfg.scale_by_keep) if training and cfg.drop_path1 else None
    if mask1 is not None:
        t = t * mask1
    norm2, _, eps2 = _resolve_norm(s, t, n2w, n2b, cfg.eps2, cd, cfg.norm_backend)
    h2, s2, mean2, rstd2 = NORM_BACKENDS[norm2].fwd(s, t, n2w, n2b, eps2, cd)
    if not keep:
        del s, t, a1
    a = F.linear(h2, w1, b1)
    if not keep:
        del h2
    g = F.gelu(a, approximate=cfg.approximate)  # the backward recomputes it from a
    if not keep:
        del a
    m0 = F.linear(g, w2, b2)
    del g
    m = m0 if gamma2 is None else gamma2 * m0
    mask2 = _drop_mask(m, cfg.drop_path2, cfg.scale_by_keep) if training and cfg.drop_path2 else None
    if mask2 is not None:
        m = m * mask2
    if not keep:
        return s2, m, None
    saved = (s, mean1, rstd1, qkv, o, lse, a1 if gamma1 is not None else None, t.dtype, mask1, s2, mean2, rstd2,
             a, m0 if gamma2 is not None else None, mask2, wqkv, wp, w1, w2,
             _Plan(na, tuple(na_args), norm1, norm2, cd, eps1, eps2))
    return s2, m, saved


class _NABlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, n1w, n1b, wqkv, bqkv, rpb, wp, bp, n2w, n2b, w1, b1, w2, b2, gamma1, gamma2,
                cfg, training):
        p = (n1w, n1b, wqkv, bqkv, rpb, wp, bp, n2w, n2b, w1, b1, w2, b2, gamma1, gamma2)
        s2, m, saved = _forward(x, y, p, cfg, training)
        (s, mean1, rstd1, qkv, o, lse, a1, t_dtype, mask1, _, mean2, rstd2, a, m0, mask2,
         wqkv_c, wp_c, w1_c, w2_c, plan) = saved
        ctx.save_for_backward(s, mean1, rstd1, qkv, o, lse, a1, mask1, s2, mean2, rstd2, a, m0, mask2,
                              wqkv_c, wp_c, w1_c, w2_c, n1w, n1b, n2w, n2b, rpb, gamma1, gamma2)
        ctx.meta = (cfg, plan, t_dtype, x.dtype, None if y is None else y.dtype,
                    tuple(None if t is None else t.dtype for t in p))
        return s2, m

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_s2, g_m):
        (s, mean1, rstd1, qkv, o, lse, a1, mask1, s2, mean2, rstd2, a, m0, mask2,
         wqkv, wp, w1, w2, n1w, n1b, n2w, n2b, rpb, gamma1, gamma2) = ctx.saved_tensors
        cfg, plan, t_dtype, x_dtype, y_dtype, dt_ = ctx.meta
        # dt_: the parameters' dtypes, in the order of _forward's p; need: the inputs of forward
        need = ctx.needs_input_grad
        cd = plan.cd
        B, H, W, C = s.shape
        # MLP branch: m = drop2(gamma2 * (gelu(a) @ W2^T + b2))
        dm = g_m if mask2 is None else g_m * mask2
        dgamma2 = None
        if gamma2 is not None:
            if need[16]:
                dgamma2 = _rows(dm * m0).sum(0).to(dt_[14])
            dm = dm * gamma2
        dm = _rows(_cast(dm, cd))
        a2 = _rows(a)
        dw2 = _grad_mm(dm.t(), F.gelu(a2, approximate=cfg.approximate), dt_[11]) if need[13] else None
        db2 = _grad_sum(dm, dt_[12]) if need[14] else None
        da = torch.ops.aten.gelu_backward(dm @ w2, a2, approximate=cfg.approximate)
        dw1 = None
        if need[11]:
            h2 = NORM_BACKENDS[plan.norm2].fwd(s2, None, n2w, n2b, plan.eps2, cd)[0]  # the forward's, recomputed
            dw1 = _grad_mm(da.t(), _rows(h2), dt_[9])
        db1 = _grad_sum(da, dt_[10]) if need[12] else None
        dh2 = (da @ w1).view(B, H, W, C)
        # norm2 and the attention branch's add: s2 = s + t
        ds, dt, dn2w, dn2b = NORM_BACKENDS[plan.norm2].bwd(
            dh2, g_s2, s2, n2w, mean2, rstd2, s.dtype, t_dtype if t_dtype != s.dtype else None, dt_[8])
        dt = ds if dt is None else dt
        # attention branch: t = drop1(gamma1 * (o @ Wp^T + bp))
        if mask1 is not None:
            dt = dt * mask1
        dgamma1 = None
        if gamma1 is not None:
            if need[15]:
                dgamma1 = _rows(dt * a1).sum(0).to(dt_[13])
            dt = dt * gamma1
        dt = _rows(_cast(dt, cd))
        dwp = _grad_mm(dt.t(), o.view(-1, C), dt_[5]) if need[7] else None
        dbp = _grad_sum(dt, dt_[6]) if need[8] else None
        do = (dt @ wp).view(o.shape)
        dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
        drpb = _na_bwd(plan, do, qkv, rpb, o, lse, dqkv)
        d2 = dqkv.view(-1, 3 * C)
        dwqkv = None
        if need[4]:
            h1 = NORM_BACKENDS[plan.norm1].fwd(s, None, n1w, n1b, plan.eps1, cd)[0]
            dwqkv = _grad_mm(d2.t(), _rows(h1), dt_[2])
        dbqkv = _grad_sum(d2, dt_[3]) if need[5] else None
        dh1 = (d2 @ wqkv).view(B, H, W, C)
        # norm1 and the pending branch's add: s = x + y
        has_dres = y_dtype is not None and y_dtype != x_dtype
        dx, dy, dn1w, dn1b = NORM_BACKENDS[plan.norm1].bwd(
            dh1, ds, s, n1w, mean1, rstd1, x_dtype, y_dtype if has_dres else None, dt_[1])
        if y_dtype is not None and not has_dres:
            dy = dx
        return (dx, dy, dn1w, dn1b, dwqkv, dbqkv, drpb if need[6] else None, dwp, dbp, dn2w, dn2b, dw1, db1, dw2,
                db2, dgamma1, dgamma2, None, None)


def _na_bwd(plan: _Plan, do, qkv, rpb, o, lse, dqkv) -> Optional[Tensor]:
    """NA backward with dq, dk, dv written into ``dqkv`` (the layout of the fused projection); returns drpb."""
    q, k, v = qkv.unbind(3)
    dq, dk, dv = dqkv.unbind(3)
    if plan.na == "triton":
        from .neighborhood_triton import na_triton_bwd
        return na_triton_bwd(do, q, k, v, rpb, o, lse, None, *plan.na_args, dq=dq, dk=dk, dv=dv)[3]
    gq, gk, gv, drpb = NA_BACKENDS[plan.na].bwd(do, q, k, v, rpb, o, lse, None, *plan.na_args)
    dq.copy_(gq), dk.copy_(gk), dv.copy_(gv)
    return drpb


def na_block(x: Tensor, y: Optional[Tensor], norm1_weight: Optional[Tensor], norm1_bias: Optional[Tensor],
             qkv_weight: Tensor, qkv_bias: Optional[Tensor], rpb: Optional[Tensor], proj_weight: Tensor,
             proj_bias: Optional[Tensor], norm2_weight: Optional[Tensor], norm2_bias: Optional[Tensor],
             fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor, fc2_bias: Optional[Tensor],
             gamma1: Optional[Tensor], gamma2: Optional[Tensor], cfg: NABlockConfig,
             training: bool = False) -> Tuple[Tensor, Tensor]:
    """One pre-norm NA block on the residual stream ``x + y`` (see the module docstring).

    Args:
        x: residual stream ``[B, H, W, C]`` (``H, W >= kernel_size * dilation``).
        y: the pending branch output to add to it, ``[B, H, W, C]``, or None.
        norm1_weight ... fc2_bias: the block's parameters in the layouts of ``nn.LayerNorm`` /
            ``nn.Linear`` (qkv ``[3C, C]``, proj ``[C, C]``, fc1 ``[hidden, C]``, fc2 ``[C, hidden]``)
            and of the NA op (``rpb [heads, 2k-1, 2k-1]`` or None).
        gamma1, gamma2: layer scales ``[C]`` or None.
        cfg: heads, window, GELU form, DropPath rates, backends.
        training: draw the DropPath masks (timm's rule) when the rates are nonzero.

    Returns:
        ``(s2, m)``, ``[B, H, W, C]`` each: the stream after the attention branch and the MLP
        branch's output; the block's output is ``s2 + m``.
    """
    p = (norm1_weight, norm1_bias, qkv_weight, qkv_bias, rpb, proj_weight, proj_bias, norm2_weight, norm2_bias,
         fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma1, gamma2)
    if torch.is_grad_enabled() and (x.requires_grad or (y is not None and y.requires_grad)
                                    or any(t is not None and t.requires_grad for t in p)):
        return _NABlock.apply(x, y, *p, cfg, training)
    return _forward(x, y, p, cfg, training, keep=False)[:2]
