"""``ExpertStats``: routing statistics of one dataset on one model, saved as JSON.

Plain lists (not tensors) so a statistics file is readable, diffable and loads without torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from torch import nn

from ..errors import MoEUnlearnError
from ..moe.layers import config_fingerprint

#: 2 added ``seq_masked_prob_mean_sum`` (SEUF Eq. 2 on the paper's g); version-1 files still load without it.
STATS_SCHEMA_VERSION = 2

#: What SEUF Eq. 2 averages per token (``ExpertStats.seuf_scores(score=...)``):
#: ``masked_softmax`` — the paper's g, the full router probability kept on the token's top-k, not renormalised;
#: ``gate`` — the gate weight as the model applies it (renormalised over the top-k by Mixtral, GPT-OSS and
#: ``norm_topk_prob=True``; scaled by DeepSeek-V3's ``routed_scaling_factor``; PhiMoE's sparsemixer).
SEUF_SCORES = ("masked_softmax", "gate")


def check_seuf_score(score: str) -> str:
    """Return ``score`` if it names a SEUF Eq. 2 score, else raise saying which exist."""
    if score not in SEUF_SCORES:
        raise MoEUnlearnError(
            f"Unknown SEUF score {score!r}; use one of: {', '.join(SEUF_SCORES)} ('masked_softmax' is the paper's "
            f"top-k-masked router probability, 'gate' the gate weight the model applies)."
        )
    return score


@dataclass
class ExpertStats:
    """Per-layer, per-expert routing statistics over the counted tokens of a dataset.

    Row ``i`` of each ``[layer][expert]`` table belongs to decoder layer ``layers[i]``. See
    :class:`~hf_moe_unlearn.routing.recorder.RouterRecorder` for what each accumulator holds.
    ``seq_masked_prob_mean_sum`` is None for statistics saved before schema version 2.
    """

    layers: list[int]
    num_experts: list[int]
    top_k: list[int]
    hits: list[list[float]]
    prob_sum: list[list[float]]
    gate_sum: list[list[float]]
    seq_gate_mean_sum: list[list[float]]
    tokens: float
    sequences: float
    model_fingerprint: str
    model_name: str = ""
    dataset: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    seq_masked_prob_mean_sum: list[list[float]] | None = None

    # --- derived quantities ---------------------------------------------------------------------------
    def _row(self, table: list[list[float]], layer: int) -> np.ndarray:
        try:
            return np.asarray(table[self.layers.index(layer)], dtype=np.float64)
        except ValueError:
            raise MoEUnlearnError(f"Layer {layer} has no statistics; recorded layers: {self.layers}.") from None

    def frequency(self, layer: int) -> np.ndarray:
        """f(l, e): fraction of counted tokens whose top-k at ``layer`` contains expert e (sums to top-k)."""
        return self._row(self.hits, layer) / max(self.tokens, 1.0)

    def mean_probability(self, layer: int) -> np.ndarray:
        """Mean full router probability of each expert over counted tokens."""
        return self._row(self.prob_sum, layer) / max(self.tokens, 1.0)

    def mean_gate(self, layer: int) -> np.ndarray:
        """Mean top-k gate weight of each expert over counted tokens (zero where not routed)."""
        return self._row(self.gate_sum, layer) / max(self.tokens, 1.0)

    def seuf_scores(self, layer: int, score: str = "masked_softmax") -> np.ndarray:
        """SEUF Eq. 2: s(l, e) = 1/Z Σ_j 1/L_j Σ_t g(l, e, t), each sequence's mean then the mean over sequences.

        ``score="masked_softmax"`` (the paper's): g is the router probability (softmax; normalised sigmoid for
        sigmoid routers) where e is in token t's top-k, 0 elsewhere — not renormalised, so a confident choice
        counts more than a near-tie. ``score="gate"``: g is the gate weight the model applies, which ranks
        differently where the model renormalises or scales the top-k.
        """
        check_seuf_score(score)
        if score == "gate":
            table = self.seq_gate_mean_sum
        elif self.seq_masked_prob_mean_sum is None:
            raise MoEUnlearnError(
                "These routing statistics have no top-k-masked router probabilities (seq_masked_prob_mean_sum: "
                "saved before stats schema version 2), which SEUF's default score='masked_softmax' needs. "
                "Recompute the statistics with attribute_experts, or ask for score='gate'."
            )
        else:
            table = self.seq_masked_prob_mean_sum
        return self._row(table, layer) / max(self.sequences, 1.0)

    def frequency_table(self) -> np.ndarray:
        """[L, E] matrix of :meth:`frequency` (layers in ``self.layers`` order)."""
        return np.stack([self.frequency(layer) for layer in self.layers])

    # --- model checks and serialisation -------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Raise if these statistics were computed on a model with another architecture config."""
        fingerprint = config_fingerprint(model)
        if fingerprint != self.model_fingerprint:
            raise MoEUnlearnError(
                f"These routing statistics were computed on another model ({self.model_name or 'unknown'}, config "
                f"fingerprint {self.model_fingerprint}); this model's fingerprint is {fingerprint}. Recompute them "
                f"with attribute_experts on this model."
            )

    def check_compatible(self, other: "ExpertStats") -> None:
        """Raise unless ``other`` comes from the same model and layers (e.g. forget vs retain statistics)."""
        if other.model_fingerprint != self.model_fingerprint or other.layers != self.layers:
            raise MoEUnlearnError(
                "Forget and retain statistics come from different models or layers; compute both on the same model."
            )

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": STATS_SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExpertStats":
        """Read :meth:`to_dict`'s output; version-1 data (no ``seq_masked_prob_mean_sum``) loads with it None."""
        data = dict(data)
        version = data.pop("schema_version", 1)
        if version > STATS_SCHEMA_VERSION:
            raise MoEUnlearnError(
                f"Routing statistics schema version {version} is newer than this hf-moe-unlearn supports "
                f"({STATS_SCHEMA_VERSION}); upgrade hf-moe-unlearn or recompute them with attribute_experts."
            )
        return cls(**data)

    def save(self, path: str | os.PathLike) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ExpertStats":
        with open(path) as f:
            return cls.from_dict(json.load(f))
