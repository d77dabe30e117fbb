# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test bench check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned to the CPU build (2.13.0): an unpinned torch pulls several GB of CUDA packages.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

# The main job until the demo lands: verify a checkpoint's backend (one-shot == chunked == token by token).
check: $(STAMP)
	$(VENV)/bin/statelens check --ckpt $(CKPT)

bench: $(STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) build dist *.egg-info
