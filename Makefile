# Two commands for a fresh machine: `make demo` (the tiny chain) and `make test` (the test suite).
# GPU users: `make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`, or any torch.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.align-installed

.PHONY: demo test test-slow lint bench clean

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

clean:
	rm -rf runs .pytest_cache
