"""Configuration of `align bon`: which policy answers, how many answers the reward model chooses from, and the gold
evaluation that measures the choice.

Best-of-n trains nothing, so, as `align rank`'s, the config is TRL's `ModelConfig` (policy keys) and `ScriptArguments`
(`dataset_name`, which says whether the tiny world's gold labeler and held-out prompts apply) plus the stage's keys.
The gold-evaluation keys are `align ppo`'s, so a recipe that sets them as `recipes/tiny/ppo.yaml` does scores the same
prompts the same way and reuses the SFT stage's stored scores of the parent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments

from align.config import (
    changed_default,
    check_values,
    generation_backend_field,
    gold_eval_dataset_field,
    gold_eval_max_new_tokens_field,
    gold_eval_prompts_field,
    gold_labeler_field,
    model_hub_id_field,
    resolve_model_keys,
    tinyworld_seed_field,
    tokenizer_name_or_path_field,
)
from align.data.sources import DEFAULT_DATASET
from align.errors import AlignError
from align.evaluation.gold import resolved_gold_labeler


@dataclass
class BonConfig(ModelConfig, ScriptArguments):
    """`align bon`: best-of-n at inference, the policy's n sampled answers, the reward model's favourite kept.

    Changed defaults: `dataset_name="tinyworld"` (its held-out prompts and gold labeler), `dtype="auto"`.
    """

    # Changed defaults
    dataset_name: str | None = changed_default(ScriptArguments, "dataset_name", DEFAULT_DATASET)
    dtype: str | None = changed_default(ModelConfig, "dtype", "auto")
    # Models
    reward_model_path: str | None = field(
        default=None,
        metadata={
            "help": "The reward model that picks: an `align reward` output dir (or any "
            "AutoModelForSequenceClassification with one label and its own tokenizer), scored as `align score` and "
            "PPO score it (its `align_reward_offset` subtracted; the pick does not depend on it)."
        },
    )
    tokenizer_name_or_path: str | None = tokenizer_name_or_path_field()
    model_hub_id: str | None = model_hub_id_field()
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom modeling code from the model repos. Off unless you ask."}
    )
    # Best-of-n
    best_of_n: int = field(
        default=4,
        metadata={
            "help": "n: answers sampled per prompt, of which the reward model keeps the highest scored (the first of "
            "tied ones). 1 = the policy sampled, no choice. Costs n times the sampling of one answer."
        },
    )
    temperature: float = field(
        default=1.0,
        metadata={
            "help": "Sampling temperature of the n answers. 1 samples the policy itself, which the KL bound "
            "(kl_to_parent) is relative to."
        },
    )
    generation_batch_size: int = field(
        default=8,
        metadata={
            "help": "Prompts per generate() call; each yields best_of_n x max(gold_eval_samples, 1) answers, so "
            "lower it for a large n. The samples are saved after each call, and a rerun resumes from them."
        },
    )
    generation_backend: str = generation_backend_field()
    per_device_eval_batch_size: int = field(
        default=64,
        metadata={
            "help": "Prompts per generate() call when the parent's gold scores must be computed (not stored by its "
            "SFT stage), and pairs per reward-model batch."
        },
    )
    # Gold evaluation (as `align ppo`)
    tinyworld_seed: int = tinyworld_seed_field()
    gold_eval_prompts: int = gold_eval_prompts_field(
        "Best-of-n answers here; the parent answers greedily. 0 is refused."
    )
    gold_labeler: str | None = gold_labeler_field()
    gold_eval_dataset: str | None = gold_eval_dataset_field()
    gold_eval_max_new_tokens: int = gold_eval_max_new_tokens_field()
    # Not gold_eval_samples_field(): here the key counts best-of-n choices per prompt, not sampled answers.
    gold_eval_samples: int = field(
        default=4,
        metadata={
            "help": "Independent best-of-n choices per prompt, each prompt scored by their mean (as the other stages "
            "score gold_eval_samples sampled answers); the parent's sampled score is taken the same way "
            "(gold_score_sampled of the SFT stage, reused). 0 = one choice and no sampled comparison."
        },
    )
    # Output
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where the policy's files, bon_config.json, best_of_n.jsonl and align_stage.json go."},
    )
    seed: int = field(default=42, metadata={"help": "Seed of the sampling."})
    use_cpu: bool = field(default=False, metadata={"help": "Sample and score on the CPU even when a GPU is present."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the finished stage to the Hub (a model repo)."})
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repo for push_to_hub (default: the output dir's name)."}
    )
    hub_private_repo: bool | None = field(default=None, metadata={"help": "Create the Hub repo private."})

    def __post_init__(self):
        check_values(self)  # ranges: align.config.VALUE_RULES (best_of_n >= 1, temperature > 0, ...)
        resolve_model_keys(self)
        errors = []
        if not self.output_dir:
            errors.append("output_dir is not set; add `output_dir: runs/<name>/bon` to the recipe")
        if not self.model_name_or_path:
            errors.append("model_name_or_path is not set; point it at the policy (the SFT stage, e.g. runs/tiny/sft)")
        if not self.reward_model_path:
            errors.append("reward_model_path is not set; point it at an `align reward` output (e.g. runs/tiny/reward)")
        if self.gold_eval_prompts == 0:
            errors.append("gold_eval_prompts is 0; best-of-n is measured on held-out prompts, e.g. 200")
        else:
            try:  # the gold evaluation is the stage's whole output: without a labeler there is nothing to measure
                if resolved_gold_labeler(self) is None:
                    errors.append(f"dataset_name {self.dataset_name!r} has no gold labeler; set gold_labeler: "
                                  "module:function and gold_eval_dataset: FILE (a 'prompt' column)")  # fmt: skip
            except AlignError as e:
                errors.append(str(e).rstrip("."))
        if errors:
            raise ValueError("bon: " + "; ".join(errors) + ".")
        self.output_dir = os.fspath(self.output_dir)
        ModelConfig.__post_init__(self)
