"""Input checks and reductions shared by the metric modules (errors name the metric and the fix)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..errors import MoEUnlearnError


def require_nonempty(metric: str, **named: Sequence[Any]) -> None:
    for name, values in named.items():
        if len(values) == 0:
            raise MoEUnlearnError(f"{metric}: '{name}' is empty; give at least one example.")


def require_aligned(metric: str, **named: Sequence[Any]) -> None:
    """All named sequences have the same length (they describe the same examples)."""
    lengths = {name: len(values) for name, values in named.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{name}={n}" for name, n in lengths.items())
        raise MoEUnlearnError(f"{metric}: inputs must have one entry per example, got {detail}.")


def require_finite(metric: str, name: str, values: Sequence[float]) -> list[float]:
    out = [float(v) for v in values]
    bad = [i for i, v in enumerate(out) if not math.isfinite(v)]
    if bad:
        raise MoEUnlearnError(f"{metric}: '{name}' has non-finite values at positions {bad[:10]}.")
    return out


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))
