"""Compare a trained model with its parent on the gold labeler's held-out prompts (`align sft`, `align ppo`).

A stage opens with `start_stage` (seed, the labeler and prompts, the logged config), scores its parent with
`score_parent` before training (the model trains in place), and after training calls `compare_to_parent`: the same
prompts and decoding for both, so the scores compare directly, and per prompt (win-rates). The parent's scores can
come from its own stage: `align sft` stores them, and `align ppo` reuses them when they were made with the same
prompts, labeler and decoding (else from a cache of earlier runs, `gold.cached_gold_eval`, else computed).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from transformers import set_seed

from align.config import config_class, log_config
from align.evaluation import gold
from align.evaluation.gold import SAMPLED_TEMPERATURE, GoldLabeler, gold_eval, gold_setup, win_rate
from align.io import read_stage_info

logger = logging.getLogger(__name__)

# What makes two stages' gold evaluations comparable, as recipe keys (with the decoding: temperature or samples).
RECIPE_KEYS = ("dataset_name", "tinyworld_seed", "gold_eval_prompts", "gold_eval_max_new_tokens", "gold_labeler",
               "gold_eval_dataset")  # fmt: skip


@dataclass(frozen=True)
class GoldSettings:
    """A stage's gold evaluation: the labeler, its held-out prompts and how answers are decoded.

    temperature: of the main pass (0 = greedy); samples: also that many answers per prompt at SAMPLED_TEMPERATURE
    (0 = off); generation_backend: the stage's (`align` decodes with align's loop); recipe: the `RECIPE_KEYS` as the
    recipe set them, to match a parent stage's.
    """

    labeler: GoldLabeler
    prompts: list[str]
    max_new_tokens: int
    temperature: float
    samples: int
    batch_size: int
    seed: int
    generation_backend: str | None = None
    recipe: dict[str, Any] = dataclasses.field(default_factory=dict)

    def evaluate(self, model, tokenizer, samples: int = 0) -> dict[str, Any]:
        """`gold.gold_eval` of `model` at `temperature`, or `samples` answers per prompt at SAMPLED_TEMPERATURE."""
        return gold_eval(model, tokenizer, self.prompts, max_new_tokens=self.max_new_tokens,
                         temperature=SAMPLED_TEMPERATURE if samples else self.temperature, batch_size=self.batch_size,
                         samples_per_prompt=max(samples, 1), seed=self.seed, labeler=self.labeler,
                         backend="align" if self.generation_backend == "align" else "transformers")  # fmt: skip


def start_stage(cfg, *, temperature: float):
    """The opening `align sft` and `align ppo` share: `set_seed(cfg.seed)`, the gold labeler and held-out prompts
    (first: a bad gold_labeler or gold_eval_dataset is one line, before any work), the resolved config logged.
    Returns the stage's `GoldSettings` (decoding its main pass at `temperature`), or None without a gold eval."""
    set_seed(cfg.seed)
    spec = gold_setup(cfg)
    log_config(cfg)
    if spec is None:
        return None
    labeler, prompts = spec
    return GoldSettings(labeler, prompts, max_new_tokens=cfg.gold_eval_max_new_tokens, temperature=temperature,
                        samples=cfg.gold_eval_samples, batch_size=cfg.per_device_eval_batch_size, seed=cfg.seed,
                        generation_backend=getattr(cfg, "generation_backend", None),
                        recipe={k: getattr(cfg, k) for k in RECIPE_KEYS})  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# The parent


@dataclass
class ParentScores:
    """The parent's per-prompt gold scores, greedy (or at the stage's temperature) and, when asked, sampled; pass
    rates and answers when known; where they came from (a file, the cache, or "computed")."""

    scores: list[float]
    pass_rates: dict[str, float] | None = None
    responses: list[str] | None = None
    source: str = "computed"
    sampled: list[float] | None = None
    sampled_source: str | None = None

    @property
    def score(self) -> float:
        return sum(self.scores) / len(self.scores)


def score_parent(gold_settings: GoldSettings, model, tokenizer, *, parent: str, reuse: bool = False,
                 sampled: bool = False) -> ParentScores:  # fmt: skip
    """The parent's gold scores on the held-out prompts, taken before training (the model trains in place).

    parent: the parent's path or Hub id (`model_name_or_path`). reuse: read them from the parent's align_stage.json
    (an `align sft` stage with the same prompts, labeler and decoding) or the gold-eval cache, else compute them
    (through the cache); without it they are computed. sampled: also `samples` sampled answers per prompt.
    """

    def scores(samples: int = 0) -> dict[str, Any]:
        if reuse:
            return stored_parent_scores(gold_settings, model, tokenizer, parent, samples)
        return {**gold_settings.evaluate(model, tokenizer, samples), "source": "computed"}

    greedy = scores()
    out = ParentScores([float(s) for s in greedy["gold_scores"]], greedy["gold_pass_rates"], greedy["responses"],
                       greedy["source"])  # fmt: skip
    logger.info("Parent model (%s): gold score %.4f (%s).", parent, out.score, out.source)
    if sampled and gold_settings.samples:
        more = scores(gold_settings.samples)
        out.sampled, out.sampled_source = more["gold_scores"], more["source"]
        logger.info("Parent model: gold score sampled (%d per prompt) %.4f (%s).", gold_settings.samples,
                    sum(out.sampled) / len(gold_settings.prompts), out.sampled_source)  # fmt: skip
    return out


def parent_gold_settings(info: dict[str, Any] | None) -> dict[str, Any] | None:
    """The SFT stage's gold-eval settings (its recipe over `align sft`'s defaults), or None if it has no gold score."""
    if not info or "gold_score" not in (info.get("metrics") or {}) or info.get("stage") != "sft":
        return None
    defaults = {f.name: f.default for f in dataclasses.fields(config_class("sft"))}
    recipe = info.get("recipe") or {}
    keys = (*RECIPE_KEYS, "gold_eval_temperature", "gold_eval_samples")
    return {k: recipe.get(k, defaults[k]) for k in keys}


def _same_setting(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def stored_parent_scores(gold_settings: GoldSettings, model, tokenizer, parent: str, samples: int = 0):
    """The parent's per-prompt gold scores (greedy, or `samples` per prompt): read from the SFT stage when it used
    the same prompts, labeler and decoding, else from the cache or computed now. Returns `{"gold_scores",
    "gold_pass_rates" (per constraint), "responses" (the first answer per prompt), "source"}`; pass rates and
    responses are None when the SFT stage did not store them."""
    prompts = gold_settings.prompts
    info = read_stage_info(parent)
    settings = parent_gold_settings(info)
    ours = dict(gold_settings.recipe)
    ours.update({"gold_eval_samples": samples} if samples else {"gold_eval_temperature": gold_settings.temperature})
    key = "gold_scores_sampled" if samples else "gold_scores"
    if settings is not None and all(_same_setting(settings[k], v) for k, v in ours.items()):
        if len(info.get(key) or []) == len(prompts):
            greedy = not samples
            return {"gold_scores": [float(s) for s in info[key]],
                    "gold_pass_rates": info.get("gold_pass_rates") if greedy else None,
                    "responses": info.get("gold_responses") if greedy else None,
                    "source": f"{parent}/align_stage.json"}  # fmt: skip
    if settings is not None:
        logger.info("ppo: the SFT stage's gold eval used other settings (%s); scoring the parent again.", settings)

    def compute() -> dict[str, Any]:
        result = gold_settings.evaluate(model, tokenizer, samples)
        return {"gold_scores": [float(s) for s in result["gold_scores"]],
                "gold_pass_rates": result["gold_pass_rates"], "responses": result["responses"]}  # fmt: skip

    # The same model, prompts and decoding on a rerun (a recipe tuned around a fixed parent): read it back
    key = parent_cache_key(gold_settings, model, parent, ours)
    result, source = gold.cached_gold_eval(key, compute)
    return {**result, "source": source}


def parent_cache_key(gold_settings: GoldSettings, model, parent: str, settings: dict[str, Any]) -> dict | None:
    """The gold-eval cache key of the parent's evaluation under `settings` (the recipe keys and the decoding), or
    None for a parent without a local fingerprint (a Hub id). With the prompts file and the labeler named outright,
    the training data (dataset_name, tinyworld_seed) does not enter the evaluation and is left out of the key, so
    stages trained on other data (PPO's prompts, DPO's rankings) share the parent's evaluation."""
    fingerprint = gold.model_fingerprint(parent)
    if fingerprint is None:
        return None
    if settings.get("gold_eval_dataset") and settings.get("gold_labeler"):
        settings = {k: v for k, v in settings.items() if k not in ("dataset_name", "tinyworld_seed")}
    name = getattr(gold_settings.labeler, "name", None)
    return {"model": fingerprint, "prompts": gold_settings.prompts, "settings": settings, "seed": gold_settings.seed,
            "dtype": str(model.dtype), "batch_size": gold_settings.batch_size,
            "backend": gold_settings.generation_backend, "labeler": name,
            "labeler_source": gold.source_digest(name)}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# The comparison


@dataclass
class Comparison:
    """What `compare_to_parent` found: `parent_metrics` (parent_gold_score, parent_gold_score_sampled), `metrics`
    (gold_score, gold_win_rate and their sampled twins) and `extra`, the per-prompt fields of align_stage.json."""

    parent_metrics: dict[str, float]
    metrics: dict[str, float]
    extra: dict[str, Any]


def compare_to_parent(gold_settings: GoldSettings, parent: ParentScores, model, tokenizer, *, answers: bool = False,
                      samples_key: str = "samples") -> Comparison:  # fmt: skip
    """Score the trained `model` as `parent` was scored and compare them: gold score and per-prompt win-rate (ties
    half a win), greedy and, with `samples`, sampled (its win-rate when the parent was sampled too).

    answers: also keep the greedy answers of both and the answers each pass rate is over (`gold_responses`,
    `parent_gold_responses`, `gold_pass_counts`), to audit the scores. samples_key: where the first few scored
    answers go (`align ppo` keeps its rollout samples under `samples`).
    """
    this = gold_settings.evaluate(model, tokenizer)
    parent_metrics = {"parent_gold_score": parent.score}
    metrics = {"gold_score": this["gold_score"], "gold_win_rate": win_rate(this["gold_scores"], parent.scores)}
    extra: dict[str, Any] = {"gold_labeler": gold_settings.labeler.name, "parent_gold_scores": parent.scores}
    if parent.pass_rates is not None:
        extra["parent_gold_pass_rates"] = parent.pass_rates
    if answers and parent.responses is not None:
        extra["parent_gold_responses"] = parent.responses
    if parent.sampled is not None:
        parent_metrics["parent_gold_score_sampled"] = sum(parent.sampled) / len(gold_settings.prompts)
        extra["parent_gold_scores_sampled"] = parent.sampled
    extra["gold_pass_rates"] = this["gold_pass_rates"]
    if answers:
        extra["gold_pass_counts"] = this["gold_pass_counts"]
    extra["gold_scores"] = this["gold_scores"]
    if answers:
        extra["gold_responses"] = this["responses"]
    extra[samples_key] = this["samples"]
    if gold_settings.samples:
        sampled = gold_settings.evaluate(model, tokenizer, gold_settings.samples)
        metrics["gold_score_sampled"] = sampled["gold_score"]
        extra["gold_scores_sampled"] = sampled["gold_scores"]
        if parent.sampled is not None:
            metrics["gold_win_rate_sampled"] = win_rate(sampled["gold_scores"], parent.sampled)
        logger.info("Gold score sampled (%d per prompt, temperature %g): %.4f%s.", gold_settings.samples,
                    SAMPLED_TEMPERATURE, sampled["gold_score"],
                    "" if parent.sampled is None else f" (parent {parent_metrics['parent_gold_score_sampled']:.4f}), "
                    f"win-rate over it {metrics['gold_win_rate_sampled']:.3f}")  # fmt: skip
    logger.info("Gold score on %d held-out prompts: %.4f (parent %.4f); win-rate over the parent %.3f.",
                len(gold_settings.prompts), this["gold_score"], parent.score, metrics["gold_win_rate"])  # fmt: skip
    return Comparison(parent_metrics, metrics, extra)
