# feddiff: two entry points, both idempotent.
#   make demo  -> set up, then train the quickstart (FedAvg, 5 clients, Fashion-MNIST, embedded simulator)
#   make test  -> set up, then run the test suite (what CI runs)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.feddiff-installed
FLOWER_STAMP := $(VENV)/.feddiff-flower-installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: demo test setup flower data browser bench-quick clean-venv

demo: setup data
	$(VENV)/bin/feddiff run configs/quickstart.toml

test: setup flower data browser
	$(VPY) -m pytest -q

setup: $(STAMP)

# torch first (the local CPU wheel), then everything else under a constraint that keeps it at 2.13.0.
$(STAMP): pyproject.toml constraints.txt setup.py src/feddiff/compress/_copycrc.c
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "feddiff needs Python >= 3.11, found " + sys.version.split()[0])'
	@if [ ! -x $(VPY) ]; then \
	  $(PYTHON) -m venv $(VENV) || { \
	    if [ "$$(id -u)" = 0 ]; then apt-get install -y -q python3-venv || { apt-get update -q && apt-get install -y -q python3-venv; }; \
	      rm -rf $(VENV); $(PYTHON) -m venv $(VENV); \
	    else echo "error: '$(PYTHON) -m venv' failed; install Debian's python3-venv (sudo apt-get install python3-venv)"; exit 1; fi; }; \
	fi
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	@rm -f src/feddiff/compress/_copycrc.*.so  # (a failed rebuild of the optional extension must not leave the old one)
	$(VPY) -m pip install -q -c constraints.txt -e ".[test]"
	@$(VPY) -c 'import torch; assert torch.__version__.startswith("2.13.0"), torch.__version__'
	@touch $@

# The Flower engine's optional extra (feddiff[flower]): the tests run real Flower deployments on loopback;
# `make demo` does not need it.
flower: $(FLOWER_STAMP)

$(FLOWER_STAMP): $(STAMP)
	$(VPY) -m pip install -q -c constraints.txt -e ".[test,flower]"
	@$(VPY) -c 'import torch; assert torch.__version__.startswith("2.13.0"), torch.__version__'
	@touch $@

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (IDX files); nothing is downloaded at run time.
data:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }; \
	  else \
	    echo "error: $(FMNIST_DIR) is missing. Install it with: sudo apt-get install dataset-fashion-mnist"; exit 1; \
	  fi; \
	fi

# Headless Chromium renders a test report (tests marked `browser`); best effort, tried once per venv:
# without it those tests skip.
BROWSER_STAMP := $(VENV)/.feddiff-browser-tried
browser: $(BROWSER_STAMP)

$(BROWSER_STAMP): | setup
	@if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y -q chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium >/dev/null; } \
	      || echo "note: chromium could not be installed; the report's browser check will be skipped"; \
	  else \
	    echo "note: no chromium; the report's browser check will be skipped (sudo apt-get install chromium)"; \
	  fi; \
	fi
	@touch $@

bench-quick: setup data
	@for b in bench/*.py; do echo "== $$b"; $(VPY) $$b --quick || exit 1; done

clean-venv:
	rm -rf $(VENV)
