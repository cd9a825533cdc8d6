"""Best-of-n with the reward model: sample n answers from a policy, keep the one the reward model scores highest, and
let the gold labeler score it, next to the gold-best of the n (an oracle pick, the upper bound) and a random one (the
policy sampled).

Best-of-n needs no training and only the reward model, so it shows what the reward model alone can buy at n times
the sampling cost; PPO has to match it at one sample per prompt (Stiennon et al. 2020 and Gao et al. 2023 compare
the two at equal KL). The stage `align bon` (`align/stages/bon.py`) runs it with lineage, a report row and a card;
this module holds what the stage and the older reference command below share: the sampling (resumable), the pick,
the scores and the KL bound.

    align bon --config recipes/tiny/bon.yaml                            # the stage: runs/tiny/bon
    python -m align.evaluation.best_of_n runs/smollm2-135m/ppo --n 4    # beside a finished PPO stage, from its recipe:
                                                                        # runs/smollm2-135m/best_of_4.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from align.data.sources import DEFAULT_DATASET
from align.errors import AlignError
from align.evaluation.gold import SAMPLED_TEMPERATURE, GoldLabeler, gold_setup, win_rate
from align.evaluation.score import load_scorer
from align.generation.generate import generate
from align.io import atomic_write_text, read_stage_info
from align.models.modeling import load_causal_lm, load_tokenizer

logger = logging.getLogger(__name__)


def pick_best(rewards: Sequence[Sequence[float]]) -> list[int]:
    """The index of the highest reward in each group (the first on ties)."""
    return [max(range(len(r)), key=r.__getitem__) for r in rewards]


def kl_bound(n: int) -> float:
    """KL(best-of-n || policy) <= log n - (n - 1) / n nats per answer, with equality when the n answers never tie.

    The figure Stiennon et al. 2020 (https://arxiv.org/abs/2009.01325, appendix G.3) give for best-of-n; Beirami et
    al. 2024 (https://arxiv.org/abs/2401.01879) prove it is an upper bound. Best-of-n has no model of its own whose
    log-probabilities `align.evaluation.kl.sampled_kl` could read, so the stage reports this bound.
    """
    if n < 1:
        raise ValueError(f"kl_bound: n={n}; best-of-n needs n >= 1")
    return math.log(n) - (n - 1) / n


# ---------------------------------------------------------------------------------------------------------------------
# Sampling, saved as it goes


def sample_answers(policy, tokenizer, prompts: Sequence[str], *, n: int, max_new_tokens: int, seed: int,
                   temperature: float = SAMPLED_TEMPERATURE, batch_size: int = 8, backend: str = "transformers",
                   checkpoint: Path | None = None, key: dict[str, Any] | None = None) -> list[list[str]]:  # fmt: skip
    """`n` answers per prompt (chat template, sampled), `batch_size` prompts per generate() call.

    Each call draws from its own seed (`seed` + its index), without touching the caller's RNG, so a run resumed after
    call j samples calls j+1.. as the uninterrupted run did. checkpoint: a JSONL file the answers are appended to after
    each call (first line: `key`, what the answers depend on); a rerun with the same key reads the calls it holds back
    and samples only the rest, another key starts it over.
    """
    prompts = list(prompts)
    chunks = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    done = _read_checkpoint(checkpoint, key) if checkpoint is not None else []
    if done:
        logger.info("best-of-n: %d of %d generate calls read back from %s.", len(done), len(chunks), checkpoint)
    if checkpoint is not None and not done:
        atomic_write_text(checkpoint, json.dumps({"key": key}) + "\n")
    device = getattr(policy, "device", torch.device("cpu"))
    for j in range(len(done), len(chunks)):
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(seed + j)
            groups = generate(policy, tokenizer, chunks[j], chat=True, max_new_tokens=max_new_tokens,
                              temperature=temperature, num_return_sequences=n, batch_size=batch_size,
                              backend=backend)  # fmt: skip
        done.append(groups)
        if checkpoint is not None:
            with open(checkpoint, "a", encoding="utf-8") as f:
                f.write(json.dumps({"call": j, "answers": groups}, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
        logger.info("best-of-n: sampled %d of %d prompts (%d answers each).", min((j + 1) * batch_size, len(prompts)),
                    len(prompts), n)  # fmt: skip
    return [group for groups in done for group in groups]


def _read_checkpoint(path: Path, key: dict[str, Any] | None) -> list[list[list[str]]]:
    """The calls a checkpoint written with `key` holds, in order; none when it is absent, of another key, or torn
    before its first whole call (a line cut by a kill ends what is read)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    try:
        if json.loads(lines[0])["key"] != json.loads(json.dumps(key)):
            logger.info("best-of-n: %s was sampled with other settings; sampling again.", path)
            return []
    except (IndexError, ValueError, KeyError, TypeError):
        return []
    calls = []
    for line in lines[1:]:
        try:
            row = json.loads(line)
        except ValueError:
            break
        if row.get("call") != len(calls):
            break
        calls.append(row["answers"])
    return calls


# ---------------------------------------------------------------------------------------------------------------------
# The pick and its scores


@dataclass
class Choices:
    """Best-of-n over each prompt's answers, taken `draws` times from `draws * n` answers (draw d: answers
    d*n .. d*n + n - 1). Per prompt: `picks` (draws,) index into its answers; `rewards`, `gold` (draws * n,)."""

    n: int
    picks: list[list[int]]
    rewards: list[list[float]]
    gold: list[list[float]]

    @classmethod
    def pick(cls, n: int, rewards: list[list[float]], gold: list[list[float]]) -> Choices:
        """The reward model's pick of each n answers, from per-prompt rewards and gold scores (a multiple of n each).
        The same scores picked at another n that divides them (from a stage's best_of_n.jsonl) give best-of-that-n
        on the same answers: one run at n = 4 with 4 draws is best-of-16 once, best-of-8 twice, best-of-2 8 times."""
        if any(len(r) % n or len(r) != len(g) for r, g in zip(rewards, gold, strict=True)):
            raise ValueError(f"Choices.pick: every prompt needs a multiple of n={n} answers, each with both scores")
        picks = [[s + pick_best([r[s : s + n]])[0] for s in range(0, len(r), n)] for r in rewards]
        return cls(n, picks, rewards, gold)

    def _per_prompt(self, of: Callable[[list[float], list[float]], float]) -> list[float]:
        out = []
        for rewards, gold in zip(self.rewards, self.gold, strict=True):
            spans = range(0, len(gold), self.n)
            out.append(sum(of(rewards[s : s + self.n], gold[s : s + self.n]) for s in spans) / len(spans))
        return out

    def picked(self) -> list[float]:
        """Per prompt: the gold score of the reward model's pick, the mean over the draws."""
        return self._per_prompt(lambda r, g: g[pick_best([r])[0]])

    def oracle(self) -> list[float]:
        """Per prompt: the gold score of the gold-best of the n (the upper bound of any pick), mean over the draws."""
        return self._per_prompt(lambda r, g: max(g))

    def random(self) -> list[float]:
        """Per prompt: the mean gold score of the n, i.e. of a random pick in expectation: the policy sampled."""
        return self._per_prompt(lambda r, g: sum(g) / len(g))

    def picked_reward(self) -> list[float]:
        """Per prompt: the reward of the pick, the mean over the draws."""
        return self._per_prompt(lambda r, g: max(r))

    def mean_reward(self) -> list[float]:
        """Per prompt: the mean reward of all the answers (of a random pick)."""
        return self._per_prompt(lambda r, g: sum(r) / len(r))


Reward = Callable[[Sequence[str], Sequence[str]], list[float]]  # (prompts, responses) -> rewards, as load_scorer's


def choose(prompts: Sequence[str], answers: Sequence[Sequence[str]], *, n: int, reward: Reward,
           labeler: GoldLabeler) -> Choices:  # fmt: skip
    """Score every answer with the reward model (`reward(prompts, responses)`, as `load_scorer` returns) and the gold
    labeler, and keep the reward model's pick of each n. answers[i]: a multiple of n answers to prompts[i]."""
    if any(len(a) % n for a in answers) or len(answers) != len(prompts):
        raise ValueError(f"choose: {len(prompts)} prompts need a multiple of n={n} answers each")
    flat = reward([p for p, a in zip(prompts, answers, strict=True) for _ in a], [r for a in answers for r in a])
    rewards, start = [], 0
    for a in answers:
        rewards.append([float(x) for x in flat[start : start + len(a)]])
        start += len(a)
    gold = [[labeler.score(p, r) for r in a] for p, a in zip(prompts, answers, strict=True)]
    return Choices.pick(n, rewards, gold)


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


# ---------------------------------------------------------------------------------------------------------------------
# The reference for a finished PPO stage (before `align bon`; the report reads its best_of_<n>.json)


def run(ppo_dir: str, *, n: int = 4, batch_size: int = 64, out: str | None = None) -> dict[str, Any]:
    info = read_stage_info(ppo_dir)
    if info is None or info.get("stage") != "ppo":
        raise AlignError(f"{ppo_dir}: not a finished `align ppo` stage (no align_stage.json of a ppo stage). Give the "
                         "ppo stage's output_dir, or run `align bon` on any policy.")  # fmt: skip
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
    groups = sample_answers(policy, tokenizer, prompts, n=n, max_new_tokens=max_new_tokens, seed=seed,
                            batch_size=batch_size, backend=backend)  # fmt: skip
    del policy
    found = choose(prompts, groups, n=n, reward=load_scorer(reward_path, batch_size=batch_size), labeler=labeler)
    best, parent, ppo = found.picked(), info["parent_gold_scores"], info.get("gold_scores")
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
        "gold_score_best_of_n": mean(best),
        "gold_score_sampled": mean(found.random()),  # one random sample of the n, in expectation
        "gold_score_oracle": mean(found.oracle()),
        "parent_gold_score": mean(parent),
        "win_rate_vs_parent_greedy": win_rate(best, parent),
        "ppo_gold_score": mean(ppo) if ppo else None,
        "ppo_win_rate_vs_best_of_n": win_rate(ppo, best) if ppo else None,
        "gold_scores_best_of_n": best,
        "responses": groups,  # per prompt: the n samples, their rewards, and which one was kept
        "rewards": found.rewards,
        "picked": [p[0] for p in found.picks],
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
                                description=__doc__.strip().split("\n\n")[0])  # fmt: skip
    p.add_argument("ppo_dir", help="A finished `align ppo` stage dir (with a gold evaluation).")
    p.add_argument("--n", type=int, default=4, help="Samples per prompt (default 4).")
    p.add_argument("--batch_size", type=int, default=64, help="Prompts per generate call, pairs per reward batch.")
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
        return 2  # a user mistake, as `align` reports one
    return 0


if __name__ == "__main__":
    sys.exit(main())
