"""``foveal.kernels.na_block``: a NAT / DiNAT block as one autograd node, against the module path.

The one-node path must compute what the block's modules compute: the same outputs, gradients and
DropPath draws. On the CPU reference backends it is bitwise the module path in float32; under bf16
autocast the outputs are bitwise and the gradients agree to bf16 rounding (the weight and bias
gradients are accumulated in float32 once instead of rounded to bf16 first). CPU tests run the
reference backends, and the Triton kernels through the interpreter in a subprocess; GPU tests
(``pytest -m gpu tests/test_na_block.py``) compare whole NAT-T / DiNAT-T models.
"""
import copy
import os
import subprocess
import sys

import pytest
import timm
import torch

import foveal  # noqa: F401  (registers the models)
from foveal.kernels import NABlockConfig, na_block
from foveal.kernels.launch import INTERPRETING
from foveal.nat import NAT, NATBlock

interpreter = pytest.mark.skipif(not INTERPRETING, reason="runs under TRITON_INTERPRET=1 in test_interpreter_suite")


def _model(ls=None, drop_path=0.3, **kw):
    torch.manual_seed(0)
    return NAT(embed_dim=16, depths=(2, 3), num_heads=(1, 2), kernel_size=3, drop_path_rate=drop_path,
               num_classes=5, dilations=((1, 2), (1, 2, 1)), ls_init_value=ls, **kw)


def _run(model, x, one_node, monkeypatch, dtype=None, train=True):
    """Outputs and parameter gradients of a copy of ``model`` (same seed for the DropPath draws)."""
    monkeypatch.setenv("FOVEAL_NA_BLOCK", "1" if one_node else "0")
    model = copy.deepcopy(model).train(train)
    calls = []
    orig = NATBlock._forward_one_node

    def spy(self, *args):
        calls.append(1)
        return orig(self, *args)

    monkeypatch.setattr(NATBlock, "_forward_one_node", spy)
    torch.manual_seed(1)
    with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = model(x)
    out.float().square().mean().backward()
    monkeypatch.setattr(NATBlock, "_forward_one_node", orig)
    return out, {n: p.grad for n, p in model.named_parameters()}, len(calls)


def _compare(ref, got, exact, tol=None):
    (o1, g1, n1), (o2, g2, n2) = ref, got
    assert n1 == 0 and n2 == 5, (n1, n2)  # every block took the path it was meant to
    assert torch.equal(o1, o2)
    assert g1.keys() == g2.keys()
    for name in g1:
        if exact:
            assert torch.equal(g1[name], g2[name]), name
        else:
            err = ((g1[name] - g2[name]).norm() / g1[name].norm().clamp_min(1e-30)).item()
            assert err < tol, (name, err)


@pytest.mark.parametrize("ls", [None, 0.5], ids=["no-ls", "layer-scale"])
def test_one_node_is_the_module_path_fp32(ls, monkeypatch):
    model, x = _model(ls), torch.randn(2, 3, 64, 56)
    _compare(_run(model, x, False, monkeypatch), _run(model, x, True, monkeypatch), exact=True)


@pytest.mark.parametrize("ls", [None, 0.5], ids=["no-ls", "layer-scale"])
def test_one_node_matches_the_module_path_bf16_autocast(ls, monkeypatch):
    model, x = _model(ls), torch.randn(2, 3, 64, 56)
    _compare(_run(model, x, False, monkeypatch, torch.bfloat16), _run(model, x, True, monkeypatch, torch.bfloat16),
             exact=False, tol=1e-2)


def test_one_node_eval_and_no_grad(monkeypatch):
    model, x = _model(), torch.randn(2, 3, 64, 56)
    _compare(_run(model, x, False, monkeypatch, train=False), _run(model, x, True, monkeypatch, train=False),
             exact=True)
    model.eval()
    with torch.no_grad():
        monkeypatch.setenv("FOVEAL_NA_BLOCK", "0")
        ref = model(x)
        monkeypatch.setenv("FOVEAL_NA_BLOCK", "1")
        assert torch.equal(model(x), ref)


def test_frozen_parameters_and_input_grad(monkeypatch):
    """Frozen blocks get no gradients; the input still gets its gradient through them."""
    model = _model(drop_path=0.)
    for p in model.levels[0].parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, 48, 40, requires_grad=True)
    grads = []
    for one_node in (False, True):
        monkeypatch.setenv("FOVEAL_NA_BLOCK", "1" if one_node else "0")
        x.grad = None
        m = copy.deepcopy(model)
        m(x).square().mean().backward()
        assert all(p.grad is None for p in m.levels[0].parameters())
        grads.append(x.grad.clone())
    assert torch.equal(*grads)


def test_falls_back_to_the_modules(monkeypatch):
    """Hooks, dropout and padded maps keep the module path (each would be skipped by one node)."""
    calls = []
    orig = NATBlock._forward_one_node
    monkeypatch.setattr(NATBlock, "_forward_one_node", lambda self, *a: calls.append(1) or orig(self, *a))
    model = _model(drop_path=0.).train()
    seen = []
    handle = model.levels[0].blocks[0].attn.qkv.register_forward_hook(lambda *a: seen.append(1))
    model(torch.randn(1, 3, 64, 56))
    assert seen == [1] and len(calls) == 4  # the hooked block ran its modules, the other four one node
    handle.remove()
    calls.clear()
    model(torch.randn(1, 3, 16, 16))  # 4x4 and 2x2 maps: padded to the window but for the first block
    assert len(calls) == 1
    calls.clear()
    _model(drop_path=0., proj_drop_rate=0.1).train()(torch.randn(1, 3, 64, 56))
    assert calls == []


def test_na_block_errors_name_the_argument():
    C = 8
    x = torch.randn(1, 6, 6, C)
    w = torch.randn(2 * C, C)
    cfg = NABlockConfig(num_heads=2, kernel_size=3, dilation=1)
    args = [x, None, None, None, w, None, None, torch.randn(C, C), None, None, None, torch.randn(4 * C, C), None,
            torch.randn(C, 4 * C), None, None, None, cfg]
    with pytest.raises(ValueError, match="qkv_weight"):
        na_block(*args)
    args[4] = torch.randn(3 * C, C)
    with pytest.raises(ValueError, match="kernel_size \\* dilation"):
        na_block(*args[:-1], cfg._replace(dilation=3))
    s2, m = na_block(*args)
    assert s2.shape == m.shape == x.shape


@pytest.mark.skipif(INTERPRETING, reason="already running under the interpreter")
def test_interpreter_suite():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", "-k", "triton", __file__]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"interpreter tests failed:\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
    assert " passed" in run.stdout and " failed" not in run.stdout


@interpreter
@pytest.mark.parametrize("ls", [None, 0.5], ids=["no-ls", "layer-scale"])
def test_triton_one_node_is_the_module_path(ls, monkeypatch):
    """The Triton NA and norm kernels (dq, dk, dv written into the fused qkv gradient in place)."""
    monkeypatch.setenv("FOVEAL_BACKEND", "triton")
    model, x = _model(ls), torch.randn(1, 3, 64, 56)
    _compare(_run(model, x, False, monkeypatch), _run(model, x, True, monkeypatch), exact=True)


@pytest.mark.gpu
def test_gpu_dinat_tiny_one_node_matches_modules(monkeypatch):
    """Every NAT-T stage shape, dilated and not, under bf16 autocast (the compiled kernels of one dtype)."""
    torch.manual_seed(0)
    model = timm.create_model("dinat_tiny", drop_path_rate=0.2).cuda()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    for dtype, tol in ((torch.bfloat16, 2e-2),):
        (o1, g1, _), (o2, g2, _) = _run(model, x, False, monkeypatch, dtype), _run(model, x, True, monkeypatch, dtype)
        assert ((o1.float() - o2.float()).norm() / o1.float().norm()).item() < tol / 10
        for n in g1:
            assert ((g1[n] - g2[n]).norm() / g1[n].norm()).item() < tol, n
