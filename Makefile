# Two set-up commands for a newcomer: `make demo` and `make test`. Each creates its own virtual
# environment (.venv: training + edge + dev; .venv-edge: the edge runtime alone, no TensorFlow).
PYTHON ?= python3
VENV   ?= .venv
EDGE_VENV ?= .venv-edge
PY     := $(VENV)/bin/python
DEMO   ?= out/demo

.PHONY: setup setup-edge demo test test-fast clean

setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[train,edge,dev]"
	touch $@

# The edge runtime alone, as a board gets it: proves nothing on the edge path needs TensorFlow.
setup-edge: $(EDGE_VENV)/.installed
$(EDGE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(EDGE_VENV)
	$(EDGE_VENV)/bin/pip install --quiet --upgrade pip
	$(EDGE_VENV)/bin/pip install --quiet -e ".[edge]"
	touch $@

test: setup setup-edge
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

demo: setup
	$(PY) -m train synth --out $(DEMO)/data --per-class 60 --seed 0
	@echo "demo: synthetic data in $(DEMO)/data (training, conversion and the runtime are added as they land)"

clean:
	rm -rf out runs models .pytest_cache
