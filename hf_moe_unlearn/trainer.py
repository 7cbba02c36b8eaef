"""``MoEUnlearnTrainer``: unlearn a forget set while keeping a retain set, on MoE models, with losses chosen by name.

A drop-in ``transformers.Trainer``: user code calls ``trainer.train()``; ``accelerate launch``, gradient
accumulation, mixed precision, checkpointing and resuming are the Trainer's own. What this class adds:

1. at start, an expert selection (given, loaded, or computed by SEUF/TRACE attribution on the datasets) and
   a PEFT model that trains only those experts (and their routers);
2. forget and retain examples drawn in pairs (the epoch is the forget set);
3. ``compute_loss``: forget forward, retain forward, then the registered losses, with router hooks
   providing SEUF's live router logits and TRACE's per-token routing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections import defaultdict
from dataclasses import fields
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, IntervalStrategy, rotate_checkpoints

from .config import MoEUnlearnConfig, default_learning_rate
from .data.text import PaddingCollator, counted_mask, tokenize_dataset
from .deepspeed_support import configure_zero3
from .errors import MoEUnlearnError
from .losses import LossContext, get_loss
from .losses.builtin import _routing_frame, trace_retain_shares
from .losses import functional as LF
from .losses.functional import prediction_mask, routing_share
from .evaluation.scoring import inference_mode
from .moe.layers import clean_module_name, decoder_layers, find_moe_layers, parameter_layer, unwrap_model
from .probe import HOLDOUT, PROBE, RETAIN, StopWhenForgottenCallback, first_logged, fixed_sample, nll_sums
from .reference_cache import EXAMPLE_INDEX, ReferenceCache
from .routing import ExpertSelection, RouterRecorder, attribute_experts, select_seuf, select_trace, trace_scores
from .routing.grip import check_router_constraint, setup_grip
from . import saving

logger = logging.getLogger(__name__)

RETAIN_PREFIX = "retain_"

#: Config fields a resumed run must share with its checkpoint: they define what is trained and on what. The
#: MoEUnlearnConfig fields, less the stop guards and speed settings a user may change between runs (the selection
#: path is compared by content, as selection.json), plus the TrainingArguments fields the restored optimizer,
#: scheduler and data order depend on (a new learning_rate would be ignored by the restored scheduler).
RESUME_CHECKED_FIELDS: tuple[str, ...] = tuple(
    [f.name for f in fields(MoEUnlearnConfig) if f.name not in {g.name for g in fields(TrainingArguments)}
     and f.name not in ("selection", "stop_at_holdout", "max_retain_nll_rise", "forget_loss_bound",
                        "attribution_batch_size", "cache_reference", "overwrite_output_dir", "max_param_norm_growth")]
    + ["learning_rate", "seed", "data_seed"]
)


class PairedForgetRetainDataset(Dataset):
    """Each forget example with a retain example drawn at random (fixed by the seed, so every process and a
    resumed run see the same pairs). The epoch is the forget set, as in the field's reference code.

    Each row carries its index (``example_index``): the key of the reference cache (the frozen model's sequence NLL
    of that forget example, of its IDK answer and of its paired retain example, which the fixed pairing makes the
    same retain example every epoch)."""

    def __init__(self, forget, retain=None, seed: int = 0) -> None:
        self.forget = forget
        self.retain = retain
        if retain is not None:
            generator = torch.Generator().manual_seed(seed)
            self.pairing = torch.randint(len(retain), (len(forget),), generator=generator).tolist()

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = dict(self.forget[index])
        row[EXAMPLE_INDEX] = int(index)
        if self.retain is not None:
            row.update({f"{RETAIN_PREFIX}{k}": v for k, v in self.retain[self.pairing[index]].items()})
        return row


def _split(inputs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    forget = {k: v for k, v in inputs.items() if not k.startswith(RETAIN_PREFIX)}
    retain = {k[len(RETAIN_PREFIX):]: v for k, v in inputs.items() if k.startswith(RETAIN_PREFIX)}
    return forget, (retain or None)


class MoEUnlearnTrainer(Trainer):
    """Unlearning trainer for Mixture-of-Experts language models.

    Args:
        model: a transformers MoE causal LM (or an already wrapped expert PEFT model).
        args: :class:`MoEUnlearnConfig`.
        forget_dataset, retain_dataset: ``datasets.Dataset`` (``text`` column or prompt/answer columns; an
            ``idk`` column for the ``idk_nll``/``idk_dpo`` losses, an ``alternate`` column for ``dpo``) or lists of
            texts.
        processing_class: the tokenizer.
        selection: an :class:`ExpertSelection`, a ``{layer: [experts]}`` mapping or a path; default: from
            ``args.selection`` or computed with ``args.selection_method``.
        peft_config: unused unless you built the adapter config yourself with ``expert_lora_config``; then it
            must describe the same selection.
        holdout_dataset: text of the same kind as the forget set that the model never saw (same formats). Giving
            it turns the evaluation on: every ``eval_steps`` the mean token NLL of the forget probe, the holdout and
            a retain sample are logged, and ``stop_at_holdout`` can stop the run when the probe reaches the holdout.
        forget_probe_dataset: the probe whose NLL should rise to the holdout's; default: a fixed, seeded sample
            (``forget_probe_size``) of the forget set.
    """

    # compute_loss returns a per-batch mean: let the Trainer divide by the accumulation steps.
    loss_is_scaled_for_ga = False
    # The frozen reference's sequence NLL per example (cache_reference), built at the first step that asks for one.
    _reference_cache: ReferenceCache | None = None

    def __init__(
        self,
        model: nn.Module,
        args: MoEUnlearnConfig | None = None,
        forget_dataset=None,
        retain_dataset=None,
        processing_class=None,
        selection: ExpertSelection | dict | str | None = None,
        peft_config=None,
        holdout_dataset=None,
        forget_probe_dataset=None,
        **kwargs: Any,
    ) -> None:
        args = args if args is not None else MoEUnlearnConfig(output_dir="moe-unlearn-output")
        if not isinstance(args, MoEUnlearnConfig):
            raise MoEUnlearnError("args must be a MoEUnlearnConfig (a TrainingArguments subclass).")
        configure_zero3(model, args)  # ZeRO-3: a whole model, fused experts, no leaf modules (deepspeed_support)
        find_moe_layers(model)  # a dense model fails here, before anything else
        self._resolve_losses(args, retain_dataset)
        self._check_probe_args(args, holdout_dataset, retain_dataset, kwargs)
        check_router_constraint(args, retain_dataset)
        if processing_class is not None and processing_class.pad_token_id is None:
            processing_class.pad_token = processing_class.eos_token
        forget = tokenize_dataset(forget_dataset, processing_class, args.max_length, name="forget set")
        retain = (
            tokenize_dataset(retain_dataset, processing_class, args.max_length, name="retain set")
            if retain_dataset is not None
            else None
        )
        if "idk" in self.loss_requirements and "idk_input_ids" not in forget.column_names:
            raise MoEUnlearnError(
                f"forget loss '{args.forget_loss}' needs 'I don't know' answers: give the forget set prompt/answer "
                f"columns and an 'idk' column."
            )
        if "alternate" in self.loss_requirements and "alternate_input_ids" not in forget.column_names:
            raise MoEUnlearnError(
                f"forget loss '{args.forget_loss}' needs an alternate answer per forget example: give the forget set "
                f"prompt/answer columns and an 'alternate' column (the answer to prefer over the true one)."
            )
        base = unwrap_model(model)
        self._embedding_rows = int(base.get_input_embeddings().weight.shape[0])
        self._check_vocabulary(self._embedding_rows, processing_class, {"forget set": forget, "retain set": retain})
        probe_sets = self._probe_sets(args, forget, retain, holdout_dataset, forget_probe_dataset, processing_class)
        self._check_vocabulary(self._embedding_rows, None, {"holdout set": probe_sets.get(HOLDOUT),
                                                            "forget probe set": probe_sets[PROBE]})
        self._stats_cache: dict[str, Any] = {}
        if hasattr(model, "expert_selection"):  # already an ExpertPeftModel
            self.selection = model.expert_selection
        else:
            self.selection = self._resolve_selection(base, args, selection, forget, retain, processing_class)
            self.selection.validate(base)
            from .adapter import get_expert_peft_model

            set_seed(args.seed)  # the LoRA initialisation draws from the global RNG: make runs reproducible
            model = get_expert_peft_model(
                base, self.selection, r=args.lora_r, lora_alpha=args.lora_alpha, train_router=args.train_router,
                mode=args.adapter,
            )
        self.critical_ratios = self._critical_ratios(base, args, forget, retain, processing_class)
        self.moe_layers = {layer.index: layer for layer in find_moe_layers(model)}
        self._default_learning_rate(args)
        if hasattr(model, "card_info"):
            model.card_info.update(method=self._method_name(args), losses=self._loss_names(args))
        collator = PaddingCollator(processing_class.pad_token_id if processing_class is not None else 0)
        train_dataset = PairedForgetRetainDataset(forget, retain, seed=args.seed)
        evaluating = self._turn_on_evaluation(args, holdout_dataset is not None)
        super().__init__(
            model=model, args=args, train_dataset=train_dataset, data_collator=collator,
            processing_class=processing_class, eval_dataset=probe_sets, **kwargs,
        )
        self.stop_callback: StopWhenForgottenCallback | None = None
        if evaluating:
            self.stop_callback = StopWhenForgottenCallback(args.stop_at_holdout, args.max_retain_nll_rise)
            self.add_callback(self.stop_callback)
        self.add_callback(_CheckDataParallel(self))  # once the model is wrapped: gradients averaged, or refuse
        from .guards import TrainingHealthGuard

        self.add_callback(TrainingHealthGuard(self))  # non-finite / vanished gradients, exploding adapter: stop
        self.recorder = RouterRecorder(self.model, layers=self.selection.layers, accumulate=False, keep_current=True)
        # GRIP: the retain set's router inputs, collected once on the start model; projects after each optimizer step
        self.grip = setup_grip(self) if args.router_constraint == "grip" else None
        self._needs_hidden = "hidden" in self.loss_requirements
        self._layers_path, self._decoder_layers = decoder_layers(self.model)
        self._rmu_layer = args.rmu_layer if args.rmu_layer is not None else max(self.selection.layers)
        self._check_gradient_paths(args)
        self._captured_hidden: dict[str, torch.Tensor] = {}
        self._hidden_handle = None
        self._hidden_split = "forget"
        self._metrics: dict[str, list[torch.Tensor]] = defaultdict(list)

    # ------------------------------------------------------------------------------------------- set-up
    def _resolve_losses(self, args: MoEUnlearnConfig, retain_dataset) -> None:
        """Look every configured loss up in the registry now, so a typo fails before any work."""
        self.forget_loss_fn = get_loss(args.forget_loss, kind="forget")
        self.retain_loss_fn = None if args.retain_loss == "none" else get_loss(args.retain_loss, kind="retain")
        self.anchor_loss_fn = get_loss("seuf_anchor", kind="router") if args.anchor_loss_weight > 0 else None
        self.weighting_fn = None if args.retain_weighting == "none" else get_loss(args.retain_weighting, kind="weighting")
        requirements = set(self.forget_loss_fn.requires)
        for fn in (self.retain_loss_fn, self.weighting_fn):
            if fn is not None:
                requirements |= set(fn.requires)
        self.loss_requirements = requirements
        if retain_dataset is None and (self.retain_loss_fn is not None or self.weighting_fn is not None):
            raise MoEUnlearnError(
                f"retain loss '{args.retain_loss}' needs a retain dataset: pass retain_dataset=..., or set "
                f"retain_loss='none' (plain gradient ascent / NPO without a retain term)."
            )

    @staticmethod
    def _check_vocabulary(rows: int, tokenizer, sets: dict[str, Any]) -> None:
        """Refuse token ids the model cannot embed (``rows``: its input embedding rows), e.g. from another model's
        tokenizer, before the model sees any: the embedding would fail with an IndexError on CPU, with a device-side
        assert on a GPU."""
        import pyarrow.compute as pc

        if tokenizer is not None and len(tokenizer) > rows:
            raise MoEUnlearnError(
                f"The tokenizer does not fit the model: its vocabulary has {len(tokenizer)} tokens (ids up to "
                f"{len(tokenizer) - 1}), but the model's input embeddings have {rows} rows. Use the tokenizer saved "
                f"with the model, or resize the embeddings (model.resize_token_embeddings) before unlearning."
            )
        for name, data in sets.items():
            if data is None or len(data) == 0:
                continue
            for column in ("input_ids", "idk_input_ids", "alternate_input_ids"):
                if column not in data.column_names:
                    continue
                top = pc.max(pc.list_flatten(data.with_format("arrow")[column])).as_py()
                if top is not None and top >= rows:
                    raise MoEUnlearnError(
                        f"The {name} holds token id {top}, but the model's input embeddings have {rows} rows (ids "
                        f"0..{rows - 1}): it was tokenised with another model's tokenizer. Tokenise it with this "
                        f"model's tokenizer (or pass raw text and processing_class=the model's tokenizer)."
                    )

    @staticmethod
    def _attribution_kwargs(args: MoEUnlearnConfig) -> dict[str, Any]:
        """Attribution settings; under ``accelerate launch`` each process routes a share and the sums are reduced,
        so every process selects the same experts."""
        from accelerate import PartialState

        state = PartialState()
        return dict(batch_size=args.attribution_batch_size, max_length=args.max_length,
                    max_tokens=args.attribution_max_tokens, show_progress=not args.disable_tqdm,
                    accelerator=state if state.num_processes > 1 else None)

    def _routing_stats(self, split: str, base, data, tokenizer, args):
        """Attribution statistics of the forget or retain set, computed once per trainer (the selection and
        TRACE's ratios may both need them)."""
        if split not in self._stats_cache:
            self._stats_cache[split] = attribute_experts(base, data, tokenizer, name=f"{split} set",
                                                         **self._attribution_kwargs(args))
        return self._stats_cache[split]

    def _default_learning_rate(self, args: MoEUnlearnConfig) -> None:
        """Fill ``args.learning_rate`` when unset: it depends on what trains, known only once the selection is."""
        if args.learning_rate is not None:
            return
        every_expert = all(len(set(ids)) >= self.moe_layers[l].num_experts
                           for l, ids in self.selection.experts.items())
        args.learning_rate = default_learning_rate(args.adapter, every_expert)
        logger.info("learning_rate not set: %g, the default for %s (DEFAULT_LEARNING_RATES)", args.learning_rate,
                    "full experts" if args.adapter == "full" else
                    "LoRA on every expert" if every_expert else "LoRA on the selected experts")

    def _resolve_selection(self, base, args, selection, forget, retain, tokenizer) -> ExpertSelection:
        if selection is not None:
            return ExpertSelection.coerce(selection)
        if args.selection:
            return ExpertSelection.load(args.selection)
        forget_stats = self._routing_stats("forget", base, forget, tokenizer, args)
        if args.selection_method == "seuf":
            return select_seuf(forget_stats, top_m=args.seuf_top_m, per_layer=args.seuf_per_layer,
                               score=args.seuf_score)
        if retain is None:
            raise MoEUnlearnError("selection_method='trace' needs a retain dataset to compare routing against.")
        retain_stats = self._routing_stats("retain", base, retain, tokenizer, args)
        return select_trace(forget_stats, retain_stats, tau=args.trace_tau, rho=args.trace_rho,
                            top_m=args.trace_top_m, max_layers=args.trace_max_layers)

    def _critical_ratios(self, base, args, forget, retain, tokenizer) -> dict[int, dict[int, float]] | None:
        """f_F/f_R of each selected expert, for TRACE's token weights (from the selection when it has them)."""
        if self.weighting_fn is None:
            return None
        ratios = self.selection.stats.get("ratio")
        if ratios and all(e in ratios.get(l, {}) for l, e in self.selection.pairs):
            return {l: {e: ratios[l][e] for e in ids} for l, ids in self.selection.experts.items()}
        # e.g. a SEUF selection with TRACE weighting: measure both datasets' routing of the selected experts.
        table = trace_scores(self._routing_stats("forget", base, forget, tokenizer, args),
                             self._routing_stats("retain", base, retain, tokenizer, args))
        self.selection.stats.update({name: {l: {e: float(table[name][l][e]) for e in ids}
                                            for l, ids in self.selection.experts.items()}
                                     for name in ("f_forget", "f_retain", "ratio")})
        return {l: {e: float(table["ratio"][l][e]) for e in ids} for l, ids in self.selection.experts.items()}

    def _trainable_layers(self) -> dict[str, int | None]:
        """Every trainable parameter's name and decoder layer (None: outside the decoder layers)."""
        return {name: parameter_layer(name, self._layers_path)
                for name, p in self.model.named_parameters() if p.requires_grad}

    def _check_gradient_paths(self, args: MoEUnlearnConfig) -> None:
        """Refuse, before any step, the configurations in which a loss term could not move any parameter.

        A term with no gradient path still shows in the logged loss and the model card, so without these checks
        a run would look like SEUF (or RMU) while it trains something else.
        """
        trainable = self._trainable_layers()
        hooks_feed_loss = (self.anchor_loss_fn is not None or self._needs_hidden
                           or "router_logits" in self.loss_requirements)
        kwargs = args.gradient_checkpointing_kwargs or {}
        if args.gradient_checkpointing and kwargs.get("use_reentrant", True) and hooks_feed_loss:
            raise MoEUnlearnError(
                "Reentrant gradient checkpointing (gradient_checkpointing_kwargs={'use_reentrant': True}) runs the "
                "forward without autograd, so the router logits of the SEUF anchor and RMU's hidden states would "
                "carry no gradient. Use gradient_checkpointing_kwargs={'use_reentrant': False} (the default here)."
            )
        if self.anchor_loss_fn is not None:
            for index in self.selection.layers:
                layer = self.moe_layers[index]
                router_trains = any(layer.router_name in clean_module_name(n) for n in trainable)
                upstream = [n for n, at in trainable.items()
                            if (at is not None and (at < index or (at == index
                                                                   and layer.name not in clean_module_name(n))))
                            or (at is None and "embed" in n)]
                if not router_trains and not upstream:
                    raise MoEUnlearnError(
                        f"anchor_loss_weight={args.anchor_loss_weight} but nothing trainable can change the router "
                        f"logits of layer {index}: its router is frozen (train_router=False) and no trainable "
                        f"parameter lies below it. The anchor would be a constant. Set train_router=True, or "
                        f"anchor_loss_weight=0."
                    )
        if self._needs_hidden:
            rmu = self._rmu_layer
            if not 0 <= rmu < len(self._decoder_layers):
                raise MoEUnlearnError(f"rmu_layer={rmu} is not a decoder layer: the model has layers 0.."
                                      f"{len(self._decoder_layers) - 1}.")
            at_or_below = [n for n, at in trainable.items() if at is not None and at <= rmu]
            above = sorted({at for at in trainable.values() if at is not None and at > rmu})
            if not at_or_below:
                raise MoEUnlearnError(
                    f"RMU steers the output of decoder layer {rmu} (rmu_layer), but no trainable parameter lies at or "
                    f"below it (trainable layers: {sorted({a for a in trainable.values() if a is not None})}): RMU "
                    f"would train nothing. Set rmu_layer at or above the lowest selected layer "
                    f"({min(self.selection.layers)})."
                )
            if above and args.forget_loss == "rmu":
                raise MoEUnlearnError(
                    f"RMU steers decoder layer {rmu}, but the selection trains parameters in layers {above} above it, "
                    f"which RMU's loss never reaches. Set rmu_layer >= {max(above)} or select experts at or below "
                    f"layer {rmu}."
                )

    @staticmethod
    def _method_name(args: MoEUnlearnConfig) -> str:
        parts = [args.forget_loss.upper() + (f"+{args.retain_loss.upper()}" if args.retain_loss != "none" else "")]
        if args.anchor_loss_weight > 0:
            parts.append("SEUF")
        if args.retain_weighting == "trace":
            parts.append("TRACE")
        if args.router_constraint == "grip":
            parts.append("GRIP")
        return " + ".join(parts)

    @staticmethod
    def _loss_names(args: MoEUnlearnConfig) -> dict[str, float]:
        losses = {f"forget:{args.forget_loss}": args.forget_loss_weight}
        if args.retain_loss != "none":
            losses[f"retain:{args.retain_loss}"] = args.retain_loss_weight
        if args.anchor_loss_weight > 0:
            losses["router:seuf_anchor"] = args.anchor_loss_weight
        if args.retain_weighting != "none":
            losses[f"weighting:{args.retain_weighting}"] = 1.0
        return losses

    # ------------------------------------------------------------------------------------------- hooks
    def _attach_hooks(self) -> None:
        """Router hooks (and RMU's hidden-state hook) live only while training: a model handed back to the user
        carries no hook that points into this trainer (it could not be deep-copied or pickled otherwise)."""
        self.recorder.attach()
        if self._needs_hidden and self._hidden_handle is None:
            # RMU steers the residual stream: the output of decoder layer ℓ (the WMDP code hooks
            # model.layers[ℓ]), not the MoE block's output, which the layer adds to its residual input.
            layer = self._decoder_layers[self._rmu_layer]
            self._hidden_handle = layer.register_forward_hook(self._capture_hidden)

    def _detach_hooks(self) -> None:
        self.recorder.detach()
        self.recorder.current_logits.clear()
        self.recorder.current_indices.clear()
        self._captured_hidden.clear()
        if self._hidden_handle is not None:
            self._hidden_handle.remove()
            self._hidden_handle = None

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """``Trainer.train``, in an output folder that holds this run only (another run's folder is refused unless
        resuming it or ``overwrite_output_dir``); a resume takes the latest *complete* checkpoint for ``True`` /
        ``"latest"`` and first checks that it was written by a run of the same method."""
        resuming = resume_from_checkpoint is not None and resume_from_checkpoint is not False
        if self.state.global_step == 0:  # a second train() of this trainer continues its own run
            saving.check_output_dir(self.args.output_dir, resuming, self.args.overwrite_output_dir)
        if self.args.overwrite_output_dir and not resuming and self.state.global_step == 0:
            if self.args.should_save:
                removed = saving.clear_previous_run(self.args.output_dir)
                if removed:
                    logger.warning("overwrite_output_dir: removed the previous run from %s (%s).",
                                   self.args.output_dir, ", ".join(removed))
            self.accelerator.wait_for_everyone()
        if resuming:
            resume_from_checkpoint = self._checkpoint_to_resume(resume_from_checkpoint)
            self._check_resumed_config(resume_from_checkpoint)
        if self.args.should_save:  # rotation and get_last_checkpoint must never take a half-written one
            saving.set_aside_incomplete_checkpoints(self.args.output_dir)
        self.accelerator.wait_for_everyone()
        self._attach_hooks()
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        except MoEUnlearnError as err:  # a stop mid-training (loss bound, gradient guard): remembered for save_model
            self._stopped_because = str(err)
            raise
        finally:
            self._detach_hooks()

    _stopped_because: str | None = None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model``; after a run stopped by the forget-loss bound or the gradient guard it still saves
        (the state can be worth inspecting) but warns that this adapter is the stopped run's, not a result."""
        if self._stopped_because is not None and not _internal_call:
            logger.warning("Saving the adapter of a run that was stopped (%s): it is not an unlearning result.",
                           self._stopped_because.split(";")[0])
        super().save_model(output_dir, _internal_call)

    def _last_checkpoint(self) -> str | None:
        """The latest complete ``checkpoint-N`` folder in ``output_dir``, or None (no folder, or none finished)."""
        return saving.last_complete_checkpoint(self.args.output_dir)

    def _checkpoint_to_resume(self, resume_from_checkpoint: str | bool) -> str:
        """The checkpoint folder: ``True`` or ``"latest"`` is the latest complete one in output_dir; a path must be a
        checkpoint whose save finished."""
        if resume_from_checkpoint is True or (isinstance(resume_from_checkpoint, str) and
                                              resume_from_checkpoint.lower() in ("latest", "true")
                                              and not os.path.isdir(resume_from_checkpoint)):
            last = self._last_checkpoint()
            if last is None:
                raise MoEUnlearnError(
                    f"resume_from_checkpoint (latest) but {self.args.output_dir} holds no complete checkpoint-N folder "
                    f"to resume from. Give the checkpoint's path, or start without resume_from_checkpoint."
                )
            return last
        path = os.fspath(resume_from_checkpoint)
        if not os.path.isdir(path):
            raise MoEUnlearnError(f"resume_from_checkpoint={path}: no such checkpoint folder.")
        problem = saving.marker_problem(path)
        if problem is not None:
            raise MoEUnlearnError(
                f"resume_from_checkpoint={path}: its save did not finish ({problem}), so its files may be partial "
                f"or from two saves. Resume from an earlier checkpoint, or give resume_from_checkpoint with no path "
                f"(the latest complete one)."
            )
        return path

    def _check_resumed_config(self, checkpoint: str) -> None:
        """Refuse to resume a checkpoint written with another method (losses, selection, adapter, ...): the Trainer
        would load its weights and optimizer state into a run that continues differently, without a word."""
        config_file = os.path.join(checkpoint, "unlearn_config.json")
        selection_file = os.path.join(checkpoint, "selection.json")
        if not os.path.isfile(config_file):
            logger.warning("%s has no unlearn_config.json (not written by MoEUnlearnTrainer?): cannot check that it "
                           "was trained with the same settings.", checkpoint)
            return
        with open(config_file) as f:
            saved = json.load(f)
        current = json.loads(self.args.to_json_string())
        missing = object()  # a field one side lacks (a checkpoint of an older version) differs too

        def shown(values: dict[str, Any], name: str) -> str:
            return repr(values[name]) if name in values else "unset"

        differ = [f"{name} ({shown(saved, name)} in the checkpoint, {shown(current, name)} now)"
                  for name in RESUME_CHECKED_FIELDS if saved.get(name, missing) != current.get(name, missing)]
        if os.path.isfile(selection_file):
            saved_experts = ExpertSelection.load(selection_file).experts
            if saved_experts != self.selection.experts:
                differ.append(f"selection ({saved_experts} in the checkpoint, {self.selection.experts} now)")
        if differ:
            raise MoEUnlearnError(
                f"Cannot resume from {checkpoint}: it was trained with other settings: {'; '.join(differ)}. Resume "
                f"with the checkpoint's settings (its unlearn_config.json and selection.json), or start a new run "
                f"in another output_dir."
            )

    # ----------------------------------------------------------------------------------- forward helpers
    def _capture_hidden(self, module, inputs, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        self._captured_hidden[self._hidden_split] = hidden

    def _forward(self, model, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        """Model logits for a batch; the recorder masks padding/label-less tokens; the router aux loss is never
        added (we compute every loss from logits ourselves)."""
        self.recorder.set_mask(counted_mask(batch))
        self._hidden_split = split
        if self.args.deterministic_routing:
            # The Trainer puts the whole model in train mode each step; routers with train-mode noise (PhiMoE's
            # jitter and sampled sparsemixer) would then route differently from the reference and the recorded
            # statistics. Only the MoE blocks go to eval: dropout elsewhere is the user's choice.
            for layer in self.moe_layers.values():
                layer.block.eval()
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return outputs.logits

    def _reference_provider(self, model, forget, retain):
        """Lazy providers of the frozen reference (the model with its adapter disabled, in eval mode) for one step:
        token logits and RMU hidden states per split (one reference forward per split and step, when a loss asks),
        and each sequence's summed NLL per split, served from the per-example cache when ``cache_reference`` is on
        (a reference forward only the first time an example is seen), else computed from the step's logits."""
        cache: dict[str, torch.Tensor] = {}
        hidden_cache: dict[str, torch.Tensor] = {}

        def run(split: str) -> None:
            if split in ("idk", "alternate"):  # the forget batch's other answers (data.text.OTHER_ANSWER_COLUMNS)
                input_ids, attention_mask = forget[f"{split}_input_ids"], forget[f"{split}_attention_mask"]
            else:
                batch = forget if split == "forget" else retain
                input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
            self.recorder.enabled = False  # the reference's routing must not overwrite this step's
            # The reference is the frozen start model: deterministic (eval mode: no dropout, no router jitter or
            # sampled routing), whatever mode training is in; each module's mode is restored afterwards.
            try:
                with inference_mode(model), unwrap_peft(model).disable_adapter():
                    self._hidden_split = f"ref_{split}"
                    cache[split] = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                    if f"ref_{split}" in self._captured_hidden:
                        hidden_cache[split] = self._captured_hidden.pop(f"ref_{split}")
            finally:
                self.recorder.enabled = True

        def logits(split: str) -> torch.Tensor:
            if split not in cache:
                run(split)
            return cache[split]

        def hidden(split: str, reference: bool) -> torch.Tensor:
            if not reference:
                return self._captured_hidden[split]
            if split not in hidden_cache:
                run(split)
            return hidden_cache[split]

        def sequence_cache() -> ReferenceCache | None:
            # A batch without indices (compute_loss called on a batch of one's own) runs the reference every step.
            if not self.args.cache_reference or EXAMPLE_INDEX not in forget:
                return None
            if self._reference_cache is None:
                accelerator = self.accelerator
                any_process = gather = None
                if accelerator.num_processes > 1:
                    # Every process decides together (FSDP/ZeRO-3 forwards are collectives) and stores what all
                    # computed: the sampler deals an example to another process in the next epoch.
                    def any_process(flag: bool) -> bool:
                        votes = torch.tensor([float(flag)], device=accelerator.device)
                        return bool(accelerator.reduce(votes, reduction="sum").item() > 0)

                    def gather(tensor: torch.Tensor) -> torch.Tensor:
                        return accelerator.gather(accelerator.pad_across_processes(tensor, dim=0, pad_index=-1))
                self._reference_cache = ReferenceCache(len(self.train_dataset), any_process, gather)
            return self._reference_cache

        def sequence_nll(split: str) -> tuple[torch.Tensor, torch.Tensor]:
            if split in ("idk", "alternate") and f"{split}_labels" not in forget:
                raise MoEUnlearnError(f"The reference's NLL of the {split} answers needs a forget set with an "
                                      f"'{split}' column (prompt/answer/{split} examples).")
            if split == "retain" and retain is None:
                raise MoEUnlearnError("The reference's NLL of the retain batch needs a retain dataset.")
            if split not in ("forget", "idk", "alternate", "retain"):
                raise MoEUnlearnError(f"Unknown split {split!r}: use 'forget', 'retain', 'idk' or 'alternate'.")
            labels = (forget[f"{split}_labels"] if split in ("idk", "alternate")
                      else (forget if split == "forget" else retain)["labels"])

            def compute() -> tuple[torch.Tensor, torch.Tensor]:
                with torch.no_grad():  # exactly what the losses computed at every step before the cache
                    return LF.sequence_nll(logits(split), labels)

            store = sequence_cache()
            return compute() if store is None else store.sequence_nll(split, forget[EXAMPLE_INDEX], compute)

        return logits, hidden, sequence_nll

    # ----------------------------------------------------------------------------------------- the loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args: MoEUnlearnConfig = self.args
        self._attach_hooks()  # no-op during train(); needed when called directly
        forget, retain = _split(inputs)
        forget_logits = self._forward(model, forget, "forget")
        router_logits = {l: self.recorder.current_logits[l] for l in self.selection.layers}
        forget_topk = {l: self.recorder.current_indices[l] for l in self.selection.layers}
        retain_logits, retain_topk = None, None
        if retain is not None and (self.retain_loss_fn is not None or self.weighting_fn is not None):
            retain_logits = self._forward(model, retain, "retain")
            retain_topk = {l: self.recorder.current_indices[l] for l in self.selection.layers}
        has_adapter = hasattr(unwrap_peft(model), "disable_adapter")
        reference, hidden, reference_nll = (self._reference_provider(model, forget, retain) if has_adapter
                                            else (None, None, None))
        ctx = LossContext(
            forget_batch=forget, retain_batch=retain, forget_logits=forget_logits, retain_logits=retain_logits,
            config=args, reference_logits=reference, reference_nll=reference_nll,
            idk_logits=self._idk_provider(model, forget),
            alternate_logits=self._idk_provider(model, forget, "alternate"),
            hidden_states=hidden if self._needs_hidden else None,
            router_logits=router_logits, selected_experts=self.selection.experts,
            score_fn={l: self.moe_layers[l].score_fn for l in self.selection.layers}, forget_topk=forget_topk,
            retain_topk=retain_topk, critical_ratios=self.critical_ratios,
            sum_over_processes=self._sum_over_processes if self.accelerator.num_processes > 1 else None,
        )
        if self.weighting_fn is not None:
            ctx.retain_token_weights = self.weighting_fn(ctx)
        forget_loss = self.forget_loss_fn(ctx)
        self._check_forget_loss(forget_loss)
        loss = args.forget_loss_weight * forget_loss
        self._metrics["forget_loss"].append(forget_loss.detach())
        if self.retain_loss_fn is not None:
            retain_loss = self.retain_loss_fn(ctx)
            loss = loss + args.retain_loss_weight * retain_loss
            self._metrics["retain_loss"].append(retain_loss.detach())
        if self.anchor_loss_fn is not None:
            anchor = self.anchor_loss_fn(ctx)
            loss = loss + args.anchor_loss_weight * anchor
            self._metrics["anchor_loss"].append(anchor.detach())
        self._log_routing(ctx, forget, forget_topk)
        self._captured_hidden.clear()  # the autograd graph keeps what backward needs
        self._log_retain_stability(model, ctx)
        return (loss, {"logits": forget_logits}) if return_outputs else loss

    def _idk_provider(self, model, forget, answer: str = "idk"):
        """The model's logits (with grad) on the forget batch's other answer ``answer`` ("idk" or "alternate")."""
        if f"{answer}_input_ids" not in forget:
            return None

        def idk_logits() -> torch.Tensor:
            self.recorder.enabled = False
            try:
                return model(input_ids=forget[f"{answer}_input_ids"], attention_mask=forget[f"{answer}_attention_mask"],
                             use_cache=False).logits
            finally:
                self.recorder.enabled = True

        return idk_logits

    def _check_forget_loss(self, value: torch.Tensor) -> None:
        """Stop on a NaN/inf forget loss or one past the bound (one host sync per step; the Trainer syncs
        for its own logging anyway). Raising leaves the last saved checkpoint as it was."""
        bound = self.args.forget_loss_bound
        number = float(value.detach())
        if math.isnan(number) or math.isinf(number) or (bound is not None and abs(number) > bound):
            last = self._last_checkpoint()
            kept = (f"the last saved checkpoint, {last}, is intact" if last is not None
                    else f"no checkpoint was saved in {self.args.output_dir}")
            raise MoEUnlearnError(
                f"The forget loss is {number} at step {self.state.global_step} (bound forget_loss_bound={bound}): "
                f"training stopped; {kept}. Lower the learning rate, add a retain loss, or use a bounded forget "
                f"loss (npo, simnpo)."
            )

    def _log_routing(self, ctx: LossContext, forget: dict[str, torch.Tensor], forget_topk) -> None:
        """Per selected expert: its routing share on the forget batch and its (TRACE-weighted) share on retain.

        Kept as ``[share × weight, weight]`` (weight: counted tokens, or their TRACE weights) so that :meth:`log`
        can pool them over steps and processes into the share of all the tokens seen."""
        with torch.no_grad():
            forget_mask = counted_mask(forget).reshape(-1).float()
            for layer, experts in self.selection.experts.items():
                for e in experts:
                    share, weight = routing_share(forget_topk[layer], e, forget_mask), forget_mask.sum()
                    self._metrics[f"route/L{layer}E{e}/forget"].append(torch.stack([share * weight, weight]))
            if ctx.retain_topk is not None and ctx.retain_batch is not None:
                if ctx.retain_token_weights is not None and ctx.critical_ratios is not None:
                    shares = trace_retain_shares(ctx)
                    # the weights trace_retain_shares divides by: TRACE's, on the counted predictions' positions
                    weight = (_routing_frame(ctx.retain_token_weights.float()).reshape(-1)
                              * prediction_mask(ctx.retain_batch["labels"]).reshape(-1).float()).sum()
                else:
                    retain_mask = counted_mask(ctx.retain_batch).reshape(-1).float()
                    shares = {(l, e): routing_share(ctx.retain_topk[l], e, retain_mask)
                              for l, ids in self.selection.experts.items() for e in ids}
                    weight = retain_mask.sum()
                for (layer, e), share in shares.items():
                    self._metrics[f"route/L{layer}E{e}/retain"].append(torch.stack([share * weight, weight]))

    def _log_retain_stability(self, model, ctx: LossContext) -> None:
        """``route/L{l}/retain_topk_stable`` (and ``route/retain_topk_stable`` over the selected layers): the share of
        the retain batch's counted tokens whose top-k set is still the start model's. The start routing needs one
        no-grad forward of the retain batch with the adapter disabled, so it runs at the steps that log only (every
        step with ``logging_strategy="epoch"``; never with ``"no"``)."""
        if ctx.retain_topk is None or ctx.retain_batch is None or not hasattr(unwrap_peft(model), "disable_adapter"):
            return
        args, step = self.args, self.state.global_step + 1  # the step being computed; global_step counts done ones
        if args.logging_strategy == IntervalStrategy.NO or (args.logging_strategy == IntervalStrategy.STEPS and not (
                step % max(1, int(self.state.logging_steps or 1)) == 0 or (args.logging_first_step and step == 1))):
            return
        from .evaluation.routing import same_topk

        retain = ctx.retain_batch
        saved = dict(self.recorder.current_indices), dict(self.recorder.current_logits)
        try:
            with inference_mode(model), unwrap_peft(model).disable_adapter():
                model(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"], use_cache=False)
            start = {l: self.recorder.current_indices[l] for l in self.selection.layers}
        finally:
            self.recorder.current_indices, self.recorder.current_logits = saved
            self._captured_hidden.clear()
        with torch.no_grad():
            mask = counted_mask(retain).reshape(-1).float()
            total = torch.zeros(2, device=mask.device)
            for layer in self.selection.layers:
                same = (same_topk(ctx.retain_topk[layer], start[layer]).float() * mask).sum()
                term = torch.stack([same, mask.sum()])
                self._metrics[f"route/L{layer}/retain_topk_stable"].append(term)
                total = total + term
            self._metrics["route/retain_topk_stable"].append(total)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the loss parts and routing shares since the last log, over the steps and over processes (one sync,
        at log time only).

        Loss parts are averaged over steps and processes: the mean of per-process means, as DDP averages the
        gradients of per-process mean losses (the whole batch's mean when the shares have equal token counts).
        Routing shares are pooled: the share of all the counted (TRACE: weighted) tokens of the logging window, on
        every process. Every process calls ``log`` at the same steps (the Trainer gathers the loss there) with the
        same metric names (from the config and the selection), so the reductions are collectives all take.
        """
        if self._metrics and "loss" in logs:
            names = sorted(self._metrics)
            losses = [n for n in names if self._metrics[n][0].dim() == 0]
            shares = [n for n in names if self._metrics[n][0].dim() == 1]
            device = self.accelerator.device
            means = torch.stack([torch.stack([v.float() for v in self._metrics[n]]).mean() for n in losses]
                                or [torch.zeros(())]).to(device)
            terms = torch.stack([torch.stack([v.float() for v in self._metrics[n]]).sum(0) for n in shares]
                                or [torch.zeros(2)]).to(device)
            if self.accelerator.num_processes > 1:
                means = self.accelerator.reduce(means, reduction="mean")
                terms = self.accelerator.reduce(terms, reduction="sum")
            for name, value in zip(losses, means.tolist()):
                logs[name] = round(value, 6)
            for name, (weighted, weight) in zip(shares, terms.tolist()):
                logs[name] = round(weighted / weight, 6) if weight > 0 else float("nan")
            self._metrics.clear()
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------------- stopping when forgotten
    @staticmethod
    def _check_probe_args(args: MoEUnlearnConfig, holdout_dataset, retain_dataset, kwargs: dict[str, Any]) -> None:
        """Refuse, before any work, the stopping settings no run could honour."""
        if "eval_dataset" in kwargs:
            raise MoEUnlearnError(
                "MoEUnlearnTrainer evaluates its own sets (the forget probe, the holdout and a retain sample): pass "
                "holdout_dataset=... and optionally forget_probe_dataset=... instead of eval_dataset; "
                "trainer.evaluate(eval_dataset=...) measures any other data's NLL."
            )
        if args.stop_at_holdout and holdout_dataset is None:
            raise MoEUnlearnError(
                "stop_at_holdout=True needs a holdout set to stop at: pass holdout_dataset=... (CLI: --holdout FILE), "
                "text of the same kind as the forget set that the model never saw."
            )
        if args.max_retain_nll_rise is not None and retain_dataset is None:
            raise MoEUnlearnError(
                f"max_retain_nll_rise={args.max_retain_nll_rise} guards the retain NLL, but there is no retain set: "
                f"pass retain_dataset=... (CLI: --retain FILE), or leave max_retain_nll_rise unset."
            )

    @staticmethod
    def _probe_sets(args: MoEUnlearnConfig, forget, retain, holdout_dataset, forget_probe_dataset, tokenizer):
        """The tokenised sets every evaluation measures, fixed once (the same rows every time, in every process).
        ``tokenize_dataset`` keeps only examples with a counted token, so every set and sample has one."""
        def tokenized(data, name: str):
            return fixed_sample(tokenize_dataset(data, tokenizer, args.max_length, name=name), None, args.seed)

        if forget_probe_dataset is not None:
            sets = {PROBE: tokenized(forget_probe_dataset, "forget probe set")}
        else:
            sets = {PROBE: fixed_sample(forget, args.forget_probe_size, args.seed)}
        if holdout_dataset is not None:
            sets[HOLDOUT] = tokenized(holdout_dataset, "holdout set")
        if retain is not None:
            sets[RETAIN] = fixed_sample(retain, args.retain_probe_size, args.seed)
        return sets

    @staticmethod
    def _turn_on_evaluation(args: MoEUnlearnConfig, has_holdout: bool) -> bool:
        """A holdout (or the retain guard) turns the Trainer's own step evaluation on, with one evaluation before
        any update: the log then starts with the start values, and the retain guard has its baseline."""
        if args.eval_strategy == IntervalStrategy.NO and not has_holdout and args.max_retain_nll_rise is None:
            return False
        if args.eval_strategy == IntervalStrategy.NO:
            args.eval_strategy = IntervalStrategy.STEPS
            args.eval_steps = 10 if args.eval_steps is None else args.eval_steps
            if args.eval_steps > 1:
                args.eval_steps = int(args.eval_steps)
        args.eval_on_start = True
        return True

    def evaluate(self, eval_dataset=None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """Mean token NLL of the forget probe, the holdout and the retain sample, logged and passed to the callbacks.

        The Trainer calls this every ``eval_steps`` (and at step 0). Its default evaluation loop would compute
        ``compute_loss``, which here is the unlearning loss, so the NLLs are computed directly, without gradients
        and with the model in eval mode. Metrics: ``eval_forget_probe_nll``, ``eval_holdout_nll``,
        ``eval_retain_nll``, ``eval_holdout_gap`` (holdout − probe: ≤ 0 once forgotten) and
        ``eval_retain_nll_rise`` (relative to step 0). ``eval_dataset`` (a dataset, list of texts, or a
        ``{name: data}`` dict): measure that data instead (``eval_nll`` / ``eval_<name>_nll``).
        """
        if eval_dataset is None:
            sets = self.eval_dataset
        else:
            named = eval_dataset if isinstance(eval_dataset, dict) else {None: eval_dataset}
            sets = {}
            for name, data in named.items():
                label = f"{name or 'evaluation'} set"
                sets[name] = fixed_sample(tokenize_dataset(data, self.processing_class, self.args.max_length,
                                                           name=label), None, self.args.seed)
                self._check_vocabulary(self._embedding_rows, None, {label: sets[name]})
        nlls = self._mean_nlls(sets)
        metrics = {f"{metric_key_prefix}_{name}_nll" if name else f"{metric_key_prefix}_nll": value
                   for name, value in nlls.items()}
        if eval_dataset is None:
            if HOLDOUT in nlls:
                metrics[f"{metric_key_prefix}_{HOLDOUT}_gap"] = nlls[HOLDOUT] - nlls[PROBE]
            if RETAIN in nlls:
                start = first_logged(self.state.log_history, f"{metric_key_prefix}_{RETAIN}_nll")
                start = nlls[RETAIN] if start is None else start
                metrics[f"{metric_key_prefix}_{RETAIN}_nll_rise"] = nlls[RETAIN] / start - 1
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _mean_nlls(self, sets: dict) -> dict[str, float]:
        """Mean token NLL of each set. Each process measures a share; the NLL sums and token counts are summed
        over processes, so every process gets the same values (and takes the same stop decision)."""
        model = self.model  # under DDP the bare model: no collective runs in its forward
        self.recorder.enabled = False  # evaluation must not touch the routing statistics
        self._hidden_split = "eval"
        try:
            with inference_mode(model):
                sums = torch.stack([
                    nll_sums(model, data, self.data_collator, self.args.per_device_eval_batch_size, self.args.device,
                             self.accelerator.process_index, self.accelerator.num_processes,
                             autocast=self.compute_loss_context_manager)
                    for data in sets.values()
                ])
        finally:
            self.recorder.enabled = True
            self._captured_hidden.pop("eval", None)
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        return {name: float(total / count) for name, (total, count) in zip(sets, sums.tolist())}

    # ----------------------------------------------------------------------------------- several processes
    def _check_data_parallel(self) -> None:
        """Refuse a multi-process run whose gradients would not be averaged over the processes (called once the
        Trainer has wrapped the model, at ``on_train_begin``).

        Two cases are detectable: processes that were launched together but each run alone (accelerate found no
        distributed backend; :class:`MoEUnlearnConfig` already turns ``use_cpu`` on where that is the cause), and
        a data loader sharded over several processes while the model is wrapped by neither DDP, FSDP nor
        DeepSpeed. Both would train without a word on each process's own share: a silently different run.
        """
        from torch.nn.parallel import DistributedDataParallel

        from .config import _launched_processes

        launched, processes = _launched_processes(), self.accelerator.num_processes
        if launched > 1 and processes == 1:
            raise MoEUnlearnError(
                f"{launched} processes were launched, but accelerate runs each of them alone (distributed type "
                f"{self.accelerator.distributed_type}): every process would train on its own copy, with no averaged "
                f"gradient. Launch with an accelerate config whose distributed type matches the machine (multi-GPU "
                f"on GPUs; on CPU, use_cpu=True / `accelerate launch --cpu`), or run one process."
            )
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not self.is_fsdp_enabled:
            logger.warning("The accelerate config asks for FSDP, but accelerate runs %s (it applies FSDP on "
                           "accelerator devices only): the model is not sharded.", self.accelerator.distributed_type)
        if self.is_fsdp_enabled and "FULL_STATE_DICT" not in str(self.accelerator.state.fsdp_plugin.state_dict_type):
            raise MoEUnlearnError(
                f"fsdp_state_dict_type is {self.accelerator.state.fsdp_plugin.state_dict_type}: with it the Trainer "
                f"saves no adapter (save_model and the checkpoints write only sharded FSDP files, without the PEFT "
                f"adapter, selection.json or unlearn_config.json). Set fsdp_state_dict_type: FULL_STATE_DICT in the "
                f"accelerate config (examples/accelerate/fsdp.yaml): the adapter is small, only its gathering is."
            )
        if processes == 1 or self.is_deepspeed_enabled or getattr(self, "is_distributed_loading_by_transformers",
                                                                  False):
            return  # DeepSpeed and transformers' own sharding (tp_plan / expert parallelism) reduce gradients
        model = self.model_wrapped
        if isinstance(model, DistributedDataParallel) or _is_sharded(model):
            return
        raise MoEUnlearnError(
            f"The data is sharded over {processes} processes ({self.accelerator.distributed_type}), but the model "
            f"was wrapped by neither DDP, FSDP nor DeepSpeed ({type(model).__name__}): each process would step on "
            f"its own share of the batch, without averaging gradients. Let the Trainer prepare the model (do not "
            f"pass an already-wrapped or custom-placed model), or run one process."
        )

    def _sum_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes (a collective; the losses' ``ctx.sum_over_processes``)."""
        return self.accelerator.reduce(tensor.detach().clone(), reduction="sum")

    # ------------------------------------------------------------------------------------------- saving
    _saving_checkpoint = False

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """The Trainer's save (adapter, tokenizer, training args) plus ``selection.json`` and ``unlearn_config.json``.

        A final save is written into a staging folder and published atomically with a completion marker
        (:func:`hf_moe_unlearn.saving.publish`); a checkpoint is written in place and marked complete by
        :meth:`_save_checkpoint` once every file of it is written."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:  # non-writers only join the Trainer's collectives; nothing is written
            super()._save(output_dir, state_dict)
            return
        os.makedirs(output_dir, exist_ok=True)
        target = output_dir if self._saving_checkpoint else saving.staging_folder(output_dir)
        super()._save(target, state_dict)
        self._write_run_files(target)
        if not self._saving_checkpoint:
            saving.publish(target, output_dir)

    def _write_run_files(self, folder: str) -> None:
        self.selection.save(os.path.join(folder, "selection.json"))
        with open(os.path.join(folder, "unlearn_config.json"), "w") as f:
            f.write(self.args.to_json_string())

    def _save_checkpoint(self, model, trial) -> None:
        """``Trainer._save_checkpoint``, finished by a completion marker once every process has written its part,
        and only then the rotation (``save_total_limit``): a kill at any moment leaves the previous complete
        checkpoints, or the new one complete, never only a partial one."""
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save and os.path.exists(folder):
            shutil.rmtree(folder)  # left by a save killed at this step: start clean rather than mix two saves
        self.accelerator.wait_for_everyone()
        # The Trainer rotates right after writing, before the marker could be; rotate after it instead.
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        self._saving_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit, self._saving_checkpoint = limit, False
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            if os.path.isfile(os.path.join(folder, TRAINING_ARGS_NAME)):  # written while the limit was lifted
                torch.save(self.args, os.path.join(folder, TRAINING_ARGS_NAME))
            self._write_run_files(folder)
            saving.write_marker(folder)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """Write the adapter's Hub model card (base model, method, losses, selected experts, eval results)."""
        model = unwrap_peft(self.model)
        if hasattr(model, "model_card"):
            model.model_card().save(os.path.join(self.args.output_dir, "README.md"))
        else:
            super().create_model_card(*args, **kwargs)

    def evaluation_results(self, results: dict[str, float]) -> None:
        """Record evaluation results so the model card reports them."""
        model = unwrap_peft(self.model)
        if hasattr(model, "card_info"):
            model.card_info["eval_results"] = dict(results)


class _CheckDataParallel(TrainerCallback):
    """Runs :meth:`MoEUnlearnTrainer._check_data_parallel` at the start of training, the first moment the wrapped
    model exists (the Trainer wraps it inside ``train``)."""

    def __init__(self, trainer: MoEUnlearnTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._check_data_parallel()


def _is_sharded(model: nn.Module) -> bool:
    """Whether FSDP (1 or 2) wraps the model or any of its modules: FSDP reduces the gradients itself."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The PEFT model under DDP/compile wrappers (``disable_adapter`` and the model card live there)."""
    while not hasattr(model, "disable_adapter") and hasattr(model, "module"):
        model = model.module
    return model
