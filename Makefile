# Two set-up commands that work on a fresh machine (Python 3.11 + pip registries):
#   make demo   -> venv, install, digits sample -> shards -> quickstart training (2 processes, gloo)
#   make test   -> venv, install (incl. deepspeed), the whole test suite (unit, distributed, integration, slow)
#   make reproduce-degradation -> the paper's Fig. 6 at CPU scale: plain/ResNet-20/56 on digits (30-45 min)
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rtrain-installed
DEMO_DIR ?= out/demo
DEGRADATION_DIR ?= out/degradation
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false

.PHONY: demo test test-fast install clean reproduce-degradation docs

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt setup.py rtrain/data/_jpeg_region.c
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH" >&2; exit 1; }
	# Region JPEG decoding (rtrain.data._jpeg_region) compiles against libjpeg-turbo's headers: fetched with
	# apt where we may; without them the install skips the extension and the loader decodes whole images.
	test -e /usr/include/jpeglib.h || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends libjpeg62-turbo-dev >/dev/null; } || \
	    echo "no libjpeg headers: rtrain.data._jpeg_region not built, whole-image decoding" >&2
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned by version only (constraints.txt: torch==2.13.0): pip takes the build its own indexes
	# offer. Where pip's configuration adds a folder or index holding PyTorch's CPU wheel, that one wins
	# (2.13.0+cpu sorts above 2.13.0); elsewhere PyPI's default build (CUDA on Linux x86_64). To choose a build
	# on your machine, point pip at PyTorch's CPU or CUDA wheel index before `make`: PIP_EXTRA_INDEX_URL=<that
	# index> make install (its address is on PyTorch's "get started" page). A bare torch could pull 2.14.
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c constraints.txt -e '.[test,deepspeed]'
	touch $@

demo: $(STAMP)
	rm -rf $(DEMO_DIR)/digits  # regenerated each time (identical files); the shards are reused
	$(PY) -m data_prep.samples digits --out $(DEMO_DIR)/digits
	$(PY) -m data_prep.imagenet --src $(DEMO_DIR)/digits --out $(DEMO_DIR)/shards --shard-size 200 --workers 2
	rm -rf $(DEMO_DIR)/runs/quickstart
	$(PY) -m rtrain.launch recipes/quickstart.yaml data.source=$(DEMO_DIR)/shards \
	    run.output_root=$(DEMO_DIR)/runs tracking.uri=sqlite:///$(DEMO_DIR)/mlflow.db

# Four real runs into one MLflow experiment, then $(DEGRADATION_DIR)/degradation.md and .png; a rerun skips
# finished runs and resumes an interrupted one.
reproduce-degradation: $(STAMP)
	$(PY) -m rtrain.cli reproduce degradation --out $(DEGRADATION_DIR)

# Whole test modules on $(TEST_WORKERS) pytest-xdist workers (a module's services are started once, by one
# worker), the integration modules first (tests/conftest.py); TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: $(STAMP)
	$(PYTEST) --durations=25

# The inner loop: unit tests and the 2-process tier, without the slow ones.
test-fast: $(STAMP)
	$(PYTEST) -m "not slow and not integration"

# The reference pages (docs/reference/: recipe keys, CLI, exit codes, environment) regenerated from the code, then
# the documentation site (MkDocs, strict: a broken link fails) in site/. `make test` checks both.
docs: $(STAMP)
	$(PY) -m rtrain.commands.reference docs/reference
	$(PY) -m mkdocs build --strict -q -d site

clean:
	rm -rf $(VENV) out .pytest_cache site
