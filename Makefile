# G2D trainer: every target runs inside .venv, created by `make setup` (idempotent, keyed on the
# requirements hash). Variables below can be overridden: `make shards OUT=/data/shards MAX_SIDE=512`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
REQ_HASH := $(shell sha256sum requirements.txt | cut -c1-16)
STAMP := $(VENV)/.setup-$(REQ_HASH)
export PYTHONPATH := $(CURDIR)

# Data locations (embedded synthetic defaults).
SYNTH_DIR ?= data/synthetic_mimic
N ?= 400
SEED ?= 0
SIZE ?= 2048
WORKERS ?= $(shell nproc)
# Stored image size: pretraining shards 256 px / q90 (what G2D trains on), downstream shards 512 px /
# q95 (segmentation/detection labels live at that scale). MAX_SIDE= / QUALITY= override either.
PRETRAIN_MAX_SIDE := $(or $(MAX_SIDE),256)
PRETRAIN_QUALITY := $(or $(QUALITY),90)
DOWNSTREAM_MAX_SIDE := $(or $(MAX_SIDE),512)
DOWNSTREAM_QUALITY := $(or $(QUALITY),95)
SHARDS_DIR ?= data/shards/mimic
DOWNSTREAM_SRC ?= data/synthetic_downstream
DOWNSTREAM_SHARDS ?= data/shards/downstream

# Training / eval.
NGPU ?= 1
NNODES ?= 1
NODE_RANK ?= 0
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= 29500
CONFIG ?= configs/pretrain/g2d_paper.yaml
ARGS ?=
TASK ?=
CKPT ?=
FRACTION ?= 1.0
DATA ?= $(DOWNSTREAM_SHARDS)

.PHONY: setup synth shards verify-shards synth-downstream tiny-bert pretrain eval eval-all demo test \
        bench-shards bench-pipeline bench-train clean help

help:
	@echo "make demo | make test | make setup | make synth | make shards | make verify-shards"
	@echo "make pretrain NGPU=8 CONFIG=... ARGS='train.lr=2e-4' | make eval TASK=... | make eval-all"
	@echo "make bench-shards | make bench-pipeline | make bench-train"

setup: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@rm -f $(VENV)/.setup-*
	@touch $@
	@echo "setup: $(VENV) ready (requirements $(REQ_HASH))"

# `make synth OUT=<dir> N=<studies> SEED=<int> SIZE=<longer side>`
synth: setup
	$(PY) -m tools.synth_mimic --out $(or $(OUT),$(SYNTH_DIR)) --n $(N) --seed $(SEED) --size $(SIZE) --workers $(WORKERS)

# `make shards` packs the synthetic corpus (generated if absent);
# `make shards MIMIC=<root> OUT=<dir> [REPORTS=<dir>]` packs a real MIMIC-CXR-JPG root;
# `make shards DATASET=<name> SRC=<root> OUT=<dir>` converts a downstream dataset.
shards: setup
ifdef DATASET
	$(PY) -m tools.pack_downstream --dataset $(DATASET) --src $(or $(SRC),$(DOWNSTREAM_SRC)/$(DATASET)) \
	  --out $(or $(OUT),$(DOWNSTREAM_SHARDS)) --max-side $(DOWNSTREAM_MAX_SIDE) --quality $(DOWNSTREAM_QUALITY) --workers $(WORKERS) --seed $(SEED)
else
	$(PY) -m tools.pack_shards $(if $(MIMIC),--mimic $(MIMIC),--synthetic $(SYNTH_DIR) --synth-n $(N) --synth-size $(SIZE)) \
	  $(if $(REPORTS),--reports $(REPORTS)) --out $(or $(OUT),$(SHARDS_DIR)) --max-side $(PRETRAIN_MAX_SIDE) \
	  --quality $(PRETRAIN_QUALITY) --workers $(WORKERS) --seed $(SEED)
endif

verify-shards: setup
	$(PY) -m tools.verify_shards $(or $(OUT),$(SHARDS_DIR))

synth-downstream: setup
	$(PY) -m tools.synth_downstream --out $(or $(OUT),$(DOWNSTREAM_SRC)) --n $(if $(filter command line,$(origin N)),$(N),120) --seed $(SEED)

tiny-bert: setup
	$(PY) -m tools.make_tiny_bert --shards $(SHARDS_DIR) --out runs/tiny_bert

pretrain: setup
	$(VENV)/bin/torchrun --nproc_per_node=$(NGPU) --nnodes=$(NNODES) --node_rank=$(NODE_RANK) \
	  --master_addr=$(MASTER_ADDR) --master_port=$(MASTER_PORT) -m train.pretrain --config $(CONFIG) $(ARGS)

eval: setup
	$(PY) -m tools.eval --task "$(TASK)" --fraction $(FRACTION) --data $(DATA) $(if $(CKPT),--ckpt $(CKPT)) $(if $(VARIANT),segmentation.variant=$(VARIANT)) $(ARGS)

eval-all: setup
	$(PY) -m tools.eval --task all --fraction $(FRACTION) --data $(DATA) $(if $(CKPT),--ckpt $(CKPT)) $(ARGS)

demo: setup
	$(PY) -m tools.demo

test: setup
	$(PY) -m pytest -q tests

bench-shards: setup
	$(PY) -m tools.bench_shards --workers $(WORKERS)

bench-pipeline: setup
	$(PY) -m tools.bench_pipeline $(if $(SHARDS),--shards $(SHARDS))

bench-train: setup
	$(PY) -m tools.bench_train

clean:
	rm -rf data runs .pytest_cache
