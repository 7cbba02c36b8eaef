"""Losses for MoE unlearning: a registry of forget, retain, router and weighting losses.

``get_loss("npo", kind="forget")(ctx)`` computes a registered loss on a :class:`LossContext`;
``@register_loss(name, kind=...)`` adds your own. The math lives in :mod:`.functional` as pure tensor
functions; importing this package registers the built-ins (:mod:`.builtin`): forget ``ga``, ``npo``,
``simnpo``, ``rmu``, ``idk_nll``, ``idk_dpo``, ``dpo``, ``undial``, ``wga``, ``satimp``, ``ceu``; retain ``nll``,
``kl``, ``rmu_retain``; router ``seuf_anchor``;
weighting ``trace``.
"""

from . import builtin as _builtin  # noqa: F401  (registers the built-in losses)
from . import functional
from .builtin import trace_retain_shares
from .context import LOSS_DEFAULTS, REQUIREMENTS, LossContext
from .functional import (
    IGNORE_INDEX,
    ceu_loss,
    dpo_loss,
    drop_first_answer_tokens,
    ga_loss,
    kl_loss,
    nll_loss,
    npo_loss,
    prediction_mask,
    rmu_control_vector,
    rmu_forget_loss,
    rmu_retain_loss,
    router_scores,
    routing_share,
    satimp_loss,
    sequence_nll,
    seuf_anchor_loss,
    simnpo_loss,
    token_nll,
    topk_masked_scores,
    trace_token_weights,
    undial_loss,
    wga_loss,
)
from .registry import (
    LOSS_KINDS,
    REFERENCE_USES,
    LossSpec,
    RegisteredLoss,
    get_loss,
    get_loss_spec,
    list_losses,
    register_loss,
    unregister_loss,
)

__all__ = [
    "IGNORE_INDEX",
    "LOSS_DEFAULTS",
    "LOSS_KINDS",
    "REFERENCE_USES",
    "REQUIREMENTS",
    "LossContext",
    "LossSpec",
    "RegisteredLoss",
    "ceu_loss",
    "dpo_loss",
    "drop_first_answer_tokens",
    "functional",
    "ga_loss",
    "get_loss",
    "get_loss_spec",
    "kl_loss",
    "list_losses",
    "nll_loss",
    "npo_loss",
    "prediction_mask",
    "register_loss",
    "rmu_control_vector",
    "rmu_forget_loss",
    "rmu_retain_loss",
    "router_scores",
    "routing_share",
    "satimp_loss",
    "sequence_nll",
    "seuf_anchor_loss",
    "simnpo_loss",
    "token_nll",
    "topk_masked_scores",
    "trace_retain_shares",
    "trace_token_weights",
    "undial_loss",
    "unregister_loss",
    "wga_loss",
]
