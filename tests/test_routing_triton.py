"""The Triton routed-attention backend against the reference and the brute-force gather oracle.

CPU tests run the kernels through Triton's interpreter at tiny shapes, with the default tiling and
with forced tilings (several query tiles per region, several regions packed per tile). Triton fixes
interpreter mode when it is first imported, so in an ordinary run ``test_interpreter_suite`` runs
them in a subprocess with ``TRITON_INTERPRET=1``. GPU tests (``pytest -m gpu
tests/test_routing_triton.py``) run the compiled kernels at BiFormer's real sizes in every dtype.
"""
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

import foveal.kernels.routing_triton as rt  # noqa: E402
from foveal.kernels import ROUTING_BACKENDS, routed_attention  # noqa: E402
from routing_oracle import oracle  # noqa: E402
from test_routing import case_id, check_against_oracle, random_cases  # noqa: E402

INTERPRETED = rt._interpreting()
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
    x = torch.randn(1, 4, 2, 2, 16)
    idx = torch.zeros(1, 4, 2, dtype=torch.long)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in rt.routing_triton_probe(x, x, x, idx)
    assert ROUTING_BACKENDS.choose("auto", x, x, x, idx) == "reference"
    with pytest.raises(NotImplementedError, match="backend 'triton'"):
        routed_attention(x, x, x, idx, backend="triton")


@interpreter
@pytest.mark.parametrize("case", random_cases(6, seed=7), ids=case_id)
def test_triton_matches_oracle_fp32(case):
    check_against_oracle(case, "triton", torch.float32, 2e-4)


@interpreter
@pytest.mark.parametrize("tiles", [(16, 16, 1, 4), (16, 32, 4, 4), (16, 64, 2, 4)], ids=str)
@pytest.mark.parametrize("case", random_cases(3, seed=9), ids=case_id)
def test_triton_forced_tiles(case, tiles, monkeypatch):
    if tiles[2] > 1 and case["T"] * tiles[2] > 64:
        pytest.skip("packed tiles hold small regions only")
    monkeypatch.setattr(rt, "_tiles", lambda T, Tk, L: tiles)
    check_against_oracle(case, "triton", torch.float32, 2e-4)


@interpreter
@pytest.mark.parametrize("kv_tiles", [(16, 1, 16, 1, 4), (16, 4, 16, 2, 4), (32, 2, 16, 4, 4), (16, 2, 16, 1, 4)],
                         ids=str)
@pytest.mark.parametrize("case", random_cases(3, seed=11), ids=case_id)
def test_triton_forced_kv_tiles(case, kv_tiles, monkeypatch):
    """The backward with forced key tilings: one region per key tile (the atomic kernel) and packed
    key tiles (the dK/dV kernel) with several query chunks per region or packed query regions."""
    if max(case["Tk"] * kv_tiles[1], case["T"] * kv_tiles[3]) > 64 and (kv_tiles[1] > 1 or kv_tiles[3] > 1):
        pytest.skip("packed tiles hold small regions only")
    monkeypatch.setattr(rt, "_kv_tiles", lambda T, Tk: kv_tiles)
    check_against_oracle(case, "triton", torch.float32, 2e-4)


@interpreter
@pytest.mark.parametrize("path", ["atomic", "reverse"])
@pytest.mark.parametrize("case", random_cases(4, seed=17), ids=case_id)
def test_triton_unpacked_backward_paths(case, path, monkeypatch):
    """One-region key tiles: the float32-atomic kernel and the reverse-routing-map dK/dV kernel."""
    monkeypatch.setattr(rt, "_unpacked_bwd", lambda dense: path)
    monkeypatch.setattr(rt, "_kv_tiles", lambda T, Tk: (16, 1, 16, 1, 4))
    check_against_oracle(case, "triton", torch.float32, 2e-4)


@interpreter
@pytest.mark.parametrize("case", random_cases(2, seed=23), ids=case_id)
def test_triton_deterministic_mode_avoids_atomics(case, monkeypatch):
    """Under ``torch.use_deterministic_algorithms(True)`` one-region key tiles take the reverse map."""
    def refuse(*args, **kwargs):
        raise AssertionError("the float32-atomic backward ran in deterministic mode")

    monkeypatch.setattr(rt, "_bwd_atomic", refuse)
    monkeypatch.setattr(rt, "_kv_tiles", lambda T, Tk: (16, 1, 16, 1, 4))
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        check_against_oracle(case, "triton", torch.float32, 2e-4)
    finally:
        torch.use_deterministic_algorithms(was)


@interpreter
@pytest.mark.parametrize("path", ["atomic", "reverse"])
@pytest.mark.parametrize("T", [3, 20], ids=lambda t: f"T{t}")
def test_triton_duplicate_indices(T, path, monkeypatch):
    """A region named twice in a routing list counts twice in the forward and in every gradient."""
    monkeypatch.setattr(rt, "_unpacked_bwd", lambda dense: path)
    g = torch.Generator().manual_seed(5)
    B, R, heads, D = 2, 5, 2, 8
    q, k, v = (torch.randn(B, R, T, heads, D, generator=g) for _ in range(3))
    idx = torch.randint(0, 2, (B, R, 3), generator=g)  # many repeats of regions 0 and 1
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = routed_attention(*leaves, idx, backend="triton")
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = oracle(*ref_leaves, idx)[0]
    torch.testing.assert_close(out.double(), ref, rtol=2e-4, atol=2e-4)
    go = torch.randn(out.shape, generator=g)
    for a, b in zip(torch.autograd.grad(out, leaves, go), torch.autograd.grad(ref, ref_leaves, go.double())):
        torch.testing.assert_close(a.double(), b, rtol=2e-4, atol=2e-4)


# bfloat16 runs on the GPU only: the interpreter's emulated bfloat16 products are not a reference
@interpreter
def test_triton_fp16_and_large_region(monkeypatch):
    """A region larger than one query tile (three programs per region), fp16 operands."""
    monkeypatch.setattr(rt, "_tiles", lambda T, Tk, L: (16, 32, 1, 4))
    case = dict(B=1, R=4, T=40, Tk=40, heads=1, D=8, Dv=16, topk=2, dense=False)
    check_against_oracle(case, "triton", torch.float32, 2e-4)
    check_against_oracle(case, "triton", torch.float16, 2e-2)


@interpreter
def test_triton_strided_views_int32_dense():
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(2, 4, 3, 2, 4 + 4 + 6, generator=g)
    q, k, v = qkv.split([4, 4, 6], -1)
    idx = torch.randint(0, 4, (2, 4, 3), generator=g)
    torch.testing.assert_close(routed_attention(q, k, v, idx.int(), backend="triton"),
                               oracle(q, k, v, idx)[0].float(), rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(routed_attention(q, k, v, None, backend="triton"),
                               oracle(q, k, v, None)[0].float(), rtol=2e-4, atol=2e-4)
    leaves = [qkv.clone().requires_grad_() for _ in range(2)]
    grads = []
    for leaf, backend in zip(leaves, ("triton", "reference")):
        q, k, v = leaf.split([4, 4, 6], -1)
        out = routed_attention(q, k, v, idx, backend=backend)
        go = torch.ones(()).expand(out.shape)  # an expanded (stride 0) gradient, as .sum() gives
        grads.append(torch.autograd.grad(out, leaf, go)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=2e-4, atol=2e-4)


@interpreter
def test_triton_model_matches_reference_backend(monkeypatch):
    import timm
    import foveal  # noqa: F401
    torch.manual_seed(0)
    model = timm.create_model("test_biformer")
    x = torch.randn(2, 3, 64, 64)
    outs, grads = [], []
    for backend in ("triton", "reference"):
        monkeypatch.setenv("FOVEAL_BACKEND", backend)
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        outs.append(out)
        grads.append(model.stages[0].blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-3)


# -- GPU: BiFormer's real sizes ------------------------------------------------------------------

GPU_SHAPES = {  # (B, R, T, heads, D, topk): BiFormer-S stages 1-3 at 224, and COCO-size stage 1 / 3
    "s1-224": (8, 49, 64, 2, 32, 1),
    "s2-224": (8, 49, 16, 4, 32, 4),
    "s3-224": (8, 49, 4, 8, 32, 16),
    "s1-coco": (1, 256, 273, 2, 32, 1),
    "s3-coco": (1, 256, 24, 8, 32, 16),
    "dense-224": (8, 49, 4, 8, 32, 49),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(GPU_SHAPES))
def test_gpu_matches_reference(name, dtype):
    _check_gpu_case(name, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["s1-224", "s1-coco", "s3-coco"])
def test_gpu_reverse_map_backward(name, monkeypatch):
    """The reverse-routing-map dK/dV kernel at real sizes (not the default path yet)."""
    monkeypatch.setattr(rt, "_unpacked_bwd", lambda dense: "reverse")
    _check_gpu_case(name, torch.bfloat16)


def _check_gpu_case(name, dtype):
    B, R, T, heads, D, topk = GPU_SHAPES[name]
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, R, T, heads, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    idx = None if topk == R else torch.rand(B, R, R, device="cuda").topk(topk, -1).indices
    scale = (heads * D) ** -0.5
    out, lse = routed_attention(q, k, v, idx, scale, return_lse=True, backend="triton")
    go = torch.randn_like(out)
    grads = torch.autograd.grad((out * go).sum(), (q, k, v))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = routed_attention(*leaves, idx, scale, return_lse=True, backend="reference")
    ref_grads = torch.autograd.grad((ref * go.double()).sum(), leaves)
    tol = 2e-3 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=tol, atol=tol)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), rg, rtol=tol, atol=tol * max(1.0, rg.abs().max().item()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_model_matches_reference_backend():
    """The whole model on both backends. In fp32 the logits agree closely. Under bf16 autocast the
    op's rounding differs between backends, and over 26 routed layers a near-tie in a region's
    top-k can flip, so a few logits move by more than bf16 noise: there the bound is on the
    relative error of the whole logit tensor and on the fraction of outliers."""
    import timm
    import foveal  # noqa: F401
    torch.manual_seed(0)
    model = timm.create_model("biformer_small").cuda().eval()
    x = torch.randn(4, 3, 224, 224, device="cuda")

    def both(autocast):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = model(x).float()
            os.environ["FOVEAL_BACKEND"] = "reference"
            try:
                ref = model(x).float()
            finally:
                del os.environ["FOVEAL_BACKEND"]
        return out, ref

    out, ref = both(False)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    out, ref = both(True)
    err = (out - ref).abs()
    assert err.norm() / ref.norm() < 2e-2
    assert (err > 5e-2 + 5e-2 * ref.abs()).float().mean() < 2e-3
    assert out.argmax(-1).eq(ref.argmax(-1)).all()
