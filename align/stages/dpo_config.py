"""Configuration of `align dpo`: TRL's `DPOConfig` (its loss and `beta` keys untouched) with TRL's `ModelConfig` (model
and LoRA keys) and `ScriptArguments` (dataset keys), plus how rankings become pairs and the gold evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DPOConfig, ModelConfig, ScriptArguments

from align.config import (
    changed_default,
    column_mapping_field,
    generation_backend_field,
    gold_eval_dataset_field,
    gold_eval_max_new_tokens_field,
    gold_eval_prompts_field,
    gold_eval_samples_field,
    gold_eval_temperature_field,
    gold_labeler_field,
    merge_adapter_field,
    model_hub_id_field,
    post_init_common,
    resolve_auto_bf16,
    tinyworld_seed_field,
    tokenizer_name_or_path_field,
)
from align.data.rankings import PAIR_MODES

# The `loss_type` values DPOTrainer 1.16 computes (its `DPOConfig.loss_type` help lists the same; a test checks that).
# Checked here so a misspelt loss is one line before any work, not an error at the first training step.
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")  # fmt: skip


@dataclass
class DPOStageConfig(DPOConfig, ModelConfig, ScriptArguments):
    """`align dpo`: direct preference optimization on pairs from align's rankings, TRL's DPOTrainer underneath.

    Changed defaults: `report_to="none"`, `save_total_limit=2`, `dtype="auto"`, `gradient_checkpointing` unset = off
    (TRL turns it on; small models do not need it, GPU recipes set it), `bf16` = auto (on where the hardware has fast
    bf16: a CUDA GPU, or a CPU with AMX/avx512_bf16), `dataset_test_size=0.1` (the reward stage's: with the same `seed`
    DPO trains on the same ranked groups as the reward model). `dataset_name` has no default: an `align rank` output
    dir, a rankings file `{prompt, responses, ranking}` or a pairs file `{prompt, chosen, rejected}`.
    """

    # Changed defaults
    report_to: None | str | list[str] = changed_default(DPOConfig, "report_to", "none")
    save_total_limit: int | None = changed_default(DPOConfig, "save_total_limit", 2)
    dtype: str | None = changed_default(ModelConfig, "dtype", "auto")
    # None (not False): TRL sets True, transformers 5 renamed it; None lets either name work, unset = off.
    gradient_checkpointing: bool | None = changed_default(DPOConfig, "gradient_checkpointing", None)
    bf16: bool | None = changed_default(DPOConfig, "bf16", None)
    # Model
    tokenizer_name_or_path: str | None = tokenizer_name_or_path_field()
    model_hub_id: str | None = model_hub_id_field()
    merge_adapter: bool = merge_adapter_field()
    # Data
    ranking_pairs: str = field(
        default="all",
        metadata={
            "help": "Which chosen/rejected pairs a ranked group of K gives: 'all' (every pair with a strict "
            "preference, up to C(K,2)), 'best_vs_rest' (the best answer against each lower one, K-1) or 'adjacent' "
            "(each answer against the next lower rank, K-1). Tied answers are never a pair with each other "
            "(align.data.rankings.ranking_pairs). Held-out groups always give 'all' pairs, for eval metrics that "
            "compare across modes.",
            "choices": list(PAIR_MODES),
        },
    )
    pairs_per_group: int | None = field(
        default=None,
        metadata={
            "help": "Keep at most this many of each training group's pairs (after ranking_pairs), drawn with `seed`. "
            "A compute budget for large K ('all' gives C(K,2) a group: 36 at K = 9) that keeps every prompt: "
            "1 gives one pair per group. Empty: every pair."
        },
    )
    dataset_column_mapping: dict | str | None = column_mapping_field()
    dataset_test_size: float = field(
        default=0.1,
        metadata={
            "help": "When the data has no `dataset_test_split`, hold out this fraction (< 1) or number (>= 1) of "
            "ranked groups (split as `align reward` splits them: with its seed and size, the same groups) for "
            "eval_loss and eval_rewards/accuracies. 0: train on every group."
        },
    )
    tinyworld_seed: int = tinyworld_seed_field()
    # Evaluation
    gold_eval_prompts: int = gold_eval_prompts_field(
        "0 = off. Decoding: eval_temperature. The KL to the reference (kl_to_parent) is measured on them too."
    )
    gold_labeler: str | None = gold_labeler_field()
    gold_eval_dataset: str | None = gold_eval_dataset_field()
    gold_eval_max_new_tokens: int = gold_eval_max_new_tokens_field()
    eval_temperature: float = gold_eval_temperature_field()
    gold_eval_samples: int = gold_eval_samples_field()
    generation_backend: str = generation_backend_field(
        " for the gold evaluation's answers, as align ppo and align bon with the same key, so the parent's cached "
        "evaluation serves them all; DPO itself generates nothing"
    )

    def __post_init__(self):
        resolve_auto_bf16(self)
        losses = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type or [])
        errors = []
        if not self.dataset_name:
            errors.append("dataset_name is not set; point it at an `align rank` output (e.g. runs/tiny/rank), a "
                          "rankings file {prompt, responses, ranking} or a pairs file "
                          "{prompt, chosen, rejected}")  # fmt: skip
        if not self.model_name_or_path:
            errors.append("model_name_or_path is not set; point it at the SFT stage (e.g. runs/tiny/sft) or a model")
        if self.ranking_pairs not in PAIR_MODES:
            errors.append(f"ranking_pairs {self.ranking_pairs!r}; use one of {', '.join(PAIR_MODES)}")
        if unknown := [t for t in losses if t not in DPO_LOSS_TYPES]:
            errors.append(f"loss_type {', '.join(map(repr, unknown))} is not a DPOTrainer loss; use one or more of "
                          f"{', '.join(DPO_LOSS_TYPES)}")  # fmt: skip
        if not losses:
            errors.append("loss_type is empty; use e.g. sigmoid (DPO) or ipo")
        if not self.beta > 0:
            errors.append(f"beta {self.beta} must be > 0: it scales the log-ratios against the reference (DPO's "
                          "strength of the KL leash), e.g. 0.1")  # fmt: skip
        if self.merge_adapter and not self.use_peft:
            errors.append("merge_adapter: true needs use_peft: true (there is no adapter to merge)")
        if (self.load_in_4bit or self.load_in_8bit) and not self.use_peft:
            errors.append("load_in_4bit/8bit (QLoRA) trains adapters only; set use_peft: true")
        if self.sync_ref_model and self.use_peft:
            errors.append("sync_ref_model with use_peft: the reference is the model with its adapters off, there is "
                          "no reference copy to sync (TRL does not support it); set one of them")  # fmt: skip
        if self.gold_eval_dataset and not self.gold_labeler:
            errors.append(f"gold_eval_dataset {self.gold_eval_dataset!r} is set but no gold_labeler scores the "
                          "answers; set gold_labeler: module:function (e.g. align.data.verifiable:score)")  # fmt: skip
        if errors:
            raise ValueError("dpo: " + "; ".join(errors) + ".")
        post_init_common(self, DPOConfig)
