"""Side-by-side benchmark of unlearning methods on the synthetic MoE benchmark.

Every method unlearns the same pre-trained *target* model with the same step budget, learning rate and
data; the target (nothing forgotten) and the *retrain* model (never saw the forget set: the ideal
outcome) are evaluated the same way and written as reference rows. Only the unlearning seed varies
between seeds: the benchmark and the pre-trained pair are fixed (``benchmark_seed``), because
re-pre-training per seed would multiply the cost and mix two sources of variance.

Method names (see :data:`METHODS`):

- GA, GradDiff, NPO, RMU without "+SEUF" train LoRA on *every* expert of every MoE layer with no router
  anchor (the paper's "LoRA (all)" baseline): a baseline that trains nothing would forget nothing.
- "+SEUF": SEUF's top-1 expert selection with the router anchor (weight 1).
- RMU steers the residual stream at one decoder layer ℓ, the same for "RMU" and "RMU+SEUF"
  (:func:`rmu_layer_for`): "RMU" trains LoRA on every expert of layers ℓ−2..ℓ (the WMDP recipe trains layers
  5–7 and steers layer 7), "RMU+SEUF" the SEUF expert, which lies at or below ℓ.
- "TRACE": TRACE's selection and token-reweighted retain loss, no anchor; "SEUF+TRACE" combines SEUF's
  selection and anchor with TRACE's reweighting; TRACE methods use GradDiff's losses unless named otherwise.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from ..errors import MoEUnlearnError
from .synthetic import BenchmarkSpec, SyntheticBenchmark, format_qa_prompt, make_benchmark

__all__ = [
    "COLUMNS",
    "DEMO_METHODS",
    "METHODS",
    "BenchBudget",
    "MethodSpec",
    "evaluate_model",
    "resolve_methods",
    "run_benchmark",
]


@dataclass(frozen=True)
class MethodSpec:
    """One unlearning method: the loss/selection fields of ``MoEUnlearnConfig`` it sets.

    ``all_experts`` means an explicit selection of every expert (LoRA on all experts, no anchor).
    """

    forget_loss: str
    retain_loss: str
    all_experts: bool = False
    selection_method: str = "seuf"
    anchor_loss_weight: float = 0.0
    retain_weighting: str = "none"

    def config_fields(self) -> dict[str, Any]:
        """The ``MoEUnlearnConfig`` fields of this method (``all_experts`` is handled by the caller)."""
        fields = asdict(self)
        fields.pop("all_experts")
        return fields


def _baseline(forget: str, retain: str) -> MethodSpec:
    return MethodSpec(forget, retain, all_experts=True)


def _seuf(forget: str, retain: str) -> MethodSpec:
    return MethodSpec(forget, retain, selection_method="seuf", anchor_loss_weight=1.0)


METHODS: dict[str, MethodSpec] = {
    "GA": _baseline("ga", "none"),
    "GA+SEUF": _seuf("ga", "none"),
    "GradDiff": _baseline("ga", "nll"),
    "GradDiff+SEUF": _seuf("ga", "nll"),
    "NPO": _baseline("npo", "nll"),
    "NPO+SEUF": _seuf("npo", "nll"),
    "RMU": _baseline("rmu", "rmu_retain"),
    "RMU+SEUF": _seuf("rmu", "rmu_retain"),
    "TRACE": MethodSpec("ga", "nll", selection_method="trace", retain_weighting="trace"),
    "SEUF+TRACE": MethodSpec("ga", "nll", selection_method="seuf", anchor_loss_weight=1.0, retain_weighting="trace"),
    "NPO+TRACE": MethodSpec("npo", "nll", selection_method="trace", retain_weighting="trace"),
}

#: The handful of methods of ``hf-moe-unlearn demo``: a baseline, its SEUF variant, and the SEUF/TRACE variants.
DEMO_METHODS: tuple[str, ...] = ("GradDiff", "GradDiff+SEUF", "NPO+SEUF", "SEUF+TRACE")

#: Table columns, in order. Arrows say which way is better (→0: closer to zero; ≈retrain: closer to the retrain row).
COLUMNS: tuple[str, ...] = (
    "forget_mcq",       # ↓ (≈retrain, chance 0.25) forget MCQ accuracy, choices mode
    "forget_knowmem",   # ↓ ROUGE-L F1 of greedy answers to forget questions
    "verbmem",          # ↓ ROUGE-L F1 of continuations of forget passages
    "privleak",         # →0 Min-K AUC (forget vs holdout) relative to the retrain's
    "forget_quality",   # ↑ KS p-value of forget truth ratios vs the retrain's
    "retain_knowmem",   # ↑ ROUGE-L F1 on retain questions
    "utility_mcq",      # ↑ retain MCQ accuracy
    "ppl_general",      # ↓ perplexity on held-out-template passages about retain entities
    "routing_share",    # selected experts' share of forget routing, after / before unlearning
    "relearn_mcq",      # ↓ forget MCQ accuracy after a few fine-tuning steps on half the forget text
)


@dataclass(frozen=True)
class BenchBudget:
    """Step budget and evaluation sizes; the same for every method of a run, so the comparison is fair.

    Attributes:
        steps, batch_size, learning_rate, lora_r: the unlearning run (LoRA learning rates are far above full
            fine-tuning ones; these tiny models need a few hundred times SEUF's 1e-4 to move in tens of steps).
        n_mcq, n_qa, n_verbmem: evaluated examples per set (the first ones; sets are generated shuffled).
        verbmem_new_tokens, knowmem_new_tokens: generation lengths.
        relearn_steps, relearn_lr: the relearning probe.
    """

    steps: int
    batch_size: int = 8
    learning_rate: float = 2e-3
    lora_r: int = 8
    n_mcq: int = 48
    n_qa: int = 24
    n_verbmem: int = 12
    verbmem_new_tokens: int = 32
    knowmem_new_tokens: int = 8
    relearn_steps: int = 8
    relearn_lr: float = 1e-3

    @classmethod
    def preset(cls, size: str, **overrides: Any) -> BenchBudget:
        """Budget for a benchmark size (``micro`` for tests, ``small`` for the demo, ``full`` for bench)."""
        presets: dict[str, dict[str, Any]] = {
            "micro": dict(steps=2, batch_size=4, n_mcq=4, n_qa=2, n_verbmem=2, verbmem_new_tokens=4,
                          knowmem_new_tokens=2, relearn_steps=1),
            "small": dict(steps=30),
            "full": dict(steps=60, n_mcq=160, n_qa=64, n_verbmem=32, verbmem_new_tokens=48, relearn_steps=16),
        }
        if size not in presets:
            raise MoEUnlearnError(f"Unknown benchmark size {size!r}; choose one of {sorted(presets)}.")
        return cls(**{**presets[size], **overrides})


# ----------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------


def resolve_methods(methods: str | Sequence[str]) -> list[str]:
    """Method names from a comma list or a sequence, validated against :data:`METHODS` (case-insensitive)."""
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else [str(m).strip() for m in methods]
    names = [n for n in names if n]
    if not names:
        raise MoEUnlearnError(f"No method given; choose among: {', '.join(METHODS)}.")
    by_lower = {name.lower(): name for name in METHODS}
    unknown = [n for n in names if n.lower() not in by_lower]
    if unknown:
        raise MoEUnlearnError(f"Unknown method(s) {', '.join(map(repr, unknown))}; valid methods: {', '.join(METHODS)}.")
    return list(dict.fromkeys(by_lower[n.lower()] for n in names))


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise MoEUnlearnError(f"seeds must be a non-empty list of non-negative integers, got {seeds!r}.")
    return list(dict.fromkeys(seeds))


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _EvalData:
    """The evaluation subsets of a benchmark, cut once so every model sees the same examples."""

    forget_mcq: list[dict[str, Any]]
    retain_mcq: list[dict[str, Any]]
    forget_qa: Dataset
    retain_qa: Dataset
    verbmem_prompts: list[str]
    verbmem_gold: list[str]
    forget_texts: list[str]
    holdout_texts: list[str]
    general_texts: list[str]
    relearn_texts: list[str]


def _head(dataset: Dataset, n: int) -> Dataset:
    return dataset.select(range(min(n, len(dataset))))


def _split_passage(text: str) -> tuple[str, str]:
    """Prompt = the first half of the passage's words, gold = the rest (MUSE VerbMem's prompt/continuation)."""
    words = text.split(" ")
    cut = max(1, len(words) // 2)
    return " ".join(words[:cut]), " " + " ".join(words[cut:])


def _eval_data(benchmark: SyntheticBenchmark, budget: BenchBudget) -> _EvalData:
    passages = list(_head(benchmark.forget_text, budget.n_verbmem)["text"])
    split = [_split_passage(t) for t in passages]
    forget_texts = list(benchmark.forget_text["text"])  # datasets 5 returns a lazy Column
    return _EvalData(
        forget_mcq=list(_head(benchmark.forget_mcq, budget.n_mcq)),
        retain_mcq=list(_head(benchmark.retain_mcq, budget.n_mcq)),
        forget_qa=_head(benchmark.forget_qa, budget.n_qa),
        retain_qa=_head(benchmark.retain_qa, budget.n_qa),
        verbmem_prompts=[p for p, _ in split],
        verbmem_gold=[g for _, g in split],
        forget_texts=forget_texts,
        holdout_texts=list(benchmark.holdout_text["text"]),
        general_texts=list(_head(benchmark.general_text, max(budget.n_mcq, 8))["text"]),
        relearn_texts=forget_texts[: max(1, len(forget_texts) // 2)],
    )


def _knowmem(model, tokenizer, qa: Dataset, budget: BenchBudget) -> float:
    """MUSE KnowMem (mean ROUGE-L F1 of greedy answers), asked in the benchmark's own QA prompt.

    Not :func:`~hf_moe_unlearn.evaluation.knowmem` itself: its MUSE prompt ends in "Answer: " with a
    trailing space, which this word-level tokenizer (spaces belong to the next word) turns into an unknown
    token the models never saw. The generation, stop strings and ROUGE are the same as knowmem's.
    """
    from ..evaluation import generate_greedy, rouge_l
    from ..evaluation.prompts import KNOWMEM_STOP_STRINGS

    prompts = [format_qa_prompt(q) for q in qa["question"]]
    outputs = generate_greedy(model, tokenizer, prompts, max_new_tokens=budget.knowmem_new_tokens,
                              stop_strings=KNOWMEM_STOP_STRINGS)
    return statistics.fmean(rouge_l(outputs, list(qa["answer"]), measure="fmeasure"))


def _min_k_auc(model, tokenizer, data: _EvalData) -> float:
    from ..evaluation import mia_auc, min_k_prob

    return mia_auc(min_k_prob(model, tokenizer, data.forget_texts), min_k_prob(model, tokenizer, data.holdout_texts))


def _truth_ratios(model, tokenizer, qa: Dataset) -> list[float]:
    from ..evaluation import truth_ratio

    prompts = [format_qa_prompt(q) for q in qa["question"]]
    result = truth_ratio(model, tokenizer, prompts, [" " + a for a in qa["paraphrased_answer"]],
                         [[" " + a for a in answers] for answers in qa["perturbed_answers"]])
    return result["per_example"]


def evaluate_model(model, tokenizer, data: _EvalData, budget: BenchBudget) -> dict[str, Any]:
    """Every metric that needs only the model; the retrain-relative ones are added by :func:`_relative_metrics`."""
    from ..evaluation import mcq_accuracy, perplexity, verbmem

    model.eval()
    out: dict[str, Any] = {
        "forget_mcq": mcq_accuracy(model, tokenizer, data.forget_mcq, mode="choices", add_special_tokens=True)["accuracy"],
        "utility_mcq": mcq_accuracy(model, tokenizer, data.retain_mcq, mode="choices", add_special_tokens=True)["accuracy"],
        "forget_knowmem": _knowmem(model, tokenizer, data.forget_qa, budget),
        "retain_knowmem": _knowmem(model, tokenizer, data.retain_qa, budget),
        "verbmem": verbmem(model, tokenizer, data.verbmem_prompts, data.verbmem_gold,
                           max_new_tokens=budget.verbmem_new_tokens)["verbmem"],
        "ppl_general": perplexity(model, tokenizer, data.general_texts)["perplexity"],
        "_mink_auc": _min_k_auc(model, tokenizer, data),
        "_truth_ratios": _truth_ratios(model, tokenizer, data.forget_qa),
    }
    return out


def _relative_metrics(row: dict[str, Any], retrain: dict[str, Any]) -> None:
    """PrivLeak and forget quality, which are defined relative to the retrain model's values."""
    from ..evaluation import forget_quality, privleak

    # PrivLeak divides by 1 − AUC_retrain: undefined (shown as "–") if the retrain model separates perfectly.
    auc_retrain = retrain["_mink_auc"]
    row["privleak"] = privleak(row["_mink_auc"], auc_retrain)["privleak"] if auc_retrain < 1.0 else None
    row["forget_quality"] = forget_quality(row["_truth_ratios"], retrain["_truth_ratios"])["forget_quality"]


# ----------------------------------------------------------------------------------------------------------
# Routing share and relearning probe
# ----------------------------------------------------------------------------------------------------------


def _selected_share(stats, experts: dict[int, list[int]]) -> float:
    """Mean over the selected layers of the fraction of forget tokens whose top-k reaches a selected expert."""
    shares = [float(stats.frequency(layer)[ids].sum()) for layer, ids in experts.items()]
    return statistics.fmean(shares)


def _routing_share(model, tokenizer, texts: list[str], experts: dict[int, list[int]], before) -> float | None:
    """Selected experts' share of forget routing after unlearning / before.

    None when every expert is selected: the share is then 1 by construction and says nothing. Below 1 the
    forget tokens were routed away from the trained experts (what SEUF's anchor prevents).
    """
    from ..routing import attribute_experts

    if all(len(ids) == n for ids, n in zip(experts.values(), before.num_experts)) and len(experts) == len(before.layers):
        return None
    after = attribute_experts(model, texts, tokenizer, show_progress=False, name="forget set")
    denominator = _selected_share(before, experts)
    return _selected_share(after, experts) / denominator if denominator > 0 else None


def _relearn(model, tokenizer, texts: list[str], budget: BenchBudget, seed: int) -> torch.nn.Module:
    """A copy of ``model`` fine-tuned ``relearn_steps`` steps on ``texts`` (plain causal-LM loss, AdamW).

    A ten-line loop rather than a ``transformers.Trainer``: the Trainer's set-up (accelerator, output dir,
    callbacks) costs more than the handful of steps it would run here, once per model.
    """
    from ..data.text import PaddingCollator, tokenize_dataset

    probe = copy.deepcopy(model).train()
    device = next(probe.parameters()).device
    data = tokenize_dataset(texts, tokenizer, max_length=128, name="relearn set")
    collate = PaddingCollator(tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(data, batch_size=budget.batch_size, shuffle=True, collate_fn=collate,
                                         generator=generator)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=budget.relearn_lr)
    step = 0
    while step < budget.relearn_steps:
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
            probe(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step >= budget.relearn_steps:
                break
    return probe.eval()


def _relearn_mcq(model, tokenizer, data: _EvalData, budget: BenchBudget, seed: int) -> float:
    from ..evaluation import mcq_accuracy

    probe = _relearn(model, tokenizer, data.relearn_texts, budget, seed)
    accuracy = mcq_accuracy(probe, tokenizer, data.forget_mcq, mode="choices", add_special_tokens=True)["accuracy"]
    del probe
    return accuracy


# ----------------------------------------------------------------------------------------------------------
# Unlearning
# ----------------------------------------------------------------------------------------------------------


def rmu_layer_for(seuf_selection, num_layers: int) -> int:
    """The decoder layer RMU steers in the bench, shared by "RMU" and "RMU+SEUF" so the rows differ in experts only.

    At least layer 2, so the baseline trains three layers (ℓ−2..ℓ) as the WMDP recipe does, and at or above
    the SEUF expert's layer, whose parameters the RMU loss must reach.
    """
    return min(num_layers - 1, max(2, max(seuf_selection.layers)))


def _unlearn(target, tokenizer, benchmark: SyntheticBenchmark, method: MethodSpec, budget: BenchBudget,
             seed: int, workdir: Path, device: str | None, rmu_layer: int | None = None, seuf_selection=None):
    """Unlearn a copy of ``target`` with ``method``; returns the merged plain model and its expert selection."""
    from ..config import MoEUnlearnConfig
    from ..moe import find_moe_layers
    from ..trainer import MoEUnlearnTrainer

    model = copy.deepcopy(target).train()
    selection = None
    rmu = method.forget_loss == "rmu"
    if method.all_experts:
        layers = find_moe_layers(model)
        if rmu:
            layers = [layer for layer in layers if rmu_layer - 2 <= layer.index <= rmu_layer]
        selection = {layer.index: list(range(layer.num_experts)) for layer in layers}
    elif rmu and method.selection_method == "seuf":
        selection = seuf_selection  # the selection rmu_layer was chosen for
    retain = None if method.retain_loss == "none" else benchmark.retain_text
    config = MoEUnlearnConfig(
        output_dir=str(workdir / "unlearn-scratch"), **method.config_fields(), max_steps=budget.steps,
        per_device_train_batch_size=budget.batch_size, learning_rate=budget.learning_rate, lora_r=budget.lora_r,
        lora_alpha=2.0 * budget.lora_r, max_length=128, seed=seed, use_cpu=(device == "cpu"), report_to="none",
        save_strategy="no", disable_tqdm=True, logging_steps=max(1, budget.steps // 3), lr_scheduler_type="constant",
        # Tiny models in float32: mixed precision would only add noise to a comparison at this scale.
        bf16=False, fp16=False, rmu_layer=rmu_layer if rmu else None,
    )
    trainer = MoEUnlearnTrainer(model, config, forget_dataset=benchmark.forget_text, retain_dataset=retain,
                                processing_class=tokenizer, selection=selection)
    trainer.train()
    experts = dict(trainer.selection.experts)
    merged = trainer.model.merge_and_unload()
    del trainer
    return merged.eval(), experts


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------


def _aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each scalar column over seeds (columns a seed lacks, e.g. an undefined routing share, skipped)."""
    row: dict[str, Any] = {}
    for column in COLUMNS:
        values = [r[column] for r in per_seed if isinstance(r.get(column), (int, float)) and math.isfinite(r[column])]
        row[column] = statistics.fmean(values) if values else None
        if len(values) > 1:
            row[f"{column}_std"] = statistics.stdev(values)
    return row


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def _reference_rows(pair, tokenizer, data: _EvalData, budget: BenchBudget, seed: int) -> dict[str, dict[str, Any]]:
    rows = {name: evaluate_model(getattr(pair, name), tokenizer, data, budget) for name in ("target", "retrain")}
    for name, row in rows.items():
        _relative_metrics(row, rows["retrain"])
        row["relearn_mcq"] = _relearn_mcq(getattr(pair, name), tokenizer, data, budget, seed)
    return rows


def run_benchmark(
    methods: str | Sequence[str] = tuple(METHODS),
    seeds: Sequence[int] = (0,),
    size: str = "small",
    workdir: str | Path = "runs/bench",
    device: str | None = None,
    *,
    forget_setting: str = "domain",
    benchmark_seed: int = 0,
    budget: BenchBudget | None = None,
    spec: BenchmarkSpec | None = None,
    pretrain_settings=None,
    model_config: dict[str, Any] | None = None,
    log=print,
) -> dict[str, Any]:
    """Unlearn the benchmark's target model with each method and seed, evaluate, and write the reports.

    Args:
        methods: names from :data:`METHODS` (list or comma string).
        seeds: unlearning seeds; the table shows the mean over seeds, ``results.json`` every seed.
        size: ``"small"`` (demo) or ``"full"``; ``"micro"`` is for tests. Picks the benchmark, pre-training
            and :class:`BenchBudget` presets.
        workdir: where ``results.md``, ``results.json``, ``tradeoff.png`` and the pre-training cache go.
        device: ``"cpu"`` to force the CPU; None uses a GPU when there is one.
        forget_setting: ``"domain"`` (WMDP-like) or ``"entities"`` (TOFU-like).
        budget, spec, pretrain_settings, model_config: override the presets (tests use tiny ones).

    Returns:
        ``{"rows": {run: metrics}, "per_seed": ..., "paths": ..., "wall_seconds": ..., ...}``.
    """
    from ..evaluation import plot_tradeoff, results_table
    from ..routing import attribute_experts, forget_concentration
    from .pretrain import PretrainSettings, pretrain_models

    names = resolve_methods(methods)
    seeds = _check_seeds(seeds)
    budget = budget or BenchBudget.preset(size)
    spec = spec or BenchmarkSpec.preset(size, seed=benchmark_seed, forget=forget_setting)
    start = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    benchmark = make_benchmark(spec)
    pair = pretrain_models(benchmark, workdir / "pretrain-cache", model_config=model_config,
                           settings=pretrain_settings or PretrainSettings.preset(size), device=device)
    tokenizer = pair.tokenizer
    pretrain_seconds = time.perf_counter() - start
    log(f"[bench] pre-trained pair {'loaded from cache' if pair.reused else 'trained'} in {pretrain_seconds:.0f}s")
    data = _eval_data(benchmark, budget)
    before = attribute_experts(pair.target, data.forget_texts, tokenizer, show_progress=False, name="forget set")
    concentration = forget_concentration(
        before, attribute_experts(pair.target, list(benchmark.retain_text["text"]), tokenizer, show_progress=False,
                                  name="retain set"))

    rmu_layer = seuf_selection = None
    if any(METHODS[name].forget_loss == "rmu" for name in names):
        from ..routing import select_seuf

        seuf_selection = select_seuf(before)
        rmu_layer = rmu_layer_for(seuf_selection, pair.target.config.num_hidden_layers)

    rows = _reference_rows(pair, tokenizer, data, budget, seeds[0])
    per_seed: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        per_seed[name] = []
        for seed in seeds:
            t0 = time.perf_counter()
            model, experts = _unlearn(pair.target, tokenizer, benchmark, METHODS[name], budget, seed, workdir, device,
                                      rmu_layer=rmu_layer, seuf_selection=seuf_selection)
            row = evaluate_model(model, tokenizer, data, budget)
            _relative_metrics(row, rows["retrain"])
            row["routing_share"] = _routing_share(model, tokenizer, data.forget_texts, experts, before)
            row["relearn_mcq"] = _relearn_mcq(model, tokenizer, data, budget, seed)
            row["selected_experts"] = {str(k): v for k, v in experts.items()}
            row["seconds"] = time.perf_counter() - t0
            per_seed[name].append(_public(row))
            log(f"[bench] {name} seed {seed}: forget_mcq={row['forget_mcq']:.3f} "
                f"utility_mcq={row['utility_mcq']:.3f} ({row['seconds']:.0f}s)")
            del model
        rows[name] = _aggregate(per_seed[name])

    table_rows = {name: _public(row) for name, row in rows.items()}
    table = results_table(table_rows, list(COLUMNS))
    paths = {"table": workdir / "results.md", "json": workdir / "results.json", "plot": workdir / "tradeoff.png"}
    plot_tradeoff(table_rows, "forget_mcq", "utility_mcq", paths["plot"],
                  title="Utility (retain MCQ, ↑) vs forget MCQ accuracy (↓ = more forgetting)")
    wall = time.perf_counter() - start
    result = {
        "rows": table_rows, "per_seed": per_seed, "columns": list(COLUMNS), "methods": names, "seeds": seeds,
        "size": size, "forget_setting": spec.forget, "benchmark_spec": spec.to_dict(), "budget": asdict(budget),
        "pretrain_key": pair.key, "pretrain_reused": pair.reused, "pretrain_seconds": pretrain_seconds,
        "wall_seconds": wall, "rmu_layer": rmu_layer, "torch_threads": torch.get_num_threads(), "forget_concentration": concentration,
        "device": str(next(pair.target.parameters()).device),
        "paths": {k: str(v) for k, v in paths.items()}, "table": table,
    }
    paths["table"].write_text(_markdown_report(result))
    paths["json"].write_text(json.dumps(result, indent=2, default=str))
    return result


def _markdown_report(result: dict[str, Any]) -> str:
    seeds = ", ".join(map(str, result["seeds"]))
    return (
        f"# Unlearning benchmark ({result['size']}, forget setting: {result['forget_setting']})\n\n"
        f"Seeds: {seeds} (table: mean over seeds). Unlearning steps per method: {result['budget']['steps']}. "
        f"Device: {result['device']}, torch threads: {result['torch_threads']}. "
        f"Wall time: {result['wall_seconds']:.0f}s (pre-training {result['pretrain_seconds']:.0f}s, "
        f"{'cached' if result['pretrain_reused'] else 'trained'}).\n\n"
        f"Forget concentration (target): per layer, the forget set's top-k experts take "
        f"{result['forget_concentration']['mean_forget_share']:.2f} of forget-token picks and "
        f"{result['forget_concentration']['mean_retain_share']:.2f} of retain-token picks (uniform "
        f"{result['forget_concentration']['uniform']:.2f}).\n\n"
        "Lower is better: forget_mcq, forget_knowmem, verbmem, ppl_general, relearn_mcq. Higher: forget_quality, "
        "retain_knowmem, utility_mcq. privleak: closer to 0. Reference rows: target (nothing forgotten) and "
        "retrain (never saw the forget set). routing_share: '–' when every expert was trained.\n\n"
        + result["table"]
    )
