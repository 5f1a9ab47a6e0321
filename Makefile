# BraTSEnsemble: `make demo` (set up, then segment the demo case) and `make test` (set up, then the test suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

# torch first (a CPU wheel), then the project and its test and server extras under constraints.txt, which pins that torch:
# nnunetv2 -> dynamic-network-architectures -> timm -> torchvision would otherwise pull a CUDA torch of ~6 GB.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -c constraints.txt -e ".[test,server,cluster]"
	$(PY) -c "import torch, nnunetv2, cc3d, SimpleITK, slicerio, ray; print('installed: torch', torch.__version__)"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/brats-ensemble demo -o demo-output --overwrite

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo-output .pytest_cache
