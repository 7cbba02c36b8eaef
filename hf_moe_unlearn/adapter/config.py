"""Build the PEFT ``LoraConfig`` of an expert-selective adapter, and read the selection back from one.

The config returned here is the *standard* one: what ``adapter_config.json`` holds and what plain PEFT loads.

- Fused experts (transformers 5.x, 3-D tensors): LoRA through ``target_parameters`` on the selected layers' expert
  tensors (PEFT's ``ParamWrapper``). PEFT cannot restrict that to some experts, so the saved adapter carries zero
  deltas for the unselected ones (see :mod:`.convert`).
- ``nn.ModuleList`` experts (older / remote-code checkpoints): LoRA on the selected experts' ``Linear`` weights, by
  full name, also through ``target_parameters``. ``target_modules`` would be the obvious choice, but on ``mixtral`` and
  ``qwen2_moe`` model types PEFT rewrites ``w1/w2/w3`` / ``gate_proj``... targets into fused ``gate_up_proj`` targets
  (its transformers-v4 -> v5 conversion) and then finds nothing. ``target_parameters`` is left alone.
- Full-parameter mode (what the SEUF paper trained): no LoRA at all, the changed modules are saved whole through
  ``modules_to_save`` (the selected layers' experts modules, or the selected experts of a ``ModuleList``), with PEFT's
  own ``"dummy-target-modules"`` marker, which is how PEFT spells "no LoRA target on purpose".
- Routers of the selected layers: ``modules_to_save`` (trained fully, as SEUF does; they are tiny).

The selection travels inside ``auto_mapping``: a free-form dict PEFT keeps through ``from_pretrained`` and re-saving
(checked on peft 0.21). PEFT only reads its ``base_model_class``/``parent_library`` keys, and only when ``task_type``
is None; we always set ``task_type="CAUSAL_LM"`` and keep those two keys valid anyway. An extra top-level key would
survive in the file too, but plain PEFT drops it on load with an "upgrade PEFT" warning that would mislead users.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from peft import LoraConfig
from torch import nn

from ..errors import MoEUnlearnError
from ..moe.layers import MoELayer, unwrap_model
from ..routing.selection import ExpertSelection

#: Key under ``LoraConfig.auto_mapping`` that holds everything hf-moe-unlearn needs to rebuild the adapter.
META_KEY = "hf_moe_unlearn"
#: Version of what is stored under :data:`META_KEY`; bump when its meaning changes.
FORMAT_VERSION = 1
#: PEFT's marker for "this LoRA config intentionally targets no module" (``peft.utils.constants.DUMMY_TARGET_MODULES``;
#: spelled out because older peft releases do not export it from ``peft.utils``).
DUMMY_TARGET_MODULES = "dummy-target-modules"
MODES = ("lora", "full")

# LoraConfig options that make sense here; everything else (targets, dropout, DoRA, ...) is either set by us or does
# not work with PEFT's ParamWrapper (which raises for dropout, DoRA, lora_bias, fan_in_fan_out).
_ALLOWED_LORA_KWARGS = {"use_rslora", "init_lora_weights", "inference_mode", "base_model_name_or_path", "revision"}
_MUST_BE = {"lora_dropout": 0.0, "bias": "none", "use_dora": False, "lora_bias": False, "fan_in_fan_out": False}


def resolve_selection(
    model: nn.Module, selection: ExpertSelection | Mapping | str | os.PathLike
) -> tuple[ExpertSelection, dict[int, MoELayer]]:
    """Coerce ``selection`` and validate it against ``model``: ``(selection, {layer index: MoELayer})``.

    Every bad input (unknown layer or expert, empty selection, a selection computed on another model, a shared expert
    named instead of a routed id, a model that is already a PEFT model) fails here, before anything is built or trained.
    """
    if hasattr(model, "peft_config"):
        raise MoEUnlearnError(
            "The model already carries a PEFT adapter. Pass the plain transformers model (e.g. "
            "`peft_model.get_base_model()` after `unload()`), not a PeftModel."
        )
    try:
        sel = ExpertSelection.coerce(selection)
    except MoEUnlearnError:
        raise
    except (TypeError, ValueError) as exc:
        raise MoEUnlearnError(
            f"Cannot read the expert selection ({exc}). Give {{layer index: [routed expert ids]}} with integer ids; "
            "shared experts are always active, have no id and are never selectable."
        ) from exc
    layers = sel.validate(model)
    for layer in layers.values():
        _check_layout(layer)
    return sel, layers


def _check_layout(layer: MoELayer) -> None:
    """Fail early for an experts module whose weights we cannot adapt exactly."""
    if not layer.fused:
        return
    experts = layer.experts
    weights = [n for n, p in experts.named_parameters(recurse=False) if p.dim() == 3]
    if len(weights) != 2 or "down_proj" not in weights:
        raise MoEUnlearnError(
            f"Layer {layer.index} ({type(experts).__name__}) keeps its experts as {weights}; expert LoRA needs an "
            "up projection (gate_up_proj or up_proj) and a down_proj. This family is not supported yet."
        )
    if getattr(experts, "_is_expert_parallel", False):
        raise MoEUnlearnError(
            f"Layer {layer.index} is expert-parallel; expert-selective training needs every expert on the device. "
            "Load the model without expert parallelism."
        )


def expert_weight_names(layer: MoELayer) -> list[str]:
    """The 3-D expert tensors of a fused layer, in declaration order (up projection first, then ``down_proj``)."""
    return [n for n, p in layer.experts.named_parameters(recurse=False) if p.dim() == 3]


def expert_bias_names(layer: MoELayer) -> list[str]:
    """The per-expert bias tensors ([E, out]) of a fused layer (GPT-OSS), matching :func:`expert_weight_names`."""
    names = {n for n, _ in layer.experts.named_parameters(recurse=False)}
    return [f"{w}_bias" for w in expert_weight_names(layer) if f"{w}_bias" in names]


def modulelist_linear_names(layer: MoELayer, expert: int) -> list[str]:
    """Full names of the ``nn.Linear`` modules of one expert of a ``ModuleList`` layer (e.g. its w1, w2, w3)."""
    prefix = f"{layer.experts_name}.{expert}"
    return [f"{prefix}.{n}" for n, m in layer.experts[expert].named_modules() if isinstance(m, nn.Linear)]


def _lora_targets(layer: MoELayer, experts: list[int]) -> list[str]:
    if layer.fused:
        return [f"{layer.experts_name}.{name}" for name in expert_weight_names(layer)]
    return [f"{name}.weight" for e in experts for name in modulelist_linear_names(layer, e)]


def _full_targets(layer: MoELayer, experts: list[int]) -> list[str]:
    if layer.fused:  # the whole experts module: PEFT has no way to save part of a tensor
        return [layer.experts_name]
    return [f"{layer.experts_name}.{e}" for e in experts]


def _check_lora_kwargs(r: int, lora_alpha: float, mode: str, lora_kwargs: dict[str, Any]) -> dict[str, Any]:
    if mode not in MODES:
        raise MoEUnlearnError(f"mode must be one of {MODES} ('lora': LoRA on the selected experts; 'full': their "
                              f"full weights, as the SEUF paper), got {mode!r}.")
    if not isinstance(r, int) or r <= 0:
        raise MoEUnlearnError(f"The LoRA rank r must be a positive integer, got {r!r}.")
    if not lora_alpha or lora_alpha <= 0:
        raise MoEUnlearnError(f"lora_alpha must be positive, got {lora_alpha!r}.")
    extra = {}
    for key, value in lora_kwargs.items():
        if key in _MUST_BE:
            if value != _MUST_BE[key]:
                raise MoEUnlearnError(
                    f"{key}={value!r} is not supported for expert LoRA: PEFT's 3-D expert adapter (ParamWrapper) "
                    f"cannot express it, so the saved adapter would not reproduce training. Use {key}={_MUST_BE[key]!r}."
                )
        elif key in _ALLOWED_LORA_KWARGS:
            extra[key] = value
        else:
            raise MoEUnlearnError(
                f"LoraConfig option {key!r} is not supported here: targets, modules_to_save and patterns are derived "
                f"from the expert selection. Supported extra options: {sorted(_ALLOWED_LORA_KWARGS)}."
            )
    if extra.get("init_lora_weights", True) not in (True, False, "gaussian"):
        raise MoEUnlearnError("init_lora_weights must be True, False or 'gaussian' for expert LoRA.")
    return extra


def expert_lora_config(
    model: nn.Module,
    selection: ExpertSelection | Mapping | str | os.PathLike,
    r: int = 8,
    lora_alpha: float = 16,
    train_router: bool = True,
    *,
    mode: str = "lora",
    **lora_kwargs: Any,
) -> LoraConfig:
    """The standard PEFT ``LoraConfig`` of an adapter that changes only the selected experts (and routers).

    Args:
        model: the plain transformers model the selection refers to.
        selection: an :class:`ExpertSelection`, a ``{layer: [experts]}`` mapping or a path to a saved selection.
        r, lora_alpha: LoRA rank and alpha (scaling ``lora_alpha / r``, or ``/ sqrt(r)`` with ``use_rslora=True``).
        train_router: also train the routers of the selected layers (SEUF's anchor loss needs them).
        mode: ``"lora"`` (default) or ``"full"`` (full weights of the selected experts, as the SEUF paper).
        lora_kwargs: ``use_rslora``, ``init_lora_weights`` (True, False or "gaussian"), ``inference_mode``, ...

    The selection (and mode, router flag) is stored in ``config.auto_mapping["hf_moe_unlearn"]``; read it back with
    :func:`selection_from_config`.
    """
    sel, layers = resolve_selection(model, selection)
    extra = _check_lora_kwargs(r, lora_alpha, mode, lora_kwargs)
    target_parameters: list[str] = []
    modules_to_save: list[str] = []
    for index, layer in layers.items():
        experts = sel.experts[index]
        if mode == "lora":
            target_parameters += _lora_targets(layer, experts)
        else:
            modules_to_save += _full_targets(layer, experts)
        if train_router:
            modules_to_save.append(layer.router_name)
    base = unwrap_model(model)
    meta = {
        "format_version": FORMAT_VERSION,
        "selection": sel.to_dict(),
        "mode": mode,
        "train_router": bool(train_router),
        "fused": {str(i): layer.fused for i, layer in layers.items()},
    }
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=[] if target_parameters else DUMMY_TARGET_MODULES,
        target_parameters=target_parameters or None,
        modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM",
        auto_mapping={"base_model_class": type(base).__name__, "parent_library": type(base).__module__, META_KEY: meta},
        **extra,
    )


def adapter_metadata(config: LoraConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The hf-moe-unlearn block of a config (a ``LoraConfig`` or the dict of an ``adapter_config.json``)."""
    auto_mapping = config.get("auto_mapping") if isinstance(config, Mapping) else getattr(config, "auto_mapping", None)
    meta = (auto_mapping or {}).get(META_KEY)
    if not isinstance(meta, Mapping) or "selection" not in meta:
        raise MoEUnlearnError(
            "This adapter config carries no expert selection (auto_mapping['hf_moe_unlearn'] is missing): it was not "
            "written by hf-moe-unlearn. Load it with plain `peft.PeftModel.from_pretrained` instead."
        )
    if int(meta.get("format_version", 1)) > FORMAT_VERSION:
        raise MoEUnlearnError(
            f"Adapter format version {meta['format_version']} is newer than this hf-moe-unlearn supports "
            f"({FORMAT_VERSION}); upgrade hf-moe-unlearn."
        )
    return dict(meta)


def selection_from_config(config: LoraConfig | Mapping[str, Any]) -> ExpertSelection:
    """The :class:`ExpertSelection` recorded in an expert adapter's config."""
    return ExpertSelection.from_dict(adapter_metadata(config)["selection"])
