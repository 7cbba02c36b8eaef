"""Routing diagnostics: how much of the forget and retain data each selected expert handles, before and after.

SEUF's anchor exists because unlearning can change *routing* instead of knowledge (the "routing shortcut"), and
TRACE's calibration is judged by retain-side frequencies: both are read off these shares.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..routing.attribution import attribute_experts
from ..routing.selection import ExpertSelection
from .registry import register_metric


@register_metric("routing_diagnostics")
def routing_diagnostics(
    model_after,
    tokenizer,
    forget: Sequence[str] | Any,
    retain: Sequence[str] | Any,
    selection: ExpertSelection | dict,
    *,
    model_before=None,
    batch_size: int = 8,
    max_length: int = 512,
) -> dict[str, Any]:
    """For each selected (layer, expert): its share of forget and retain tokens (fraction whose top-k contains
    it), after unlearning and, when ``model_before`` is given, before — plus the after/before ratio.

    Returns ``{"experts": {"L{layer}E{expert}": {"forget_after": .., "retain_after": .., "forget_before": ..,
    "retain_before": .., "forget_ratio": ..}}, "mean_forget_ratio": ..}`` (JSON-serialisable).
    """
    selection = ExpertSelection.coerce(selection)
    common = dict(batch_size=batch_size, max_length=max_length, show_progress=False)
    models = {"after": model_after} if model_before is None else {"before": model_before, "after": model_after}
    shares: dict[str, dict[str, float]] = {f"L{l}E{e}": {} for l, e in selection.pairs}
    for when, model in models.items():
        for split, data in (("forget", forget), ("retain", retain)):
            stats = attribute_experts(model, data, tokenizer, name=f"{split} set", **common)
            for layer, expert in selection.pairs:
                shares[f"L{layer}E{expert}"][f"{split}_{when}"] = float(stats.frequency(layer)[expert])
    result: dict[str, Any] = {"experts": shares}
    if model_before is not None:
        ratios = []
        for row in shares.values():
            row["forget_ratio"] = row["forget_after"] / max(row["forget_before"], 1e-12)
            ratios.append(row["forget_ratio"])
        result["mean_forget_ratio"] = sum(ratios) / len(ratios)
    return result
