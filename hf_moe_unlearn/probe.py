"""Knowing when the forget set is forgotten: probe, holdout and retain NLLs at every evaluation, and stopping.

Gradient ascent and its relatives have no natural end: the forget loss keeps falling, and a run that trains too
long wrecks the model while one that trains too little changes nothing. The usual target (MUSE, TOFU's forget
quality) is that the forget data should look to the model like text of the same kind it never saw. So at every
evaluation :class:`~hf_moe_unlearn.MoEUnlearnTrainer` measures the mean token NLL of

* a *forget probe* (a fixed, seeded sample of the forget set, or a separate probe set),
* a *holdout* set (the same kind of text, never trained on): the level the probe should reach,
* a fixed sample of the *retain* set: what must not rise,

and :class:`StopWhenForgottenCallback` stops training at the first evaluation where the probe's NLL reaches the
holdout's (``stop_at_holdout``), or where the retain NLL rose too far above its start value
(``max_retain_nll_rise``).
"""

from __future__ import annotations

import logging
import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .losses.functional import token_nll

logger = logging.getLogger(__name__)

PROBE = "forget_probe"
HOLDOUT = "holdout"
RETAIN = "retain"
COLUMNS = ("input_ids", "attention_mask", "labels")


def fixed_sample(dataset, size: int | None, seed: int):
    """At most ``size`` rows of a tokenised dataset, drawn with ``seed`` (the same rows in every process and
    every evaluation, so the logged NLLs differ only because the model changed), in their original order."""
    dataset = dataset.select_columns([c for c in COLUMNS if c in dataset.column_names])
    if size is None or size >= len(dataset):
        return dataset
    generator = torch.Generator().manual_seed(seed)
    return dataset.select(sorted(torch.randperm(len(dataset), generator=generator)[:size].tolist()))


def first_logged(log_history: list[dict[str, Any]], key: str) -> float | None:
    """The first value of ``key`` in the Trainer's log history: the step-0 evaluation, also after a resume (the
    history is restored from the checkpoint's ``trainer_state.json``)."""
    return next((entry[key] for entry in log_history if key in entry), None)


@torch.no_grad()
def nll_sums(
    model: torch.nn.Module,
    dataset,
    collator: Callable[[list[dict]], dict[str, torch.Tensor]],
    batch_size: int,
    device: torch.device | str,
    process_index: int = 0,
    num_processes: int = 1,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> torch.Tensor:
    """``[summed token NLL, counted tokens]`` (float32, on ``device``) of this process's share of ``dataset``.

    Process ``i`` takes rows ``i, i+N, ...``; shares are padded with zero-weight rows so that every process runs
    the same number of forwards (sharded models need that). Summing the pairs over processes gives the exact
    mean over the whole dataset, whatever the number of processes.
    """
    share = list(range(process_index, len(dataset), num_processes))
    padding = math.ceil(len(dataset) / num_processes) - len(share)
    rows, weights = share + [0] * padding, [1.0] * len(share) + [0.0] * padding
    total = torch.zeros(2, dtype=torch.float32, device=device)
    for start in range(0, len(rows), batch_size):
        batch = collator([dataset[i] for i in rows[start:start + batch_size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        nll, mask = token_nll(logits, batch["labels"])
        weight = torch.tensor(weights[start:start + batch_size], dtype=torch.float32, device=device)[:, None]
        total[0] += (nll * mask * weight).sum()
        total[1] += (mask * weight).sum()
    return total


class StopWhenForgottenCallback(TrainerCallback):
    """Stops training when the forget probe's NLL reaches the holdout's, or when the retain NLL rose too much.

    It reads the metrics :meth:`MoEUnlearnTrainer.evaluate` logs (``eval_forget_probe_nll``, ``eval_holdout_nll``,
    ``eval_retain_nll_rise``), which are summed over processes first, so every process takes the same decision.
    Stopping sets ``control.should_training_stop`` (and ``should_save`` when checkpoints are saved): training ends
    right after that evaluation, and the model :meth:`save_model` then writes is the one that was evaluated.

    After a run, ``reached_step`` is the first evaluated step (> 0) where probe NLL >= holdout NLL (None: never),
    ``stop_reason`` is ``"forgotten"``, ``"retain_guard"`` or None, and ``outcome`` the one line that was logged.

    Args:
        stop_at_holdout: stop at the first evaluation where the probe's NLL reaches the holdout's.
        max_retain_nll_rise: stop when the retain NLL exceeds its step-0 value by more than this fraction.
    """

    def __init__(self, stop_at_holdout: bool = False, max_retain_nll_rise: float | None = None) -> None:
        self.stop_at_holdout = stop_at_holdout
        self.max_retain_nll_rise = max_retain_nll_rise
        self._reset()

    def _reset(self) -> None:
        self.reached_step: int | None = None
        self.stop_reason: str | None = None
        self.outcome: str | None = None
        self.outcome_level: int | None = None
        self.last_metrics: dict[str, float] = {}

    def _say(self, state: TrainerState, level: int, message: str) -> None:
        self.outcome, self.outcome_level = message, level
        if state.is_world_process_zero:
            logger.log(level, message)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._reset()

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: dict[str, float] | None = None, **kwargs: Any):
        metrics = metrics or {}
        probe, holdout = metrics.get(f"eval_{PROBE}_nll"), metrics.get(f"eval_{HOLDOUT}_nll")
        if probe is None:  # an evaluation of other data (trainer.evaluate(eval_dataset=...)): nothing to decide
            return
        self.last_metrics = dict(metrics)
        step = state.global_step
        stop = False
        if holdout is not None and probe >= holdout and self.reached_step is None:
            if step == 0:
                if state.is_world_process_zero:
                    logger.warning(
                        f"Before any update the forget probe's NLL ({probe:.2f}) already reaches the holdout's "
                        f"({holdout:.2f}): the model does not know the forget set better than unseen text. Check that "
                        f"the holdout is text of the same kind, or that the model learned the forget set at all."
                    )
            else:
                self.reached_step = step
                stop = self.stop_at_holdout
                self._say(state, logging.INFO,
                          f"forget probe NLL {probe:.2f} reached the holdout's {holdout:.2f} at step {step}"
                          + (": training stopped (stop_at_holdout)." if stop else "."))
                if stop:
                    self.stop_reason = "forgotten"
        rise = metrics.get(f"eval_{RETAIN}_nll_rise")
        if self.max_retain_nll_rise is not None and rise is not None and rise > self.max_retain_nll_rise:
            stop = True
            self.stop_reason = "retain_guard"
            start = first_logged(state.log_history, f"eval_{RETAIN}_nll")
            self._say(state, logging.WARNING,
                      f"retain NLL rose by {rise:.0%} (limit {self.max_retain_nll_rise:.0%}, max_retain_nll_rise) at "
                      f"step {step}, from {start:.2f} to {metrics[f'eval_{RETAIN}_nll']:.2f}: training stopped. The "
                      f"model is losing what it should keep: lower learning_rate or raise retain_loss_weight.")
        if stop:
            control.should_training_stop = True
            if args.save_strategy != "no":
                control.should_save = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        probe, holdout = self.last_metrics.get(f"eval_{PROBE}_nll"), self.last_metrics.get(f"eval_{HOLDOUT}_nll")
        if self.stop_reason is not None or self.reached_step is not None or holdout is None or probe is None:
            return
        self._say(state, logging.WARNING,
                  f"forget probe NLL {probe:.2f} did not reach the holdout's {holdout:.2f} (gap {holdout - probe:.2f}) "
                  f"in {state.global_step} steps: raise learning_rate or max_steps.")
