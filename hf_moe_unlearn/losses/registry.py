"""The loss registry: losses are looked up by name, so a new method is a decorator away.

Four kinds of loss, combined by the trainer as ``γ·forget + α·retain + anchor_weight·router``:

* ``forget``  — pushes the model away from the forget data (ga, npo, simnpo, rmu, idk_nll, idk_dpo, dpo, undial,
  wga, satimp, ceu);
* ``retain``  — keeps utility on the retain data (nll, kl, rmu_retain; ``none`` is the trainer's);
* ``router``  — acts on the router of the selected layers (seuf_anchor);
* ``weighting`` — returns **per-token weights** ``[B, T]`` for the retain loss (trace), not a loss.

A registered loss is a callable ``loss(ctx: LossContext) -> torch.Tensor``: a function, or a class whose
instances are (instantiated with no arguments by :func:`get_loss`, so each run gets fresh state).
``requires`` names what the loss needs from the context; the trainer reads it to know which providers to
set up, and the registry checks it before each call, so a missing reference model fails with a clear
message instead of a ``NoneType`` traceback.

``reference`` says how a loss that requires ``"reference"`` reads the frozen model: ``"sequence"`` — only as the
summed NLL of each sequence, through ``ctx.reference_sequence_nll(split)`` (NPO, IdkDPO), which the trainer serves
from its per-example cache (``MoEUnlearnConfig.cache_reference``) instead of a reference forward every step;
``"logits"`` (the default for any loss requiring ``"reference"``) — token-level logits through
``ctx.reference_logits(split)`` (KL), computed by a reference forward at every step that asks for them.

Writing your own::

    from hf_moe_unlearn.losses import register_loss, functional as LF

    @register_loss("ga_clipped", kind="forget")
    def ga_clipped(ctx):
        return LF.ga_loss(ctx.forget_logits, ctx.forget_batch["labels"]).clamp_min(-20.0)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ..errors import MoEUnlearnError
from .context import REQUIREMENTS, LossContext

LOSS_KINDS: tuple[str, ...] = ("forget", "retain", "router", "weighting")
#: How a loss reads the reference model (``register_loss(..., reference=...)``): token-level logits, or only the
#: summed NLL of each sequence (which never changes during training, so the trainer may compute it once per example).
REFERENCE_USES: tuple[str, ...] = ("logits", "sequence")

T = TypeVar("T")


@dataclass(frozen=True)
class LossSpec:
    """What was registered under a name: the function or class and its declared needs."""

    name: str
    kind: str
    requires: tuple[str, ...]
    target: Any  # a function ctx -> Tensor, or a class whose instances are
    reference: str | None = None  # "logits", "sequence" (REFERENCE_USES), or None: no reference model


@dataclass
class RegisteredLoss:
    """A ready-to-call loss returned by :func:`get_loss`; carries its name, kind and requirements.

    Calling it checks the requirements, runs the loss, and checks that a forget/retain/router loss returned
    a scalar tensor (a weighting returns ``[B, T]`` weights).
    """

    name: str
    kind: str
    requires: tuple[str, ...]
    fn: Callable[[LossContext], torch.Tensor]
    reference: str | None = None

    def __call__(self, ctx: LossContext) -> torch.Tensor:
        for requirement in self.requires:
            ctx.require(requirement, loss=self.name)
        out = self.fn(ctx)
        if not isinstance(out, torch.Tensor):
            raise MoEUnlearnError(
                f"{self.kind} loss {self.name!r} must return a torch.Tensor, got {type(out).__name__}."
            )
        if self.kind != "weighting" and out.dim() != 0:
            raise MoEUnlearnError(
                f"{self.kind} loss {self.name!r} must return a scalar tensor, got shape {tuple(out.shape)}: "
                "reduce it (e.g. .mean()) inside the loss."
            )
        return out


_REGISTRY: dict[str, LossSpec] = {}

#: Names that were built-ins once, with what replaced them (shown when such a name is not registered).
_RENAMED: dict[str, str] = {
    "idk": "'idk' was split in two: 'idk_nll' (the NLL of the IDK answer, what 'idk' computed) and 'idk_dpo' "
    "(IdkDPO: DPO with the IDK answer preferred over the true one, against the reference model).",
}


def _check_kind(kind: str) -> None:
    if kind not in LOSS_KINDS:
        raise MoEUnlearnError(f"Unknown loss kind {kind!r}. Kinds: {', '.join(LOSS_KINDS)}.")


def register_loss(
    name: str, *, kind: str, requires: Iterable[str] = (), override: bool = False, reference: str | None = None
) -> Callable[[T], T]:
    """Decorator registering a loss function or class under ``name``.

    Args:
        name: the name used in configs (``forget_loss="npo"``). Names are unique across kinds.
        kind: ``"forget"``, ``"retain"``, ``"router"`` or ``"weighting"``.
        requires: context needs, among :data:`~hf_moe_unlearn.losses.context.REQUIREMENTS`
            (``"reference"``, ``"idk"``, ``"hidden"``, ``"router_logits"``, ``"retain_routing"``, ...).
        override: replace an existing registration of ``name`` (otherwise that raises).
        reference: how the loss reads the reference model, for a loss that requires ``"reference"`` (giving it adds
            ``"reference"`` to ``requires``): ``"sequence"`` when it reads only ``ctx.reference_sequence_nll`` (then
            the trainer may serve it from its per-example cache), ``"logits"`` (default) when it reads
            ``ctx.reference_logits``. The declaration documents the loss (``get_loss_spec(name).reference``); what
            saves the forward is reading ``ctx.reference_sequence_nll`` (the trainer runs a reference forward only
            when something asks for logits), so a loss that declares ``"sequence"`` and still reads
            ``ctx.reference_logits`` gets its forward, just no saving.

    Returns the decorated object unchanged, so it stays usable directly.
    """
    _check_kind(kind)
    requires = tuple(requires)
    unknown = [r for r in requires if r not in REQUIREMENTS]
    if unknown:
        raise MoEUnlearnError(f"Unknown requirement(s) {unknown} for loss {name!r}. Known: {', '.join(REQUIREMENTS)}.")
    if reference is not None and reference not in REFERENCE_USES:
        raise MoEUnlearnError(
            f"reference={reference!r} for loss {name!r} must be one of {', '.join(REFERENCE_USES)} (or None): "
            f"'sequence' if the loss reads only ctx.reference_sequence_nll, 'logits' if it reads ctx.reference_logits."
        )
    if reference is not None and "reference" not in requires:
        requires = requires + ("reference",)
    if reference is None and "reference" in requires:
        reference = "logits"  # the safe reading: a loss that may look at token-level reference logits
    if not isinstance(name, str) or not name:
        raise MoEUnlearnError(f"A loss name must be a non-empty string, got {name!r}.")

    def decorator(target: T) -> T:
        if not callable(target):
            raise MoEUnlearnError(f"@register_loss({name!r}) must decorate a function or a class, got {target!r}.")
        if name in _REGISTRY and not override:
            existing = _REGISTRY[name]
            raise MoEUnlearnError(
                f"A {existing.kind} loss named {name!r} is already registered. Pick another name, or pass "
                f"override=True to replace it."
            )
        _REGISTRY[name] = LossSpec(name=name, kind=kind, requires=requires, target=target, reference=reference)
        return target

    return decorator


def unregister_loss(name: str) -> None:
    """Remove a registration (for tests and notebooks that register throw-away losses)."""
    if name not in _REGISTRY:
        raise MoEUnlearnError(f"No loss named {name!r} is registered.")
    del _REGISTRY[name]


def list_losses(kind: str | None = None) -> list[str]:
    """Registered names, in registration order, optionally of one kind."""
    if kind is not None:
        _check_kind(kind)
    return [spec.name for spec in _REGISTRY.values() if kind is None or spec.kind == kind]


def get_loss_spec(name: str, kind: str | None = None) -> LossSpec:
    """The :class:`LossSpec` of ``name``; raises listing the registered names (of ``kind``) if unknown."""
    if kind is not None:
        _check_kind(kind)
    spec = _REGISTRY.get(name)
    if spec is None or (kind is not None and spec.kind != kind):
        label = f"{kind} loss" if kind else "loss"
        registered = ", ".join(list_losses(kind)) or "(none)"
        if spec is not None:
            hint = f"{name!r} is a {spec.kind} loss; use it as one."
        elif name in _RENAMED:
            hint = _RENAMED[name]
        else:
            hint = f"Register your own with @register_loss({name!r}, kind={kind or 'forget'!r})."
        raise MoEUnlearnError(f"Unknown {label} {name!r}. Registered: {registered}. {hint}")
    return spec


def get_loss(name: str, kind: str | None = None) -> RegisteredLoss:
    """A callable ``loss(ctx) -> Tensor`` for ``name`` (classes are instantiated here, with no arguments)."""
    spec = get_loss_spec(name, kind)
    fn = spec.target() if isinstance(spec.target, type) else spec.target
    return RegisteredLoss(name=spec.name, kind=spec.kind, requires=spec.requires, fn=fn, reference=spec.reference)
