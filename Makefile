# Set-up and entry points. `make demo` and `make test` create .venv when missing and install into it.
# torch is pinned through constraints.txt so a CPU machine never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

export PYSTOW_HOME ?= $(CURDIR)/.cache/pystow
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install chromium azurite demo test test-all test-servers lint bench clean

DEMO_NAME := demo-$(shell date +%Y%m%d-%H%M%S)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,tracking]'
	touch $(STAMP)

install: $(STAMP)

# Chromium renders the report's PNG figures and opens the report in the browser test. Debian's
# package is installed where this user may (root, or sudo without a password); elsewhere both are
# skipped with a note, never an error.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi; \
	  if [ "$$SUDO" != none ] && command -v apt-get >/dev/null 2>&1; then \
	    $$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	    { $$SUDO apt-get update -qq >/dev/null 2>&1 && $$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; } || \
	    echo "note: could not install chromium; PNG figures and the browser test are skipped"; \
	  else echo "note: no chromium and no way to install it; PNG figures and the browser test are skipped"; fi; }

# Azurite, Microsoft's Azure Storage emulator (an npm package), is the Azure Blob server the
# az:// tests start on localhost; installed beside the virtual environment with the machine's
# npm, or skipped with a note (those tests then skip).
AZURITE := $(VENV)/azurite/node_modules/.bin/azurite-blob

$(AZURITE):
	@if command -v npm >/dev/null 2>&1; then \
	  npm install --prefix $(VENV)/azurite --no-audit --no-fund --silent azurite@3.37.0 || \
	  echo "note: could not install Azurite; the az:// tests are skipped"; \
	else echo "note: no npm; Azurite is not installed and the az:// tests are skipped"; fi

azurite: $(STAMP) $(AZURITE)

# A small ablation on UMLS as a Ray Tune experiment on this machine, then its report.
demo: $(STAMP) chromium
	$(BIN)/diffcom data check umls
	$(BIN)/diffcom sweep launch sweeps/studies/demo.yaml --name $(DEMO_NAME) --storage $(CURDIR)/experiments
	$(BIN)/diffcom sweep status $(DEMO_NAME) --storage $(CURDIR)/experiments
	$(BIN)/diffcom report $(CURDIR)/experiments/$(DEMO_NAME) --out $(CURDIR)/reports/$(DEMO_NAME)
	@echo "demo report: $(CURDIR)/reports/$(DEMO_NAME)/report.html"

# The fast tier: everything but the tests that start a Ray cluster, several training processes or
# a browser (those run in `make test-all`, which CI runs). pytest exits non-zero when no test ran.
test: $(STAMP) lint azurite
	$(BIN)/pytest -m "not ray and not torchrun and not browser"

test-all: $(STAMP) lint chromium azurite
	$(BIN)/pytest

# The tests against real servers on localhost (S3-, GCS- and Azure-compatible servers, an SFTP
# server, an MLflow tracking server), Ray's killed-and-resumed study in a bucket included: about
# 3.5 minutes on a 2-core machine.
test-servers: $(STAMP) azurite
	$(BIN)/pytest tests/runstore/test_bucket.py tests/sweeps/test_remote.py \
		tests/sweeps/test_tracking.py tests/sweeps/test_ray_remote.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Each benchmark runs our code and its peer side by side and prints ratios; see BENCHMARKS.md.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_eval.py
	$(BIN)/python benchmarks/bench_inference_k.py --threads 1
	$(BIN)/python benchmarks/bench_scale.py --threads 1
	$(BIN)/python benchmarks/bench_quality.py
	$(BIN)/python benchmarks/bench_sweep.py
	$(BIN)/python benchmarks/bench_fused.py
	$(BIN)/python benchmarks/bench_fused_memory.py
	$(BIN)/python benchmarks/bench_report.py
	$(BIN)/python benchmarks/bench_bucket.py --checkpoint-every 10

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
