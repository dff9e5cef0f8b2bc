# Set-up and entry points. `make demo` and `make test` create .venv when missing and install into it.
# torch is pinned through constraints.txt so a CPU machine never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

export PYSTOW_HOME ?= $(CURDIR)/.cache/pystow
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/diffcom data check umls
	$(BIN)/diffcom data check synthetic
	$(BIN)/diffcom train --config core/configs/demo.yaml --out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP) lint
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Each benchmark runs our code and its peer side by side and prints ratios; see BENCHMARKS.md.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_eval.py
	$(BIN)/python benchmarks/bench_inference_k.py --threads 1
	$(BIN)/python benchmarks/bench_scale.py --threads 1
	$(BIN)/python benchmarks/bench_quality.py

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
