"""Attribution: run a dataset through the model with the recorder on, and choose experts from the statistics.

``attribute_experts`` gives :class:`ExpertStats`; a strategy turns statistics into an
:class:`ExpertSelection`:

- :func:`select_seuf` — SEUF (Eq. 2 of the paper): rank experts by the mean per-sequence top-k-masked router
  probability on the forget set (or, as an option, the gate weight the model applies); default the single top
  expert over all layers.
- :func:`select_trace` — TRACE (the project's specification, docs/attribution.md): forget-critical experts
  from forget vs retain routing frequencies.
- :func:`select_explicit` — a user's mapping, validated against the model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import MoEUnlearnError
from ..moe.layers import config_fingerprint, unwrap_model
from .recorder import RouterRecorder
from .selection import ExpertSelection
from .stats import ExpertStats, check_seuf_score


def attribute_experts(
    model: nn.Module,
    dataset: Any,
    tokenizer=None,
    *,
    batch_size: int = 8,
    max_length: int = 512,
    max_tokens: int | None = None,
    accelerator=None,
    show_progress: bool = True,
    name: str = "dataset",
) -> ExpertStats:
    """Routing statistics of ``dataset`` on ``model``, under ``torch.no_grad``.

    Args:
        dataset: texts (list of str), a ``datasets.Dataset`` with a ``text`` column or prompt/answer columns
            (only answer tokens count), or an already tokenised dataset (``input_ids``[, ``labels``]).
        max_tokens: stop after about this many counted tokens (SEUF: ~100k tokens suffice).
        accelerator: an ``accelerate.Accelerator`` or ``PartialState``; each process takes a disjoint share of
            the examples (no padding duplicates) and the statistics are summed across processes.
    """
    from ..data.text import PaddingCollator, tokenize_dataset

    if tokenizer is not None and tokenizer.pad_token_id is None:
        raise MoEUnlearnError("The tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token.")
    tokenized = tokenize_dataset(dataset, tokenizer, max_length=max_length, name=name)
    pad_id = tokenizer.pad_token_id if tokenizer is not None else 0
    collate = PaddingCollator(pad_id)
    indices = list(range(len(tokenized)))
    is_main = True
    if accelerator is not None and accelerator.num_processes > 1:
        with accelerator.split_between_processes(indices, apply_padding=False) as shard:
            indices = list(shard)
        is_main = accelerator.is_main_process
    device = next(unwrap_model(model).parameters()).device
    was_training = model.training
    model.eval()
    recorder = RouterRecorder(model)
    counted = 0
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(indices), desc=f"Routing statistics ({name})", disable=not (show_progress and is_main))
        with recorder, torch.no_grad():
            for start in range(0, len(indices), batch_size):
                rows = tokenized.select(indices[start : start + batch_size])
                batch = collate([dict(r) for r in rows])
                mask = batch["attention_mask"] * (batch["labels"] != -100)
                recorder.set_mask(mask.to(device))
                model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    use_cache=False,
                )
                bar.update(len(rows))
                # Counting on the host from the CPU batch costs no device sync.
                counted += int(mask.sum())
                if max_tokens is not None and counted >= max_tokens:
                    break
        bar.close()
    finally:
        model.train(was_training)
    raw = recorder.raw_tensors() if recorder._tokens is not None else None
    if accelerator is not None and accelerator.num_processes > 1:
        if raw is None:
            raise MoEUnlearnError(f"Process {accelerator.process_index} got no example of the {name}: use fewer processes.")
        from accelerate.utils import reduce

        raw = {k: reduce(v.contiguous(), reduction="sum") for k, v in raw.items()}
    stats = recorder.stats(raw, dataset=name)
    return stats


# --- selection strategies ----------------------------------------------------------------------------------------


def select_seuf(
    stats: ExpertStats,
    top_m: int = 1,
    per_layer: bool = False,
    layers: list[int] | None = None,
    *,
    score: str = "masked_softmax",
) -> ExpertSelection:
    """SEUF selection: the ``top_m`` experts by Eq. 2 score, over all layers (default) or in each layer.

    The paper's finding is that one expert in one layer (``top_m=1``, global) unlearns best; more experts cut
    utility sharply. Shared experts are not routed, so they never appear in the statistics.

    ``score`` is the per-token g that Eq. 2 averages (see :meth:`ExpertStats.seuf_scores`): ``"masked_softmax"``
    (default, the paper's top-k-masked router probability) or ``"gate"`` (the gate weight the model applies;
    ranks differently on families that renormalise or scale the top-k). It is recorded in the selection's
    ``params["score"]``; the selection's ``scores`` and ``stats["seuf_score"]`` hold the values ranked by.
    """
    check_seuf_score(score)
    if top_m < 1:
        raise MoEUnlearnError(f"top_m must be at least 1, got {top_m}.")
    candidate_layers = layers if layers is not None else stats.layers
    table = {layer: stats.seuf_scores(layer, score=score) for layer in candidate_layers}
    if per_layer:
        experts = {layer: list(np.argsort(-scores, kind="stable")[:top_m]) for layer, scores in table.items()}
    else:
        flat = [(float(s), layer, e) for layer, scores in table.items() for e, s in enumerate(scores)]
        flat.sort(key=lambda t: (-t[0], t[1], t[2]))
        experts = {}
        for _, layer, e in flat[:top_m]:
            experts.setdefault(layer, []).append(e)
    scores = {layer: {int(e): float(table[layer][e]) for e in ids} for layer, ids in experts.items()}
    return ExpertSelection(
        experts={layer: [int(e) for e in ids] for layer, ids in experts.items()},
        method="seuf",
        scores=scores,
        stats={"seuf_score": {layer: dict(enumerate(map(float, row))) for layer, row in table.items()}},
        model_fingerprint=stats.model_fingerprint,
        params={"top_m": top_m, "per_layer": per_layer, "score": score},
    )


def trace_scores(forget: ExpertStats, retain: ExpertStats, eps: float = 1e-6) -> dict[str, dict[int, np.ndarray]]:
    """TRACE statistics per layer: f_F, f_R, ratio f_F/f_R and the forget-critical score
    c = f_F · log(f_F / (f_R + ε)) (the expert's term in KL(forget routing ‖ retain routing))."""
    forget.check_compatible(retain)
    out: dict[str, dict[int, np.ndarray]] = {"f_forget": {}, "f_retain": {}, "ratio": {}, "score": {}}
    for layer in forget.layers:
        f_f, f_r = forget.frequency(layer), retain.frequency(layer)
        with np.errstate(divide="ignore", invalid="ignore"):
            score = np.where(f_f > 0, f_f * np.log(np.maximum(f_f, 1e-300) / (f_r + eps)), 0.0)
        out["f_forget"][layer] = f_f
        out["f_retain"][layer] = f_r
        out["ratio"][layer] = f_f / np.maximum(f_r, eps)
        out["score"][layer] = score
    return out


def select_trace(
    forget: ExpertStats,
    retain: ExpertStats,
    *,
    tau: float = 1.0,
    rho: float = 1.1,
    top_m: int = 1,
    max_layers: int | None = None,
    eps: float = 1e-6,
) -> ExpertSelection:
    """TRACE selection: in each layer the top ``top_m`` eligible experts by forget-critical score.

    Eligible: ``f_F ≥ τ·k/E`` (forget tokens use it at least τ times the uniform rate) and ``f_F/f_R ≥ ρ``.
    ``max_layers`` keeps only the layers whose best selected score is highest. Raises, showing the best
    candidates, when nothing is eligible — never an empty selection.
    """
    if top_m < 1:
        raise MoEUnlearnError(f"top_m must be at least 1, got {top_m}.")
    table = trace_scores(forget, retain, eps)
    chosen: dict[int, list[int]] = {}
    best_score: dict[int, float] = {}
    candidates: list[tuple[float, int, int]] = []
    for i, layer in enumerate(forget.layers):
        k, num_experts = forget.top_k[i], forget.num_experts[i]
        f_f, ratio, score = table["f_forget"][layer], table["ratio"][layer], table["score"][layer]
        eligible = (f_f >= tau * k / num_experts) & (ratio >= rho)
        candidates += [(float(score[e]), layer, e) for e in range(num_experts)]
        order = [e for e in np.argsort(-score, kind="stable") if eligible[e]][:top_m]
        if order:
            chosen[layer] = [int(e) for e in order]
            best_score[layer] = float(score[order[0]])
    if not chosen:
        candidates.sort(key=lambda t: -t[0])
        lines = []
        for score, layer, e in candidates[:5]:
            i = forget.layers.index(layer)
            uniform = forget.top_k[i] / forget.num_experts[i]
            lines.append(
                f"  layer {layer} expert {e}: f_F={table['f_forget'][layer][e]:.4f} (τ·k/E={tau * uniform:.4f}), "
                f"f_F/f_R={table['ratio'][layer][e]:.3f} (ρ={rho}), score={score:.4g}"
            )
        raise MoEUnlearnError(
            "TRACE found no forget-critical expert: none is used by forget tokens at least τ times the uniform rate "
            "and ρ times more than by retain tokens. Best candidates:\n" + "\n".join(lines) + "\n"
            "Loosen the thresholds (trace_tau, trace_rho), or give an explicit selection."
        )
    if max_layers is not None:
        keep = sorted(best_score, key=lambda layer: -best_score[layer])[:max_layers]
        chosen = {layer: chosen[layer] for layer in sorted(keep)}

    def pick(name: str) -> dict[int, dict[int, float]]:
        return {layer: {e: float(table[name][layer][e]) for e in ids} for layer, ids in chosen.items()}

    return ExpertSelection(
        experts=chosen,
        method="trace",
        scores=pick("score"),
        stats={name: pick(name) for name in ("f_forget", "f_retain", "ratio")},
        model_fingerprint=forget.model_fingerprint,
        params={"tau": tau, "rho": rho, "top_m": top_m, "max_layers": max_layers, "eps": eps},
    )


def select_explicit(model: nn.Module, experts: dict[int, list[int]]) -> ExpertSelection:
    """A user-given ``{layer: [experts]}`` mapping, validated against ``model`` now rather than at training."""
    selection = ExpertSelection(experts=experts, method="explicit", model_fingerprint=config_fingerprint(model))
    selection.validate(model)
    return selection


def forget_concentration(forget: ExpertStats, retain: ExpertStats, *, ratio_threshold: float = 2.0) -> dict[str, Any]:
    """How much the forget set concentrates on few experts, per layer, two ways.

    ``layers``: the share of forget-token picks taken by the forget set's top-k experts, next to the share of
    retain-token picks the same experts take (uniform: k/E). Expert-selective unlearning relies on the first
    being high and the second low.

    ``top_expert``: the forget set's most-used expert e* = argmax_e f_F(l, e) (ties: the lowest id), with
    f_F(l, e*) and f_R(l, e*) (f: fraction of counted tokens whose top-k contains the expert, as
    :meth:`ExpertStats.frequency`) and their ratio (None when no retain token picks e*: unbounded). A layer
    counts in ``layers_at_ratio`` when f_F(e*) >= ``ratio_threshold`` · f_R(e*) and f_F(e*) > 0; SEUF and TRACE
    report such layers on pretrained MoE LLMs, where the forget domain concentrates on few experts.
    """
    forget.check_compatible(retain)
    layers, top_expert = [], []
    for i, layer in enumerate(forget.layers):
        k = forget.top_k[i]
        f_f, f_r = forget.frequency(layer), retain.frequency(layer)
        top = np.argsort(-f_f, kind="stable")[:k]
        layers.append({"layer": layer, "experts": [int(e) for e in top],
                       "forget_share": round(float(f_f[top].sum() / k), 4),
                       "retain_share": round(float(f_r[top].sum() / k), 4)})
        e_star = int(top[0])
        ff, fr = float(f_f[e_star]), float(f_r[e_star])
        top_expert.append({"layer": layer, "expert": e_star, "f_forget": round(ff, 4), "f_retain": round(fr, 4),
                           "ratio": round(ff / fr, 4) if fr > 0 else None,
                           "at_ratio": bool(ff > 0 and ff >= ratio_threshold * fr)})
    return {
        "uniform": forget.top_k[0] / forget.num_experts[0],
        "layers": layers,
        "mean_forget_share": round(sum(l["forget_share"] for l in layers) / len(layers), 4),
        "mean_retain_share": round(sum(l["retain_share"] for l in layers) / len(layers), 4),
        "top_expert": top_expert,
        "ratio_threshold": ratio_threshold,
        "layers_at_ratio": sum(t["at_ratio"] for t in top_expert),
        "num_layers": len(layers),
    }
