"""`align rloo`: optimize the SFT policy with TRL's RLOOTrainer (REINFORCE Leave-One-Out, Ahmadian et al. 2024,
https://arxiv.org/abs/2402.14740): each prompt gets `num_generations` sampled completions, and each completion's
baseline is the mean reward of the others of its prompt; no value model.

    align rloo --config recipes/tiny/rloo.yaml
    align rloo --config recipes/tiny/rloo.yaml --reward_model_path null --reward_funcs gold   # RLVR, a comparison

The reward, prompts, gold evaluation and KL to the SFT model are shared with `align grpo` (`align.stages.online`).
"""

from __future__ import annotations

from pathlib import Path

from trl import RLOOTrainer

from align.config import parse_config
from align.io import stage_lifecycle
from align.stages.online import run_online


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config("rloo", argv)
    run(cfg)
    return 0


@stage_lifecycle
def run(cfg) -> Path:
    return run_online(cfg, "rloo", RLOOTrainer)
