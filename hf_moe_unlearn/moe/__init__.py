"""Discovery of MoE layers (router, experts, shared experts) across transformers model families."""

from .layers import (
    MoELayer,
    NotAnMoEModelError,
    config_fingerprint,
    find_moe_layers,
    register_router_score_fn,
    supported_families,
    unwrap_model,
    unwrap_router,
)
from .tiny import CORE_FAMILIES, TINY_CONFIGS, tiny_modulelist_moe_model, tiny_moe_config, tiny_moe_model

__all__ = [
    "MoELayer",
    "NotAnMoEModelError",
    "config_fingerprint",
    "find_moe_layers",
    "register_router_score_fn",
    "unwrap_router",
    "supported_families",
    "unwrap_model",
    "CORE_FAMILIES",
    "TINY_CONFIGS",
    "tiny_moe_config",
    "tiny_moe_model",
    "tiny_modulelist_moe_model",
]
