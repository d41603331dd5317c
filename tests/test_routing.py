"""Routed attention: the op against the brute-force gather oracle, the custom op under
torch.compile, FLOPs, and the argument checks."""
import random

import pytest
import torch

from foveal.kernels import ROUTING_BACKENDS, routed_attention
from routing_oracle import oracle


def _problem(B, R, T, Tk, heads, D, Dv, topk, dense=False, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, R, T, heads, D, generator=g, dtype=dtype)
    k = torch.randn(B, R, Tk, heads, D, generator=g, dtype=dtype)
    v = torch.randn(B, R, Tk, heads, Dv, generator=g, dtype=dtype)
    if dense:
        return q, k, v, None
    # random routing: distinct regions as torch.topk gives them, in random order
    idx = torch.stack([torch.randperm(R, generator=g)[:topk] for _ in range(B * R)]).reshape(B, R, topk)
    return q, k, v, idx


def random_cases(n, seed):
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        R = rng.choice([1, 4, 6, 9])
        T = rng.choice([1, 3, 4, 6])
        cases.append(dict(B=rng.choice([1, 2]), R=R, T=T, Tk=rng.choice([T, T, 2]), heads=rng.randint(1, 3),
                          D=rng.choice([2, 4, 8]), Dv=rng.choice([3, 4, 8]), topk=rng.randint(1, R),
                          dense=rng.random() < 0.2))
    return cases


def case_id(c):
    return "B{B}-R{R}-T{T}k{Tk}-h{heads}-D{D}v{Dv}-top{topk}".format(**c) + ("-dense" if c["dense"] else "")


def check_against_oracle(case, backend, dtype=torch.float64, tol=1e-9, seed=0):
    q, k, v, idx = _problem(**case, dtype=dtype, seed=seed)
    scale = 0.3 if case["D"] == 4 else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = routed_attention(*leaves, idx, scale, return_lse=True, backend=backend)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = oracle(*ref_leaves, idx, scale)
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=tol, atol=tol)
    go = torch.randn(out.shape, dtype=torch.float64)
    gl = torch.randn(lse.shape, dtype=torch.float64)
    grads = torch.autograd.grad((out * go.to(dtype)).sum() + (lse * gl.to(lse.dtype)).sum(), leaves)
    ref_grads = torch.autograd.grad((ref_out * go.to(dtype).double()).sum() + (ref_lse * gl.to(lse.dtype).double()).sum(),
                                    ref_leaves)
    for g, rg in zip(grads, ref_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), rg, rtol=tol, atol=tol * max(1.0, rg.abs().max().item()))


@pytest.mark.parametrize("case", random_cases(10, seed=3), ids=case_id)
def test_reference_matches_oracle(case):
    check_against_oracle(case, "reference")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("case", random_cases(3, seed=5), ids=case_id)
def test_reference_low_precision(case, dtype, tol):
    check_against_oracle(case, "reference", dtype, tol)


def test_duplicate_indices_count_twice():
    q, k, v, _ = _problem(1, 2, 2, 2, 1, 4, 4, 2)
    idx = torch.tensor([[[1, 1], [0, 1]]])
    out, lse = routed_attention(q, k, v, idx, return_lse=True, backend="reference")
    ref_out, ref_lse = oracle(q, k, v, idx)
    torch.testing.assert_close(lse, ref_lse)
    torch.testing.assert_close(lse[0, 0], routed_attention(q, k, v, idx[:, :, :1], return_lse=True)[1][0, 0]
                               + torch.log(torch.tensor(2.0, dtype=torch.float64)))


def test_reference_chunks(monkeypatch):
    """The memory bound: one query region per step gives the answer of one step."""
    import foveal.kernels.routing_reference as rr
    for dense in (False, True):
        q, k, v, idx = _problem(2, 6, 3, 3, 2, 4, 5, 3, dense=dense)
        whole = rr.routing_reference_fwd(q, k, v, idx, 0.5)
        go, gl = torch.randn_like(whole[0]), torch.randn_like(whole[1])
        whole_grads = rr.routing_reference_bwd(go, q, k, v, idx, *whole, gl, 0.5)
        monkeypatch.setattr(rr, "CHUNK_ELEMENTS", 1)
        steps = rr.routing_reference_fwd(q, k, v, idx, 0.5)
        step_grads = rr.routing_reference_bwd(go, q, k, v, idx, *steps, gl, 0.5)
        monkeypatch.undo()
        for a, b in zip(whole + whole_grads, steps + step_grads):
            torch.testing.assert_close(a, b)


def test_strided_views_and_int32():
    """q, k, v as slices of one fused projection, int32 indices."""
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 4, 3, 2, 4 + 4 + 6, generator=g, dtype=torch.float64)
    q, k, v = qkv.split([4, 4, 6], -1)
    idx = torch.randint(0, 4, (2, 4, 2), generator=g)
    out = routed_attention(q, k, v, idx.int())
    torch.testing.assert_close(out, oracle(q, k, v, idx)[0])


def test_no_grad_path_and_lse_only_gradient():
    q, k, v, idx = _problem(1, 4, 2, 2, 1, 4, 4, 2)
    with torch.no_grad():
        out = routed_attention(q, k, v, idx)
    torch.testing.assert_close(out, oracle(q, k, v, idx)[0])
    qq = q.clone().requires_grad_()
    _, lse = routed_attention(qq, k, v, idx, return_lse=True)
    (g,) = torch.autograd.grad(lse.sum(), qq)
    ref_q = q.clone().requires_grad_()
    (rg,) = torch.autograd.grad(oracle(ref_q, k, v, idx)[1].sum(), ref_q)
    torch.testing.assert_close(g, rg)


# -- custom op: fake, meta, compile, FLOPs ----------------------------------------------------------

def test_meta_and_fake():
    q = torch.empty(2, 49, 4, 8, 32, device="meta")
    v = torch.empty(2, 49, 4, 8, 16, device="meta")
    idx = torch.empty(2, 49, 16, dtype=torch.long, device="meta")
    out, lse = routed_attention(q, q, v, idx, return_lse=True)
    assert out.shape == (2, 49, 4, 8, 16) and out.is_meta and lse.dtype == torch.float32


@pytest.mark.parametrize("dense", [False, True])
def test_compile_fullgraph_forward_backward(dense):
    q, k, v, idx = _problem(2, 4, 3, 3, 2, 4, 4, 2, dense=dense, dtype=torch.float32)

    def f(q, k, v, idx):
        return routed_attention(q, k, v, idx, 0.25, check_indices=False)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = compiled(*leaves, idx)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = f(*ref_leaves, idx)
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_leaves)
    torch.testing.assert_close(out, ref)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)


def test_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    q, k, v, idx = _problem(2, 4, 3, 5, 2, 4, 6, 2, dtype=torch.float32)
    q.requires_grad_()
    with FlopCounterMode(display=False) as counter:
        routed_attention(q, k, v, idx).sum().backward()
    fwd = 2 * 2 * 4 * 3 * 2 * (2 * 5) * (4 + 6)
    assert counter.get_total_flops() == 3 * fwd


# -- checks -------------------------------------------------------------------------------------

def test_checks():
    q, k, v, idx = _problem(1, 4, 2, 2, 1, 4, 4, 2)
    with pytest.raises(ValueError, match="indices must have shape"):
        routed_attention(q, k, v, idx[:, :3])
    with pytest.raises(TypeError, match="int32 or int64"):
        routed_attention(q, k, v, idx.float())
    with pytest.raises(ValueError, match="topk"):
        routed_attention(q, k, v, torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, R=4\)"):
        routed_attention(q, k, v, idx + 4)
    with pytest.raises(ValueError, match="v must match k"):
        routed_attention(q, k, v[:, :, :1], idx)
    with pytest.raises(ValueError, match="k must be"):
        routed_attention(q, k[..., :2], v, idx)
    with pytest.raises(ValueError, match="same dtype"):
        routed_attention(q, k.float(), v, idx)
    with pytest.raises(ValueError, match="unknown backend"):
        routed_attention(q, k, v, idx, backend="nope")
    assert "reference" in ROUTING_BACKENDS.names()
