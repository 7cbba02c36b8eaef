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

STATS_SCHEMA_VERSION = 1


@dataclass
class ExpertStats:
    """Per-layer, per-expert routing statistics over the counted tokens of a dataset.

    Row ``i`` of each ``[layer][expert]`` table belongs to decoder layer ``layers[i]``. See
    :class:`~hf_moe_unlearn.routing.recorder.RouterRecorder` for what each accumulator holds.
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

    def seuf_scores(self, layer: int) -> np.ndarray:
        """SEUF Eq. 2: s(l, e) = 1/Z Σ_j 1/L_j Σ_t g(l, e, t), g the top-k-masked gate weight."""
        return self._row(self.seq_gate_mean_sum, layer) / max(self.sequences, 1.0)

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
        data = dict(data)
        data.pop("schema_version", None)
        return cls(**data)

    def save(self, path: str | os.PathLike) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ExpertStats":
        with open(path) as f:
            return cls.from_dict(json.load(f))
