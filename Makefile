# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both install the exact versions of requirements-dev.lock (`make lock` regenerates it
# from pyproject.toml's ranges and requirements-dev.in).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK_OPTIONS := --quiet --extra dev --extra vision --extra examples --strip-extras \
	--allow-unsafe --no-emit-index-url --no-emit-find-links

.PHONY: demo test lint bench gpu lock clean

$(STAMP): pyproject.toml requirements-dev.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

demo: $(STAMP)  ## train on digits with the full suite, write TensorBoard logs and a report
	$(PY) examples/train_digits.py $(ARGS)

lint: $(STAMP)  ## ruff and mypy
	$(VENV)/bin/ruff check src tests examples benchmarks experiments
	$(VENV)/bin/mypy src

test: lint  ## lint and run every test
	$(PY) -m pytest -n 2 $(ARGS)

bench: $(STAMP)  ## speed and memory against naive baselines
	$(PY) benchmarks/run.py $(ARGS)

gpu:  ## on a CUDA machine: CUDA tests, suite cost and memory, non-interference (<= 8 min)
	bash benchmarks/gpu.sh $(ARGS)

lock: $(STAMP)  ## regenerate requirements-dev.lock (exact versions of every dependency)
	$(VENV)/bin/pip-compile $(LOCK_OPTIONS) --output-file requirements-dev.lock \
		pyproject.toml requirements-dev.in

clean:
	rm -rf $(VENV) lightning_logs gapwatch_runs .pytest_cache
