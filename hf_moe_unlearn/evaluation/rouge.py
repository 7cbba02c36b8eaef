"""ROUGE-L through Google's ``rouge_score`` package, the implementation every reference codebase uses.

(``evaluate.load("rouge")`` wraps the same package but downloads its script from the Hub at run time.)
The reference codebases differ in stemming: MUSE scores without a stemmer, TOFU and OpenUnlearning
with the Porter stemmer. Callers pass the setting of the benchmark they reproduce.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from rouge_score import rouge_scorer

from ..errors import MoEUnlearnError

__all__ = ["rouge_l"]

_MEASURES = ("fmeasure", "recall", "precision")


@lru_cache(maxsize=2)
def _scorer(use_stemmer: bool) -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)


def rouge_l(
    predictions: Sequence[str], references: Sequence[str], *, measure: str = "fmeasure", use_stemmer: bool = False
) -> list[float]:
    """Per-example ROUGE-L ``measure`` ("fmeasure", "recall" or "precision") of predictions vs references.

    Recall is of the reference: the fraction of the reference's longest common subsequence that the
    prediction reproduces (TOFU's "ROUGE-L recall").
    """
    if measure not in _MEASURES:
        raise MoEUnlearnError(f"ROUGE-L measure must be one of {', '.join(_MEASURES)}, got {measure!r}.")
    if len(predictions) != len(references):
        raise MoEUnlearnError(
            f"Got {len(predictions)} predictions but {len(references)} references; they must be aligned one to one."
        )
    scorer = _scorer(use_stemmer)
    return [float(getattr(scorer.score(ref, pred)["rougeL"], measure)) for pred, ref in zip(predictions, references)]
