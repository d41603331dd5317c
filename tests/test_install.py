"""`pip install .` and `pip install -e .` both give working `foveal`, `foveal.layers`, `foveal.kernels`."""
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import foveal

REPO = Path(__file__).resolve().parents[1]
PROBE = "import foveal, foveal.layers, foveal.kernels; print(foveal.__file__); print(foveal.kernels.__file__)"


def test_regular_install(tmp_path):
    """A non-editable install into a fresh target folder imports from that folder, not the repo."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(REPO)],
        check=True,
        cwd=tmp_path,
    )
    assert (target / "foveal" / "kernels" / "neighborhood.py").is_file()
    assert (target / "foveal" / "layers" / "__init__.py").is_file()
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        check=True,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    ).stdout.split()
    assert all(Path(p).is_relative_to(target) for p in out), out


def test_editable_install():
    """The development install (`pip install -e .`, what `make test` sets up) maps the package to the repo folders."""
    # (an in-tree foveal.egg-info left by a build may shadow the installed metadata: look at all)
    urls = [json.loads(d.read_text("direct_url.json") or "{}") for d in metadata.distributions(name="foveal")]
    if not any(u.get("dir_info", {}).get("editable") for u in urls):
        pytest.skip("foveal is not installed in editable mode here; `make test` installs it with -e")
    out = subprocess.run([sys.executable, "-c", PROBE], check=True, cwd="/", capture_output=True, text=True).stdout.split()
    assert Path(out[0]) == REPO / "zoo" / "__init__.py"
    assert Path(out[1]) == REPO / "kernels" / "__init__.py"
    assert Path(foveal.__file__).parent == REPO / "zoo"
