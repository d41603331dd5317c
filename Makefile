# One-command set-up and runs on a fresh Debian machine with Python 3.11.
#   make run    the main job (see README)
#   make test   the test suite (CPU; what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.foveal-installed
# Debian's copy of Fashion-MNIST (the main job's data; also used by the tool tests)
FMNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test install clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=69" wheel
	# torch and torchvision as one matching pair (PyPI's torchvision alone does not import beside a local torch)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test,tools]"
	touch $(STAMP)

$(FMNIST):
	$(SUDO) apt-get install -y --no-install-recommends dataset-fashion-mnist || \
		($(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends dataset-fashion-mnist)

install: $(STAMP) $(FMNIST)

run: $(STAMP) $(FMNIST)
	$(PY) tools/train.py

test: $(STAMP) $(FMNIST)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .cache build *.egg-info
