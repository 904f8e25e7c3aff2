# Two commands do all setup on a fresh machine:
#   make run   -- create .venv if missing, install, run the main job
#   make test  -- same setup with the test extra (and Debian's chromium), then the whole test suite
#   make test-fast -- the same without the tests marked slow
#   make lint  -- ruff check, ruff format --check and mypy on src/ (settings in pyproject.toml)
#   make docs  -- the documentation site (MkDocs), built with --strict into site/
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0

.PHONY: run test test-fast lint format docs docs-serve constraints chromium bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch goes in first, pinned, so that no dependency pulls a CUDA build; everything else at the
# exact versions CI tests (constraints.txt), within the ranges pyproject.toml declares.
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/pergrad train

# the report's screenshot test renders with Debian's chromium; installed when missing (needs root)
chromium:
	@command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

test: lint docs chromium
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src
	$(VENV)/bin/ruff format --check src
	$(VENV)/bin/mypy

# rewrite src/ to the formatter's layout and apply ruff's automatic fixes
format: $(STAMP)
	$(VENV)/bin/ruff check --fix-only src
	$(VENV)/bin/ruff format src

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

# rewrite constraints.txt from what .venv holds (after changing a version in it, or a range)
constraints: $(STAMP)
	{ sed -n '1,/^# Regenerate/p' constraints.txt; \
	  $(PY) -m pip freeze --all --exclude-editable | grep -v -e '^pip==' -e '^pergrad' | sed 's/+cpu$$//'; \
	} > constraints.txt.new && mv constraints.txt.new constraints.txt

# pergrad against torch.func, Opacus and BackPACK on every workload, in the test venv (transformers
# for the llama and vit workloads); writes benchmarks/RESULTS.md and its figures. BackPACK goes in
# without its dependencies: it declares torchvision, whose PyPI wheel (a CUDA build) breaks
# transformers' imports beside the CPU torch, and imports it only in its examples.
bench: $(STAMP)
	$(PY) -m pip install --quiet $(TORCH) -c constraints.txt -e '.[test,bench]'
	$(PY) -m pip install --quiet --no-deps backpack-for-pytorch==1.7.1
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) runs build dist site src/*.egg-info
