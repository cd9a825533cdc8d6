"""Gold-labeler evaluation on held-out tiny-world prompts: the honest measure of every stage's gain.

The same prompts (`instruction_prompts(n, seed, split="test")`) and the same decoding are used for the pretrained,
SFT and PPO models, so their `gold_score`s compare directly (and per prompt, for win-rates).
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

# Sampled gold evaluation (`gold_eval_samples`): the model's own distribution, as PPO samples its rollouts.
SAMPLED_TEMPERATURE = 1.0


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
    samples_per_prompt: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Answer `prompts` with the chat template and score each answer with the gold labeler.

    With `samples_per_prompt` k > 1 (needs temperature > 0), each prompt is answered k times and its score is the mean
    of the k: the model as a distribution, which is what PPO optimizes (greedy decoding shows only its mode).
    Sampling is seeded with `seed` without touching the caller's RNG state, so two models (or two runs) are compared
    on the same random draws where their distributions agree.

    Returns `{"gold_score": mean, "gold_pass_rates": {constraint: mean over all answers}, "gold_scores": per-prompt
    list, "samples": first `num_samples` (prompt, response, gold_score), one answer per prompt}`.
    """
    import torch

    from align.data import tinyworld
    from align.generate import generate

    if samples_per_prompt < 1 or (samples_per_prompt > 1 and temperature <= 0):
        raise ValueError(
            f"gold_eval: samples_per_prompt={samples_per_prompt} at temperature={temperature}; use 1, or > 1 with "
            "temperature > 0 (greedy answers are all alike)."
        )
    was_training = model.training
    device = getattr(model, "device", torch.device("cpu"))
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        groups = generate(
            model,
            tokenizer,
            prompts,
            chat=True,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            num_return_sequences=samples_per_prompt,
            batch_size=batch_size,
        )
    if was_training:
        model.train()
    details = [[tinyworld.score_details(p, r) for r in g] for p, g in zip(prompts, groups, strict=True)]
    scores = [sum(d["score"] for d in ds) / len(ds) for ds in details]
    flat = [d for ds in details for d in ds]
    keys = sorted({k for d in flat for k in d if k != "score"})
    rates = {k: sum(d.get(k, 0.0) for d in flat) / len(flat) for k in keys}
    return {
        "gold_score": sum(scores) / len(scores),
        "gold_pass_rates": rates,
        "gold_scores": scores,
        "samples": [
            {"prompt": p, "response": g[0], "gold_score": ds[0]["score"]}
            for p, g, ds in list(zip(prompts, groups, details, strict=True))[:num_samples]
        ],
    }


def stage_gold_eval(cfg, model, tokenizer, prompts: list[str], *, temperature: float, samples: int = 0):
    """`gold_eval` with a stage config's settings (`gold_eval_max_new_tokens`, `per_device_eval_batch_size`, `seed`):
    answers decoded at `temperature`, or, with `samples` > 0, that many answers per prompt at SAMPLED_TEMPERATURE."""
    return gold_eval(
        model,
        tokenizer,
        prompts,
        max_new_tokens=cfg.gold_eval_max_new_tokens,
        temperature=SAMPLED_TEMPERATURE if samples else temperature,
        batch_size=cfg.per_device_eval_batch_size,
        samples_per_prompt=max(samples, 1),
        seed=cfg.seed,
    )


def win_rate(scores: list[float], baseline: list[float]) -> float:
    """Fraction of prompts where `scores` beats `baseline` (same prompts, same order), ties counted as half a win.

    Args:
        scores, baseline: per-prompt scores of two models, e.g. `gold_scores` of the PPO and SFT stages.
    """
    if len(scores) != len(baseline) or not scores:
        raise ValueError(f"win_rate needs two equally long, non-empty score lists; got {len(scores)}, {len(baseline)}")
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline, strict=True))
    return wins / len(scores)
