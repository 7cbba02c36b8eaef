"""``MoEUnlearnConfig``: every knob of an unlearning run, as a ``TrainingArguments`` subclass (TRL style).

Being a dataclass of ``TrainingArguments``, it round-trips through JSON and ``HfArgumentParser``/``TrlParser``,
so the CLI (``hf-moe-unlearn unlearn --forget_loss npo ...``) and YAML configs come for free.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from .data.text import check_max_length
from .errors import MoEUnlearnError
from .losses.registry import list_losses

logger = logging.getLogger(__name__)


#: AdamW learning rate used when ``learning_rate`` is left unset, by what trains. Expert-selective LoRA changes a
#: small part of the model (tokens routed elsewhere never see it), so it needs about ten times the learning rate of
#: LoRA on every expert to forget as much in as many steps. Chosen with ``hf-moe-unlearn bench`` on the built-in
#: benchmark (docs/benchmark.md, "Default learning rates"): these are the rates at which every demo method reaches
#: the forget target with ``stop_at_holdout`` in the default budget. They are for the benchmark's tiny models; on a
#: billion-parameter MoE start an order of magnitude lower (SEUF trains one full expert at 1e-4) and let
#: ``stop_at_holdout`` and ``max_retain_nll_rise`` say when to stop.
DEFAULT_LEARNING_RATES: dict[str, float] = {
    "lora": 2e-2,  # LoRA on the selected experts (SEUF, TRACE)
    "lora_every_expert": 6e-3,  # LoRA on every expert of each trained layer (the "LoRA (all)" baseline)
    "full": 6e-3,  # the selected experts' full weights
}


def default_learning_rate(adapter: str, every_expert: bool) -> float:
    """The learning rate of :data:`DEFAULT_LEARNING_RATES` for an adapter mode and selection."""
    if adapter == "lora" and every_expert:
        return DEFAULT_LEARNING_RATES["lora_every_expert"]
    return DEFAULT_LEARNING_RATES[adapter]


@dataclass
class MoEUnlearnConfig(TrainingArguments):
    r"""Configuration of :class:`~hf_moe_unlearn.MoEUnlearnTrainer`.

    Losses (the total is ``γ·L_forget + α·L_retain + α_anchor·L_anchor``):
        forget_loss: registered forget loss: ``ga``, ``npo``, ``simnpo``, ``rmu``, ``idk_nll``, ``idk_dpo``, ``dpo``,
            ``undial``, ``wga``, ``satimp``, ``ceu`` or your own (docs/unlearning.md lists them with their formulas).
        forget_loss_weight: γ.
        retain_loss: registered retain loss: ``nll`` (GradDiff), ``kl``, ``rmu_retain``, or ``none``.
        retain_loss_weight: α (GradDiff λ).
        npo_beta, simnpo_beta, simnpo_delta, idk_dpo_beta: NPO / SimNPO / IdkDPO temperatures and SimNPO's margin.
        dpo_beta, undial_beta, wga_beta, satimp_beta1, satimp_beta2, ceu_ignore_first_n_answer_tokens: DPO (alternate
            answers) β, UNDIAL's strength β, WGA's exponent β, SatImp's exponents β1 (of p) and β2 (of 1 − p), CE-U's
            first answer tokens left out; defaults are OpenUnlearning's (configs/trainer/*.yaml).
        rmu_layer: decoder layer ℓ whose output hidden state (the residual stream, as the WMDP code's
            ``model.layers[ℓ]`` hook) RMU steers towards ``c·u`` on forget tokens and keeps at the frozen model's on
            retain tokens (``rmu_retain``, weight ``retain_loss_weight`` = WMDP's α). Default: the highest selected
            layer; every trainable parameter must lie at or below ℓ (the loss cannot reach the others).
        rmu_steering_coeff: RMU's c (6.5: the WMDP README's Zephyr-7B run, with α = 1200; the WMDP script's own
            argparse defaults are c = 20, α = 100, layer 7, params of layers 5–7). rmu_seed: seed of u.
        kl_direction: ``model_to_ref`` = KL(pθ‖pref) (default) or ``ref_to_model`` (OpenUnlearning's).
        forget_loss_bound: stop training when |forget loss| exceeds this (or is NaN); None disables the bound.
        max_param_norm_growth: stop training when the norm of all trainable tensors exceeds this factor times its
            value before the first step (default 1000; None: off): an adapter exploded by a learning rate far too
            large. Measured: the demo's methods grow it 1.3-9.5x in 60 steps over the grid 2e-3..6e-2; one AdamW
            step at learning_rate=1e3 ~4600x on a tiny model (AdamW moves every weight by about lr per step, so a
            wider model's small LoRA init grows even faster). 1000 is 100x above the first, below the second. The
            same guard (hf_moe_unlearn.guards) always stops on non-finite gradients and on gradients exactly 0 on
            every trainable parameter for 3 steps in a row.
        cache_reference: compute the frozen reference's summed NLL of each forget example (NPO, IdkDPO: losses
            registered with ``reference="sequence"``) the first time the example is seen and reuse it later, instead
            of a reference forward at every step (default True; the same values up to float rounding). ``kl``'s
            token logits and RMU's hidden states still come from a reference forward at each step.

    SEUF (router anchor):
        anchor_loss_weight: SEUF α on ``‖g − onehot(e*)‖²`` at the selected layers; 0 turns the anchor off.
        anchor_form: ``masked_softmax`` (default, the paper's g: router probabilities masked to each token's
            top-k, not renormalised) or ``full_softmax`` (the public SEUF code: before top-k masking).
        anchor_reduction: ``paper`` (sum over experts, Eq. 3–4) or ``code`` (mean, as the public SEUF code).
            The public code's anchor is ``anchor_form="full_softmax", anchor_reduction="code"``.

    TRACE (retain reweighting):
        retain_weighting: ``none`` or ``trace`` (token-reweighted retain loss).
        trace_tau, trace_rho, trace_top_m, trace_max_layers: TRACE selection thresholds (docs/attribution.md).
        trace_w_max: cap of a ratio and of a token weight.

    Expert selection:
        selection: path to a saved ``selection.json`` (or a directory holding one). Wins over selection_method.
        selection_method: ``seuf`` or ``trace``, computed at the start of training from the datasets.
        seuf_top_m, seuf_per_layer: SEUF selection options (default: one expert over all layers).
        seuf_score: what Eq. 2 averages: ``masked_softmax`` (default, the paper's top-k-masked router
            probabilities) or ``gate`` (the gate weights as the model applies them: renormalised for Mixtral,
            GPT-OSS and ``norm_topk_prob=True``, scaled for DeepSeek-V3 and PhiMoE).
        attribution_max_tokens: forget/retain tokens used for attribution (SEUF: ~100k suffice).

    What trains:
        learning_rate: None (default) picks :func:`default_learning_rate` for the adapter mode and the selection
            once the trainer knows the selection (LoRA on a few experts needs about 10x LoRA on every expert).
        adapter: ``lora`` (default) or ``full`` (full weights of the selected experts, as the SEUF paper).
        lora_r, lora_alpha: LoRA rank and alpha. train_router: also train the selected layers' routers.
        deterministic_routing: keep the MoE blocks in eval mode during training (default True): routers with
            train-mode noise (PhiMoE's jitter and sampled sparsemixer) would otherwise route the model differently
            from its frozen reference, so NPO's log-ratio would not start at 0 and routing statistics would be noisy.

    GRIP (router null-space constraint, arXiv 2601.16905; docs/unlearning.md, "GRIP"):
        router_constraint: ``none`` (default) or ``grip``: after every optimizer step, each trained router's
            weight change since the start is projected onto the null space of the retain set's router inputs
            (collected once, before training, with the recorder's hooks), so the retain tokens' router logits stay
            those of the start model. Needs a retain set and ``train_router=True``.
        grip_rank_cutoff: ε in (0, 1): the share of the retain inputs' energy (the trace of their second moment)
            left in the null space; the protected directions are the fewest leading eigen-directions carrying at
            least 1 − ε of it (default 1e-2, ours: the paper's value was not available to us; on the built-in
            benchmark's pre-trained target, 7.7k retain tokens, 1e-2 leaves 5-6 of 64 directions to the router, 1e-3
            none: the routers are then frozen; docs/unlearning.md, "GRIP").
        grip_ridge: λ ≥ 0 added to that second moment as λ times its mean eigenvalue before the cut-off
            (shrinkage towards isotropy, for retain tokens the collection did not see: it shrinks the null space);
            default 0 (ours).

    Data:
        max_length: tokens per example (longer ones are cut).

    Output folder (one run per folder; saves are atomic, see :mod:`hf_moe_unlearn.saving`):
        overwrite_output_dir: a new run refuses an output_dir that holds another run's checkpoints or saved
            adapter unless this is set (then they are removed first) or the run resumes.
        resume_from_checkpoint: a checkpoint folder, or ``"latest"`` (``--resume_from_checkpoint`` with no value;
            ``True`` in Python): the latest complete checkpoint in output_dir. Used by the CLI; in Python pass it
            to ``trainer.train``.

    Stopping when the forget set is forgotten (docs/unlearning.md; the holdout and forget probe sets are given to
    the trainer as ``holdout_dataset`` / ``forget_probe_dataset``, or ``--holdout`` / ``--forget_probe`` in the CLI):
        forget_probe_size: examples of the forget set (a fixed, seeded sample) whose mean token NLL is logged as
            ``eval_forget_probe_nll``, unless a separate forget probe set is given (used whole).
        retain_probe_size: examples of the retain set (fixed, seeded) logged as ``eval_retain_nll``.
        stop_at_holdout: stop at the first evaluation (after step 0) where the probe's mean NLL reaches the
            holdout's (``eval_forget_probe_nll >= eval_holdout_nll``): the forget set then looks like unseen text.
        max_retain_nll_rise: retain guard: stop when the retain NLL exceeds its step-0 value by more than this
            fraction (0.5 = +50%); None disables it.
        eval_steps: evaluate every N steps (default here 10). A holdout set or ``max_retain_nll_rise`` turns the
            evaluation on (``eval_strategy="steps"`` when it is ``"no"``, plus ``eval_on_start``).
    """

    # --- losses
    forget_loss: str = field(default="ga", metadata={
        "help": f"Forget loss: {', '.join(list_losses('forget'))} (or one you registered)."})  # from the registry
    forget_loss_weight: float = field(default=1.0, metadata={"help": "γ, weight of the forget loss."})
    retain_loss: str = field(default="nll", metadata={"help": "Retain loss: nll, kl, rmu_retain or none."})
    retain_loss_weight: float = field(default=1.0, metadata={"help": "α, weight of the retain loss."})
    npo_beta: float = field(default=0.1, metadata={"help": "NPO β."})
    simnpo_beta: float = field(default=4.5, metadata={"help": "SimNPO β."})
    simnpo_delta: float = field(default=0.0, metadata={"help": "SimNPO δ."})
    idk_dpo_beta: float = field(default=0.1, metadata={"help": "IdkDPO β (OpenUnlearning default 0.1)."})
    dpo_beta: float = field(default=0.1, metadata={"help": "DPO (alternate answers) β (OpenUnlearning default 0.1)."})
    undial_beta: float = field(default=10.0, metadata={"help": "UNDIAL strength β on the forget token's logit (> 0)."})
    wga_beta: float = field(default=1.0, metadata={"help": "WGA: token weight p^β (>= 0; 0 = GA)."})
    satimp_beta1: float = field(default=5.0, metadata={"help": "SatImp: exponent β1 of p (>= 0)."})
    satimp_beta2: float = field(default=1.0, metadata={"help": "SatImp: exponent β2 of 1 - p (>= 0)."})
    ceu_ignore_first_n_answer_tokens: int = field(
        default=1, metadata={"help": "CE-U: first answer tokens of each example left out of the loss (>= 0)."})
    rmu_layer: int | None = field(
        default=None,
        metadata={"help": "Decoder layer whose output (the residual stream) RMU steers; default: the highest "
                          "selected layer. Every trained parameter must lie at or below it."},
    )
    rmu_steering_coeff: float = field(default=6.5, metadata={"help": "RMU steering coefficient c."})
    rmu_seed: int = field(default=0, metadata={"help": "Seed of RMU's random direction."})
    kl_direction: str = field(default="model_to_ref", metadata={"help": "model_to_ref or ref_to_model."})
    forget_loss_bound: float | None = field(
        default=1000.0, metadata={"help": "Stop when |forget loss| exceeds this or is NaN (None: no bound)."}
    )
    max_param_norm_growth: float | None = field(
        default=1000.0,
        metadata={"help": "Stop when the norm of the trainable parameters exceeds this factor times its value before "
                          "the first step: an exploding adapter (None: no check)."},
    )
    cache_reference: bool = field(
        default=True,
        metadata={"help": "Compute the frozen reference's sequence NLL of each forget example (NPO, IdkDPO) once, "
                          "the first time it is seen, instead of a reference forward every step."},
    )
    # --- SEUF
    anchor_loss_weight: float = field(default=1.0, metadata={"help": "SEUF anchor weight α (0 = off)."})
    anchor_form: str = field(
        default="masked_softmax",
        metadata={"help": "SEUF anchor's g: masked_softmax (paper: router probabilities masked to the top-k) or "
                          "full_softmax (the public SEUF code: before top-k masking)."},
    )
    anchor_reduction: str = field(default="paper", metadata={"help": "paper (sum over experts) or code (mean)."})
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
    seuf_score: str = field(
        default="masked_softmax",
        metadata={"help": "SEUF Eq. 2's g: masked_softmax (paper: router probabilities masked to the top-k, not "
                          "renormalised) or gate (the gate weights the model applies)."},
    )
    attribution_max_tokens: int | None = field(default=100_000, metadata={"help": "Tokens used for attribution."})
    attribution_batch_size: int = field(default=8, metadata={"help": "Batch size of the attribution pass."})
    # --- adapter
    adapter: str = field(default="lora", metadata={"help": "lora or full."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha."})
    train_router: bool = field(default=True, metadata={"help": "Train the selected layers' routers."})
    deterministic_routing: bool = field(
        default=True,
        metadata={"help": "Keep the MoE blocks in eval mode while training (no router jitter or sampled routing, "
                          "e.g. PhiMoE), so the model routes as its reference and the recorded statistics do."},
    )
    # --- GRIP: router updates in the null space of the retain set's router inputs
    router_constraint: str = field(
        default="none",
        metadata={"help": "none or grip: project every router weight update onto the null space of the retain set's "
                          "router inputs (GRIP, arXiv 2601.16905), so retain routing logits do not change."},
    )
    grip_rank_cutoff: float = field(
        default=1e-2,
        metadata={"help": "GRIP ε in (0, 1): share of the retain router inputs' energy left in the null space (the "
                          "protected directions carry the other 1 − ε)."},
    )
    grip_ridge: float = field(
        default=0.0,
        metadata={"help": "GRIP ridge λ >= 0: λ times the mean eigenvalue added to the retain inputs' second moment "
                          "before the cut-off (shrinks the null space)."},
    )
    # --- data
    max_length: int = field(default=512, metadata={"help": "Maximum tokens per example."})
    # --- stopping when forgotten (the holdout / forget probe sets are trainer arguments or CLI flags)
    forget_probe_size: int = field(
        default=64, metadata={"help": "Forget examples (fixed, seeded sample) whose NLL is logged at each evaluation, "
                                      "unless a separate forget probe set is given."}
    )
    retain_probe_size: int = field(
        default=64, metadata={"help": "Retain examples (fixed, seeded sample) whose NLL is logged at each evaluation."}
    )
    stop_at_holdout: bool = field(
        default=False, metadata={"help": "Stop at the first evaluation where the forget probe's mean NLL reaches the "
                                         "holdout's (needs a holdout set)."}
    )
    max_retain_nll_rise: float | None = field(
        default=None, metadata={"help": "Stop when the retain NLL rises above its step-0 value by more than this "
                                        "fraction (0.5 = +50%%); None: no guard."}
    )
    eval_steps: float | None = field(
        default=10, metadata={"help": "Evaluate every N steps (on when a holdout or max_retain_nll_rise is given)."}
    )
    # --- TrainingArguments defaults that differ (SEUF's lr; log often enough to see routing move)
    learning_rate: float | None = field(
        default=None,
        metadata={"help": "AdamW learning rate; default by what trains (DEFAULT_LEARNING_RATES): 2e-2 for LoRA on the "
                          "selected experts, 6e-3 for LoRA on every expert, 6e-3 for full experts."},
    )
    logging_steps: float = field(default=5, metadata={"help": "Log every N steps."})
    # Forget and retain halves of a batch travel as `retain_*` keys the model's forward does not take.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep False: batches carry retain_* keys."})
    # --- output folder and resuming (saving.py: one run per output folder, atomic saves)
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace the run already in output_dir (its checkpoints and saved adapter) instead of "
                          "refusing to start there."},
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "Resume from this checkpoint folder; given with no value (or 'latest'), from the latest "
                          "complete checkpoint in output_dir.", "nargs": "?", "const": "latest"},
    )

    def __post_init__(self) -> None:
        if not self.use_cpu and _needs_cpu_backend():
            # Several processes launched on a machine whose accelerator (if any) has no distributed backend:
            # accelerate would give each process a world of its own (DistributedType.NO) and every process would
            # step on its own share without averaging gradients. use_cpu makes it a gloo process group (DDP on
            # CPU), the only right run there. Set before TrainingArguments builds the accelerator state.
            logger.info("%d processes and no accelerator with a distributed backend: use_cpu=True (DDP over gloo)",
                        _launched_processes())
            self.use_cpu = True
        try:
            super().__post_init__()
        except MoEUnlearnError:
            raise
        except ValueError as err:  # TrainingArguments' own checks: one clear line, as ours
            raise MoEUnlearnError(" ".join(str(err).split())) from err
        # Pinned memory needs an accelerator: without one the DataLoader warns at every epoch and pins nothing.
        # (TrainingArguments turns it off for use_cpu only. An explicit True cannot be told from the default here;
        # with no accelerator it could not take effect anyway.)
        if self.dataloader_pin_memory and not _accelerator_available():
            self.dataloader_pin_memory = False
        # Our LoRA sits in the selected layers only: the backward must not be forced down to the inputs, so
        # checkpointing must not need input gradients (reentrant checkpointing would).
        if self.gradient_checkpointing and "use_reentrant" not in (self.gradient_checkpointing_kwargs or {}):
            self.gradient_checkpointing_kwargs = {**(self.gradient_checkpointing_kwargs or {}), "use_reentrant": False}
        self.validate()

    def validate(self) -> None:
        """Raise a clear error for values no run could use (losses are checked against the registry by the trainer)."""
        choices = {
            "selection_method": ("seuf", "trace"),
            "adapter": ("lora", "full"),
            "retain_weighting": ("none", "trace"),
            "anchor_reduction": ("paper", "code"),
            "anchor_form": ("masked_softmax", "full_softmax"),
            "seuf_score": ("masked_softmax", "gate"),
            "kl_direction": ("model_to_ref", "ref_to_model"),
            "router_constraint": ("none", "grip"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise MoEUnlearnError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}.")
        if self.anchor_loss_weight < 0 or self.forget_loss_weight < 0 or self.retain_loss_weight < 0:
            raise MoEUnlearnError("Loss weights must be non-negative.")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise MoEUnlearnError(
                f"learning_rate={self.learning_rate} must be > 0, or None for the default of the adapter mode.")
        if self.forget_probe_size < 1 or self.retain_probe_size < 1:
            raise MoEUnlearnError("forget_probe_size and retain_probe_size must be at least 1.")
        if self.max_retain_nll_rise is not None and self.max_retain_nll_rise <= 0:
            raise MoEUnlearnError(
                f"max_retain_nll_rise={self.max_retain_nll_rise} must be > 0: it is the largest allowed relative rise "
                f"of the retain NLL over its step-0 value (0.5 = +50%). Use None to disable the guard."
            )
        if self.retain_weighting == "trace" and self.retain_loss == "none":
            raise MoEUnlearnError("retain_weighting='trace' reweights the retain loss: set retain_loss to nll or kl.")
        check_max_length(self.max_length)
        self._validate_ranges()
        self._validate_grip()

    def _validate_grip(self) -> None:
        """GRIP's settings; a constraint with nothing to constrain is refused, not ignored (as a frozen anchor)."""
        if not 0 < self.grip_rank_cutoff < 1:  # NaN fails too
            raise MoEUnlearnError(
                f"grip_rank_cutoff={self.grip_rank_cutoff} must lie in (0, 1): it is the share ε of the retain router "
                f"inputs' energy left in GRIP's null space (default 1e-2; smaller protects retain routing more).")
        if not (0 <= self.grip_ridge < float("inf")):
            raise MoEUnlearnError(f"grip_ridge={self.grip_ridge} must be a finite number >= 0 (0: no ridge).")
        if self.router_constraint == "grip" and not self.train_router:
            raise MoEUnlearnError(
                "router_constraint='grip' constrains the routers' updates, but train_router=False freezes them: there "
                "is nothing to constrain. Set train_router=True, or router_constraint='none'.")

    def _validate_ranges(self) -> None:
        """Numbers out of range that ``TrainingArguments`` lets through (it refuses a few, e.g. warmup_steps < 0)."""
        at_least_one = {
            "per_device_train_batch_size": "examples per device and step",
            "per_device_eval_batch_size": "examples per device in an evaluation batch",
            "gradient_accumulation_steps": "batches per optimizer step",
            "attribution_batch_size": "examples per batch of the attribution pass",
            "seuf_top_m": "experts SEUF selects",
            "trace_top_m": "experts TRACE selects per layer",
        }
        for name, what in at_least_one.items():
            value = getattr(self, name)
            if value < 1:
                raise MoEUnlearnError(f"{name}={value} must be at least 1 ({what}).")
        for name in ("trace_max_layers", "attribution_max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise MoEUnlearnError(f"{name}={value} must be at least 1, or None for no limit.")
        if self.adapter == "lora" and self.lora_r < 1:
            raise MoEUnlearnError(f"lora_r={self.lora_r} must be at least 1 (the LoRA rank).")
        if self.adapter == "lora" and not self.lora_alpha > 0:
            raise MoEUnlearnError(f"lora_alpha={self.lora_alpha} must be > 0: LoRA scales its update by "
                                  f"lora_alpha/lora_r, so 0 would train nothing.")
        for name in ("npo_beta", "simnpo_beta", "idk_dpo_beta", "dpo_beta", "undial_beta", "trace_w_max"):
            value = getattr(self, name)
            if not value > 0:
                raise MoEUnlearnError(f"{name}={value} must be > 0.")
        for name in ("wga_beta", "satimp_beta1", "satimp_beta2"):  # exponents of a token weight; 0 drops the factor
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise MoEUnlearnError(f"{name}={value} must be a finite number >= 0 (an exponent of a token weight).")
        if self.ceu_ignore_first_n_answer_tokens < 0:
            raise MoEUnlearnError(f"ceu_ignore_first_n_answer_tokens={self.ceu_ignore_first_n_answer_tokens} must be "
                                  f">= 0 (CE-U's first answer tokens of each example left out of the loss).")
        if self.forget_loss_bound is not None and not self.forget_loss_bound > 0:
            raise MoEUnlearnError(f"forget_loss_bound={self.forget_loss_bound} must be > 0, or None for no bound.")
        if self.max_param_norm_growth is not None and not self.max_param_norm_growth > 1:
            raise MoEUnlearnError(
                f"max_param_norm_growth={self.max_param_norm_growth} must be > 1 (a factor over the trainable "
                f"parameters' norm before the first step; default 1000), or None for no check.")
        if self.max_steps == 0:
            raise MoEUnlearnError("max_steps=0 would train no step: give a positive number of optimizer steps, or -1 "
                                  "(the default) to train num_train_epochs epochs.")
        if self.max_steps < 0 and not self.num_train_epochs > 0:
            raise MoEUnlearnError(f"num_train_epochs={self.num_train_epochs} with max_steps={self.max_steps} would "
                                  f"train no step: give num_train_epochs > 0, or max_steps > 0.")
        for name in ("logging_steps", "eval_steps", "save_steps"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise MoEUnlearnError(f"{name}={value} must be > 0 (a number of steps, or a fraction of the run below "
                                      f"1).")
        for name, what in (("trace_tau", "TRACE's forget-frequency threshold, a multiple of k/E"),
                           ("trace_rho", "TRACE's forget/retain frequency ratio threshold"),
                           ("weight_decay", "AdamW's decoupled weight decay"),
                           ("max_grad_norm", "the gradient clipping norm; 0 turns clipping off")):
            value = getattr(self, name)
            if value is not None and not value >= 0:  # NaN fails too
                raise MoEUnlearnError(f"{name}={value} must be >= 0 ({what}).")
        if not self.rmu_steering_coeff > 0:
            raise MoEUnlearnError(f"rmu_steering_coeff={self.rmu_steering_coeff} must be > 0 (RMU steers forget "
                                  f"activations towards c times a random unit vector).")
        if self.rmu_layer is not None and self.rmu_layer < 0:
            raise MoEUnlearnError(f"rmu_layer={self.rmu_layer} must be a decoder layer index >= 0, or None for the "
                                  f"highest selected layer.")
        if self.dataloader_num_workers < 0:
            raise MoEUnlearnError(f"dataloader_num_workers={self.dataloader_num_workers} must be >= 0 (0: load in the "
                                  f"main process).")


def _launched_processes() -> int:
    """Processes of this launch, from the launcher's environment (torchrun's WORLD_SIZE or MPI's), as accelerate
    reads them; 1 outside a distributed launch."""
    from accelerate.utils import get_int_from_env

    return get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)


def _needs_cpu_backend() -> bool:
    """True when several processes were launched but no accelerator with a distributed backend exists: there
    accelerate's ``PartialState(cpu=False)`` falls back to no distribution at all (each process alone)."""
    if _launched_processes() <= 1:
        return False
    try:
        from accelerate.utils.imports import get_distributed_backend, get_torch_accelerator_backend
    except ImportError:  # older accelerate: an accelerator of any kind is taken to have a backend
        return not _accelerator_available()
    device_type, _ = get_torch_accelerator_backend()
    return device_type is None or get_distributed_backend(device_type) is None


def _accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()
