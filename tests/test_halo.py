"""Halo attention: the op against the brute-force oracle, the layer against timm's HaloAttn,
``foveal.accelerate`` on timm's seven HaloNets, the custom op under torch.compile, the checks."""
import random

import pytest
import timm
import torch
from timm.layers.halo_attn import HaloAttn

import foveal
from foveal.kernels import HALO_BACKENDS, halo2d
from foveal.kernels.halo import _CHECKED
from foveal.layers import HaloAttention2d
from halo_oracle import oracle


def _problem(B, H, W, heads, D, Dv, b, hs, s, rel=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, W, heads, D, generator=g, dtype=dtype)
    v = torch.randn(B, H, W, heads, Dv, generator=g, dtype=dtype)
    q = torch.randn(B, H // s, W // s, heads, D, generator=g, dtype=dtype)
    win = b + 2 * hs
    rh = torch.randn(2 * win - 1, D, generator=g, dtype=dtype) if rel else None
    rw = torch.randn(2 * win - 1, D, generator=g, dtype=dtype) if rel else None
    return q, k, v, rh, rw


def _random_cases(n, seed):
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        b = rng.choice([2, 3, 4])
        s = rng.choice([1, 2]) if b % 2 == 0 else 1
        cases.append(dict(B=rng.choice([1, 2]), H=b * rng.randint(1, 3), W=b * rng.randint(1, 2), heads=rng.randint(1, 2),
                          D=rng.choice([2, 4, 5]), Dv=rng.choice([3, 4]), b=b, hs=rng.randint(0, 3), s=s,
                          rel=rng.random() < 0.8, scale_rel=rng.random() < 0.3))
    return cases


# -- the op (reference backend) against the oracle --------------------------------------------------

@pytest.mark.parametrize("case", _random_cases(8, seed=11), ids=lambda c: "B{B}-{H}x{W}-h{heads}-b{b}h{hs}s{s}".format(**c))
def test_reference_matches_oracle(case):
    c = dict(case)
    scale_rel = c.pop("scale_rel")
    q, k, v, rh, rw = _problem(**c)
    args = (c["b"], c["hs"], c["s"])
    leaves = [t.clone().requires_grad_() for t in (q, k, v, rh, rw) if t is not None]
    rel = leaves[3:] if rh is not None else [None, None]
    out, lse = halo2d(*leaves[:3], *args, *rel, scale_rel=scale_rel, return_lse=True, backend="reference")
    leaves2 = [t.clone().requires_grad_() for t in leaves]
    rel2 = leaves2[3:] if rh is not None else [None, None]
    ref_out, ref_lse = oracle(*leaves2[:3], *args, *rel2, scale_rel=scale_rel)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * go).sum() + (lse * gl).sum(), leaves)
    ref_grads = torch.autograd.grad((ref_out * go).sum() + (ref_lse * gl).sum(), leaves2)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-9)


def test_border_keys_are_zero_and_unmasked():
    """One block, halo 1: the window's border positions are zero keys / values that still take softmax mass."""
    q, k, v, rh, rw = _problem(1, 2, 2, 1, 4, 4, 2, 1, 1, rel=False)
    out, lse = halo2d(q, k, v, 2, 1, return_lse=True, backend="reference")
    logits = torch.einsum("bxyhd,bijhd->bxyhij", q, k).flatten(-2) * 0.5
    zeros = torch.zeros(*logits.shape[:-1], 12, dtype=logits.dtype)  # 16 window positions, 4 inside
    torch.testing.assert_close(lse, torch.logsumexp(torch.cat([logits, zeros], -1), -1))


def test_reference_chunks(monkeypatch):
    """The memory bound: one block row per step gives the same answer as one step."""
    import foveal.kernels.halo_reference as hr
    q, k, v, rh, rw = _problem(1, 12, 8, 2, 4, 4, 4, 2, 2)
    whole = hr.halo_reference_fwd(q, k, v, rh, rw, 4, 2, 2, 0.5, False)
    go = torch.randn_like(whole[0])
    whole_grads = hr.halo_reference_bwd(go, q, k, v, rh, rw, *whole, None, 4, 2, 2, 0.5, False)
    monkeypatch.setattr(hr, "CHUNK_ELEMENTS", 1)
    rows = hr.halo_reference_fwd(q, k, v, rh, rw, 4, 2, 2, 0.5, False)
    row_grads = hr.halo_reference_bwd(go, q, k, v, rh, rw, *rows, None, 4, 2, 2, 0.5, False)
    for a, b in zip(whole + whole_grads, rows + row_grads):
        torch.testing.assert_close(a, b)


def test_strided_views_and_low_precision():
    x = torch.randn(2, 8, 8, 3, 2, 8)
    q, k, v = x.unbind(3)  # strided views of one tensor
    ref = halo2d(q.contiguous(), k.contiguous(), v.contiguous(), 4, 1, backend="reference")
    torch.testing.assert_close(halo2d(q, k, v, 4, 1, backend="reference"), ref)
    out = halo2d(q.bfloat16(), k.bfloat16(), v.bfloat16(), 4, 1, backend="reference")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


# -- the layer against timm -------------------------------------------------------------------------

# every argument combination of timm's seven HaloNets (dim, dim_out, stride, heads, dim_head, block,
# halo, qk_ratio, avg_down), at reduced width, plus the arguments none of them sets
LAYER_CASES = [
    (dict(dim=32, num_heads=8, block_size=8, halo_size=2), (2, 16, 24)),  # halonet26t / eca_halonext26ts
    (dict(dim=32, stride=2, num_heads=4, block_size=8, halo_size=3), (2, 16, 8)),  # strided queries
    (dict(dim=24, num_heads=4, dim_head=8, block_size=8, halo_size=3), (1, 8, 16)),  # dim_head (eca_halonext26ts)
    (dict(dim=48, num_heads=8, block_size=7, halo_size=2, qk_ratio=0.33), (1, 14, 7)),  # haloregnetz_b
    (dict(dim=48, stride=2, num_heads=8, block_size=7, halo_size=2, qk_ratio=0.33), (1, 14, 14)),  # odd block: pool
    (dict(dim=16, stride=2, num_heads=2, block_size=4, halo_size=1, avg_down=True), (2, 8, 12)),
    (dict(dim=16, dim_out=24, num_heads=4, block_size=4, halo_size=2, qkv_bias=True, scale_pos_embed=True), (1, 8, 4)),
    (dict(dim=16, stride=2, num_heads=2, block_size=4, halo_size=3, scale_pos_embed=True), (1, 4, 8)),
]


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("kwargs,shape", LAYER_CASES, ids=[str(i) for i in range(len(LAYER_CASES))])
def test_layer_matches_timm(kwargs, shape):
    torch.manual_seed(0)
    ref = HaloAttn(**kwargs)
    ours = HaloAttention2d(**kwargs)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    assert all(ours.state_dict()[n].shape == t.shape for n, t in ref.state_dict().items())
    ours.load_state_dict(ref.state_dict())
    B, H, W = shape
    x = torch.randn(B, kwargs["dim"], H, W)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ref(x1), ours(x2)
    assert y2.shape == y1.shape
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    errors = {"out": _rel_err(y2, y1), "dx": _rel_err(x2.grad, x1.grad)}
    for (name, p1), (_, p2) in zip(ref.named_parameters(), ours.named_parameters()):
        errors[name] = _rel_err(p2.grad, p1.grad)
    assert max(errors.values()) <= 1e-5, errors
    with torch.no_grad():  # the explicit path that torch.jit.script takes
        q = ours.q(x)
        q = q.view(B, ours.num_heads, ours.dim_head_qk, *q.shape[-2:]).permute(0, 3, 4, 1, 2)
        kv = ours.kv(x).view(B, ours.num_heads, -1, H, W).permute(0, 3, 4, 1, 2)
        k, v = kv[..., :ours.dim_head_qk], kv[..., ours.dim_head_qk:]
        assert _rel_err(ours._explicit_attn(q, k, v), ours._fused_attn(q, k, v)) <= 1e-5


def test_layer_scripts_and_channels_last():
    torch.manual_seed(0)
    ref = HaloAttn(16, num_heads=2, block_size=4, halo_size=1)
    ours = HaloAttention2d(16, num_heads=2, block_size=4, halo_size=1)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        expected = ref(x)
        assert _rel_err(torch.jit.script(ours)(x), expected) <= 1e-5
        assert _rel_err(ours(x.to(memory_format=torch.channels_last)), expected) <= 1e-5


def test_layer_errors():
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        HaloAttention2d(16, stride=3, num_heads=2)
    with pytest.raises(ValueError, match="num_heads must divide dim_out"):
        HaloAttention2d(16, num_heads=3)
    layer = HaloAttention2d(16, num_heads=2, block_size=4, halo_size=1)
    with pytest.raises(ValueError, match="multiples of block_size=4"):
        layer(torch.randn(1, 16, 6, 8))
    assert "block_size=4" in repr(layer)


# -- foveal.accelerate on timm's HaloNets -----------------------------------------------------------

TIMM_HALONETS = ['halonet26t', 'sehalonet33ts', 'halonet50ts', 'eca_halonext26ts', 'haloregnetz_b',
                 'halo2botnet50ts_256', 'lamhalobotnet50ts_256']


@pytest.mark.parametrize("name", TIMM_HALONETS)
def test_accelerate_timm_model(name, capsys):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    n_halo = sum(type(m) is HaloAttn for m in model.modules())
    size = model.pretrained_cfg["input_size"][-1]  # the smallest size whose last stage is a whole block
    x = torch.randn(1, 3, size, size)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x)
        assert foveal.accelerate(model) is model
        after = model(x)
    assert f"replaced {n_halo} HaloAttn layers with HaloAttention2d" in capsys.readouterr().out
    assert sum(type(m) is HaloAttention2d for m in model.modules()) == n_halo
    assert not any(type(m) is HaloAttn for m in model.modules())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert _rel_err(after, before) <= 1e-5


def test_accelerate_messages():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1))
    with pytest.warns(UserWarning, match="nothing to replace in Sequential"):
        assert foveal.accelerate(model) is model
    layer = HaloAttn(16, num_heads=2, block_size=4, halo_size=1)
    foveal.accelerate(layer, backend="reference", verbose=False)
    assert type(layer) is HaloAttention2d and layer.backend == "reference"
    with pytest.warns(UserWarning, match="1 fused layers already there"):
        foveal.accelerate(layer)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        foveal.accelerate("halonet26t")


def test_accelerate_keeps_parameters_for_training():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(HaloAttn(16, num_heads=2, block_size=4, halo_size=1))
    params = list(layer.parameters())
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    foveal.accelerate(layer, verbose=False)
    assert list(layer.parameters()) == params  # the same objects: the optimizer still owns them
    layer(torch.randn(1, 16, 8, 8)).square().mean().backward()
    opt.step()


# -- custom op: fake, meta, compile, FLOPs ----------------------------------------------------------

def test_meta_device_and_opcheck():
    q = torch.empty(2, 4, 4, 3, 8, device="meta")
    k = torch.empty(2, 8, 8, 3, 8, device="meta")
    v = torch.empty(2, 8, 8, 3, 5, device="meta")
    rel = torch.empty(2 * 6 - 1, 8, device="meta")
    out, lse = halo2d(q, k, v, 4, 1, 2, rel, rel, return_lse=True)
    assert out.shape == (2, 4, 4, 3, 5) and lse.shape == (2, 4, 4, 3) and out.device.type == "meta"
    q, k, v, rh, rw = _problem(1, 4, 8, 2, 4, 3, 4, 1, 2, dtype=torch.float32)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), rh.requires_grad_(), rw.requires_grad_(),
            4, 1, 2, 0.5, False, "reference")
    torch.library.opcheck(torch.ops.foveal.halo_fwd.default, args)


def test_flop_count():
    from torch.utils.flop_counter import FlopCounterMode
    q, k, v, rh, rw = _problem(2, 8, 8, 2, 4, 6, 4, 1, 1, dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        halo2d(q, k, v, 4, 1, 1, rh, rw, backend="reference")
    assert counter.get_total_flops() == 2 * 2 * 2 * 64 * 36 * (4 + 6)


def test_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = HaloAttention2d(16, stride=2, num_heads=2, block_size=4, halo_size=1, backend="reference")
    x = torch.randn(2, 16, 8, 12, requires_grad=True)
    expected = layer(x)
    expected.sum().backward()
    dx, dq = x.grad.clone(), layer.q.weight.grad.clone()
    x.grad = None
    layer.zero_grad()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, dx)
    torch.testing.assert_close(layer.q.weight.grad, dq)
    torch._dynamo.reset()


# -- checks and backends ----------------------------------------------------------------------------

def _t(*shape, **kw):
    return torch.randn(*shape, **kw)


@pytest.mark.parametrize("call,error,match", [
    (lambda: halo2d(_t(1, 8, 8, 2, 4), _t(1, 8, 8, 2, 4), _t(1, 8, 8, 2, 4), 3, 1), ValueError, "whole number of blocks"),
    (lambda: halo2d(_t(1, 8, 8, 2, 4), _t(1, 8, 8, 2, 4), _t(1, 8, 8, 2, 4), 4, 1, 3), ValueError, "stride must divide"),
    (lambda: halo2d(_t(1, 8, 8, 2, 4), _t(1, 8, 8, 2, 4), _t(1, 8, 8, 2, 4), 4, 1, 2), ValueError, r"q must have shape"),
    (lambda: halo2d(_t(1, 8, 8, 2, 4), _t(1, 8, 8, 2, 4), _t(1, 8, 4, 2, 4), 4, 1), ValueError, "v must match k"),
    (lambda: halo2d(_t(1, 8, 8, 2, 4), _t(1, 8, 8, 2, 4), _t(1, 8, 8, 2, 4), 4, -1), ValueError, "halo_size must be >= 0"),
    (lambda: halo2d(_t(1, 8, 8, 2, 4), _t(1, 8, 8, 2, 4), _t(1, 8, 8, 2, 4), 4.0, 1), TypeError, "block_size must be an int"),
    (lambda: halo2d(_t(1, 8, 8, 2, 4), _t(1, 8, 8, 2, 4), _t(1, 8, 8, 2, 4), 4, 1, rel_h=_t(11, 4)), ValueError,
     "come together"),
    (lambda: halo2d(_t(1, 8, 8, 2, 4), _t(1, 8, 8, 2, 4), _t(1, 8, 8, 2, 4), 4, 1, rel_h=_t(9, 4), rel_w=_t(9, 4)),
     ValueError, r"rel_h must have shape .* \[11, 4\]"),
    (lambda: halo2d(_t(1, 8, 8, 2, 4), _t(1, 8, 8, 2, 4).double(), _t(1, 8, 8, 2, 4), 4, 1), ValueError, "same dtype"),
    (lambda: halo2d(_t(1, 8, 8, 2, 4), _t(1, 8, 8, 2, 4), _t(1, 8, 8, 2, 4), 4, 1, scale_rel=1), TypeError, "scale_rel"),
    (lambda: halo2d(_t(1, 8, 8, 2, 4), _t(1, 8, 8, 2, 4), _t(1, 8, 8, 2, 4), 4, 1, backend="nope"), ValueError,
     "unknown backend 'nope'"),
])
def test_checks(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_check_cache_and_backend_env(monkeypatch):
    q = _t(1, 8, 8, 2, 4)
    halo2d(q, q, q, 4, 1)
    n = len(_CHECKED._entries)
    halo2d(q, q, q, 4, 1)
    assert len(_CHECKED._entries) == n  # resolved once per signature
    monkeypatch.setenv("FOVEAL_BACKEND", "nope")
    with pytest.raises(ValueError, match="environment variable FOVEAL_BACKEND"):
        halo2d(q, q, q, 4, 1)
    assert HALO_BACKENDS.names()[-1] == "reference"


def _cached_hub_weights(name):
    from huggingface_hub import try_to_load_from_cache
    path = try_to_load_from_cache(timm.get_pretrained_cfg(name).hf_hub_id, "model.safetensors")
    return path if isinstance(path, str) else None


@pytest.mark.parametrize("name", TIMM_HALONETS)
def test_accelerate_timm_model_hub_weights(name, monkeypatch):
    """The published ``timm/`` weights, where a hub cache holds them (never downloaded here)."""
    if _cached_hub_weights(name) is None:
        pytest.skip(f"no cached timm/{name} weights (HF hub cache)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=True).eval()
    size = model.pretrained_cfg["input_size"][-1]
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        before = model(x)
        foveal.accelerate(model, verbose=False)
        after = model(x)
    assert _rel_err(after, before) <= 1e-5
