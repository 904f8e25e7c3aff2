# Two commands do all setup on a fresh machine:
#   make run   -- create .venv if missing, install, run the main job
#   make test  -- same setup with the test extra, then the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0

.PHONY: run test bench clean

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

test: $(STAMP)
	$(PY) -m pytest -q

# pergrad against torch.func, Opacus and BackPACK; writes benchmarks/RESULTS.md and its figures.
# Its own venv: BackPACK needs torchvision, whose PyPI wheel (a CUDA build) breaks transformers'
# imports beside the CPU torch, so it stays out of the test venv. The transformers workloads
# (llama, vit) run in the test venv: .venv/bin/python benchmarks/run.py --workloads llama vit
BENCH := .venv-bench
bench:
	test -x $(BENCH)/bin/python || $(PYTHON) -m venv $(BENCH)
	$(BENCH)/bin/python -m pip install --quiet $(TORCH)
	$(BENCH)/bin/python -m pip install --quiet $(TORCH) -e '.[bench]'
	$(BENCH)/bin/python benchmarks/run.py

clean:
	rm -rf $(VENV) $(BENCH) runs build src/*.egg-info
