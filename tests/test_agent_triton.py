"""The Triton agent-attention backend at real sizes on a CUDA GPU (``pytest -m gpu``), against the
reference backend in float64: Agent-Swin-T stages 1-3 at 224 and stage 1 at COCO size, Agent-PVT-S
stage 1. CPU coverage of the same kernels (Triton's interpreter, tiny shapes) is in test_agent_op.py."""
import pytest
import torch

from foveal.kernels import agent_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SHAPES = {  # (B, N, heads, head_dim, agents)
    "swin-s1-224": (8, 56 * 56, 3, 32, 9),
    "swin-s2-224": (16, 28 * 28, 6, 32, 16),
    "swin-s3-224": (32, 14 * 14, 12, 32, 49),
    "swin-s1-coco": (2, 200 * 336, 3, 32, 81),
    "pvt-s1-224": (8, 56 * 56, 1, 64, 9),
    "dense-196-agents": (2, 32 * 32, 2, 64, 196),
}


def _inputs(B, N, heads, D, n, dtype, bias_dtype=torch.float32):
    qkv = torch.randn(B, N, 3, heads, D, device="cuda", dtype=dtype)
    q, k, v = qkv.unbind(2)  # strided views, as the layers pass them
    agents = torch.randn(B, n, heads, D, device="cuda", dtype=dtype)
    bak = 0.5 * torch.randn(heads, n, N, device="cuda", dtype=bias_dtype)
    bqa = 0.5 * torch.randn(heads, N, n, device="cuda", dtype=bias_dtype)
    return [t.requires_grad_() for t in (q.detach(), k.detach(), v.detach(), agents, bak, bqa)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_gpu_matches_reference(name, dtype):
    B, N, heads, D, n = SHAPES[name]
    torch.manual_seed(0)
    leaves = _inputs(B, N, heads, D, n, dtype)
    out = agent_attention(*leaves, backend="triton")
    go = torch.randn_like(out)
    grads = torch.autograd.grad((out * go).sum(), leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = agent_attention(*ref_leaves, backend="reference")
    ref_grads = torch.autograd.grad((ref * go.double()).sum(), ref_leaves)
    tol = 2e-3 if dtype == torch.float32 else 3e-2
    err = (out.double() - ref).norm() / ref.norm()
    assert err < tol, f"out: relative error {err:.2e}"
    for label, g, rg in zip(("dq", "dk", "dv", "dagents", "dbias_ak", "dbias_qa"), grads, ref_grads):
        assert g.shape == rg.shape, label
        assert torch.isfinite(g).all(), label
        err = (g.double() - rg).norm() / rg.norm().clamp_min(1e-30)
        assert err < tol, f"{label}: relative error {err:.2e}"


def test_gpu_compile_and_no_grad():
    B, N, heads, D, n = SHAPES["swin-s2-224"]
    leaves = _inputs(B, N, heads, D, n, torch.bfloat16)
    f = torch.compile(lambda *t: agent_attention(*t), fullgraph=True)
    out = f(*leaves)
    grads = torch.autograd.grad(out.float().square().sum(), leaves)
    ref = agent_attention(*leaves)
    ref_grads = torch.autograd.grad(ref.float().square().sum(), leaves)
    torch.testing.assert_close(out, ref)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        torch.testing.assert_close(agent_attention(*leaves), ref)
