"""The Triton neighborhood-attention backend against the oracle and the reference.

CPU tests run the kernels through Triton's interpreter at tiny shapes with small forced tiles, so
maps span several tiles and key boxes several blocks. Triton fixes interpreter mode when it is
first imported, so in an ordinary run ``test_interpreter_suite`` runs them in a subprocess with
``TRITON_INTERPRET=1`` (``TRITON_INTERPRET=1 pytest tests/test_neighborhood_triton.py`` runs them
directly). GPU tests (``pytest -m gpu``) run the compiled kernels at real sizes in every dtype, within
one device call (see the GPU section).
"""
import contextlib
import os
import random
import subprocess
import sys
import time

import pytest
import torch

triton = pytest.importorskip("triton")

import foveal.kernels.neighborhood_triton as nt  # noqa: E402
from foveal.kernels import NA_BACKENDS, neighborhood_attention  # noqa: E402
from foveal.kernels.neighborhood_reference import lse_dtype, na_reference_bwd, na_reference_fwd  # noqa: E402
from na_oracle import oracle  # noqa: E402

INTERPRETED = nt._interpreting()
interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs under TRITON_INTERPRET=1 in test_interpreter_suite")


@pytest.mark.skipif(INTERPRETED, reason="already running under the interpreter")
def test_interpreter_suite():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", __file__]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"interpreter tests failed:\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
    assert " passed" in run.stdout and " failed" not in run.stdout


def test_probe_declines_cpu_without_interpreter(monkeypatch):
    if INTERPRETED:
        pytest.skip("the interpreter accepts CPU tensors")
    x = torch.randn(1, 6, 6, 2, 16)
    cfg = dict(kernel_size=(3, 3), dilation=(1, 1), stride=(1, 1), is_causal=(False, False))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in nt.na_triton_probe(x, x, x, None, **cfg)
    assert NA_BACKENDS.choose("auto", x, x, x, None, **cfg) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "before the first import" in nt.na_triton_probe(x, x, x, None, **cfg)


# Small tiles per rank (the interpreter ignores the tensor-core minimums), so every case tiles.
SMALL_TILES = {1: (1, 1, 16), 2: (1, 4, 4), 3: (2, 2, 4)}


def _small_candidates(variant: int):
    """A candidate generator that forces one small config; ``variant`` picks the block layout."""

    def candidates(kind, geo, head_dim, has_rpb):
        tile = SMALL_TILES[geo.ndim]
        if kind == "dq" and has_rpb:
            ez = min(tile[2] + geo.kernel[2] - 1, geo.group_sizes[2])
            wz = nt._next_pow2(ez)
            nl = 1 if geo.ndim == 1 else (4 if variant % 2 else 2)  # one-hot dot vs broadcast sum
            return [nt._Config(tile, wz * nl, wz, 4, 1)]
        if variant % 3 == 0:  # the key (query) box flattened
            return [nt._Config(tile, 16, 0, 4, 1)]
        return [nt._Config(tile, 16, 8 if variant % 3 == 1 else 4, 4, 1)]  # lines of 8 or 4 keys along z

    return candidates


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setattr(nt, "_TUNED", {})

    def use(variant=0, tables=True):
        monkeypatch.setattr(nt, "_candidates", _small_candidates(variant))
        # logit tables (neighborhood_tables.py) or masks and bias computed in the kernels
        monkeypatch.setenv("FOVEAL_NA_TABLES", "1" if tables else "0")

    use()
    return use


def _tuple(x, n):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,) * n


def _inputs(shape, heads, d, dv, rpb, kernel, seed, dtype=torch.float32, device="cpu", batch=1):
    g = torch.Generator().manual_seed(seed)
    n = len(shape)
    q = torch.randn(batch, *shape, heads, d, generator=g)
    k = torch.randn(batch, *shape, heads, d, generator=g)
    v = torch.randn(batch, *shape, heads, dv, generator=g)
    r = torch.randn(heads, *[2 * x - 1 for x in _tuple(kernel, n)], generator=g) if rpb else None
    move = lambda t: None if t is None else t.to(device=device, dtype=dtype if t is not r else t.dtype)  # noqa: E731
    return move(q), move(k), move(v), (None if r is None else r.to(device))


def _check_against_oracle(shape, kernel, dilation=1, stride=1, causal=False, rpb=False, d=8, dv=None, heads=2,
                          with_lse_grad=False, seed=0):
    n = len(shape)
    dv = d if dv is None else dv
    kernel, dilation, stride, causal = (_tuple(kernel, n), _tuple(dilation, n), _tuple(stride, n), _tuple(causal, n))
    q, k, v, r = _inputs(shape, heads, d, dv, rpb, kernel, seed)
    leaves = [t.requires_grad_() for t in (q, k, v) + ((r,) if rpb else ())]
    out, lse = neighborhood_attention(q, k, v, kernel, dilation, stride, causal, rpb=r, return_lse=True,
                                      backend="triton")
    g = torch.Generator().manual_seed(seed + 1)
    go, gl = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    loss = (out * go).sum() + ((lse * gl).sum() if with_lse_grad else 0)
    grads = torch.autograd.grad(loss, leaves)

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    out64, lse64 = oracle(*leaves64[:3], kernel, dilation, stride, causal, leaves64[3] if rpb else None, None)
    loss64 = (out64 * go.double()).sum() + ((lse64 * gl.double()).sum() if with_lse_grad else 0)
    grads64 = torch.autograd.grad(loss64, leaves64)

    torch.testing.assert_close(out.double(), out64.detach(), rtol=0, atol=2e-5)
    torch.testing.assert_close(lse.double(), lse64.detach(), rtol=0, atol=2e-5)
    for name, a, b in zip(("dq", "dk", "dv", "drpb"), grads, grads64):
        err = (a.double() - b).abs().max() / b.abs().max().clamp_min(1e-6)
        assert err < 2e-5, f"{name}: relative error {err:.2e}"


CASES = [
    # (shape, kernel, dilation, stride, causal, rpb, d, dv)
    ((9,), 4, 2, 1, False, True, 8, 8),  # even kernel, dilation not dividing the axis
    ((12,), 5, 1, 3, False, False, 16, 8),  # GNA stride, Dv != D
    ((11,), 3, 2, 1, True, True, 8, 8),  # causal, ragged groups
    ((7,), 7, 1, 1, False, True, 8, 8),  # kernel == axis
    ((7, 5), (3, 5), 1, 1, False, True, 8, 8),  # non-square, kernel == axis on one axis
    ((8, 10), 3, (2, 3), 1, False, True, 4, 4),  # dilation per axis, ragged (10 = 3 * 3 + 1)
    ((6, 7), (4, 2), 1, (2, 1), (True, False), False, 8, 16),  # even kernels, stride, causal on one axis
    ((8, 6), (5, 3), 1, 3, False, True, 8, 8),  # stride with bias
    ((5, 5), 5, 1, 1, False, True, 16, 16),  # window = whole map
    ((8, 7), 3, 1, 1, True, True, 8, 8),  # causal on both axes with bias
    ((4, 5, 6), (2, 3, 3), (1, 1, 2), 1, False, True, 8, 8),
    ((3, 4, 6), 3, 1, (1, 2, 1), (True, False, False), False, 8, 8),
    ((4, 4, 5), (4, 2, 3), (1, 2, 1), 1, False, False, 8, 4),
    ((40,), 31, 1, 1, False, True, 8, 8),  # large windows: key blocks inside every window skip the mask
    ((10, 10), 9, 1, 1, False, True, 8, 8),
]


@interpreter
@pytest.mark.parametrize("tables", [True, False], ids=["tables", "in-kernel-masks"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_oracle(interpret, case, tables):
    shape, kernel, dilation, stride, causal, rpb, d, dv = CASES[case]
    interpret(case, tables)
    _check_against_oracle(shape, kernel, dilation, stride, causal, rpb, d, dv, with_lse_grad=case % 4 == 1, seed=case)


def _random_case(rng):
    n = rng.choice([1, 2, 2, 3])
    shape = [rng.randint(3, 10) if n < 3 else rng.randint(2, 5) for _ in range(n)]
    kernel, dilation, stride, causal = [], [], [], []
    for L in shape:
        kk = rng.randint(2, L)
        kernel.append(kk)
        dilation.append(rng.randint(1, L // kk))
        stride.append(rng.randint(1, kk) if rng.random() < 0.3 else 1)
        causal.append(rng.random() < 0.2)
    return dict(shape=tuple(shape), kernel=kernel, dilation=dilation, stride=stride, causal=causal,
                rpb=rng.random() < 0.5, d=rng.choice([4, 8, 16]), heads=rng.choice([1, 2]),
                with_lse_grad=rng.random() < 0.3)


@interpreter
@pytest.mark.parametrize("seed", range(16))
def test_random_against_oracle(interpret, seed):
    rng = random.Random(1000 + seed)
    case = _random_case(rng)
    interpret(seed, tables=seed % 4 != 3)
    _check_against_oracle(**case, seed=seed)


@interpreter
def test_matches_reference(interpret):
    shape, kernel, dilation = (7, 8), (3, 5), (2, 1)
    q, k, v, r = _inputs(shape, 2, 8, 8, True, kernel, 5)
    cfg = (kernel, dilation, (1, 1), (False, False))
    out, lse = nt.na_triton_fwd(q, k, v, r, *cfg, 0.3)
    out_ref, lse_ref = na_reference_fwd(q, k, v, r, *cfg, 0.3)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse, lse_ref, rtol=0, atol=1e-5)
    go = torch.randn_like(out)
    grads = nt.na_triton_bwd(go, q, k, v, r, out, lse, None, *cfg, 0.3)
    grads_ref = na_reference_bwd(go, q, k, v, r, out_ref, lse_ref, None, *cfg, 0.3)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@interpreter
def test_strided_views_read_in_place(interpret):
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(1, 6, 7, 3, 2, 8, generator=g)  # a fused projection, split without copies
    rpb = torch.randn(2, 5, 5, generator=g)
    q, k, v = qkv.unbind(3)
    assert not q.is_contiguous()
    go = torch.randn(1, 6, 7, 2, 8, generator=g)
    results = []
    for tensors in ((q, k, v), (q.contiguous(), k.contiguous(), v.contiguous())):
        out, lse = nt.na_triton_fwd(*tensors, rpb, (3, 3), (2, 1), (1, 1), (False, False), 0.5)
        grads = nt.na_triton_bwd(go, *tensors, rpb, out, lse, None, (3, 3), (2, 1), (1, 1), (False, False), 0.5)
        results.append((out, lse) + grads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@interpreter
def test_drpb_deterministic_on_request(interpret):
    shape, kernel = (8, 8), (3, 3)
    q, k, v, r = _inputs(shape, 2, 8, 8, True, kernel, 7)
    cfg = (kernel, (1, 1), (1, 1), (False, False))
    out, lse = nt.na_triton_fwd(q, k, v, r, *cfg, 0.4)
    go = torch.randn_like(out)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        first = nt.na_triton_bwd(go, q, k, v, r, out, lse, None, *cfg, 0.4)
        second = nt.na_triton_bwd(go, q, k, v, r, out, lse, None, *cfg, 0.4)
        torch.use_deterministic_algorithms(False)
        atomic = nt.na_triton_bwd(go, q, k, v, r, out, lse, None, *cfg, 0.4)
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    torch.testing.assert_close(first[3], atomic[3], rtol=1e-5, atol=1e-6)


@interpreter
def test_rpb_float32_with_half_inputs_keeps_its_dtype(interpret):
    q, k, v, r = _inputs((6, 6), 2, 16, 16, True, (3, 3), 11, dtype=torch.float16)
    leaves = [t.requires_grad_() for t in (q, k, v, r)]
    out = neighborhood_attention(q, k, v, 3, rpb=r, backend="triton")
    assert out.dtype == torch.float16
    grads = torch.autograd.grad(out.float().sum(), leaves)
    assert [g.dtype for g in grads] == [torch.float16] * 3 + [torch.float32]


@interpreter
def test_probe_and_selection():
    x = torch.randn(1, 6, 6, 2, 16)
    cfg = dict(kernel_size=(3, 3), dilation=(1, 1), stride=(1, 1), is_causal=(False, False))
    assert nt.na_triton_probe(x, x, x, None, **cfg) is None
    assert NA_BACKENDS.choose("auto", x, x, x, None, **cfg) == "triton"
    assert "float64" in nt.na_triton_probe(x.double(), x.double(), x.double(), None, **cfg)
    wide = torch.randn(1, 6, 6, 2, nt.MAX_HEAD_DIM + 1)
    assert "head_dim" in nt.na_triton_probe(wide, wide, wide, None, **cfg)
    big = torch.randn(1, 40, 40, 1, 16)
    rpb = torch.zeros(1, 79, 79)
    big_cfg = dict(kernel_size=(40, 40), dilation=(1, 1), stride=(1, 1), is_causal=(False, False))
    assert "dRPB" in nt.na_triton_probe(big, big, big, rpb, **big_cfg)
    assert nt.na_triton_probe(big, big, big, None, **big_cfg) is None


@interpreter
def test_meta_and_compile_see_one_op(interpret):
    q = torch.randn(1, 6, 6, 2, 16, requires_grad=True)
    fn = torch.compile(lambda a: neighborhood_attention(a, a, a, 3, backend="triton"), fullgraph=True,
                       backend="aot_eager")
    out = fn(q)
    torch.testing.assert_close(out, neighborhood_attention(q, q, q, 3, backend="reference"), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@interpreter
@pytest.mark.parametrize("tables", [True, False], ids=["tables", "in-kernel-masks"])
@pytest.mark.parametrize("rpb", [True, False], ids=["rpb", "no-rpb"])
def test_negative_scale_matches_reference(interpret, rpb, tables):
    # a negative scale flips the row maximum: the forward must scale the logits before taking it
    interpret(tables=tables)
    shape, kernel = (7, 8), (3, 5)
    q, k, v, r = _inputs(shape, 2, 8, 8, rpb, kernel, 13)
    cfg = (kernel, (2, 1), (1, 1), (False, False))
    out, lse = nt.na_triton_fwd(q, k, v, r, *cfg, -0.7)
    out_ref, lse_ref = na_reference_fwd(q, k, v, r, *cfg, -0.7)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse, lse_ref, rtol=0, atol=1e-5)
    go = torch.randn_like(out)
    grads = nt.na_triton_bwd(go, q, k, v, r, out, lse, None, *cfg, -0.7)
    grads_ref = na_reference_bwd(go, q, k, v, r, out_ref, lse_ref, None, *cfg, -0.7)
    for a, b in zip(grads, grads_ref):
        if b is None:
            assert a is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# -- GPU ------------------------------------------------------------------------------------------
#
# Budget: the whole `pytest -m gpu` run has to fit one device call, well under 8 minutes on one
# H100/H200 starting from an empty Triton cache. The time goes to compiling, not running: every
# distinct (dtype, constexprs, integer specialization) compiles the forward, dQ and dK/dV kernels,
# seconds each (Triton specializes integers equal to 1 and multiples of 16, so most shape changes
# count), and the autotuner compiles and times every candidate config of a new problem: 4 to 8 per
# kernel on a 2-D map, about 400 compiles for the former 8 cases x 3 dtypes. Values do not depend on
# the config, so the GPU tests run with FOVEAL_NA_AUTOTUNE=0 (the first candidate), except
# test_gpu_autotuned_config_matches_default, which tunes one shape and checks the tuned values.
# Each case below stands for a distinct code path and costs one compile of each kernel; a test
# loops over its cases and reports every one that fails. Wall time and Triton compiles per test and
# per case are printed when the module finishes.

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-5}
DTYPE_IDS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


class _GpuReport:
    """Wall time, Triton compiles and compile seconds per test and per case (compiles are counted
    through ``triton.knobs`` JIT hooks where the Triton version has them and nothing else holds them)."""

    def __init__(self):
        self.rows = []
        self.compiles, self.compile_s = 0, 0.0
        self._started = {}
        runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
        hooks = ("jit_cache_hook", "jit_post_compile_hook")
        self._runtime = runtime if runtime is not None and all(
            hasattr(runtime, h) and getattr(runtime, h) is None for h in hooks) else None
        if self._runtime is not None:
            self._runtime.jit_cache_hook = self._before  # returns None: the compile goes ahead
            self._runtime.jit_post_compile_hook = self._after

    def _before(self, key=None, **_):
        self._started[id(key)] = time.perf_counter()

    def _after(self, key=None, **_):
        self.compiles += 1
        self.compile_s += time.perf_counter() - self._started.pop(id(key), time.perf_counter())

    @contextlib.contextmanager
    def timed(self, label, indent=0):
        row, start, n, s = len(self.rows), time.perf_counter(), self.compiles, self.compile_s
        self.rows.append(None)  # a test's row goes above the rows of its cases
        try:
            yield
        finally:
            self.rows[row] = (indent, label, time.perf_counter() - start, self.compiles - n, self.compile_s - s)

    def close(self) -> str:
        if self._runtime is not None:
            self._runtime.jit_cache_hook = self._runtime.jit_post_compile_hook = None
        counted = self._runtime is not None
        lines = ["", "GPU tests: wall s, Triton compiles, compile s" + ("" if counted else " (compiles not counted)")]
        for indent, label, wall, n, s in self.rows:
            lines.append(f"{'    ' * (indent + 1)}{label:<{60 - 4 * indent}} {wall:7.1f} {n:4d} {s:7.1f}")
        tests = [r for r in self.rows if r[0] == 0]
        lines.append(f"    {'total':<60} {sum(r[2] for r in tests):7.1f} {self.compiles:4d} {self.compile_s:7.1f}")
        return "\n".join(lines)


@pytest.fixture(scope="module")
def gpu_report(request):
    report = _GpuReport()
    yield report
    text = report.close()
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print(text)


@pytest.fixture
def gpu_env(monkeypatch, request, gpu_report):
    """Every GPU test: autotuning off, logit tables on (cases turn them off), timed."""
    monkeypatch.setenv("FOVEAL_NA_AUTOTUNE", "0")
    monkeypatch.setenv("FOVEAL_NA_TABLES", "1")
    with gpu_report.timed(request.node.name):
        yield gpu_report


def _case(shape, kernel, dilation=1, stride=1, causal=False, rpb=True, heads=2, d=32, dv=None, batch=2,
          tables=True, grad_lse=True, scale=None):
    return dict(shape=shape, kernel=kernel, dilation=dilation, stride=stride, causal=causal, rpb=rpb, heads=heads,
                d=d, dv=d if dv is None else dv, batch=batch, tables=tables, grad_lse=grad_lse,
                scale=d ** -0.5 if scale is None else scale)


# Per dtype, cases that together cover: rpb or not, logit tables or in-kernel masks, ranks 1/2/3,
# causal with stride, ragged dilation groups, window = map, head dims 16/32/48/64/128 and Dv != D,
# dLSE or not, a negative scale. The NAT main row (56x56, 2 heads, D 32, k 7, rpb) runs in every dtype.
GPU_CASES = {
    torch.float16: {
        "NAT main row, B=8": _case((56, 56), 7, batch=8),
        "NAT main row, in-kernel masks": _case((56, 56), 7, batch=4, tables=False),
        "ragged dilation 3 (56 = 3 * 18 + 2), D=64": _case((56, 56), 7, 3, rpb=False, d=64),
        "causal on both axes, non-square, D=16": _case((30, 45), 9, causal=True, heads=3, d=16),
        "3-D, dilation (1, 2, 1)": _case((6, 12, 20), (3, 5, 7), (1, 2, 1)),
    },
    torch.bfloat16: {
        "NAT main row, B=8": _case((56, 56), 7, batch=8),
        "causal + stride (2, 3), D=128": _case((56, 56), (7, 5), 1, (2, 3), (True, False), rpb=False, d=128),
        "D=48, Dv=64, ragged dilation (2, 1)": _case((33, 40), (5, 7), (2, 1), d=48, dv=64),
        "1-D GNA, dilation 3, stride 4, scale < 0": _case((1000,), 65, 3, 4, rpb=False, d=64, grad_lse=False,
                                                          scale=-0.2),
        "3-D causal + stride, in-kernel masks": _case((8, 12, 16), (3, 5, 5), 1, (1, 2, 3), (True, False, False),
                                                      rpb=False, d=64, tables=False),
    },
    torch.float32: {
        "NAT main row, B=4": _case((56, 56), 7, batch=4),
        "dilation (4, 8)": _case((56, 56), 7, (4, 8)),
        "window = map": _case((14, 14), 14, heads=4, grad_lse=False),
        "1-D with rpb, dilation 2": _case((4096,), 13, 2, heads=4),
    },
}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _check_against_reference(monkeypatch, dtype, c, seed):
    """Forward and backward of one case on the GPU against the reference backend (float32, same GPU);
    outputs are pre-filled with NaN, so an element the kernels skip fails the test."""
    monkeypatch.setenv("FOVEAL_NA_TABLES", "1" if c["tables"] else "0")
    n = len(c["shape"])
    cfg = tuple(_tuple(c[a], n) for a in ("kernel", "dilation", "stride", "causal"))
    q, k, v, r = _inputs(c["shape"], c["heads"], c["d"], c["dv"], c["rpb"], cfg[0], seed, dtype=dtype, device="cuda",
                         batch=c["batch"])
    assert nt.na_triton_probe(q, k, v, r, kernel_size=cfg[0], dilation=cfg[1], stride=cfg[2], is_causal=cfg[3]) is None
    scale = c["scale"]
    out = torch.full(v.shape, float("nan"), device="cuda", dtype=dtype)
    lse = torch.full(q.shape[:-1], float("nan"), device="cuda", dtype=lse_dtype(dtype))
    nt.na_triton_fwd(q, k, v, r, *cfg, scale, out=out, lse=lse)
    qf, kf, vf = q.float(), k.float(), v.float()
    out_ref, lse_ref = na_reference_fwd(qf, kf, vf, r, *cfg, scale)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all(), "an output element was not written"
    assert _rel(out, out_ref) < TOL[dtype], f"out: relative error {_rel(out, out_ref):.2e}"
    assert (lse - lse_ref).abs().max().item() < 50 * TOL[dtype], f"lse: error {(lse - lse_ref).abs().max().item():.2e}"

    go = torch.randn_like(out)
    gl = torch.randn_like(lse) if c["grad_lse"] else None
    grads = [torch.full_like(t, float("nan")) for t in (q, k, v)]
    got = nt.na_triton_bwd(go, q, k, v, r, out, lse, gl, *cfg, scale, dq=grads[0], dk=grads[1], dv=grads[2])
    ref = na_reference_bwd(go.float(), qf, kf, vf, r, out.float(), lse, gl, *cfg, scale)
    for name, a, b in zip(("dq", "dk", "dv", "drpb"), got, ref):
        if b is None:
            assert a is None, f"{name}: expected None"
            continue
        assert torch.isfinite(a).all(), f"{name}: an element was not written"
        assert _rel(a, b) < 2 * TOL[dtype], f"{name}: relative error {_rel(a, b):.2e}"


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", list(GPU_CASES), ids=DTYPE_IDS.get)
def test_gpu_against_reference(gpu_env, monkeypatch, dtype):
    failures = []
    for seed, (name, case) in enumerate(GPU_CASES[dtype].items()):
        try:
            with gpu_env.timed(name, indent=1):
                _check_against_reference(monkeypatch, dtype, case, seed)
        except Exception as err:  # every case runs; the report lists each failure
            failures.append(f"{name}: {type(err).__name__}: {err}")
    assert not failures, "\n".join(failures)


@gpu
@needs_cuda
def test_gpu_autotuned_config_matches_default(gpu_env, monkeypatch):
    """The one test that autotunes: every candidate for the NAT main row (fp16) is compiled and timed,
    and the configs it picks give the values of the default config and of the reference."""
    dtype, cfg = torch.float16, ((7, 7), (1, 1), (1, 1), (False, False))
    q, k, v, r = _inputs((56, 56), 2, 32, 32, True, cfg[0], 21, dtype=dtype, device="cuda", batch=4)
    geo = nt._geometry(q, *cfg)
    assert all(len(nt._candidates(kind, geo, 32, True)) > 1 for kind in ("fwd", "dq", "dkdv"))
    go = torch.randn_like(q)
    gl = torch.randn(q.shape[:-1], device="cuda")
    results = {}
    for tune in ("0", "1"):
        monkeypatch.setenv("FOVEAL_NA_AUTOTUNE", tune)
        monkeypatch.setattr(nt, "_TUNED", {})  # forget configs and launch plans
        with gpu_env.timed(f"autotune={tune}", indent=1):
            out, lse = nt.na_triton_fwd(q, k, v, r, *cfg, 32 ** -0.5)
            results[tune] = (out, lse) + nt.na_triton_bwd(go, q, k, v, r, out, lse, gl, *cfg, 32 ** -0.5)
    qf, kf, vf = q.float(), k.float(), v.float()
    out_ref, lse_ref = na_reference_fwd(qf, kf, vf, r, *cfg, 32 ** -0.5)
    ref = (out_ref, lse_ref) + na_reference_bwd(go.float(), qf, kf, vf, r, out_ref, lse_ref, gl, *cfg, 32 ** -0.5)
    for name, tuned, default, b in zip(("out", "lse", "dq", "dk", "dv", "drpb"), results["1"], results["0"], ref):
        assert _rel(tuned, b) < 2 * TOL[dtype], f"{name}: tuned config, relative error {_rel(tuned, b):.2e}"
        assert _rel(tuned, default) < 2 * TOL[dtype], f"{name}: tuned vs default config {_rel(tuned, default):.2e}"


@gpu
@needs_cuda
def test_gpu_tf32_mode_for_float32(gpu_env):
    # the NAT main row, so the exact forward is the one test_gpu_against_reference[float32] compiled
    q, k, v, r = _inputs((56, 56), 2, 32, 32, True, (7, 7), 1, device="cuda")
    cfg = ((7, 7), (1, 1), (1, 1), (False, False))
    ref, _ = na_reference_fwd(q.double(), k.double(), v.double(), r.double(), *cfg, 0.125)
    was = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        fast, _ = nt.na_triton_fwd(q, k, v, r, *cfg, 0.125)
        torch.backends.cuda.matmul.allow_tf32 = False
        exact, _ = nt.na_triton_fwd(q, k, v, r, *cfg, 0.125)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = was
    assert _rel(exact, ref) < 1e-6
    assert 1e-6 < _rel(fast, ref) < 3e-3


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=DTYPE_IDS.get)
def test_gpu_huge_logits_stay_finite(gpu_env, dtype):
    # the NAT main row through the public op: the kernels test_gpu_against_reference compiled
    q, k, v, r = _inputs((56, 56), 2, 32, 32, True, (7, 7), 2, dtype=dtype, device="cuda")
    q = (q * 60).requires_grad_()  # |scale * q.k| reaches ~1e4
    k = (k * 60).requires_grad_()
    v.requires_grad_()
    r = (r * 1e3).requires_grad_()
    out, lse = neighborhood_attention(q, k, v, 7, rpb=r, return_lse=True, backend="triton")
    assert lse.abs().max().item() > 1e3
    grads = torch.autograd.grad((out.float() * torch.randn_like(out.float())).sum() + lse.sum(), (q, k, v, r))
    for t in (out, lse) + grads:
        assert torch.isfinite(t).all()


@gpu
@needs_cuda
def test_gpu_strided_views_and_deterministic_drpb(gpu_env):
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(4, 56, 56, 3, 2, 32, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = qkv.unbind(3)  # views of one fused projection, as the NA layers make them
    rpb = torch.randn(2, 13, 13, device="cuda", generator=g)
    cfg = ((7, 7), (2, 2), (1, 1), (False, False))
    out, lse = nt.na_triton_fwd(q, k, v, rpb, *cfg, 32 ** -0.5)
    out_c, lse_c = nt.na_triton_fwd(q.contiguous(), k.contiguous(), v.contiguous(), rpb, *cfg, 32 ** -0.5)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    go = torch.randn_like(out)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        runs = [nt.na_triton_bwd(go, q, k, v, rpb, out, lse, None, *cfg, 32 ** -0.5) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(was)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
    ref = na_reference_bwd(go.float(), q.float(), k.float(), v.float(), rpb, out.float(), lse, None, *cfg, 32 ** -0.5)
    assert _rel(runs[0][3], ref[3]) < 1e-2
