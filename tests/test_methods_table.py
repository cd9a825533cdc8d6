"""The report's methods table (align.evaluation.methods) on hand-written stage files."""

import json

import pytest

from align.evaluation import methods
from align.evaluation.report import load_stages


def _stage(root, name, stage, parent, metrics, **fields):
    d = root / name
    d.mkdir(parents=True)
    info = {"stage": stage, "parent": {"stage": "sft", "path": str(parent)} if parent else None, "metrics": metrics}
    (d / "align_stage.json").write_text(json.dumps({**info, **fields}))


@pytest.fixture
def chain(tmp_path):
    root = tmp_path / "runs"
    _stage(root, "sft", "sft", None, {"gold_score": 0.5})
    _stage(root, "reward", "reward", root / "sft", {}, data={"rows": 120})
    # PPO: scores 1, .5, 0, 1 over SFT's .5, .5, .5, .5 -> wins 1, .5 (tie), 0, 1 -> 2.5 / 4 = .625;
    # diffs .5, 0, -.5, .5: mean .125, sample sd sqrt(((.375^2)*2 + .125^2 + .625^2) / 3) = .4787, se .2394
    _stage(root, "ppo", "ppo", root / "sft",
           {"gold_score": 0.625, "parent_gold_score": 0.5, "parent_gold_score_sampled": 0.4, "kl_to_parent": 0.3},
           gold_scores=[1.0, 0.5, 0.0, 1.0], parent_gold_scores=[0.5] * 4,
           reward_model={"path": str(root / "reward")})  # fmt: skip
    # DPO: all four ahead -> 1.0; its own labels_used
    _stage(root, "dpo", "dpo", root / "sft", {"gold_score": 0.75, "labels_used": 40, "kl_to_parent": 0.1},
           gold_scores=[0.75] * 4, parent_gold_scores=[0.5] * 4)  # fmt: skip
    (root / "chain_state.json").write_text(json.dumps({"ppo": {"seconds": 61.0}, "sft": {"seconds": 9.0}}))
    return root


def test_rows_by_hand(chain, monkeypatch):
    monkeypatch.setattr("align.stages.registry.find", lambda name: None)  # names as the dirs (no dpo record needed)
    rows = methods.method_rows(
        chain, load_stages(chain) | {"dpo": json.loads((chain / "dpo/align_stage.json").read_text())}
    )
    by = {r["stage"]: r for r in rows}
    assert [r["stage"] for r in rows][0] == "sft" and set(by) == {"sft", "ppo", "dpo"}
    assert by["sft"]["gold_score"] == 0.5 and by["sft"]["gold_score_sampled"] == 0.4 and by["sft"]["seconds"] == 9.0
    assert by["ppo"]["win_rate"] == 0.625
    assert by["ppo"]["diff"]["mean"] == pytest.approx(0.125)
    assert by["ppo"]["diff"]["high"] - 0.125 == pytest.approx(1.96 * 0.4787 / 2, abs=1e-4)
    assert by["ppo"]["labels"] == 120  # through its reward model's training groups
    assert by["ppo"]["seconds"] == 61.0 and by["ppo"]["kl"] == 0.3
    assert by["dpo"]["win_rate"] == 1.0 and by["dpo"]["labels"] == 40
    assert methods.cell(by["ppo"], "diff") == "+0.125 [-0.344, +0.594]"
    assert methods.cell(by["dpo"], "gold_score_sampled") == "-"


def test_one_method_makes_no_table(chain):
    (chain / "dpo" / "align_stage.json").unlink()
    assert methods.method_rows(chain, load_stages(chain)) == []


def test_gold_curve_starts_at_the_parent_and_ends_at_the_final_evaluation():
    from align.evaluation.report import gold_curve

    history = [{"step": 1, "kl": 0.1}, {"step": 2, "eval/gold_score": 0.6, "kl": 0.2}, {"step": 3}, {"step": 4}]
    # in-run evaluation at step 2 only: the parent at 0, step 2, the final evaluation at the last update (4)
    assert gold_curve(history, 0.5, 0.7) == [{"step": 0, "eval/gold_score": 0.5}, {"step": 2, "eval/gold_score": 0.6},
                                             {"step": 4, "eval/gold_score": 0.7}]  # fmt: skip
    # a run evaluated at its last update keeps its own point; one with no in-run evaluation gets two points
    history.append({"step": 4, "eval/gold_score": 0.65})
    assert gold_curve(history, None, 0.7)[-1] == {"step": 4, "eval/gold_score": 0.65}
    assert gold_curve([{"step": 4}], 0.5, 0.7) == [{"step": 0, "eval/gold_score": 0.5},
                                                  {"step": 4, "eval/gold_score": 0.7}]  # fmt: skip
    assert gold_curve(None, None, None) == []
