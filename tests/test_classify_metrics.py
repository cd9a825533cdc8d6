"""The `evaluate` metric modules shipped in align/metrics: hand-computed values, and loading by path offline."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from align.metrics import METRICS, load_metric, metric_path

ROOT = Path(__file__).resolve().parents[1]


def test_accuracy():
    # 3 of 4 equal
    assert load_metric("accuracy").compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0]) == {"accuracy": 0.75}


def test_f1_binary_and_macro():
    f1 = load_metric("f1")
    # class 1: TP 1 (row 2), FP 1 (row 3), FN 0 -> 2*1 / (2*1 + 1 + 0) = 2/3
    assert f1.compute(predictions=[0, 1, 1], references=[0, 1, 0])["f1"] == pytest.approx(2 / 3)
    # class 0: TP 1 -> 1; class 1: TP 1, FN 1 -> 2/3; class 2: TP 1, FP 1 -> 2/3; mean = 7/9
    got = f1.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2], average="macro")["f1"]
    assert got == pytest.approx(7 / 9)
    # micro over single labels = accuracy: 3 of 4
    assert f1.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2], average="micro")["f1"] == pytest.approx(0.75)
    # no positive predicted or true: 0, not a division by zero
    assert f1.compute(predictions=[0, 0], references=[0, 0])["f1"] == 0.0


def test_matthews_correlation():
    mcc = load_metric("matthews_correlation")
    # TP 1, FP 1, TN 2, FN 0: (1*2 - 1*0) / sqrt((1+1)(1+0)(2+1)(2+0)) = 2 / sqrt(12)
    got = mcc.compute(predictions=[1, 1, 0, 0], references=[1, 0, 0, 0])["matthews_correlation"]
    assert got == pytest.approx(2 / 12**0.5)
    assert mcc.compute(predictions=[1, 0, 1], references=[1, 0, 1])["matthews_correlation"] == pytest.approx(1.0)
    assert mcc.compute(predictions=[0, 1], references=[1, 0])["matthews_correlation"] == pytest.approx(-1.0)
    # constant prediction: a zero denominator gives 0 (no better than chance)
    assert mcc.compute(predictions=[1, 1, 1], references=[1, 0, 1])["matthews_correlation"] == 0.0


def test_classify_metrics_multiple_choice_is_macro_f1_over_answer_positions():
    import numpy as np
    from transformers import EvalPrediction

    from align.trainers.classify import ClassifyMetrics

    # rows of 4 choices (-inf pads a row with 3); predicted positions 0, 0, 0, 1; true 0, 1, 2, 1
    logits = np.array([[2.0, 0, 0, 0], [1.0, 0, 0, -np.inf], [3.0, 1, 2, 0], [0, 5.0, 0, 0]])
    got = ClassifyMetrics(4, "multiple_choice")(EvalPrediction(predictions=logits, label_ids=np.array([0, 1, 2, 1])))
    # accuracy 2/4; position 0: TP 1, FP 2 -> 2/4; position 1: TP 1, FN 1 -> 2/3; position 2: FN 1 -> 0
    assert set(got) == {"accuracy", "f1"}
    assert got["accuracy"] == pytest.approx(0.5)
    assert got["f1"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)


def test_metric_paths_are_inside_the_package():
    for name in METRICS:
        assert (Path(metric_path(name)) / f"{name}.py").is_file()
    with pytest.raises(ValueError, match="unknown metric"):
        metric_path("bleu")


def test_evaluate_loads_them_by_path_offline(tmp_path):
    # evaluate.load("accuracy") would fetch the script from the Hub; a path must work with the Hub unreachable.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
           "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}  # fmt: skip
    code = (
        "import evaluate; from align.metrics import metric_path\n"
        "print(evaluate.load(metric_path('accuracy')).compute(predictions=[1, 0], references=[1, 1]))"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "{'accuracy': 0.5}"
