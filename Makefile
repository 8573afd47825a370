# Two set-up commands for a newcomer: `make demo` and `make test`. Each creates its own virtual
# environment (.venv: training + edge + dev; .venv-edge: the edge runtime alone, no TensorFlow).
PYTHON ?= python3
VENV   ?= .venv
EDGE_VENV ?= .venv-edge
TFLRT_VENV ?= .venv-tflrt
PY     := $(VENV)/bin/python
DEMO   ?= out/demo

.PHONY: setup setup-edge setup-tflrt demo test test-fast clean

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

# tflite-runtime 2.14 (its last release; CPython 3.8-3.11, numpy < 2), the interpreter many board images have,
# with the project: the tests of that path use it. Where it cannot be installed, the reason is written to
# $(TFLRT_VENV)/.unavailable and those tests skip with it.
setup-tflrt: $(TFLRT_VENV)/.installed
$(TFLRT_VENV)/.installed: pyproject.toml
	@rm -rf $(TFLRT_VENV)
	@if $(PYTHON) -m venv $(TFLRT_VENV) && $(TFLRT_VENV)/bin/pip install --quiet --upgrade pip \
	    && $(TFLRT_VENV)/bin/pip install --quiet "tflite-runtime==2.14.0" "numpy<2" > $(TFLRT_VENV)/install.log 2>&1 \
	    && $(TFLRT_VENV)/bin/pip install --quiet -e . >> $(TFLRT_VENV)/install.log 2>&1; \
	then touch $@; \
	else why="$$( (tail -n1 $(TFLRT_VENV)/install.log 2>/dev/null) || true)"; rm -rf $(TFLRT_VENV); mkdir -p $(TFLRT_VENV); \
	    echo "pip install tflite-runtime==2.14.0 failed on $$($(PYTHON) --version 2>&1) $$(uname -m) (wheels: CPython 3.8-3.11, x86-64 and aarch64): $$why" > $(TFLRT_VENV)/.unavailable; \
	    cat $(TFLRT_VENV)/.unavailable; touch $@; fi

test: setup setup-edge setup-tflrt
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The whole chain on the embedded synthetic data: synth -> train (quick) -> int8 convert + cross-compare
# -> benchmark -> edge-inspect -> adapt to a second synthetic "fab" (README: the measured time).
demo: setup
	$(PY) -m train synth --out $(DEMO)/data --per-class 150 --seed 0
	$(PY) -m train --data $(DEMO)/data --out $(DEMO)/run --profile quick --weights imagenet
	$(PY) -m convert --int8 --float32 --run $(DEMO)/run --out $(DEMO)/bundle
	$(PY) -m benchmarks --models $(DEMO)/bundle --threads 1,2 --runs 20 --stream-length 20 --out $(DEMO)/bench
	$(VENV)/bin/edge-inspect --models $(DEMO)/bundle $(DEMO)/data/clean/clean_0000.png $(DEMO)/data/bridges/bridges_0000.png $(DEMO)/data/vias/vias_0000.png
	$(PY) -m train synth --out $(DEMO)/fab --per-class 20 --seed 7
	$(PY) -m train adapt --from $(DEMO)/bundle --data $(DEMO)/fab --out $(DEMO)/bundle-fab
	@echo
	@echo "demo done. Reports:"
	@echo "  data + audit:     $(DEMO)/run/data/summary.md"
	@echo "  training:         $(DEMO)/run/report.md"
	@echo "  float vs int8:    $(DEMO)/bundle/compare.md"
	@echo "  benchmark:        $(DEMO)/bench/results.md"
	@echo "  deployable bundle: $(DEMO)/bundle"
	@echo "  adapted to a fab: $(DEMO)/bundle-fab (adapt_report.json)"

# models/ holds the committed reference bundle: only what the demo and runs wrote goes.
clean:
	rm -rf out runs data .pytest_cache
