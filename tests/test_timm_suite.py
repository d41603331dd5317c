"""timm's own model test suite (`tests/test_models.py` of the installed timm's sdist) on foveal's models.

It runs in a subprocess: foveal is loaded as a pytest plugin (`-p foveal`) so its models are
registered before timm's test module builds its parametrization, `-k` keeps the tests of foveal's
models, and the pretrained-loading tests read synthetic checkpoints (the published key names and
shapes, see nat_checkpoints.py) from offline hub caches (HF_HUB_OFFLINE=1). Every selected test
must pass; none may be skipped.
"""
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict

import pytest
import timm

import foveal  # noqa: F401  (registers the models)
from nat_checkpoints import fill_pretrained_caches
from timm_sdist import timm_tests_dir

# -k expression selecting foveal's NAT family: nat_*, dinat_*, test_nat and test_nat_isotropic
SELECT = 'nat_ or test_nat'

# tests timm runs on every model / on each model's default config / on each pretrained tag
PER_MODEL = ('test_model_forward', 'test_model_default_cfgs', 'test_model_forward_features', 'test_model_forward_fx')
PER_DEFAULT_CFG = ('test_model_backward', 'test_model_forward_torchscript', 'test_model_backward_fx',
                   'test_model_forward_fx_torchscript')
PER_PRETRAINED = ('test_model_load_pretrained', 'test_model_features_pretrained')


def _results(junit_path):
    """{test function: {parametrized model name: outcome}} and {test id: seconds} from a junit xml report."""
    results = defaultdict(dict)
    seconds = {}
    for case in ET.parse(junit_path).getroot().iter('testcase'):
        seconds[case.get('name')] = float(case.get('time', 0))
        name = case.get('name')
        func, _, params = name.partition('[')
        model = params.rstrip(']').split('-')[-1]  # ids read [batch_size-model]
        if case.find('failure') is not None or case.find('error') is not None:
            outcome = 'failed'
        elif case.find('skipped') is not None:
            outcome = 'skipped'
        else:
            outcome = 'passed'
        results[func][model] = outcome
    return results, seconds


@pytest.mark.slow
def test_timm_model_suite(tmp_path):
    tests_dir = timm_tests_dir()
    models = timm.list_models(['nat_*', 'dinat_*', 'test_nat*'])
    pretrained = timm.list_pretrained(['nat_*', 'dinat_*', 'test_nat*'])
    assert models and all(timm.get_pretrained_cfg(m) is not None for m in models)
    fill_pretrained_caches(tmp_path / 'hf', tmp_path / 'torch', pretrained)

    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(tmp_path / 'hf'), TORCH_HOME=str(tmp_path / 'torch'),
               HF_HUB_DISABLE_TELEMETRY='1', PYTHONDONTWRITEBYTECODE='1')
    # timm's per-test time limits (TIMEOUT overrides its 120-360 s marks) assume compiled kernels; on
    # a CPU the 384x384 DiNAT-L forwards run the pure-PyTorch reference and need longer
    env.setdefault('TIMEOUT', '1200')
    env.pop('GITHUB_ACTIONS', None)  # that variable makes timm's file drop its pretrained tests
    junit = tmp_path / 'junit.xml'
    cmd = [sys.executable, '-m', 'pytest', '-p', 'foveal', str(tests_dir / 'test_models.py'), '-k', SELECT,
           '-q', '-rfEs', '-p', 'no:cacheprovider', f'--junitxml={junit}', '--rootdir', str(tests_dir.parent)]
    proc = subprocess.run(cmd, cwd=tests_dir.parent, env=env, capture_output=True, text=True, timeout=7200)
    shutil.rmtree(tmp_path / 'hf')
    shutil.rmtree(tmp_path / 'torch')
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, f'timm test_models.py failed on foveal models:\n{tail}'

    results, seconds = _results(junit)
    outcomes = [o for per_func in results.values() for o in per_func.values()]
    slowest = ', '.join(f'{n} {t:.0f}s' for n, t in sorted(seconds.items(), key=lambda x: -x[1])[:5])
    print(f'\ntimm {timm.__version__} test_models.py on {len(models)} foveal models / {len(pretrained)} tags: '
          f'{outcomes.count("passed")} passed, {outcomes.count("skipped")} skipped, '
          f'{outcomes.count("failed")} failed in {sum(seconds.values()):.0f}s; slowest: {slowest}')
    assert outcomes.count('skipped') == 0 and outcomes.count('failed') == 0, tail
    unknown = {m.split('.')[0] for per_func in results.values() for m in per_func} - set(models)
    assert not unknown, f'-k {SELECT!r} selected tests of models outside foveal: {sorted(unknown)}'
    for func in PER_MODEL + PER_DEFAULT_CFG:
        # the cfg tests list models with their pretrained tags (nat_tiny.in1k)
        ran = {k.split('.')[0] for k, outcome in results[func].items() if outcome == 'passed'}
        missing = [m for m in models if m not in ran]
        assert not missing, f'{func} did not pass for {missing}'
    for func in PER_PRETRAINED:
        missing = [m for m in pretrained if results[func].get(m) != 'passed']
        assert not missing, f'{func} did not pass for {missing}'
