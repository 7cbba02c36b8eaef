"""Model card (README.md) of an expert-selective unlearning adapter, in the Hub's format.

The metadata block is produced by ``huggingface_hub.ModelCardData`` (so the Hub parses base model, library, tags and
``model-index`` evaluation results); the body says what was unlearned, how, and which experts changed.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..routing.selection import ExpertSelection

EvalResults = Mapping[str, Any] | Sequence[EvalResult]


def _eval_results(results: EvalResults | None, task_type: str = "text-generation") -> list[EvalResult]:
    """``EvalResult`` s from ``{dataset: {metric: value}}``, ``{"dataset/metric": value}`` or EvalResults as they are."""
    if not results:
        return []
    if not isinstance(results, Mapping):
        return list(results)
    out = []
    for key, value in results.items():
        if isinstance(value, Mapping):
            out += [EvalResult(task_type=task_type, dataset_type=key, dataset_name=key, metric_type=m, metric_value=v)
                    for m, v in value.items()]
        else:
            dataset, _, metric = key.rpartition("/")
            dataset = dataset or "unlearning-evaluation"
            out.append(EvalResult(task_type=task_type, dataset_type=dataset, dataset_name=dataset, metric_type=metric,
                                  metric_value=value))
    return out


def _hub_id(name: str | None) -> str | None:
    """``name`` when it can be a Hub repo id (``org/model``), None for local paths and empty names."""
    if not name or os.path.exists(name) or name.count("/") != 1 or name.startswith((".", "/")):
        return None
    return name


def _losses_text(losses: Sequence[str] | Mapping[str, float] | None) -> str:
    if not losses:
        return "not recorded"
    if isinstance(losses, Mapping):
        return " + ".join(f"{w:g} × {name}" for name, w in losses.items())
    return ", ".join(losses)


def build_model_card(
    base_model_name: str | None,
    selection: ExpertSelection | Mapping,
    method: str = "seuf",
    losses: Sequence[str] | Mapping[str, float] | None = None,
    eval_results: EvalResults | None = None,
    *,
    mode: str = "lora",
    r: int | None = None,
    train_router: bool = True,
    model_name: str | None = None,
) -> ModelCard:
    """A Hub model card for an expert-selective unlearning adapter.

    Args:
        base_model_name: Hub id (or local path) of the base model.
        selection: the experts the adapter changes.
        method: unlearning method, e.g. ``"seuf"``, ``"trace"``, ``"GA+SEUF"``.
        losses: loss names, or ``{name: weight}``.
        eval_results: ``{dataset: {metric: value}}``, ``{"dataset/metric": value}`` or ``EvalResult`` s.
        mode, r, train_router: how the experts were trained (``"lora"`` with rank r, or ``"full"``).
        model_name: name of the adapter in the card's results index (defaults to a name built from base and method).
    """
    selection = ExpertSelection.coerce(selection)
    hub_id = _hub_id(base_model_name)
    results = _eval_results(eval_results)
    name = model_name or f"{(base_model_name or 'moe').rstrip('/').split('/')[-1]}-{method}-unlearned"
    tags = ["peft", "lora" if mode == "lora" else "full-expert-tuning", "mixture-of-experts", "machine-unlearning",
            "hf-moe-unlearn", method]
    if hub_id:
        tags.append(f"base_model:adapter:{hub_id}")
    data = ModelCardData(
        base_model=hub_id,
        library_name="peft",
        pipeline_tag="text-generation",
        tags=tags,
        model_name=name if results else None,
        eval_results=results or None,
    )
    body = [
        f"# {name}",
        "",
        f"Expert-selective unlearning adapter for **{base_model_name or 'an unnamed base model'}**, made with "
        "hf-moe-unlearn. Only the experts listed below"
        + (" and their layers' routers" if train_router else "") + " were changed; every other weight is the base model's.",
        "",
        f"- **Unlearning method:** {method}",
        f"- **Losses:** {_losses_text(losses)}",
        "- **Trained parameters:** " + (f"LoRA (rank {r}) on the selected experts" if mode == "lora"
                                         else "full weights of the selected experts"),
        f"- **Expert selection:** {selection.method}, {len(selection)} expert(s) in {len(selection.layers)} layer(s)",
        "",
        "## Selected experts",
        "",
        "| layer | experts | score |",
        "|---|---|---|",
    ]
    for layer, experts in selection.experts.items():
        scores = selection.scores.get(layer, {})
        score = ", ".join(f"{scores[e]:.4g}" for e in experts if e in scores) or "-"
        body.append(f"| {layer} | {', '.join(map(str, experts))} | {score} |")
    body += ["", "## Evaluation", ""]
    if results:
        body += ["| dataset | metric | value |", "|---|---|---|"]
        body += [f"| {res.dataset_name} | {res.metric_type} | {res.metric_value} |" for res in results]
    else:
        body.append("No evaluation results were recorded with this adapter.")
    body += [
        "",
        "## Usage",
        "",
        "It is a standard PEFT adapter; hf-moe-unlearn is not needed to use it:",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f"base = AutoModelForCausalLM.from_pretrained(\"{base_model_name or '<base model>'}\")",
        "model = PeftModel.from_pretrained(base, \"<this repo>\")",
        "model = model.merge_and_unload()  # optional: a plain transformers model",
        "```",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
