"""timm's own model tests, taken from the sdist of the installed timm release.

The wheel ships no tests, so the sdist is fetched once with pip (`pip download timm==<version>
--no-binary :all: --no-deps`) into the repository's git-ignored `.cache/timm-sdist/` and extracted
there. Set FOVEAL_TIMM_SDIST to a local `timm-<version>.tar.gz` to skip the download (offline CI).
"""
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import timm

CACHE = Path(__file__).resolve().parents[1] / '.cache' / 'timm-sdist'


def timm_tests_dir() -> Path:
    """`tests/` of the sdist matching the installed timm version (fetched and extracted on first use)."""
    version = timm.__version__
    root = CACHE / f'timm-{version}'
    if (root / 'tests' / 'test_models.py').is_file():
        return root / 'tests'
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = os.environ.get('FOVEAL_TIMM_SDIST')
    if tarball is None:
        tarball = CACHE / f'timm-{version}.tar.gz'
        if not tarball.is_file():
            cmd = [sys.executable, '-m', 'pip', 'download', f'timm=={version}', '--no-binary', ':all:', '--no-deps',
                   '--disable-pip-version-check', '-d', str(CACHE)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0 or not tarball.is_file():
                raise RuntimeError(
                    f'could not fetch the timm {version} sdist ({" ".join(cmd)}):\n{result.stderr[-2000:]}\n'
                    f'set FOVEAL_TIMM_SDIST to a local timm-{version}.tar.gz instead')
    # extract beside the cache and rename into place, so concurrent runs never see half a tree
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        with tarfile.open(tarball) as tf:
            tf.extractall(tmp, filter='data')
        try:
            os.replace(Path(tmp) / f'timm-{version}', root)
        except OSError:
            if not (root / 'tests' / 'test_models.py').is_file():
                raise
    return root / 'tests'


def load_timm_test_models() -> ModuleType:
    """The sdist's `tests/test_models.py` as a module, so its test functions can be called on any model."""
    path = timm_tests_dir() / 'test_models.py'
    spec = importlib.util.spec_from_file_location('timm_sdist_test_models', path)
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        # its markers (base, features, ...) are registered in timm's pytest config, not ours
        warnings.simplefilter('ignore', pytest.PytestUnknownMarkWarning)
        spec.loader.exec_module(module)
    return module

