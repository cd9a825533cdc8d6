"""Plots of training curves and scores, for the run report (`report.py`) and the Hub cards (`align/hub/card.py`).

One look for both: panels of 4.4 x 3.2 inches at 100 dpi, markers on short series, a legend when a panel holds more
than one line. matplotlib's Agg canvas is used directly (no pyplot), so no GUI backend and no global state is
touched, and matplotlib is imported only when something is drawn.
"""

from __future__ import annotations

import io
import math
from typing import Any

PANEL_SIZE = (4.4, 3.2)  # inches, one panel
MARKERS_BELOW = 15  # points: a short series gets a marker per point, so a 3-update run still shows its 3 values
_NOT_CURVES = ("epoch", "step", "total_flos")


# ---------------------------------------------------------------------------------------------------------------------
# Trainer's log_history


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def logged_steps(log_history: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The entries of Trainer's `log_history` that say at which step they were logged."""
    return [e for e in log_history or [] if isinstance(e, dict) and _number(e.get("step"))]


def series(log_history: list[dict[str, Any]] | None, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key`, where it is a finite number."""
    pts = [(e["step"], e[key]) for e in logged_steps(log_history) if _number(e.get(key))]
    return [x for x, _ in pts], [y for _, y in pts]


def curve_keys(log_history: list[dict[str, Any]]) -> list[str]:
    """The numeric series worth a curve, in first-logged order: not the step counters, runtimes, throughputs or the
    one-off `train_loss`."""
    keys: dict[str, None] = {}
    for entry in log_history:
        for k, v in entry.items():
            if k in _NOT_CURVES or k.endswith(("_runtime", "_per_second")) or k == "train_loss":
                continue
            if _number(v):
                keys[k] = None
    return list(keys)


def curve_panels(keys: list[str]) -> list[list[str]]:
    """Group `x` with `eval_x` (train vs held-out on one axis); `loss` first, then `learning_rate`, then the rest."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        base = k[len("eval_") :] if k.startswith("eval_") and k[len("eval_") :] in keys else k
        groups.setdefault(base, []).append(k)
    first = [g for g in ("loss", "learning_rate", "grad_norm") if g in groups]
    return [groups[g] for g in first + sorted(set(groups) - set(first))]


# ---------------------------------------------------------------------------------------------------------------------
# Drawing


def figure(ncols: int, nrows: int = 1, title: str | None = None):
    """(figure, axes in row-major order) of `nrows` x `ncols` panels, `title` over them all."""
    # start-up time: matplotlib loads only when something is drawn (the cards and `align push` import this module)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(PANEL_SIZE[0] * ncols, PANEL_SIZE[1] * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig, [fig.add_subplot(nrows, ncols, i + 1) for i in range(nrows * ncols)]


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def line_panel(
    ax, log_history, keys: list[tuple[str, str]], title: str, hline: tuple[float | None, str] | None = None
) -> bool:
    """One curve per `(key, label)` of `keys` against `step`, and a dashed reference line `hline` (value, label) when
    its value is not None. Returns whether any curve had data."""
    lines = 0
    for key, label in keys:
        xs, ys = series(log_history, key)
        if xs:
            ax.plot(xs, ys, marker="o" if len(xs) < MARKERS_BELOW else None, markersize=3, label=label)
            lines += 1
    drawn = lines > 0
    if hline is not None and hline[0] is not None:
        ax.axhline(hline[0], color="grey", linestyle="--", linewidth=1, label=hline[1])
        lines += 1
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    if drawn and lines > 1:
        ax.legend(fontsize=7)
    return drawn


def bar_panel(ax, names: list[str], values: list[float], colors: list[str], *, title: str, ylabel: str,
              faded: int = 0) -> None:  # fmt: skip
    """Bars in [0, 1], each annotated with its value; the last `faded` of them drawn lighter."""
    bars = ax.bar(names, values, color=colors)
    for bar in bars[len(bars) - faded :]:
        bar.set_alpha(0.55)
    for bar, v in zip(bars, values, strict=True):
        ax.annotate(f"{v:.3f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=8)


def has_curves(log_history: list[dict[str, Any]] | None) -> bool:
    """Whether `training_curves_png` would draw anything."""
    return bool(curve_panels(curve_keys(logged_steps(log_history))))


def training_curves_png(log_history: list[dict[str, Any]] | None, title: str, max_panels: int = 9) -> bytes | None:
    """A PNG of every numeric series in Trainer's `log_history` against `step` (`curve_panels`, three panels a row),
    or None if there is nothing to plot."""
    rows = logged_steps(log_history)
    panels = curve_panels(curve_keys(rows))[:max_panels]
    if not panels:
        return None
    ncols = min(3, len(panels))
    fig, axes = figure(ncols, math.ceil(len(panels) / ncols), title)
    for ax, keys in zip(axes, panels, strict=False):
        line_panel(ax, rows, [(k, k) for k in keys], " / ".join(keys))
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    return png(fig)
