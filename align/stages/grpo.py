"""`align grpo`: optimize the SFT policy with TRL's GRPOTrainer (Shao et al. 2024, https://arxiv.org/abs/2402.03300):
each prompt gets `num_generations` sampled completions, scored by the reward, and each completion's advantage is its
reward against its group's (TRL: mean, scaled per `scale_rewards`); no value model.

    align grpo --config recipes/tiny/grpo.yaml
    align grpo --config recipes/tiny/grpo.yaml --reward_funcs my_rewards.py:length_penalty
    align grpo --config recipes/tiny/grpo.yaml --reward_model_path null --reward_funcs gold   # RLVR, a comparison

The reward, prompts, gold evaluation and KL to the SFT model are shared with `align rloo` (`align.stages.online`).
"""

from __future__ import annotations

from pathlib import Path

from trl import GRPOTrainer

from align.config import parse_config
from align.io import stage_lifecycle
from align.stages.online import run_online


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config("grpo", argv)
    run(cfg)
    return 0


@stage_lifecycle
def run(cfg) -> Path:
    return run_online(cfg, "grpo", GRPOTrainer)
