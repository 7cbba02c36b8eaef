"""``MoEUnlearnConfig``: every knob of an unlearning run, as a ``TrainingArguments`` subclass (TRL style).

Being a dataclass of ``TrainingArguments``, it round-trips through JSON and ``HfArgumentParser``/``TrlParser``,
so the CLI (``hf-moe-unlearn unlearn --forget_loss npo ...``) and YAML configs come for free.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .errors import MoEUnlearnError


@dataclass
class MoEUnlearnConfig(TrainingArguments):
    r"""Configuration of :class:`~hf_moe_unlearn.MoEUnlearnTrainer`.

    Losses (the total is ``γ·L_forget + α·L_retain + α_anchor·L_anchor``):
        forget_loss: registered forget loss: ``ga``, ``npo``, ``simnpo``, ``rmu``, ``idk`` or your own.
        forget_loss_weight: γ.
        retain_loss: registered retain loss: ``nll`` (GradDiff), ``kl``, ``rmu_retain``, or ``none``.
        retain_loss_weight: α (GradDiff λ).
        npo_beta, simnpo_beta, simnpo_delta: NPO / SimNPO temperatures and margin.
        rmu_layer: decoder layer whose MoE output RMU steers (default: the lowest selected layer).
        rmu_steering_coeff: RMU's c. rmu_seed: seed of its random direction.
        kl_direction: ``model_to_ref`` = KL(pθ‖pref) (default) or ``ref_to_model`` (OpenUnlearning's).
        forget_loss_bound: stop training when |forget loss| exceeds this (or is NaN); None disables the bound.

    SEUF (router anchor):
        anchor_loss_weight: SEUF α on ``‖g − onehot(e*)‖²`` at the selected layers; 0 turns the anchor off.
        anchor_reduction: ``paper`` (sum over experts, Eq. 3–4) or ``code`` (mean, as the public SEUF code).

    TRACE (retain reweighting):
        retain_weighting: ``none`` or ``trace`` (token-reweighted retain loss).
        trace_tau, trace_rho, trace_top_m, trace_max_layers: TRACE selection thresholds (docs/attribution.md).
        trace_w_max: cap of a ratio and of a token weight.

    Expert selection:
        selection: path to a saved ``selection.json`` (or a directory holding one). Wins over selection_method.
        selection_method: ``seuf`` or ``trace``, computed at the start of training from the datasets.
        seuf_top_m, seuf_per_layer: SEUF selection options (default: one expert over all layers).
        attribution_max_tokens: forget/retain tokens used for attribution (SEUF: ~100k suffice).

    What trains:
        adapter: ``lora`` (default) or ``full`` (full weights of the selected experts, as the SEUF paper).
        lora_r, lora_alpha: LoRA rank and alpha. train_router: also train the selected layers' routers.

    Data:
        max_length: tokens per example (longer ones are cut).
    """

    # --- losses
    forget_loss: str = field(default="ga", metadata={"help": "Forget loss: ga, npo, simnpo, rmu, idk (or registered)."})
    forget_loss_weight: float = field(default=1.0, metadata={"help": "γ, weight of the forget loss."})
    retain_loss: str = field(default="nll", metadata={"help": "Retain loss: nll, kl, rmu_retain or none."})
    retain_loss_weight: float = field(default=1.0, metadata={"help": "α, weight of the retain loss."})
    npo_beta: float = field(default=0.1, metadata={"help": "NPO β."})
    simnpo_beta: float = field(default=4.5, metadata={"help": "SimNPO β."})
    simnpo_delta: float = field(default=0.0, metadata={"help": "SimNPO δ."})
    rmu_layer: int | None = field(default=None, metadata={"help": "Layer whose MoE output RMU steers."})
    rmu_steering_coeff: float = field(default=6.5, metadata={"help": "RMU steering coefficient c."})
    rmu_seed: int = field(default=0, metadata={"help": "Seed of RMU's random direction."})
    kl_direction: str = field(default="model_to_ref", metadata={"help": "model_to_ref or ref_to_model."})
    forget_loss_bound: float | None = field(
        default=1000.0, metadata={"help": "Stop when |forget loss| exceeds this or is NaN (None: no bound)."}
    )
    # --- SEUF
    anchor_loss_weight: float = field(default=1.0, metadata={"help": "SEUF anchor weight α (0 = off)."})
    anchor_reduction: str = field(default="paper", metadata={"help": "paper or code."})
    # --- TRACE
    retain_weighting: str = field(default="none", metadata={"help": "none or trace."})
    trace_tau: float = field(default=1.0, metadata={"help": "TRACE τ: f_F ≥ τ·k/E."})
    trace_rho: float = field(default=1.1, metadata={"help": "TRACE ρ: f_F/f_R ≥ ρ."})
    trace_top_m: int = field(default=1, metadata={"help": "TRACE experts per layer."})
    trace_max_layers: int | None = field(default=None, metadata={"help": "TRACE: keep the N best layers."})
    trace_w_max: float = field(default=10.0, metadata={"help": "TRACE cap on ratios and token weights."})
    # --- selection
    selection: str | None = field(default=None, metadata={"help": "Path to selection.json."})
    selection_method: str = field(default="seuf", metadata={"help": "seuf or trace (when no selection is given)."})
    seuf_top_m: int = field(default=1, metadata={"help": "SEUF: number of experts."})
    seuf_per_layer: bool = field(default=False, metadata={"help": "SEUF: top-M in each layer."})
    attribution_max_tokens: int | None = field(default=100_000, metadata={"help": "Tokens used for attribution."})
    attribution_batch_size: int = field(default=8, metadata={"help": "Batch size of the attribution pass."})
    # --- adapter
    adapter: str = field(default="lora", metadata={"help": "lora or full."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha."})
    train_router: bool = field(default=True, metadata={"help": "Train the selected layers' routers."})
    # --- data
    max_length: int = field(default=512, metadata={"help": "Maximum tokens per example."})
    # --- TrainingArguments defaults that differ (SEUF's lr; log often enough to see routing move)
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (SEUF: 1e-4)."})
    logging_steps: float = field(default=5, metadata={"help": "Log every N steps."})
    # Forget and retain halves of a batch travel as `retain_*` keys the model's forward does not take.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep False: batches carry retain_* keys."})

    def __post_init__(self) -> None:
        super().__post_init__()
        # Our LoRA sits in the selected layers only: the backward must not be forced down to the inputs, so
        # checkpointing must not need input gradients (reentrant checkpointing would).
        if self.gradient_checkpointing and not self.gradient_checkpointing_kwargs:
            self.gradient_checkpointing_kwargs = {"use_reentrant": False}
        self.validate()

    def validate(self) -> None:
        """Raise a clear error for values no run could use (losses are checked against the registry by the trainer)."""
        choices = {
            "selection_method": ("seuf", "trace"),
            "adapter": ("lora", "full"),
            "retain_weighting": ("none", "trace"),
            "anchor_reduction": ("paper", "code"),
            "kl_direction": ("model_to_ref", "ref_to_model"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise MoEUnlearnError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}.")
        if self.anchor_loss_weight < 0 or self.forget_loss_weight < 0 or self.retain_loss_weight < 0:
            raise MoEUnlearnError("Loss weights must be non-negative.")
        if self.retain_weighting == "trace" and self.retain_loss == "none":
            raise MoEUnlearnError("retain_weighting='trace' reweights the retain loss: set retain_loss to nll or kl.")
