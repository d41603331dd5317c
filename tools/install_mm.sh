#!/usr/bin/env bash
# Install the OpenMMLab stack that foveal.mm targets (mmengine 0.10.7, mmcv 2.1.0 with its compiled
# ops, mmdet 3.3.0, mmsegmentation 1.2.2) into the Python environment that already has torch and foveal:
#
#   tools/install_mm.sh [PYTHON]          # PYTHON defaults to .venv/bin/python, else python3
#
# mmcv 2.1.0 (the newest mmcv that mmdet 3.3 and mmseg 1.2 accept) is published as a source
# distribution only, and its C++ ops do not build against current torch as shipped: torch >= 2.14's
# headers need C++20 where mmcv's setup.py asks for C++17. This script builds the wheel with that one
# flag changed, against the installed torch (no build isolation), and keeps it in a wheel cache, so
# the next install takes seconds. A prebuilt wheel is used instead of a build when one in
# FOVEAL_MM_WHEELS (default: ../shared/wheels beside the repository) has tags this interpreter
# accepts and was built against the installed torch (CPU wheels only where CUDA is not wanted).
#
# Environment:
#   FOVEAL_MM_WHEELS     folder searched for a prebuilt mmcv 2.1.0 wheel
#   FOVEAL_WHEEL_CACHE   where built wheels are kept (default: ~/.cache/foveal/wheels)
#   FOVEAL_MMCV_SDIST    a local mmcv-2.1.0.tar.gz to build from (no download; for offline machines)
#   FOVEAL_MMCV_TORCH    torch version the prebuilt wheels in FOVEAL_MM_WHEELS were built against
#                        (default 2.14.1)
#   FORCE_CUDA=1         build mmcv's CUDA ops (default: on when torch sees a GPU); a CPU-only
#                        prebuilt wheel is then skipped
#   MAX_JOBS             parallel compile jobs (default: the number of cores)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -ge 1 ]; then
    PY="$1"
elif [ -x "$ROOT/.venv/bin/python" ]; then
    PY="$ROOT/.venv/bin/python"
else
    PY=python3
fi
MMCV_VERSION=2.1.0
WHEELS="${FOVEAL_MM_WHEELS:-$ROOT/../shared/wheels}"
CACHE="${FOVEAL_WHEEL_CACHE:-$HOME/.cache/foveal/wheels}"
PREBUILT_TORCH="${FOVEAL_MMCV_TORCH:-2.14.1}"
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

torch_version="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
if [ -z "${FORCE_CUDA:-}" ]; then
    FORCE_CUDA="$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')"
fi

# mmcv's setup.py and mmengine (it resolves `mmdet::` / `mmseg::` base configs) import pkg_resources,
# which setuptools 81 removed
pip_install "setuptools<81" wheel ninja

# a wheel whose tags this interpreter accepts, from folder $1 (none: empty output)
find_wheel() {
    "$PY" - "$1" "$MMCV_VERSION" <<'EOF'
import pathlib, sys
from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename
folder, version = pathlib.Path(sys.argv[1]), sys.argv[2]
accepted = set(sys_tags())
for path in sorted(folder.glob(f"mmcv-{version}-*.whl")) if folder.is_dir() else []:
    _, wheel_version, _, tags = parse_wheel_filename(path.name)
    if str(wheel_version) == version and tags & accepted:
        print(path)
        break
EOF
}

# the cache is keyed by what the ops were compiled against
cache_dir="$CACHE/mmcv-$MMCV_VERSION-torch$torch_version-$([ "$FORCE_CUDA" = 1 ] && echo cuda || echo cpu)"
wheel="$(find_wheel "$cache_dir")"
if [ -z "$wheel" ] && [ "$FORCE_CUDA" != 1 ] && [ "$torch_version" = "$PREBUILT_TORCH" ]; then
    wheel="$(find_wheel "$WHEELS")"
fi

if [ -z "$wheel" ]; then
    echo "building mmcv $MMCV_VERSION against torch $torch_version (FORCE_CUDA=$FORCE_CUDA); about 10 minutes on 2 cores"
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    if [ -n "${FOVEAL_MMCV_SDIST:-}" ]; then  # an offline machine: the sdist carried there
        sdist="$FOVEAL_MMCV_SDIST"
    else
        # no build isolation: an isolated metadata build would take a setuptools without pkg_resources
        "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$work" "mmcv==$MMCV_VERSION"
        sdist="$work/mmcv-$MMCV_VERSION.tar.gz"
    fi
    tar -xzf "$sdist" -C "$work"
    src="$work/mmcv-$MMCV_VERSION"
    grep -q "'-std=c++17'" "$src/setup.py" || { echo "mmcv's setup.py no longer names -std=c++17" >&2; exit 1; }
    sed -i "s/'-std=c++17'/'-std=c++20'/g" "$src/setup.py"
    mkdir -p "$cache_dir"
    # CFLAGS replaces Python's default flags: give the whole optimised set, without debug info
    # (-g makes the build several times slower and the wheel 20x larger)
    # mmcv's setup.py builds CUDA ops whenever torch sees a GPU: hide it for a CPU-only build
    hide_gpus=()
    [ "$FORCE_CUDA" = 1 ] || hide_gpus=(CUDA_VISIBLE_DEVICES=)
    (cd "$src" && env "${hide_gpus[@]}" MMCV_WITH_OPS=1 FORCE_CUDA="$FORCE_CUDA" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
        CFLAGS="-Wsign-compare -DNDEBUG -g0 -fwrapv -O3 -Wall" \
        "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$cache_dir" .)
    wheel="$(find_wheel "$cache_dir")"
fi
echo "mmcv: $wheel"

# keep an editable development install editable (-I: the source tree's foveal.egg-info, which an
# editable build leaves in the current directory, would otherwise shadow the installed metadata)
editable="$("$PY" -I - <<'EOF'
import json
from importlib import metadata
try:
    url = json.loads(metadata.distribution("foveal").read_text("direct_url.json") or "{}")
except metadata.PackageNotFoundError:
    url = {}
print("-e" if url.get("dir_info", {}).get("editable") else "")
EOF
)"
pip_install "$wheel" $editable "$ROOT[mm]"
"$PY" -c 'import mmcv, mmcv.ops, mmdet, mmseg, mmengine; import foveal.mm; print("mm stack:", "mmengine", mmengine.__version__, "mmcv", mmcv.__version__, "mmdet", mmdet.__version__, "mmseg", mmseg.__version__)'
