"""The tensor math of every built-in loss, as small pure functions.

Conventions shared by every function here:

* **Labels follow the Hugging Face convention**: ``labels`` has the shape of ``input_ids`` and is *not*
  shifted; ``-100`` marks a position that is not counted (prompt, padding). Each function shifts
  inside (``logits[:, :-1]`` predicts ``labels[:, 1:]``), so callers pass the batch as the collator made it.
* **Log-probabilities are taken in float32** (``log_softmax`` of ``logits.float()``): bf16 log-softmax over a
  large vocabulary loses the small differences NPO and KL are made of.
* **Per-token weights** (TRACE) are ``[B, T]`` tensors *aligned with the unshifted labels*: ``w[:, t]``
  weights the loss term whose target is ``labels[:, t]`` (predicted from position ``t - 1``), and they
  are shifted with the labels. ``w[:, 0]`` is therefore never used.
* **No host syncs**: nothing calls ``.item()``, ``nonzero`` or boolean indexing, so a training step never
  waits on the device. A batch without counted tokens yields 0 (the denominator is clamped to 1)
  instead of NaN.

The reference implementations matched are named in each docstring (OpenUnlearning ``src/trainer``, the
WMDP RMU code, the SEUF code). The TRACE formulas are this project's specification (the paper's are
not public), see ``docs/methods.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from ..errors import MoEUnlearnError

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "token_nll",
    "sequence_nll",
    "ga_loss",
    "npo_loss",
    "simnpo_loss",
    "dpo_loss",
    "wga_loss",
    "satimp_loss",
    "undial_loss",
    "ceu_loss",
    "drop_first_answer_tokens",
    "nll_loss",
    "kl_loss",
    "rmu_forget_loss",
    "rmu_retain_loss",
    "rmu_control_vector",
    "router_scores",
    "topk_masked_scores",
    "seuf_anchor_loss",
    "prediction_mask",
    "trace_token_weights",
    "routing_share",
]


# ----------------------------------------------------------------------------------------------- helpers
def _check_logits_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 3 or labels.dim() != 2 or tuple(logits.shape[:2]) != tuple(labels.shape):
        raise MoEUnlearnError(
            f"Expected logits [B, T, V] and labels [B, T] of the same B and T, got logits "
            f"{tuple(logits.shape)} and labels {tuple(labels.shape)}. Pass the model's full logits and the "
            "unshifted labels of the same batch."
        )


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ values·mask / Σ mask, 0 (not NaN) when nothing is counted, without a host sync."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def _shifted_weights(token_weights: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor | None:
    """Shift ``[B, T]`` label-aligned weights like the labels; ``None`` stays ``None``."""
    if token_weights is None:
        return None
    if tuple(token_weights.shape) != tuple(labels.shape):
        raise MoEUnlearnError(
            f"token_weights must have the shape of the unshifted labels {tuple(labels.shape)}, got "
            f"{tuple(token_weights.shape)}. Weights are aligned with label positions and shifted with them."
        )
    return token_weights[:, 1:].detach().float()


def _check_beta(beta: float, name: str) -> None:
    if not (beta > 0 and math.isfinite(beta)):
        raise MoEUnlearnError(f"{name} must be a positive finite number, got {beta!r}.")


# ------------------------------------------------------------------------------------------ token NLLs
def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood of the next token.

    Args:
        logits: ``[B, T, V]`` model logits.
        labels: ``[B, T]`` unshifted labels, ``-100`` = not counted.

    Returns:
        ``(nll, mask)``, both ``[B, T-1]`` float32: ``nll[:, t] = −log p(labels[:, t+1] | ≤ t)`` (0 where
        not counted) and ``mask`` 1.0 where the target is counted.
    """
    _check_logits_labels(logits, labels)
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    # cross_entropy = log_softmax + gather in one fused call; ignore_index zeroes the uncounted positions.
    nll = F.cross_entropy(
        shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    mask = (shift_labels != IGNORE_INDEX).float()
    return nll, mask


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL ℓ(x) of each sequence and its number of counted tokens |x|.

    This is OpenUnlearning's ``compute_batch_nll`` (sum over counted tokens, per sequence) — the quantity
    NPO and SimNPO are defined on, *not* the per-token mean ``model(...).loss`` gives.

    Returns:
        ``(nll_sum [B], n_tokens [B])``, float32.
    """
    nll, mask = token_nll(logits, labels)
    return nll.sum(dim=-1), mask.sum(dim=-1)


# ----------------------------------------------------------------------------------------- forget losses
def ga_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Gradient ascent: minus the mean NLL over all counted tokens of the batch.

    Computed from logits rather than ``outputs.loss`` because, with ``output_router_logits=True``,
    transformers adds the router auxiliary loss into ``outputs.loss`` and ascending it unbalances the router.
    """
    nll, mask = token_nll(logits, labels)
    return -_masked_mean(nll, mask)


def npo_loss(nll_sum: torch.Tensor, ref_nll_sum: torch.Tensor, beta: float) -> torch.Tensor:
    """Negative Preference Optimization (Zhang et al. 2024), as OpenUnlearning computes it.

    ``L = −(2/β) · mean_x log σ(−β · log(πθ(x)/πref(x)))`` with ``log πθ(x) = −ℓθ(x)`` the sequence
    log-likelihood, i.e. ``−(2/β) · mean log σ(β (ℓθ(x) − ℓref(x)))``. OpenUnlearning's
    ``compute_dpo_loss(lose_inputs=forget)`` gives exactly this (``lose_log_ratio = ℓref − ℓθ``).
    When ℓθ = ℓref the loss is ``(2/β)·log 2``; it falls to 0 as the model's forget NLL grows.

    Args:
        nll_sum: ``[B]`` summed NLL of the model (with grad).
        ref_nll_sum: ``[B]`` summed NLL of the frozen reference (detached here).
        beta: inverse temperature β > 0 (usual default 0.1).
    """
    _check_beta(beta, "npo beta")
    if nll_sum.shape != ref_nll_sum.shape:
        raise MoEUnlearnError(
            f"nll_sum {tuple(nll_sum.shape)} and ref_nll_sum {tuple(ref_nll_sum.shape)} must have one value "
            "per sequence of the same batch."
        )
    log_ratio = nll_sum.float() - ref_nll_sum.detach().float()
    return -(2.0 / beta) * F.logsigmoid(beta * log_ratio).mean()


def simnpo_loss(
    nll_sum: torch.Tensor, n_tokens: torch.Tensor, beta: float, delta: float = 0.0
) -> torch.Tensor:
    """SimNPO (Fan et al. 2024): reference-free NPO on the length-normalised NLL.

    ``L = −(2/β) · mean_x log σ(β (ℓθ(x)/|x| − δ))``.

    Sign convention matched: OpenUnlearning ``src/trainer/unlearn/simnpo.py``
    (``forget_loss = nll_sum / n_tokens − delta; −logsigmoid(beta * forget_loss).mean() * 2 / beta``).
    The SimNPO paper writes ``−(2/β) log σ(−(β/|y|) log πθ(y|x) − γ)``; since ``−log πθ/|y| = ℓθ/|x|``
    it is the same loss with the paper's margin ``γ = β·δ``. (The SimNPO repository's MUSE script applies
    the formula to raw logits — a known bug we do not reproduce.)

    Args:
        nll_sum: ``[B]`` summed NLL ℓθ(x).
        n_tokens: ``[B]`` counted tokens |x| (clamped to ≥ 1 so an empty answer gives no NaN).
        beta: β > 0 (4.5 in the paper's MUSE/WMDP runs, 2.5 for TOFU).
        delta: margin δ ≥ 0 (default 0).
    """
    _check_beta(beta, "simnpo beta")
    if nll_sum.shape != n_tokens.shape:
        raise MoEUnlearnError(
            f"nll_sum {tuple(nll_sum.shape)} and n_tokens {tuple(n_tokens.shape)} must both be [B]."
        )
    mean_nll = nll_sum.float() / n_tokens.float().clamp_min(1.0)
    return -(2.0 / beta) * F.logsigmoid(beta * (mean_nll - delta)).mean()


def dpo_loss(
    win_nll_sum: torch.Tensor,
    win_ref_nll_sum: torch.Tensor,
    lose_nll_sum: torch.Tensor,
    lose_ref_nll_sum: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO on summed sequence NLLs, as OpenUnlearning's ``compute_dpo_loss`` defines it (IdkDPO, DPO).

    ``win_log_ratio = −(ℓθ(win) − ℓref(win))``, ``lose_log_ratio = −(ℓθ(lose) − ℓref(lose))`` and
    ``L = −(2/β) · mean log σ(β · (win_log_ratio − lose_log_ratio))``, ℓ the summed answer-token NLL of each
    sequence (:func:`sequence_nll`). Matched against OpenUnlearning ``src/trainer/utils.py``
    ``compute_dpo_loss``: the same signs, the same ``2/β`` scale (Rafailov et al.'s DPO loss has no ``2/β``;
    OpenUnlearning's shared function carries NPO's, so with the winner term left out it is exactly
    :func:`npo_loss`), the mean over the batch, and the reference under ``no_grad`` (detached here).
    IdkDPO passes the "I don't know" answer as ``win`` and the true forget answer as ``lose``.

    At θ = ref the loss is ``(2/β)·log 2``; raising the winner's likelihood (lower ``win_nll_sum``) or lowering
    the loser's (higher ``lose_nll_sum``) lowers it.

    Args:
        win_nll_sum, lose_nll_sum: ``[B]`` summed NLLs of the model on the preferred / rejected answers (with grad).
        win_ref_nll_sum, lose_ref_nll_sum: ``[B]`` the same for the frozen reference (detached here).
        beta: inverse temperature β > 0 (OpenUnlearning's IdkDPO default 0.1).
    """
    _check_beta(beta, "dpo beta")
    shapes = [tuple(t.shape) for t in (win_nll_sum, win_ref_nll_sum, lose_nll_sum, lose_ref_nll_sum)]
    if len(set(shapes)) != 1 or len(shapes[0]) != 1:
        raise MoEUnlearnError(
            f"dpo_loss needs four [B] tensors (one summed NLL per sequence of the same batch: win, win_ref, lose, "
            f"lose_ref), got shapes {shapes}. Pair each forget example with its own IDK / alternate answer."
        )
    win_log_ratio = -(win_nll_sum.float() - win_ref_nll_sum.detach().float())
    lose_log_ratio = -(lose_nll_sum.float() - lose_ref_nll_sum.detach().float())
    return -(2.0 / beta) * F.logsigmoid(beta * (win_log_ratio - lose_log_ratio)).mean()


def _check_exponent(value: float, name: str) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise MoEUnlearnError(f"{name} must be a finite number >= 0, got {value!r}.")


def wga_loss(logits: torch.Tensor, labels: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Weighted gradient ascent (WGA; Wang et al. 2025, "Rethinking LLM Unlearning Objectives: A Gradient
    Perspective and Go Beyond", ICLR 2025): gradient ascent with each forget token weighted by its own probability.

    ``L = −mean_{counted t} w_t · nll_t`` with ``w_t = pθ(y_t | y_<t)^β`` **detached** (``nll_t = −log pθ(y_t|…)``).
    Tokens the model has already pushed to low probability get a small weight, so the ascent stops spending itself
    on them (GA's pull on a token's logit, 1 − p, grows as p falls; WGA's, p^β·(1 − p), fades). ``β = 0`` is GA.

    Matched against OpenUnlearning ``src/trainer/utils.py`` ``compute_wga_loss`` (``weight_ce = exp(−lm_loss)
    .detach() ** beta``; ``−(weight_ce * lm_loss)[labels != -100].mean()``): the same weights, sign and reduction
    (mean over the batch's counted tokens); default β = 1 (``configs/trainer/WGA.yaml``).

    Args:
        logits: ``[B, T, V]`` model logits (with grad); labels: ``[B, T]`` unshifted, -100 = not counted.
        beta: exponent β ≥ 0 of the weight.
    """
    _check_exponent(beta, "wga beta")
    nll, mask = token_nll(logits, labels)
    weight = torch.exp(-nll.detach()) ** beta
    return -_masked_mean(weight * nll, mask)


def satimp_loss(logits: torch.Tensor, labels: torch.Tensor, beta1: float = 5.0, beta2: float = 1.0) -> torch.Tensor:
    """SatImp (Yang et al. 2025, "Exploring Criteria of Loss Reweighting to Enhance LLM Unlearning", ICML 2025):
    gradient ascent with each token weighted by its *saturation* and its *importance*.

    ``L = −mean_{counted t} w_t · nll_t`` with ``w_t = p_t^β1 · (1 − p_t)^β2``, ``p_t = pθ(y_t | y_<t)``, detached.
    ``p^β1`` (saturation, as WGA) shrinks the weight of tokens already forgotten; ``(1 − p)^β2`` (the paper's
    importance proxy) shrinks that of tokens the model predicts with near certainty. ``β2 = 0`` is WGA, ``β1 = 0`` the
    paper's SimImp.

    Matched against OpenUnlearning ``src/trainer/utils.py`` ``compute_satimp_loss`` (``weight_sat = p ** beta1``,
    ``weight_imp = (1 − p) ** beta2``, ``−((weight_sat * weight_imp) * lm_loss)[labels != -100].mean()``) and the
    authors' code (tmlr-group/SatImp ``dataloader/dataloader_sat.py``, loss ``satimp``: ``hyper_param`` = β1 on p,
    ``beta`` = β2 on 1 − p): the same weights, sign and reduction. Defaults β1 = 5, β2 = 1 (OpenUnlearning
    ``configs/trainer/SatImp.yaml`` and ``community/methods/SatImp/README.md``).
    """
    _check_exponent(beta1, "satimp beta1")
    _check_exponent(beta2, "satimp beta2")
    nll, mask = token_nll(logits, labels)
    p = torch.exp(-nll.detach())
    weight = p**beta1 * (1.0 - p) ** beta2
    return -_masked_mean(weight * nll, mask)


def _targets_and_mask(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted targets with -100 replaced by 0 (a valid index; those positions are masked out) and their mask."""
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    return shift_labels.masked_fill(~mask, 0), mask.float()


def undial_loss(
    logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, beta: float = 10.0
) -> torch.Tensor:
    """UNDIAL (Dong et al., "UNDIAL: Self-Distillation with Adjusted Logits for Robust Unlearning in Large Language
    Models", NAACL 2025): distil the model towards the frozen reference's next-token distribution with the logit of
    the forget token lowered by a fixed strength β.

    ``q_t = softmax(z^ref_t − β·onehot(y_t))`` (no grad) and ``L = mean_{counted t} CE(q_t, pθ(·|y_<t))
    = −mean Σ_v q_t[v] log pθ(v|…)``. The target is fixed (the reference never trains), so unlike GA the loss is
    bounded below and training converges: the model moves β nats of logit away from each forget token and keeps the
    reference's ranking of every other token. Its gradient in the logits is ``pθ − q``.

    Matched against OpenUnlearning ``src/trainer/utils.py`` ``compute_undial_loss`` (and the authors' ``DITrainer``,
    dong-river/LLM_unlearning ``utils/ft_utils.py``, ``di_strength`` = β): the same adjusted soft target and
    cross-entropy. Differences, both deliberate: (1) we average over the *counted* positions (labels ≠ -100, i.e.
    answer tokens of prompt/answer data, all non-padding tokens of documents); OpenUnlearning averages over every
    position of the batch, prompt and padding included, and its ``mask[..., shift_labels] = 1`` indexes label -100 as
    vocabulary entry V−100, so it also lowers that unrelated token's logit at every uncounted position; (2) the
    log-softmax is taken in float32. Default β = 10 (OpenUnlearning ``configs/trainer/UNDIAL.yaml``; its README
    suggests 3, 10 or 30).

    Args:
        logits: ``[B, T, V]`` model logits (with grad).
        ref_logits: ``[B, T, V]`` frozen reference logits on the same batch (detached here).
        labels: ``[B, T]`` unshifted, -100 = not counted.
        beta: strength β > 0 subtracted from the forget token's reference logit.
    """
    _check_logits_labels(logits, labels)
    if logits.shape != ref_logits.shape:
        raise MoEUnlearnError(
            f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} must have the same shape: run the "
            "reference model on the same batch."
        )
    _check_beta(beta, "undial beta")
    targets, mask = _targets_and_mask(labels)
    with torch.no_grad():
        adjusted = ref_logits[:, :-1, :].detach().float().scatter_add(
            -1, targets.unsqueeze(-1), torch.full_like(targets, -beta, dtype=torch.float32).unsqueeze(-1)
        )
        soft_target = adjusted.softmax(dim=-1)
    log_p = F.log_softmax(logits[:, :-1, :].float(), dim=-1)
    per_token = -(soft_target * log_p).sum(dim=-1)
    return _masked_mean(per_token, mask)


def drop_first_answer_tokens(labels: torch.Tensor, n: int) -> torch.Tensor:
    """``labels`` with the first ``n`` counted (≠ -100) positions of each row set to -100 (unshifted frame).

    CE-U's "ignore the first answer tokens" (OpenUnlearning ``src/trainer/unlearn/ceu.py`` ``compute_batch_ceu``,
    from the footnote of the CE-U paper's training settings): the first answer token is often a generic word that
    many answers share. On documents (labels = input ids) the first counted position is token 0, which is never a
    target, so ``n = 1`` changes nothing there — as in OpenUnlearning, which applies the same mask.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise MoEUnlearnError(f"the number of first answer tokens to ignore must be an integer >= 0, got {n!r}.")
    if n == 0:
        return labels
    counted = labels != IGNORE_INDEX
    drop = counted & (counted.long().cumsum(dim=-1) <= n)
    return labels.masked_fill(drop, IGNORE_INDEX)


def ceu_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_first_n: int = 1) -> torch.Tensor:
    """CE-U, cross-entropy unlearning (Bo Yang 2025, "CE-U: Cross Entropy Unlearning", arXiv 2503.01224).

    ``q_t = softmax(z̄_t with z̄_t[y_t] = −∞)``, ``z̄`` the model's own logits **detached**, and
    ``L = mean_{counted t} CE(q_t, pθ(·|y_<t)) = −mean Σ_{v ≠ y_t} q_t[v] log pθ(v|…)``: the model is distilled
    towards its own distribution with the forget token removed. The gradient in the logits is ``pθ − q``: on the
    forget token it is ``pθ(y_t) > 0`` (pushed down, with a pull that *fades* as ``pθ(y_t) → 0`` instead of GA's
    ``1/p`` blow-up), and the other tokens keep their relative odds.

    Matched against OpenUnlearning ``src/trainer/unlearn/ceu.py`` (``cross_entropy_unlearning_loss`` and
    ``compute_batch_ceu``): the same detached target with the label's logit at −inf, ``F.cross_entropy`` with soft
    targets, mean over the counted positions, and the first ``ignore_first_n`` answer tokens of each sequence left
    out (:func:`drop_first_answer_tokens`; default 1, ``configs/trainer/CEU.yaml``). Log-softmax in float32 here.
    """
    _check_logits_labels(logits, labels)
    labels = drop_first_answer_tokens(labels, ignore_first_n)
    targets, mask = _targets_and_mask(labels)
    shift_logits = logits[:, :-1, :].float()
    with torch.no_grad():
        removed = shift_logits.detach().scatter(-1, targets.unsqueeze(-1), float("-inf"))
        soft_target = removed.softmax(dim=-1)
    log_p = F.log_softmax(shift_logits, dim=-1)
    # q is exactly 0 on the forget token: take 0·log p as 0 there even if log p is -inf (a NaN elsewhere still shows).
    per_token = -torch.where(soft_target > 0, soft_target * log_p, torch.zeros_like(log_p)).sum(dim=-1)
    return _masked_mean(per_token, mask)


# ----------------------------------------------------------------------------------------- retain losses
def nll_loss(logits: torch.Tensor, labels: torch.Tensor, token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """(Weighted) mean NLL over counted tokens: ``Σ_t w_t·nll_t / Σ_t 1``.

    With ``token_weights=None`` (w = 1) this is the usual causal-LM loss. With TRACE weights it is the
    project's weighted retain loss: the denominator is the plain token count, so weights normalised to
    mean 1 keep the loss on its usual scale.

    Args:
        token_weights: optional ``[B, T]`` weights aligned with the unshifted ``labels`` (see module doc);
            detached — weights are a calibration, not something to optimise.
    """
    nll, mask = token_nll(logits, labels)
    weights = _shifted_weights(token_weights, labels)
    if weights is not None:
        nll = nll * weights
    return _masked_mean(nll, mask)


KLDirection = Literal["model_to_ref", "ref_to_model"]


def kl_loss(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    labels: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    direction: KLDirection = "model_to_ref",
) -> torch.Tensor:
    """Per-token KL divergence to the reference model, (weighted) mean over counted positions.

    ``direction="model_to_ref"`` (default) is ``KL(pθ ‖ pref) = Σ_v pθ (log pθ − log pref)``, what
    ``docs/unlearning-reference.md`` names. ``F.kl_div(input, target, log_target=True)`` computes
    ``Σ target·(log target − input)`` = KL(target ‖ input), so this direction is
    ``kl_div(log pref, log pθ)``. OpenUnlearning and the TOFU code call ``kl_div(log pθ, log pref)``, which
    is the other direction, ``KL(pref ‖ pθ)``: choose ``direction="ref_to_model"`` for parity with them.
    (Their reduction also differs: ``batchmean`` over every position, padding included; ours averages over
    counted, label-bearing positions only.)

    Positions are the shifted ones (logits at ``t`` predicting ``labels[:, t+1]``), counted where that
    label is not -100. ``token_weights`` as in :func:`nll_loss`.
    """
    _check_logits_labels(logits, labels)
    if logits.shape != ref_logits.shape:
        raise MoEUnlearnError(
            f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} must have the same shape: "
            "run the reference model on the same batch."
        )
    if direction not in ("model_to_ref", "ref_to_model"):
        raise MoEUnlearnError(f"kl direction must be 'model_to_ref' or 'ref_to_model', got {direction!r}.")
    log_p = F.log_softmax(logits[:, :-1, :].float(), dim=-1)
    log_ref = F.log_softmax(ref_logits[:, :-1, :].detach().float(), dim=-1)
    if direction == "model_to_ref":
        per_token = F.kl_div(log_ref, log_p, reduction="none", log_target=True).sum(dim=-1)
    else:
        per_token = F.kl_div(log_p, log_ref, reduction="none", log_target=True).sum(dim=-1)
    mask = (labels[:, 1:] != IGNORE_INDEX).float()
    weights = _shifted_weights(token_weights, labels)
    if weights is not None:
        per_token = per_token * weights
    return _masked_mean(per_token, mask)


# ----------------------------------------------------------------------------------------------- RMU
def _check_hidden(hidden: torch.Tensor, mask: torch.Tensor) -> None:
    if hidden.dim() != 3 or tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise MoEUnlearnError(
            f"Expected hidden states [B, T, H] and a token mask [B, T], got {tuple(hidden.shape)} and "
            f"{tuple(mask.shape)}."
        )


def _token_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over counted tokens of ‖a − b‖²/H, i.e. ``F.mse_loss`` restricted to the counted positions."""
    per_token = F.mse_loss(a.float(), b.float().expand_as(a), reduction="none").mean(dim=-1)
    return _masked_mean(per_token, mask)


def rmu_forget_loss(hidden: torch.Tensor, control: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RMU forget term: push the forget hidden states towards the fixed random vector ``c·u``.

    ``mean_{counted t} ‖h_t − c·u‖² / H`` — the WMDP code's ``F.mse_loss(h, control_vec)`` restricted to
    counted tokens (the WMDP code averages over every position; OpenUnlearning masks by ``labels != -100``
    but averages per sequence first; we average over all counted tokens of the batch).

    Args:
        hidden: ``[B, T, H]`` hidden states of the model at the RMU layer (with grad).
        control: ``[H]`` control vector ``c·u`` (:func:`rmu_control_vector`).
        mask: ``[B, T]`` 1 for counted tokens (token positions, no shift: hidden states are per input token).
    """
    _check_hidden(hidden, mask)
    if control.dim() != 1 or control.shape[0] != hidden.shape[-1]:
        raise MoEUnlearnError(
            f"control vector must be [H] = [{hidden.shape[-1]}], got {tuple(control.shape)}: build it with "
            "rmu_control_vector(hidden_size, coeff, seed)."
        )
    return _token_mse(hidden, control.to(hidden.device), mask)


def rmu_retain_loss(hidden: torch.Tensor, ref_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RMU retain term: ``mean_{counted t} ‖h_t − h_ref,t‖² / H`` (the reference is detached)."""
    _check_hidden(hidden, mask)
    if hidden.shape != ref_hidden.shape:
        raise MoEUnlearnError(
            f"hidden {tuple(hidden.shape)} and ref_hidden {tuple(ref_hidden.shape)} must match: take both at "
            "the same layer on the same batch."
        )
    return _token_mse(hidden, ref_hidden.detach(), mask)


def rmu_control_vector(
    hidden_size: int,
    coeff: float,
    seed: int = 0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The RMU target ``c·u``: ``u ~ U[0,1)^H`` normalised to unit length, scaled by the steering coefficient.

    As in the WMDP code (``torch.rand`` / ``norm`` · ``steering_coeff``), but drawn from a private CPU
    generator seeded with ``seed``, so the same seed gives the same vector on any device and the global RNG
    is untouched.
    """
    if hidden_size <= 0:
        raise MoEUnlearnError(f"hidden_size must be positive, got {hidden_size}.")
    if not math.isfinite(coeff):
        raise MoEUnlearnError(f"rmu steering coefficient must be finite, got {coeff!r}.")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    u = torch.rand(hidden_size, generator=generator, dtype=torch.float64)
    return (coeff * u / u.norm()).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------- SEUF anchor
ScoreFn = Literal["softmax", "sigmoid"]
AnchorForm = Literal["masked_softmax", "full_softmax"]
ANCHOR_FORMS: tuple[str, ...] = ("masked_softmax", "full_softmax")
ANCHOR_REDUCTIONS: tuple[str, ...] = ("paper", "code")


def router_scores(router_logits: torch.Tensor, score_fn: ScoreFn = "softmax") -> torch.Tensor:
    """The router's full distribution ``p_t`` over experts, in float32, before any top-k masking.

    ``softmax`` routers: ``softmax(z_t)``. ``sigmoid`` routers (DeepSeek-V3 style): the sigmoid scores
    normalised to sum 1, so both kinds give a distribution comparable with the target ``onehot(e*)``.
    This is what the public SEUF code anchors (``anchor_form="full_softmax"``); the paper's g is this
    distribution masked to each token's top-k, see :func:`topk_masked_scores`.
    """
    logits = router_logits.float()
    if score_fn == "softmax":
        return logits.softmax(dim=-1)
    if score_fn == "sigmoid":
        scores = logits.sigmoid()
        return scores / scores.sum(dim=-1, keepdim=True)
    raise MoEUnlearnError(f"score_fn must be 'softmax' or 'sigmoid', got {score_fn!r}.")


def _check_topk(topk_indices: torch.Tensor | None, num_tokens: int) -> torch.Tensor:
    """The top-k indices, checked by shape and dtype only (a value check would need a host sync)."""
    if topk_indices is None:
        raise MoEUnlearnError(
            "anchor form 'masked_softmax' (the paper's g) needs topk_indices [N, k]: the top-k expert indices the "
            "model actually chose for each token (from the router hooks). Pass them, or use form='full_softmax'."
        )
    if (
        topk_indices.dim() != 2
        or topk_indices.shape[0] != num_tokens
        or topk_indices.dtype.is_floating_point
        or topk_indices.dtype.is_complex
        or topk_indices.dtype == torch.bool
    ):
        raise MoEUnlearnError(
            f"topk_indices must be an integer tensor [N, k] with N = {num_tokens} (one row per router-logit row), "
            f"got {topk_indices.dtype} {tuple(topk_indices.shape)}. Pass the routing indices of the same forward."
        )
    return topk_indices


def topk_masked_scores(scores: torch.Tensor, topk_indices: torch.Tensor) -> torch.Tensor:
    """The SEUF paper's g: ``g_t[e] = p_t[e]`` if ``e`` is in token t's top-k, else 0 (**not** renormalised).

    ``topk_indices`` are the experts the model actually routed each token to (taken from the router output,
    so a sigmoid router's bias-corrected choice is respected), detached. The mask is built by a device-side
    scatter: no host sync. Gradients still reach every logit through the softmax denominator, so the
    masked anchor *can* pull back a token whose ``e*`` is outside its top-k: there ``g_t[e*] = 0``, and the
    loss pushes the top-k entries ``g_j = exp(z_j)/Σ exp(z)`` down, which raises the denominator, i.e.
    ``∂L/∂z_{e*} = −2 p_{e*} Σ_{j∈topk} g_j² < 0`` (paper reduction, one expert, softmax router).

    Args:
        scores: ``[N, E]`` full distribution (:func:`router_scores`).
        topk_indices: ``[N, k]`` integer expert indices (values must lie in ``[0, E)``; not checked, as that
            would need a host sync).
    """
    topk = _check_topk(topk_indices, scores.shape[0]).to(device=scores.device, dtype=torch.long)
    keep = torch.zeros_like(scores).scatter_(-1, topk, 1.0)
    return scores * keep


def seuf_anchor_loss(
    router_logits: torch.Tensor,
    experts: int | Sequence[int],
    mask: torch.Tensor,
    score_fn: ScoreFn = "softmax",
    reduction: Literal["paper", "code"] = "paper",
    form: AnchorForm = "masked_softmax",
    topk_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """SEUF router anchor (Eq. 3–4): keep forget tokens routed to the expert being unlearned.

    For one expert ``e*``: ``mean_{counted tokens} ‖g_t − onehot(e*)‖²₂``, where ``g_t`` depends on ``form``:

    * ``form="masked_softmax"`` (default, the paper): the router's distribution masked to the token's top-k,
      not renormalised (:func:`topk_masked_scores`); needs ``topk_indices``.
    * ``form="full_softmax"``: the full distribution before top-k masking (:func:`router_scores`), the public
      SEUF code's choice.

    ``reduction`` is independent of the form:

    * ``reduction="paper"``: the squared L2 distance summed over the E experts (the paper's Eq. 4).
    * ``reduction="code"``: the public SEUF code's ``F.mse_loss`` (mean over the E entries too) = paper / E.
      Unlike that code we average over counted tokens only, not padding.

    So the public code's anchor is ``form="full_softmax", reduction="code"``.

    Several selected experts in one layer: the anchor is the **average of the single-expert anchors**
    ``(1/m) Σ_{e∈S} ‖g − onehot(e)‖²`` — each selected expert keeps its own pull and the total keeps the
    single-expert scale. (The SEUF code instead uses one multi-hot target, whose optimum is not a
    distribution.)

    Args:
        router_logits: ``[N, E]`` live router logits of the forget forward (N = B·T, row-major), with grad.
        experts: the selected expert index, or a list of them, of this layer.
        mask: ``[N]`` 1 for counted forget tokens.
        score_fn: ``"softmax"`` or ``"sigmoid"``: how this router scores experts.
        reduction: ``"paper"`` or ``"code"``.
        form: ``"masked_softmax"`` or ``"full_softmax"``.
        topk_indices: ``[N, k]`` top-k expert indices of the same forward (detached); required by the masked
            form, ignored by the full one.
    """
    if router_logits.dim() != 2 or mask.dim() != 1 or mask.shape[0] != router_logits.shape[0]:
        raise MoEUnlearnError(
            f"Expected router logits [N, E] and a token mask [N], got {tuple(router_logits.shape)} and "
            f"{tuple(mask.shape)}. Flatten [B, T] to N = B*T in the same (row-major) order."
        )
    if reduction not in ANCHOR_REDUCTIONS:
        raise MoEUnlearnError(f"anchor reduction must be one of {', '.join(ANCHOR_REDUCTIONS)}; got {reduction!r}.")
    if form not in ANCHOR_FORMS:
        raise MoEUnlearnError(f"anchor form must be one of {', '.join(ANCHOR_FORMS)}; got {form!r}.")
    expert_list = [experts] if isinstance(experts, int) else list(experts)
    num_experts = router_logits.shape[-1]
    if not expert_list or any(not 0 <= e < num_experts for e in expert_list):
        raise MoEUnlearnError(
            f"Selected experts {expert_list} must be a non-empty list of indices in [0, {num_experts})."
        )
    scores = router_scores(router_logits, score_fn)
    if form == "masked_softmax":
        scores = topk_masked_scores(scores, topk_indices)
    per_token = torch.zeros_like(scores[:, 0])
    for expert in expert_list:
        # One-hot built on the device by an indexed fill: no host→device copy on the hot path.
        target = torch.zeros_like(scores[0])
        target[expert] = 1.0
        sq = F.mse_loss(scores, target.expand_as(scores), reduction="none")  # [N, E]
        per_token = per_token + (sq.sum(dim=-1) if reduction == "paper" else sq.mean(dim=-1))
    per_token = per_token / len(expert_list)
    return _masked_mean(per_token, mask)


# ------------------------------------------------------------------------------------------- TRACE
def prediction_mask(labels: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` float mask, 1 at the positions whose *prediction* is counted (``labels[:, t+1] != -100``).

    Routing is recorded per input position; the loss term that position ``t``'s computation produces is
    the one whose target is ``labels[:, t+1]``. This is that alignment, in the token (routing) frame;
    the last position predicts nothing.
    """
    mask = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    mask[:, :-1] = (labels[:, 1:] != IGNORE_INDEX).float()
    return mask


@torch.no_grad()
def trace_token_weights(
    topk_indices: Mapping[int, torch.Tensor],
    critical: Mapping[int, Mapping[int, float]],
    mask: torch.Tensor,
    w_max: float = 10.0,
    sum_over_processes: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """TRACE retain-token weights (project specification, ``docs/methods.md``; the paper's are not public).

    ``w_t = 1 + Σ_{(l,e) selected, e ∈ topk_l(t)} (min(f_F/f_R, w_max) − 1)``, floored at 0, then normalised
    to mean 1 over the counted tokens (so the weighted retain loss keeps its scale), clipped to ``w_max``;
    uncounted tokens get 0. Detached: the weights calibrate the loss, they are not optimised.

    Args:
        topk_indices: layer → ``[N, k]`` top-k expert indices of each retain token (from the router hooks).
        critical: layer → {expert: f_F(l,e)/f_R(l,e)} for the selected forget-critical experts
            (``float('inf')`` allowed for f_R = 0; it is capped at ``w_max``).
        mask: ``[N]`` 1 for counted retain tokens.
        w_max: cap on a ratio and on the final weight.
        sum_over_processes: in a data-parallel run, a function summing a tensor over the processes: the mean is
            then taken over the whole batch of the step (every process's share), as one process would with the
            same batch, not over each share.

    Returns:
        ``[N]`` float32 weights.
    """
    if not (w_max >= 1 and math.isfinite(w_max)):
        raise MoEUnlearnError(f"trace w_max must be a finite number ≥ 1, got {w_max!r}.")
    if mask.dim() != 1:
        raise MoEUnlearnError(f"mask must be [N] (flattened tokens), got {tuple(mask.shape)}.")
    counted = mask.float()
    raw = torch.ones_like(counted)
    for layer, ratios in critical.items():
        if layer not in topk_indices:
            raise MoEUnlearnError(
                f"No routing recorded for layer {layer}; recorded layers: {sorted(topk_indices)}. "
                "The retain forward must record the top-k of every layer holding a selected expert."
            )
        topk = topk_indices[layer]
        if topk.dim() != 2 or topk.shape[0] != counted.shape[0]:
            raise MoEUnlearnError(
                f"top-k indices of layer {layer} must be [N, k] with N = {counted.shape[0]}, got {tuple(topk.shape)}."
            )
        for expert, ratio in ratios.items():
            ratio = float(ratio)
            if math.isnan(ratio) or ratio < 0:
                raise MoEUnlearnError(f"f_F/f_R of layer {layer} expert {expert} must be ≥ 0, got {ratio!r}.")
            hit = (topk == expert).any(dim=-1).float()
            raw = raw + hit * (min(ratio, w_max) - 1.0)
    raw = raw.clamp_min(0.0)  # ratios < 1 (explicit selections) must not produce negative weights
    totals = torch.stack([(raw * counted).sum(), counted.sum()])
    if sum_over_processes is not None:
        totals = sum_over_processes(totals)
    mean = totals[0] / totals[1].clamp_min(1.0)
    weights = (raw / mean.clamp_min(1e-12)).clamp_max(w_max)
    return weights * counted


@torch.no_grad()
def routing_share(
    topk_indices: torch.Tensor,
    expert: int,
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """(Weighted) fraction of counted tokens whose top-k contains ``expert``: ``Σ w·m·hit / Σ w·m``.

    With TRACE weights this is the retain-side frequency the calibration steers towards f_F; log it next
    to f_F(l, e). Returns a 0-d tensor (no host sync; call ``.item()`` when logging).
    """
    if topk_indices.dim() != 2 or mask.dim() != 1 or mask.shape[0] != topk_indices.shape[0]:
        raise MoEUnlearnError(
            f"Expected top-k indices [N, k] and a mask [N], got {tuple(topk_indices.shape)} and {tuple(mask.shape)}."
        )
    if weights is not None and weights.numel() != mask.shape[0]:
        raise MoEUnlearnError(f"weights must have one value per token ({mask.shape[0]}), got {tuple(weights.shape)}.")
    w = mask.float() if weights is None else mask.float() * weights.float().reshape(-1)
    hit = (topk_indices == expert).any(dim=-1).float()
    return (w * hit).sum() / w.sum().clamp_min(1e-12)
