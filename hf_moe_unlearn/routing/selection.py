"""``ExpertSelection``: which experts of which layers an unlearning run may change, and why.

A selection is the hand-off between attribution (``attribute_experts`` + a strategy) and training (LoRA or
full tuning of those experts only). It is plain data that serialises to JSON, records the model it was
computed on (config fingerprint) and validates itself against a model before anything trains.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ..errors import MoEUnlearnError
from ..moe.layers import MoELayer, config_fingerprint, find_moe_layers

SELECTION_FILE = "selection.json"
SCHEMA_VERSION = 1


@dataclass
class ExpertSelection:
    """Selected experts per MoE layer.

    Attributes:
        experts: ``{layer index: [expert ids]}``, layer = decoder layer index, experts = routed expert ids.
        method: how it was chosen: ``"seuf"``, ``"trace"`` or ``"explicit"``.
        scores: ``{layer: {expert: score}}`` for the selected experts (the value the strategy ranked by).
        stats: extra per-expert statistics behind the choice, e.g. TRACE's ``f_forget``/``f_retain``/``ratio``:
            ``{name: {layer: {expert: value}}}``.
        model_fingerprint: :func:`config_fingerprint` of the model it was computed on (None for a hand-written one).
        params: the strategy's parameters (top-M, τ, ρ, ...), for the record.
    """

    experts: dict[int, list[int]]
    method: str = "explicit"
    scores: dict[int, dict[int, float]] = field(default_factory=dict)
    stats: dict[str, dict[int, dict[int, float]]] = field(default_factory=dict)
    model_fingerprint: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.experts = _expert_mapping(self.experts)
        self.experts = {layer: ids for layer, ids in sorted(self.experts.items()) if ids}
        self.scores = _int_keys(_mapping(self.scores, "scores"), "scores")
        self.stats = {name: _int_keys(table, f"stats.{name}") for name, table in _mapping(self.stats, "stats").items()}
        if not isinstance(self.method, str):
            raise MoEUnlearnError(f"'method' must be a string (seuf, trace, explicit), not {_kind(self.method)}.")
        if self.model_fingerprint is not None and not isinstance(self.model_fingerprint, str):
            raise MoEUnlearnError(f"'model_fingerprint' must be a string or null, not {_kind(self.model_fingerprint)}.")
        self.params = _mapping(self.params, "params")
        if not self.experts:
            raise MoEUnlearnError(
                "The expert selection names no expert. Give at least one {layer: [expert, ...]} entry, or loosen "
                "the attribution thresholds (TRACE: lower trace_tau / trace_rho; SEUF: raise top_m)."
            )

    @property
    def layers(self) -> list[int]:
        return list(self.experts)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """All selected (layer, expert) pairs, sorted."""
        return [(layer, e) for layer, ids in self.experts.items() for e in ids]

    def __len__(self) -> int:
        return len(self.pairs)

    def validate(self, model: nn.Module, check_fingerprint: bool = True) -> dict[int, MoELayer]:
        """Check the selection against ``model`` and return ``{layer index: MoELayer}`` for the selected layers.

        Raises a clear ``MoEUnlearnError`` (before any training) for a selection computed on another model, a
        layer that is not an MoE layer of the model, or an expert id out of range. Shared experts are not
        routed, so they have no id here and cannot be named.
        """
        layers = {layer.index: layer for layer in find_moe_layers(model)}
        # A selection read from a file says which, so the user knows what to edit or re-create.
        source = getattr(self, "source", None)
        this = f"The selection in {source}" if source else "The selection"
        if check_fingerprint and self.model_fingerprint is not None:
            fingerprint = config_fingerprint(model)
            if fingerprint != self.model_fingerprint:
                raise MoEUnlearnError(
                    f"{'This expert selection' if not source else this} was computed on another model (config fingerprint "
                    f"{self.model_fingerprint}, this model has {fingerprint}). Re-run attribution on this model."
                )
        chosen: dict[int, MoELayer] = {}
        for layer_idx, ids in self.experts.items():
            if layer_idx not in layers:
                raise MoEUnlearnError(
                    f"{this} names layer {layer_idx}, which is not an MoE layer of this model. "
                    f"MoE layers: {sorted(layers)}."
                )
            layer = layers[layer_idx]
            bad = [e for e in ids if not 0 <= e < layer.num_experts]
            if bad:
                shared = f" Shared experts ({', '.join(layer.shared_experts)}) are never selectable." if (
                    layer.shared_experts
                ) else ""
                raise MoEUnlearnError(
                    f"{this} names expert(s) {bad} in layer {layer_idx}, which has routed experts "
                    f"0..{layer.num_experts - 1}.{shared}"
                )
            chosen[layer_idx] = layer
        return chosen

    # --- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["schema_version"] = SCHEMA_VERSION
        # JSON object keys are strings; keep them readable ("3": [5]) and convert back in from_dict.
        data["experts"] = {str(k): v for k, v in self.experts.items()}
        data["scores"] = _str_keys(self.scores)
        data["stats"] = {name: _str_keys(table) for name, table in self.stats.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExpertSelection":
        if not isinstance(data, dict):
            raise MoEUnlearnError(
                f"A selection must be a JSON object with an 'experts' mapping {{layer: [expert, ...]}}, not "
                f"{_kind(data)}."
            )
        data = dict(data)
        version = data.pop("schema_version", SCHEMA_VERSION)
        if isinstance(version, bool) or not isinstance(version, int):
            raise MoEUnlearnError(f"'schema_version' must be an integer, not {_kind(version)}.")
        if version > SCHEMA_VERSION:
            raise MoEUnlearnError(f"selection schema version {version} is newer than this hf-moe-unlearn supports.")
        if "experts" not in data:
            raise MoEUnlearnError(
                f"A selection needs an 'experts' mapping {{layer: [expert, ...]}}; found keys {sorted(data)}.")
        known = {"experts", "method", "scores", "stats", "model_fingerprint", "params"}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str | os.PathLike) -> str:
        """Write to ``path`` (a file, or a directory in which ``selection.json`` is written); returns the file."""
        path = os.fspath(path)
        if os.path.isdir(path) or not path.endswith(".json"):
            os.makedirs(path, exist_ok=True)
            path = os.path.join(path, SELECTION_FILE)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ExpertSelection":
        """Read a ``selection.json`` (or the one in a directory). Every problem with the file (not JSON, wrong types,
        no experts) is a :class:`MoEUnlearnError` naming it; the layers and experts are checked against a model
        later, by :meth:`validate` (the file does not hold the model)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, SELECTION_FILE)
        if not os.path.exists(path):
            raise MoEUnlearnError(f"No selection file at {path}. Create one with `hf-moe-unlearn attribute`.")
        with open(path, "rb") as f:
            raw = f.read()
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise MoEUnlearnError(f"The selection file {path} is not UTF-8 text (byte 0x{raw[err.start]:02x} at "
                                  f"offset {err.start}): write it as UTF-8 JSON.") from None
        except json.JSONDecodeError as err:
            raise MoEUnlearnError(f"The selection file {path} is not valid JSON: line {err.lineno}, column "
                                  f"{err.colno}: {err.msg}.") from None
        try:
            selection = cls.from_dict(data)
        except MoEUnlearnError as err:
            message = str(err)
            raise MoEUnlearnError(f"The selection file {path}: {message[0].lower()}{message[1:]}") from None
        selection.source = path  # not a field: for validate()'s messages only
        return selection

    @classmethod
    def coerce(cls, value: "ExpertSelection | dict | str | os.PathLike") -> "ExpertSelection":
        """Accept a selection, a ``{layer: [experts]}`` mapping, a selection dict or a path to a saved one."""
        if isinstance(value, ExpertSelection):
            return value
        if isinstance(value, (str, os.PathLike)):
            return cls.load(value)
        if isinstance(value, dict):
            return cls.from_dict(value) if "experts" in value else cls(experts=value, method="explicit")
        raise MoEUnlearnError(f"Cannot read an expert selection from {type(value).__name__}.")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: f"the number {value!r}", float: f"the number {value!r}", str: f"the string "
            f"{value!r}", list: "a list", dict: "an object"}.get(type(value), f"a {type(value).__name__}")


def _index(value: Any, what: str) -> int:
    """A layer or expert index: an integer >= 0, or (a JSON object key) a string of digits."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    raise MoEUnlearnError(f"{what} must be an integer >= 0, not {_kind(value)}.")


def _expert_mapping(experts: Any) -> dict[int, list[int]]:
    if not isinstance(experts, dict):
        raise MoEUnlearnError(
            f"'experts' must map layer indices to lists of expert ids, e.g. {{\"1\": [0, 3]}}, not {_kind(experts)}.")
    out: dict[int, list[int]] = {}
    for layer, ids in experts.items():
        index = _index(layer, "A layer index in 'experts'")
        if not isinstance(ids, (list, tuple, set)):
            raise MoEUnlearnError(f"'experts' of layer {index} must be a list of expert ids, not {_kind(ids)}.")
        out[index] = sorted({_index(e, f"An expert id in layer {index} of 'experts' (a routed expert's index; shared "
                                       f"experts are always active, have no id and are never selectable)") for e in ids})
    return out


def _mapping(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MoEUnlearnError(f"'{what}' must be an object, not {_kind(value)}.")
    return value


def _int_keys(table: Any, what: str = "scores") -> dict[int, dict[int, float]]:
    out: dict[int, dict[int, float]] = {}
    for layer, row in _mapping(table, what).items():
        index = _index(layer, f"A layer index in '{what}'")
        out[index] = {}
        for expert, value in _mapping(row, f"{what}.{layer}").items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise MoEUnlearnError(f"'{what}' of layer {index}, expert {expert} must be a number, not "
                                      f"{_kind(value)}.")
            out[index][_index(expert, f"An expert id in '{what}'")] = float(value)
    return out


def _str_keys(table: dict) -> dict[str, dict[str, float]]:
    return {str(l): {str(e): v for e, v in row.items()} for l, row in table.items()}
