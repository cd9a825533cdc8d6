"""The report's methods table as a reader sees it: report.html opened in a headless Chromium (tests/browser.py)."""

import json
import tempfile
from pathlib import Path

from browser import Browser, Tab
from test_methods_table import _stage  # tests/ is on sys.path

from align.evaluation import methods
from align.evaluation.report import write_report


def test_methods_table_in_chromium(chromium, tmp_path):
    root = tmp_path / "runs"
    _stage(root, "sft", "sft", None, {"gold_score": 0.5})
    _stage(root, "reward", "reward", root / "sft", {}, data={"rows": 120})
    _stage(root, "ppo", "ppo", root / "sft",
           {"gold_score": 0.625, "parent_gold_score": 0.5, "parent_gold_score_sampled": 0.4, "kl_to_parent": 0.3,
            "gold_score_sampled": 0.45},
           gold_scores=[1.0, 0.5, 0.0, 1.0], parent_gold_scores=[0.5] * 4, gold_scores_sampled=[0.5, 0.5, 0.4, 0.4],
           parent_gold_scores_sampled=[0.4] * 4, reward_model={"path": str(root / "reward")})  # fmt: skip
    _stage(root, "ppo_kl", "ppo", root / "sft", {"gold_score": 0.75, "labels_used": 40, "kl_to_parent": 0.1},
           gold_scores=[0.75] * 4, parent_gold_scores=[0.5] * 4)  # fmt: skip
    write_report(root, {"examples": 0})
    rows = json.loads((root / "report.json").read_text())["headline"]["methods"]
    assert [r["method"] for r in rows] == ["SFT (the parent)", "PPO", "PPO (ppo_kl)"]

    browser = Browser(chromium, Path(tempfile.mkdtemp(dir=tmp_path)))
    try:
        tab = Tab(browser, (root / "report.html").as_uri())
        header = tab.eval("Array.from(document.querySelectorAll('#methods tr:first-child th'), c => c.textContent)")
        assert header == ["method", *(label for _, label in methods.COLUMNS)]
        shown = tab.eval("Array.from(document.querySelectorAll('#methods tr'), r => "
                         "Array.from(r.querySelectorAll('td'), c => c.textContent)).slice(1)")  # fmt: skip
        assert shown == [[r["method"], *(methods.cell(r, k) for k, _ in methods.COLUMNS)] for r in rows]
        assert shown[1][3:5] == ["0.625", "+0.125 [-0.344, +0.594]"]  # win-rate and interval, by hand in test_methods
        assert shown[1][5] == "0.750"  # sampled: .5, .5, .4, .4 over .4 each -> wins 1, 1, .5, .5 -> 3 / 4
        # on screen, and the page does not scroll sideways at 1100 px
        width = tab.eval("document.getElementById('methods').getBoundingClientRect().width")
        assert 0 < width <= tab.eval("window.innerWidth")
        assert tab.eval("document.documentElement.scrollWidth <= window.innerWidth")
    finally:
        browser.close()
