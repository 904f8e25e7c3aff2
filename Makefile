# Two commands do all setup on a fresh machine:
#   make run   -- create .venv if missing, install, run the main job
#   make test  -- same setup with the test extra (and Debian's chromium), then the whole test suite
#   make test-fast -- the same without the tests marked slow
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0

.PHONY: run test test-fast chromium bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch goes in first, pinned, so that no dependency pulls a CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/pergrad train

# the report's screenshot test renders with Debian's chromium; installed when missing (needs root)
chromium:
	@command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

test: $(STAMP) chromium
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# pergrad against torch.func, Opacus and BackPACK on every workload, in the test venv (transformers
# for the llama and vit workloads); writes benchmarks/RESULTS.md and its figures. BackPACK goes in
# without its dependencies: it declares torchvision, whose PyPI wheel (a CUDA build) breaks
# transformers' imports beside the CPU torch, and imports it only in its examples.
bench: $(STAMP)
	$(PY) -m pip install --quiet $(TORCH) -e '.[test,bench]'
	$(PY) -m pip install --quiet --no-deps backpack-for-pytorch==1.7.1
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info
