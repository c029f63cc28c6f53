# autoalign — two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.docs-installed

.PHONY: demo test test-zoo test-all test-install test-fusion-bench test-transformers install docs clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch torchvision
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# the documentation tools are installed only for `make docs`, not for `make test`
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

demo: $(STAMP)
	$(PY) -m autoalign demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not zoo and not slow"

test-zoo: $(STAMP)
	$(PY) -m pytest -q -m zoo

test-all: $(STAMP)
	$(PY) -m pytest -q

# what a user gets from `pip install .`: a fresh virtual environment in a temporary folder,
# the plain install (no extras; torch and torchvision pinned by constraints.txt) of a copy of
# the sources (a stale build/ here could otherwise slip old modules into the wheel), then the
# quickest `autoalign demo` run from outside the checkout; the folder is removed afterwards
test-install:
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	echo "test-install: fresh virtual environment in $$tmp"; \
	mkdir "$$tmp/src"; cp -R pyproject.toml README.md autoalign hydra_plugins "$$tmp/src/"; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install --quiet -c constraints.txt "$$tmp/src"; \
	cd "$$tmp"; \
	"$$tmp/venv/bin/autoalign" demo --models 2 --epochs 1 --device cpu --quiet --out "$$tmp/demo_out"; \
	test -s "$$tmp/demo_out/demo_digits.md"; \
	echo "test-install: ok"

# autoalign as a FusionBench method: its own virtual environment (FusionBench adds ~1 GB:
# transformers, datasets, lightning, ...), the `fusion-bench` extra, then its tests, offline
FB_VENV ?= .venv-fb
FB_PY := $(FB_VENV)/bin/python
FB_STAMP := $(FB_VENV)/.installed

$(FB_STAMP): pyproject.toml constraints.txt
	test -x $(FB_PY) || $(PYTHON) -m venv $(FB_VENV)
	$(FB_PY) -m pip install --quiet --upgrade pip
	$(FB_PY) -m pip install --quiet -c constraints.txt torch torchvision
	$(FB_PY) -m pip install --quiet -c constraints.txt -e ".[dev,fusion-bench]"
	touch $(FB_STAMP)

test-fusion-bench: $(FB_STAMP)
	HF_HUB_OFFLINE=1 $(FB_PY) -m pytest -q tests/test_fusion_bench.py tests/test_docstrings.py -k "fusion_bench or integrations"

# Hugging Face transformers and timm through the torch.export front end: their own virtual
# environment (the `transformers` and `timm` extras), then their tests (models built from config
# classes, nothing downloaded); the timm zoo sample is in `make test-zoo` of this environment
TF_VENV ?= .venv-tf
TF_PY := $(TF_VENV)/bin/python
TF_STAMP := $(TF_VENV)/.installed

$(TF_STAMP): pyproject.toml constraints.txt
	test -x $(TF_PY) || $(PYTHON) -m venv $(TF_VENV)
	$(TF_PY) -m pip install --quiet --upgrade pip
	$(TF_PY) -m pip install --quiet -c constraints.txt torch torchvision
	$(TF_PY) -m pip install --quiet -c constraints.txt -e ".[dev,transformers,timm]"
	touch $(TF_STAMP)

test-transformers: $(TF_STAMP)
	HF_HUB_OFFLINE=1 $(TF_PY) -m pytest -q -m "not zoo" tests/test_transformers.py $(wildcard tests/test_timm_zoo.py)
	$(TF_PY) -m pytest -q -m slow tests/test_trace_export.py

clean:
	rm -rf $(VENV) $(FB_VENV) $(TF_VENV) build *.egg-info
