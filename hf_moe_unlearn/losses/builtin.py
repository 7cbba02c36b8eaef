"""The built-in losses, registered by name. Each is a few lines over :mod:`.functional`.

forget:    ga, npo (reference: sequence NLLs), simnpo, rmu (hidden), idk_nll (IDK answers), idk_dpo (reference:
           sequence NLLs, + IDK answers), dpo (reference: sequence NLLs, + alternate answers), undial (reference: token
           logits), wga, satimp, ceu
retain:    nll, kl (reference: token logits), rmu_retain (hidden, the reference's too); ``none`` is handled by the
           trainer
router:    seuf_anchor (router logits of the selected layers)
weighting: trace — returns ``[B, T]`` retain-token weights (aligned with the unshifted retain labels),
           which the trainer stores in ``ctx.retain_token_weights`` before calling the retain loss.

A reference read as sequence NLLs (``reference="sequence"``) is served from the trainer's per-example cache; token
logits and RMU's hidden states are not cacheable at a useful cost (``[T, V]`` or ``[T, H]`` per example) and come
from a reference forward at each step that asks for them.
"""

from __future__ import annotations

import torch

from ..errors import MoEUnlearnError
from . import functional as LF
from .context import LossContext
from .registry import register_loss


# ------------------------------------------------------------------------------------------- forget
@register_loss("ga", kind="forget", requires=("forget_logits",))
def ga(ctx: LossContext) -> torch.Tensor:
    """Gradient ascent on the forget tokens."""
    return LF.ga_loss(ctx.forget_logits, ctx.forget_batch["labels"])


@register_loss("npo", kind="forget", requires=("forget_logits", "reference"), reference="sequence")
def npo(ctx: LossContext) -> torch.Tensor:
    """NPO with β = ``config.npo_beta`` against the frozen reference (its summed NLL per forget example: cacheable)."""
    labels = ctx.forget_batch["labels"]
    nll_sum, _ = LF.sequence_nll(ctx.forget_logits, labels)
    ref_nll_sum, _ = ctx.reference_sequence_nll("forget")
    return LF.npo_loss(nll_sum, ref_nll_sum, float(ctx.setting("npo_beta")))


@register_loss("simnpo", kind="forget", requires=("forget_logits",))
def simnpo(ctx: LossContext) -> torch.Tensor:
    """SimNPO with ``config.simnpo_beta`` / ``config.simnpo_delta`` (no reference model)."""
    nll_sum, n_tokens = LF.sequence_nll(ctx.forget_logits, ctx.forget_batch["labels"])
    return LF.simnpo_loss(nll_sum, n_tokens, float(ctx.setting("simnpo_beta")), float(ctx.setting("simnpo_delta")))


def rmu_control(ctx: LossContext, hidden_size: int, device: torch.device) -> torch.Tensor:
    """The run's RMU control vector: ``ctx.rmu_control``, built from the config (and kept) if unset."""
    if ctx.rmu_control is None:
        ctx.rmu_control = LF.rmu_control_vector(
            hidden_size, float(ctx.setting("rmu_steering_coeff")), int(ctx.setting("rmu_seed")), device=device
        )
    return ctx.rmu_control


@register_loss("rmu", kind="forget", requires=("hidden",))
def rmu(ctx: LossContext) -> torch.Tensor:
    """RMU: forget hidden states at the RMU layer pushed towards ``c·u``."""
    hidden = ctx.hidden_states("forget", False)
    control = rmu_control(ctx, hidden.shape[-1], hidden.device)
    return LF.rmu_forget_loss(hidden, control, ctx.token_mask(ctx.forget_batch).to(hidden.device))


@register_loss("idk_nll", kind="forget", requires=("idk",))
def idk_nll(ctx: LossContext) -> torch.Tensor:
    """Fine-tune towards "I don't know": the mean NLL of the IDK answer tokens (to be *minimised*)."""
    return LF.nll_loss(ctx.idk_logits(), ctx.forget_batch["idk_labels"])


@register_loss("idk_dpo", kind="forget", requires=("forget_logits", "reference", "idk"), reference="sequence")
def idk_dpo(ctx: LossContext) -> torch.Tensor:
    """IdkDPO (OpenUnlearning): DPO with the IDK answer preferred and the true forget answer rejected.

    β = ``config.idk_dpo_beta``. The reference's summed NLLs of the true and the IDK answer come from
    ``ctx.reference_sequence_nll("forget")`` / ``("idk")`` (cacheable per example).
    """
    return _preferred_over_forget(ctx, "idk", ctx.idk_logits(), float(ctx.setting("idk_dpo_beta")))


@register_loss("dpo", kind="forget", requires=("forget_logits", "reference", "alternate"), reference="sequence")
def dpo(ctx: LossContext) -> torch.Tensor:
    """DPO with alternate answers (OpenUnlearning's ``DPO``, ``src/trainer/unlearn/dpo.py``): the forget example's
    alternate answer (the ``alternate`` column) preferred, its true answer rejected, against the frozen reference.

    β = ``config.dpo_beta`` (0.1, ``configs/trainer/DPO.yaml``). The same maths as ``idk_dpo`` on another preferred
    answer, as in OpenUnlearning, where IdkDPO is this trainer fed IDK answers (``QAwithIdkDataset``) and AltPO feeds
    it model-written alternate answers (``QAwithAlternateDataset``, ``alternate_key``). Reference NLLs cacheable.
    """
    return _preferred_over_forget(ctx, "alternate", ctx.alternate_logits(), float(ctx.setting("dpo_beta")))


def _preferred_over_forget(ctx: LossContext, answer: str, answer_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO with the forget batch's ``answer`` column ("idk" or "alternate") preferred and its true answer rejected;
    the reference's sequence NLLs come through ``ctx.reference_sequence_nll`` (cacheable per example)."""
    lose_nll, _ = LF.sequence_nll(ctx.forget_logits, ctx.forget_batch["labels"])
    win_nll, _ = LF.sequence_nll(answer_logits, ctx.forget_batch[f"{answer}_labels"])
    lose_ref_nll, _ = ctx.reference_sequence_nll("forget")
    win_ref_nll, _ = ctx.reference_sequence_nll(answer)
    return LF.dpo_loss(win_nll, win_ref_nll, lose_nll, lose_ref_nll, beta)


@register_loss("undial", kind="forget", requires=("forget_logits", "reference"), reference="logits")
def undial(ctx: LossContext) -> torch.Tensor:
    """UNDIAL: self-distillation towards the reference's logits with the forget token's lowered by
    ``config.undial_beta`` (reads token-level reference logits: a reference forward every step, not cacheable)."""
    with torch.no_grad():
        ref_logits = ctx.reference_logits("forget")
    return LF.undial_loss(ctx.forget_logits, ref_logits, ctx.forget_batch["labels"], float(ctx.setting("undial_beta")))


@register_loss("wga", kind="forget", requires=("forget_logits",))
def wga(ctx: LossContext) -> torch.Tensor:
    """Weighted gradient ascent: GA with each token weighted by p^β, β = ``config.wga_beta`` (no reference)."""
    return LF.wga_loss(ctx.forget_logits, ctx.forget_batch["labels"], float(ctx.setting("wga_beta")))


@register_loss("satimp", kind="forget", requires=("forget_logits",))
def satimp(ctx: LossContext) -> torch.Tensor:
    """SatImp: GA with token weights p^β1·(1−p)^β2 (``config.satimp_beta1`` / ``satimp_beta2``; no reference)."""
    return LF.satimp_loss(ctx.forget_logits, ctx.forget_batch["labels"], float(ctx.setting("satimp_beta1")),
                          float(ctx.setting("satimp_beta2")))


@register_loss("ceu", kind="forget", requires=("forget_logits",))
def ceu(ctx: LossContext) -> torch.Tensor:
    """CE-U: cross-entropy to the model's own detached distribution with the forget token removed, the first
    ``config.ceu_ignore_first_n_answer_tokens`` answer tokens left out (no reference)."""
    return LF.ceu_loss(ctx.forget_logits, ctx.forget_batch["labels"],
                       ctx.setting("ceu_ignore_first_n_answer_tokens"))


# ------------------------------------------------------------------------------------------- retain
@register_loss("nll", kind="retain", requires=("retain_logits",))
def nll(ctx: LossContext) -> torch.Tensor:
    """NLL on retain tokens, TRACE-weighted when ``ctx.retain_token_weights`` is set."""
    return LF.nll_loss(ctx.retain_logits, ctx.retain_batch["labels"], ctx.retain_token_weights)


@register_loss("kl", kind="retain", requires=("retain_logits", "reference"), reference="logits")
def kl(ctx: LossContext) -> torch.Tensor:
    """Per-token KL to the reference on retain tokens (direction: ``config.kl_direction``), TRACE-weighted if set."""
    with torch.no_grad():
        ref_logits = ctx.reference_logits("retain")
    return LF.kl_loss(
        ctx.retain_logits,
        ref_logits,
        ctx.retain_batch["labels"],
        ctx.retain_token_weights,
        direction=ctx.setting("kl_direction"),
    )


@register_loss("rmu_retain", kind="retain", requires=("retain_batch", "hidden"))
def rmu_retain(ctx: LossContext) -> torch.Tensor:
    """RMU retain: retain hidden states kept at the reference's."""
    if ctx.retain_token_weights is not None:
        # Silently ignoring the weights would make a TRACE run look calibrated when it is not.
        raise MoEUnlearnError(
            "TRACE token weights apply to the 'nll' and 'kl' retain losses (per-prediction terms); "
            "'rmu_retain' cannot use them. Use retain loss 'nll' or 'kl' with the 'trace' weighting."
        )
    hidden = ctx.hidden_states("retain", False)
    with torch.no_grad():
        ref_hidden = ctx.hidden_states("retain", True)
    return LF.rmu_retain_loss(hidden, ref_hidden, ctx.token_mask(ctx.retain_batch).to(hidden.device))


# ------------------------------------------------------------------------------------------- router
def _anchor_score_fn(ctx: LossContext, layer: int) -> str:
    """How layer ``layer``'s router scores experts; missing is an error, never a silent softmax."""
    if layer not in ctx.score_fn:
        raise MoEUnlearnError(
            f"No score_fn for layer {layer} (known: {sorted(ctx.score_fn)}): set ctx.score_fn[{layer}] to 'softmax' "
            "or 'sigmoid', as the model's router scores experts (the trainer takes it from find_moe_layers(model))."
        )
    return ctx.score_fn[layer]


def _anchor_topk(ctx: LossContext, layer: int, form: str) -> torch.Tensor | None:
    """The forget forward's top-k indices of ``layer`` for the masked (paper) form; ``None`` for the full form."""
    if form != "masked_softmax":
        return None
    if ctx.forget_topk is None or layer not in ctx.forget_topk:
        recorded = "none" if ctx.forget_topk is None else sorted(ctx.forget_topk)
        raise MoEUnlearnError(
            f"anchor_form='masked_softmax' needs the forget tokens' top-k indices of layer {layer} "
            f"(ctx.forget_topk; recorded: {recorded}). The trainer fills them from the router hooks of the forget "
            "forward; a custom trainer must set forget_topk, or use anchor_form='full_softmax'."
        )
    return ctx.forget_topk[layer]


@register_loss("seuf_anchor", kind="router", requires=("router_logits",))
def seuf_anchor(ctx: LossContext) -> torch.Tensor:
    """SEUF anchor on every layer with selected experts, **summed over layers** (each layer's anchor is its
    own constraint, so adding a layer does not weaken the others). ``config.anchor_form`` picks the paper's
    top-k-masked g (default; reads ``ctx.forget_topk``) or the code's full distribution;
    ``config.anchor_reduction`` picks paper or code scale."""
    mask = ctx.token_mask(ctx.forget_batch).reshape(-1)
    form = ctx.setting("anchor_form")
    reduction = ctx.setting("anchor_reduction")
    total: torch.Tensor | None = None
    for layer, experts in sorted(ctx.selected_experts.items()):
        if layer not in ctx.router_logits:
            raise MoEUnlearnError(
                f"No router logits recorded for layer {layer} (recorded: {sorted(ctx.router_logits)}). The "
                "forget forward must record the router of every layer holding a selected expert."
            )
        logits = ctx.router_logits[layer]
        term = LF.seuf_anchor_loss(
            logits,
            experts,
            mask.to(logits.device),
            score_fn=_anchor_score_fn(ctx, layer),
            reduction=reduction,
            form=form,
            topk_indices=_anchor_topk(ctx, layer, form),
        )
        total = term if total is None else total + term
    return total


# ---------------------------------------------------------------------------------------- weighting
def _routing_frame(label_weights: torch.Tensor) -> torch.Tensor:
    """Label-aligned ``[B, T]`` weights back to the token (routing) frame: ``w_tok[:, t] = w_lab[:, t+1]``."""
    out = torch.zeros_like(label_weights)
    out[:, :-1] = label_weights[:, 1:]
    return out


@register_loss("trace", kind="weighting", requires=("retain_batch", "retain_routing"))
def trace(ctx: LossContext) -> torch.Tensor:
    """TRACE retain-token weights, ``[B, T]`` aligned with the unshifted retain labels.

    The routing of token ``t`` (recorded per input position) shapes the prediction of ``labels[:, t+1]``,
    so the weight computed from position ``t``'s top-k goes to label position ``t+1``; the counted tokens
    are the counted predictions (:func:`~.functional.prediction_mask`), so the weights average to 1 over
    exactly the terms of the retain loss.
    """
    labels = ctx.retain_batch["labels"]
    mask = LF.prediction_mask(labels).reshape(-1)
    token_weights = LF.trace_token_weights(
        ctx.retain_topk, ctx.critical_ratios, mask, w_max=float(ctx.setting("trace_w_max")),
        sum_over_processes=ctx.sum_over_processes,
    ).view(labels.shape)
    label_weights = torch.zeros_like(token_weights)
    label_weights[:, 1:] = token_weights[:, :-1]
    return label_weights


def trace_retain_shares(ctx: LossContext) -> dict[tuple[int, int], torch.Tensor]:
    """Per selected (layer, expert): the retain batch's **weighted** routing share, to log next to f_F.

    Uses ``ctx.retain_token_weights`` (unweighted if ``None``) on the same counted positions as
    :func:`trace`. TRACE is calibrating when these approach the forget-side frequencies.
    """
    ctx.require("retain_routing", loss="trace")
    ctx.require("retain_batch", loss="trace")
    labels = ctx.retain_batch["labels"]
    mask = LF.prediction_mask(labels).reshape(-1)
    weights = None
    if ctx.retain_token_weights is not None:
        weights = _routing_frame(ctx.retain_token_weights.float()).reshape(-1)
    return {
        (layer, expert): LF.routing_share(ctx.retain_topk[layer], expert, mask, weights)
        for layer, ratios in sorted(ctx.critical_ratios.items())
        for expert in sorted(ratios)
    }
