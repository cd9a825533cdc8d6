"""Configuration of `align rank`: which policy samples, how many responses per prompt, and who ranks them.

There is no trainer here, so the config is TRL's `ModelConfig` (policy keys) and `ScriptArguments` (dataset keys) plus
the sampling and labeling keys; sampling keys reuse the names TRL's online trainers use (`num_generations`,
`temperature`, `top_p`, `top_k`, `max_new_tokens`, `generation_batch_size`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments

from align.config import (
    changed_default,
    check_values,
    column_mapping_field,
    generation_backend_field,
    json_dict,
    model_hub_id_field,
    resolve_model_keys,
    tinyworld_seed_field,
)
from align.data.sources import DEFAULT_DATASET
from align.data.tinyworld import GOLD


@dataclass
class RankConfig(ModelConfig, ScriptArguments):
    """`align rank`: sample K responses per prompt from a policy and rank them (InstructGPT step 2, the data).

    Changed defaults: `dataset_name="tinyworld"` (train-split instruction prompts, disjoint from the held-out prompts
    every stage's gold evaluation uses), `dtype="auto"`.
    """

    # Changed defaults
    dataset_name: str | None = changed_default(ScriptArguments, "dataset_name", DEFAULT_DATASET)
    dtype: str | None = changed_default(ModelConfig, "dtype", "auto")
    # Model
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to sample with (default: the policy's own, model_name_or_path)."}
    )
    model_hub_id: str | None = model_hub_id_field()
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom modeling code from the model repo. Off unless you ask."}
    )
    # Data
    dataset_column_mapping: dict | str | None = column_mapping_field()
    num_prompts: int | None = field(
        default=None,
        metadata={
            "help": "Prompts to rank: how many tiny-world prompts to generate (default 512), or the first N rows of "
            "your prompts file (default: all rows)."
        },
    )
    tinyworld_seed: int = tinyworld_seed_field()
    # Sampling
    num_generations: int = field(
        default=4, metadata={"help": "K: responses sampled per prompt and ranked together (InstructGPT: 4 to 9)."}
    )
    max_new_tokens: int = field(default=48, metadata={"help": "Longest response, in tokens."})
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature (> 0: the K responses must differ to be ranked)."}
    )
    top_p: float = field(
        default=1.0, metadata={"help": "Nucleus sampling: keep the smallest set of tokens of mass p."}
    )
    top_k: int = field(default=0, metadata={"help": "Keep only the k most likely tokens; 0 = no top-k filtering."})
    generation_batch_size: int = field(
        default=32, metadata={"help": "Prompts per generate() call; each yields num_generations sequences."}
    )
    generation_backend: str = generation_backend_field(
        ": each prompt computed once for its K answers, ended answers leave the batch"
    )
    # Labeler
    labeler: str = field(
        default=GOLD,
        metadata={
            "help": "Who ranks the K responses: 'gold' (the tiny-world gold labeler), 'package.module:function' or "
            "'path/to/file.py:function' (called as function(prompt, responses) -> K scores, higher = better), or a "
            "reward model dir / Hub id "
            "(align reward output or any num_labels=1 sequence classifier). Equal scores are ties. For human "
            "labelers use `align rank export` and `align rank import`."
        },
    )
    labeler_noise: float = field(
        default=0.0,
        metadata={
            "help": "Std of Gaussian noise added to each labeler score before ranking, to model labeler "
            "disagreement (gold scores lie in [0, 1]; 0.2 gives about InstructGPT's inter-labeler agreement, 0.73: "
            "docs/measurements.md). Identical responses get the same draw, so they stay tied. 0 = exact."
        },
    )
    labeler_batch_size: int = field(default=64, metadata={"help": "Responses per batch when a reward model ranks."})
    # Output
    output_dir: str | None = field(
        default=None, metadata={"help": "Where rankings.jsonl, dataset/ and align_stage.json are written."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of sampling and of the labeler noise."})
    use_cpu: bool = field(default=False, metadata={"help": "Sample on the CPU even when a GPU is present."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the finished rankings to the Hub (a dataset)."})
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repo for push_to_hub (default: the output dir's name)."}
    )
    hub_private_repo: bool | None = field(default=None, metadata={"help": "Create the Hub repo private."})

    def __post_init__(self):
        check_values(self)  # ranges: align.config.VALUE_RULES (num_generations >= 2, 0 < top_p <= 1, ...)
        resolve_model_keys(self)  # `package:` references -> paths, model_hub_id checked
        self.dataset_column_mapping = json_dict(self.dataset_column_mapping, "dataset_column_mapping")
        if not self.output_dir:
            raise ValueError("output_dir is not set; add `output_dir: runs/<name>/rank` to the recipe.")
        self.output_dir = os.fspath(self.output_dir)
        ModelConfig.__post_init__(self)
