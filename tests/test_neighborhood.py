"""The neighborhood-attention op contract, checked on the reference backend (CPU)."""
import inspect
import os
import random
import re
from typing import Optional

import pytest
import torch

import foveal.kernels.neighborhood_reference as reference
from foveal.kernels import NA_BACKENDS, na1d, na2d, na3d, neighborhood_attention
from foveal.kernels.neighborhood_reference import axis_windows
from na_oracle import axis_neighbors, oracle

OPS = {1: na1d, 2: na2d, 3: na3d}


def _starts(L, k, d=1, s=1, causal=False):
    nbr, valid, _ = axis_windows(L, k, d, s, causal)
    return nbr[:, 0].tolist()


def _neighbors(i, L, k, d=1, s=1, causal=False):
    nbr, valid, _ = axis_windows(L, k, d, s, causal)
    return set(nbr[i][valid[i]].tolist())


class TestSpecVectors:
    """SPEC section 1 test vectors, for both the backend's window tables and the oracle."""

    def test_plain(self):
        assert _starts(10, 4) == [0, 0, 0, 1, 2, 3, 4, 5, 6, 6]
        assert [min(axis_neighbors(i, 10, 4, 1, 1, False)) for i in range(10)] == [0, 0, 0, 1, 2, 3, 4, 5, 6, 6]

    def test_blocked_stride(self):
        assert _starts(10, 4, s=4) == [0, 0, 0, 0, 4, 4, 4, 4, 6, 6]
        assert [min(axis_neighbors(i, 10, 4, 1, 4, False)) for i in range(10)] == [0, 0, 0, 0, 4, 4, 4, 4, 6, 6]

    @pytest.mark.parametrize("query,expected", [(0, {0, 3, 6}), (6, {3, 6, 9}), (7, {1, 4, 7}), (9, {3, 6, 9})])
    def test_dilated(self, query, expected):
        assert _neighbors(query, 10, 3, d=3) == expected
        assert axis_neighbors(query, 10, 3, 3, 1, False) == expected

    @pytest.mark.parametrize("query,expected", [(0, {0}), (1, {0, 1}), (3, {1, 2, 3})])
    def test_causal(self, query, expected):
        assert _neighbors(query, 10, 3, causal=True) == expected
        assert axis_neighbors(query, 10, 3, 1, 1, True) == expected

    def test_every_window_has_k_keys_or_causal_prefix(self):
        for L in range(4, 20):
            for k in range(2, 5):
                for d in range(1, L // k + 1):
                    for s in range(1, k + 1):
                        for i in range(L):
                            assert len(axis_neighbors(i, L, k, d, s, False)) == k
                            assert _neighbors(i, L, k, d, s) == axis_neighbors(i, L, k, d, s, False)
                            assert _neighbors(i, L, k, d, s, True) == axis_neighbors(i, L, k, d, s, True)


def _random_config(seed):
    rng = random.Random(seed)
    rank = [1, 2, 3][seed % 3]
    kernel, dilation, stride, causal, spatial = [], [], [], [], []
    for _ in range(rank):
        k = rng.randint(2, 5 if rank < 3 else 3)
        d = rng.choice([1, 1, 2, 3]) if rank < 3 else rng.choice([1, 2])
        L = k * d + rng.randint(0, 6 if rank < 3 else 2)
        if rng.random() < 0.15:
            d, L = 1, k  # kernel covers the axis
        kernel.append(k)
        dilation.append(d)
        spatial.append(L)
        stride.append(rng.randint(1, k) if rng.random() < 0.3 else 1)
        causal.append(rng.random() < 0.25)
    use_rpb = rng.random() < 0.5
    return dict(
        rank=rank,
        spatial=tuple(spatial),
        kernel_size=tuple(kernel),
        dilation=tuple(dilation),
        stride=tuple(stride),
        is_causal=tuple(causal),
        batch=rng.randint(1, 2),
        heads=rng.randint(1, 2),
        head_dim=rng.randint(1, 4),
        head_dim_v=rng.randint(1, 4),
        rpb=use_rpb,
        scale=rng.choice([None, 0.37]),
    )


@pytest.mark.parametrize("seed", range(330))
def test_reference_matches_oracle(seed):
    """Output, lse and every gradient (q, k, v, rpb) equal the dense-mask oracle in float64."""
    cfg = _random_config(seed)
    g = torch.Generator().manual_seed(seed)
    B, h, D, Dv = cfg["batch"], cfg["heads"], cfg["head_dim"], cfg["head_dim_v"]
    q = torch.randn(B, *cfg["spatial"], h, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, *cfg["spatial"], h, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, *cfg["spatial"], h, Dv, generator=g, dtype=torch.float64, requires_grad=True)
    rpb = None
    if cfg["rpb"]:
        rpb = torch.randn(h, *[2 * kk - 1 for kk in cfg["kernel_size"]], generator=g, dtype=torch.float64)
        rpb.requires_grad_()
    args = (cfg["kernel_size"], cfg["dilation"], cfg["stride"], cfg["is_causal"])
    out, lse = OPS[cfg["rank"]](q, k, v, *args, rpb=rpb, scale=cfg["scale"], return_lse=True, backend="reference")
    ref_out, ref_lse = oracle(q, k, v, *args, rpb=rpb, scale=cfg["scale"])
    assert out.dtype == torch.float64 and out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-10)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    gl = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    inputs = [t for t in (q, k, v, rpb) if t is not None]
    got = torch.autograd.grad((out, lse), inputs, (go, gl))
    want = torch.autograd.grad((ref_out, ref_lse), inputs, (go, gl))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "op,shape,kwargs",
    [
        (na1d, (1, 7, 2, 3), dict(kernel_size=3, dilation=2)),
        (na1d, (2, 6, 1, 2), dict(kernel_size=4, stride=3, is_causal=True)),
        (na2d, (1, 4, 6, 2, 2), dict(kernel_size=(3, 2), dilation=(1, 2))),
        (na2d, (1, 5, 5, 1, 2), dict(kernel_size=3, stride=2, is_causal=(True, False))),
        (na2d, (1, 4, 4, 2, 2), dict(kernel_size=4)),
        (na3d, (1, 3, 4, 5, 1, 2), dict(kernel_size=(2, 3, 3), dilation=(1, 1, 1), is_causal=(False, True, False))),
    ],
)
def test_gradcheck(op, shape, kwargs):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ks = kwargs["kernel_size"]
    ks = ks if isinstance(ks, tuple) else (ks,) * (len(shape) - 3)
    rpb = torch.randn(shape[-2], *[2 * kk - 1 for kk in ks], generator=g, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, rpb):
        return op(q, k, v, rpb=rpb, return_lse=True, backend="reference", **kwargs)

    assert torch.autograd.gradcheck(f, (q, k, v, rpb))


def test_strided_views_read_in_place():
    """Slices of one fused qkv tensor give the same answer as contiguous copies."""
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 9, 10, 3, 2, 4, generator=g, dtype=torch.float64)
    q, k, v = qkv.unbind(3)
    assert not q.is_contiguous()
    rpb = torch.randn(2, 5, 5, generator=g, dtype=torch.float64)
    got = na2d(q, k, v, 3, dilation=(2, 3), rpb=rpb)
    want = na2d(q.contiguous(), k.contiguous(), v.contiguous(), 3, dilation=(2, 3), rpb=rpb)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    ref, _ = oracle(q, k, v, (3, 3), (2, 3), (1, 1), (False, False), rpb=rpb)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunking_does_not_change_results(monkeypatch, chunk):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 8, 9, 2, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    for ks in (3, (8, 9)):  # windowed and dense paths
        rpb_k = rpb if ks == 3 else torch.randn(2, 15, 17, generator=g, dtype=torch.float64, requires_grad=True)
        full = na2d(q, k, v, ks, rpb=rpb_k)
        grads_full = torch.autograd.grad(full.sum(), (q, k, v, rpb_k))
        monkeypatch.setattr(reference, "CHUNK_ELEMENTS", chunk)
        part = na2d(q, k, v, ks, rpb=rpb_k)
        grads_part = torch.autograd.grad(part.sum(), (q, k, v, rpb_k))
        monkeypatch.undo()
        torch.testing.assert_close(part, full, rtol=0, atol=1e-12)
        for a, b in zip(grads_part, grads_full):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_low_precision_inputs(dtype, tol):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 10, 11, 2, 8, generator=g) for _ in range(3))
    rpb = torch.randn(2, 9, 9, generator=g)
    out = na2d(q.to(dtype), k.to(dtype), v.to(dtype), 5, dilation=2, rpb=rpb)
    assert out.dtype == dtype
    ref, _ = oracle(q.to(dtype), k.to(dtype), v.to(dtype), (5, 5), (2, 2), (1, 1), (False, False), rpb=rpb)
    err = (out.double() - ref).norm() / ref.norm()
    assert err < tol


def test_compile_fullgraph_forward_backward():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 6, 7, 2, 4, generator=g, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, generator=g, requires_grad=True)

    def f(q, k, v, rpb):
        return na2d(q, k, v, 3, dilation=(2, 1), rpb=rpb).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v, rpb)
    grads = torch.autograd.grad(loss, (q, k, v, rpb))
    loss_e = f(q, k, v, rpb)
    grads_e = torch.autograd.grad(loss_e, (q, k, v, rpb))
    torch.testing.assert_close(loss, loss_e)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    q, k, v = (torch.randn(1, 6, 7, 2, 4, requires_grad=True) for _ in range(3))
    compiled = torch.compile(lambda q, k, v: na2d(q, k, v, 3).sum(), fullgraph=True)
    compiled(q, k, v).backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_meta_device():
    q = torch.empty(2, 9, 10, 3, 4, device="meta")
    v = torch.empty(2, 9, 10, 3, 5, device="meta")
    out, lse = na2d(q, q, v, 3, rpb=torch.empty(3, 5, 5, device="meta"), return_lse=True)
    assert out.device.type == "meta" and out.shape == (2, 9, 10, 3, 5)
    assert lse.shape == (2, 9, 10, 3) and lse.dtype == torch.float32


def test_env_lookup_follows_os_environ(monkeypatch):
    from foveal.kernels.dispatch import env

    monkeypatch.delenv("FOVEAL_TEST_SWITCH", raising=False)
    assert env("FOVEAL_TEST_SWITCH") is None and env("FOVEAL_TEST_SWITCH", "1") == "1"
    monkeypatch.setenv("FOVEAL_TEST_SWITCH", "0")
    assert env("FOVEAL_TEST_SWITCH", "1") == "0"
    os.environ["FOVEAL_TEST_SWITCH"] = "é"
    assert env("FOVEAL_TEST_SWITCH") == "é"
    monkeypatch.delenv("FOVEAL_TEST_SWITCH")
    assert env("FOVEAL_TEST_SWITCH") is None


def test_lean_op_paths():
    """A LeanOp runs its function directly on plain tensors when nothing is differentiated, records
    its formula when an input requires grad, and keeps a formula-less op's outputs off the graph."""
    from foveal.kernels.dispatch import custom_op

    calls = []

    @custom_op("foveal_test::lean_scale")
    def lean_scale(x: torch.Tensor, w: Optional[torch.Tensor], factor: float) -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        return x * factor if w is None else x * w * factor

    @custom_op("foveal_test::lean_scale_nograd")
    def lean_scale_nograd(x: torch.Tensor, factor: float) -> torch.Tensor:
        return x * factor

    lean_scale.register_fake(lambda x, w, factor: torch.empty_like(x))
    lean_scale.register_autograd(
        lambda ctx, g: (g * ctx.factor if ctx.w is None else g * ctx.w * ctx.factor, None, None),
        lambda ctx, inputs, out: setattr(ctx, "w", inputs[1]) or setattr(ctx, "factor", inputs[2]))
    assert lean_scale._tensor_args == (0, 1)

    x = torch.randn(3, 4)
    assert lean_scale(x, None, 2.0).grad_fn is None and torch.equal(lean_scale(x, None, 2.0), 2 * x)
    xg = x.clone().requires_grad_()
    w = torch.randn(3, 4, requires_grad=True)
    out = lean_scale(xg, None, 3.0)
    assert out.grad_fn is not None
    out.sum().backward()
    assert torch.equal(xg.grad, torch.full_like(x, 3.0))
    out = lean_scale(x, w, 1.0)  # only the optional tensor requires grad
    assert out.grad_fn is not None
    with torch.no_grad():
        assert lean_scale(xg, None, 2.0).grad_fn is None
    assert calls[-1] is False
    y = lean_scale_nograd(xg, 2.0)  # no formula: not differentiable, as before
    assert y.grad_fn is None and not y.requires_grad
    with torch._subclasses.fake_tensor.FakeTensorMode():  # not plain: the fake runs
        fake = lean_scale(torch.empty(2, 2), None, 1.0)
    assert fake.shape == (2, 2)


def test_backend_selection(monkeypatch):
    x = torch.randn(1, 8, 2, 4)
    assert "reference" in NA_BACKENDS.names()
    monkeypatch.setenv("FOVEAL_BACKEND", "reference")
    na1d(x, x, x, 3)
    monkeypatch.setenv("FOVEAL_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="FOVEAL_BACKEND"):
        na1d(x, x, x, 3)
    na1d(x, x, x, 3, backend="reference")  # an explicit argument wins over the environment
    monkeypatch.delenv("FOVEAL_BACKEND")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        na1d(x, x, x, 3, backend="cuda")
    with pytest.raises(TypeError, match="backend must be a string"):
        na1d(x, x, x, 3, backend=1)


def test_forced_backend_that_cannot_run_is_a_clear_error():
    if "triton" not in NA_BACKENDS.names():
        pytest.skip("no triton backend registered on this install")
    x = torch.randn(1, 8, 2, 4)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(NotImplementedError, match="backend 'triton'"):
            na1d(x, x, x, 3, backend="triton")


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize(
    "call,exc,pattern",
    [
        (lambda: na2d([1.0], _x(1, 5, 5, 1, 2), _x(1, 5, 5, 1, 2), 3), TypeError, "q must be a torch.Tensor"),
        (lambda: na2d(_x(1, 5, 5, 1, 2, dtype=torch.int64), _x(1, 5, 5, 1, 2), _x(1, 5, 5, 1, 2), 3), TypeError, "floating dtype"),
        (lambda: na2d(_x(1, 5, 1, 2), _x(1, 5, 1, 2), _x(1, 5, 1, 2), 3), ValueError, "q must have 5 dimensions"),
        (lambda: na1d(_x(1, 5, 5, 1, 2), _x(1, 5, 5, 1, 2), _x(1, 5, 5, 1, 2), 3), ValueError, "q must have 4 dimensions"),
        (lambda: na2d(_x(1, 5, 5, 1, 2), _x(1, 5, 6, 1, 2), _x(1, 5, 5, 1, 2), 3), ValueError, "k must have the shape of q"),
        (lambda: na2d(_x(1, 5, 5, 1, 2), _x(1, 5, 5, 1, 2), _x(1, 5, 5, 2, 2), 3), ValueError, "v must match q"),
        (lambda: na2d(_x(1, 5, 5, 1, 2), _x(1, 5, 5, 1, 2, dtype=torch.float64), _x(1, 5, 5, 1, 2), 3), ValueError, "same dtype"),
        (lambda: na2d(_x(1, 5, 5, 1, 2), _x(1, 5, 5, 1, 2), _x(1, 5, 5, 1, 2, dtype=torch.float16), 3), ValueError, "v and q must have the same dtype"),
        (lambda: na2d(_x(1, 5, 5, 1, 2), _x(1, 5, 5, 1, 2), _x(1, 5, 5, 1, 2).to("meta"), 3), ValueError, "same device"),
        (lambda: na2d(_x(1, 5, 6, 1, 2), _x(1, 5, 6, 1, 2), _x(1, 5, 6, 1, 2), 7), ValueError, r"kernel_size=7 \* dilation=1 = 7 > 5 on spatial axis 0"),
        (lambda: na2d(_x(1, 8, 8, 1, 2), _x(1, 8, 8, 1, 2), _x(1, 8, 8, 1, 2), 3, dilation=(1, 3)), ValueError, "= 9 > 8 on spatial axis 1"),
        (lambda: na2d(_x(1, 8, 8, 1, 2), _x(1, 8, 8, 1, 2), _x(1, 8, 8, 1, 2), 3, stride=4), ValueError, "stride must not exceed kernel_size"),
        (lambda: na2d(_x(1, 8, 8, 1, 2), _x(1, 8, 8, 1, 2), _x(1, 8, 8, 1, 2), 1), ValueError, "kernel_size must be >= 2"),
        (lambda: na2d(_x(1, 8, 8, 1, 2), _x(1, 8, 8, 1, 2), _x(1, 8, 8, 1, 2), 3, dilation=0), ValueError, "dilation must be >= 1"),
        (lambda: na2d(_x(1, 8, 8, 1, 2), _x(1, 8, 8, 1, 2), _x(1, 8, 8, 1, 2), (3, 3, 3)), ValueError, "kernel_size must be an int or a tuple of 2 ints"),
        (lambda: na2d(_x(1, 8, 8, 1, 2), _x(1, 8, 8, 1, 2), _x(1, 8, 8, 1, 2), 3.0), TypeError, "kernel_size must be an int"),
        (lambda: na2d(_x(1, 8, 8, 1, 2), _x(1, 8, 8, 1, 2), _x(1, 8, 8, 1, 2), 3, is_causal="yes"), TypeError, "is_causal must be a bool"),
        (lambda: na2d(_x(1, 8, 8, 2, 2), _x(1, 8, 8, 2, 2), _x(1, 8, 8, 2, 2), 3, rpb=_x(2, 5, 4)), ValueError, r"rpb must have shape \[heads, 2k-1, ...\] = \[2, 5, 5\]"),
        (lambda: na2d(_x(1, 8, 8, 2, 2), _x(1, 8, 8, 2, 2), _x(1, 8, 8, 2, 2), 3, rpb=_x(3, 5, 5)), ValueError, "got rpb.shape=\\[3, 5, 5\\]"),
        (lambda: na2d(_x(1, 8, 8, 2, 2), _x(1, 8, 8, 2, 2), _x(1, 8, 8, 2, 2), 3, rpb=_x(2, 5, 5, dtype=torch.float64)), ValueError, "rpb must have the dtype of q or float32"),
        (lambda: na2d(_x(1, 8, 8, 2, 2), _x(1, 8, 8, 2, 2), _x(1, 8, 8, 2, 2), 3, rpb=[0.0]), TypeError, "rpb must be a torch.Tensor"),
        (lambda: na2d(_x(1, 8, 8, 2, 2), _x(1, 8, 8, 2, 2), _x(1, 8, 8, 2, 2), 3, scale="x"), TypeError, "scale must be a float"),
        (lambda: na2d(_x(1, 8, 8, 2, 2), _x(1, 8, 8, 2, 2), _x(1, 8, 8, 2, 2), 3, return_lse=1), TypeError, "return_lse must be a bool"),
        (lambda: neighborhood_attention(_x(1, 8, 8, 8, 2, 2, 2), _x(1, 8, 8, 8, 2, 2, 2), _x(1, 8, 8, 8, 2, 2, 2), 3), ValueError, "na_dim must be 1, 2 or 3"),
    ],
)
def test_bad_input_raises(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_zero_scale_is_honoured():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 6, 2, 3, generator=g, dtype=torch.float64) for _ in range(3))
    out = na1d(q, k, v, 3, scale=0.0)
    ref, _ = oracle(q, k, v, (3,), (1,), (1,), (False,), scale=0.0)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("op", [na1d, na2d, na3d])
def test_every_argument_is_documented(op):
    doc = op.__doc__
    for name in inspect.signature(op).parameters:
        assert re.search(rf"^\s+{name}:", doc, re.M), f"{op.__name__}: argument {name!r} is not documented"


@pytest.mark.parametrize("use_out, use_lse", [(True, False), (True, True), (False, True)])
def test_eager_path_matches_custom_op(monkeypatch, use_out, use_lse):
    """Eager calls skip the custom-op dispatcher; results and gradients are those of the op."""
    import foveal.kernels.neighborhood as nbh

    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 6, 7, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(2, 5, 5, generator=g, dtype=torch.float64)
    results = []
    for eager in (True, False):
        monkeypatch.setattr(nbh, "_eager_ok", lambda *a, eager=eager: eager)
        leaves = [t.clone().requires_grad_() for t in (q, k, v, rpb)]
        out, lse = na2d(*leaves[:3], 3, (2, 1), rpb=leaves[3], return_lse=True)
        loss = (out.sin().sum() if use_out else 0) + (lse.cos().sum() if use_lse else 0)
        results.append((out, lse) + torch.autograd.grad(loss, leaves))
        assert ("_EagerNA" in type(out.grad_fn).__name__) == eager
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_model_parameters_take_the_eager_path():
    """A layer's rpb is an nn.Parameter: still a plain tensor to the eager path (no dispatcher);
    calls with nothing to differentiate build no autograd node, and give the same output."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 7, 6, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    rpb = torch.nn.Parameter(torch.randn(2, 5, 5, generator=g, dtype=torch.float64))
    out = na2d(q, k, v, 3, rpb=rpb)
    assert "_EagerNA" in type(out.grad_fn).__name__
    with torch.no_grad():
        plain = na2d(q, k, v, 3, rpb=rpb)
    assert plain.grad_fn is None and not plain.requires_grad
    torch.testing.assert_close(plain, out.detach(), rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(na2d(q, k, v, 3, rpb=rpb), plain, rtol=0, atol=0)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf"), 10 ** 400],
                         ids=["nan", "inf", "-inf", "int-overflow"])
def test_non_finite_scale_raises(scale):
    x = torch.randn(1, 8, 8, 2, 4)
    shown = "inf" if isinstance(scale, int) else f"{scale}"
    with pytest.raises(ValueError, match=rf"na2d: scale must be a finite number, got scale={re.escape(shown)}$"):
        na2d(x, x, x, 3, scale=scale)


@pytest.mark.parametrize("scale", [0.0, -0.37, -3, 1e-30])
def test_finite_scales_are_accepted(scale):
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 7, 6, 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    out = na2d(q, k, v, 3, scale=scale)
    ref, _ = oracle(q, k, v, (3, 3), (1, 1), (1, 1), (False, False), scale=float(scale))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
