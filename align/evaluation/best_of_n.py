"""Best-of-n with the reward model, the reference point for PPO: sample n answers from PPO's starting policy, keep
the one the reward model scores highest, and let the gold labeler score it.

Best-of-n needs no training and only the reward model, so it shows what the reward model alone can buy at n times
the sampling cost; PPO has to match it at one sample per prompt (Stiennon et al. 2020 and Gao et al. 2023 compare
the two at equal KL). Run on a finished PPO stage; it reuses that stage's recipe: the parent policy, the reward
model, the gold labeler and held-out prompts, the answer length and seed, and compares with the greedy answers the
stage scored (`parent_gold_scores`, `gold_scores` in its align_stage.json):

    python -m align.evaluation.best_of_n runs/smollm2-135m/ppo --n 4      # writes runs/smollm2-135m/best_of_4.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from align.data.sources import DEFAULT_DATASET
from align.errors import AlignError
from align.evaluation.gold import SAMPLED_TEMPERATURE, gold_setup, win_rate
from align.evaluation.score import load_scorer
from align.generation.generate import generate
from align.io import atomic_write_text, read_stage_info
from align.models.modeling import load_causal_lm, load_tokenizer

logger = logging.getLogger(__name__)


def pick_best(rewards: list[list[float]]) -> list[int]:
    """The index of the highest reward in each group (the first on ties)."""
    return [max(range(len(r)), key=r.__getitem__) for r in rewards]


def run(ppo_dir: str, *, n: int = 4, batch_size: int = 64, out: str | None = None) -> dict[str, Any]:
    info = read_stage_info(ppo_dir)
    if info is None or info.get("stage") != "ppo":
        raise AlignError(f"{ppo_dir}: not a finished `align ppo` stage (no align_stage.json of a ppo stage). Give the "
                         "ppo stage's output_dir.")  # fmt: skip
    recipe = info.get("recipe") or {}
    if not recipe.get("gold_labeler") and info.get("gold_labeler") is None:
        raise AlignError(f"{ppo_dir}: the stage ran without a gold labeler, so there is nothing to compare; set "
                         "gold_labeler and gold_eval_dataset in its recipe.")  # fmt: skip
    if "parent_gold_scores" not in info:
        raise AlignError(f"{ppo_dir}: no parent_gold_scores in align_stage.json (gold_eval_prompts: 0?); rerun the "
                         "stage with a gold evaluation.")  # fmt: skip
    cfg = argparse.Namespace(
        gold_labeler=recipe.get("gold_labeler") or info.get("gold_labeler"),
        gold_eval_dataset=recipe.get("gold_eval_dataset"),
        gold_eval_prompts=len(info["parent_gold_scores"]),
        dataset_name=recipe.get("dataset_name", DEFAULT_DATASET),
        tinyworld_seed=recipe.get("tinyworld_seed", 0),
    )
    labeler, prompts = gold_setup(cfg)  # the stage's held-out prompts, in its order: per-prompt scores line up
    policy_path, reward_path = recipe["model_name_or_path"], recipe["reward_model_path"]
    max_new_tokens = int(recipe.get("gold_eval_max_new_tokens", 64))
    seed = int(recipe.get("seed", 42))
    backend = "align" if recipe.get("generation_backend") == "align" else "transformers"  # sample as the stage did

    tokenizer = load_tokenizer(policy_path)
    policy = load_causal_lm(policy_path)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        groups = generate(policy, tokenizer, prompts, chat=True, max_new_tokens=max_new_tokens,
                          temperature=SAMPLED_TEMPERATURE, num_return_sequences=n, batch_size=batch_size,
                          backend=backend)  # fmt: skip
    del policy
    reward = load_scorer(reward_path, batch_size=batch_size)
    flat = reward([p for p, g in zip(prompts, groups, strict=True) for _ in g], [r for g in groups for r in g])
    rewards = [flat[i * n : (i + 1) * n] for i in range(len(prompts))]
    picks = pick_best(rewards)
    gold = [[labeler.score(p, r) for r in g] for p, g in zip(prompts, groups, strict=True)]
    best = [scores[i] for scores, i in zip(gold, picks, strict=True)]
    mean_all = [sum(scores) / n for scores in gold]
    parent, ppo = info["parent_gold_scores"], info.get("gold_scores")
    result = {
        "n": n,
        "ppo_dir": str(Path(ppo_dir).resolve()),
        "policy": policy_path,
        "reward_model": reward_path,
        "gold_labeler": labeler.name,
        "prompts": len(prompts),
        "temperature": SAMPLED_TEMPERATURE,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "gold_score_best_of_n": sum(best) / len(best),
        "gold_score_sampled": sum(mean_all) / len(mean_all),  # one random sample of the n, in expectation
        "parent_gold_score": sum(parent) / len(parent),
        "win_rate_vs_parent_greedy": win_rate(best, parent),
        "ppo_gold_score": sum(ppo) / len(ppo) if ppo else None,
        "ppo_win_rate_vs_best_of_n": win_rate(ppo, best) if ppo else None,
        "gold_scores_best_of_n": best,
        "responses": groups,  # per prompt: the n samples, their rewards, and which one was kept
        "rewards": rewards,
        "picked": picks,
    }
    path = Path(out) if out else Path(ppo_dir).resolve().parent / f"best_of_{n}.json"
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    logger.info("best-of-%d with %s on %d held-out prompts: gold %.4f (one sample %.4f, parent greedy %.4f, PPO "
                "greedy %s); beats the parent's greedy answer on %.1f%%. Wrote %s", n, reward_path, len(prompts),
                result["gold_score_best_of_n"], result["gold_score_sampled"], result["parent_gold_score"],
                "n/a" if ppo is None else f"{result['ppo_gold_score']:.4f}", 100 * result["win_rate_vs_parent_greedy"],
                path)  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m align.evaluation.best_of_n",
                                description=__doc__.strip().split("\n\n")[0])
    p.add_argument("ppo_dir", help="A finished `align ppo` stage dir (with a gold evaluation).")
    p.add_argument("--n", type=int, default=4, help="Samples per prompt (default 4).")
    p.add_argument("--batch_size", type=int, default=64, help="Sequences per generate / reward-model call.")
    p.add_argument("--out", default=None, help="Output JSON (default: best_of_N.json beside the ppo dir).")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")  # fmt: skip
    if args.n < 1:
        print("error: --n must be >= 1 (samples per prompt).", file=sys.stderr)
        return 2
    try:
        run(args.ppo_dir, n=args.n, batch_size=args.batch_size, out=args.out)
    except AlignError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
