"""`evaluate` metric modules shipped inside align, loaded by local path: no Hub access at run time.

`evaluate.load("accuracy")` downloads the module script from the Hub, which fails offline (HF_HUB_OFFLINE=1, CI, the
tiny world's 2-core box). The scripts here are written against evaluate's module API (`evaluate.Metric` with `_info`
and `_compute`) and load with `evaluate.load(<dir>)`, as any local module does:

    from align.metrics import load_metric
    load_metric("f1").compute(predictions=[0, 1, 1], references=[0, 1, 0])   # {'f1': 0.666...}

Each is plain numpy (no scikit-learn); the math is checked on hand-computed examples in tests/test_classify_metrics.py.
"""

from __future__ import annotations

import functools
from pathlib import Path

import evaluate

METRICS = ("accuracy", "f1", "matthews_correlation")
HERE = Path(__file__).resolve().parent


def metric_path(name: str) -> str:
    """The directory of the shipped metric `name` (what `evaluate.load` takes)."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; align ships {', '.join(METRICS)}")
    return str(HERE / name)


@functools.cache
def load_metric(name: str):
    """`evaluate.load` of the shipped module `name`, by local path (once per process: a module is reusable)."""
    return evaluate.load(metric_path(name))
