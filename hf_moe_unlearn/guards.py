"""Stop a training run whose optimizer steps have stopped meaning anything (issue 12).

A learning rate far too large (say 1e3 with AdamW) blows the adapter up in one step; the softmax and the
activations behind it then saturate, the gradient of every trainable parameter becomes exactly 0, and the run goes
on to its last step and saves the exploded adapter with exit code 0: the forget loss stays bounded (measured on a
tiny Qwen3-MoE with GA: -4.86 before, -4.85 after), so ``forget_loss_bound`` never trips.
:class:`TrainingHealthGuard` looks at each optimizer step just before it is applied and stops on

- a gradient norm that is not finite (NaN/inf; the step is not applied),
- a gradient that is exactly 0 on every trainable parameter for :data:`ZERO_GRADIENT_STEPS` steps in a row,
- trainable parameters whose norm exceeds ``max_param_norm_growth`` times its value before the first step of this
  ``train()`` call (default 1000: the demo's methods grow it at most 9.5x over their whole learning-rate grid, one
  AdamW step at 1e3 ~4600x; on a resume the start is the resumed adapter's norm).

It stops the way the forget-loss bound does: it raises :class:`~hf_moe_unlearn.errors.MoEUnlearnError` out of
``train()``, so no final adapter is written after it (the CLI prints the message and exits with status 2) and the
checkpoints already written are left as they are.

Why a callback: ``on_pre_optimizer_step`` is the public hook that runs after the backward, the DDP all-reduce and
gradient clipping, before ``optimizer.step()`` — the averaged gradients every process is about to apply, identical
on every process, so all of them stop at the same step (no collective is added and none can hang).
"""

from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING

import torch
from transformers import TrainerCallback

from .errors import MoEUnlearnError

if TYPE_CHECKING:
    from .trainer import MoEUnlearnTrainer

logger = logging.getLogger(__name__)

#: Consecutive optimizer steps with an exactly-zero gradient that stop training. One such step can be honest: a
#: batch none of whose tokens reaches a selected expert, with a frozen router and no anchor, gives no gradient. An
#: exploded adapter gives 0 at every step from then on (measured: 0 from step 2 on, with one 2e-6 blip), so three in
#: a row tell the two apart and still stop within a few steps.
ZERO_GRADIENT_STEPS = 3


class TrainingHealthGuard(TrainerCallback):
    """Raise :class:`MoEUnlearnError` on a non-finite or vanished gradient, or on an exploding adapter.

    Args:
        trainer: the trainer it guards; read for the config (``max_param_norm_growth``), the accelerator (a
            gradient scaler or a sharded model changes what can be checked) and the last saved checkpoint, which
            the message names.

    One host sync per optimizer step: the two norms are read together with one ``.tolist()``. It waits only for
    the two norm reductions launched just before it: the Trainer has already synced after the backward (its
    ``logging_nan_inf_filter`` test of the step's loss, default on) and this package once more at the forget-loss
    check, so the device queue is empty up to the backward's end anyway.
    """

    def __init__(self, trainer: MoEUnlearnTrainer) -> None:
        self.trainer = trainer
        self._params: list[torch.Tensor] = []
        self._start_norm: float | None = None
        self._zero_since: int | None = None
        self._zero_steps = 0
        self._active = True

    # ------------------------------------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._params = [p for p in (model if model is not None else self.trainer.model).parameters()
                        if p.requires_grad]
        self._start_norm, self._zero_since, self._zero_steps = None, None, 0
        # DeepSpeed steps inside its backward and keeps gradients out of ``p.grad``; FSDP holds only this process's
        # shard of each tensor. Checking what this process sees would be wrong there (and processes that disagree
        # would stop at different steps), so the guard is off; the forget-loss bound still applies.
        sharded = self.trainer.is_deepspeed_enabled or self.trainer.is_fsdp_enabled
        self._active = bool(self._params) and not sharded
        if sharded:
            logger.info("Gradient / adapter-norm guard off under %s (it sees only sharded gradients); the forget-loss "
                        "bound still applies.", "DeepSpeed" if self.trainer.is_deepspeed_enabled else "FSDP")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self._active:
            return
        grad_norm, param_norm = self._norms()
        step = state.global_step + 1  # the step about to be applied, as the logs will count it
        # fp16's gradient scaler meets inf gradients on purpose: it skips that step and lowers its scale.
        if not math.isfinite(grad_norm) and self.trainer.accelerator.scaler is None:
            self._stop(
                f"The gradient norm of the trainable parameters is {grad_norm} at step {step}: the gradients are not "
                f"finite (the run is diverging). Training stopped before this step was applied",
                cause="the learning rate is far too large",
            )
        if grad_norm == 0.0:
            self._zero_since = step if self._zero_since is None else self._zero_since
            self._zero_steps += 1
            if self._zero_steps >= ZERO_GRADIENT_STEPS:
                growth = (f" (their norm is {param_norm / self._start_norm:.3g}x its value before the first step)"
                          if self._start_norm else "")
                self._stop(
                    f"The gradient of every trainable parameter has been exactly 0 for {self._zero_steps} optimizer "
                    f"steps (steps {self._zero_since}-{step}): training no longer changes the adapter{growth}. "
                    f"Typically the adapter exploded under a learning rate far too large and the softmax or the "
                    f"activations behind it saturated; otherwise no loss term reaches the trainable parameters. "
                    f"Training stopped at step {step}",
                    cause="it exploded", since=self._zero_since,
                )
        else:
            self._zero_since, self._zero_steps = None, 0
        factor = self.trainer.args.max_param_norm_growth
        if self._start_norm is None:
            self._start_norm = param_norm  # before the first optimizer step of this train() call
        elif factor is not None and self._start_norm > 0 and param_norm > factor * self._start_norm:
            self._stop(
                f"The norm of the trainable parameters is {param_norm:.4g} at step {step}, "
                f"{param_norm / self._start_norm:.3g}x its value before the first step ({self._start_norm:.4g}; "
                f"max_param_norm_growth={factor:g}): the adapter is exploding. Training stopped before step {step} "
                f"was applied",
                cause="the learning rate is far too large", growth=True,
            )

    # ------------------------------------------------------------------------------------------------ helpers
    def _norms(self) -> tuple[float, float]:
        """Total L2 norm of the trainable parameters' gradients (0 for none) and of the parameters themselves,
        read with one host sync. Gradients missing on every parameter count as 0: nothing reached them."""
        grads = [p.grad for p in self._params if p.grad is not None]
        device = self._params[0].device
        grad_norm = (torch.nn.utils.get_total_norm(grads, norm_type=2.0) if grads
                     else torch.zeros((), device=device))
        param_norm = torch.nn.utils.get_total_norm([p.detach() for p in self._params], norm_type=2.0)
        values = torch.stack([grad_norm.float().to(device), param_norm.float().to(device)]).tolist()
        return values[0], values[1]

    def _stop(self, what: str, cause: str, since: int | None = None, growth: bool = False) -> None:
        args = self.trainer.args
        last = self.trainer._last_checkpoint()
        if last is None:
            kept = f"no checkpoint was saved in {args.output_dir}"
        else:
            kept = f"the last complete checkpoint is {last}"
            saved_at = _checkpoint_step(last)
            if since is not None and saved_at is not None and saved_at >= since - 1:  # holds steps 1..saved_at
                kept += (f", written after the gradient vanished at step {since}: it holds the same stuck adapter, "
                         f"resume from an earlier checkpoint or start again")
        advice = (f"Lower the learning rate (learning_rate={args.learning_rate}; {cause}), add a retain loss, or "
                  f"use a bounded forget loss (npo, simnpo)")
        if growth:
            advice += "; if this growth is intended, raise max_param_norm_growth (None turns the check off)"
        raise MoEUnlearnError(f"{what}; {kept}. {advice}.")


def _checkpoint_step(path: str) -> int | None:
    """N of a ``checkpoint-N`` folder, or None."""
    tail = os.path.basename(os.path.normpath(path)).rpartition("-")[2]
    return int(tail) if tail.isdigit() else None
