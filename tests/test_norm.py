"""The fused residual add + LayerNorm (``foveal.kernels.add_layer_norm``, ``AddLayerNorm``) against the unfused path.

The oracle is the composition the op replaces: ``s = x + residual; h = F.layer_norm(s)`` in
float32 (as autocast runs it), ``h.to(out_dtype)``, differentiated by autograd. Errors are the
largest difference relative to the largest oracle value, within ``TOL`` of the least precise dtype
the value went through (every output is a function of the rounded ``s``).

CPU tests check the reference backend, the custom ops (opcheck, torch.compile, meta), the layer
and the NAT block. The Triton kernels run in Triton's interpreter at tiny shapes with small
forced tiles; Triton fixes interpreter mode when it is first imported, so in an ordinary run
``test_interpreter_suite`` runs the ``test_interpreted_*`` tests in a subprocess with
``TRITON_INTERPRET=1`` (``TRITON_INTERPRET=1 pytest tests/test_norm.py -k interpreted`` runs them
directly). GPU tests (``pytest -m gpu``) run the compiled kernels at NAT sizes.
"""
import inspect
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from foveal.kernels import NORM_BACKENDS, add_layer_norm, add_layer_norm_linear
from foveal.layers import AddLayerNorm

triton = pytest.importorskip("triton")

import foveal.kernels.norm_triton as nt  # noqa: E402

INTERPRETED = nt._interpreting()
interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs under TRITON_INTERPRET=1 in test_interpreter_suite")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {torch.float64: 1e-12, F32: 1e-6, F16: 2e-3, BF16: 1.6e-2}  # fp16 / bf16: about two units in the last place
# (x dtype, residual dtype): the autocast residual stream (float32 + bfloat16 branch), pure and mixed dtypes
DTYPES = [(F32, BF16), (F32, F32), (BF16, BF16), (F16, F16), (F16, F32), (F32, None), (BF16, None)]
AFFINE = ["weight+bias", "weight", "none"]


def _least_precise(*dtypes):
    return max((d for d in dtypes if d is not None), key=lambda d: TOL[d])


def _case(shape, x_dtype, res_dtype, affine, param_dtype=F32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    x = torch.randn(shape, generator=g).to(device, x_dtype)
    r = None if res_dtype is None else torch.randn(shape, generator=g).to(device, res_dtype)
    w = (1 + 0.5 * torch.randn(C, generator=g)).to(device, param_dtype) if affine != "none" else None
    b = (0.5 * torch.randn(C, generator=g)).to(device, param_dtype) if affine == "weight+bias" else None
    return x, r, w, b


def _unfused(x, r, w, b, eps, out_dtype):
    s = x if r is None else x + r
    f = torch.promote_types(s.dtype, F32)  # float64 stays float64
    h = F.layer_norm(s.to(f), (s.shape[-1],), None if w is None else w.to(f), None if b is None else b.to(f), eps)
    return h.to(out_dtype), s


def _leaf_like(t):
    """A new leaf holding ``t``'s values in ``t``'s strides (``clone`` makes crops contiguous)."""
    leaf = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    return leaf.copy_(t).requires_grad_()


def _run(fn, x, r, w, b, grad_seed=1, with_grad_s=True, **kw):
    """``(h, s, grads of x, r, w, b)`` of ``fn`` on fresh leaves, for seeded output gradients."""
    leaves = [None if t is None else _leaf_like(t) for t in (x, r, w, b)]
    h, s = fn(*leaves, **kw)
    g = torch.Generator().manual_seed(grad_seed)
    grad_h = torch.randn(h.shape, generator=g).to(h.device, h.dtype)
    grad_s = torch.randn(s.shape, generator=g).to(s.device, s.dtype) if with_grad_s else None
    outs, grads = ((h, s), (grad_h, grad_s)) if with_grad_s else ((h,), (grad_h,))
    present = [t for t in leaves if t is not None]
    got = iter(torch.autograd.grad(outs, present, grads))
    return h, s, [None if t is None else next(got) for t in leaves]


def _rel_err(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _check(x, r, w, b, eps=1e-5, out_dtype=None, with_grad_s=True, backend="reference", tol_scale=1.0):
    out_dtype_ref = out_dtype
    if out_dtype_ref is None:
        out_dtype_ref = x.dtype if r is None else torch.promote_types(x.dtype, r.dtype)
    h, s, grads = _run(add_layer_norm, x, r, w, b, with_grad_s=with_grad_s, eps=eps, out_dtype=out_dtype,
                       backend=backend)
    h0, s0, grads0 = _run(_unfused, x, r, w, b, with_grad_s=with_grad_s, eps=eps, out_dtype=out_dtype_ref)
    assert h.dtype == out_dtype_ref and s.dtype == s0.dtype and h.is_contiguous()
    for name, a, a0 in zip(("h", "s", "dx", "dresidual", "dweight", "dbias"), [h, s] + grads, [h0, s0] + grads0):
        assert (a is None) == (a0 is None), name
        if a is None:
            continue
        assert a.dtype == a0.dtype and a.shape == a0.shape, (name, a.dtype, a0.dtype)
        tol = tol_scale * TOL[_least_precise(a.dtype, s.dtype)]
        err = _rel_err(a, a0)
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g} ({a.dtype})"


# -- reference backend against the unfused path -------------------------------------------------

@pytest.mark.parametrize("C", [64, 96, 100, 512])
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{d[0]}+{d[1]}".replace("torch.", ""))
def test_reference_matches_unfused(C, dtypes):
    for i, affine in enumerate(AFFINE):
        x, r, w, b = _case((2, 3, 5, C), *dtypes, affine, seed=i)
        _check(x, r, w, b, with_grad_s=True)
        _check(x, r, w, b, with_grad_s=False)


def test_reference_low_precision_parameters_and_eps():
    x, r, w, b = _case((4, 7, 64), BF16, BF16, "weight+bias", param_dtype=BF16)
    _check(x, r, w, b, eps=1e-3)
    _check(x, r, w, b, out_dtype=F32)
    x, r, w, b = _case((4, 7, 64), torch.float64, torch.float64, "weight+bias", param_dtype=torch.float64)
    _check(x, r, w, b)


def _strided_views(x, r):
    """(name, x view, residual view) with the last dim unit-stride unless the name says otherwise."""
    big = torch.randn(x.shape[0], x.shape[1] + 2, x.shape[2] + 3, 2 * x.shape[3], dtype=x.dtype)
    C = x.shape[-1]
    t5 = torch.randn(2, 3, 3, 4, 5, 2 * C, dtype=x.dtype)[:, :, 1:, 1:, 1:, :C]
    return [
        ("crop", big[:, 1:1 + x.shape[1], 2:2 + x.shape[2], :C], r),
        ("channel slice", big[:, :x.shape[1], :x.shape[2], C:], r),
        ("both strided", big[:, 1:1 + x.shape[1], :x.shape[2], :C], big[:, :x.shape[1], 3:3 + x.shape[2], C:]),
        ("last dim strided (copied)", big[:, :x.shape[1], :x.shape[2], ::2], r),
        ("permuted (copied)", x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1), r),
        ("four groups (copied)", t5, None),
    ]


def test_reference_strided_views():
    x, r, w, b = _case((2, 3, 5, 32), F32, BF16, "weight+bias")
    for name, xv, rv in _strided_views(x, r.float()):
        assert not xv.is_contiguous(), name
        _check(xv, None if rv is None else rv.to(BF16), w, b)


# -- the out_dtype rule and autocast --------------------------------------------------------------

def test_out_dtype_follows_autocast():
    x, r, w, b = _case((2, 4, 4, 64), F32, None, "weight+bias")
    y = torch.randn_like(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = nn.functional.linear(y, torch.eye(64))  # a branch output: bfloat16 under autocast
        assert y.dtype == BF16
        h, s = add_layer_norm(x, y, w, b)
        assert (h.dtype, s.dtype) == (BF16, F32)  # the residual stream stays float32
        h_f16, _ = add_layer_norm(x, y, w, b, out_dtype=F16)
        assert h_f16.dtype == F16  # an explicit out_dtype wins
        h0, s0 = _unfused(x, y, w, b, 1e-5, torch.get_autocast_dtype("cpu"))
        ref = F.linear(F.layer_norm(x + y, (64,), w, b), torch.eye(64))  # what the next Linear consumes
    torch.testing.assert_close(s, s0, rtol=0, atol=0)
    assert _rel_err(h, h0) <= TOL[BF16] and _rel_err(h.float(), ref.float()) <= TOL[BF16]
    with torch.autocast("cpu", dtype=torch.float16):
        assert add_layer_norm(x, None, w, b)[0].dtype == F16
    assert add_layer_norm(x, y, w, b)[0].dtype == F32  # no autocast: the dtype of s
    assert add_layer_norm(x.to(BF16), y, w, b)[0].dtype == BF16
    _check(x, y, w, b, out_dtype=BF16)


def test_no_residual_returns_x_itself():
    x, _, w, b = _case((3, 64), F32, None, "weight+bias")
    h, s = add_layer_norm(x, None, w, b)
    assert s is x
    x.requires_grad_()
    assert add_layer_norm(x, None, w, b)[1] is x


# -- argument checks ------------------------------------------------------------------------------

def test_argument_errors():
    x = torch.randn(2, 8)
    w = torch.ones(8)
    cases = [
        (TypeError, r"x must be a torch.Tensor", dict(x=x.tolist())),
        (TypeError, r"x must have a floating dtype, got x.dtype=torch.int64", dict(x=x.long())),
        (ValueError, r"non-empty last dim.*x.shape=\(\)", dict(x=torch.tensor(1.0))),
        (ValueError, r"non-empty last dim.*x.shape=\(2, 0\)", dict(x=torch.randn(2, 0), weight=None)),
        (ValueError, r"residual must have the shape of x, got residual.shape=\(1, 8\)", dict(residual=torch.randn(1, 8))),
        (TypeError, r"residual must be a torch.Tensor or None", dict(residual=3.0)),
        (TypeError, r"residual must have a floating dtype", dict(residual=torch.ones(2, 8, dtype=torch.int32))),
        (ValueError, r"weight must have shape \[C\] with C = x.shape\[-1\], got weight.shape=\(4,\)",
         dict(weight=torch.ones(4))),
        (ValueError, r"bias must have shape \[C\].*bias.shape=\(1, 8\)", dict(bias=torch.ones(1, 8))),
        (ValueError, r"weight must be on the device of x, got weight.device=meta", dict(weight=w.to("meta"))),
        (TypeError, r"eps must be a float, got str", dict(eps="1e-5")),
        (TypeError, r"eps must be a float, got bool", dict(eps=True)),
        (ValueError, r"eps must be finite and > 0, got eps=0", dict(eps=0.0)),
        (ValueError, r"eps must be finite and > 0, got eps=nan", dict(eps=float("nan"))),
        (ValueError, r"eps must be finite and > 0, got eps=-1", dict(eps=-1e-5)),
        (TypeError, r"out_dtype must be a floating torch.dtype or None, got out_dtype=torch.int8",
         dict(out_dtype=torch.int8)),
        (ValueError, r"unknown backend 'cuda'.*expected 'auto' or one of", dict(backend="cuda")),
    ]
    for exc, message, override in cases:
        args = dict(x=x, residual=None, weight=w, bias=None) | override
        with pytest.raises(exc, match=message):
            add_layer_norm(**args)


def test_backend_selection(monkeypatch):
    x = torch.randn(2, 8)
    monkeypatch.setenv("FOVEAL_BACKEND", "reference")
    assert NORM_BACKENDS.choose("auto", x, None, None, None, out_dtype=F32) == "reference"
    monkeypatch.setenv("FOVEAL_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="FOVEAL_BACKEND"):
        add_layer_norm(x, None, None, None)
    monkeypatch.delenv("FOVEAL_BACKEND")
    assert NORM_BACKENDS.names() == ["triton", "reference"]


def test_probe_declines_cpu_without_interpreter(monkeypatch):
    if INTERPRETED:
        pytest.skip("the interpreter accepts CPU tensors")
    x = torch.randn(2, 8)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in nt.add_layer_norm_triton_probe(x, None, None, None, out_dtype=F32)
    assert NORM_BACKENDS.choose("auto", x, None, None, None, out_dtype=F32) == "reference"
    with pytest.raises(NotImplementedError, match="backend 'triton'.*cannot run this call"):
        add_layer_norm(x, None, None, None, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "before the first import" in nt.add_layer_norm_triton_probe(x, None, None, None, out_dtype=F32)


def test_every_argument_is_documented():
    for fn in (add_layer_norm, AddLayerNorm.__init__):
        doc = fn.__doc__
        for name in inspect.signature(fn).parameters:
            if name in ("self", "device", "dtype"):
                continue
            assert re.search(rf"^\s+{name}:", doc, re.M), f"{fn.__qualname__}: argument {name!r} is not documented"


# -- custom ops, autograd paths, compile, meta ----------------------------------------------------

OPCHECK_CASES = [
    ((2, 3, 8), F32, BF16, "weight+bias", F32),
    ((2, 3, 8), F32, None, "weight", BF16),
    ((5, 12), BF16, BF16, "none", BF16),
    ((2, 2, 2, 10), F16, F32, "weight+bias", F16),
]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
def test_opcheck(case):
    shape, x_dtype, res_dtype, affine, out_dtype = case
    x, r, w, b = _case(shape, x_dtype, res_dtype, affine)
    leaves = [None if t is None else t.requires_grad_() for t in (x, r, w, b)]
    torch.library.opcheck(torch.ops.foveal.add_layer_norm_fwd, (*leaves, 1e-5, out_dtype, "reference"))
    with torch.no_grad():
        h, s, mean, rstd = torch.ops.foveal.add_layer_norm_fwd(x, r, w, b, 1e-5, out_dtype, "reference")
    src = x.detach() if r is None else s
    dres_dtype = r.dtype if r is not None and r.dtype != x.dtype else None
    for grad_s in (None, torch.randn_like(src)):
        args = (torch.randn_like(h), grad_s, src, None if w is None else w.detach(), mean, rstd, x.dtype,
                dres_dtype, None if b is None else b.dtype, "reference")
        torch.library.opcheck(torch.ops.foveal.add_layer_norm_bwd, args)


def test_custom_op_eager_and_no_grad_paths_agree():
    x, r, w, b = _case((2, 5, 5, 48), F32, BF16, "weight+bias")

    def via_custom_op(x, r, w, b):
        h, s, _, _ = torch.ops.foveal.add_layer_norm_fwd(x, r, w, b, 1e-5, F32, "reference")
        return h, s

    h0, s0, g0 = _run(via_custom_op, x, r, w, b)
    h1, s1, g1 = _run(add_layer_norm, x, r, w.detach(), b.detach(), backend="reference")  # the eager Function
    for a, a0 in zip([h1, s1] + g1, [h0, s0] + g0):
        torch.testing.assert_close(a, a0, rtol=0, atol=0)
    with torch.no_grad():
        h2, s2 = add_layer_norm(x, r, nn.Parameter(w), b, backend="reference")
    assert h2.grad_fn is None
    torch.testing.assert_close(h2, h0, rtol=0, atol=0)


def test_compile_fullgraph_op_forward_backward():
    x, r, w, b = _case((2, 4, 4, 32), F32, BF16, "weight+bias")

    def f(x, r, w, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return add_layer_norm(x, r, w, b, backend="reference")

    h, s, grads = _run(torch.compile(f, fullgraph=True), x, r, w, b)
    h0, s0, grads0 = _run(f, x, r, w, b)
    assert h.dtype == BF16 and s.dtype == F32
    for a, a0 in zip([h, s] + grads, [h0, s0] + grads0):
        torch.testing.assert_close(a, a0, rtol=0, atol=0)


class _TwoNormBlock(nn.Module):
    """A pre-norm block shaped like NATBlock: norm -> Linear, add + norm -> Linear."""

    def __init__(self, dim, norm_layer=AddLayerNorm, device=None):
        super().__init__()
        self.norm1 = norm_layer(dim, device=device)
        self.fc1 = nn.Linear(dim, dim, device=device)
        self.norm2 = norm_layer(dim, device=device)
        self.fc2 = nn.Linear(dim, dim, device=device)

    def forward(self, x):
        y = self.fc1(self.norm1(x))
        x, h = self.norm2.forward_add(x, y)
        return x + self.fc2(h)


def test_compile_fullgraph_module_matches_eager():
    torch.manual_seed(0)
    block = _TwoNormBlock(32)
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(2, 5, 5, 32)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
            out_e, out_c = block(xe), compiled(xc)
            out_e.square().sum().backward()
            grads_e = [p.grad.clone() for p in block.parameters()]
            block.zero_grad()
            out_c.square().sum().backward()
            grads_c = [p.grad.clone() for p in block.parameters()]
            block.zero_grad()
        assert out_c.dtype == out_e.dtype == F32
        tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_c, out_e, **tol)
        torch.testing.assert_close(xc.grad, xe.grad, **tol)
        for gc, ge in zip(grads_c, grads_e):
            torch.testing.assert_close(gc, ge, **tol)


def test_meta_device():
    with torch.device("meta"):
        block = _TwoNormBlock(16)
        x = torch.randn(2, 3, 3, 16, requires_grad=True)
        block(x).sum().backward()
    assert x.grad.shape == x.shape and x.grad.is_meta
    h, s = add_layer_norm(x.detach(), torch.empty(2, 3, 3, 16, device="meta", dtype=BF16), None, None, out_dtype=BF16)
    assert (h.dtype, s.dtype, h.shape, h.is_meta) == (BF16, F32, x.shape, True)


# -- the layer ------------------------------------------------------------------------------------

def test_layer_is_a_layernorm_with_the_same_parameters():
    torch.manual_seed(0)
    ref = nn.LayerNorm(24)
    nn.init.normal_(ref.weight)
    nn.init.normal_(ref.bias)
    layer = AddLayerNorm(24)
    layer.load_state_dict(ref.state_dict())
    assert list(layer.state_dict()) == ["weight", "bias"] and isinstance(layer, nn.LayerNorm)
    x, y = torch.randn(3, 4, 24), torch.randn(3, 4, 24)
    torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=1e-6)
    s, h = layer.forward_add(x, y)
    torch.testing.assert_close(s, x + y, rtol=0, atol=0)
    torch.testing.assert_close(h, ref(x + y), rtol=0, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s, h = layer.forward_add(x, y.to(BF16))
        assert (s.dtype, h.dtype, layer(x).dtype) == (F32, BF16, BF16)
    assert AddLayerNorm((8,), elementwise_affine=False).weight is None
    assert AddLayerNorm(8, bias=False).bias is None and AddLayerNorm(8, bias=False)(torch.randn(2, 8)).shape == (2, 8)
    assert AddLayerNorm(8, eps=1e-6).eps == 1e-6 and AddLayerNorm(8, dtype=BF16).weight.dtype == BF16
    with pytest.raises(ValueError, match=r"last dim only, got normalized_shape=\(4, 8\)"):
        AddLayerNorm((4, 8))


def test_layer_scripts_and_traces():
    torch.manual_seed(0)
    block = _TwoNormBlock(16).eval()
    x = torch.randn(2, 3, 3, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated
        scripted = torch.jit.script(block)
    torch.testing.assert_close(scripted(x), block(x), rtol=1e-5, atol=1e-5)
    from timm.models import create_feature_extractor, register_notrace_module

    register_notrace_module(AddLayerNorm)
    traced = create_feature_extractor(block, return_nodes=["fc2"])
    torch.testing.assert_close(traced(x)["fc2"], block.fc2(block.norm2.forward_add(x, block.fc1(block.norm1(x)))[1]))


def test_nat_block_fused_matches_unfused():
    from foveal.nat import NATBlock

    class PlainLayerNorm(nn.LayerNorm):
        """nn.LayerNorm under another name: NATBlock keeps it unfused."""

    torch.manual_seed(0)
    fused = NATBlock(32, 2, kernel_size=3, ls_init_value=0.5).train()
    plain = NATBlock(32, 2, kernel_size=3, ls_init_value=0.5, norm_layer=PlainLayerNorm).train()
    assert isinstance(fused.norm2, AddLayerNorm) and not isinstance(plain.norm2, AddLayerNorm)
    for p in fused.parameters():
        nn.init.normal_(p, std=0.3)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 6, 6, 32)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            xf, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
            out_f, out_p = fused(xf), plain(xp)
            out_f.square().mean().backward()
            out_p.square().mean().backward()
        tol = dict(rtol=3e-2, atol=3e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_f, out_p, **tol)
        torch.testing.assert_close(xf.grad, xp.grad, **tol)
        for (name, pf), pp in zip(fused.named_parameters(), plain.parameters()):
            torch.testing.assert_close(pf.grad, pp.grad, **tol, msg=name)
        fused.zero_grad()
        plain.zero_grad()


def _norm_linear_case(autocast, backend, seed=0):
    """Outputs, gradients and saved bytes of add_layer_norm_linear and of add_layer_norm + F.linear."""
    g = torch.Generator().manual_seed(seed)
    C, N = 24, 40
    base = [torch.randn(2, 3, 5, C, generator=g), torch.randn(2, 3, 5, C, generator=g),
            1 + 0.5 * torch.randn(C, generator=g), 0.5 * torch.randn(C, generator=g),
            0.3 * torch.randn(N, C, generator=g), torch.randn(N, generator=g)]
    results = []
    for fused in (True, False):
        x, r, w, b, lw, lb = (t.clone().requires_grad_() for t in base)
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autocast("cpu", dtype=BF16, enabled=autocast), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            rr = r.to(BF16) if autocast else r  # the branch output under autocast
            if fused:
                out, s = add_layer_norm_linear(x, rr, w, b, lw, lb, backend=backend)
            else:
                h, s = add_layer_norm(x, rr, w, b, backend=backend)
                out = F.linear(h, lw, lb)
        (out.float().square().sum() + s.float().sin().sum()).backward()
        results.append((out, s, [t.grad for t in (x, r, w, b, lw, lb)], sum(saved)))
    return results


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_add_layer_norm_linear_matches_the_two_ops_and_keeps_less(autocast):
    (out, s, grads, saved), (out0, s0, grads0, saved0) = _norm_linear_case(autocast, "reference")
    assert out.dtype == out0.dtype and torch.equal(out, out0) and torch.equal(s, s0)
    for name, a, b in zip(("x", "residual", "weight", "bias", "linear weight", "linear bias"), grads, grads0):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    h_bytes = 2 * 3 * 5 * 24 * (2 if autocast else 4)
    # the normalized output is recomputed, not kept (the node keeps the norm's bias for that)
    assert saved == saved0 - h_bytes + 24 * 4


def test_add_layer_norm_linear_without_grad_is_the_two_ops():
    x, r = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    w, b, lw, lb = torch.rand(8) + 0.5, torch.randn(8), torch.randn(5, 8), torch.randn(5)
    with torch.no_grad():
        out, s = add_layer_norm_linear(x, r, w, b, lw, lb)
    h, s0 = add_layer_norm(x, r, w, b)
    assert torch.equal(s, s0) and torch.equal(out, F.linear(h, lw, lb))
    with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
        add_layer_norm_linear(x, None, w, b, lw, lb)


# -- Triton, in the interpreter -------------------------------------------------------------------

@pytest.mark.skipif(INTERPRETED, reason="already running under the interpreter")
def test_interpreter_suite():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", "-k", "interpreted",
           __file__]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"interpreter tests failed:\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
    assert " passed" in run.stdout and " failed" not in run.stdout and " skipped" not in run.stdout


# Small tiles (BLOCK_C limit, forward (BLOCK_M, warps), backward (BLOCK_M, warps)): several
# programs per map, a partial last one, and backward programs that loop over several row blocks.
SMALL_TILES = ((128, (8, 1), (4, 1)), (nt.MAX_C, (2, 1), (2, 1)))


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(nt, "_TILES", SMALL_TILES)
    assert nt._tiles(64) == (64, (8, 1), (4, 1)) and nt._tiles(200) == (256, (2, 1), (2, 1))


# The interpreter rounds float32 to bfloat16 toward zero (the compiled kernels round to nearest
# even): bfloat16 results may differ by one unit in the last place, within TOL.

@interpreter
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{d[0]}+{d[1]}".replace("torch.", ""))
def test_interpreted_matches_unfused(small_tiles, dtypes):
    for i, (C, affine, with_grad_s) in enumerate([(64, "weight+bias", True), (100, "weight", False), (96, "none", True)]):
        x, r, w, b = _case((2, 7, C), *dtypes, affine, seed=i)
        _check(x, r, w, b, with_grad_s=with_grad_s, backend="triton")


@interpreter
def test_interpreted_wide_rows_and_out_dtypes(small_tiles):
    x, r, w, b = _case((3, 512), F32, BF16, "weight+bias")
    _check(x, r, w, b, out_dtype=F16, backend="triton")
    x, r, w, b = _case((5, 80), BF16, BF16, "weight+bias", param_dtype=BF16)
    _check(x, r, w, b, out_dtype=F32, backend="triton")


@interpreter
def test_interpreted_strided_views_read_in_place(small_tiles, monkeypatch):
    x, r, w, b = _case((2, 2, 3, 32), F32, BF16, "weight+bias")
    copies = []
    real_contiguous = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda t, *a, **k: copies.append(t.shape) or
                        real_contiguous(t, *a, **k))
    for name, xv, rv in _strided_views(x, r.float()):
        copies.clear()
        _check(xv, None if rv is None else rv.to(BF16), w, b, backend="triton")
        assert bool(copies) == ("copied" in name), (name, copies)


@interpreter
def test_interpreted_gradients_of_any_layout(small_tiles):
    x, r, w, b = _case((4, 6, 16), F32, F32, "weight+bias")
    grad_layouts = [
        (torch.randn(6, 4, 16).transpose(0, 1), torch.randn(4, 1, 16).expand(4, 6, 16)),  # read in place
        (torch.randn(4, 6, 32)[..., ::2], torch.ones(()).expand(4, 6, 16)),  # last dim strided: copied
    ]
    for grad_h, grad_s in grad_layouts:
        grads = []
        for fn, kw in ((add_layer_norm, dict(backend="triton")), (_unfused, dict(eps=1e-5, out_dtype=F32))):
            leaves = [t.detach().clone().requires_grad_() for t in (x, r, w, b)]
            h, s = fn(*leaves, **kw)
            grads.append(torch.autograd.grad((h, s), leaves, (grad_h, grad_s)))
        for name, a, a0 in zip(("dx", "dresidual", "dweight", "dbias"), *grads):
            assert _rel_err(a, a0) <= TOL[F32], name


@interpreter
def test_interpreted_matches_reference_and_is_deterministic(small_tiles):
    x, r, w, b = _case((3, 9, 96), F32, BF16, "weight+bias", seed=3)
    out_t = _run(add_layer_norm, x, r, w, b, backend="triton")
    out_r = _run(add_layer_norm, x, r, w, b, backend="reference")
    again = _run(add_layer_norm, x, r, w, b, backend="triton")
    flat = lambda out: [out[0], out[1]] + out[2]  # noqa: E731
    for a, a_ref, a2 in zip(flat(out_t), flat(out_r), flat(again)):
        assert _rel_err(a, a_ref) <= TOL[a.dtype]
        assert torch.equal(a, a2)  # fixed programs and partial rows: bitwise repeatable


@interpreter
def test_interpreted_probe_declines_what_the_kernels_do_not_handle():
    x = torch.randn(2, 8)
    assert nt.add_layer_norm_triton_probe(x, None, None, None, out_dtype=F32) is None
    assert "x.dtype=torch.float64" in nt.add_layer_norm_triton_probe(x.double(), None, None, None, out_dtype=F32)
    assert "bias.dtype=torch.float64" in nt.add_layer_norm_triton_probe(x, None, None, x[0].double(), out_dtype=F32)
    assert "out_dtype=torch.float64" in nt.add_layer_norm_triton_probe(x, None, None, None, out_dtype=torch.float64)
    wide = torch.empty(1, nt.MAX_C + 1)
    assert "must be <= 16384" in nt.add_layer_norm_triton_probe(wide, None, None, None, out_dtype=F32)
    assert "needs CUDA tensors" in nt.add_layer_norm_triton_probe(x.to("meta"), None, None, None, out_dtype=F32)
    assert NORM_BACKENDS.choose("auto", x.double(), None, None, None, out_dtype=torch.float64) == "reference"


@interpreter
def test_interpreted_empty_and_single_rows(small_tiles):
    w, b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    x = torch.randn(0, 4, 16, requires_grad=True)
    h, s = add_layer_norm(x, torch.randn(0, 4, 16), w, b, backend="triton")
    assert h.shape == (0, 4, 16)
    (h.sum() + s.sum()).backward()
    assert torch.equal(w.grad, torch.zeros(16)) and x.grad.shape == x.shape
    x, r, w, b = _case((16,), F32, F32, "weight+bias")
    _check(x, r, w, b, backend="triton")


@interpreter
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_interpreted_add_layer_norm_linear(small_tiles, autocast):
    (out, s, grads, saved), (out0, s0, grads0, saved0) = _norm_linear_case(autocast, "triton")
    assert torch.equal(out, out0) and torch.equal(s, s0)
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("x", "residual", "weight", "bias", "linear weight", "linear bias"), grads, grads0):
        torch.testing.assert_close(a, b, **tol, msg=name)
    assert saved < saved0


@interpreter
def test_interpreted_layer_under_autocast(small_tiles):
    torch.manual_seed(0)
    block = _TwoNormBlock(24)
    x = torch.randn(2, 3, 3, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
        with torch.no_grad():
            os.environ["FOVEAL_BACKEND"] = "reference"
            try:
                ref = block(x)
            finally:
                del os.environ["FOVEAL_BACKEND"]
    out.sum().backward()
    assert x.grad is not None and block.norm1.weight.grad is not None
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


# -- Triton on a GPU, real sizes ------------------------------------------------------------------

# the NAT-T stage shapes (batch 32 here; tools/bench_norm.py times batch 128) plus odd widths
GPU_SHAPES = [(32, 56, 56, 64), (32, 28, 28, 128), (32, 14, 14, 256), (32, 7, 7, 512), (8, 17, 19, 100), (4, 9, 1000)]


@gpu
@needs_cuda
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{d[0]}+{d[1]}".replace("torch.", ""))
def test_gpu_matches_unfused(shape, dtypes):
    x, r, w, b = _case(shape, *dtypes, "weight+bias", device="cuda")
    # dweight / dbias sum up to 100k rows in another order than PyTorch's
    _check(x, r, w, b, backend="triton", tol_scale=20.0)
    _check(x, r, None, None, with_grad_s=False, backend="triton", tol_scale=20.0)


@gpu
@needs_cuda
def test_gpu_autocast_strided_and_deterministic():
    x, r, w, b = _case((16, 30, 30, 96), F32, BF16, "weight+bias", device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h, s = add_layer_norm(x, r, w, b)
    assert (h.dtype, s.dtype) == (BF16, F32)
    _check(x, r, w, b, out_dtype=BF16, backend="triton", tol_scale=20.0)
    crop = torch.randn(16, 32, 33, 192, device="cuda")[:, 1:31, 2:32, :96]
    _check(crop, r, w, b, backend="triton", tol_scale=20.0)
    first = _run(add_layer_norm, x, r, w, b, backend="triton")[2]
    second = _run(add_layer_norm, x, r, w, b, backend="triton")[2]
    assert all(torch.equal(a, c) for a, c in zip(first, second))
