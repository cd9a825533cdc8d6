"""The methods compared: one row per stage that started from the chain's SFT model and was scored against it.

PPO, DPO, GRPO, RLOO and best-of-n each answer the same held-out prompts as their parent (the SFT model) and the
gold labeler scores both (`align.evaluation.compare`), so one table sets them side by side: gold score greedy and
sampled, win-rate over SFT (ties half) with the paired 95 % interval of the per-prompt difference, KL to SFT measured
one way for all (`align.evaluation.kl`), wall time, and the labels (ranked groups) behind each.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from align.evaluation.gold import paired_interval, win_rate
from align.io import read_stage_info, same_path
from align.stages import registry

COLUMNS = (
    ("gold_score", "gold (greedy)"),
    ("gold_score_sampled", "gold (sampled)"),
    ("win_rate", "win-rate over SFT"),
    ("diff", "gold - SFT, 95 % interval"),
    ("win_rate_sampled", "win-rate, sampled"),
    ("kl", "KL to SFT (nats)"),
    ("seconds", "wall time (s)"),
    ("labels", "ranked groups used"),
)


def stage_seconds(root: Path) -> dict[str, float]:
    """Wall seconds of each stage as the chain ran it (`chain_state.json`), when the chain kept them."""
    try:
        state = json.loads((root / "chain_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {name: float(s["seconds"]) for name, s in state.items() if isinstance(s, dict) and "seconds" in s}


def reward_groups(reward_info: dict[str, Any] | None) -> int | None:
    """The ranked groups a reward stage trained on (its data's `rows`), from its align_stage.json; None if unknown."""
    rows = ((reward_info or {}).get("data") or {}).get("rows")
    return int(rows) if isinstance(rows, (int, float)) else None


def labels_used(info: dict[str, Any]) -> int | None:
    """Ranked groups behind a stage: its own `labels_used`, else (a stage scored by a reward model, e.g. PPO) the
    groups that reward model trained on."""
    own = (info.get("metrics") or {}).get("labels_used")
    if isinstance(own, (int, float)):
        return int(own)
    reward = (info.get("reward_model") or {}).get("path")
    return reward_groups(read_stage_info(reward) if reward else None)


def method_rows(root: Path, stages: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """SFT's row (the baseline), then one per stage whose parent is `root/sft` and which holds per-prompt gold scores
    of itself and of that parent; empty when fewer than two methods qualify (a chain with PPO alone has its own
    headline)."""
    seconds = stage_seconds(root)
    rows = []
    for name, info in stages.items():
        parent = (info.get("parent") or {}).get("path")
        if name == "sft" or not same_path(parent, root / "sft") or "gold_scores" not in info:
            continue
        if "parent_gold_scores" not in info:
            continue
        metrics = info.get("metrics") or {}
        record = registry.find(str(info.get("stage")))
        method = name if record is None else record.display if name == record.name else f"{record.display} ({name})"
        row: dict[str, Any] = {
            "stage": name,
            "method": method,
            "gold_score": metrics.get("gold_score"),
            "gold_score_sampled": metrics.get("gold_score_sampled"),
            "win_rate": win_rate(info["gold_scores"], info["parent_gold_scores"]),
            "diff": paired_interval(info["gold_scores"], info["parent_gold_scores"]),
            "kl": metrics.get("kl_to_parent"),
            "seconds": seconds.get(name, metrics.get("train_runtime") or metrics.get("runtime")),
            "labels": labels_used(info),
            "prompts": len(info["gold_scores"]),
        }
        if "gold_scores_sampled" in info and "parent_gold_scores_sampled" in info:
            row["win_rate_sampled"] = win_rate(info["gold_scores_sampled"], info["parent_gold_scores_sampled"])
        rows.append(row)
    if len(rows) < 2:
        return []
    first = stages[rows[0]["stage"]]["metrics"]
    sft = {"stage": "sft", "method": "SFT (the parent)", "gold_score": first.get("parent_gold_score"),
           "gold_score_sampled": first.get("parent_gold_score_sampled"), "win_rate": 0.5, "kl": 0.0,
           "seconds": seconds.get("sft"), "labels": 0}  # fmt: skip
    return [sft, *rows]


def cell(row: dict[str, Any], key: str) -> str:
    """A table cell as text: scores and rates to 3 places, the interval as [low, high], seconds whole."""
    value = row.get(key)
    if value is None:
        return "-"
    if key == "diff":
        return f"{value['mean']:+.3f} [{value['low']:+.3f}, {value['high']:+.3f}]"
    if key in ("seconds", "labels"):
        return f"{value:,.0f}"
    return f"{value:.3f}"


def markdown(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    out = ["## Methods against SFT, on the gold labeler", "",
           f"Held-out prompts: {rows[1]['prompts']}. Ties count half a win. KL: nats per answer, one sampled answer "
           "per prompt (`align.evaluation.kl`; best-of-n: its bound log n - (n-1)/n).", "",
           "| method | " + " | ".join(label for _, label in COLUMNS) + " |",
           "|---" * (len(COLUMNS) + 1) + "|"]  # fmt: skip
    out += [f"| {r['method']} | " + " | ".join(cell(r, k) for k, _ in COLUMNS) + " |" for r in rows]
    return [*out, ""]


def html_table(rows: list[dict[str, Any]], escape) -> list[str]:
    if not rows:
        return []
    out = ["<h2>Methods against SFT, on the gold labeler</h2>",
           f"<p>Held-out prompts: {rows[1]['prompts']}. Ties count half a win. KL: nats per answer, one sampled "
           "answer per prompt (best-of-n: its bound log n - (n-1)/n).</p>",
           "<table id='methods'><tr><th>method</th>" + "".join(f"<th>{escape(label)}</th>" for _, label in COLUMNS)
           + "</tr>"]  # fmt: skip
    for r in rows:
        cells = "".join(f"<td class='num'>{escape(cell(r, k))}</td>" for k, _ in COLUMNS)
        out.append(f"<tr><td>{escape(r['method'])}</td>{cells}</tr>")
    return [*out, "</table>"]
