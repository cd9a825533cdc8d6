"""Configuration of `align grpo`: TRL's `GRPOConfig` with its `ModelConfig` (policy and LoRA keys) and
`ScriptArguments` (dataset keys), plus the reward, prompts and gold evaluation it shares with `align rloo`
(`online_config.OnlineStageFields`)."""

from __future__ import annotations

from dataclasses import dataclass

from trl import GRPOConfig, ModelConfig, ScriptArguments

from align.stages.online_config import OnlineStageFields, check_online


@dataclass
class GRPOStageConfig(OnlineStageFields, GRPOConfig, ModelConfig, ScriptArguments):
    """`align grpo`: optimize the SFT policy with TRL's GRPOTrainer against align's reward model, a reward function,
    or (RLVR, a comparison) the gold labeler. TRL's keys as TRL defines them (`beta`: the KL coefficient, 0 = no
    reference model; `num_generations` completions per prompt; `max_completion_length`; `temperature`; `loss_type`;
    `scale_rewards`); changed defaults in `OnlineStageFields`."""

    def __post_init__(self):
        check_online(self, "grpo", GRPOConfig)
