"""Results as a markdown table and a forget-vs-utility trade-off plot.

The plot is drawn on a bare matplotlib ``Figure`` with the Agg canvas rather than through ``pyplot``:
that writes a PNG without a display and without switching the global matplotlib backend of the
caller's session (a notebook keeps its inline backend).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import MoEUnlearnError

__all__ = ["plot_tradeoff", "results_table"]

_MISSING = "–"


def results_table(
    rows: Mapping[str, Mapping[str, float]], columns: Sequence[str] | None = None, *, precision: int = 3
) -> str:
    """Markdown table with one row per run (``rows`` keys) and one column per metric.

    ``columns`` defaults to every metric that appears in any row, in first-seen order. A metric a run
    lacks is shown as "–"; non-numeric values (per-example lists) are not table material and are
    rejected when asked for explicitly.
    """
    if not rows:
        raise MoEUnlearnError("results_table: no rows given.")
    if columns is None:
        columns = list(dict.fromkeys(key for metrics in rows.values() for key in metrics if _is_number(metrics[key])))
    columns = list(columns)
    header = "| run | " + " | ".join(columns) + " |"
    rule = "|---|" + "|".join("---:" for _ in columns) + "|"
    lines = [header, rule]
    for name, metrics in rows.items():
        cells = [_format(name, column, metrics.get(column), precision) for column in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_tradeoff(
    rows: Mapping[str, Mapping[str, float]],
    x_metric: str,
    y_metric: str,
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """Scatter of ``y_metric`` against ``x_metric``, one labelled point per run, saved as PNG at ``path``.

    Runs lacking either metric are left out; it is an error if none has both.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = [
        (name, float(m[x_metric]), float(m[y_metric]))
        for name, m in rows.items()
        if _is_number(m.get(x_metric)) and _is_number(m.get(y_metric))
    ]
    if not points:
        raise MoEUnlearnError(
            f"plot_tradeoff: no run has both {x_metric!r} and {y_metric!r}; "
            f"available metrics: {sorted({k for m in rows.values() for k in m})}."
        )
    figure = Figure(figsize=(6, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    # Runs that land on the same point (e.g. methods that did not move the model) share one stacked label, so
    # the names stay readable instead of overprinting each other.
    labels: dict[tuple[float, float], list[str]] = {}
    for name, x, y in points:
        axes.scatter([x], [y], s=36)
        labels.setdefault((round(x, 6), round(y, 6)), []).append(name)
    for (x, y), names in labels.items():
        axes.annotate("\n".join(names), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8, va="bottom")
    axes.set_xlabel(x_metric)
    axes.set_ylabel(y_metric)
    axes.set_title(title or f"{y_metric} vs {x_metric}")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _format(run: str, column: str, value: object, precision: int) -> str:
    if value is None:
        return _MISSING
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MoEUnlearnError(
            f"results_table: {run!r}/{column!r} is {type(value).__name__}, not a number; "
            "put only scalar metrics in the table."
        )
    value = float(value)
    return f"{value:.{precision}f}" if math.isfinite(value) else str(value)
