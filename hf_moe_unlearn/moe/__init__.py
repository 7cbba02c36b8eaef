"""Discovery of MoE layers (router, experts, shared experts) across transformers model families."""

from .layers import MoELayer, NotAnMoEModelError, config_fingerprint, find_moe_layers, supported_families, unwrap_model
from .tiny import CORE_FAMILIES, TINY_CONFIGS, tiny_modulelist_moe_model, tiny_moe_config, tiny_moe_model

__all__ = [
    "MoELayer",
    "NotAnMoEModelError",
    "config_fingerprint",
    "find_moe_layers",
    "supported_families",
    "unwrap_model",
    "CORE_FAMILIES",
    "TINY_CONFIGS",
    "tiny_moe_config",
    "tiny_moe_model",
    "tiny_modulelist_moe_model",
]
