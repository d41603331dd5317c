"""RecomputeMlp: timm's Mlp with the activation recomputed in the backward."""
import pytest
import torch
from timm.layers import Mlp

from foveal.layers import RecomputeMlp


def _pair(approximate="none", drop=0., dtype=torch.float64, bias=True):
    torch.manual_seed(0)
    ours = RecomputeMlp(12, 36, 10, approximate=approximate, bias=bias, drop=drop).to(dtype)
    ref = Mlp(12, 36, 10, act_layer=lambda: torch.nn.GELU(approximate=approximate), bias=bias, drop=drop).to(dtype)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _run(module, x):
    x = x.clone().requires_grad_()
    out = module(x)
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
    grads = torch.autograd.grad(loss, [x] + list(module.parameters()))
    return out, grads


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_outputs_and_gradients_equal_timm_mlp(approximate, bias):
    ours, ref = _pair(approximate, bias=bias)
    x = torch.randn(2, 5, 7, 12, dtype=torch.float64)
    (out, grads), (ref_out, ref_grads) = _run(ours, x), _run(ref, x)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)


def test_bf16_autocast_matches_timm_mlp():
    ours, ref = _pair(dtype=torch.float32)
    x = torch.randn(4, 9, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (out, grads), (ref_out, ref_grads) = _run(ours, x), _run(ref, x)
    assert out.dtype == ref_out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)  # the same forward ops
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-2)


def _saved_bytes(module, x):
    seen = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(n for ptr, n in seen.items() if ptr not in params)


def test_keeps_one_hidden_tensor_instead_of_two():
    ours, ref = _pair(dtype=torch.float32)
    x = torch.randn(64, 12, requires_grad=True)
    hidden = 64 * 36 * 4
    assert _saved_bytes(ref, x) - _saved_bytes(ours, x) == hidden


def test_falls_back_to_timm_forward():
    ours, _ = _pair(drop=0.5)
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    assert "GeluLinear" not in type(ours(x).grad_fn).__name__  # dropout between the layers
    ours, _ = _pair()
    assert "GeluLinear" in type(ours(x).grad_fn).__name__
    ours.eval()
    assert "GeluLinear" not in type(ours(x).grad_fn).__name__
    ours.train()
    with torch.no_grad():
        assert ours(x).grad_fn is None
    scripted = torch.jit.script(ours.eval())
    torch.testing.assert_close(scripted(x), ours(x))


def test_double_backward():
    ours, _ = _pair()
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda t: ours(t), (x,))
