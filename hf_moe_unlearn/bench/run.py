"""Side-by-side benchmark of unlearning methods on the synthetic MoE benchmark, compared at matched forgetting.

A comparison of methods means something only at matched forgetting: a table at one shared step budget and
learning rate ranks the budget (LoRA on all 32 experts forgets in 30 steps at 2e-3, one expert needs about ten
times the learning rate), not the method. So every method unlearns the same pre-trained *target* model with
each learning rate of one grid (the same grid for every method) and each seed, for ``steps`` steps, and is probed
along the way (step 0, every ``eval_every`` steps and the last step) with cheap metrics: forget MCQ accuracy,
utility (retain) MCQ accuracy and general perplexity (:func:`probe_metrics`, recorded by
:class:`TrajectoryCallback`). The *matched point* of a method and seed (:func:`choose_matched`) is the first probe
point of each learning rate's trajectory whose forget MCQ reaches the forget target (default: the retrain model's
forget MCQ + 0.05), and among learning rates the one with the best utility MCQ there (ties: the smaller learning
rate). The full evaluation (every column of :data:`COLUMNS`) then runs on the model restored at that point.

The target (nothing forgotten) and the *retrain* model (never saw the forget set: the ideal outcome, and the
gold reference of the forget target) are evaluated the same way and written as reference rows. Only the
unlearning seed varies between seeds: the benchmark and the pre-trained pair are fixed (``benchmark_seed``),
because re-pre-training per seed would multiply the cost and mix two sources of variance.

``match="none"`` keeps the old single-budget comparison: one learning rate, every method evaluated after
``steps`` steps (the trajectories are still recorded and plotted).

Method names (see :data:`METHODS`):

- GA, GradDiff, NPO, RMU without "+SEUF" train LoRA on *every* expert of every MoE layer with no router
  anchor (the paper's "LoRA (all)" baseline): a baseline that trains nothing would forget nothing.
- "+SEUF": SEUF's top-1 expert selection with the router anchor (weight 1).
- RMU steers the residual stream at one decoder layer ℓ, the same for "RMU" and "RMU+SEUF"
  (:func:`rmu_layer_for`): "RMU" trains LoRA on every expert of layers ℓ−2..ℓ (the WMDP recipe trains layers
  5–7 and steers layer 7), "RMU+SEUF" the SEUF expert, which lies at or below ℓ.
- "TRACE": TRACE's selection and token-reweighted retain loss, no anchor; "SEUF+TRACE" combines SEUF's
  selection and anchor with TRACE's reweighting; TRACE methods use GradDiff's losses unless named otherwise.
- "+GRIP": the same method with GRIP's router constraint (``router_constraint="grip"``, default ε): the trained
  routers' updates are projected onto the null space of the retain set's router inputs. "GradDiff+GRIP" is
  GradDiff (LoRA on every expert, every router trained) under the constraint; "SEUF+GRIP" is GradDiff+SEUF
  (SEUF's expert and anchor) under it; "NPO+SEUF+GRIP" likewise for NPO+SEUF. Every method trains the selected
  layers' routers (``train_router=True``), so a "+GRIP" row differs from its base row in the constraint alone.

Besides the utility and forget metrics, every unlearned model is attacked (:func:`_attack_metrics`): its forget MCQ
with the edited experts masked out of the routing, with the target's routing restored, and after the relearning
probe (the same steps, learning rate and data for every method), and its routing is compared with the target's
(routing stability).
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import TrainerCallback

from ..errors import MoEUnlearnError
from .synthetic import BenchmarkSpec, SyntheticBenchmark, format_qa_prompt, make_benchmark

__all__ = [
    "ATTACK_COLUMNS",
    "COLUMNS",
    "DEMO_METHODS",
    "FORGET_TARGET_MARGIN",
    "MATCHED_COLUMNS",
    "METHODS",
    "PROBE_METRICS",
    "BenchBudget",
    "MethodSpec",
    "TrajectoryCallback",
    "check_forget_target",
    "check_learning_rates",
    "choose_matched",
    "evaluate_model",
    "load_trainable_state",
    "method_selection",
    "probe_metrics",
    "resolve_methods",
    "run_benchmark",
    "trainable_state",
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
    adapter: str = "lora"
    retain_loss_weight: float = 1.0
    seuf_top_m: int = 1
    # Every bench method trains its selected layers' routers (the config's default, stated here because GRIP
    # constrains router updates and is refused without them).
    train_router: bool = True
    router_constraint: str = "none"
    grip_rank_cutoff: float | None = None  # None: the config's default (ε = 1e-2)

    def config_fields(self) -> dict[str, Any]:
        """The ``MoEUnlearnConfig`` fields of this method (``all_experts`` is handled by the caller)."""
        fields = asdict(self)
        fields.pop("all_experts")
        return {k: v for k, v in fields.items() if v is not None}


def _baseline(forget: str, retain: str) -> MethodSpec:
    return MethodSpec(forget, retain, all_experts=True)


def _seuf(forget: str, retain: str) -> MethodSpec:
    return MethodSpec(forget, retain, selection_method="seuf", anchor_loss_weight=1.0)


def _grip(method: MethodSpec) -> MethodSpec:
    """``method`` with GRIP's router constraint (default ε and ridge): everything else unchanged."""
    return replace(method, router_constraint="grip", train_router=True)


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
METHODS.update({
    "GradDiff+GRIP": _grip(METHODS["GradDiff"]),
    "SEUF+GRIP": _grip(METHODS["GradDiff+SEUF"]),
    "NPO+SEUF+GRIP": _grip(METHODS["NPO+SEUF"]),
})

#: The handful of methods of ``hf-moe-unlearn demo``: a baseline, its SEUF variant, and the SEUF/TRACE variants.
DEMO_METHODS: tuple[str, ...] = ("GradDiff", "GradDiff+SEUF", "NPO+SEUF", "TRACE", "SEUF+TRACE")

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
    # Routing attacks (hf_moe_unlearn.evaluation.attacks) on the unlearned model, and the same masking on the target:
    "mask_forget_mcq",  # ↓ forget MCQ, the edited experts masked out of the routing (– if a layer is all edited)
    "mask_target_mcq",  # reference: the target's forget MCQ with the same experts masked (what the others know)
    "restore_forget_mcq",  # ↓ forget MCQ with every token routed as the target routes it (edited experts kept)
    # Routing stability against the target (hf_moe_unlearn.evaluation.routing_stability), per token over all layers:
    "retain_route_kept",   # ↑ share of retain-set tokens whose top-k set is unchanged in every MoE layer
    "general_route_kept",  # ↑ the same on the held-out general texts (not seen by training or by GRIP's collection)
    "forget_route_changed",  # share of forget tokens whose top-k set changed in at least one MoE layer
)

#: The attack and routing-stability columns (:func:`_attack_metrics`); None in the reference rows.
ATTACK_COLUMNS: tuple[str, ...] = ("mask_forget_mcq", "mask_target_mcq", "restore_forget_mcq", "retain_route_kept",
                                   "general_route_kept", "forget_route_changed")

#: The cheap metrics measured at every probe point of a trajectory (a subset of :data:`COLUMNS`, computed by
#: :func:`probe_metrics` both along the trajectory and in the full evaluation, so the two agree).
PROBE_METRICS: tuple[str, ...] = ("forget_mcq", "utility_mcq", "ppl_general")

#: The columns of the matched-forgetting table: the matched point, utility at matched forgetting, then the rest.
MATCHED_COLUMNS: tuple[str, ...] = (
    "reached", "lr", "step", "forget_mcq", "utility_mcq", "retain_knowmem", "ppl_general",
    *(c for c in COLUMNS if c not in ("forget_mcq", "utility_mcq", "retain_knowmem", "ppl_general")),
)

#: Default forget target: the retrain model's forget MCQ accuracy plus this margin.
FORGET_TARGET_MARGIN = 0.05

#: Tolerance of the comparison forget_mcq <= target (accuracies are k/n, the target a float sum).
_TARGET_TOLERANCE = 1e-9

_MATCH_MODES = ("forget", "none")


# Why the presets' grid is (2e-3, 6e-3, 2e-2, 6e-2): measured 2026-12-02, seed 0, domain setting, 2 CPU cores, one
# torch thread; forget / utility MCQ along 60 steps (``first@step`` = the first probe point at or below the default
# target, retrain + 0.05):
#
# - small (48 MCQs, probes every 5; retrain 0.40, target 0.45): GradDiff (all 32 experts) 1e-3 first@45 (0.38 /
#   0.96), 2e-3 first@25 (0.44 / 0.96), 6e-3 first@15 (0.15 / 0.81), 2e-2 first@5 (0.17 / 0.75); GradDiff+SEUF
#   (one expert) 2e-3 never (0.65 at step 60), 6e-3 first@20 (0.35 / 0.73), 2e-2 first@10 (0.21 / 0.77), 6e-2
#   first@5 (0.29 / 0.67); NPO+SEUF only at 6e-2 (first@20, 0.44 / 0.92; 2e-2 plateaus at 0.65-0.73); TRACE 2e-3
#   first@35 (0.27 / 0.92); SEUF+TRACE 2e-2 first@10 (0.23 / 0.77). A small pair pre-trained with 2 torch threads
#   (pre-training is not bit-identical across thread counts) was slower to forget: GradDiff at 2e-3 / 6e-3 stood at
#   0.48 / 0.46 after 40 steps (target 0.43), hence 60 steps for the small preset too.
# - full (160 MCQs, probes every 10; retrain 0.23, target 0.28): GradDiff 2e-3 first@50 (0.24 / 0.76), 6e-3 first@20
#   (0.21 / 0.61); GradDiff+SEUF 2e-2 first@40 (0.26 / 0.88), 6e-2 first@20 (0.28 / 0.85); NPO+SEUF, RMU+SEUF and
#   NPO never reach it by 6e-2 (closest 0.62, 0.69 and 0.33, NPO at utility 0.31): NPO and RMU plateau rather than
#   needing a larger learning rate.
#
# So 2e-3 is the all-experts baseline's best learning rate, one expert needs 2e-2 (about 10x), and 6e-2 is where
# NPO+SEUF first forgets enough on the small benchmark; 1e-3 adds nothing (same utility as 2e-3, later).


@dataclass(frozen=True)
class BenchBudget:
    """Step budget, learning-rate grid and evaluation sizes; the same for every method of a run (fairness).

    Attributes:
        steps: unlearning steps of every trajectory (each method × learning rate × seed trains once this long).
        learning_rates: the grid every method is trained with (sorted, deduplicated). LoRA on one expert needs a
            far larger learning rate than LoRA on all experts to forget as much, so the grid spans that range.
        eval_every: probe the trajectory every this many steps (and at step 0 and the last step).
        batch_size, lora_r: the unlearning run (LoRA learning rates are far above full fine-tuning ones; these tiny
            models need a few hundred times SEUF's 1e-4 to move in tens of steps).
        n_mcq, n_qa, n_verbmem: evaluated examples per set (the first ones; sets are generated shuffled). The
            probes use the same MCQ sets as the full evaluation, so the forget MCQ of a matched point is the
            one in the table (up to the LoRA merge's rounding).
        verbmem_new_tokens, knowmem_new_tokens: generation lengths.
        relearn_steps, relearn_lr: the relearning probe.
    """

    steps: int
    learning_rates: tuple[float, ...] = (2e-3, 6e-3, 2e-2, 6e-2)
    eval_every: int = 10
    batch_size: int = 8
    lora_r: int = 8
    n_mcq: int = 48
    n_qa: int = 24
    n_verbmem: int = 12
    verbmem_new_tokens: int = 32
    knowmem_new_tokens: int = 8
    relearn_steps: int = 8
    relearn_lr: float = 1e-3

    def __post_init__(self) -> None:
        object.__setattr__(self, "learning_rates", check_learning_rates(self.learning_rates))
        _check_positive_int("steps", self.steps)
        _check_positive_int("eval_every", self.eval_every)

    @classmethod
    def preset(cls, size: str, **overrides: Any) -> BenchBudget:
        """Budget for a benchmark size (``micro`` for tests, ``small`` for the demo, ``full`` for bench).

        Overrides set to None are ignored (so ``preset(size, steps=args.steps)`` keeps the preset's default).
        """
        presets: dict[str, dict[str, Any]] = {
            "micro": dict(steps=2, eval_every=1, learning_rates=(2e-3, 2e-2), batch_size=4, n_mcq=4, n_qa=2,
                          n_verbmem=2, verbmem_new_tokens=4, knowmem_new_tokens=2, relearn_steps=1),
            # One grid for every method, from where LoRA on all experts forgets (2e-3) to where one expert does
            # (2e-2; NPO+SEUF only at 6e-2 on the small benchmark): see the note above BenchBudget.
            "small": dict(steps=60, eval_every=5, learning_rates=(2e-3, 6e-3, 2e-2, 6e-2)),
            "full": dict(steps=60, eval_every=10, learning_rates=(2e-3, 6e-3, 2e-2, 6e-2), n_mcq=160, n_qa=64,
                         n_verbmem=32, verbmem_new_tokens=48, relearn_steps=16),
        }
        presets["concentrated"] = presets["full"]  # same sizes; the benchmark and the models differ
        if size not in presets:
            raise MoEUnlearnError(f"Unknown benchmark size {size!r}; choose one of {sorted(presets)}.")
        return cls(**{**presets[size], **{k: v for k, v in overrides.items() if v is not None}})


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


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MoEUnlearnError(f"{name} must be a positive integer, got {value!r}.")
    return value


def check_learning_rates(learning_rates: Sequence[float] | float) -> tuple[float, ...]:
    """The learning-rate grid, sorted and deduplicated; an empty grid or a non-positive/non-finite rate is an error."""
    if isinstance(learning_rates, (int, float)) and not isinstance(learning_rates, bool):
        learning_rates = (learning_rates,)
    values = list(learning_rates)
    if not values:
        raise MoEUnlearnError("The learning-rate grid is empty; give at least one learning rate, e.g. 2e-3.")
    bad = [v for v in values
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0]
    if bad:
        raise MoEUnlearnError(f"Learning rates must be positive finite numbers, got {', '.join(map(repr, bad))}.")
    return tuple(sorted({float(v) for v in values}))


def check_forget_target(forget_target: float | None) -> float | None:
    """None (the retrain model's forget MCQ + :data:`FORGET_TARGET_MARGIN`) or an accuracy in [0, 1]."""
    if forget_target is None:
        return None
    if (isinstance(forget_target, bool) or not isinstance(forget_target, (int, float))
            or not math.isfinite(forget_target) or not 0.0 <= forget_target <= 1.0):
        raise MoEUnlearnError(
            f"forget_target must be a forget MCQ accuracy in [0, 1] (e.g. 0.3), got {forget_target!r}.")
    return float(forget_target)


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
    retain_texts: list[str]


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
        retain_texts=list(benchmark.retain_text["text"]),
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


def probe_metrics(model, tokenizer, data: _EvalData) -> dict[str, float]:
    """The cheap metrics of :data:`PROBE_METRICS`: forget and utility MCQ accuracy (choices mode) and general
    perplexity, without gradients and in eval mode (each submodule's mode is restored afterwards)."""
    from ..evaluation import mcq_accuracy, perplexity
    from ..evaluation.scoring import inference_mode

    with inference_mode(model):
        return {
            "forget_mcq": mcq_accuracy(model, tokenizer, data.forget_mcq, mode="choices",
                                       add_special_tokens=True)["accuracy"],
            "utility_mcq": mcq_accuracy(model, tokenizer, data.retain_mcq, mode="choices",
                                        add_special_tokens=True)["accuracy"],
            "ppl_general": perplexity(model, tokenizer, data.general_texts)["perplexity"],
        }


def evaluate_model(model, tokenizer, data: _EvalData, budget: BenchBudget) -> dict[str, Any]:
    """Every metric that needs only the model; the retrain-relative ones are added by :func:`_relative_metrics`."""
    from ..evaluation import verbmem

    model.eval()
    out: dict[str, Any] = {
        **probe_metrics(model, tokenizer, data),
        "forget_knowmem": _knowmem(model, tokenizer, data.forget_qa, budget),
        "retain_knowmem": _knowmem(model, tokenizer, data.retain_qa, budget),
        "verbmem": verbmem(model, tokenizer, data.verbmem_prompts, data.verbmem_gold,
                           max_new_tokens=budget.verbmem_new_tokens)["verbmem"],
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
    """A copy of ``model`` fine-tuned ``relearn_steps`` steps on ``texts`` (plain causal-LM loss, AdamW, every
    weight; ``model`` itself is left as it is).

    A ten-line loop rather than a ``transformers.Trainer``: the Trainer's set-up (accelerator, output dir,
    callbacks) costs more than the handful of steps it would run here, once per model.
    """
    from ..data.text import PaddingCollator, tokenize_dataset

    probe = copy.deepcopy(model).train()
    # Every weight trains, whatever the flags the model arrives with: a merged PEFT model keeps the base weights
    # frozen (only the trained routers still require grad), the target and retrain models none. Without this the
    # probe fine-tuned the routers alone for unlearned models and every weight for the reference rows: not one
    # attack budget for all.
    probe.requires_grad_(True)
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
# Routing attacks and routing stability
# ----------------------------------------------------------------------------------------------------------


def _edits_a_whole_layer(model, experts: dict[int, list[int]]) -> bool:
    """True when some layer has every routed expert edited: masking them would leave nothing to route to."""
    from ..moe import find_moe_layers

    sizes = {layer.index: layer.num_experts for layer in find_moe_layers(model)}
    return any(len(set(ids)) >= sizes[index] for index, ids in experts.items() if ids)


def _attack_metrics(model, target, tokenizer, data: _EvalData, experts: dict[int, list[int]]) -> dict[str, Any]:
    """The :data:`ATTACK_COLUMNS` of a merged unlearned ``model``, against the ``target`` it was unlearned from.

    - Expert masking (``mask_forget_mcq``): the forget MCQ with ``experts`` (the ones the method edited) removed
      from the routing, so every token goes to experts the unlearning did not train. ``mask_target_mcq`` is the same
      masking on the target: how much of the forget knowledge the other experts held before unlearning. Both None
      when a layer has every expert edited (the all-experts baselines): no expert would be left to route to.
    - Routing restore (``restore_forget_mcq``): the forget MCQ with every token routed as the target routes it (its
      top-k and gates), the unlearned experts kept. Teacher-forced scoring, so the restore's rule (the original must
      see the whole sequence) holds; it doubles the forwards of this one MCQ pass.
    - Routing stability against the target, per token over every MoE layer (the same denominator for every method:
      a method that trains one layer can change only the routing from that layer up): ``retain_route_kept`` on the
      benchmark's retain set (the texts the retain loss and GRIP's collection see), ``general_route_kept`` on the
      held-out general texts, ``forget_route_changed`` on the forget set. The full results, per layer, are returned
      under ``routing_stability`` (kept in results.json's per-seed rows).

    The merged model records no adapter, hence ``experts`` and ``original=target`` are always passed.
    """
    from ..evaluation import mask_experts, mcq_accuracy, restore_routing, routing_stability

    def forget_mcq(m) -> float:
        return mcq_accuracy(m, tokenizer, data.forget_mcq, mode="choices", add_special_tokens=True)["accuracy"]

    model.eval()
    out: dict[str, Any] = {"mask_forget_mcq": None, "mask_target_mcq": None}
    if not _edits_a_whole_layer(model, experts):
        with mask_experts(model, experts):
            out["mask_forget_mcq"] = forget_mcq(model)
        with mask_experts(target, experts):
            out["mask_target_mcq"] = forget_mcq(target)
    with restore_routing(model, original=target):
        out["restore_forget_mcq"] = forget_mcq(model)
    stability = routing_stability(model, tokenizer, data.retain_texts, data.forget_texts, original=target)
    general = routing_stability(model, tokenizer, data.general_texts, original=target)
    out.update(retain_route_kept=stability["retain_unchanged_all_layers"],
               general_route_kept=general["retain_unchanged_all_layers"],
               forget_route_changed=stability["forget_changed_any_layer"],
               routing_stability={"retain_and_forget": stability, "general": general})
    return out


# ----------------------------------------------------------------------------------------------------------
# Unlearning
# ----------------------------------------------------------------------------------------------------------


def rmu_layer_for(seuf_selection, num_layers: int) -> int:
    """The decoder layer RMU steers in the bench, shared by "RMU" and "RMU+SEUF" so the rows differ in experts only.

    At least layer 2, so the baseline trains three layers (ℓ−2..ℓ) as the WMDP recipe does, and at or above
    the SEUF expert's layer, whose parameters the RMU loss must reach.
    """
    return min(num_layers - 1, max(2, max(seuf_selection.layers)))


def method_selection(method: MethodSpec, model, rmu_layer: int | None = None, seuf_selection=None):
    """The explicit expert selection a method trains, or None for the trainer's own (SEUF/TRACE attribution).

    Baselines select every expert of every MoE layer (RMU: of layers ℓ−2..ℓ); "RMU+SEUF" the SEUF selection that
    ``rmu_layer`` was chosen for.
    """
    from ..moe import find_moe_layers

    rmu = method.forget_loss == "rmu"
    if method.all_experts:
        layers = find_moe_layers(model)
        if rmu:
            layers = [layer for layer in layers if rmu_layer - 2 <= layer.index <= rmu_layer]
        return {layer.index: list(range(layer.num_experts)) for layer in layers}
    if rmu and method.selection_method == "seuf":
        return seuf_selection
    return None


def _unlearn(target, tokenizer, benchmark: SyntheticBenchmark, method: MethodSpec, budget: BenchBudget,
             seed: int, workdir: Path, device: str | None, rmu_layer: int | None = None, seuf_selection=None, *,
             learning_rate: float | None = None, callbacks: Sequence[TrainerCallback] = (), merge: bool = True,
             record: dict[str, Any] | None = None):
    """Unlearn a copy of ``target`` with ``method``; returns the model and its expert selection.

    ``learning_rate``: default the grid's first. ``callbacks`` go to the trainer (a :class:`TrajectoryCallback` is
    bound to it for the run). ``merge``: return the merged plain model (True) or the live LoRA model (False).
    ``record``: filled with what the trainer actually ran (:func:`_run_record`: its router settings and, under
    GRIP, each constrained layer's null space), for results.json.
    """
    from ..config import MoEUnlearnConfig
    from ..trainer import MoEUnlearnTrainer

    model = copy.deepcopy(target).train()
    rmu = method.forget_loss == "rmu"
    selection = method_selection(method, model, rmu_layer, seuf_selection)
    retain = None if method.retain_loss == "none" else benchmark.retain_text
    config = MoEUnlearnConfig(
        output_dir=str(workdir / "unlearn-scratch"), **method.config_fields(), max_steps=budget.steps,
        per_device_train_batch_size=budget.batch_size,
        learning_rate=budget.learning_rates[0] if learning_rate is None else learning_rate, lora_r=budget.lora_r,
        lora_alpha=2.0 * budget.lora_r, max_length=128, seed=seed, use_cpu=(device == "cpu"), report_to="none",
        save_strategy="no", disable_tqdm=True, logging_steps=max(1, budget.steps // 3), lr_scheduler_type="constant",
        # Tiny models in float32: mixed precision would only add noise to a comparison at this scale.
        bf16=False, fp16=False, rmu_layer=rmu_layer if rmu else None,
    )
    trainer = MoEUnlearnTrainer(model, config, forget_dataset=benchmark.forget_text, retain_dataset=retain,
                                processing_class=tokenizer, selection=selection, callbacks=list(callbacks))
    bound = [cb for cb in callbacks if isinstance(cb, TrajectoryCallback)]
    for callback in bound:
        callback.bind(trainer)
    try:
        trainer.train()
    finally:
        for callback in bound:
            callback.bind(None)  # no reference to the trainer (and its optimizer) outlives the run
    experts = dict(trainer.selection.experts)
    if record is not None:
        record.update(_run_record(trainer))
    model = trainer.model
    del trainer
    if merge:
        return model.merge_and_unload().eval(), experts
    return model, experts


def _run_record(trainer) -> dict[str, Any]:
    """What a bench run's trainer ran with, read from the trainer (not the method spec): the router settings, and
    under GRIP each constrained router's null space (``trainer.grip``, built from the retain set before training)."""
    args = trainer.args
    grip = getattr(trainer, "grip", None)
    return {
        "config": {"router_constraint": args.router_constraint, "train_router": args.train_router,
                   "grip_rank_cutoff": args.grip_rank_cutoff, "grip_ridge": args.grip_ridge,
                   "anchor_loss_weight": args.anchor_loss_weight, "learning_rate": args.learning_rate},
        "grip": None if grip is None else {
            f"L{index}": {"null_dim": layer.null_dim, "dim": int(layer.directions.shape[0]), "tokens": layer.tokens,
                          "retain_energy_left": layer.retain_energy_left}
            for index, layer in grip.layers.items()},
    }


# ----------------------------------------------------------------------------------------------------------
# Trajectories and matching
# ----------------------------------------------------------------------------------------------------------


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every trainable parameter (the LoRA factors and trained routers: small)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Copy a :func:`trainable_state` back into ``model`` (in place); every saved name must exist there."""
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise MoEUnlearnError(f"load_trainable_state: the model has no parameter(s) {missing[:3]} of the saved state.")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
    return model


class TrajectoryCallback(TrainerCallback):
    """Probe the model along an unlearning run: at step 0, every ``eval_every`` steps and at the last step.

    Each probe point appends ``{"step": s, **probe(model)}`` to :attr:`points` and, with ``keep_states``, stores
    :func:`trainable_state` under :attr:`states` ``[s]``, so the model can be restored at any probe point
    (:func:`load_trainable_state`) with the LoRA still live. The probe runs without gradients (and
    :func:`probe_metrics` in eval mode); every submodule's mode is restored afterwards, and while it runs the
    trainer's router recorder is paused and its captured hidden states are kept, so training goes on exactly as
    without probes (the probes draw no random numbers either).

    ``stop_when(point)`` ends the run at the first probe point for which it is true (the bench passes "reaches
    the forget target": the matched point is the first such point, so later ones would be trained for nothing).
    """

    def __init__(self, probe, eval_every: int, *, keep_states: bool = True,
                 stop_when: Callable[[dict[str, Any]], bool] | None = None) -> None:
        self.probe = probe
        self.eval_every = _check_positive_int("eval_every", eval_every)
        self.keep_states = keep_states
        self.stop_when = stop_when
        self.points: list[dict[str, Any]] = []
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.trainer = None

    def bind(self, trainer) -> TrajectoryCallback:
        """The trainer whose recorder to pause while probing (None to drop the reference)."""
        self.trainer = trainer
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._record(model, state.global_step, control)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step % self.eval_every == 0 or step >= state.max_steps:
            self._record(model, step, control)

    def _record(self, model, step: int, control=None) -> None:
        if self.points and self.points[-1]["step"] == step:
            return
        recorder = getattr(self.trainer, "recorder", None)
        captured = getattr(self.trainer, "_captured_hidden", None)
        saved = dict(captured) if isinstance(captured, dict) else None
        enabled = recorder.enabled if recorder is not None else None
        modes = [(module, module.training) for module in model.modules()]
        if recorder is not None:
            recorder.enabled = False  # probe forwards must not touch the routing the losses read
        try:
            with torch.no_grad():
                values = dict(self.probe(model))
        finally:
            for module, training in modes:
                module.training = training
            if recorder is not None:
                recorder.enabled = enabled
            if saved is not None:
                captured.clear()
                captured.update(saved)
        self.points.append({"step": int(step), **values})
        if self.keep_states:
            self.states[int(step)] = trainable_state(model)
        if control is not None and self.stop_when is not None and self.stop_when(self.points[-1]):
            # Later points cannot be chosen (the matched point is the first one reaching the target), so training
            # them is wasted time. The Trainer reads the flag after each step: a target met at step 0 still
            # trains one step, which nothing uses.
            control.should_training_stop = True


def _reaches(point: dict[str, Any], target: float) -> bool:
    return point["forget_mcq"] <= target + _TARGET_TOLERANCE


def choose_matched(trajectories: dict[float, Sequence[dict[str, Any]]], target: float) -> dict[str, Any]:
    """The matched point of one method and seed over its learning-rate grid.

    Args:
        trajectories: ``{learning_rate: [probe points]}``; a point holds ``step``, ``forget_mcq`` and
            ``utility_mcq`` (points in any order: they are taken in step order).
        target: the forget target; a point reaches it when its ``forget_mcq`` <= target.

    Returns:
        ``{"reached", "lr", "step", "forget_mcq", "utility_mcq", "point"}``. Reached: for each learning rate the
        FIRST point that reaches the target, and among learning rates the one with the best utility MCQ there
        (ties: the smaller learning rate). Not reached (no point of any learning rate reaches it): the closest
        point, i.e. the lowest forget MCQ (ties: best utility, then the smaller learning rate, then the earlier
        step).
    """
    runs = {float(lr): sorted(points, key=lambda p: p["step"]) for lr, points in trajectories.items() if points}
    if not runs:
        raise MoEUnlearnError("choose_matched: no probe point in any trajectory.")
    firsts = []
    for lr, points in runs.items():
        first = next((p for p in points if _reaches(p, target)), None)
        if first is not None:
            firsts.append((lr, first))
    if firsts:
        lr, point = max(firsts, key=lambda c: (c[1]["utility_mcq"], -c[0]))
    else:
        lr, point = min(((lr, p) for lr, points in runs.items() for p in points),
                        key=lambda c: (c[1]["forget_mcq"], -c[1]["utility_mcq"], c[0], c[1]["step"]))
    return {"reached": bool(firsts), "lr": lr, "step": point["step"], "forget_mcq": point["forget_mcq"],
            "utility_mcq": point["utility_mcq"], "point": dict(point)}


def _final_point(trajectories: dict[float, Sequence[dict[str, Any]]], target: float) -> dict[str, Any]:
    """``match="none"``: the last point of the (single) learning rate's trajectory, reached or not."""
    (lr, points), = trajectories.items()
    point = max(points, key=lambda p: p["step"])
    return {"reached": _reaches(point, target), "lr": float(lr), "step": point["step"],
            "forget_mcq": point["forget_mcq"], "utility_mcq": point["utility_mcq"], "point": dict(point)}


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------


def _aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each scalar column over seeds (columns a seed lacks, e.g. an undefined routing share, skipped),
    and the sample standard deviation where there are at least two values."""
    row: dict[str, Any] = {}
    for column in COLUMNS:
        values = [r[column] for r in per_seed if isinstance(r.get(column), (int, float)) and math.isfinite(r[column])]
        row[column] = statistics.fmean(values) if values else None
        if len(values) > 1:
            row[f"{column}_std"] = statistics.stdev(values)
    return row


def _matched_row(per_seed: list[dict[str, Any]], match: str) -> dict[str, Any]:
    """A method's table row: the mean (± std) over the seeds that reached the target, or over every seed (at its
    closest point) when none did, or in ``match="none"`` mode; with how many seeds reached and the lr/step used."""
    reached = [r for r in per_seed if r["reached"]]
    used = reached if (match == "forget" and reached) else per_seed
    row = _aggregate(used)
    row.update(reached=len(reached), n_seeds=len(per_seed), aggregated_seeds=[r["seed"] for r in used],
               lrs=[r["lr"] for r in used], steps=[r["step"] for r in used])
    return row


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def _reference_rows(pair, tokenizer, data: _EvalData, budget: BenchBudget, seed: int) -> dict[str, dict[str, Any]]:
    rows = {name: evaluate_model(getattr(pair, name), tokenizer, data, budget) for name in ("target", "retrain")}
    for name, row in rows.items():
        _relative_metrics(row, rows["retrain"])
        row["relearn_mcq"] = _relearn_mcq(getattr(pair, name), tokenizer, data, budget, seed)
        # The attacks and routing stability compare an unlearned model with the target: nothing to compare here.
        row.update(dict.fromkeys(ATTACK_COLUMNS))
    return rows


def _resolve_target(forget_target: float | None, retrain_forget: float) -> tuple[float, str]:
    """The forget target and where it comes from; a user target the retrain model itself misses is an error."""
    if forget_target is None:
        target = min(1.0, retrain_forget + FORGET_TARGET_MARGIN)
        return target, f"retrain forget_mcq {retrain_forget:.3f} + {FORGET_TARGET_MARGIN}"
    if retrain_forget > forget_target + _TARGET_TOLERANCE:
        raise MoEUnlearnError(
            f"forget target {forget_target:g} is missed by the retrain model itself (its forget MCQ is "
            f"{retrain_forget:.3f}), the gold reference of unlearning: give a target >= {retrain_forget:.3f}, or leave "
            f"it unset for the default (retrain + {FORGET_TARGET_MARGIN} = "
            f"{min(1.0, retrain_forget + FORGET_TARGET_MARGIN):.3f}).")
    return forget_target, "user"


def _fmt(value: float | None, precision: int = 3) -> str:
    return "–" if value is None else f"{value:.{precision}f}"


def _joined(values: Sequence[Any], fmt=str) -> str | None:
    distinct = list(dict.fromkeys(values))
    return "/".join(fmt(v) for v in distinct) if distinct else None


def _table_rows(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Rows for :func:`~hf_moe_unlearn.evaluation.matched_table`: reached as "k/n", lr/step as text (one value,
    or the distinct per-seed values joined by "/")."""
    out = {}
    for name, row in rows.items():
        cells = {k: v for k, v in row.items() if k in COLUMNS or k.endswith("_std")}
        if "reached" in row:
            cells.update(reached=f"{row['reached']}/{row['n_seeds']}", lr=_joined(row["lrs"], lambda v: f"{v:g}"),
                         step=_joined(row["steps"]))
        out[name] = cells
    return out


def _with_spread(row: dict[str, Any], column: str, precision: int = 3) -> str:
    value = row.get(column)
    if value is None:
        return "–"
    text = f"{value:.{precision}f}"
    if row.get(f"{column}_std") is not None:
        text += f" ± {row[f'{column}_std']:.{precision}f}"
    return text


def _summary_line(name: str, row: dict[str, Any], target: float, match: str) -> str:
    """One line per method: reached the target or not, at what utility."""
    lr, step = _joined(row["lrs"], lambda v: f"{v:g}"), _joined(row["steps"])
    utility = (f"utility MCQ {_with_spread(row, 'utility_mcq')}, retain KnowMem {_with_spread(row, 'retain_knowmem')}, "
               f"general ppl {_with_spread(row, 'ppl_general', 1)}")
    attacks = (f"; forget MCQ under attack: experts masked {_with_spread(row, 'mask_forget_mcq')}, routing restored "
               f"{_with_spread(row, 'restore_forget_mcq')}, relearned {_with_spread(row, 'relearn_mcq')}; retain "
               f"routing kept {_with_spread(row, 'retain_route_kept')}")
    if match == "none":
        state = "reached" if row["reached"] == row["n_seeds"] else f"reached in {row['reached']}/{row['n_seeds']} seeds"
        if not row["reached"]:
            state = "did not reach"
        return (f"{name}: {state} forget MCQ <= {target:.3f} after {step} steps at lr {lr} "
                f"(forget MCQ {_with_spread(row, 'forget_mcq')}); {utility}" + attacks)
    if row["reached"]:
        return (f"{name}: reached forget MCQ <= {target:.3f} in {row['reached']}/{row['n_seeds']} seeds (lr {lr}, "
                f"step {step}; forget MCQ {_with_spread(row, 'forget_mcq')}); utility at matched forgetting: "
                f"{utility}" + attacks)
    return (f"{name}: did NOT reach forget MCQ <= {target:.3f} in any of {row['n_seeds']} seeds; closest forget MCQ "
            f"{_with_spread(row, 'forget_mcq')} (lr {lr}, step {step}), there {utility}" + attacks)


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
    learning_rates: Sequence[float] | None = None,
    steps: int | None = None,
    eval_every: int | None = None,
    forget_target: float | None = None,
    match: str = "forget",
    log=print,
) -> dict[str, Any]:
    """Unlearn the benchmark's target model with each method, learning rate and seed; compare at matched forgetting.

    Args:
        methods: names from :data:`METHODS` (list or comma string).
        seeds: unlearning seeds; the table shows the mean ± std over seeds, ``results.json`` every seed.
        size: ``"small"`` (demo) or ``"full"``; ``"micro"`` is for tests. Picks the benchmark, pre-training
            and :class:`BenchBudget` presets.
        workdir: where ``results.md``, ``results.json``, ``tradeoff.png`` and the pre-training cache go.
        device: ``"cpu"`` to force the CPU; None uses a GPU when there is one.
        forget_setting: ``"domain"`` (WMDP-like) or ``"entities"`` (TOFU-like).
        budget, spec, pretrain_settings, model_config: override the presets (tests use tiny ones).
        learning_rates, steps, eval_every: override the budget's grid, trajectory length and probe interval.
        forget_target: the forget MCQ accuracy each method must reach (default: the retrain model's + 0.05); an
            error if the retrain model itself scores above it.
        match: ``"forget"`` (compare at the matched point, :func:`choose_matched`) or ``"none"`` (the old
            single-budget table: one learning rate, every method evaluated after ``steps`` steps).

    Returns:
        ``{"rows": {run: metrics}, "per_seed": ..., "trajectories": [...], "choices": [...], "forget_target": ...,
        "summary": [one line per method], "paths": ..., "wall_seconds": ..., ...}``.
    """
    from ..evaluation.report import matched_table, plot_trajectories
    from ..routing import attribute_experts, forget_concentration
    from .pretrain import PretrainSettings, model_kwargs_for, pretrain_models

    names = resolve_methods(methods)
    seeds = _check_seeds(seeds)
    if match not in _MATCH_MODES:
        raise MoEUnlearnError(f"match must be one of {', '.join(_MATCH_MODES)}, got {match!r}.")
    forget_target = check_forget_target(forget_target)
    overrides = dict(learning_rates=learning_rates, steps=steps, eval_every=eval_every)
    if learning_rates is not None:
        overrides["learning_rates"] = check_learning_rates(learning_rates)
    if budget is None:
        budget = BenchBudget.preset(size, **overrides)
    else:
        budget = replace(budget, **{k: v for k, v in overrides.items() if v is not None})
    if match == "none" and len(budget.learning_rates) != 1:
        raise MoEUnlearnError(
            f"match='none' evaluates every method at one shared budget: give one learning rate (e.g. "
            f"--learning_rates 2e-3), not "
            f"{len(budget.learning_rates)} ({', '.join(f'{lr:g}' for lr in budget.learning_rates)}).")
    spec = spec or BenchmarkSpec.preset(size, seed=benchmark_seed, forget=forget_setting)
    start = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    benchmark = make_benchmark(spec)
    pair = pretrain_models(benchmark, workdir / "pretrain-cache",
                           model_config=model_kwargs_for(size) if model_config is None else model_config,
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
    target, target_source = _resolve_target(forget_target, rows["retrain"]["forget_mcq"])
    log(f"[bench] forget target: forget_mcq <= {target:.3f} ({target_source}; target model "
        f"{rows['target']['forget_mcq']:.3f}); grid lr {', '.join(f'{lr:g}' for lr in budget.learning_rates)}, "
        f"{budget.steps} steps, probes every {budget.eval_every}")

    def probe(model):
        return probe_metrics(model, tokenizer, data)

    choose = choose_matched if match == "forget" else _final_point
    per_seed: dict[str, list[dict[str, Any]]] = {}
    trajectories: list[dict[str, Any]] = []
    choices: list[dict[str, Any]] = []
    plot_lines: dict[str, list[list[dict[str, Any]]]] = {}
    plot_marks: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        per_seed[name] = []
        for seed in seeds:
            runs: dict[float, tuple[Any, dict[int, list[int]], TrajectoryCallback]] = {}
            records: dict[float, dict[str, Any]] = {}
            for lr in budget.learning_rates:
                t0 = time.perf_counter()
                callback = TrajectoryCallback(probe, budget.eval_every,
                                              stop_when=(lambda p: _reaches(p, target)) if match == "forget" else None)
                model, experts = _unlearn(pair.target, tokenizer, benchmark, METHODS[name], budget, seed, workdir,
                                          device, rmu_layer=rmu_layer, seuf_selection=seuf_selection,
                                          learning_rate=lr, callbacks=[callback], merge=False,
                                          record=records.setdefault(lr, {}))
                runs[lr] = (model, experts, callback)
                first = next((p["step"] for p in callback.points if _reaches(p, target)), None)
                seconds = time.perf_counter() - t0
                trajectories.append({"method": name, "seed": seed, "lr": lr, "points": callback.points,
                                     "first_reached_step": first, "seconds": seconds})
                last = callback.points[-1]
                log(f"[bench] {name} seed {seed} lr {lr:g}: forget_mcq {callback.points[0]['forget_mcq']:.3f} -> "
                    f"{last['forget_mcq']:.3f}, utility_mcq {last['utility_mcq']:.3f} at step {last['step']}; "
                    f"target {'first reached at step ' + str(first) if first is not None else 'not reached'} "
                    f"({seconds:.0f}s)")
            choice = choose({lr: cb.points for lr, (_, _, cb) in runs.items()}, target)
            choices.append({"method": name, "seed": seed, **{k: v for k, v in choice.items() if k != "point"}})
            t0 = time.perf_counter()
            live, experts, callback = runs[choice["lr"]]
            plot_lines.setdefault(name, []).append(callback.points)
            plot_marks.setdefault(name, []).append(choice["point"])
            load_trainable_state(live, callback.states[choice["step"]])
            del runs, callback
            model = live.merge_and_unload().eval()
            row = evaluate_model(model, tokenizer, data, budget)
            _relative_metrics(row, rows["retrain"])
            row["routing_share"] = _routing_share(model, tokenizer, data.forget_texts, experts, before)
            row["relearn_mcq"] = _relearn_mcq(model, tokenizer, data, budget, seed)
            row.update(_attack_metrics(model, pair.target, tokenizer, data, experts))
            row.update(records[choice["lr"]])
            row.update(seed=seed, reached=choice["reached"], lr=choice["lr"], step=choice["step"],
                       probe=choice["point"], selected_experts={str(k): v for k, v in experts.items()},
                       seconds=time.perf_counter() - t0)
            per_seed[name].append(_public(row))
            log(f"[bench] {name} seed {seed}: {'matched' if choice['reached'] else 'target not reached; closest'} "
                f"at lr {choice['lr']:g} step {choice['step']}: forget_mcq={row['forget_mcq']:.3f} "
                f"utility_mcq={row['utility_mcq']:.3f} retain_knowmem={row['retain_knowmem']:.3f}; under attack "
                f"forget_mcq: masked {_fmt(row['mask_forget_mcq'])}, restored {_fmt(row['restore_forget_mcq'])}, "
                f"relearned {row['relearn_mcq']:.3f}; retain routing kept {row['retain_route_kept']:.3f} "
                f"(full evaluation {row['seconds']:.0f}s)")
            del model, live
        rows[name] = _matched_row(per_seed[name], match)

    public_rows = {name: _public(row) for name, row in rows.items()}
    summary = [_summary_line(name, public_rows[name], target, match) for name in names]
    table = matched_table(_table_rows(public_rows), list(MATCHED_COLUMNS))
    paths = {"table": workdir / "results.md", "json": workdir / "results.json", "plot": workdir / "tradeoff.png"}
    labels = {name: f"{name} (lr {_joined(rows[name]['lrs'], lambda v: f'{v:g}')})" for name in names}
    plot_trajectories(
        {labels[n]: lines for n, lines in plot_lines.items()}, paths["plot"], x_metric="forget_mcq",
        y_metric="utility_mcq", highlight={labels[n]: marks for n, marks in plot_marks.items()},
        references={name: rows[name] for name in ("target", "retrain")}, x_line=target,
        x_line_label=f"forget target {target:.3f}",
        title="Utility (retain MCQ, ↑) vs forget MCQ (↓) along each method's trajectory at its chosen lr")
    wall = time.perf_counter() - start
    result = {
        "rows": public_rows, "per_seed": per_seed, "trajectories": trajectories, "choices": choices,
        "summary": summary, "forget_target": target, "forget_target_source": target_source, "match": match,
        "columns": list(COLUMNS), "table_columns": list(MATCHED_COLUMNS), "probe_metrics": list(PROBE_METRICS),
        "methods": names, "seeds": seeds, "size": size, "forget_setting": spec.forget,
        "benchmark_spec": spec.to_dict(), "budget": asdict(budget), "pretrain_key": pair.key,
        "pretrain_reused": pair.reused, "pretrain_seconds": pretrain_seconds, "wall_seconds": wall,
        "rmu_layer": rmu_layer, "torch_threads": torch.get_num_threads(), "forget_concentration": concentration,
        "device": str(next(pair.target.parameters()).device),
        "paths": {k: str(v) for k, v in paths.items()}, "table": table,
    }
    paths["table"].write_text(_markdown_report(result))
    paths["json"].write_text(json.dumps(result, indent=2, default=str))
    return result


def _concentration_line(c: dict[str, Any]) -> str:
    """How concentrated the forget set's routing is on the target (:func:`~hf_moe_unlearn.routing.forget_concentration`)."""
    ratios = ", ".join("–" if t["ratio"] is None else f"{t['ratio']:.2f}" for t in c["top_expert"])
    return (f"Forget concentration (target): per layer, the forget set's top-k experts take {c['mean_forget_share']:.2f} "
            f"of forget-token picks and {c['mean_retain_share']:.2f} of retain-token picks (uniform {c['uniform']:.2f}); "
            f"the forget set's most-used expert gets >= {c['ratio_threshold']:g}x its retain share in "
            f"{c['layers_at_ratio']} of {c['num_layers']} layers (forget/retain ratio per layer: {ratios}).")


def _markdown_report(result: dict[str, Any]) -> str:
    seeds = ", ".join(map(str, result["seeds"]))
    budget = result["budget"]
    grid = ", ".join(f"{lr:g}" for lr in budget["learning_rates"])
    if result["match"] == "forget":
        how = (f"Matched forgetting: every method trains {budget['steps']} steps at each learning rate of the grid "
               f"({grid}) and each seed, probed at step 0 and every {budget['eval_every']} steps (forget and utility "
               f"MCQ, general perplexity). Its matched point is the first probe point of each trajectory with forget "
               f"MCQ <= the target, and among learning rates the best utility MCQ there (ties: the smaller lr); the "
               f"full evaluation runs on the model restored at that point. Rows: mean ± std over the seeds that "
               f"reached the target (over every seed, at its closest point, when none did); `reached`: seeds that "
               f"reached it; `lr`/`step`: the chosen ones (distinct per-seed values joined by '/').")
    else:
        how = (f"Single shared budget (match none): every method trains {budget['steps']} steps at lr {grid} and is "
               f"evaluated at the last step; `reached` says whether that point is at or below the forget target. "
               f"Rows: mean ± std over seeds.")
    return (
        f"# Unlearning benchmark ({result['size']}, forget setting: {result['forget_setting']})\n\n"
        f"Seeds: {seeds}. Device: {result['device']}, torch threads: {result['torch_threads']}. "
        f"Wall time: {result['wall_seconds']:.0f}s (pre-training {result['pretrain_seconds']:.0f}s, "
        f"{'cached' if result['pretrain_reused'] else 'trained'}).\n\n"
        f"**Forget target: forget MCQ <= {result['forget_target']:.3f}** ({result['forget_target_source']}; "
        f"target model {result['rows']['target']['forget_mcq']:.3f}, retrain model "
        f"{result['rows']['retrain']['forget_mcq']:.3f}).\n\n"
        f"{how}\n\n"
        f"{_concentration_line(result['forget_concentration'])}\n\n"
        "Lower is better: forget_mcq, forget_knowmem, verbmem, ppl_general, relearn_mcq. Higher: forget_quality, "
        "retain_knowmem, utility_mcq. privleak: closer to 0. Reference rows: target (nothing forgotten) and "
        "retrain (never saw the forget set). routing_share: '–' when every expert was trained.\n\n"
        "Attacks on each unlearned model (lower forget MCQ under attack = the forgetting survives it): "
        "relearn_mcq after the relearning probe (the same steps, learning rate and data for every method); "
        "mask_forget_mcq with the edited experts masked out of the routing ('–' when every expert of a layer was "
        "edited: nothing left to route to), mask_target_mcq the target with the same experts masked; "
        "restore_forget_mcq with every token routed as the target routes it. Routing stability against the target, "
        "per token over all MoE layers: retain_route_kept (retain set) and general_route_kept (held-out general "
        "texts), share of tokens whose top-k set is unchanged in every layer; forget_route_changed, share of forget "
        "tokens whose top-k set changed in some layer. '–' in the reference rows.\n\n"
        "## Matched forgetting\n\n"
        + result["table"]
        + "\n## Per method\n\n"
        + "".join(f"- {line}\n" for line in result["summary"])
    )
