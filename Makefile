# Two commands on a fresh machine: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(VENV)/bin/pip install --quiet -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import orchestrator, flows, mergefleet, torch, transformers, safetensors, mergekit" 
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m mergefleet.demo --workdir demo-out

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

# The inner loop: everything but the tests marked slow (servers, training, mergekit, kills).
test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

bench: $(STAMP)
	$(PY) bench/bench_merge.py

clean:
	rm -rf demo-out bench/out .pytest_cache
