"""DeepSpeed ZeRO-3 set-up for expert-selective unlearning (what :class:`MoEUnlearnTrainer` does before training).

ZeRO-3 partitions every parameter over the processes and gathers a module's parameters around its forward and
backward. Two facts, measured with DeepSpeed 0.19.8 on transformers 5.24 (docs/distributed.md), decide what has
to be done for MoE models:

- **Leaf modules break this trainer.** DeepSpeed can treat a module as a "leaf": all its parameters are gathered on
  entry and their gradients are reduced by a backward hook of that module. That hook runs once per *call* of the
  module, so the forget and retain forwards of one step reduce the block's gradients twice (``AssertionError`` in
  ``__reduce_and_partition_ipg_grads``, even for a plain fully-trained model), and it can run before autograd has
  accumulated the LoRA gradients of the selected experts (``The size of tensor a (0) must match ...`` in
  ``AccumulateGrad``). DeepSpeed makes the Mixtral, Qwen2-MoE and Qwen3-MoE blocks leaves *by default*
  (``zero_optimization.leaf_module``), and accelerate's ``deepspeed_moe_layer_cls_names`` adds more.
- **Fused experts do not need them.** Leaves exist for experts kept as one module per expert, called only when a
  token is routed to it: processes would then gather different parameters and hang. transformers 5 keeps the
  experts of every family in one module with 3-D tensors, called once per forward on every process whatever the
  routing, so every process gathers the same parameters in the same order.

So for fused experts the leaf list is emptied (DeepSpeed's defaults included) and a user's
``deepspeed_moe_layer_cls_names`` is refused with the reason; ``nn.ModuleList`` experts (remote-code checkpoints)
are refused under ZeRO-3: without leaves they can hang, with leaves they fail as above. ZeRO-1/2 (parameters not
partitioned) need none of this.

The model must also reach the trainer whole: under a ZeRO-3 config transformers partitions a model at load time
(``zero.Init``) whenever it is loaded after the ``TrainingArguments`` were built, even with ``zero3_init_flag:
false``; the selection, the attribution pass and the adapter need the real shapes. :func:`no_zero3_init` loads it
whole; the engine partitions it when training starts.

Nothing here imports DeepSpeed: everything is read off the config dicts and the parameters' ``ds_*`` attributes.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Iterator

from torch import nn

from .errors import MoEUnlearnError
from .moe.layers import find_moe_layers, unwrap_model

logger = logging.getLogger(__name__)

#: The accelerate setting (config key ``deepspeed_moe_layer_cls_names``) that makes classes ZeRO-3 leaf modules.
MOE_LAYER_ENV = "ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES"
#: DeepSpeed's own leaf-module list (``zero_optimization.leaf_module``), emptied for fused experts.
NO_LEAF_MODULES: dict[str, list[str]] = {"classes": [], "names": [], "name_suffixes": []}


def zero_stage(deepspeed_plugin: Any) -> int | None:
    """The ZeRO stage of an accelerate ``DeepSpeedPlugin`` (``TrainingArguments.deepspeed_plugin``), or None."""
    if deepspeed_plugin is None:
        return None
    stage = (getattr(deepspeed_plugin, "deepspeed_config", None) or {}).get("zero_optimization", {}).get("stage")
    return int(stage) if isinstance(stage, (int, str)) and str(stage).isdigit() else None


def is_zero3_partitioned(model: nn.Module) -> bool:
    """Whether DeepSpeed has already partitioned ``model``'s parameters (``zero.Init`` at load, or an engine)."""
    return any(hasattr(param, "ds_id") for param in model.parameters())


def check_not_partitioned(model: nn.Module) -> None:
    """Refuse a model whose parameters ZeRO-3 already partitioned (each process holds a flat slice, shape ``[0]``)."""
    if is_zero3_partitioned(model):
        raise MoEUnlearnError(
            "The model's parameters are already partitioned by DeepSpeed ZeRO-3: transformers loads a model with "
            "zero.Init whenever a ZeRO-3 config is active (it is once MoEUnlearnConfig/TrainingArguments exist), "
            "and the expert selection and the adapter need the whole model. Load it inside "
            "`with hf_moe_unlearn.deepspeed_support.no_zero3_init(): model = AutoModelForCausalLM.from_pretrained"
            "(...)` (or before building the config); the engine partitions it when training starts."
        )


@contextmanager
def no_zero3_init() -> Iterator[None]:
    """Load models whole inside this context although a ZeRO-3 config is active.

    transformers decides to partition at load time by ``is_deepspeed_zero3_enabled()``, i.e. by whether a ZeRO-3
    config is registered at all; accelerate's ``zero3_init_flag: false`` does not change that on transformers
    5.24. The registration is lifted for the duration of the context and put back afterwards (the Trainer's save
    and gather paths read it).
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    config = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None:
            hf_deepspeed.set_hf_deepspeed_config(config)


def _requested_leaf_classes(deepspeed_plugin: Any) -> list[str]:
    names = getattr(deepspeed_plugin, "transformer_moe_cls_names", None) or os.environ.get(MOE_LAYER_ENV) or ""
    return [n.strip() for n in str(names).split(",") if n.strip()]


def configure_zero3(model: nn.Module, args: Any) -> bool:
    """Make a ZeRO-3 run of ``model`` work, or stop with the reason; True when ZeRO-3 is on.

    Called by :class:`MoEUnlearnTrainer` first thing (before the model is read): with ``args.deepspeed_plugin``
    at ZeRO stage 3 it refuses an already partitioned model, ``nn.ModuleList`` experts and a requested leaf
    class, and empties DeepSpeed's leaf-module list in the config the engine will be built from (the plugin's
    ``deepspeed_config`` is the dict accelerate passes to ``deepspeed.initialize``).
    """
    plugin = getattr(args, "deepspeed_plugin", None)
    if zero_stage(plugin) != 3:
        return False
    check_not_partitioned(model)
    layers = find_moe_layers(model)
    listed = sorted({type(layer.block).__name__ for layer in layers if not layer.fused})
    if listed:
        raise MoEUnlearnError(
            f"DeepSpeed ZeRO-3 cannot train {', '.join(listed)}: its experts are one module each (an "
            f"nn.ModuleList), run only for the tokens routed to them, so the processes would gather different "
            f"parameters and hang unless the block is a ZeRO-3 leaf module, and DeepSpeed's leaf modules reduce "
            f"gradients once per call of the block, which the forget and retain forwards of a step and the "
            f"experts' LoRA break. Use DDP or FSDP (examples/accelerate/), or ZeRO stage 1/2."
        )
    requested = _requested_leaf_classes(plugin)
    if requested:
        raise MoEUnlearnError(
            f"deepspeed_moe_layer_cls_names={','.join(requested)} makes those modules ZeRO-3 leaves; DeepSpeed then "
            f"reduces their gradients once per call, which breaks this trainer (two forwards per step, LoRA on the "
            f"selected experts). {type(unwrap_model(model)).__name__} keeps its experts fused (one module, called "
            f"once per forward on every process), so ZeRO-3 needs no leaf here: remove deepspeed_moe_layer_cls_names "
            f"from the accelerate config (see examples/accelerate/zero3.yaml)."
        )
    zero = plugin.deepspeed_config.setdefault("zero_optimization", {})
    user = zero.get("leaf_module")
    if user and any(user.get(key) for key in NO_LEAF_MODULES):
        raise MoEUnlearnError(
            f"zero_optimization.leaf_module={user} in the DeepSpeed config makes modules ZeRO-3 leaves, which breaks "
            f"this trainer (gradients reduced once per call of the module); remove it: fused experts need none."
        )
    zero["leaf_module"] = dict(NO_LEAF_MODULES)  # also turns off DeepSpeed's default MoE leaf classes
    logger.info("ZeRO-3: fused experts, no ZeRO-3 leaf modules (DeepSpeed's default MoE leaf classes turned off)")
    return True
