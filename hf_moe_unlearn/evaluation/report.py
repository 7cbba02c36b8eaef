"""Results as markdown tables and forget-vs-utility trade-off plots (points, or trajectories).

The plot is drawn on a bare matplotlib ``Figure`` with the Agg canvas rather than through ``pyplot``:
that writes a PNG without a display and without switching the global matplotlib backend of the
caller's session (a notebook keeps its inline backend).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import MoEUnlearnError

__all__ = ["matched_table", "plot_tradeoff", "plot_trajectories", "results_table"]

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


def matched_table(
    rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str], *, precision: int = 3, spread_suffix: str = "_std"
) -> str:
    """Markdown table like :func:`results_table`, for rows that mix text and numbers and carry a spread.

    A text cell (e.g. "2/3" seeds reached, a learning rate) is written as is; a number as in
    :func:`results_table`, followed by " ± s" when the row also holds ``column + spread_suffix``; a missing
    value (or None) as "–". Other value types (lists, dicts) are rejected.
    """
    if not rows:
        raise MoEUnlearnError("matched_table: no rows given.")
    columns = list(columns)
    lines = ["| run | " + " | ".join(columns) + " |", "|---|" + "|".join("---:" for _ in columns) + "|"]
    for name, metrics in rows.items():
        cells = []
        for column in columns:
            value = metrics.get(column)
            if isinstance(value, str):
                cells.append(value)
                continue
            cell = _format(name, column, value, precision)
            spread = metrics.get(column + spread_suffix)
            if value is not None and _is_number(spread):
                cell += f" ± {float(spread):.{precision}f}"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_trajectories(
    lines: Mapping[str, Sequence[Sequence[Mapping[str, float]]]],
    path: str | Path,
    *,
    x_metric: str,
    y_metric: str,
    highlight: Mapping[str, Sequence[Mapping[str, float]]] | None = None,
    references: Mapping[str, Mapping[str, float]] | None = None,
    x_line: float | None = None,
    x_line_label: str | None = None,
    title: str | None = None,
) -> Path:
    """Trajectories of ``y_metric`` against ``x_metric``, one colour per label, saved as PNG at ``path``.

    Args:
        lines: ``{label: [trajectory, ...]}``, a trajectory being the probe points (mappings holding both metrics)
            in training order; several trajectories of one label (e.g. seeds) share its colour and legend entry.
        highlight: ``{label: [point, ...]}`` drawn as large stars in the label's colour (e.g. the matched points).
        references: ``{name: row}`` drawn as black markers with their name (e.g. the target and retrain rows).
        x_line, x_line_label: a dashed vertical line (e.g. the forget target) and its legend entry.

    Points lacking either metric are skipped; it is an error if nothing is left to draw.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def xy(points):
        kept = [(float(p[x_metric]), float(p[y_metric])) for p in points
                if _is_number(p.get(x_metric)) and _is_number(p.get(y_metric))]
        return [x for x, _ in kept], [y for _, y in kept]

    drawable = any(xy(t)[0] for trajectories in lines.values() for t in trajectories)
    drawable = drawable or any(xy([row])[0] for row in (references or {}).values())
    if not drawable:
        raise MoEUnlearnError(f"plot_trajectories: no point has both {x_metric!r} and {y_metric!r}.")
    figure = Figure(figsize=(7, 5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for index, (label, trajectories) in enumerate(lines.items()):
        colour = f"C{index % 10}"
        for number, trajectory in enumerate(trajectories):
            xs, ys = xy(trajectory)
            axes.plot(xs, ys, marker="o", markersize=3.5, linewidth=1.2, alpha=0.85, color=colour,
                      label=label if number == 0 else None)
        marks = xy((highlight or {}).get(label, []))
        if marks[0]:
            axes.scatter(*marks, marker="*", s=180, color=colour, edgecolors="black", linewidths=0.8, zorder=5)
    for marker, (name, row) in zip("sD^v<>", (references or {}).items()):
        xs, ys = xy([row])
        if xs:
            axes.scatter(xs, ys, marker=marker, s=60, color="black", zorder=6)
            axes.annotate(name, (xs[0], ys[0]), textcoords="offset points", xytext=(6, -10), fontsize=8)
    if x_line is not None:
        axes.axvline(x_line, linestyle="--", color="grey", linewidth=1, label=x_line_label)
    if highlight:
        axes.scatter([], [], marker="*", s=120, color="white", edgecolors="black", label="matched point")
    axes.set_xlabel(x_metric)
    axes.set_ylabel(y_metric)
    axes.set_title(title or f"{y_metric} vs {x_metric}", fontsize=9)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7, loc="best")
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
