# One-command set-up and runs on a fresh Debian machine with Python 3.11.
#   make run    the main job (see README)
#   make test   the test suite (CPU; what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.foveal-installed

.PHONY: run test install clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=69" wheel
	# torch and torchvision as one matching pair (PyPI's torchvision alone does not import beside a local torch)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) tools/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .cache build *.egg-info
