"""The Triton halo-attention backend against the reference and the brute-force oracle.

CPU tests run the kernels through Triton's interpreter at tiny shapes with small forced tiles, so a
query block spans several programs and a key block several key tiles. Triton fixes interpreter mode
when it is first imported, so in an ordinary run ``test_interpreter_suite`` runs them in a
subprocess with ``TRITON_INTERPRET=1`` (``TRITON_INTERPRET=1 pytest tests/test_halo_triton.py`` runs
them directly). GPU tests (``pytest -m gpu tests/test_halo_triton.py``) run the compiled kernels at
the sizes of timm's HaloNets in every dtype.
"""
import os
import random
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

import foveal.kernels.halo_triton as ht  # noqa: E402
from foveal.kernels import HALO_BACKENDS, halo2d  # noqa: E402
from halo_oracle import oracle  # noqa: E402

INTERPRETED = ht._interpreting()
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
    x = torch.randn(1, 8, 8, 2, 16)
    cfg = dict(block_size=4, halo_size=1, stride=1)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in ht.halo_triton_probe(x, x, x, None, None, **cfg)
    assert HALO_BACKENDS.choose("auto", x, x, x, None, None, **cfg) == "reference"
    with pytest.raises(NotImplementedError, match="backend 'triton'"):
        halo2d(x, x, x, 4, 1, backend="triton")


def _inputs(B, H, W, heads, D, Dv, b, hs, s, rel, dtype, device="cpu", seed=0, strided=False):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if strided:  # k and v as slices of one projection, as the layer reads them
        kv = rnd(B, H, W, heads, D + Dv)
        k, v = kv[..., :D], kv[..., D:]
    else:
        k, v = rnd(B, H, W, heads, D), rnd(B, H, W, heads, Dv)
    q = rnd(B, H // s, W // s, heads, D)
    win = b + 2 * hs
    rh = rnd(2 * win - 1, D) * 0.5 if rel else None
    rw = rnd(2 * win - 1, D) * 0.5 if rel else None
    return q, k, v, rh, rw


def _run(backend, q, k, v, rh, rw, b, hs, s, scale_rel, grads=True):
    leaves = [t.detach().clone().requires_grad_(grads) if t is not None else None for t in (q, k, v, rh, rw)]
    out, lse = halo2d(*leaves[:3], b, hs, s, *leaves[3:], scale_rel=scale_rel, return_lse=True, backend=backend)
    if not grads:
        return [out, lse]
    g = torch.Generator(device="cpu").manual_seed(1)
    go = torch.randn(out.shape, generator=g).to(out)
    gl = torch.randn(lse.shape, generator=g).to(lse)
    used = [t for t in leaves if t is not None]
    return [out, lse] + list(torch.autograd.grad((out.float() * go.float()).sum() + (lse * gl).sum(), used))


# -- interpreter ----------------------------------------------------------------------------------

def _cases(n, seed):
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        b = rng.choice([2, 3, 4])
        cases.append(dict(B=rng.choice([1, 2]), H=b * rng.randint(1, 2), W=b * rng.randint(1, 2), heads=1,
                          D=rng.choice([4, 6]), Dv=rng.choice([3, 4]), b=b, hs=rng.randint(0, 3),
                          s=rng.choice([1, 2]) if b % 2 == 0 else 1, rel=rng.random() < 0.8,
                          scale_rel=rng.random() < 0.3, strided=rng.random() < 0.5))
    return cases


_KEYS = ("B", "H", "W", "heads", "D", "Dv", "b", "hs", "s", "rel", "scale_rel", "strided")
# the paths every run covers, then randomized shapes
CASES = [dict(zip(_KEYS, c)) for c in [
    (1, 8, 8, 2, 4, 4, 4, 1, 2, True, True, True),  # strided queries, two heads, scaled positional logits
    (1, 6, 3, 1, 4, 3, 3, 2, 1, True, False, False),  # odd block, non-square
    (2, 4, 8, 1, 6, 3, 4, 2, 1, False, False, True),  # no positional term
]] + _cases(3, seed=5)


@pytest.fixture(params=[(1, False), (2, False), (8, False), (1, True), (2, True)],
                ids=lambda p: f"rows{p[0]}" + ("-fused" if p[1] else ""))
def small_tiles(monkeypatch, request):
    # several programs per query block, several key tiles per key block (the interpreter has no
    # tensor-core minimums), 1, 2 or 8 window rows per step of the query kernels (8: past the
    # window's last row), and both backward forms (fused: dK / dV by atomics from the query programs)
    rows, fused = request.param
    monkeypatch.setattr(ht, "_tiles", lambda queries, keys, win: (4, 8, 4))
    monkeypatch.setattr(ht, "_rows", lambda win, head_dim: rows)
    monkeypatch.setattr(ht, "_fused_bwd", lambda programs, block, halo: fused)


@interpreter
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{B}-{H}x{W}-h{heads}-b{b}h{hs}s{s}".format(**c))
def test_triton_matches_reference_and_oracle(case, small_tiles):
    c = dict(case)
    scale_rel, strided = c.pop("scale_rel"), c.pop("strided")
    q, k, v, rh, rw = _inputs(**c, dtype=torch.float32, strided=strided)
    args = (c["b"], c["hs"], c["s"], scale_rel)
    ours = _run("triton", q, k, v, rh, rw, *args)
    ref = _run("reference", q, k, v, rh, rw, *args)
    names = ["out", "lse", "dq", "dk", "dv", "drel_h", "drel_w"]
    for name, a, r in zip(names, ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    ref_out, ref_lse = oracle(q, k, v, c["b"], c["hs"], c["s"], rh, rw, scale_rel=scale_rel)
    torch.testing.assert_close(ours[0].double(), ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours[1].double(), ref_lse, rtol=1e-4, atol=1e-4)


@interpreter
@pytest.mark.parametrize("b,s", [(2, 1), (4, 2)])
def test_triton_one_window_backward(b, s, monkeypatch):
    """The map is one block held by one program: the fused backward stores dK / dV directly."""
    monkeypatch.setattr(ht, "_tiles", lambda queries, keys, win: (4, 8, 4))
    monkeypatch.setattr(ht, "_fused_bwd", lambda programs, block, halo: True)
    q, k, v, rh, rw = _inputs(2, b, b, 2, 4, 3, b, 2, s, True, torch.float32)
    for a, r in zip(_run("triton", q, k, v, rh, rw, b, 2, s, False), _run("reference", q, k, v, rh, rw, b, 2, s, False)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


@interpreter
def test_triton_deterministic_mode_avoids_atomics(monkeypatch):
    """Under ``torch.use_deterministic_algorithms(True)`` the backward is the atomic-free two-kernel form."""
    calls = []

    class Spy:  # counts the launches of the dK/dV kernel
        def __init__(self, launcher):
            self.launcher, self.param_names = launcher, launcher.param_names

        def __call__(self, *args, **kwargs):
            calls.append(1)
            return self.launcher(*args, **kwargs)

    monkeypatch.setattr(ht, "_DKDV", Spy(ht._DKDV))
    monkeypatch.setattr(ht, "_fused_bwd", lambda programs, block, halo: True)
    q, k, v, rh, rw = _inputs(1, 8, 4, 1, 4, 4, 4, 1, 1, True, torch.float32)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        ours = _run("triton", q, k, v, rh, rw, 4, 1, 1, False)
    finally:
        torch.use_deterministic_algorithms(was)
    assert calls, "the fused (atomic) backward ran in deterministic mode"
    for a, r in zip(ours, _run("reference", q, k, v, rh, rw, 4, 1, 1, False)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


@interpreter
def test_triton_halo_wider_than_block(small_tiles):
    """halo > block: a key lies in the windows of two query blocks per side (REACH = 2)."""
    q, k, v, rh, rw = _inputs(1, 6, 4, 1, 4, 4, 2, 3, 1, True, torch.float32)
    for a, r in zip(_run("triton", q, k, v, rh, rw, 2, 3, 1, False), _run("reference", q, k, v, rh, rw, 2, 3, 1, False)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


# bfloat16 runs on the GPU only: the interpreter's emulated bfloat16 products are not a reference
@interpreter
@pytest.mark.parametrize("dtype", [torch.float16])
def test_triton_low_precision(dtype):
    q, k, v, rh, rw = _inputs(1, 4, 8, 2, 8, 8, 4, 1, 2, True, dtype)
    ours = _run("triton", q, k, v, rh, rw, 4, 1, 2, False)
    ref = _run("reference", *(t.float() for t in (q, k, v, rh, rw)), 4, 1, 2, False)
    tol = 2e-2
    for a, r in zip(ours, ref):
        assert a.dtype == (torch.float32 if a.dim() == 4 else dtype)
        torch.testing.assert_close(a.float(), r, rtol=tol, atol=tol)


@interpreter
def test_triton_layer_matches_timm():
    from timm.layers.halo_attn import HaloAttn
    from foveal.layers import HaloAttention2d
    torch.manual_seed(0)
    ref = HaloAttn(16, stride=2, num_heads=2, block_size=4, halo_size=1)
    ours = HaloAttention2d(16, stride=2, num_heads=2, block_size=4, halo_size=1, backend="triton")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, 16, 8, 8)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ref(x1), ours(x2)
    y1.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-5)
    for p1, p2 in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-5, atol=1e-5)


# -- GPU ------------------------------------------------------------------------------------------
# timm's HaloNet layer shapes (batch reduced): (B, H, W, heads, D, Dv, block, halo, stride)
GPU_SHAPES = [
    (8, 64, 64, 4, 32, 32, 8, 3, 1),  # halonet50ts stage 2
    (8, 32, 32, 8, 32, 32, 8, 3, 1),  # halonet50ts stage 3
    (8, 16, 16, 8, 64, 64, 8, 2, 2),  # halonet26t stage 4, strided queries
    (8, 16, 16, 8, 16, 64, 8, 2, 1),  # eca_halonext26ts (dim_head 16)
    (8, 14, 14, 8, 24, 72, 7, 2, 1),  # haloregnetz_b (odd block, qk_ratio)
    (4, 48, 36, 4, 32, 32, 12, 2, 1),  # H4 block 12, non-square
    (4, 28, 28, 4, 32, 32, 14, 2, 2),  # H5 block 14, strided
    (16, 8, 8, 8, 64, 64, 8, 3, 1),  # halonet50ts's last stage at 256 px: the map is one block
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=[str(i) for i in range(len(GPU_SHAPES))])
@pytest.mark.parametrize("fused", [False, True], ids=["split-bwd", "fused-bwd"])
def test_gpu_matches_reference(shape, dtype, fused, monkeypatch):
    monkeypatch.setattr(ht, "_fused_bwd", lambda programs, block, halo: fused)
    B, H, W, heads, D, Dv, b, hs, s = shape
    q, k, v, rh, rw = _inputs(B, H, W, heads, D, Dv, b, hs, s, True, dtype, device="cuda", strided=True)
    ours = _run("triton", q, k, v, rh, rw, b, hs, s, False)
    ref = _run("reference", *(t.float() for t in (q, k, v, rh, rw)), b, hs, s, False)
    tol = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 8e-2}[dtype]
    for name, a, r in zip(["out", "lse", "dq", "dk", "dv", "drel_h", "drel_w"], ours, ref):
        scale = r.abs().max().clamp(min=1)
        assert ((a.float() - r).abs().max() / scale).item() <= tol, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_accelerated_halonet_matches_timm():
    import timm
    import foveal
    torch.manual_seed(0)
    model = timm.create_model("halonet26t").cuda().eval()
    x = torch.randn(4, 3, 256, 256, device="cuda")
    with torch.no_grad():
        before = model(x)
        foveal.accelerate(model, backend="triton", verbose=False)
        after = model(x)
    assert ((after - before).abs().max() / before.abs().max()).item() <= 1e-3  # tf32 allowed by default
