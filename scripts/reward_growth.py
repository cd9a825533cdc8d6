"""How a reward model's held-out pair accuracy grows with the number of ranked groups: ONE JSON line per size.

From one `align rank` output, the held-out groups are split off once, exactly as `align reward` splits them (the
recipe's `dataset_test_size` and `seed`), and stay the same for every size; each size N trains `align reward` with
the recipe on the first N of the remaining groups (a folder holding `train.jsonl` and `test.jsonl`, which the reward
stage reads as its two splits). It tells a user how much labeling a target accuracy takes.

    python scripts/reward_growth.py runs/smollm2-135m/rank --recipe recipes/smollm2-135m/reward.yaml \
        --groups 72 144 288 --out runs/reward-growth [--num_train_epochs 2 ...: more keys for align reward]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from align.data import load as dl
from align.io import read_stage_info
from align.stages.reward import _resolve_source


def rows_of(ds) -> list[dict]:
    return [dict(row) for row in ds]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("rank_dir", help="A finished `align rank` stage dir (or a rankings file).")
    p.add_argument("--recipe", required=True, help="The reward recipe to train with.")
    p.add_argument("--groups", type=int, nargs="+", required=True, help="Training sizes, in ranked groups.")
    p.add_argument("--out", required=True, help="Folder for the splits and the reward stages.")
    args, overrides = p.parse_known_args(argv)  # the rest: `--key value` for align reward

    recipe = yaml.safe_load(Path(args.recipe).read_text())
    source, _ = _resolve_source(args.rank_dir)
    train, test = dl.train_test(dl.load_data(source), test_size=recipe.get("dataset_test_size", 0.1),
                                seed=recipe.get("seed", 42), source=source)  # fmt: skip
    if test is None:
        print(f"error: {args.recipe}: dataset_test_size holds out no group", file=sys.stderr)
        return 2
    train_rows, test_rows = rows_of(train), rows_of(test)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for n in args.groups:
        if n > len(train_rows):
            print(f"error: --groups {n}: only {len(train_rows)} training groups", file=sys.stderr)
            return 2
        data = Path(args.out) / f"groups_{n}"
        data.mkdir(parents=True, exist_ok=True)
        for name, rows in (("train", train_rows[:n]), ("test", test_rows)):
            (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = data / "reward"
        start = time.perf_counter()
        command = [sys.executable, "-m", "align", "reward", "--config", args.recipe, "--dataset_name", str(data),
                   "--dataset_test_split", "test", "--output_dir", str(out), *overrides]  # fmt: skip
        if read_stage_info(out) is None:
            subprocess.run(command, check=True, env=env)
        info = read_stage_info(out)
        metrics = info["metrics"]
        print(json.dumps({"groups": n, "heldout_groups": len(test_rows),
                          "pair_accuracy": metrics.get("pair_accuracy"), "kendall_tau": metrics.get("kendall_tau"),
                          "eval_loss": metrics.get("eval_loss"), "seconds": round(time.perf_counter() - start, 1),
                          "reward_dir": str(out)}), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
