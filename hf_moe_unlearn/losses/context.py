"""``LossContext``: the one object the trainer hands to every loss.

A loss is a callable ``loss(ctx) -> Tensor``. Rather than give each loss its own signature (and rebuild the
inputs in every trainer, as OpenUnlearning does), the trainer fills one context per step with what it
has already computed (batches, logits) and *lazy providers* for the expensive extras (reference-model
logits, RMU hidden states, the IDK forward): a loss that does not ask for them costs nothing. A provider
the run lacks is ``None``, and :meth:`LossContext.require` turns that into an error that says what to do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import MoEUnlearnError
from . import functional as LF
from .functional import IGNORE_INDEX

#: Hyper-parameters losses read from ``ctx.config`` (any object; read with ``getattr``) and their
#: defaults, the field's usual values (``docs/unlearning-reference.md``, ``docs/methods.md``).
LOSS_DEFAULTS: dict[str, Any] = {
    "npo_beta": 0.1,  # NPO inverse temperature β
    "idk_dpo_beta": 0.1,  # IdkDPO β (OpenUnlearning's IdkDPO default)
    "dpo_beta": 0.1,  # DPO with alternate answers: β (OpenUnlearning configs/trainer/DPO.yaml)
    "undial_beta": 10.0,  # UNDIAL strength β on the forget token's logit (OpenUnlearning configs/trainer/UNDIAL.yaml)
    "wga_beta": 1.0,  # WGA exponent β of p (OpenUnlearning configs/trainer/WGA.yaml)
    "satimp_beta1": 5.0,  # SatImp exponent β1 of p (saturation; OpenUnlearning configs/trainer/SatImp.yaml)
    "satimp_beta2": 1.0,  # SatImp exponent β2 of 1 − p (importance; same file)
    "ceu_ignore_first_n_answer_tokens": 1,  # CE-U: first answer tokens left out (OpenUnlearning trainer/CEU.yaml)
    "simnpo_beta": 4.5,  # SimNPO β (MUSE/WMDP; TOFU uses 2.5)
    "simnpo_delta": 0.0,  # SimNPO margin δ (OpenUnlearning convention; paper's γ = β·δ)
    "rmu_steering_coeff": 6.5,  # RMU c (WMDP code default for 7B models; 6.5–20 in use)
    "rmu_seed": 0,  # seed of the RMU random direction u
    "anchor_form": "masked_softmax",  # SEUF anchor's g: "masked_softmax" (paper, top-k-masked) or "full_softmax" (code)
    "anchor_reduction": "paper",  # SEUF anchor: "paper" (sum over experts) or "code" (mean = paper/E)
    "kl_direction": "model_to_ref",  # retain KL: KL(pθ‖pref); "ref_to_model" for OpenUnlearning parity
    "trace_w_max": 10.0,  # TRACE cap on a ratio and on a token weight
}

# requirement name -> (what is missing, what to do about it)
_REQUIREMENT_HELP: dict[str, tuple[str, str]] = {
    "reference": (
        "a reference model",
        "the trainer provides `reference_logits` only when the run has a frozen reference model (the starting "
        "model; with LoRA the base model with adapters disabled). Enable it, or pick a loss without one "
        "(forget: ga, simnpo, rmu, idk_nll, wga, satimp, ceu; retain: nll). 'idk_dpo' / 'dpo' also need the reference "
        "on the IDK / alternate inputs, `reference_logits('idk')` / `reference_logits('alternate')`.",
    ),
    "hidden": (
        "hidden states at the RMU layer",
        "the trainer provides `hidden_states` when an RMU layer is configured. Set the RMU layer in the config.",
    ),
    "idk": (
        "'I don't know' answers",
        "the forget batch needs `idk_input_ids`/`idk_attention_mask`/`idk_labels` (a forget dataset with "
        "prompt/answer columns and an `idk` answer column) and the trainer must provide `idk_logits`.",
    ),
    "alternate": (
        "an alternate answer per forget example",
        "the forget batch needs `alternate_input_ids`/`alternate_attention_mask`/`alternate_labels` (a forget dataset "
        "with prompt/answer columns and an `alternate` column: the answer to prefer over the true one, e.g. TOFU's "
        "`paraphrased_answer`, a perturbed answer, or an IDK answer) and the trainer must provide `alternate_logits`.",
    ),
    "router_logits": (
        "live router logits of the selected layers",
        "the trainer provides `router_logits` and `selected_experts` once experts are selected (SEUF/TRACE "
        "attribution or an explicit selection). Select experts first.",
    ),
    "retain_routing": (
        "the retain batch's routing and the selected experts' f_F/f_R ratios",
        "the trainer fills `retain_topk` (router hooks on the retain forward) and `critical_ratios` (from "
        "the TRACE expert statistics). Run TRACE attribution, or drop the 'trace' weighting.",
    ),
    "retain_batch": (
        "a retain batch",
        "give the trainer a retain dataset, or use retain loss 'none'.",
    ),
    "retain_logits": (
        "the model's logits on the retain batch",
        "give the trainer a retain dataset, or use retain loss 'none'.",
    ),
    "forget_logits": (
        "the model's logits on the forget batch",
        "the trainer computes them in the forget forward; a custom trainer must set `forget_logits`.",
    ),
}


@dataclass
class LossContext:
    """Everything a loss may need for one training step.

    Batches and tensors:
        forget_batch: ``input_ids``, ``attention_mask``, ``labels`` (unshifted, -100 = not counted) of the
            forget batch; optionally ``idk_input_ids``, ``idk_attention_mask``, ``idk_labels``.
        retain_batch: the same keys for the paired retain batch, or ``None``.
        forget_logits, retain_logits: ``[B, T, V]`` logits of the model being unlearned (with grad), or ``None``.
        config: any object with the hyper-parameter attributes of :data:`LOSS_DEFAULTS` (read with
            ``getattr``; missing attributes take the default). ``None`` = all defaults.

    Lazy providers (``None`` when the run lacks them; the trainer caches their results per step):
        reference_logits: ``split -> logits`` of the frozen reference model, computed without grad, on
            ``"forget"`` (the forget batch), ``"retain"`` (the retain batch), ``"idk"`` (the forget batch's IDK
            inputs ``idk_input_ids``/``idk_attention_mask``; needed by ``idk_dpo``) or ``"alternate"`` (its
            alternate-answer inputs; needed by ``dpo``).
        reference_nll: ``split -> (nll_sum [B], n_tokens [B])``, the frozen reference's summed NLL of each sequence
            of that split (no grad). The trainer serves it from its per-example cache; ``None`` = computed from
            ``reference_logits``. Losses read it through :meth:`reference_sequence_nll`, never directly.
        hidden_states: ``(split, reference) -> [B, T, H]`` hidden states at the RMU layer, of the model
            (with grad) or of the reference (``reference=True``, no grad).
        idk_logits: ``() -> logits`` of the model being unlearned (with grad) on the IDK inputs.
        alternate_logits: ``() -> logits`` of the model being unlearned (with grad) on the alternate-answer inputs
            (``alternate_input_ids``/``alternate_attention_mask``; needed by ``dpo``); the reference's on them is
            ``reference_logits("alternate")`` / ``reference_sequence_nll("alternate")``.

    MoE routing:
        router_logits: layer -> live ``[N, E]`` router logits of the forget forward (N = B·T, row-major,
            with grad), for the layers holding selected experts.
        selected_experts: layer -> expert indices selected for unlearning.
        forget_topk: layer -> ``[N, k]`` top-k expert indices of each forget token (detached, from the hooks
            of the forget forward, same row order as ``router_logits``) — the mask of the SEUF anchor's paper
            form (``anchor_form="masked_softmax"``).
        score_fn: layer -> ``"softmax"`` or ``"sigmoid"`` (how the router scores experts); required for every
            layer with selected experts (no default: a sigmoid router scored as softmax would be silently wrong).
        retain_topk: layer -> ``[N, k]`` top-k indices of each retain token (detached, from the hooks of the
            retain forward) — input of the TRACE weighting.
        critical_ratios: layer -> {expert: f_F(l,e)/f_R(l,e)} of the selected experts (TRACE statistics).

    Filled during the step:
        retain_token_weights: ``[B, T]`` weights **aligned with the unshifted retain labels**: ``w[:, t]``
            weights the loss term whose target is ``labels[:, t]`` (``w[:, 0]`` is unused). Set by the
            trainer from the 'weighting' loss (TRACE) before it calls the retain loss; ``None`` = unweighted.
        rmu_control: ``[H]`` RMU control vector ``c·u``, fixed for the run (built on first use if ``None``).

    Data parallelism:
        sum_over_processes: in a multi-process run, a function summing a tensor over the processes (a
            collective: every process calls it at the same point); ``None`` with one process. Batch-level
            normalisations (TRACE's mean weight) use it so the step's whole batch is normalised as one.
    """

    forget_batch: dict[str, torch.Tensor]
    retain_batch: dict[str, torch.Tensor] | None = None
    forget_logits: torch.Tensor | None = None
    retain_logits: torch.Tensor | None = None
    config: Any = None
    reference_logits: Callable[[str], torch.Tensor] | None = None
    reference_nll: Callable[[str], tuple[torch.Tensor, torch.Tensor]] | None = None
    hidden_states: Callable[[str, bool], torch.Tensor] | None = None
    idk_logits: Callable[[], torch.Tensor] | None = None
    alternate_logits: Callable[[], torch.Tensor] | None = None
    router_logits: dict[int, torch.Tensor] | None = None
    forget_topk: dict[int, torch.Tensor] | None = None
    selected_experts: dict[int, list[int]] = field(default_factory=dict)
    score_fn: dict[int, str] = field(default_factory=dict)
    retain_topk: dict[int, torch.Tensor] | None = None
    critical_ratios: dict[int, dict[int, float]] | None = None
    retain_token_weights: torch.Tensor | None = None
    rmu_control: torch.Tensor | None = None
    sum_over_processes: Callable[[torch.Tensor], torch.Tensor] | None = None

    # ------------------------------------------------------------------------------------ settings
    def setting(self, name: str) -> Any:
        """A hyper-parameter from ``config``, or its documented default in :data:`LOSS_DEFAULTS`."""
        if name not in LOSS_DEFAULTS and not hasattr(self.config, name):
            raise MoEUnlearnError(
                f"Unknown loss setting {name!r}: not on the config and no default. Known: {', '.join(LOSS_DEFAULTS)}."
            )
        return getattr(self.config, name, LOSS_DEFAULTS.get(name))

    # -------------------------------------------------------------------------------- requirements
    def has(self, requirement: str) -> bool:
        """Whether the context can serve ``requirement`` (one of :data:`REQUIREMENTS`)."""
        if requirement == "reference":
            return self.reference_logits is not None
        if requirement == "hidden":
            return self.hidden_states is not None
        if requirement == "idk":
            return self.idk_logits is not None and "idk_labels" in self.forget_batch
        if requirement == "alternate":
            return self.alternate_logits is not None and "alternate_labels" in self.forget_batch
        if requirement == "router_logits":
            return bool(self.router_logits) and bool(self.selected_experts)
        if requirement == "retain_routing":
            return self.retain_topk is not None and self.critical_ratios is not None
        if requirement == "retain_batch":
            return self.retain_batch is not None
        if requirement == "retain_logits":
            return self.retain_batch is not None and self.retain_logits is not None
        if requirement == "forget_logits":
            return self.forget_logits is not None
        raise MoEUnlearnError(f"Unknown requirement {requirement!r}. Known: {', '.join(REQUIREMENTS)}.")

    def require(self, requirement: str, loss: str | None = None) -> None:
        """Raise a :class:`MoEUnlearnError` saying what is missing and how to provide it, unless present.

        Args:
            requirement: one of :data:`REQUIREMENTS` (e.g. ``"reference"``).
            loss: name of the loss asking, for the message (``"loss 'npo' needs a reference model: ..."``).
        """
        if self.has(requirement):
            return
        what, fix = _REQUIREMENT_HELP[requirement]
        who = f"loss {loss!r}" if loss else "this loss"
        raise MoEUnlearnError(f"{who} needs {what}: {fix}")

    # ------------------------------------------------------------------------------------- reference
    def split_labels(self, split: str) -> torch.Tensor:
        """The unshifted labels of ``split``: ``"forget"``, ``"retain"``, ``"idk"`` or ``"alternate"`` (the forget
        batch's IDK / alternate answers)."""
        if split == "forget":
            return self.forget_batch["labels"]
        if split == "idk":
            if "idk_labels" not in self.forget_batch:
                self.require("idk")  # raises, saying where IDK answers come from
            return self.forget_batch["idk_labels"]
        if split == "alternate":
            if "alternate_labels" not in self.forget_batch:
                self.require("alternate")  # raises, saying where alternate answers come from
            return self.forget_batch["alternate_labels"]
        if split == "retain":
            self.require("retain_batch")
            return self.retain_batch["labels"]
        raise MoEUnlearnError(f"Unknown split {split!r}: use 'forget', 'retain', 'idk' or 'alternate'.")

    def reference_sequence_nll(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen reference's ``(summed NLL ℓref(x) [B], counted tokens |x| [B])`` of each sequence of ``split``.

        What NPO and DPO-style losses compare against. The value of an example never changes during training, so
        the trainer computes it once per example and serves later steps from a cache (``reference_nll``); without
        that provider it is :func:`~.functional.sequence_nll` of ``reference_logits(split)``, as the trainer computed
        it at every step before the cache. Losses declared with ``register_loss(..., reference="sequence")`` read the
        reference only through this method.
        """
        if self.reference_nll is not None:
            return self.reference_nll(split)
        self.require("reference")
        labels = self.split_labels(split)
        with torch.no_grad():
            return LF.sequence_nll(self.reference_logits(split), labels)

    # ------------------------------------------------------------------------------------- helpers
    @staticmethod
    def token_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, T]`` float mask of counted *tokens* (not shifted): label-bearing and not padding.

        For per-token quantities that are not next-token predictions (hidden states, routing of the forget
        tokens), the counted tokens are those whose own label is kept.
        """
        mask = batch["labels"] != IGNORE_INDEX
        if "attention_mask" in batch:
            mask = mask & batch["attention_mask"].bool()
        return mask.float()


#: Names a loss may declare in ``requires`` (and pass to :meth:`LossContext.require`).
REQUIREMENTS: tuple[str, ...] = tuple(_REQUIREMENT_HELP)
