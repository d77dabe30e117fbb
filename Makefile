# Two commands set everything up on a fresh machine: `make demo` (the main job on the built-in
# checkpoints) and `make test`. Both create .venv if absent and install the project into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TINY   := runs/tiny-mamba2
CKPT   ?= $(TINY)

.PHONY: install demo test check bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned to the CPU build (2.13.0): an unpinned torch pulls several GB of CUDA packages.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The main job on the built-in default: baseline vs state-passing post-training, report in runs/demo/index.html.
demo: $(STAMP)
	$(VENV)/bin/statelens demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest tests

# The built-in default: a tiny random Mamba-2 checkpoint in mamba-ssm's layout.
$(TINY): | $(STAMP)
	$(PY) examples/tiny_checkpoint.py $(TINY)

# Describe a checkpoint and verify its backend: one-shot == chunked == token by token.
check: $(STAMP) $(if $(filter $(TINY),$(CKPT)),$(TINY))
	$(VENV)/bin/statelens check --ckpt $(CKPT)

bench: $(STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) build dist *.egg-info
