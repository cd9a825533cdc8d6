"""What each stage's headline metrics are called, in one place: the run report's metrics table (`report.py`),
the chain's one-line summary after each stage (`align/chain.py`) and the numbers on the Hub cards (`align/hub/card.py`)
read it. The metrics themselves are the `metrics` of each stage's `align_stage.json`.
"""

from __future__ import annotations

from typing import Any

from align.inspect.copy_probe import FAR, NEAR

# Stage -> (metric, label) rows of the report's metrics table, in this order, when present.
TABLE: dict[str, list[tuple[str, str]]] = {
    "pretrain": [
        ("eval_loss", "held-out loss (nats/token)"),
        ("entropy_floor", "entropy floor (nats/token)"),
        ("eval_loss_above_floor", "loss above the floor"),
        ("perplexity", "perplexity"),
        ("copy_loss_near", f"copy loss, source within {NEAR} tokens (nats)"),
        ("copy_loss_far", f"copy loss, source {FAR}+ tokens back (nats)"),
        ("tokens_per_second", "training tokens/s"),
    ],
    "sft": [
        ("eval_loss", "held-out loss"),
        ("parent_gold_score", "gold score of the parent (pretrained)"),
        ("gold_score", "gold score"),
        ("gold_win_rate", "gold win-rate over the parent"),
        ("gold_score_sampled", "gold score, sampled (temperature 1)"),
    ],
    "rank": [
        ("num_groups", "ranked groups"),
        ("k", "responses per prompt (K)"),
        ("gold_agreement", "pairwise agreement with the gold labeler"),
        ("tie_rate", "tied pairs"),
    ],
    "reward": [
        ("pair_accuracy", "held-out pair accuracy"),
        ("top1_accuracy", "held-out top-1 accuracy"),
        ("kendall_tau", "held-out Kendall tau"),
        ("gold_agreement", "pair accuracy against the gold labeler"),
        ("reward_offset", "reward offset (mean raw score of SFT samples)"),
    ],
    "ppo": [
        ("reward", "reward-model score (last 10% of updates)"),
        ("kl", "KL to the SFT model (last 10% of updates)"),
        ("parent_gold_score", "gold score of the parent (SFT)"),
        ("gold_score", "gold score"),
        ("gold_win_rate", "gold win-rate over the parent"),
        ("parent_gold_score_sampled", "gold score of the parent, sampled (temperature 1)"),
        ("gold_score_sampled", "gold score, sampled (temperature 1)"),
        ("gold_win_rate_sampled", "gold win-rate over the parent, sampled"),
        ("updates", "PPO updates"),
    ],
    "classify": [
        ("accuracy", "held-out accuracy"),
        ("majority_accuracy", "held-out accuracy of the majority class"),
        ("f1", "held-out F1"),
        ("matthews_correlation", "held-out Matthews correlation"),
        ("eval_loss", "held-out classification loss (nats)"),
    ],
}
# Stage -> the few metrics of the chain's summary line, most telling first; each is a row of TABLE.
HEADLINE: dict[str, tuple[str, ...]] = {
    "pretrain": ("eval_loss", "entropy_floor", "perplexity"),
    "sft": ("gold_score", "parent_gold_score", "eval_loss"),
    "rank": ("num_groups", "gold_agreement", "tie_rate"),
    "reward": ("pair_accuracy", "kendall_tau", "gold_agreement"),
    "ppo": ("gold_score", "parent_gold_score", "gold_score_sampled", "reward", "kl"),
    "classify": ("accuracy", "f1", "matthews_correlation"),
}


def summary_line(stage: str, metrics: dict[str, Any]) -> str:
    """`metric value, ...` of the stage's HEADLINE metrics that `metrics` holds as numbers."""
    return ", ".join(f"{k} {metrics[k]:.4g}" for k in HEADLINE[stage] if isinstance(metrics.get(k), (int, float)))


def format_value(v: Any) -> str:
    """A metric as a table shows it: 4 significant digits, whole numbers from 1,000 up (not `1.235e+04`)."""
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)
