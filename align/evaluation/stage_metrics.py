"""Each stage's headline metrics, as its record in `align/stages/registry.py` names them: the run report's metrics
table (`report.py`), the chain's one-line summary after each stage (`align/chain.py`) and the numbers on the Hub cards
(`align/hub/card.py`) read them through here. The metrics themselves are the `metrics` of each stage's
`align_stage.json`.
"""

from __future__ import annotations

from typing import Any

from align.stages import registry


def table_rows(stage: str) -> tuple[tuple[str, str], ...]:
    """(metric, label) rows of the report's metrics table for `stage`, in order; none for a stage not registered."""
    record = registry.find(stage)
    return record.metrics if record is not None else ()


def summary_line(stage: str, metrics: dict[str, Any]) -> str:
    """`metric value, ...` of the stage's headline metrics that `metrics` holds as numbers."""
    keys = registry.get(stage).headline
    return ", ".join(f"{k} {metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), (int, float)))


def format_value(v: Any) -> str:
    """A metric as a table shows it: 4 significant digits, whole numbers from 1,000 up (not `1.235e+04`)."""
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)
