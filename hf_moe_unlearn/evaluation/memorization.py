"""Teacher-forced memorisation metrics and perplexity.

- **Exact memorisation** (Tirumala et al. 2022): fraction of target tokens that are the model's argmax
  given the true prefix.
- **Extraction strength** (Carlini et al. 2021, as used by OpenUnlearning): ``1 − k/|y|`` with ``k`` the
  smallest index such that the teacher-forced argmax equals the target on every position from ``k`` to
  the end, i.e. the shortest prefix of the answer after which the model reproduces the rest. ``k = 0``
  (whole answer reproduced) gives 1; if not even the last token is reproduced, ``k = |y|`` and the score
  is 0. (OpenUnlearning's loop leaves ``k = |y| − 1`` in that last case, giving ``1/|y|``; we use the
  definition.)
- **Perplexity** of texts: ``exp`` of the token-weighted mean NLL over all scored tokens.

Reference implementations drop the last answer token because their collator appends EOS to every
answer; here exactly the given continuation is scored, so append the EOS text yourself if you want it
counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import MoEUnlearnError
from ._checks import mean, require_aligned, require_nonempty
from .registry import register_metric
from .scoring import score_continuations, score_texts

Ids = Sequence[int] | torch.Tensor

__all__ = [
    "exact_memorization",
    "exact_memorization_from_ids",
    "extraction_strength",
    "extraction_strength_from_ids",
    "perplexity",
]


def _as_ids(argmax_ids: Ids, target_ids: Ids, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    predicted = torch.as_tensor(argmax_ids).flatten()
    target = torch.as_tensor(target_ids).flatten()
    if predicted.shape != target.shape:
        raise MoEUnlearnError(
            f"{metric}: argmax ids {tuple(predicted.shape)} and targets {tuple(target.shape)} differ in shape."
        )
    if target.numel() == 0:
        raise MoEUnlearnError(f"{metric}: nothing to score (empty target).")
    return predicted, target


def exact_memorization_from_ids(argmax_ids: Ids, target_ids: Ids) -> float:
    """Fraction of positions where the argmax equals the target."""
    predicted, target = _as_ids(argmax_ids, target_ids, "exact_memorization")
    return float((predicted == target).double().mean())


def extraction_strength_from_ids(argmax_ids: Ids, target_ids: Ids) -> float:
    """``1 − k/|y|``, ``k`` the start of the longest suffix on which argmax and target agree everywhere."""
    predicted, target = _as_ids(argmax_ids, target_ids, "extraction_strength")
    mismatches = (predicted != target).nonzero()
    k = 0 if mismatches.numel() == 0 else int(mismatches.max()) + 1
    return 1.0 - k / target.numel()


@register_metric("exact_memorization")
def exact_memorization(
    model,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 8,
    add_special_tokens: bool = True,
) -> dict[str, Any]:
    """Mean exact memorisation of ``answers`` given ``prompts``, with per-example values."""
    return _teacher_forced("exact_memorization", exact_memorization_from_ids, model, tokenizer, prompts, answers,
                           batch_size, add_special_tokens)


@register_metric("extraction_strength")
def extraction_strength(
    model,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 8,
    add_special_tokens: bool = True,
) -> dict[str, Any]:
    """Mean extraction strength of ``answers`` given ``prompts``, with per-example values."""
    return _teacher_forced("extraction_strength", extraction_strength_from_ids, model, tokenizer, prompts, answers,
                           batch_size, add_special_tokens)


def _teacher_forced(name, from_ids, model, tokenizer, prompts, answers, batch_size, add_special_tokens) -> dict:
    """Score answers teacher-forced and apply a per-example ``from_ids(argmax_ids, target_ids)`` measure."""
    scores = _score(name, model, tokenizer, prompts, answers, batch_size, add_special_tokens)
    values = [from_ids(s.argmax_ids, s.target_ids) for s in scores]
    return {name: mean(values), "per_example": values}


@register_metric("perplexity")
def perplexity(
    model, tokenizer, texts: Sequence[str], *, batch_size: int = 8, max_length: int | None = None
) -> dict[str, Any]:
    """Corpus perplexity ``exp(Σ NLL / Σ tokens)`` of ``texts``, and each text's own perplexity."""
    texts = list(texts)
    require_nonempty("perplexity", texts=texts)
    scores = score_texts(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    total_nll = -sum(s.sum_logprob for s in scores)
    total_tokens = sum(s.num_tokens for s in scores)
    return {
        "perplexity": math.exp(total_nll / total_tokens),
        "mean_nll": total_nll / total_tokens,
        "num_tokens": float(total_tokens),
        "per_example": [math.exp(s.mean_nll) for s in scores],
    }


def _score(metric, model, tokenizer, prompts, answers, batch_size, add_special_tokens):
    prompts, answers = list(prompts), list(answers)
    require_nonempty(metric, prompts=prompts)
    require_aligned(metric, prompts=prompts, answers=answers)
    return score_continuations(
        model, tokenizer, prompts, answers, batch_size=batch_size, add_special_tokens=add_special_tokens
    )
