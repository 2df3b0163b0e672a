# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet -e ".[dev,vision,examples]"
	touch $(STAMP)

demo: $(STAMP)  ## train on digits with the full suite, write TensorBoard logs and a report
	$(PY) examples/train_digits.py $(ARGS)

test: $(STAMP)  ## lint and run every test
	$(VENV)/bin/ruff check src tests examples benchmarks experiments
	$(VENV)/bin/mypy src
	$(PY) -m pytest -n 2 $(ARGS)

bench: $(STAMP)  ## speed and memory against naive baselines
	$(PY) benchmarks/run.py $(ARGS)

clean:
	rm -rf $(VENV) lightning_logs gapwatch_runs .pytest_cache
