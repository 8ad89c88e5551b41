PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast bench bench-env clean

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

# the jax-lorax baseline needs an older JAX and the PEFT rows need PyTorch, so each
# gets its own environment; make bench builds both (-k: one failing does not stop the
# other) and runs without either if it cannot be built
JAX_LORAX := benchmarks/.venv-jax-lorax
PEFT := benchmarks/.venv-peft

bench: $(VENV)/.installed
	-$(MAKE) --no-print-directory -k bench-env
	py=$(JAX_LORAX)/bin/python; if [ -x $$py ]; then export JAX_LORAX_PYTHON=$$PWD/$$py; fi; \
	py=$(PEFT)/bin/python; if [ -x $$py ]; then export PEFT_PYTHON=$$PWD/$$py; fi; \
	$(BIN)/python benchmarks/bench.py --write-docs

bench-env: $(JAX_LORAX)/.installed $(PEFT)/.installed

$(JAX_LORAX)/.installed: benchmarks/requirements-jax-lorax.txt
	$(PY) -m venv $(JAX_LORAX)
	$(JAX_LORAX)/bin/pip install --quiet -r benchmarks/requirements-jax-lorax.txt
	touch $@

$(PEFT)/.installed: benchmarks/requirements-peft.txt
	$(PY) -m venv $(PEFT)
	$(PEFT)/bin/pip install --quiet -r benchmarks/requirements-peft.txt
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
