"""hf-moe-unlearn: machine unlearning for Mixture-of-Experts language models on the Hugging Face stack.

The public API is listed in ``__all__``. Names are imported lazily, so ``import hf_moe_unlearn`` stays cheap and
the parts that need only torch/transformers/peft (routing, adapters) work where trl, datasets or evaluate are
not installed (e.g. a GPU box used for benchmarks).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # errors
    "MoEUnlearnError": "errors",
    # MoE architecture support
    "MoELayer": "moe.layers",
    "NotAnMoEModelError": "moe.layers",
    "find_moe_layers": "moe.layers",
    "supported_families": "moe.layers",
    "config_fingerprint": "moe.layers",
    "register_router_score_fn": "moe.layers",
    "tiny_moe_model": "moe.tiny",
    "tiny_moe_config": "moe.tiny",
    # routing statistics and attribution
    "RouterRecorder": "routing.recorder",
    "ExpertStats": "routing.stats",
    "ExpertSelection": "routing.selection",
    "attribute_experts": "routing.attribution",
    "select_seuf": "routing.attribution",
    "select_trace": "routing.attribution",
    "select_explicit": "routing.attribution",
    "GripProjection": "routing.grip",
    # adapters
    "get_expert_peft_model": "adapter",
    "expert_lora_config": "adapter",
    "ExpertPeftModel": "adapter",
    "build_model_card": "adapter",
    # training
    "MoEUnlearnConfig": "config",
    "DEFAULT_LEARNING_RATES": "config",
    "default_learning_rate": "config",
    "MoEUnlearnTrainer": "trainer",
    # losses
    "register_loss": "losses.registry",
    "get_loss": "losses.registry",
    "list_losses": "losses.registry",
    "LossContext": "losses.context",
    # evaluation
    "register_metric": "evaluation.registry",
    "get_metric": "evaluation.registry",
    "list_metrics": "evaluation.registry",
    "mask_experts": "evaluation.attacks",
    "restore_routing": "evaluation.attacks",
    "routing_stability": "evaluation.routing",
    "evaluate_model": "evaluation.harness",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_moe_unlearn' has no attribute '{name}'")


def __dir__() -> list[str]:
    return __all__
