"""BiFormer: the layers against the official formulation, parameter counts and MACs (SPEC section 5),
official-layout checkpoints through checkpoint_filter_fn, and the timm API."""
import os
import subprocess
import sys

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import foveal
from foveal.biformer import checkpoint_filter_fn
from foveal.layers import AttentionLePE, BiLevelRoutingAttention
from biformer_official import OFFICIAL_VARIANTS, OfficialAttentionLePE, OfficialBiFormer, OfficialBRA, randomize
from nat_checkpoints import fill_torch_hub_cache
from test_timm_suite import _results
from timm_sdist import load_timm_test_models, timm_tests_dir

PARAMS_M = {'biformer_tiny': 13.14, 'biformer_small': 25.54, 'biformer_base': 56.80}
GMACS = {'biformer_tiny': 2.2, 'biformer_small': 4.5, 'biformer_base': 9.8}


def _bra_pair(dim, heads, n_win, topk, auto_pad=False, seed=0):
    ours = BiLevelRoutingAttention(dim, num_heads=heads, n_win=n_win, topk=topk, auto_pad=auto_pad).double()
    official = randomize(OfficialBRA(dim, heads, n_win, topk, auto_pad), seed).double()
    sd = checkpoint_filter_fn({f'stages.0.0.attn.{k}': v for k, v in official.state_dict().items()}, None)
    ours.load_state_dict({k[len('stages.0.blocks.0.attn.'):]: v for k, v in sd.items()}, strict=True)
    return ours, official


@pytest.mark.parametrize('H,W,n_win,topk,auto_pad', [
    (8, 8, 4, 3, False), (12, 8, 2, 1, False), (6, 6, 3, 9, False), (7, 10, 3, 4, True), (5, 9, 2, 2, True)])
def test_layer_matches_official_gather(H, W, n_win, topk, auto_pad):
    ours, official = _bra_pair(16, 2, n_win, topk, auto_pad)
    x = torch.randn(2, H, W, 16, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out, ref = ours(x), official(x2)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad((out * g).sum(), x)
    (rx,) = torch.autograd.grad((ref * g).sum(), x2)
    torch.testing.assert_close(gx, rx)


def test_layer_routing_is_detached_and_shared_by_heads():
    """Gradients reach qkv only through the token attention: perturbing the routing logits' inputs by a
    tiny amount changes no index, and every head sees the same regions (one top-k for all)."""
    ours, _ = _bra_pair(8, 4, 2, 1)
    x = torch.randn(1, 4, 4, 8, dtype=torch.float64, requires_grad=True)
    ours(x).sum().backward()
    assert x.grad is not None and ours.qkv.weight.grad is not None


def test_layer_scripts_and_errors():
    ours, official = _bra_pair(16, 2, 2, 2)
    scripted = torch.jit.script(ours)
    x = torch.randn(1, 4, 6, 16, dtype=torch.float64)
    torch.testing.assert_close(scripted(x), official(x))
    with pytest.raises(ValueError, match='multiples of n_win'):
        ours(torch.randn(1, 5, 4, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match='num_heads must divide'):
        BiLevelRoutingAttention(10, num_heads=3)
    with pytest.raises(ValueError, match='topk'):
        BiLevelRoutingAttention(8, num_heads=2, topk=0)
    with pytest.raises(ValueError, match='expected input'):
        ours(torch.randn(1, 4, 4, 8))
    assert 'topk=2' in repr(ours)


def test_attention_lepe_matches_official():
    official = randomize(OfficialAttentionLePE(32)).double()
    ours = AttentionLePE(32, num_heads=8).double()
    ours.load_state_dict(official.state_dict(), strict=True)
    x = torch.randn(2, 3, 5, 32, dtype=torch.float64)
    torch.testing.assert_close(ours(x), official(x))
    torch.testing.assert_close(torch.jit.script(ours)(x), official(x))


@pytest.mark.parametrize('name', sorted(PARAMS_M))
def test_param_count_and_macs(name):
    model = timm.create_model(name).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params - PARAMS_M[name]) <= 0.005 * PARAMS_M[name], f'{name}: {params:.3f}M vs {PARAMS_M[name]}M'
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    gmacs = counter.get_total_flops() / 2e9
    assert abs(gmacs - GMACS[name]) <= 0.03 * GMACS[name], f'{name}: {gmacs:.2f} GMACs vs {GMACS[name]}'


def _official_state_dict(name, seed=0):
    official = randomize(OfficialBiFormer(**OFFICIAL_VARIANTS[name]), seed).eval()
    return official, {'model': official.state_dict(), 'optimizer': {}, 'epoch': 299}


@pytest.mark.parametrize('name', ['biformer_tiny', 'test_biformer'])
def test_official_checkpoint_gives_official_logits(name):
    official, checkpoint = _official_state_dict(name)
    model = timm.create_model(name).eval()
    model.load_state_dict(checkpoint_filter_fn(checkpoint, model), strict=True)
    size = 224 if name != 'test_biformer' else 64
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['biformer_small', 'biformer_base'])
def test_official_layout_loads_strictly(name):
    _, checkpoint = _official_state_dict(name)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=checkpoint['model']))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in checkpoint_filter_fn(checkpoint, model).items())


def test_official_keys_match_spec():
    _, checkpoint = _official_state_dict('test_biformer')
    keys = set(checkpoint['model'])
    for k in ('downsample_layers.0.0.weight', 'downsample_layers.0.1.running_var', 'downsample_layers.0.3.weight',
              'downsample_layers.0.4.num_batches_tracked', 'downsample_layers.1.0.weight', 'downsample_layers.3.1.bias',
              'stages.0.0.pos_embed.weight', 'stages.0.0.norm1.weight', 'stages.0.0.attn.qkv.qkv.weight',
              'stages.0.0.attn.wo.bias', 'stages.0.0.attn.lepe.weight', 'stages.0.0.norm2.bias',
              'stages.0.0.mlp.0.weight', 'stages.0.0.mlp.3.bias', 'stages.3.0.attn.qkv.weight',
              'stages.3.0.attn.proj.weight', 'stages.3.0.attn.lepe.bias', 'norm.running_mean', 'head.weight'):
        assert k in keys, k
    assert 'stages.3.0.attn.qkv.bias' not in keys


def test_dense_task_settings_match_official():
    """n_win and auto_pad as the dense configs set them (any input size, padded regions)."""
    cfg = dict(OFFICIAL_VARIANTS['test_biformer'], n_win=3, auto_pad=True)
    official = randomize(OfficialBiFormer(**cfg)).eval()
    model = timm.create_model('test_biformer', n_win=3, auto_pad=True, topks=(2, 4, 9, -1)).eval()
    official = randomize(OfficialBiFormer(**dict(cfg, topks=(2, 4, 9, -1)))).eval()
    model.load_state_dict(checkpoint_filter_fn(official.state_dict(), model), strict=True)
    x = torch.randn(1, 3, 72, 100)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official(x), rtol=1e-4, atol=1e-4)
    feats = timm.create_model('test_biformer', features_only=True, n_win=3, auto_pad=True)(x)
    assert [f.shape[1:] for f in feats] == [(16, 18, 25), (32, 9, 13), (32, 5, 7), (64, 3, 4)]


def test_cfgs_and_construction_contract():
    for name in PARAMS_M:
        cfg = timm.get_pretrained_cfg(name)
        assert cfg.url[0].startswith('https://') and cfg.interpolation == 'bicubic' and cfg.crop_pct == 0.875
    with pytest.raises(TypeError):
        timm.create_model('test_biformer', not_an_arg=1)
    model = timm.create_model('biformer_small', device='meta')
    assert next(model.parameters()).is_meta


def test_timm_api_forward_backward_and_checkpointing():
    torch.manual_seed(0)
    model = timm.create_model('test_biformer', drop_path_rate=0.1)
    x = torch.randn(2, 3, 64, 64)
    assert model.forward_features(x).shape == (2, 64, 2, 2)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 64)
    final, inter = model.forward_intermediates(x)
    assert [t.shape[1:] for t in inter] == [(16, 16, 16), (32, 8, 8), (32, 4, 4), (64, 2, 2)]
    model.eval()
    ref = model(x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), ref)
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.reset_classifier(0)
    assert model(x).shape == (2, 64)


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    model = timm.create_model('test_biformer').eval()
    x = torch.randn(1, 3, 64, 64)
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.fixture(scope='module')
def timm_tests():
    return load_timm_test_models()


def test_timm_forward_intermediates_and_prune(timm_tests):
    timm_tests.test_model_forward_intermediates('test_biformer', 1)
    timm_tests.test_model_forward_intermediates_features('test_biformer', 1)
    timm_tests.test_prune_intermediate_layers_contract('test_biformer')


def _run_timm_suite(tmp_path, select, timeout, **env_extra):
    tests_dir = timm_tests_dir()
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_DISABLE_TELEMETRY='1', PYTHONDONTWRITEBYTECODE='1', **env_extra)
    env.pop('GITHUB_ACTIONS', None)
    junit = tmp_path / 'junit.xml'
    cmd = [sys.executable, '-m', 'pytest', '-p', 'foveal', str(tests_dir / 'test_models.py'), '-k', select,
           '-q', '-rfEs', '-p', 'no:cacheprovider', f'--junitxml={junit}', '--rootdir', str(tests_dir.parent)]
    proc = subprocess.run(cmd, cwd=tests_dir.parent, env=env, capture_output=True, text=True, timeout=timeout)
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, f'timm test_models.py failed on {select}:\n{tail}'
    results, _ = _results(junit)
    outcomes = [o for per_func in results.values() for o in per_func.values()]
    assert outcomes and outcomes.count('failed') == 0, tail
    return results, tail


def test_timm_model_suite_test_variant(tmp_path):
    """timm's tests/test_models.py on the CI-sized member; none skipped."""
    results, tail = _run_timm_suite(tmp_path, 'test_biformer', 900)
    assert all(o == 'passed' for per_func in results.values() for o in per_func.values()), tail
    for func in ('test_model_forward', 'test_model_backward', 'test_model_forward_torchscript', 'test_model_forward_fx',
                 'test_model_backward_fx', 'test_model_default_cfgs', 'test_model_forward_features'):
        assert results[func].get('test_biformer') == 'passed', f'{func} did not pass'


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get('FOVEAL_TIMM_FAMILY'), reason='about 4 CPU minutes; set FOVEAL_TIMM_FAMILY=1')
def test_timm_model_suite_family(tmp_path):
    """The same suite on biformer_tiny / small / base, their pretrained tags loading synthetic release
    files (official layout, from a torch.hub cache) through the filter."""
    for name in PARAMS_M:
        _, checkpoint = _official_state_dict(name)
        fill_torch_hub_cache(tmp_path / 'torch', timm.get_pretrained_cfg(name).url, checkpoint)
    results, tail = _run_timm_suite(tmp_path, 'biformer_ and not test_biformer', 3600, TORCH_HOME=str(tmp_path / 'torch'))
    assert all(o == 'passed' for per_func in results.values() for o in per_func.values()), tail
    for func in ('test_model_forward', 'test_model_backward', 'test_model_default_cfgs', 'test_model_forward_features',
                 'test_model_forward_torchscript', 'test_model_forward_fx', 'test_model_load_pretrained',
                 'test_model_features_pretrained'):
        ran = {m.split('.')[0] for m, o in results.get(func, {}).items() if o == 'passed'}
        assert set(PARAMS_M) <= ran, f'{func}: passed for {sorted(ran)}\n{tail}'
