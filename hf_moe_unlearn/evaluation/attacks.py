"""Routing attacks: forget metrics of an unlearned MoE model when an attacker controls the routing.

Forgetting that lives in a few experts can be routed around. Two attacks test that, each as a context manager that
changes how the model routes while it is active (any metric can run inside it) and as a registered metric that
reports the forget metrics under it:

- **expert masking** (:func:`mask_experts`, metric ``"expert_masking"``): the experts the unlearning edited are
  removed from routing — their router logits are set to −inf before the top-k — so every token goes to experts
  the unlearning did not touch. Does the knowledge come back?
- **routing restore** (:func:`restore_routing`, metric ``"routing_restore"``): the unlearned experts, but every
  token routed as the model before unlearning routed it (its top-k indices *and* gate weights, taken from the
  original router on the same input). Is the forgetting in the experts, or only in the router?

Both act through hooks on the routers found by :func:`~hf_moe_unlearn.moe.find_moe_layers`, so they work on every
supported family; how each family is handled is in docs/routing-attacks.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import MoEUnlearnError
from ..moe.layers import MoELayer, find_moe_layers, unwrap_model
from ..routing.recorder import parse_router_output
from ..routing.selection import ExpertSelection
from .registry import register_metric

__all__ = [
    "edited_experts",
    "expert_masking",
    "mask_experts",
    "original_routing_source",
    "restore_routing",
    "routing_restore",
]

ExpertMap = dict[int, list[int]]


# ----------------------------------------------------------------------------------------------------------------
# Which experts the unlearning edited, and where the original routing comes from
# ----------------------------------------------------------------------------------------------------------------


def _selection_from_adapter_dir(path: str) -> ExpertSelection | None:
    config_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_file):
        return None
    from ..adapter.config import selection_from_config

    with open(config_file) as f:
        return selection_from_config(json.load(f))


def _selection_of_model(model: nn.Module) -> ExpertSelection | None:
    """The selection an adapter records: ``ExpertPeftModel.expert_selection``, else the hf-moe-unlearn block of a
    plain ``PeftModel``'s active config (an adapter saved by this package and loaded with ``PeftModel``)."""
    seen = set()
    while id(model) not in seen:  # DDP / compile wrappers around the PEFT model
        seen.add(id(model))
        selection = getattr(model, "expert_selection", None)
        if isinstance(selection, ExpertSelection):
            return selection
        configs = getattr(model, "peft_config", None)
        if isinstance(configs, Mapping) and configs:
            from ..adapter.config import selection_from_config

            name = getattr(model, "active_adapter", None)
            config = configs.get(name) if isinstance(name, str) and name in configs else next(iter(configs.values()))
            try:
                return selection_from_config(config)
            except MoEUnlearnError:
                return None
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
    return None


def edited_experts(model: nn.Module, experts: ExpertSelection | Mapping | str | os.PathLike | None = None) -> ExpertMap:
    """The experts the unlearning edited, ``{layer: [expert, ...]}``, checked against ``model``'s MoE layers.

    ``experts`` (an :class:`ExpertSelection`, a ``{layer: [experts]}`` mapping, a ``selection.json`` or an adapter
    directory) wins; without it they are read from the model's adapter (an ``ExpertPeftModel``'s selection, or the
    ``adapter_config.json`` metadata of an adapter saved by hf-moe-unlearn). A merged or plain model records none:
    pass ``experts`` then (e.g. ``trainer.selection.experts``, or the adapter directory).
    """
    selection: ExpertSelection | None
    if experts is None:
        selection = _selection_of_model(model)
    elif isinstance(experts, (str, os.PathLike)) and os.path.isdir(os.fspath(experts)) and \
            os.path.isfile(os.path.join(os.fspath(experts), "adapter_config.json")):
        selection = _selection_from_adapter_dir(os.fspath(experts))
    else:
        selection = ExpertSelection.coerce(experts)
    if selection is None or not any(selection.experts.values()):
        raise MoEUnlearnError(
            f"This {type(model).__name__} records no edited experts (no hf-moe-unlearn adapter with an expert "
            f"selection): pass experts={{layer: [expert, ...]}}, the selection.json or the adapter directory."
        )
    layers = {layer.index: layer for layer in find_moe_layers(model)}
    out: ExpertMap = {}
    for index, ids in selection.experts.items():
        if index not in layers:
            raise MoEUnlearnError(f"Edited experts name layer {index}, which is not an MoE layer of this model; MoE "
                                  f"layers are {sorted(layers)}.")
        bad = [e for e in ids if not 0 <= int(e) < layers[index].num_experts]
        if bad:
            raise MoEUnlearnError(f"Edited experts {bad} of layer {index} do not exist: the layer has "
                                  f"{layers[index].num_experts} routed experts (0..{layers[index].num_experts - 1}).")
        if ids:
            out[int(index)] = sorted({int(e) for e in ids})
    return out


def _peft_of(model: nn.Module) -> nn.Module | None:
    """The PEFT model (the one with ``disable_adapter``) under DDP/compile wrappers, or None."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
            return model
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return None
        model = inner
    return None


def original_routing_source(model: nn.Module, original: nn.Module | None = None, *, attack: str = "routing restore"):
    """``(module, context)``: the model before unlearning, run as ``with context(): module(...)``.

    ``original`` (the base model, e.g. the target a merged model was unlearned from) if given; else ``model``
    itself with its adapter disabled (PEFT's ``disable_adapter``: the frozen start model, no second copy).
    """
    if original is not None:
        if unwrap_model(original) is unwrap_model(model):
            raise MoEUnlearnError(f"{attack}: original= is the unlearned model itself; pass the model before "
                                  f"unlearning (the base model), or leave original= out for a PEFT model.")
        return original, nullcontext
    peft_model = _peft_of(model)
    if peft_model is None:
        raise MoEUnlearnError(
            f"{attack} needs the routing of the model before unlearning, and this {type(model).__name__} has no "
            f"adapter to disable: pass original=<the base model> (e.g. the target a merged model was unlearned from)."
        )
    # The transformers model under the PEFT wrapper, run with the adapter disabled: the same call the unlearned
    # forward gets (PEFT's own forward would re-wrap the arguments).
    return unwrap_model(model), peft_model.disable_adapter


# ----------------------------------------------------------------------------------------------------------------
# Expert masking
# ----------------------------------------------------------------------------------------------------------------

_TOPK = (torch.topk, torch.Tensor.topk)
_LINEAR = (F.linear, torch._C._nn.linear)


class _MaskedRouting(TorchFunctionMode):
    """Active only while one router's forward runs: what decides that router's top-k treats the masked experts as
    absent, and the family's own code does the rest (softmax or sigmoid, bias correction, groups, renormalising).

    Two interceptions, written as a torch function mode because the routers of transformers 5.x compute logits and
    top-k inside one ``forward`` (no module boundary to hook between them):

    1. the router's logits (the first ``linear`` of the forward with ``num_experts`` outputs) get −inf at the masked
       experts: a softmax gives them probability 0 (the rest renormalised), a sigmoid affinity 0;
    2. every ``topk`` over the expert dimension ignores them: indices from the input with −inf at the masked experts,
       values gathered from the input itself. Needed where the choice adds a bias to the scores (DeepSeek-V3's
       ``e_score_correction_bias``, MiniMax-M2, LFM2, AFMoE, ERNIE's statistics), which −inf logits alone leave
       selectable; values from the unmasked input keep a masked expert's weight at its score (0), not −inf, when a
       layer has fewer unmasked experts than top-k.
    """

    def __init__(self, num_experts: int, masked: torch.Tensor) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.masked = masked  # [E] bool
        self.logits_masked = False

    def _mask(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.masked_fill(self.masked.to(tensor.device), float("-inf"))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LINEAR:
            out = func(*args, **kwargs)
            if not self.logits_masked and torch.is_tensor(out) and out.shape[-1] == self.num_experts:
                self.logits_masked = True
                out = self._mask(out)
            return out
        if func in _TOPK:
            values = args[0]
            dim = kwargs.get("dim", args[2] if len(args) > 2 else -1)
            if torch.is_tensor(values) and values.dim() > 0 and values.shape[dim] == self.num_experts \
                    and dim % values.dim() == values.dim() - 1:
                indices = func(self._mask(values), *args[1:], **kwargs)[1]
                return torch.return_types.topk((values.gather(-1, indices), indices))
        return func(*args, **kwargs)


@contextmanager
def mask_experts(model: nn.Module, experts: ExpertSelection | Mapping | str | os.PathLike | None = None) -> Iterator[ExpertMap]:
    """Inside the context, ``model`` routes no token to the masked experts (default: the ones its adapter edited,
    see :func:`edited_experts`); yields the ``{layer: [experts]}`` masked.

    Every router call is checked afterwards: a masked expert that still gets a non-zero gate weight, or a non-finite
    gate, is an error (the family's router did something the masking does not cover), never a silently wrong
    number. Masking every routed expert of a layer is refused: no expert would be left to route to.
    """
    masked = edited_experts(model, experts)
    layers = {layer.index: layer for layer in find_moe_layers(model)}
    for index, ids in masked.items():
        if len(ids) >= layers[index].num_experts:
            raise MoEUnlearnError(
                f"Expert masking would remove all {layers[index].num_experts} routed experts of layer {index}, "
                f"leaving no expert to route to (an adapter on every expert, e.g. the LoRA-on-all-experts baseline, "
                f"has no masking attack); mask a subset of that layer's experts."
            )
    handles = []
    try:
        for index, ids in masked.items():
            layer = layers[index]
            flags = torch.zeros(layer.num_experts, dtype=torch.bool)
            flags[ids] = True
            handles += _attach_mask(layer, flags)
        yield masked
    finally:
        for handle in handles:
            handle.remove()


def _attach_mask(layer: MoELayer, flags: torch.Tensor) -> list:
    modes: list[_MaskedRouting] = []

    def enter(module, args):
        mode = _MaskedRouting(layer.num_experts, flags)
        mode.__enter__()
        modes.append(mode)

    def leave(module, args, output):
        # always_call: runs (and pops the mode) also when the router's forward raised.
        mode = modes.pop()
        mode.__exit__(None, None, None)
        if not mode.logits_masked:
            raise MoEUnlearnError(
                f"Expert masking found no router logits in {layer.router_name} ({type(module).__name__}): its forward "
                f"made no linear map to the {layer.num_experts} expert scores, so the masking could not act on it."
            )
        routing = parse_router_output(output, layer)
        weights = routing.weights.float()
        on_masked = flags.to(routing.indices.device)[routing.indices] & (weights != 0)
        if bool(on_masked.any()) or not bool(torch.isfinite(weights).all()):
            raise MoEUnlearnError(
                f"Expert masking failed on {layer.router_name} ({layer.family}): a masked expert still gets a gate "
                f"weight, or a gate weight is not finite. This router's selection is not covered by the masking; "
                f"mask fewer experts of layer {layer.index} (its grouped routing may need more left per group)."
            )

    return [layer.router.register_forward_pre_hook(enter),
            layer.router.register_forward_hook(leave, always_call=True)]


# ----------------------------------------------------------------------------------------------------------------
# Routing restore
# ----------------------------------------------------------------------------------------------------------------


def _is_cache(value: Any) -> bool:
    return hasattr(value, "get_seq_length") and callable(getattr(value, "get_seq_length"))


class _RoutingRestore:
    """Hooks for :func:`restore_routing`: a pre-hook on the model runs the original on the same input first (its
    routers' top-k indices and gate weights recorded per layer), then hooks on the model's routers replace each
    router output's indices and weights with the recorded ones (the logits are left as they are)."""

    def __init__(self, model: nn.Module, original: nn.Module, context) -> None:
        self.base = unwrap_model(model)
        self.original = original
        self.context = context
        self.layers = find_moe_layers(self.base)
        self.original_layers = find_moe_layers(original)
        if [(l.index, l.num_experts, l.top_k) for l in self.layers] != \
                [(l.index, l.num_experts, l.top_k) for l in self.original_layers]:
            raise MoEUnlearnError("routing restore: original= has other MoE layers (index, experts, top-k) than the "
                                  "unlearned model; pass the model the unlearning started from.")
        self.recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.phase = "idle"  # "reference" while the original runs, "attack" while the unlearned model runs
        self.handles: list = []

    def attach(self) -> None:
        self.handles.append(self.base.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self.handles.append(self.base.register_forward_hook(self._after_forward, always_call=True))
        for layer in self.original_layers:
            self.handles.append(layer.router.register_forward_hook(self._recorder(layer)))
        for layer in self.layers:
            self.handles.append(layer.router.register_forward_hook(self._forcer(layer)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.recorded.clear()

    def _before_forward(self, module, args, kwargs):
        if self.phase != "idle":  # the reference forward of the same model (adapter disabled) re-enters here
            return None
        for value in (*args, *kwargs.values()):
            if _is_cache(value) and value.get_seq_length() > 0:
                raise MoEUnlearnError(
                    "routing restore needs the whole sequence in every forward (the original model is run on the same "
                    "input): it supports teacher-forced metrics (MCQ, NLL, perplexity, truth ratio); for generation "
                    "pass use_cache=False.")
        reference_kwargs = {k: (None if _is_cache(v) else v) for k, v in kwargs.items()}
        reference_kwargs["use_cache"] = False
        self.recorded.clear()
        self.phase = "reference"
        try:
            with torch.no_grad(), self.context():
                self.original(*args, **reference_kwargs)
        finally:
            self.phase = "attack"
        missing = [l.index for l in self.layers if l.index not in self.recorded]
        if missing:
            raise MoEUnlearnError(f"routing restore: the original model's routers of layers {missing} did not run.")
        return None

    def _after_forward(self, module, args, output):
        if self.phase == "attack":
            self.phase = "idle"
            self.recorded.clear()

    def _recorder(self, layer: MoELayer):
        def hook(module, inputs, output):
            if self.phase == "reference":
                routing = parse_router_output(output, layer)
                self.recorded[layer.index] = (routing.indices.detach().clone(), routing.weights.detach().clone())

        return hook

    def _forcer(self, layer: MoELayer):
        def hook(module, inputs, output):
            if self.phase != "attack":
                return None
            indices, weights = self.recorded[layer.index]
            routing = parse_router_output(output, layer)
            if routing.logits.shape[0] != indices.shape[0]:
                raise MoEUnlearnError(
                    f"routing restore: router {layer.router_name} saw {routing.logits.shape[0]} tokens, the original "
                    f"model's {indices.shape[0]}: the two models must be run on the same input.")
            return _forced_output(output, routing, indices, weights, layer)

        return hook


def _forced_output(output, routing, indices: torch.Tensor, weights: torch.Tensor, layer: MoELayer):
    """The router's output with its top-k indices and gate weights replaced, in the family's own layout."""
    if torch.is_tensor(output):
        # A router that returns logits only (an nn.Linear gate; the block takes softmax → top-k → renormalise):
        # logits log(w) on the forced experts and −inf elsewhere make that block pick exactly them, with gates w / Σw.
        forced = torch.full_like(routing.logits, float("-inf"))
        forced.scatter_(1, indices, weights.to(forced.dtype).clamp_min(1e-30).log())
        return forced.reshape(output.shape)
    items = list(output)
    weights_done = False
    for i, item in enumerate(items):
        if not torch.is_tensor(item):
            continue
        if not item.is_floating_point():
            items[i] = indices.to(item.dtype).reshape(item.shape)
        elif not weights_done and item.numel() == indices.numel() and item.shape[-1] == indices.shape[-1] \
                and item.data_ptr() != routing.logits.data_ptr():
            items[i] = weights.to(item.dtype).reshape(item.shape)
            weights_done = True
    if not weights_done:
        raise MoEUnlearnError(f"routing restore: cannot find the gate weights in the output of {layer.router_name}.")
    return tuple(items)


@contextmanager
def restore_routing(model: nn.Module, original: nn.Module | None = None) -> Iterator[None]:
    """Inside the context, every forward of ``model`` routes each token as the model before unlearning did: the
    original is run on the same input first and its per-layer top-k indices and gate weights replace ``model``'s.

    ``original``: the model before unlearning; default ``model`` with its adapter disabled (a PEFT model). Forwards
    must carry the whole sequence (teacher-forced scoring, or generation with ``use_cache=False``).
    """
    module, context = original_routing_source(model, original)
    restore = _RoutingRestore(model, module, context)
    restore.attach()
    try:
        yield
    finally:
        restore.detach()


# ----------------------------------------------------------------------------------------------------------------
# Forget metrics under attack (registered)
# ----------------------------------------------------------------------------------------------------------------


def _forget_metrics(model, tokenizer, forget_mcq, forget_texts, mcq_mode: str, add_special_tokens: bool,
                    batch_size: int) -> dict[str, float]:
    """Forget MCQ accuracy (as the bench reports it: choices mode, special tokens) and the forget texts' mean NLL."""
    from .mcq import mcq_accuracy
    from .memorization import perplexity

    out: dict[str, float] = {}
    if forget_mcq is not None:
        out["forget_mcq"] = mcq_accuracy(model, tokenizer, forget_mcq, mode=mcq_mode, batch_size=batch_size,
                                         add_special_tokens=add_special_tokens)["accuracy"]
    if forget_texts is not None:
        out["forget_nll"] = perplexity(model, tokenizer, list(forget_texts), batch_size=batch_size)["mean_nll"]
    return out


def _check_forget_sets(metric: str, forget_mcq, forget_texts) -> None:
    if forget_mcq is None and forget_texts is None:
        raise MoEUnlearnError(f"{metric}: give forget_mcq= (question/choices/answer rows) and/or forget_texts= "
                              f"(texts whose NLL to report); there is nothing to measure under the attack otherwise.")


def _under_attack(attack, model, tokenizer, forget_mcq, forget_texts, mcq_mode, add_special_tokens, batch_size,
                  compare: bool) -> tuple[dict[str, Any], Any]:
    args = (tokenizer, forget_mcq, forget_texts, mcq_mode, add_special_tokens, batch_size)
    result: dict[str, Any] = {}
    if compare:
        result.update({f"{k}_no_attack": v for k, v in _forget_metrics(model, *args).items()})
    with attack() as info:
        attacked = _forget_metrics(model, *args)
    result.update(attacked)
    if compare:
        for key, value in attacked.items():
            result[f"{key}_change"] = value - result[f"{key}_no_attack"]
    return result, info


@register_metric("expert_masking")
def expert_masking(
    model,
    tokenizer,
    forget_mcq: Sequence[Mapping[str, Any]] | None = None,
    forget_texts: Sequence[str] | None = None,
    *,
    experts: ExpertSelection | Mapping | str | os.PathLike | None = None,
    mcq_mode: str = "choices",
    add_special_tokens: bool = True,
    batch_size: int = 8,
    compare: bool = True,
) -> dict[str, Any]:
    """Forget metrics with the edited experts masked out of routing (see :func:`mask_experts`).

    Returns ``forget_mcq`` (accuracy; ``forget_mcq`` rows given) and ``forget_nll`` (mean per-token NLL;
    ``forget_texts`` given) under the attack, with ``compare`` also ``*_no_attack`` and ``*_change`` (attacked −
    unattacked: a rise of forget MCQ / fall of NLL means knowledge came back), and ``masked`` ({layer: experts}).
    """
    _check_forget_sets("expert_masking", forget_mcq, forget_texts)
    edited_experts(model, experts)  # a model without edited experts is refused before any evaluation runs
    result, masked = _under_attack(lambda: mask_experts(model, experts), model, tokenizer, forget_mcq, forget_texts,
                                   mcq_mode, add_special_tokens, batch_size, compare)
    result["masked"] = {str(k): v for k, v in masked.items()}
    return result


@register_metric("routing_restore")
def routing_restore(
    model,
    tokenizer,
    forget_mcq: Sequence[Mapping[str, Any]] | None = None,
    forget_texts: Sequence[str] | None = None,
    *,
    original: nn.Module | None = None,
    mcq_mode: str = "choices",
    add_special_tokens: bool = True,
    batch_size: int = 8,
    compare: bool = True,
) -> dict[str, Any]:
    """Forget metrics with every token routed as the model before unlearning routed it (see
    :func:`restore_routing`): same keys as :func:`expert_masking`, without ``masked``."""
    _check_forget_sets("routing_restore", forget_mcq, forget_texts)
    original_routing_source(model, original)  # refused before any evaluation runs

    @contextmanager
    def attack():
        with restore_routing(model, original):
            yield None

    result, _ = _under_attack(attack, model, tokenizer, forget_mcq, forget_texts, mcq_mode, add_special_tokens,
                              batch_size, compare)
    return result
