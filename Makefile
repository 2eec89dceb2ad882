# Two commands a user needs: `make run` and `make test`. Everything else is their plumbing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= node.yaml
# Debian packages the integration tests drive for real: dcmtk (storescu/storescp/echoscu, with TLS),
# orthanc (a real PACS), dicom3tools (dciodvfy), chromium (headless, renders the status page).
APT_PACKAGES := dcmtk orthanc dicom3tools chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install install-test apt-test-deps run test lint typecheck unit bench clean train

install: $(VENV)/.install-stamp

$(VENV)/.install-stamp: pyproject.toml
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/pip install -q --disable-pip-version-check -e .
	touch $@

install-test: $(VENV)/.test-stamp

$(VENV)/.test-stamp: $(VENV)/.install-stamp
	# torch first, pinned, so nothing below resolves a CUDA build.
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

apt-test-deps:
	@missing=""; \
	command -v /usr/bin/storescu >/dev/null || missing="$$missing dcmtk"; \
	command -v /usr/sbin/Orthanc >/dev/null || missing="$$missing orthanc"; \
	command -v /usr/bin/dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

run: install
	$(BIN)/dicom-node serve --config $(CONFIG)

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install-test
	$(BIN)/mypy

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: install-test apt-test-deps lint typecheck
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

unit: install-test
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

# Every script under bench/, each printing its table and its ratio against the reference it names.
bench: install-test apt-test-deps
	@set -e; for script in bench/*.py; do echo "== $$script"; $(BIN)/python $$script; done

# Retrain the bundled model from scratch: recipe v1 as the base, then fine-tuned on the five training backgrounds
# (CPU, 2 cores: about 96 min on an Intel Xeon with AVX-512; about 3.7 h estimated on an AVX2 AMD EPYC, over 120 min;
# TRAIN_ARGS='--recipe v2-scratch' is the earlier 46 / 108 min recipe): models/training/README.md.
SEED ?= 0
train: install
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[train]'
	$(BIN)/python models/training/train.py --seed $(SEED) --out models/training/runs/seed$(SEED) $(TRAIN_ARGS)

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
