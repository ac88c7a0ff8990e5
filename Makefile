# MedM-VL for 3D Slicer. Two commands: `make demo` and `make test` (each sets everything up).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# Where a machine without a GPU and without a local torch wheel gets the CPU-only build.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
EXTRAS ?= train,viewer,eval,dev
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# UTF-8 text I/O whatever the machine's locale (Qt sets the process locale from the environment)
export PYTHONUTF8 := 1

.PHONY: setup demo test docs bench clean help

help:
	@echo "make demo   - set up and run the demo on the embedded model"
	@echo "make test   - set up and run the whole test suite"
	@echo "make docs   - build the documentation site strictly into site/"
	@echo "make bench  - run the CPU benchmarks under bench/"

$(STAMP): pyproject.toml scripts/install_torch.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	TORCH_VERSION=$(TORCH_VERSION) TORCH_CPU_INDEX=$(TORCH_CPU_INDEX) bash scripts/install_torch.sh $(PY)
	$(PIP) install -q -e ".[$(EXTRAS)]"
	bash scripts/setup_test_data.sh $(PY)
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/medmvl demo

test: setup
	$(PY) -m pytest -q -p no:cacheprovider
	$(MAKE) --no-print-directory docs

# --strict: a broken link or anchor, or a page missing from mkdocs.yml's nav, fails the build.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .venv-slicer site
