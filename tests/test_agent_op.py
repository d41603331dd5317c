"""Agent attention: the op against the brute-force oracle (reference and Triton backends), the custom
op under torch.compile, fake/meta tensors, FLOPs, and the argument checks.

The Triton backend runs on CPU through Triton's interpreter at tiny shapes. Triton fixes interpreter
mode when it is first imported, so in an ordinary run ``test_interpreter_suite`` re-runs this file
in a subprocess with ``TRITON_INTERPRET=1``, where the ``triton``-marked cases run.
"""
import os
import random
import subprocess
import sys

import pytest
import torch

from foveal.kernels import AGENT_BACKENDS, agent_attention
from agent_oracle import oracle

try:
    import foveal.kernels.agent_triton as at
    INTERPRETED = at._interpreting()
except ImportError:  # pragma: no cover - no triton
    at, INTERPRETED = None, False

interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs under TRITON_INTERPRET=1 in test_interpreter_suite")
not_interpreted = pytest.mark.skipif(INTERPRETED, reason="covered by the ordinary run")


def _problem(B, N, n, heads, D, Dv, biases=(True, True), dtype=torch.float64, bias_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, N, heads, D, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, N, heads, Dv, generator=g, dtype=dtype)
    agents = torch.randn(B, n, heads, D, generator=g, dtype=dtype)
    bias_dtype = dtype if bias_dtype is None else bias_dtype
    bak = torch.randn(heads, n, N, generator=g, dtype=bias_dtype) if biases[0] else None
    bqa = torch.randn(heads, N, n, generator=g, dtype=bias_dtype) if biases[1] else None
    return q, k, v, agents, bak, bqa


def random_cases(count, seed, max_tokens=40):
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        cases.append(dict(B=rng.choice([1, 2, 3]), N=rng.randint(1, max_tokens), n=rng.choice([1, 4, 9, 16, 19]),
                          heads=rng.randint(1, 3), D=rng.choice([4, 8, 16]), Dv=rng.choice([3, 8, 16]),
                          biases=rng.choice([(True, True), (True, False), (False, True), (False, False)])))
    return cases


def case_id(c):
    return "B{B}-N{N}-n{n}-h{heads}-D{D}v{Dv}".format(**c) + "-b" + "".join("1" if b else "0" for b in c["biases"])


def check_against_oracle(case, backend, dtype=torch.float64, tol=1e-9, bias_dtype=None, seed=0):
    tensors = _problem(**case, dtype=dtype, bias_dtype=bias_dtype, seed=seed)
    scale = 0.3 if case["D"] == 8 else None
    leaves = [None if t is None else t.clone().requires_grad_() for t in tensors]
    out = agent_attention(*leaves, scale=scale, backend=backend)
    ref_leaves = [None if t is None else t.detach().double().requires_grad_() for t in tensors]
    ref = oracle(*ref_leaves, scale=scale)[0]
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    go = torch.randn(out.shape, dtype=torch.float64)
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad((out * go.to(dtype)).sum(), wanted)
    ref_grads = torch.autograd.grad((ref * go.to(dtype).double()).sum(), [t for t in ref_leaves if t is not None])
    for g, rg, leaf in zip(grads, ref_grads, wanted):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        torch.testing.assert_close(g.double(), rg, rtol=tol, atol=tol * max(1.0, rg.abs().max().item()))


# -- reference backend ------------------------------------------------------------------------------

@not_interpreted
@pytest.mark.parametrize("case", random_cases(10, seed=3), ids=case_id)
def test_reference_matches_oracle(case):
    check_against_oracle(case, "reference")


@not_interpreted
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 4e-2)], ids=str)
@pytest.mark.parametrize("case", random_cases(3, seed=5), ids=case_id)
def test_reference_low_precision(case, dtype, tol):
    check_against_oracle(case, "reference", dtype, tol)


@not_interpreted
def test_reference_float32_biases_with_bf16_inputs():
    check_against_oracle(dict(B=2, N=12, n=4, heads=2, D=8, Dv=8, biases=(True, True)), "reference",
                         torch.bfloat16, 4e-2, bias_dtype=torch.float32)


@not_interpreted
def test_reference_chunks(monkeypatch):
    """The memory bound: steps of one token (and one batch element) give the answer of one step."""
    import foveal.kernels.agent_reference as ar
    q, k, v, a, bak, bqa = _problem(3, 11, 5, 2, 4, 6)
    whole = ar.agent_reference_fwd(q, k, v, a, bak, bqa, 0.5)
    go = torch.randn_like(whole[0])
    whole_grads = ar.agent_reference_bwd(go, q, k, v, a, bak, bqa, *whole[1:], 0.5)
    for chunk in (1, 5 * 2 * 4, 5 * 2 * 11 * 2):
        monkeypatch.setattr(ar, "CHUNK_ELEMENTS", chunk)
        steps = ar.agent_reference_fwd(q, k, v, a, bak, bqa, 0.5)
        step_grads = ar.agent_reference_bwd(go, q, k, v, a, bak, bqa, *steps[1:], 0.5)
        for x, y in zip(whole + whole_grads, steps + step_grads):
            torch.testing.assert_close(x, y)


@not_interpreted
def test_strided_views():
    """q, k, v as slices of one fused projection viewed [B, N, 3, heads, D]; agents as a permuted view."""
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 10, 3, 2, 4, generator=g, dtype=torch.float64)
    q, k, v = qkv.unbind(2)
    agents = torch.randn(2, 2, 3, 4, generator=g, dtype=torch.float64).permute(0, 2, 1, 3)
    out = agent_attention(q, k, v, agents)
    torch.testing.assert_close(out, oracle(q, k, v, agents)[0])


@not_interpreted
def test_no_grad_and_frozen_biases():
    q, k, v, a, bak, bqa = _problem(2, 9, 4, 2, 4, 4)
    with torch.no_grad():
        out = agent_attention(q, k, v, a, bak, bqa)
    torch.testing.assert_close(out, oracle(q, k, v, a, bak, bqa)[0])
    qq = q.clone().requires_grad_()
    (g,) = torch.autograd.grad(agent_attention(qq, k, v, a, bak, bqa).sum(), qq)
    rq = q.clone().requires_grad_()
    (rg,) = torch.autograd.grad(oracle(rq, k, v, a, bak, bqa)[0].sum(), rq)
    torch.testing.assert_close(g, rg)
    # one bias trained, the other frozen
    b1 = bak.clone().requires_grad_()
    (g,) = torch.autograd.grad(agent_attention(q, k, v, a, b1, bqa).sum(), b1)
    r1 = bak.clone().requires_grad_()
    (rg,) = torch.autograd.grad(oracle(q, k, v, a, r1, bqa)[0].sum(), r1)
    torch.testing.assert_close(g, rg)


# -- custom op: fake, meta, compile, FLOPs ------------------------------------------------------------

@not_interpreted
def test_meta_and_fake():
    q = torch.empty(2, 3136, 3, 32, device="meta")
    v = torch.empty(2, 3136, 3, 16, device="meta")
    a = torch.empty(2, 9, 3, 32, device="meta")
    bak, bqa = torch.empty(3, 9, 3136, device="meta"), torch.empty(3, 3136, 9, device="meta")
    out = agent_attention(q, q, v, a, bak, bqa)
    assert out.shape == (2, 3136, 3, 16) and out.is_meta
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q = torch.empty(2, 50, 2, 8, requires_grad=True)
        a = torch.empty(2, 4, 2, 8, requires_grad=True)
        bqa = torch.empty(2, 50, 4, requires_grad=True)
        out = agent_attention(q, q, q, a, None, bqa)
        gq, ga, gb = torch.autograd.grad(out.sum(), (q, a, bqa))
        assert out.shape == q.shape and gb.shape == bqa.shape and ga.shape == a.shape


@not_interpreted
@pytest.mark.parametrize("biases", [(True, True), (False, True)], ids=str)
def test_compile_fullgraph_forward_backward(biases):
    tensors = _problem(2, 12, 4, 2, 8, 8, biases=biases, dtype=torch.float32)

    def f(*t):
        return agent_attention(*t, scale=0.25)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [None if t is None else t.clone().requires_grad_() for t in tensors]
    out = compiled(*leaves)
    grads = torch.autograd.grad(out.square().sum(), [t for t in leaves if t is not None])
    ref_leaves = [None if t is None else t.clone().requires_grad_() for t in tensors]
    ref = f(*ref_leaves)
    ref_grads = torch.autograd.grad(ref.square().sum(), [t for t in ref_leaves if t is not None])
    torch.testing.assert_close(out, ref)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)


@not_interpreted
def test_opcheck():
    q, k, v, a, bak, bqa = _problem(2, 6, 3, 2, 4, 5, dtype=torch.float32)
    torch.library.opcheck(torch.ops.foveal.agent_attention_fwd.default, (q, k, v, a, bak, bqa, 0.5, "reference"),
                          test_utils=("test_schema", "test_faketensor"))


@not_interpreted
def test_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    q, k, v, a, bak, bqa = _problem(2, 10, 4, 3, 8, 6, dtype=torch.float32)
    q.requires_grad_()
    with FlopCounterMode(display=False) as counter:
        agent_attention(q, k, v, a, bak, bqa).sum().backward()
    fwd = 4 * 2 * 3 * 10 * 4 * (8 + 6)
    assert counter.get_total_flops() == 3 * fwd


# -- checks -------------------------------------------------------------------------------------------

@not_interpreted
def test_checks():
    q, k, v, a, bak, bqa = _problem(1, 6, 3, 2, 4, 4)
    with pytest.raises(ValueError, match=r"bias_ak must have shape \[heads, n, N\] = \[2, 3, 6\]"):
        agent_attention(q, k, v, a, bak.transpose(1, 2), bqa)
    with pytest.raises(ValueError, match=r"bias_qa must have shape"):
        agent_attention(q, k, v, a, bak, bqa[None].expand(1, -1, -1, -1))
    with pytest.raises(TypeError, match="float32 or the dtype of q"):
        agent_attention(q, k, v, a, bak.half(), bqa)
    with pytest.raises(TypeError, match="bias_qa must be a torch.Tensor or None"):
        agent_attention(q, k, v, a, bak, 1.0)
    with pytest.raises(ValueError, match="agents must be"):
        agent_attention(q, k, v, a[..., :2])
    with pytest.raises(ValueError, match="k must have the shape of q"):
        agent_attention(q, k[:, :5], v, a)
    with pytest.raises(ValueError, match="v must be"):
        agent_attention(q, k, v[:, :5], a)
    with pytest.raises(ValueError, match="4 dimensions"):
        agent_attention(q[0], k, v, a)
    with pytest.raises(ValueError, match="same dtype"):
        agent_attention(q, k.float(), v, a)
    with pytest.raises(ValueError, match="empty"):
        agent_attention(q, k, v, a[:, :0])
    with pytest.raises(ValueError, match="finite"):
        agent_attention(q, k, v, a, scale=float("nan"))
    with pytest.raises(ValueError, match="unknown backend"):
        agent_attention(q, k, v, a, backend="nope")
    assert AGENT_BACKENDS.names()[-1] == "reference"


# -- Triton backend under the interpreter ---------------------------------------------------------------

@pytest.mark.skipif(INTERPRETED or at is None, reason="already running under the interpreter (or no triton)")
def test_interpreter_suite():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", __file__]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"interpreter tests failed:\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
    assert " passed" in run.stdout and " failed" not in run.stdout


@not_interpreted
def test_probe_declines_cpu_without_interpreter(monkeypatch):
    if at is None:
        pytest.skip("no triton")
    q, k, v, a, bak, bqa = _problem(1, 4, 2, 1, 16, 16, dtype=torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in at.agent_triton_probe(q, k, v, a, bak, bqa)
    assert AGENT_BACKENDS.choose("auto", q, k, v, a, bak, bqa) == "reference"
    with pytest.raises(NotImplementedError, match="backend 'triton'"):
        agent_attention(q, k, v, a, bak, bqa, backend="triton")


@interpreter
@pytest.mark.parametrize("case", random_cases(4, seed=11, max_tokens=150), ids=case_id)
def test_triton_matches_oracle_fp32(case):
    check_against_oracle(case, "triton", torch.float32, 2e-4)


# (tiles, programs wanted): several token tiles per run, split stage-1 softmax, batch groups
@interpreter
@pytest.mark.parametrize("tiles,wanted", [((16, 16, 4), 64), ((32, 16, 4), 3), ((16, 32, 4), 1000)], ids=str)
@pytest.mark.parametrize("case", [dict(B=2, N=70, n=9, heads=2, D=16, Dv=8, biases=(True, True)),
                                  dict(B=9, N=21, n=4, heads=1, D=8, Dv=16, biases=(True, True)),
                                  dict(B=8, N=40, n=19, heads=2, D=16, Dv=16, biases=(False, True))], ids=case_id)
def test_triton_forced_plans(case, tiles, wanted, monkeypatch):
    monkeypatch.setattr(at, "_tiles", lambda block_a, block_d: tiles)
    monkeypatch.setattr(at, "_programs_wanted", lambda device, waves: wanted)
    check_against_oracle(case, "triton", torch.float32, 2e-4)


# bfloat16 runs on the GPU only: the interpreter's emulated bfloat16 products are not a reference
@interpreter
def test_triton_many_agents_fp16():
    """200 agents (a 256-wide agent tile), fp16 operands, float32 biases."""
    case = dict(B=1, N=24, n=200, heads=1, D=16, Dv=16, biases=(True, True))
    check_against_oracle(case, "triton", torch.float32, 2e-4)
    check_against_oracle(case, "triton", torch.float16, 2e-2, bias_dtype=torch.float32)


@interpreter
def test_triton_strided_views():
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(2, 20, 3, 2, 16, generator=g)
    q, k, v = qkv.unbind(2)
    agents = torch.randn(2, 2, 5, 16, generator=g).transpose(1, 2)
    bak = torch.randn(2, 20, 5, generator=g).transpose(1, 2)  # a [heads, n, N] view of another layout
    bqa = torch.randn(5, 20, 2, generator=g).permute(2, 1, 0)
    leaves = [qkv.clone().requires_grad_() for _ in range(2)]
    outs, grads = [], []
    for leaf, backend in zip(leaves, ("triton", "reference")):
        q, k, v = leaf.unbind(2)
        out = agent_attention(q, k, v, agents, bak, bqa, backend=backend)
        outs.append(out)
        grads.append(torch.autograd.grad(out, leaf, torch.ones(()).expand(out.shape))[0])  # stride-0 gradient
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(grads[0], grads[1], rtol=2e-4, atol=2e-4)
