"""Configuration of `RankingRewardTrainer`: TRL's RewardConfig plus the one choice K-way rankings add."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import RewardConfig

from align.config import (
    check_values,
)

RANKING_LOSSES = ("pairwise", "plackett_luce")


@dataclass
class RankingRewardConfig(RewardConfig):
    """`trl.RewardConfig` for reward models trained on K-way rankings (InstructGPT step 2).

    Reused unchanged from TRL: `max_length`, `center_rewards_coefficient` (generalized to K: mean over a group's pairs
    of (r_w + r_l)^2, equal to TRL's term for K = 2), `disable_dropout`, `pad_to_multiple_of`, and every
    `TrainingArguments` key. Differences on purpose:
    - `max_length`: TRL drops pairs longer than `max_length`; we keep the row and cut the prompt's start (the
      response's end, where the score is read, survives), warning once with the count.
    - Like every TRL config, `gradient_checkpointing` defaults to True and `bf16` to True unless `fp16` is set; on a
      CPU without native bf16 set `bf16: false` (emulated bf16 was measured ~15x slower than fp32).
    """

    ranking_loss: str = field(
        default="pairwise",
        metadata={
            "help": "Loss over each ranked group: 'pairwise' (InstructGPT: mean over the group's C(K,2) non-tied "
            "pairs of -log sigmoid(r_w - r_l - margin)) or 'plackett_luce' (listwise negative log-likelihood of the "
            "ranking, ties by Breslow's approximation; ignores `margin`).",
            "choices": list(RANKING_LOSSES),
        },
    )

    score_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the reward head (`score`, the new linear layer on the last token), in a "
            "parameter group of its own; None: `learning_rate`. The head starts at random while LoRA starts as the "
            "identity: at a LoRA rate (~2e-4) and a few hundred ranked groups the head barely moves from its random "
            "start (docs/measurements.md, SmolLM2 on the short task).",
        },
    )

    def __post_init__(self):
        check_values(self)
        super().__post_init__()
        if self.ranking_loss not in RANKING_LOSSES:
            raise ValueError(
                f"ranking_loss={self.ranking_loss!r} is not a known loss; choose one of {', '.join(RANKING_LOSSES)}."
            )
