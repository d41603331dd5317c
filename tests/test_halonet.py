"""The HaloNet H family (zoo/halonet.py): parameter counts, timm's own model tests, the timm API."""
import os
import subprocess
import sys

import pytest
import timm
import torch

import foveal
from foveal.layers import HaloAttention2d
from test_timm_suite import _results
from timm_sdist import load_timm_test_models, timm_tests_dir

# SPEC section 2 (millions of parameters)
PARAMS = {'h0': 5.5, 'h1': 8.1, 'h2': 9.4, 'h3': 11.8, 'h4': 19.1, 'h5': 30.7, 'h6': 43.4, 'h7': 67.4}


@pytest.mark.parametrize('h', list(PARAMS))
def test_parameter_count_within_3_percent(h):
    with torch.device('meta'):
        model = timm.create_model(f'halonet_paper_{h}')
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count / PARAMS[h] - 1) <= 0.03, f'halonet_paper_{h}: {count:.2f}M vs {PARAMS[h]}M'
    assert any(type(m) is HaloAttention2d for m in model.modules())


def test_names_do_not_collide_with_timm():
    ours = timm.list_models('*halonet_paper*')
    assert len(ours) == 9 and 'halonet_h1' in timm.list_models('halonet*')
    assert all(timm.get_pretrained_cfg(m).url == '' and not timm.get_pretrained_cfg(m).hf_hub_id for m in ours)


def test_forward_backward_and_accelerate_is_a_no_op():
    torch.manual_seed(0)
    model = timm.create_model('test_halonet_paper', num_classes=10)
    x = torch.randn(2, 3, 128, 128)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.warns(UserWarning, match='fused layers already there'):
        foveal.accelerate(model)
    feats = timm.create_model('test_halonet_paper', features_only=True)(x)
    assert [f.shape[-1] for f in feats] == [64, 32, 16, 8, 4]


@pytest.fixture(scope='module')
def timm_tests():
    return load_timm_test_models()


def test_timm_forward_intermediates_and_prune(timm_tests):
    timm_tests.test_model_forward_intermediates('test_halonet_paper', 1)
    timm_tests.test_model_forward_intermediates_features('test_halonet_paper', 1)
    timm_tests.test_prune_intermediate_layers_contract('test_halonet_paper')


def test_timm_model_suite(tmp_path):
    """timm's tests/test_models.py on the CI-sized member; the full family (``-k halonet_paper``) passes
    the same way, minutes per large model on a CPU, with timm skipping the ones over its size limit."""
    tests_dir = timm_tests_dir()
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_DISABLE_TELEMETRY='1', PYTHONDONTWRITEBYTECODE='1')
    env.pop('GITHUB_ACTIONS', None)
    junit = tmp_path / 'junit.xml'
    cmd = [sys.executable, '-m', 'pytest', '-p', 'foveal', str(tests_dir / 'test_models.py'), '-k',
           'test_halonet_paper', '-q', '-rfEs', '-p', 'no:cacheprovider', f'--junitxml={junit}',
           '--rootdir', str(tests_dir.parent)]
    proc = subprocess.run(cmd, cwd=tests_dir.parent, env=env, capture_output=True, text=True, timeout=1800)
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, f'timm test_models.py failed on test_halonet_paper:\n{tail}'
    results, _ = _results(junit)
    outcomes = [o for per_func in results.values() for o in per_func.values()]
    assert outcomes and outcomes.count('skipped') == 0 and outcomes.count('failed') == 0, tail
    for func in ('test_model_forward', 'test_model_backward', 'test_model_forward_torchscript', 'test_model_forward_fx',
                 'test_model_backward_fx', 'test_model_default_cfgs', 'test_model_forward_features'):
        assert any(o == 'passed' for o in results[func].values()), f'{func} did not run'
