# `make demo` and `make test` do everything on a fresh machine: they create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := constraints.txt
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: venv demo test test-fast bench clean

venv: $(STAMP)

$(STAMP): setup.py $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c $(CONSTRAINTS) --upgrade pip setuptools wheel
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[test,dev]'
	$(PIP) check
	touch $(STAMP)

demo: venv
	$(PY) examples/mm/stable_diffusion/demo.py --out demo_out

test: venv
	$(PY) -m pytest tests -q -p no:cacheprovider

test-fast: venv
	$(PY) -m pytest tests -q -m "not slow" -p no:cacheprovider

bench: venv
	$(PY) benchmarks/run_all.py

clean:
	rm -rf demo_out runs .pytest_cache
