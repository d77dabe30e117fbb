# Two commands set everything up on a fresh machine: `make demo` (the main job on the built-in
# checkpoints) and `make test`. Both create .venv if absent and install the project into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Pinned versions of everything the tests and the demo install (the package's own requirements stay ranges).
LOCK   := constraints.txt
LATEST := .venv-latest
OLDEST := .venv-oldest
# The oldest transformers the package claims (pyproject.toml's `hf` extra), which `make test-oldest` installs.
OLDEST_TRANSFORMERS := $(shell sed -n 's/^hf = \["transformers>=\([0-9.]*\)"\]/\1/p' pyproject.toml)
# The tests that hold statelens to other packages' code (transformers, flash-linear-attention) and the
# property tests (hypothesis): what a new release of those can break.
ORACLE_TESTS := tests/test_hf_adapter.py tests/test_models.py tests/test_gla.py tests/test_commands.py \
                tests/test_kernels.py tests/test_scans.py tests/test_rollout_properties.py tests/test_checkpoint.py
TINY   := runs/tiny-mamba2
CKPT   ?= $(TINY)

.PHONY: install demo test test-latest test-oldest lock check bench bench-long clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned to the CPU build (2.13.0): an unpinned torch pulls several GB of CUDA packages. The rest
# comes pinned by $(LOCK), so a fresh clone installs the versions the suite passed with. setuptools warns on
# every editable install that a folder named like the package may shadow it; here that folder is the package.
$(STAMP): $(PY) pyproject.toml $(LOCK)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(LOCK) "torch==2.13.0"
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet -c $(LOCK) -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The main job on the built-in default: baseline vs state-passing post-training, report in runs/demo/index.html.
demo: $(STAMP)
	$(VENV)/bin/statelens demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest tests

# Not part of CI's gate: the newest releases of every dependency (torch stays the CPU 2.13.0) in a venv of
# their own, against the oracle and adapter tests, so that drift shows here before users meet it.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	echo "torch==2.13.0" > $(LATEST)/torch.txt
	$(LATEST)/bin/python -m pip install --quiet -c $(LATEST)/torch.txt "torch==2.13.0"
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -c $(LATEST)/torch.txt -e ".[test]"
	$(LATEST)/bin/python -m pip freeze | grep -iE "^(transformers|flash-linear-attention|fla-core|hypothesis|numpy)=="
	$(LATEST)/bin/python -m pytest $(ORACLE_TESTS)

# Not part of CI's gate either (`.ci/compat` runs both): the pinned environment with the oldest transformers the
# package claims in place of the pinned one, against the adapter's tests.
test-oldest:
	rm -rf $(OLDEST)
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install --quiet --upgrade pip
	grep -viE '^transformers==' $(LOCK) > $(OLDEST)/constraints.txt
	echo "transformers==$(OLDEST_TRANSFORMERS)" >> $(OLDEST)/constraints.txt
	$(OLDEST)/bin/python -m pip install --quiet -c $(OLDEST)/constraints.txt "torch==2.13.0"
	$(OLDEST)/bin/python -m pip install --quiet -c $(OLDEST)/constraints.txt -e ".[test]"
	$(OLDEST)/bin/python -m pip freeze | grep -iE "^transformers=="
	$(OLDEST)/bin/python -m pytest tests/test_hf_adapter.py tests/test_auto_backend.py

# After a green `make test-latest` (and `make test` in it): pin the test environment to what it installed.
lock:
	test -x $(LATEST)/bin/python || { echo "make lock: run make test-latest first"; exit 2; }
	{ sed -n '1,3p' $(LOCK); $(LATEST)/bin/python -m pip freeze --all --exclude-editable \
	  | grep -viE '^(pip|statelens)==' | sed 's/+cpu$$//'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

# The built-in default: a tiny random Mamba-2 checkpoint in mamba-ssm's layout.
$(TINY): | $(STAMP)
	$(PY) examples/tiny_checkpoint.py $(TINY)

# Describe a checkpoint and verify its backend: one-shot == chunked == token by token.
check: $(STAMP) $(if $(filter $(TINY),$(CKPT)),$(TINY))
	$(VENV)/bin/statelens check --ckpt $(CKPT)

bench: $(STAMP)
	$(PY) benchmarks/run.py

# Not part of `make bench` (about 30 minutes on 2 cores): statelens perplexity over 1M tokens of a 130M-shaped
# Mamba-2 with the compiled path, end to end; tokens/s beside the machine's matmul rate, and peak memory.
bench-long: $(STAMP)
	cd benchmarks && ../$(PY) long.py

clean:
	rm -rf $(VENV) $(LATEST) $(OLDEST) build dist *.egg-info
