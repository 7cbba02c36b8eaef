"""Routing diagnostics: how much of the forget and retain data each selected expert handles, before and after.

SEUF's anchor exists because unlearning can change *routing* instead of knowledge (the "routing shortcut"), and
TRACE's calibration is judged by retain-side frequencies: both are read off these shares.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import MoEUnlearnError
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


def same_topk(indices: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """[N] bool: whether each token's top-k *set* is the same in ``indices`` and ``other`` ([N, k] expert ids; the
    order within the top-k does not matter, some families return it unsorted)."""
    if indices.shape != other.shape:
        raise MoEUnlearnError(f"Top-k indices of different shapes: {tuple(indices.shape)} and {tuple(other.shape)}.")
    return (indices.sort(dim=-1).values == other.sort(dim=-1).values).all(dim=-1)


def _topk_sets(model, original, tokenizer, data, name: str, layers, batch_size: int, max_length: int):
    """Per layer, [tokens] bool "same top-k set before and after" over the counted tokens of ``data``."""
    from ..data.text import PaddingCollator, counted_mask, tokenize_dataset
    from ..moe.layers import unwrap_model
    from ..routing.recorder import RouterRecorder
    from .attacks import original_routing_source
    from .scoring import inference_mode

    before_model, before_context = original_routing_source(model, original, attack="routing stability")
    tokenized = tokenize_dataset(data, tokenizer, max_length=max_length, name=name)
    collate = PaddingCollator(tokenizer.pad_token_id if tokenizer is not None else 0)
    device = next(unwrap_model(model).parameters()).device
    after = RouterRecorder(model, layers=layers, accumulate=False, keep_current=True)
    before = after if before_model is unwrap_model(model) else RouterRecorder(
        before_model, layers=[l.index for l in after.layers], accumulate=False, keep_current=True)
    same: dict[int, list[torch.Tensor]] = {l.index: [] for l in after.layers}
    with after, before, inference_mode(model), inference_mode(before_model):
        for start in range(0, len(tokenized), batch_size):
            batch = collate([dict(r) for r in tokenized.select(range(start, min(start + batch_size, len(tokenized))))])
            mask = counted_mask(batch).reshape(-1).bool().to(device)
            inputs = dict(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                          use_cache=False)
            with before_context():
                before_model(**inputs)
            reference = {l: before.current_indices[l] for l in same}
            model(**inputs)
            for layer in same:
                same[layer].append(same_topk(after.current_indices[layer], reference[layer])[mask].cpu())
    return {layer: torch.cat(parts) for layer, parts in same.items()}


@register_metric("routing_stability")
def routing_stability(
    model,
    tokenizer,
    retain: Sequence[str] | Any,
    forget: Sequence[str] | Any | None = None,
    *,
    original=None,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    max_length: int = 512,
) -> dict[str, Any]:
    """How much unlearning moved the routing: the share of retain tokens whose top-k set is unchanged (GRIP reports
    > 95 %) and, with ``forget``, the share of forget tokens whose top-k set changed, per MoE layer and overall.

    The routing before unlearning comes from ``original`` (the base model) or, by default, ``model`` with its adapter
    disabled. ``layers``: the MoE layers to compare (default all: a change in one layer also moves the routing of the
    layers above it). Top-k sets are read with :class:`~hf_moe_unlearn.routing.RouterRecorder`; counted tokens are
    those with a label (padding and prompt tokens of prompt/answer data excluded).

    Returns ``retain_unchanged`` (over all layer × token pairs), ``retain_unchanged_all_layers`` (tokens unchanged
    in every layer), ``forget_changed`` / ``forget_changed_any_layer`` likewise, ``retain_tokens`` /
    ``forget_tokens``, and ``layers``: ``{"L{l}": {"retain_unchanged": .., "forget_changed": ..}}``.
    """
    result: dict[str, Any] = {"layers": {}}
    splits = {"retain": retain} if forget is None else {"retain": retain, "forget": forget}
    for split, data in splits.items():
        same = _topk_sets(model, original, tokenizer, data, f"{split} set", None if layers is None else list(layers),
                          batch_size, max_length)
        stacked = torch.stack(list(same.values())).float()  # [L, tokens]
        if split == "retain":
            result["retain_unchanged"] = float(stacked.mean())
            result["retain_unchanged_all_layers"] = float(stacked.min(dim=0).values.mean())
        else:
            result["forget_changed"] = float(1.0 - stacked.mean())
            result["forget_changed_any_layer"] = float(1.0 - stacked.min(dim=0).values.mean())
        result[f"{split}_tokens"] = float(stacked.shape[1])
        for layer, values in same.items():
            share = float(values.float().mean())
            key = "retain_unchanged" if split == "retain" else "forget_changed"
            result["layers"].setdefault(f"L{layer}", {})[key] = share if split == "retain" else 1.0 - share
    return result
