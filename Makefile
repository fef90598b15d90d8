# Two commands on a fresh machine: `make demo` and `make test`. Each sets itself up from
# the lock files in requirements/ (exact versions with hashes); `make lock` rewrites them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-stamp

# torch's CPU build is not on PyPI: pip's configured find-links may hold it, else this index serves it
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_VERSION := $(shell sed -n 's/^ *"torch==\([^"]*\)".*/\1/p' pyproject.toml)
INSTALL_LOCKS := -r requirements/torch-cpu.lock -r requirements/test.lock

# `make lock`: uv resolves for the platform of the tests and the images (Linux x86_64,
# CPython 3.11) whatever machine runs it. LOCK_FLAGS=--upgrade moves every pin to the newest.
UV_VERSION := 0.13.9
# pip 23 (Python 3.11's own) refuses a hashed lock whose packages ask for extras
PIP_VERSION := 26.3
LOCK_TOOLS := .lock-tools
UV := $(LOCK_TOOLS)/bin/uv
TORCH_CPU_LINKS ?= $(or $(PIP_FIND_LINKS),$(TORCH_CPU_INDEX)/torch/)
LOCK_FLAGS ?=
COMPILE := $(UV) pip compile --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	--generate-hashes --custom-compile-command "make lock" $(LOCK_FLAGS)

.PHONY: install demo test test-fast bench lock clean

# The locks go in with uv (from pip.lock, hashed like the rest): 2 minutes against pip's
# 4 here. uv reads no pip configuration, so pip's find-links are passed on; it compiles
# the bytecode as pip does (where PYTHONDONTWRITEBYTECODE is set, nothing else would, and
# every test process would compile prefect, torch and mlflow from source again).
UV_INSTALL := $(VENV)/bin/uv pip install --quiet --python $(PY) --require-hashes --compile-bytecode \
	$(foreach links,$(PIP_FIND_LINKS),--find-links $(links))

$(STAMP): requirements/pip.lock requirements/torch-cpu.lock requirements/test.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --require-hashes -r requirements/pip.lock
	$(UV_INSTALL) $(INSTALL_LOCKS) \
		|| $(UV_INSTALL) --extra-index-url $(TORCH_CPU_INDEX) --index-strategy unsafe-best-match $(INSTALL_LOCKS)
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	$(PY) -c "import orchestrator, flows, mergefleet, torch, transformers, safetensors, mergekit"
	$(PY) -c "from orchestrator.methods.sort_order import compile_replay; compile_replay()"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m mergefleet.demo --workdir demo-out

# Test files run on TEST_WORKERS processes (pytest-xdist, a whole file per process so each
# file's servers start once); most tests wait on servers and subprocesses, so two keep two
# cores busy. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP)
	$(PYTEST) --durations=20 tests

# The inner loop: everything but the tests marked slow (servers, training, mergekit, kills).
test-fast: $(STAMP)
	$(PYTEST) -m "not slow" tests

bench: $(STAMP)
	$(PY) bench/bench_merge.py

$(UV):
	$(PYTHON) -m venv $(LOCK_TOOLS)
	$(LOCK_TOOLS)/bin/pip install --quiet uv==$(UV_VERSION)

# a torch lock holds what torch needs beyond runtime.lock, at runtime.lock's versions
ONLY_TORCH = $$(sed -n 's/^\([A-Za-z0-9._-]*\)==.*/--no-emit-package \1/p' requirements/runtime.lock)

# runtime.lock and test.lock leave torch out (its dependencies stay in); one of the torch
# locks goes with them: torch-cpu.lock (tests, CPU image) or torch-cuda.lock (GPU image).
lock: $(UV)
	printf "pip==$(PIP_VERSION)\nuv==$(UV_VERSION)\n" | $(COMPILE) - -o requirements/pip.lock
	$(COMPILE) pyproject.toml --find-links $(TORCH_CPU_LINKS) --no-emit-package torch \
		-o requirements/runtime.lock
	$(COMPILE) pyproject.toml --extra test --find-links $(TORCH_CPU_LINKS) --no-emit-package torch \
		-c requirements/runtime.lock -o requirements/test.lock
	echo "torch==$(TORCH_VERSION)+cpu" | $(COMPILE) - --find-links $(TORCH_CPU_LINKS) \
		-c requirements/runtime.lock $(ONLY_TORCH) --no-header --no-annotate -o requirements/torch-cpu.lock
	sed -i '/^# The following packages were excluded/,$$d' requirements/torch-cpu.lock
	printf '%s\n' "# torch's CPU build, hashed. Regenerate with: make lock" \
		"# The same file is served by $(TORCH_CPU_INDEX) (pip install --extra-index-url ...)." \
		"# Its dependencies are in runtime.lock." | cat - requirements/torch-cpu.lock > requirements/torch-cpu.tmp
	mv requirements/torch-cpu.tmp requirements/torch-cpu.lock
	echo "torch==$(TORCH_VERSION)" | $(COMPILE) - -c requirements/runtime.lock $(ONLY_TORCH) \
		-o requirements/torch-cuda.lock

clean:
	rm -rf demo-out bench/out .pytest_cache
