# Two commands a newcomer needs: `make run` (the embedded default recipe, offline) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch first: a bare `torch` requirement would pull several GB of CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

.PHONY: install run test
install: $(BIN)/.installed

run: install
	$(BIN)/python -m pipeline run

test: install
	$(BIN)/python -m pytest -q
