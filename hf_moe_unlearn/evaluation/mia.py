"""Membership-inference attacks (MIA) and MUSE's PrivLeak.

Every score here is oriented so that **higher means "more likely a training member"** (higher
likelihood). With that orientation ``mia_auc`` is 1 when the forget set is still recognised as
training data and 0.5 when it is indistinguishable from held-out data, as in OpenUnlearning.

Per-text scores (teacher-forced, every token after the first):
- ``loss``: minus the mean token NLL.
- ``zlib``: minus the mean token NLL divided by the zlib-compressed length of the text in bytes
  (Carlini et al. 2021; OpenUnlearning's ``loss / len(zlib.compress(text))``).
- ``min_k``: Min-K% Prob (Shi et al. 2024), the mean of the lowest ``k`` fraction of token
  log-probabilities (``max(1, int(k·n))`` tokens, as OpenUnlearning; MUSE uses k = 0.4).
- ``min_k_plus_plus``: Min-K%++ (Zhang et al. 2024), the same on token log-probabilities z-scored
  against the model's own next-token distribution at each position.

PrivLeak (MUSE) compares the unlearned model's Min-K% AUC on forget-vs-holdout texts with the same AUC
of a model retrained without the forget set. MUSE writes AUCs the other way round (1 − AUC), hence
``((1 − AUC) − (1 − AUC_retrain)) / (1 − AUC_retrain) × 100``: ≈ 0 is ideal, strongly negative means
the forget set is still recognised (under-unlearning), strongly positive over-unlearning.
"""

from __future__ import annotations

import math
import numbers
import zlib
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import MoEUnlearnError
from ._checks import require_finite, require_nonempty
from .registry import register_metric
from .scoring import ContinuationScore, score_texts

__all__ = [
    "MIA_ATTACKS",
    "MUSE_PUBLISHED_RETRAIN_AUC",
    "loss_score",
    "mia",
    "mia_auc",
    "mia_scores",
    "min_k",
    "min_k_from_logprobs",
    "min_k_plus_plus",
    "min_k_prob",
    "privleak",
    "zlib_score",
]

# Min-K% (k = 0.4) forget-vs-holdout AUC of MUSE's retrained Llama-2-7B models, converted to this
# module's orientation (1 − the "forget_holdout_Min-40%" value of AUC_RETRAIN in the MUSE repository's
# constants.py). Valid only for MUSE's own target/retrain checkpoints; for any other model compute the
# AUC of your retrained model with ``min_k(retrained_model, ...)``.
MUSE_PUBLISHED_RETRAIN_AUC = {"News": 1.0 - 0.4772, "Books": 1.0 - 0.5393}

MIA_ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")


# ------------------------------------------------------------------------------------------ pure math


def min_k_from_logprobs(token_logprobs: Sequence[float] | torch.Tensor, k: float = 0.4) -> float:
    """Mean of the lowest ``max(1, int(k·n))`` of ``n`` token log-probabilities."""
    if not 0.0 < k <= 1.0:
        raise MoEUnlearnError(f"Min-K%: k must be a fraction in (0, 1], got {k}.")
    values = torch.as_tensor(token_logprobs, dtype=torch.float64).flatten()
    if values.numel() == 0:
        raise MoEUnlearnError("Min-K%: got no token log-probabilities to score.")
    count = max(1, int(values.numel() * k))
    return float(torch.sort(values).values[:count].mean())


def mia_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC of separating members (label 1) from non-members by score (higher = member)."""
    members = require_finite("mia_auc", "member_scores", member_scores)
    nonmembers = require_finite("mia_auc", "nonmember_scores", nonmember_scores)
    require_nonempty("mia_auc", member_scores=members, nonmember_scores=nonmembers)
    from sklearn.metrics import roc_auc_score  # imported here: sklearn is slow to import and only needed here

    labels = [1] * len(members) + [0] * len(nonmembers)
    return float(roc_auc_score(labels, members + nonmembers))


@register_metric("privleak")
def privleak(auc: float, auc_retrain: float | None = None) -> dict[str, float]:
    """MUSE PrivLeak from the unlearned model's AUC and the retrained model's AUC (same attack, same data).

    Raises MoEUnlearnError when ``auc_retrain`` is missing: PrivLeak is relative to a model retrained
    without the forget set and has no meaning on its own.
    """
    if auc_retrain is None:
        raise MoEUnlearnError(
            "privleak needs the retrained model's AUC (auc_retrain): PrivLeak measures the unlearned model's "
            "MIA AUC relative to a model retrained without the forget set. Compute it with the same attack "
            "and texts on the retrained model, e.g. min_k(retrained_model, tokenizer, forget_texts, "
            "holdout_texts)['auc'], and pass it as auc_retrain=. For MUSE's own Llama-2-7B checkpoints the "
            f"published values are in MUSE_PUBLISHED_RETRAIN_AUC ({MUSE_PUBLISHED_RETRAIN_AUC})."
        )
    for name, value in (("auc", auc), ("auc_retrain", auc_retrain)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not _is_probability(float(value)):
            raise MoEUnlearnError(f"privleak: {name} must be an AUC in [0, 1], got {value!r}.")
    if auc_retrain == 1.0:
        raise MoEUnlearnError(
            "privleak: auc_retrain is 1.0, so 1 − AUC_retrain is 0 and the relative difference is undefined; "
            "check that the retrained model was trained without the forget set."
        )
    auc, auc_retrain = float(auc), float(auc_retrain)
    value = ((1.0 - auc) - (1.0 - auc_retrain)) / (1.0 - auc_retrain) * 100.0
    return {"privleak": float(value), "auc": float(auc), "auc_retrain": float(auc_retrain)}


# ---------------------------------------------------------------------------------- per-text scores


def mia_scores(
    model,
    tokenizer,
    texts: Sequence[str],
    attack: str = "min_k",
    *,
    k: float = 0.4,
    batch_size: int = 8,
    max_length: int | None = None,
) -> list[float]:
    """Per-text scores of one attack (higher = more likely a member)."""
    if attack not in MIA_ATTACKS:
        raise MoEUnlearnError(f"Unknown MIA attack {attack!r}; choose one of {', '.join(MIA_ATTACKS)}.")
    texts = list(texts)
    require_nonempty(f"mia ({attack})", texts=texts)
    scores = score_texts(
        model,
        tokenizer,
        texts,
        batch_size=batch_size,
        max_length=max_length,
        with_distribution=attack == "min_k_plus_plus",
    )
    return [_attack_score(attack, score, text, k) for score, text in zip(scores, texts)]


def _attack_score(attack: str, score: ContinuationScore, text: str, k: float) -> float:
    if attack == "loss":
        return -score.mean_nll
    if attack == "zlib":
        return -score.mean_nll / len(zlib.compress(text.encode("utf-8")))
    if attack == "min_k":
        return min_k_from_logprobs(score.token_logprobs, k)
    z = (score.token_logprobs - score.expected_logprob) / score.std_logprob
    return min_k_from_logprobs(z, k)


def min_k_prob(model, tokenizer, texts: Sequence[str], k: float = 0.4, **kwargs: Any) -> list[float]:
    """Min-K% Prob score of each text (mean of its lowest ``k`` fraction of token log-probs)."""
    return mia_scores(model, tokenizer, texts, "min_k", k=k, **kwargs)


def loss_score(model, tokenizer, texts: Sequence[str], **kwargs: Any) -> list[float]:
    """LOSS attack score of each text: minus its mean token NLL."""
    return mia_scores(model, tokenizer, texts, "loss", **kwargs)


def zlib_score(model, tokenizer, texts: Sequence[str], **kwargs: Any) -> list[float]:
    """zlib attack score of each text: minus its mean token NLL over its zlib-compressed size in bytes."""
    return mia_scores(model, tokenizer, texts, "zlib", **kwargs)


def min_k_plus_plus(model, tokenizer, texts: Sequence[str], k: float = 0.4, **kwargs: Any) -> list[float]:
    """Min-K%++ score of each text."""
    return mia_scores(model, tokenizer, texts, "min_k_plus_plus", k=k, **kwargs)


# ------------------------------------------------------------------------------- registered metrics


@register_metric("mia")
def mia(
    model,
    tokenizer,
    member_texts: Sequence[str],
    nonmember_texts: Sequence[str],
    attack: str = "min_k",
    *,
    k: float = 0.4,
    batch_size: int = 8,
    max_length: int | None = None,
) -> dict[str, Any]:
    """AUC of one attack separating ``member_texts`` (e.g. MUSE privleak/forget) from ``nonmember_texts``
    (privleak/holdout), with the per-text scores."""
    kwargs = {"k": k, "batch_size": batch_size, "max_length": max_length}
    members = mia_scores(model, tokenizer, member_texts, attack, **kwargs)
    nonmembers = mia_scores(model, tokenizer, nonmember_texts, attack, **kwargs)
    return {"auc": mia_auc(members, nonmembers), "member_scores": members, "nonmember_scores": nonmembers}


@register_metric("min_k")
def min_k(
    model,
    tokenizer,
    member_texts: Sequence[str],
    nonmember_texts: Sequence[str],
    k: float = 0.4,
    *,
    batch_size: int = 8,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Min-K% (k = 0.4) MIA AUC, the statistic behind MUSE's PrivLeak."""
    return mia(
        model, tokenizer, member_texts, nonmember_texts, "min_k", k=k, batch_size=batch_size, max_length=max_length
    )


def _is_probability(value: float) -> bool:
    return math.isfinite(value) and 0.0 <= value <= 1.0
