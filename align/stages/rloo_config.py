"""Configuration of `align rloo`: TRL's `RLOOConfig` with its `ModelConfig` (policy and LoRA keys) and
`ScriptArguments` (dataset keys), plus the reward, prompts and gold evaluation it shares with `align grpo`
(`online_config.OnlineStageFields`)."""

from __future__ import annotations

from dataclasses import dataclass

from trl import ModelConfig, RLOOConfig, ScriptArguments

from align.stages.online_config import OnlineStageFields, check_online


@dataclass
class RLOOStageConfig(OnlineStageFields, RLOOConfig, ModelConfig, ScriptArguments):
    """`align rloo`: optimize the SFT policy with TRL's RLOOTrainer (REINFORCE, each completion's baseline the mean
    reward of the other completions of its prompt) against align's reward model, a reward function, or (RLVR, a
    comparison) the gold labeler. TRL's keys as TRL defines them (`beta`: the KL coefficient; `num_generations`;
    `max_completion_length`; `temperature`); changed defaults in `OnlineStageFields`."""

    def __post_init__(self):
        check_online(self, "rloo", RLOOConfig)
