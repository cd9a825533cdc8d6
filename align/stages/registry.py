"""One record per stage: everything the CLI, config parsing, `align_stage.json`, the chain, the chain's summary line,
the run report and the Hub cards need to know about a stage, in one place.

    from align.stages.registry import Stage, register

    register(Stage(name="dpo", help="direct preference optimization", entry="my_pkg.dpo",
                   config="my_pkg.dpo_config:DPOStageConfig", parents={"model_name_or_path": "sft"}))

A record names its code by string (`entry` module, `config` as "module:Class"), imported on first use: this module
imports no stage module, torch or transformers, so `align --help` stays instant. For the same reason a record crosses
a process boundary as JSON: `align run` starts each stage as its own `python -m align <stage>` process and hands it
the stages registered in its own process (a plugin, a test) through the `ALIGN_STAGES` environment variable
(`child_env`), so a stage registered with one call runs in a chain like the built-in ones.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from align.inspect.copy_probe import FAR, NEAR

ENV = "ALIGN_STAGES"  # JSON list of the records `align run` hands to its stage processes (`child_env`)


@dataclass(frozen=True)
class Stage:
    """What align knows about one stage. Only `name`, `help`, `entry` and `config` are required."""

    name: str  # one word for the command, module, recipe, output subdir and the "stage" of align_stage.json
    help: str  # one line in `align --help`
    entry: str  # module whose `main(argv) -> int` runs the stage (`align <name>`)
    config: str  # its config dataclass, "module:Class"
    # Chain wiring: recipe key -> the stage whose output dir it points at, when that stage is in the chain.
    parents: Mapping[str, str] = field(default_factory=dict)
    # (metric, label) rows of the report's metrics table, in this order, when the stage recorded them.
    metrics: tuple[tuple[str, str], ...] = ()
    headline: tuple[str, ...] = ()  # the few metrics of the chain's summary line, most telling first
    label: str = ""  # how the report names the stage's model ("SFT"); default: the name
    pipeline_tag: str = "text-generation"  # of its Hub model card
    card_tags: tuple[str, ...] = ()  # Hub card tags after "align" and the name
    about: str = ""  # the card's "What this stage did" paragraph
    repo_type: str = "model"  # "dataset": its output dir is data (pushed to a dataset repo, a dataset card)
    # "module:function" called with the command line before `entry` is imported (PPO: an environment variable that
    # torch reads at its first allocation).
    prepare: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "parents", MappingProxyType(dict(self.parents)))
        object.__setattr__(self, "metrics", tuple(tuple(row) for row in self.metrics))
        for name in ("headline", "card_tags"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        rows = [key for key, _ in self.metrics]
        if missing := [key for key in self.headline if key not in rows]:
            raise ValueError(f"stage {self.name}: headline metrics {missing} are not rows of its `metrics`.")
        if self.repo_type not in ("model", "dataset"):
            raise ValueError(f"stage {self.name}: repo_type {self.repo_type!r}; use 'model' or 'dataset'.")
        if ":" not in self.config:
            raise ValueError(f"stage {self.name}: config {self.config!r}; give it as 'module:Class'.")

    @property
    def display(self) -> str:
        """The report's name for the stage's model."""
        return self.label or self.name

    def config_class(self) -> type:
        """The config dataclass, imported now."""
        return _resolve(self.config)

    def main(self, argv: list[str]) -> int:
        """Run `align <name> argv`: the `prepare` hook, then the entry module's `main`, imported now."""
        if self.prepare is not None:
            _resolve(self.prepare)(argv)
        return int(importlib.import_module(self.entry).main(argv) or 0)

    def to_json(self) -> dict[str, Any]:
        """The record as plain JSON values; `Stage(**record)` reads it back."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**out, "parents": dict(self.parents)}


def _resolve(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


_STAGES: dict[str, Stage] = {}
_BUILT_IN: set[str] = set()


def register(stage: Stage) -> Stage:
    """Add `stage` (after the ones registered before it: the chain's order). Registering an equal record again is a
    no-op; another record under a taken name is an error."""
    known = _STAGES.get(stage.name)
    if known is not None and known != stage:
        raise ValueError(f"stage {stage.name!r} is registered already (entry {known.entry}); choose another name.")
    _STAGES[stage.name] = stage
    return stage


def unregister(name: str) -> None:
    """Remove a stage registered with `register` (a test's toy stage); the built-in stages stay."""
    if name in _BUILT_IN:
        raise ValueError(f"stage {name!r} is built in; it cannot be removed.")
    _STAGES.pop(name, None)


def get(name: str) -> Stage:
    """The record of `name`; KeyError naming the registered stages otherwise."""
    try:
        return _STAGES[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; the stages are {', '.join(_STAGES)}") from None


def find(name: Any) -> Stage | None:
    """The record of `name`, or None (a stage dir written by a stage this process does not know)."""
    return _STAGES.get(name) if isinstance(name, str) else None


def names() -> tuple[str, ...]:
    """The registered stages, in chain order."""
    return tuple(_STAGES)


def stages() -> tuple[Stage, ...]:
    return tuple(_STAGES.values())


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) plus `ALIGN_STAGES`, the records registered here beyond the built-in ones, for
    a stage process `align run` starts."""
    out = dict(os.environ if env is None else env)
    extra = [s.to_json() for s in _STAGES.values() if s.name not in _BUILT_IN]
    if extra:
        out[ENV] = json.dumps(extra)
    return out


def _from_env() -> None:
    """Register the records a parent `align run` handed over (`child_env`)."""
    for record in json.loads(os.environ.get(ENV) or "[]"):
        register(Stage(**record))


# ---------------------------------------------------------------------------------------------------------------------
# The built-in stages, in chain order. Paragraphs in the terms of Ouyang et al. 2022 (InstructGPT,
# https://arxiv.org/abs/2203.02155) and Radford et al. 2018 (GPT-1).

# The gold evaluation against the parent, as every stage trained from SFT records it (align.evaluation.compare).
GOLD_ROWS = (
    ("parent_gold_score", "gold score of the parent (SFT)"),
    ("gold_score", "gold score"),
    ("gold_win_rate", "gold win-rate over the parent"),
    ("parent_gold_score_sampled", "gold score of the parent, sampled (temperature 1)"),
    ("gold_score_sampled", "gold score, sampled (temperature 1)"),
    ("gold_win_rate_sampled", "gold win-rate over the parent, sampled"),
)
# GRPO's and RLOO's rows (TRL's online trainers, align/stages/online.py).
ONLINE_ROWS = (
    ("reward", "reward (TRL's mean over the last 10% of steps)"),
    *GOLD_ROWS,
    ("kl_to_parent", "KL to the SFT model (nats per answer, sampled)"),
    ("labels_used", "ranked groups behind the reward model"),
    ("train_runtime", "training time (s)"),
)
ONLINE_REWARD = (
    "The reward is align's reward model (trained from the K-way rankings) unless the recipe's `reward_funcs` say "
    "otherwise; `reward: gold` in align_stage.json means it was trained on the gold labeler it is evaluated with "
    "(RLVR): a comparison, not the headline."
)


_BUILT_IN_STAGES = (
    Stage(
        name="pretrain",
        help="GPT-style generative pretraining (from scratch or continued)",
        entry="align.stages.pretrain",
        config="align.stages.pretrain_config:PretrainConfig",
        metrics=(
            ("eval_loss", "held-out loss (nats/token)"),
            ("entropy_floor", "entropy floor (nats/token)"),
            ("eval_loss_above_floor", "loss above the floor"),
            ("perplexity", "perplexity"),
            ("copy_loss_near", f"copy loss, source within {NEAR} tokens (nats)"),
            ("copy_loss_far", f"copy loss, source {FAR}+ tokens back (nats)"),
            ("tokens_per_second", "training tokens/s"),
        ),
        headline=("eval_loss", "entropy_floor", "perplexity"),
        label="pretrained",
        card_tags=("text-generation", "rlhf", "instructgpt"),
        about=(
            "**Generative pretraining.** A GPT-style decoder is trained with next-token prediction (causal language "
            "modeling) on unlabeled text. InstructGPT starts from a pretrained GPT-3; this stage produces that "
            "starting point, from scratch or by continuing the training of an existing model."
        ),
    ),
    Stage(
        name="sft",
        help="supervised fine-tuning on demonstrations (InstructGPT step 1)",
        entry="align.stages.sft",
        config="align.stages.sft_config:SFTStageConfig",
        parents={"model_name_or_path": "pretrain"},
        metrics=(
            ("eval_loss", "held-out loss"),
            ("parent_gold_score", "gold score of the parent (pretrained)"),
            ("gold_score", "gold score"),
            ("gold_win_rate", "gold win-rate over the parent"),
            ("gold_score_sampled", "gold score, sampled (temperature 1)"),
        ),
        headline=("gold_score", "parent_gold_score", "eval_loss"),
        label="SFT",
        card_tags=("text-generation", "rlhf", "instructgpt"),
        about=(
            "**Supervised fine-tuning (InstructGPT step 1).** The pretrained model is fine-tuned on demonstrations of "
            "the desired behaviour: prompts paired with the responses a labeler wrote for them, with the loss on the "
            "response tokens. The result is the SFT policy, the initial policy for PPO and the sampler for "
            "comparison data."
        ),
    ),
    Stage(
        name="rank",
        help="sample K responses per prompt and rank them (InstructGPT step 2, data)",
        entry="align.stages.rank",
        config="align.stages.rank_config:RankConfig",
        parents={"model_name_or_path": "sft"},
        metrics=(
            ("num_groups", "ranked groups"),
            ("k", "responses per prompt (K)"),
            ("gold_agreement", "pairwise agreement with the gold labeler"),
            ("tie_rate", "tied pairs"),
        ),
        headline=("num_groups", "gold_agreement", "tie_rate"),
        label="rankings",
        card_tags=("rlhf", "instructgpt", "preference", "rankings"),
        about=(
            "**Comparison data (InstructGPT step 2, data).** For each prompt the SFT policy sampled K responses, "
            "which were then ranked from best to worst (by human labelers in InstructGPT; by align's gold labeler in "
            "its tiny world). One ranking of K responses yields K-choose-2 pairwise comparisons for reward-model "
            "training."
        ),
        repo_type="dataset",
    ),
    Stage(
        name="reward",
        help="train a reward model from rankings (InstructGPT step 2)",
        entry="align.stages.reward",
        config="align.stages.reward_config:RewardStageConfig",
        parents={"model_name_or_path": "sft", "dataset_name": "rank"},
        metrics=(
            ("pair_accuracy", "held-out pair accuracy"),
            ("top1_accuracy", "held-out top-1 accuracy"),
            ("kendall_tau", "held-out Kendall tau"),
            ("gold_agreement", "pair accuracy against the gold labeler"),
            ("reward_offset", "reward offset (mean raw score of SFT samples)"),
        ),
        headline=("pair_accuracy", "kendall_tau", "gold_agreement"),
        label="reward model",
        pipeline_tag="text-classification",
        card_tags=("reward-model", "rlhf", "instructgpt"),
        about=(
            "**Reward modeling (InstructGPT step 2).** A transformer with a scalar head, initialized from the SFT "
            "model, is trained on the K-way rankings with the pairwise loss -log sigmoid(r(x, y_w) - r(x, y_l)), "
            "averaged over all K-choose-2 pairs of a prompt, which form one batch element so that the pairs of a "
            "prompt do not overfit. Its output is a scalar reward for a (prompt, response) pair; only differences "
            "between rewards are meaningful."
        ),
    ),
    Stage(
        name="ppo",
        help="optimize the policy against the reward model with PPO (InstructGPT step 3)",
        entry="align.stages.ppo",
        config="align.stages.ppo_config:PPOStageConfig",
        parents={"model_name_or_path": "sft", "reward_model_path": "reward"},
        metrics=(
            ("reward", "reward-model score (last 10% of updates)"),
            ("kl", "KL to the SFT model (last 10% of updates)"),
            ("kl_to_parent", "KL to the SFT model on the held-out prompts (nats per sampled answer)"),
            *GOLD_ROWS,
            ("updates", "PPO updates"),
        ),
        headline=("gold_score", "parent_gold_score", "gold_score_sampled", "reward", "kl"),
        label="PPO",
        card_tags=("text-generation", "rlhf", "instructgpt", "ppo"),
        about=(
            "**Reinforcement learning from feedback (InstructGPT step 3).** The SFT policy is optimized with PPO to "
            "maximize the reward model's score of its responses, with a per-token KL penalty against the SFT model "
            "that keeps the policy close to it and limits over-optimization of the reward model."
        ),
        prepare="align.stages.huge_pages:huge_pages_for_mapped_heap",
    ),
    Stage(
        name="dpo",
        help="direct preference optimization on pairs from the rankings (TRL's DPOTrainer)",
        entry="align.stages.dpo",
        config="align.stages.dpo_config:DPOStageConfig",
        parents={"model_name_or_path": "sft", "dataset_name": "rank"},
        metrics=(
            *GOLD_ROWS,
            ("kl_to_parent", "KL to the SFT model (sampled, nats per answer)"),
            ("eval_rewards/accuracies", "held-out pair accuracy of DPO's implicit reward"),
            ("labels_used", "ranked groups behind it"),
            ("pairs_used", "training pairs"),
            ("pairs_seen", "pairs trained on (steps x batch)"),
            ("train_runtime", "training time (s)"),
        ),
        headline=("gold_score", "parent_gold_score", "gold_score_sampled", "kl_to_parent"),
        label="DPO",
        card_tags=("text-generation", "rlhf", "dpo", "preference"),
        about=(
            "**Direct preference optimization (Rafailov et al. 2023).** Instead of training a reward model and "
            "running PPO against it, the SFT model is trained directly on chosen/rejected pairs taken from the same "
            "K-way rankings the reward model learns from: the loss raises the log-probability ratio to the frozen "
            "SFT model (the reference) of each chosen answer over its rejected one, scaled by beta, which plays the "
            "part of PPO's KL penalty."
        ),
    ),
    Stage(
        name="grpo",
        help="optimize the policy with GRPO (TRL's GRPOTrainer) against the reward model or a reward function",
        entry="align.stages.grpo",
        config="align.stages.grpo_config:GRPOStageConfig",
        parents={"model_name_or_path": "sft", "reward_model_path": "reward"},
        metrics=ONLINE_ROWS,
        headline=("gold_score", "parent_gold_score", "gold_score_sampled", "kl_to_parent"),
        label="GRPO",
        card_tags=("text-generation", "rlhf", "grpo"),
        about=(
            "**Group Relative Policy Optimization (TRL's GRPOTrainer).** The SFT policy samples several answers per "
            "prompt; each answer's advantage is its reward against the mean of its group, so no value model is "
            "trained. " + ONLINE_REWARD
        ),
    ),
    Stage(
        name="rloo",
        help="optimize the policy with RLOO (TRL's RLOOTrainer) against the reward model or a reward function",
        entry="align.stages.rloo",
        config="align.stages.rloo_config:RLOOStageConfig",
        parents={"model_name_or_path": "sft", "reward_model_path": "reward"},
        metrics=ONLINE_ROWS,
        headline=("gold_score", "parent_gold_score", "gold_score_sampled", "kl_to_parent"),
        label="RLOO",
        card_tags=("text-generation", "rlhf", "rloo"),
        about=(
            "**REINFORCE Leave-One-Out (TRL's RLOOTrainer).** The SFT policy samples several answers per prompt; each "
            "answer's baseline is the mean reward of the other answers to its prompt, so no value model is trained. "
            + ONLINE_REWARD
        ),
    ),
    Stage(
        name="bon",
        help="best-of-n at inference: the reward model picks the best of n sampled answers (no training)",
        entry="align.stages.bon",
        config="align.stages.bon_config:BonConfig",
        parents={"model_name_or_path": "sft", "reward_model_path": "reward"},
        metrics=(
            ("best_of_n", "answers per prompt (n)"),
            ("parent_gold_score", "gold score of the parent (SFT), greedy"),
            ("parent_gold_score_sampled", "gold score of the parent, sampled (temperature 1)"),
            ("gold_score", "gold score of the reward model's pick"),
            ("gold_score_random", "gold score of a random pick (the policy sampled)"),
            ("gold_score_oracle", "gold score of the gold-best of the n (upper bound)"),
            ("oracle_gap_closed", "share of the random-to-oracle gap the pick closes"),
            ("gold_win_rate", "gold win-rate over the parent's greedy answers"),
            ("gold_win_rate_sampled", "gold win-rate over the parent's sampled answers"),
            ("kl_to_parent", "KL to the policy, bound log n - (n-1)/n (nats; temperature 1 only)"),
            ("labels_used", "ranked groups behind the reward model"),
        ),
        headline=("gold_score", "gold_score_random", "gold_score_oracle", "kl_to_parent"),
        label="best-of-n",
        card_tags=("text-generation", "rlhf", "best-of-n", "reward-model"),
        about=(
            "**Best-of-n sampling (rejection sampling with a reward model).** Nothing is trained: the policy (its "
            "files are copied here, so this dir loads as the policy) samples n answers per prompt and the reward "
            "model named in `bon_config.json` keeps the highest scored. Inference therefore needs both models and n "
            "samples per answer. It is the baseline RLHF methods are compared with at equal KL (Stiennon et al. "
            "2020, Gao et al. 2023): its KL to the policy is at most log n - (n-1)/n nats."
        ),
    ),
    Stage(
        name="classify",
        help="GPT-1 discriminative fine-tuning: a causal LM becomes a text classifier",
        entry="align.stages.classify",
        config="align.stages.classify_config:ClassifyStageConfig",
        parents={"model_name_or_path": "pretrain"},  # GPT-1: discriminative fine-tuning of the pretrained model
        metrics=(
            ("accuracy", "held-out accuracy"),
            ("majority_accuracy", "held-out accuracy of the majority class"),
            ("f1", "held-out F1"),
            ("matthews_correlation", "held-out Matthews correlation"),
            ("eval_loss", "held-out classification loss (nats)"),
        ),
        headline=("accuracy", "f1", "matthews_correlation"),
        label="classifier",
        pipeline_tag="text-classification",
        card_tags=("text-classification", "gpt-1", "instructgpt"),
        about=(
            "**Discriminative fine-tuning (GPT-1, Radford et al. 2018).** The pretrained decoder gets a linear head "
            "read at a new extract token; inputs are built with GPT-1's transformations (start, delimiter and "
            "extract tokens, stored in the tokenizer), and the language-modeling loss on the inputs is kept as an "
            "auxiliary objective (L3 = L2 + lambda * L1)."
        ),
    ),
)

for _stage in _BUILT_IN_STAGES:
    register(_stage)
    _BUILT_IN.add(_stage.name)
_from_env()
