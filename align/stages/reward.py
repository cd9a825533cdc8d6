"""`align reward`: train a reward model on K-way rankings (InstructGPT step 2), with align's RankingRewardTrainer.

    align reward --config recipes/tiny/reward.yaml
    align reward --config recipes/own-data/reward.yaml --dataset_name data/rankings.jsonl --model_name_or_path DIR
    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml -m align reward --config RECIPE

The model is `AutoModelForSequenceClassification(num_labels=1)` from `model_name_or_path`: by default the SFT GPT
with a new scalar head (GPT-1's discriminative fine-tuning), or any model with its own tokenizer, which is saved
with it; scoring always formats text with the reward model's own tokenizer and chat template (`format_for_reward`).
An encoder (BERT-like, `align.models.modeling.is_encoder`) keeps its tokenizer as is and reads the tokenizer's sentence
pair instead, `[CLS] prompt [SEP] response [SEP]` (`encode_for_reward`); the stage logs which format it uses.
With `likelihood_features` the model is a `LikelihoodRewardModel` (align.models.modeling_reward): the same head
plus learned
weights on its own LM's mean/min log-probability of the response's tokens.

Data: an `align rank` output dir (its `dataset/`, else `rankings.jsonl`; recorded as the data's parent stage), a
rankings file `{prompt, responses, ranking}`, a pairs file `{prompt, chosen, rejected[, margin]}` (the K = 2 case), a
save_to_disk dir or a Hub id. Every row is checked before any work; errors name file:row.

After training the reward is normalized as InstructGPT did (Sec. 3.5): the mean raw score of the held-out groups'
responses (SFT samples when the data comes from `align rank` on the SFT model) is stored as
`config.align_reward_offset`, so `align.trainers.reward.score` and `align score` center SFT samples at 0.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, set_seed
from trl import get_peft_config

from align.config import log_config, parse_config
from align.data import load as dl
from align.data import sources, tinyworld
from align.data.rankings import parse_ranking_row, ranking_pairs, reward_format
from align.errors import AlignError
from align.io import (
    parent_of,
    read_stage_info,
    save_trained,
    stage_lifecycle,
)
from align.models import modeling
from align.models.modeling_reward import MODEL_TYPE, LikelihoodRewardModel
from align.rl.ranking import pair_accuracy, pair_mask
from align.stages.lifecycle import finish_stage, hold_push, train_stage, wait_for_everyone
from align.trainers.reward import RankingRewardTrainer, score

logger = logging.getLogger(__name__)

RANK_FILE = "rankings.jsonl"
RANK_DATASET = "dataset"
# Held-out metrics stored without Trainer's `eval_` prefix (the chain summary reads these names); `eval_loss` and
# `eval_pair_accuracy` are kept as Trainer names them too.
EVAL_METRICS = ("pair_accuracy", "top1_accuracy", "kendall_tau")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config("reward", argv)
    run(cfg)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Data


def _resolve_source(name: str) -> tuple[str, dict[str, Any] | None]:
    """(what to load, the rank stage's lineage entry or None) for `dataset_name`."""
    info = read_stage_info(name) if Path(name).is_dir() else None
    if info is None:
        return name, None
    if info.get("stage") != "rank":
        raise AlignError(
            f"dataset_name {name}: an align '{info.get('stage')}' stage, not rankings. Point it at the output of "
            "`align rank` (e.g. runs/tiny/rank) or at a rankings/pairs file."
        )
    parent = {"stage": "rank", "path": str(Path(name).resolve())}
    for candidate in (Path(name) / RANK_DATASET, Path(name) / RANK_FILE):
        if candidate.exists():
            return str(candidate), {**parent, "info": info}
    raise AlignError(f"dataset_name {name}: a rank stage without {RANK_DATASET}/ or {RANK_FILE}. Rerun `align rank`.")


def _validate(ds, source: str) -> int:
    """Check every row (before splitting, so errors name the row of the file); returns the number of pairs."""
    columns = ds.column_names
    if "prompt" not in columns or not ({"responses", "chosen"} & set(columns)):
        raise AlignError(
            f"{source}: needs columns prompt + responses + ranking (rankings) or prompt + chosen + rejected (pairs); "
            f"the columns are {', '.join(columns)}. Rename yours with dataset_column_mapping."
        )
    pairs, start = 0, 0
    line = dl.source_rows(ds)
    for batch in ds.iter(batch_size=1000):
        n = len(batch["prompt"])
        for j in range(n):
            row = {c: batch[c][j] for c in columns}
            _, responses, ranks, _ = parse_ranking_row(row, where=f"{source}:{line(start + j)}")
            pairs += sum(a < b for a in ranks for b in ranks)
        start += n
    return pairs


def load_reward_data(cfg) -> tuple[Any, Any, dict[str, Any], dict[str, Any] | None]:
    """Train groups, held-out groups (or None), the lineage entry, and the rank stage the data came from (or None)."""
    source, rank_parent = _resolve_source(cfg.dataset_name)
    dd = dl.load_data(source, config=cfg.dataset_config)
    if cfg.dataset_column_mapping:
        dd = dl.apply_column_mapping(dd, cfg.dataset_column_mapping, source=source)
    pairs = {}
    for split, part in dd.items():
        where = source if split == cfg.dataset_train_split and len(dd) == 1 else f"{source}[{split}]"
        pairs[split] = _validate(part, where)
    train, test = dl.train_test(
        dd,
        train_split=cfg.dataset_train_split,
        test_split=cfg.dataset_test_split,
        test_size=cfg.dataset_test_size,
        seed=cfg.seed,
        source=source,
    )
    info: dict[str, Any] = {"name": cfg.dataset_name, "config": cfg.dataset_config, "fingerprint": train._fingerprint,
                            "rows": len(train), "eval_rows": len(test) if test is not None else 0,
                            "pairs": sum(pairs.values())}  # fmt: skip
    return train, test, info, rank_parent


# ---------------------------------------------------------------------------------------------------------------------
# Model


def load_model_and_tokenizer(cfg):
    """Scalar-head model (a new head on a causal LM or an encoder, or an existing reward model) and its own
    tokenizer."""
    tokenizer = modeling.load_tokenizer(
        cfg.tokenizer_name_or_path or cfg.model_name_or_path,
        revision=cfg.model_revision,
        trust_remote_code=cfg.trust_remote_code,
    )
    if cfg.likelihood_features:
        return _likelihood_model(cfg, tokenizer), tokenizer
    # model_init_kwargs (TRL's key): more from_pretrained keywords, config overrides included; e.g.
    # {num_hidden_layers: 15} keeps the first 15 layers, whose last-token states ranked SmolLM2's answers better
    # than the last layer's (docs/measurements.md), at half the cost.
    kwargs = {"num_labels": 1, "revision": cfg.model_revision, "dtype": cfg.dtype or "auto",
              "trust_remote_code": cfg.trust_remote_code, "attn_implementation": cfg.attn_implementation,
              **(cfg.model_init_kwargs or {})}  # fmt: skip
    model = modeling.load_pretrained(AutoModelForSequenceClassification, cfg.model_name_or_path,
                                     what="it as a sequence-classification model", **kwargs)  # fmt: skip
    if not modeling.is_encoder(model.config, tokenizer):
        # The chat template is what separates prompt from response at scoring time; PPO and `align score` read it
        # from the saved reward dir, so a tokenizer without one gets align's (and the embeddings grow to its tokens).
        # An encoder reads the pair encoding instead (`encode_for_reward`): its tokenizer is kept as it is.
        modeling.ensure_chat_template(tokenizer, model)
    logger.info("reward: %s formats (prompt, response) as %s.", cfg.model_name_or_path,
                reward_format(tokenizer, modeling.is_encoder(model.config, tokenizer)))  # fmt: skip
    # A sequence-classification model reads the score at the last non-pad token: it must know the pad id.
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _likelihood_model(cfg, tokenizer):
    """`LikelihoodRewardModel` on the causal LM at `model_name_or_path` (or that model itself, trained further)."""
    kwargs = {"revision": cfg.model_revision, "trust_remote_code": cfg.trust_remote_code}
    path = cfg.model_name_or_path
    config = modeling.load_pretrained(AutoConfig, path, what="a model config", **kwargs)
    if modeling.is_encoder(config, tokenizer):
        # Known here first (the config is the first thing read): an encoder has no LM head to read likelihoods from.
        raise AlignError(
            f"{path}: likelihood_features need a causal LM (its LM head scores the response's tokens), and this is "
            f"a {config.model_type} encoder ({', '.join(config.architectures or []) or 'no architectures'}). Drop "
            "likelihood_features to train it with a scalar head, or start from a causal LM (e.g. the SFT stage)."
        )
    try:
        if config.model_type == MODEL_TYPE:
            if list(config.likelihood_features) != list(cfg.likelihood_features):
                raise AlignError(
                    f"{path}: a likelihood reward model with features {config.likelihood_features}, "
                    f"not {cfg.likelihood_features}; set likelihood_features to match, or start from a causal LM."
                )
            model = modeling.load_pretrained(LikelihoodRewardModel, path, what="a likelihood reward model",
                                             dtype=cfg.dtype or "auto", **kwargs)  # fmt: skip
        else:
            if any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
                raise ValueError(f"it is a {config.architectures[0]}, whose LM head is gone")
            lm = modeling.load_causal_lm(path, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation, **kwargs)
            modeling.ensure_chat_template(tokenizer, lm)
            model = LikelihoodRewardModel.from_causal_lm(
                lm, features=cfg.likelihood_features, response_marker=modeling.generation_marker(tokenizer),
                likelihood_init=cfg.likelihood_init,
            )  # fmt: skip
    except (OSError, ValueError) as e:
        raise AlignError(
            f"{cfg.model_name_or_path}: likelihood_features need a causal LM with its LM head (e.g. the SFT stage) "
            f"and this is not one ({modeling.first_line(e)}). {modeling.where_fix(cfg.model_name_or_path)}"
        ) from e
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Held-out metrics


def _flat(groups) -> tuple[list[str], list[str], list[int]]:
    """(prompts, responses, group sizes) of valid ranked groups."""
    prompts, responses, sizes = [], [], []
    for i, row in enumerate(groups):
        prompt, rs, _, _ = parse_ranking_row(row, where=f"row {i + 1}")
        prompts += [prompt] * len(rs)
        responses += rs
        sizes.append(len(rs))
    return prompts, responses, sizes


def _grid(values: list[float], sizes: list[int], fill: float):
    """Flat per-response values -> `(G, K_max)` tensor, `fill` where a group has fewer responses."""
    out = torch.full((len(sizes), max(sizes)), fill, dtype=torch.float)
    at = 0
    for g, k in enumerate(sizes):
        out[g, :k] = torch.tensor(values[at : at + k], dtype=torch.float)
        at += k
    return out


def gold_ranks(scores):
    """`(G, K)` ranks (0 = best, equal scores share a rank, -1 where absent) from `(G, K)` gold scores (nan absent)."""
    present = ~torch.isnan(scores)
    # rank = number of present responses that score strictly higher: ties share it, order is all pair_mask needs
    higher = (scores.unsqueeze(1) > scores.unsqueeze(2)) & present.unsqueeze(1)
    ranks = higher.sum(-1)
    return torch.where(present, ranks, torch.full_like(ranks, -1))


def heldout_metrics(model, tokenizer, groups, *, gold: bool | None, batch_size: int, max_length: int | None):
    """Raw scores of every held-out response -> reward offset and, on tiny world, gold agreement.

    Returns `(metrics, extra)`: `reward_offset` (mean raw score), `gold_agreement` (pair accuracy against the gold
    labeler's ranking of the same responses; gold ties are not pairs) when `gold` (None: when the prompts are
    tiny-world prompts), and `extra` with counts for align_stage.json.
    """
    prompts, responses, sizes = _flat(groups)
    raw = score(model, tokenizer, prompts, responses, batch_size=batch_size, offset=0.0, max_length=max_length)
    metrics = {"reward_offset": raw.mean().item()}
    extra: dict[str, Any] = {"reward_offset_samples": len(responses)}
    if gold is None:
        gold = sources.gold_prompts(prompts)
    if gold:
        gold_scores = [tinyworld.score(p, r) for p, r in zip(prompts, responses, strict=True)]
        ranks = gold_ranks(_grid(gold_scores, sizes, float("nan")))
        rewards = _grid(raw.tolist(), sizes, float("nan"))
        metrics["gold_agreement"] = pair_accuracy(rewards, ranks).item()
        extra["gold_pairs"] = int(pair_mask(ranks).sum())
    return metrics, extra


# ---------------------------------------------------------------------------------------------------------------------
# Stage


@stage_lifecycle
def run(cfg) -> Path:
    set_seed(cfg.seed)
    log_config(cfg)
    output_dir = Path(cfg.output_dir)

    # ---- Data: ranked groups (train, held-out), as pairs when asked
    train_ds, eval_ds, data_info, rank_parent = load_reward_data(cfg)
    train_groups = train_ds
    if cfg.ranking_as_pairs:
        # each group's C(K,2) non-tied pairs, margins kept, as pair-only trainers see the same labels
        train_ds = ranking_pairs(train_ds, "all").remove_columns("group")
        data_info["train_pairs_as_rows"] = len(train_ds)
    if eval_ds is None and cfg.eval_strategy != "no":
        cfg.eval_strategy = "no"

    # ---- Model
    model, tokenizer = load_model_and_tokenizer(cfg)
    peft_config = get_peft_config(cfg)
    _log_setup(cfg, model, peft_config, train_groups, train_ds, eval_ds)

    # ---- Train
    push_to_hub = hold_push(cfg)
    trainer = RankingRewardTrainer(
        model=model,
        args=cfg,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    metrics: dict[str, Any] = train_stage(trainer, cfg)[1]
    extra: dict[str, Any] = {}

    # ---- Evaluate: Trainer's eval metrics, then held-out ranking metrics and the reward offset (main process)
    if eval_ds is not None:
        ev = trainer.evaluate()
        metrics["eval_loss"] = ev["eval_loss"]
        metrics["eval_pair_accuracy"] = ev["eval_pair_accuracy"]
        metrics.update({k: ev[f"eval_{k}"] for k in EVAL_METRICS})
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.is_world_process_zero():
        extra.update(evaluate_and_normalize(unwrapped, tokenizer, cfg, metrics, eval_ds, train_groups))

    # ---- Save
    # A LoRA reward model is saved merged (PPO, `align score` and the Hub load the dir as a plain reward model), its
    # adapter and score head in output_dir/adapter.
    save_trained(trainer, output_dir, merge_adapter=peft_config is not None)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(output_dir)
        lineage = data_lineage(rank_parent, metrics)
        finish_stage(
            output_dir,
            "reward",
            cfg,
            push_to_hub,
            parent=parent_of(cfg.model_name_or_path, cfg.model_hub_id),
            data=data_info,
            metrics={k: float(v) for k, v in metrics.items()},
            log_history=trainer.state.log_history,
            num_processes=trainer.accelerator.num_processes,
            peft={"adapter": peft_config is not None, "merged": peft_config is not None},
            **lineage,
            **extra,
        )
        logger.info("reward: wrote %s", output_dir)
    wait_for_everyone()
    return output_dir


def _log_setup(cfg, model, peft_config, train_groups, train_ds, eval_ds) -> None:
    total, _ = modeling.count_parameters(model)
    logger.info(
        "reward: %s (%.2fM parameters, %s%s), %d train groups%s / %d held-out groups, %s loss, batch %d x %d accum x "
        "%d processes, %s",
        cfg.model_name_or_path,
        total / 1e6,
        type(model).__name__,
        f", LoRA r={cfg.lora_r}" if peft_config else "",
        len(train_groups),
        f" as {len(train_ds)} pairs" if cfg.ranking_as_pairs else "",
        len(eval_ds) if eval_ds is not None else 0,
        cfg.ranking_loss,
        cfg.per_device_train_batch_size,
        cfg.gradient_accumulation_steps,
        cfg.world_size,
        modeling.precision_summary(cfg),
    )


def evaluate_and_normalize(model, tokenizer, cfg, metrics: dict[str, Any], eval_ds, train_groups) -> dict[str, Any]:
    """Held-out metrics into `metrics`, and the reward offset into the model's config; returns the extra keys of
    align_stage.json.

    Normalize (InstructGPT Sec. 3.5): SFT samples score 0 on average. The held-out groups' responses are SFT samples
    when the data comes from `align rank` on the SFT model; without held-out groups, the train groups'."""
    held, held_extra = heldout_metrics(
        model,
        tokenizer,
        eval_ds if eval_ds is not None else train_groups,
        gold=cfg.gold_eval,
        batch_size=cfg.per_device_eval_batch_size,
        max_length=cfg.max_length,
    )
    metrics.update(held)
    extra = {**held_extra, "reward_offset_source": "held-out groups" if eval_ds is not None else "train groups"}
    model.config.align_reward_offset = held["reward_offset"]
    if cfg.max_length is not None:
        model.config.align_reward_max_length = cfg.max_length
    logger.info(
        "Held-out: pair accuracy %s, gold agreement %s, Kendall tau %s; reward offset %.4f (mean raw score of %d "
        "responses, now stored in config.align_reward_offset).",
        *(f"{metrics[k]:.4f}" if k in metrics else "n/a" for k in ("pair_accuracy", "gold_agreement",
                                                                    "kendall_tau")),
        held["reward_offset"],
        held_extra["reward_offset_samples"],
    )  # fmt: skip
    return extra


def data_lineage(rank_parent: dict[str, Any] | None, metrics: dict[str, Any]) -> dict[str, Any]:
    """The rank stage the data came from (`data_parent`); its labeler's gold agreement goes into `metrics`."""
    lineage = {}
    if rank_parent is not None:
        lineage["data_parent"] = {"stage": "rank", "path": rank_parent["path"]}
        rank_metrics = rank_parent["info"].get("metrics") or {}
        if "gold_agreement" in rank_metrics:
            metrics["labeler_gold_agreement"] = rank_metrics["gold_agreement"]
    return lineage
