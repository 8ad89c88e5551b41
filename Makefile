PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python examples/text_lm.py

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -n 2

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
