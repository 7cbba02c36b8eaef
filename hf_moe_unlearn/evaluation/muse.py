"""MUSE's memorisation metrics: VerbMem and KnowMem (ROUGE-L F1 of greedy generations).

Reproduces the MUSE repository's ``eval_verbmem`` / ``eval_knowmem``: prompts encoded with special
tokens, greedy decoding, ROUGE-L F1 without stemming. VerbMem compares the 128-token continuation of
a forget-set excerpt with the true continuation truncated to the same 128 tokens; KnowMem asks
few-shot questions and cuts the answer at the next "Question". MUSE reports these ×100; we report
fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ._checks import mean, require_aligned, require_nonempty
from .prompts import KNOWMEM_STOP_STRINGS, knowmem_prompt
from .registry import register_metric
from .rouge import rouge_l
from .scoring import generate_greedy

__all__ = ["knowmem", "truncate_to_tokens", "verbmem"]


def truncate_to_tokens(tokenizer, text: str, max_tokens: int) -> str:
    """``text`` cut to its first ``max_tokens`` tokens, as MUSE truncates the gold continuation.

    MUSE encodes with special tokens before slicing, so a BOS token counts towards ``max_tokens``; kept
    as is for comparable numbers.
    """
    ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_tokens]
    return tokenizer.decode(ids, skip_special_tokens=True)


@register_metric("verbmem")
def verbmem(
    model,
    tokenizer,
    prompts: Sequence[str],
    gold_continuations: Sequence[str],
    max_new_tokens: int = 128,
    *,
    batch_size: int = 8,
    use_stemmer: bool = False,
) -> dict[str, Any]:
    """MUSE VerbMem: mean ROUGE-L F1 between greedy continuations and the (truncated) true ones.

    Args:
        prompts, gold_continuations: the ``prompt`` and ``gt`` columns of MUSE ``verbmem/forget``.
    Returns:
        ``verbmem`` (mean F1), ``rougeL_recall`` (mean recall), per-example ``per_example`` F1 and the
        ``generations``.
    """
    prompts, gold = list(prompts), list(gold_continuations)
    require_nonempty("verbmem", prompts=prompts)
    require_aligned("verbmem", prompts=prompts, gold_continuations=gold)
    outputs = generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    references = [truncate_to_tokens(tokenizer, text, max_new_tokens) for text in gold]
    f1 = rouge_l(outputs, references, measure="fmeasure", use_stemmer=use_stemmer)
    recall = rouge_l(outputs, references, measure="recall", use_stemmer=use_stemmer)
    return {"verbmem": mean(f1), "rougeL_recall": mean(recall), "per_example": f1, "generations": outputs}


@register_metric("knowmem")
def knowmem(
    model,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    icl_examples: Iterable[tuple[str, str] | Mapping[str, str]] = (),
    max_new_tokens: int = 32,
    *,
    batch_size: int = 8,
    use_stemmer: bool = False,
) -> dict[str, Any]:
    """MUSE KnowMem: mean ROUGE-L F1 of greedy few-shot answers against the true answers.

    Args:
        questions, answers: MUSE ``knowmem/forget_qa`` (or ``retain_qa``) columns.
        icl_examples: the few-shot examples, MUSE ``knowmem/forget_qa_icl`` rows or (question, answer) pairs.
    Returns:
        ``knowmem`` (mean F1), ``rougeL_recall``, per-example ``per_example`` F1 and the ``generations``.
    """
    questions, answers = list(questions), list(answers)
    require_nonempty("knowmem", questions=questions)
    require_aligned("knowmem", questions=questions, answers=answers)
    icl = list(icl_examples)
    prompts = [knowmem_prompt(question, icl) for question in questions]
    outputs = generate_greedy(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        stop_strings=KNOWMEM_STOP_STRINGS,
    )
    f1 = rouge_l(outputs, answers, measure="fmeasure", use_stemmer=use_stemmer)
    recall = rouge_l(outputs, answers, measure="recall", use_stemmer=use_stemmer)
    return {"knowmem": mean(f1), "rougeL_recall": mean(recall), "per_example": f1, "generations": outputs}
