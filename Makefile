# The two commands of the README:  `make demo`  and  `make test`.
# Both set up a virtual environment in .venv on first use (CPU only; nothing is downloaded at run time).
PY ?= python3
VENV ?= .venv
# torch is installed first, pinned, so that pip takes a CPU build where one is on offer (a local wheel, or
# TORCH_INDEX=https://download.pytorch.org/whl/cpu) instead of pulling a multi-GB CUDA build through diffusers.
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean system-deps

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) '$(TORCH)'
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/synthmed validate dataset_specs/*.yaml
	$(BIN)/synthmed generate dataset_specs/pneumonia.yaml -o out/demo --backend phantom --limit 64 --overwrite

system-deps:
	./scripts/install-system-deps.sh

test: $(STAMP) system-deps
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_plan.py
	$(BIN)/python benchmarks/bench_writers.py

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
