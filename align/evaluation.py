"""Gold-labeler evaluation on held-out tiny-world prompts: the honest measure of every stage's gain.

The same prompts (`instruction_prompts(n, seed, split="test")`) and the same decoding are used for the pretrained,
SFT and PPO models, so their `gold_score`s compare directly (and per prompt, for win-rates).
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def heldout_prompts(n: int, seed: int = 0) -> list[str]:
    """The held-out tiny-world instruction prompts every stage is evaluated on."""
    from align.data import tinyworld

    return list(tinyworld.instruction_prompts(n, seed=seed, split="test")["prompt"])


def gold_eval(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    batch_size: int = 32,
    num_samples: int = 4,
) -> dict[str, Any]:
    """Answer `prompts` with the chat template and score each answer with the gold labeler.

    Returns `{"gold_score": mean, "gold_pass_rates": {constraint: mean}, "gold_scores": per-prompt list,
    "samples": first `num_samples` (prompt, response, gold_score)}`.
    """
    from align.data import tinyworld
    from align.generate import generate

    was_training = model.training
    responses = [
        r[0]
        for r in generate(
            model,
            tokenizer,
            prompts,
            chat=True,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            batch_size=batch_size,
        )
    ]
    if was_training:
        model.train()
    details = [tinyworld.score_details(p, r) for p, r in zip(prompts, responses, strict=True)]
    scores = [d["score"] for d in details]
    keys = sorted({k for d in details for k in d if k != "score"})
    rates = {k: sum(d.get(k, 0.0) for d in details) / len(details) for k in keys}
    return {
        "gold_score": sum(scores) / len(scores),
        "gold_pass_rates": rates,
        "gold_scores": scores,
        "samples": [
            {"prompt": p, "response": r, "gold_score": s}
            for p, r, s in list(zip(prompts, responses, scores, strict=True))[:num_samples]
        ],
    }


def win_rate(scores: list[float], baseline: list[float]) -> float:
    """Fraction of prompts where `scores` beats `baseline` (same prompts, same order), ties counted as half a win.

    Args:
        scores, baseline: per-prompt scores of two models, e.g. `gold_scores` of the PPO and SFT stages.
    """
    if len(scores) != len(baseline) or not scores:
        raise ValueError(f"win_rate needs two equally long, non-empty score lists; got {len(scores)}, {len(baseline)}")
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline, strict=True))
    return wins / len(scores)
