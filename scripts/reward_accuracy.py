"""A reward stage's held-out pair accuracy, overall and per constraint kind, in each precision; ONE JSON line.

The held-out groups are the reward stage's own: its recipe's `dataset_name`, `dataset_test_size` and `seed`, split as
`align reward` splits them. Pair accuracy is `align.rl.ranking.pair_accuracy` (non-tied pairs of the labeler's
ranking, pooled over groups; a reward tie counts half). Per kind: the groups whose prompt holds that constraint of
`align.data.verifiable` (a prompt with two kinds counts for both); prompts the checker does not know are left out of
the per-kind table. Precisions: the reward model as the stage measured it (fp32) and as PPO reads it under bf16
autocast, so the gap between the two is a figure, not a guess.

    python scripts/reward_accuracy.py runs/smollm2-135m/reward
    python scripts/reward_accuracy.py runs/smollm2-135m/reward --dtypes fp32
    python scripts/reward_accuracy.py runs/smollm2-135m/reward --labeler align.data.verifiable:strict_labeler

`--labeler` re-ranks the same held-out answers with another labeler before counting pairs (the graded checker's
partial credit orders answers that all fail; the strict one keeps only pass/fail differences).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from align.data import load as dl  # noqa: E402
from align.data import verifiable  # noqa: E402
from align.data.rankings import parse_ranking_row  # noqa: E402
from align.io import read_stage_info  # noqa: E402
from align.models import modeling_reward  # noqa: E402, F401 - registers LikelihoodRewardModel with the Auto classes
from align.rl.ranking import pair_accuracy, pair_mask  # noqa: E402
from align.stages.rank import function_labeler  # noqa: E402
from align.stages.reward import _grid, _resolve_source  # noqa: E402
from align.trainers.reward import score  # noqa: E402


def heldout_groups(info: dict) -> list[tuple[str, list[str], list[int]]]:
    """(prompt, responses, ranks) of the reward stage's held-out groups, split as the stage split them."""
    recipe = info["recipe"]
    source, _ = _resolve_source(recipe["dataset_name"])
    dd = dl.load_data(source, config=recipe.get("dataset_config"))
    _, test = dl.train_test(dd, train_split=recipe.get("dataset_train_split", "train"),
                            test_split=recipe.get("dataset_test_split", "test"),
                            test_size=recipe.get("dataset_test_size"), seed=recipe.get("seed", 42),
                            source=source)  # fmt: skip
    if test is None:
        raise SystemExit(f"{recipe['dataset_name']}: the reward stage held out no groups")
    return [parse_ranking_row(row, where=f"held-out row {i + 1}")[:3] for i, row in enumerate(test)]


def relabel(groups, labeler) -> list[tuple[str, list[str], list[int]]]:
    """The same answers ranked by `labeler`'s scores: rank 0 = best, equal scores share a rank."""
    out = []
    for prompt, responses, _ in groups:
        scores = labeler([prompt], [responses])[0]
        levels = sorted(set(scores), reverse=True)
        out.append((prompt, responses, [levels.index(s) for s in scores]))
    return out


def kinds_of(prompt: str) -> set[str]:
    try:
        return {c.kind for c in verifiable.parse_constraints(prompt)}
    except verifiable.UnknownPromptError:
        return set()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("reward_dir", help="A finished `align reward` stage dir.")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--labeler", help="Re-rank the held-out answers with this labeler (module:function) first.")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = read_stage_info(args.reward_dir)
    if info is None or info.get("stage") != "reward":
        print(f"error: {args.reward_dir}: not a finished `align reward` stage", file=sys.stderr)
        return 2
    groups = heldout_groups(info)
    if args.labeler:
        groups = relabel(groups, function_labeler(args.labeler))
    prompts = [p for p, rs, _ in groups for _ in rs]
    responses = [r for _, rs, _ in groups for r in rs]
    sizes = [len(rs) for _, rs, _ in groups]
    ranks = _grid([r for _, _, rk in groups for r in rk], sizes, -1).long()
    kinds = [kinds_of(p) for p, _, _ in groups]
    tokenizer = AutoTokenizer.from_pretrained(args.reward_dir)
    model = AutoModelForSequenceClassification.from_pretrained(args.reward_dir, dtype=torch.float32).eval()
    max_length = info["recipe"].get("max_length")
    out = {"reward_dir": args.reward_dir, "labeler": args.labeler or "the stage's", "groups": len(groups),
           "pairs": int(pair_mask(ranks).sum())}  # fmt: skip
    for dtype in args.dtypes:
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext())
        with torch.no_grad(), autocast:
            raw = score(model, tokenizer, prompts, responses, batch_size=args.batch_size, offset=0.0,
                        max_length=max_length).tolist()  # fmt: skip
        rewards = _grid(raw, sizes, float("nan"))
        per_kind = {}
        for kind in sorted({k for ks in kinds for k in ks}):
            idx = [g for g, ks in enumerate(kinds) if kind in ks]
            sub = ranks[idx]
            if pair_mask(sub).any():
                per_kind[kind] = {"groups": len(idx), "pairs": int(pair_mask(sub).sum()),
                                  "pair_accuracy": round(pair_accuracy(rewards[idx], sub).item(), 4)}  # fmt: skip
        out[dtype] = {"pair_accuracy": round(pair_accuracy(rewards, ranks).item(), 4), "per_kind": per_kind}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
