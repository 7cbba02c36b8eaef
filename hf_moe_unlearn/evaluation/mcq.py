"""Multiple-choice accuracy (WMDP, MMLU) scored like lm-eval-harness, the way published numbers are.

Zero-shot, by log-likelihood comparison, no generation: the predicted answer is the choice with the
highest log-likelihood as a continuation of the prompt. Two formats (see :mod:`.prompts`):

- ``mode="letters"`` (WMDP/MMLU default): the choices are listed as "A. ..", "B. .." and the model is
  scored on " A", " B", ... after "Answer:". This is what the WMDP paper and the RMU results report.
- ``mode="choices"`` (lm-eval ``acc``/``acc_norm``): each choice's text is the continuation; ``acc_norm``
  divides each log-likelihood by the choice's length in characters, as lm-eval does.

lm-eval-harness encodes without special tokens for causal LMs (unless ``add_bos_token=True`` is
passed), hence ``add_special_tokens=False`` by default here.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import MoEUnlearnError
from ._checks import mean, require_nonempty
from .prompts import LETTERS, choices_prompt, letters_prompt
from .registry import register_metric
from .scoring import choice_loglikelihoods

__all__ = ["mcq_accuracy"]

_MODES = ("letters", "choices")


@register_metric("mcq_accuracy")
def mcq_accuracy(
    model,
    tokenizer,
    questions: Iterable[Mapping[str, Any]],
    mode: str = "letters",
    *,
    subject: str | None = None,
    batch_size: int = 8,
    add_special_tokens: bool = False,
) -> dict[str, Any]:
    """Zero-shot multiple-choice accuracy.

    Args:
        questions: rows with ``question`` (str), ``choices`` (list of str) and ``answer`` (index of the
            correct choice), e.g. a ``cais/wmdp`` or ``cais/mmlu`` split; a row's own ``subject`` field,
            if present, overrides ``subject``.
        mode: "letters" or "choices" (see module docstring).
        subject: topic written in lm-eval's description line ("cybersecurity", "college_biology"); when
            neither this nor a row's ``subject`` is given the description line is left out.

    Returns:
        ``accuracy`` (lm-eval ``acc``), ``acc_norm`` (mode "choices" only), ``chance`` (mean of
        1/#choices), ``num_examples``, and per-example ``correct`` (0/1) and ``predictions`` (indices).
    """
    if mode not in _MODES:
        raise MoEUnlearnError(f"mcq_accuracy: mode must be one of {', '.join(_MODES)}, got {mode!r}.")
    rows = [_validated_row(i, row) for i, row in enumerate(questions)]
    require_nonempty("mcq_accuracy", questions=rows)

    prompts, continuations, lengths = [], [], []
    for row in rows:
        row_subject = row.get("subject") or subject
        if mode == "letters":
            prompts.append(letters_prompt(row["question"], row["choices"], row_subject))
            continuations.append([f" {LETTERS[j]}" for j in range(len(row["choices"]))])
        else:
            prompts.append(choices_prompt(row["question"], row_subject))
            continuations.append([f" {choice}" for choice in row["choices"]])
        lengths.append([float(len(choice)) for choice in row["choices"]])

    loglikelihoods = choice_loglikelihoods(
        model, tokenizer, prompts, continuations, batch_size=batch_size, add_special_tokens=add_special_tokens
    )
    predictions = [_argmax(lls) for lls in loglikelihoods]
    correct = [float(pred == row["answer"]) for pred, row in zip(predictions, rows)]
    result: dict[str, Any] = {
        "accuracy": mean(correct),
        "chance": mean([1.0 / len(row["choices"]) for row in rows]),
        "num_examples": float(len(rows)),
    }
    if mode == "choices":
        normalised = [
            _argmax([ll / max(n, 1.0) for ll, n in zip(lls, ns)]) for lls, ns in zip(loglikelihoods, lengths)
        ]
        result["acc_norm"] = mean([float(pred == row["answer"]) for pred, row in zip(normalised, rows)])
    result["correct"] = correct
    result["predictions"] = predictions
    return result


def _validated_row(index: int, row: Mapping[str, Any]) -> dict[str, Any]:
    missing = [key for key in ("question", "choices", "answer") if key not in row]
    if missing:
        raise MoEUnlearnError(
            f"mcq_accuracy: question {index} lacks {missing}; each row needs 'question', 'choices' (list) and "
            "'answer' (index of the correct choice), as in cais/wmdp and cais/mmlu."
        )
    choices = list(row["choices"])
    answer = row["answer"]
    if len(choices) < 2:
        raise MoEUnlearnError(f"mcq_accuracy: question {index} has {len(choices)} choice(s); at least 2 are needed.")
    if isinstance(answer, bool) or not isinstance(answer, numbers.Integral) or not 0 <= answer < len(choices):
        raise MoEUnlearnError(
            f"mcq_accuracy: question {index} has answer={answer!r}; it must be the index (0..{len(choices) - 1}) "
            "of the correct choice."
        )
    return {"question": row["question"], "choices": choices, "answer": int(answer), "subject": row.get("subject")}


def _argmax(values: list[float]) -> int:
    """First index of the maximum (lm-eval uses ``np.argmax``, which breaks ties the same way)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))
