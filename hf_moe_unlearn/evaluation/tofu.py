"""TOFU's metrics, as defined by the TOFU paper and computed by OpenUnlearning.

- **Probability** of an answer: ``exp(−mean answer-token NLL)``, i.e. the geometric mean of the answer's
  per-token probabilities (only answer tokens count; the question is context). On real_authors and
  world_facts TOFU normalises it over the options: ``P(true) / (P(true) + Σ P(perturbed))``.
- **Truth ratio** per question: ``TR = P̄_perturbed / P_paraphrased``, with every P a per-token
  geometric mean as above and P̄_perturbed the geometric mean over the perturbed (false) answers, i.e.
  ``exp(−mean_j NLL_j)``. Aggregated as ``mean(min(TR, 1/TR))`` on the forget set (best when true and
  false answers are equally likely: "closer_to_1_better") and ``mean(max(0, 1 − TR))`` elsewhere (best
  when the true answer is much likelier: "true_better").
- **Forget quality**: p-value of the two-sample Kolmogorov–Smirnov test between the unlearned and the
  retrained model's per-question forget truth ratios (high = indistinguishable from retraining).
- **Model utility**: harmonic mean of the retain / real-authors / world-facts {probability, ROUGE,
  truth ratio} scores (nine numbers in TOFU).
- **ROUGE**: ROUGE-L recall of greedy answers (TOFU generates up to 200 new tokens), Porter stemmer.

Questions are passed exactly as the model should see them: for chat-tuned TOFU models first wrap them
with :func:`.prompts.chat_prompts` and pass ``add_special_tokens=False``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from scipy.stats import hmean, ks_2samp

from ..errors import MoEUnlearnError
from ._checks import mean, require_aligned, require_finite, require_nonempty
from .registry import register_metric
from .rouge import rouge_l
from .scoring import generate_greedy, score_continuations

__all__ = [
    "TRUTH_RATIO_AGGREGATIONS",
    "aggregate_truth_ratios",
    "answer_mean_nll",
    "answer_probability",
    "forget_quality",
    "model_utility",
    "qa_rouge",
    "truth_ratio",
    "truth_ratio_from_nll",
]

TRUTH_RATIO_AGGREGATIONS = ("closer_to_1_better", "true_better")


# ------------------------------------------------------------------------------------------ pure math


def truth_ratio_from_nll(paraphrased_mean_nll: float, perturbed_mean_nlls: Sequence[float]) -> float:
    """TR from mean per-token NLLs: ``exp(−mean(perturbed)) / exp(−paraphrased)``.

    Computed in log space (``exp(paraphrased − mean(perturbed))``), which is the same ratio without the
    underflow of two tiny probabilities; OpenUnlearning adds 1e-10 to the denominator instead.
    """
    if len(perturbed_mean_nlls) == 0:
        raise MoEUnlearnError("truth_ratio: a question has no perturbed answers; TOFU gives five per question.")
    return math.exp(paraphrased_mean_nll - mean(list(perturbed_mean_nlls)))


def aggregate_truth_ratios(ratios: Sequence[float], aggregation: str = "closer_to_1_better") -> float:
    """TOFU's aggregate of per-question truth ratios (see module docstring)."""
    _check_aggregation(aggregation)
    values = require_finite("truth_ratio", "ratios", ratios)
    require_nonempty("truth_ratio", ratios=values)
    if aggregation == "closer_to_1_better":
        return mean([min(tr, 1.0 / tr) for tr in values])
    return mean([max(0.0, 1.0 - tr) for tr in values])


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in TRUTH_RATIO_AGGREGATIONS:
        raise MoEUnlearnError(
            f"truth_ratio: aggregation must be one of {', '.join(TRUTH_RATIO_AGGREGATIONS)} "
            "('closer_to_1_better' for the forget set, 'true_better' for retain/real_authors/world_facts), "
            f"got {aggregation!r}."
        )


@register_metric("forget_quality")
def forget_quality(
    unlearned_tr: Sequence[float], retrain_tr: Sequence[float] | None = None
) -> dict[str, float]:
    """TOFU forget quality: KS-test p-value between unlearned and retrained per-question forget TRs."""
    if retrain_tr is None or len(retrain_tr) == 0:
        raise MoEUnlearnError(
            "forget_quality needs the retrained model's per-question truth ratios on the same forget set "
            "(retrain_tr): run truth_ratio(retrained_model, tokenizer, ...) on that forget set and pass its "
            "'per_example' list. TOFU's retrained models are the ones fine-tuned on the retain split only "
            "(e.g. retain90 for forget10)."
        )
    unlearned = require_finite("forget_quality", "unlearned_tr", unlearned_tr)
    retrained = require_finite("forget_quality", "retrain_tr", retrain_tr)
    require_nonempty("forget_quality", unlearned_tr=unlearned)
    test = ks_2samp(unlearned, retrained)
    return {"forget_quality": float(test.pvalue), "ks_statistic": float(test.statistic)}


@register_metric("model_utility")
def model_utility(scores: Mapping[str, float] | Sequence[float]) -> dict[str, float]:
    """Harmonic mean of the given utility scores (each in [0, 1]); 0 if any score is 0."""
    values = list(scores.values()) if isinstance(scores, Mapping) else list(scores)
    values = require_finite("model_utility", "scores", values)
    require_nonempty("model_utility", scores=values)
    negative = [v for v in values if v < 0]
    if negative:
        raise MoEUnlearnError(f"model_utility: scores must be non-negative, got {negative}.")
    if any(v == 0 for v in values):
        return {"model_utility": 0.0}
    return {"model_utility": float(hmean(values))}


# ------------------------------------------------------------------------------- model-based metrics


def answer_mean_nll(
    model,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 8,
    add_special_tokens: bool = True,
) -> list[float]:
    """Mean NLL per answer token of each answer given its question (OpenUnlearning's ``avg_loss``)."""
    scores = score_continuations(
        model, tokenizer, questions, answers, batch_size=batch_size, add_special_tokens=add_special_tokens
    )
    return [score.mean_nll for score in scores]


@register_metric("answer_probability")
def answer_probability(
    model,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    perturbed_answers_list: Sequence[Sequence[str]] | None = None,
    *,
    batch_size: int = 8,
    add_special_tokens: bool = True,
) -> dict[str, Any]:
    """TOFU Prob: mean over questions of ``exp(−mean answer NLL)``.

    With ``perturbed_answers_list`` (real_authors / world_facts) also ``normalized_probability``,
    ``P(answer) / (P(answer) + Σ_j P(perturbed_j))``, the version that enters model utility there.
    """
    questions, answers = list(questions), list(answers)
    require_nonempty("answer_probability", questions=questions)
    require_aligned("answer_probability", questions=questions, answers=answers)
    kwargs = {"batch_size": batch_size, "add_special_tokens": add_special_tokens}
    probs = [math.exp(-nll) for nll in answer_mean_nll(model, tokenizer, questions, answers, **kwargs)]
    result: dict[str, Any] = {"probability": mean(probs), "per_example": probs}
    if perturbed_answers_list is not None:
        wrong = _grouped_mean_nlls(model, tokenizer, questions, perturbed_answers_list, "answer_probability", kwargs)
        normalised = [p / (p + sum(math.exp(-nll) for nll in group)) for p, group in zip(probs, wrong)]
        result["normalized_probability"] = mean(normalised)
        result["normalized_per_example"] = normalised
    return result


@register_metric("truth_ratio")
def truth_ratio(
    model,
    tokenizer,
    questions: Sequence[str],
    paraphrased_answers: Sequence[str],
    perturbed_answers_list: Sequence[Sequence[str]],
    aggregation: str = "closer_to_1_better",
    *,
    batch_size: int = 8,
    add_special_tokens: bool = True,
) -> dict[str, Any]:
    """TOFU truth ratio per question and its aggregate.

    Args:
        paraphrased_answers: the true answer, paraphrased (TOFU ``paraphrased_answer``); on
            real_authors / world_facts, which have no paraphrase, the ``answer`` itself.
        perturbed_answers_list: per question, the false answers (TOFU ``perturbed_answer``).
        aggregation: "closer_to_1_better" (forget set) or "true_better" (others).
    Returns:
        ``truth_ratio`` (the aggregate) and ``per_example`` raw ratios (the input of forget quality).
    """
    _check_aggregation(aggregation)
    questions, paraphrased = list(questions), list(paraphrased_answers)
    require_nonempty("truth_ratio", questions=questions)
    require_aligned(
        "truth_ratio",
        questions=questions,
        paraphrased_answers=paraphrased,
        perturbed_answers_list=list(perturbed_answers_list),
    )
    kwargs = {"batch_size": batch_size, "add_special_tokens": add_special_tokens}
    true_nll = answer_mean_nll(model, tokenizer, questions, paraphrased, **kwargs)
    false_nll = _grouped_mean_nlls(model, tokenizer, questions, perturbed_answers_list, "truth_ratio", kwargs)
    ratios = [truth_ratio_from_nll(t, f) for t, f in zip(true_nll, false_nll)]
    return {"truth_ratio": aggregate_truth_ratios(ratios, aggregation), "per_example": ratios}


@register_metric("qa_rouge")
def qa_rouge(
    model,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    max_new_tokens: int = 200,
    *,
    measure: str = "recall",
    use_stemmer: bool = True,
    batch_size: int = 8,
    add_special_tokens: bool = True,
) -> dict[str, Any]:
    """TOFU ROUGE: mean ROUGE-L (recall by default) of greedy answers against the true answers."""
    questions, answers = list(questions), list(answers)
    require_nonempty("qa_rouge", questions=questions)
    require_aligned("qa_rouge", questions=questions, answers=answers)
    outputs = generate_greedy(
        model,
        tokenizer,
        questions,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        add_special_tokens=add_special_tokens,
    )
    scores = rouge_l([o.strip() for o in outputs], answers, measure=measure, use_stemmer=use_stemmer)
    return {"rouge": mean(scores), "per_example": scores, "generations": outputs}


def _grouped_mean_nlls(
    model,
    tokenizer,
    questions: Sequence[str],
    groups: Sequence[Sequence[str]],
    metric: str,
    kwargs: dict[str, Any],
) -> list[list[float]]:
    """Mean NLL of every answer of every group, scored in one batched pass and regrouped per question."""
    groups = [list(group) for group in groups]
    require_aligned(metric, questions=questions, perturbed_answers_list=groups)
    empty = [i for i, group in enumerate(groups) if not group]
    if empty:
        raise MoEUnlearnError(f"{metric}: questions {empty[:10]} have no perturbed answers.")
    flat_questions = [q for q, group in zip(questions, groups) for _ in group]
    flat_answers = [a for group in groups for a in group]
    flat = answer_mean_nll(model, tokenizer, flat_questions, flat_answers, **kwargs)
    out, offset = [], 0
    for group in groups:
        out.append(flat[offset : offset + len(group)])
        offset += len(group)
    return out
