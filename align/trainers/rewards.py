"""Rewards as TRL reward functions, for `align grpo` and `align rloo`: TRL's GRPOTrainer and RLOOTrainer call each
with the group's prompts and completions and do the grouping and advantages themselves.

    RewardModelReward(reward_model, reward_tokenizer)   # an `align reward` model, scored as `align ppo` scores it
    TextReward(labeler.score, name="gold")              # any (prompt text, response text) -> float checker

TRL calls a reward function as `f(prompts=..., completions=..., completion_ids=..., trainer_state=..., **columns)`
and reads back one float per completion. In TRL's conversational format a prompt is a list of messages and a
completion is `[{"role": "assistant", "content": text}]`; align's scorers take the user's text and the answer's text,
as PPO hands them (`align.trainers.ppo.PPOTrainer.score`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from accelerate import Accelerator

from align.trainers.ppo_rollout import reward_model_scores


def message_text(item: str | list[dict[str, Any]], role: str) -> str:
    """The text of a TRL prompt or completion: a plain string as is; in the conversational format, the content of
    its last `role` message (the user's question of a prompt, the assistant's answer of a completion)."""
    if isinstance(item, str):
        return item
    for message in reversed(item):
        if message.get("role") == role:
            content = message.get("content")
            return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)
    raise ValueError(f"no {role!r} message in {item!r}")


def texts(prompts: Sequence, completions: Sequence) -> tuple[list[str], list[str]]:
    """(prompt texts, response texts) of what TRL passes to a reward function."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return [message_text(p, "user") for p in prompts], [message_text(c, "assistant") for c in completions]


class RewardModelReward:
    """An `align reward` model (any one-label `*ForSequenceClassification`, the likelihood head included) as a TRL
    reward function: each (prompt, response) scored as `align ppo` scores its rollouts
    (`align.trainers.ppo_rollout.reward_model_scores`: the reward stage's text format, its own tokenizer, minus the
    stored `align_reward_offset`), under the trainer's accelerator (`bind`: its device and autocast)."""

    __name__ = "reward_model"  # TRL logs each reward function under its name (rewards/reward_model/mean)

    def __init__(self, model, tokenizer, *, batch_size: int = 64, accelerator: Accelerator | None = None):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.offset = float(getattr(model.config, "align_reward_offset", 0.0) or 0.0)
        self.model.eval().requires_grad_(False)
        self.accelerator = accelerator

    def bind(self, accelerator: Accelerator) -> None:
        """Score on `accelerator`'s device, under its autocast (the trainer's, once it is built)."""
        self.accelerator = accelerator
        self.model.to(accelerator.device)

    def __call__(self, prompts: Sequence, completions: Sequence, **kwargs: Any) -> list[float]:
        if self.accelerator is None:  # our bug: the stage binds the trainer's accelerator before training
            raise ValueError("RewardModelReward: call bind(accelerator) before scoring")
        ps, rs = texts(prompts, completions)
        return reward_model_scores(self.model, self.tokenizer, ps, rs, format_fn=None, offset=self.offset,
                                   batch_size=self.batch_size, accelerator=self.accelerator).tolist()  # fmt: skip


class TextReward:
    """A `(prompt text, response text) -> float` checker (the tiny world's gold labeler, for RLVR) as a TRL reward
    function, logged under `name`."""

    def __init__(self, score: Callable[[str, str], float], *, name: str):
        self.score, self.__name__ = score, name

    def __call__(self, prompts: Sequence, completions: Sequence, **kwargs: Any) -> list[float]:
        ps, rs = texts(prompts, completions)
        return [float(self.score(p, r)) for p, r in zip(ps, rs, strict=True)]
