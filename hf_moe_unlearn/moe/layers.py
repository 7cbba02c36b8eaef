"""Find the Mixture-of-Experts layers of a Hugging Face model.

transformers 5.x keeps the experts of every MoE family fused in 3-D tensors inside an "experts" module
decorated with ``use_experts_implementation`` (which records the weight layout on the instance:
``is_transposed``, ``has_bias``, ``has_gate``, ...). The MoE block that owns that module also owns a
router (``gate`` or ``router``) and possibly shared experts. Rather than keep a hand-written table per
family that goes stale with every transformers release, we discover the structure from those facts and
keep a small table only for what cannot be read off the module tree (see ``_ROUTER_NAMES`` and
``_SHARED_NAMES``). Older or remote-code checkpoints that keep experts as an ``nn.ModuleList`` of MLPs
are handled too.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import nn

from ..errors import MoEUnlearnError

# Attribute names, inside an MoE block, under which the families of transformers keep the router.
_ROUTER_NAMES = ("gate", "router")
# ... and their shared (always active, never routed) experts.
_SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp", "shared_expert_gate")
# Names a fused experts module uses for its 3-D weights (and optional biases).
_FUSED_PARAM_NAMES = ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias")
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


class NotAnMoEModelError(MoEUnlearnError):
    """Raised for a model in which no MoE layer (router + experts) could be found."""


@dataclass
class MoELayer:
    """One sparse MoE block of a model, with everything the rest of the package needs to know about it.

    Attributes:
        index: the decoder layer index (the number in ``model.layers.<index>.mlp``).
        name: module path of the MoE block, e.g. ``"model.layers.1.mlp"`` (without PEFT/accelerate prefixes).
        block, router, experts: the modules themselves.
        router_name, experts_name: their module paths.
        num_experts: number of routed (selectable) experts.
        top_k: experts each token is sent to.
        shared_experts: module paths of shared experts; they are always active, so never selectable.
        fused: True when experts are 3-D tensors (transformers 5.x), False for a ``ModuleList`` of MLPs.
        score_fn: ``"softmax"`` or ``"sigmoid"``, how the router turns logits into expert scores.
        family: the ``config.model_type`` of the model.
    """

    index: int
    name: str
    block: nn.Module = field(repr=False)
    router: nn.Module = field(repr=False)
    router_name: str
    experts: nn.Module = field(repr=False)
    experts_name: str
    num_experts: int
    top_k: int
    shared_experts: list[str]
    fused: bool
    score_fn: str
    family: str

    @property
    def expert_param_names(self) -> list[str]:
        """Names of the fused expert tensors (``gate_up_proj``, ``down_proj``, biases) in ``experts``."""
        if not self.fused:
            return []
        return [n for n, _ in self.experts.named_parameters(recurse=False) if n in _FUSED_PARAM_NAMES]

    @property
    def is_transposed(self) -> bool:
        """True when fused weights are stored [E, in, out] (GPT-OSS) instead of [E, out, in]."""
        return bool(getattr(self.experts, "is_transposed", False))


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the plain transformers model under PEFT, DDP/FSDP (``.module``) or ``torch.compile`` wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module) and type(model).__name__ in (
            "DistributedDataParallel",
            "DataParallel",
            "FullyShardedDataParallel",
            "DeepSpeedEngine",
        ):
            model = model.module
        elif hasattr(model, "get_base_model") and hasattr(model, "peft_config"):  # peft.PeftModel
            model = model.get_base_model()
    return model


def clean_module_name(name: str) -> str:
    """Strip wrapper prefixes (PEFT's ``base_model.model.``, DDP's ``module.``) and PEFT's ``base_layer``."""
    for prefix in ("module.", "base_model.model.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name.replace(".base_layer", "")


def _is_fused_experts(module: nn.Module) -> bool:
    if hasattr(module, "is_transposed") and hasattr(module, "has_gate"):
        return True
    return any(n in _FUSED_PARAM_NAMES and p.dim() == 3 for n, p in module.named_parameters(recurse=False))


def _router_weight(router: nn.Module) -> torch.Tensor | None:
    """The [E, H] weight of a router (its own ``weight`` or that of its first Linear child)."""
    weight = getattr(router, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight
    for child in router.modules():
        w = getattr(child, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2:
            return w
    return None


#: Router classes whose scoring was declared by hand (:func:`register_router_score_fn`), for routers whose source
#: cannot be read (compiled, generated or pickled classes).
_SCORE_FN_OVERRIDES: dict[type, str] = {}
SCORE_FNS = ("softmax", "sigmoid")


def register_router_score_fn(router_cls: type, score_fn: str) -> None:
    """Declare how routers of ``router_cls`` score experts (``"softmax"`` or ``"sigmoid"``).

    Needed only for a router class whose source cannot be read (see :func:`_score_fn_of`); every transformers
    family is read off its source.
    """
    if score_fn not in SCORE_FNS:
        raise MoEUnlearnError(f"score_fn must be one of {', '.join(SCORE_FNS)}, got {score_fn!r}.")
    _SCORE_FN_OVERRIDES[router_cls] = score_fn
    _score_fn_of.cache_clear()


@lru_cache(maxsize=None)
def _score_fn_of(router_cls: type) -> str:
    """Read off a router class's source whether it scores experts by sigmoid (DeepSeek-V3 style) or softmax.

    The families disagree and no attribute says which; the source does, and it cannot drift from the code.
    A class without readable source is an error, not a silent softmax: a wrong guess would give sigmoid
    families a softmax anchor and wrong routing statistics.
    """
    if router_cls in _SCORE_FN_OVERRIDES:
        return _SCORE_FN_OVERRIDES[router_cls]
    try:
        src = inspect.getsource(router_cls)
    except (OSError, TypeError):
        raise MoEUnlearnError(
            f"Cannot read the source of router class {router_cls.__qualname__}, so its scoring function (softmax "
            f"or sigmoid) is unknown. Declare it: hf_moe_unlearn.moe.register_router_score_fn({router_cls.__name__}, "
            f"'softmax') (or 'sigmoid'), or set `expert_selection_fn = 'softmax'` on each router module."
        ) from None
    return "sigmoid" if re.search(r"\bsigmoid\(", src) else "softmax"


def unwrap_router(router: nn.Module) -> nn.Module:
    """The router module itself under PEFT's ``ModulesToSaveWrapper`` (what ``train_router=True`` puts there).

    The wrapper's own class says nothing about the scoring; its ``original_module`` (and the trainable copy in
    ``modules_to_save``) is the family's router class.
    """
    seen = set()
    while id(router) not in seen:
        seen.add(id(router))
        inner = getattr(router, "original_module", None)
        if isinstance(inner, nn.Module):
            router = inner
    return router


def _score_fn(router: nn.Module) -> str:
    """The router's scoring function; a few families (Cohere2-MoE) choose it per config."""
    router = unwrap_router(router)
    chosen = getattr(router, "expert_selection_fn", None)
    if chosen in SCORE_FNS:
        return chosen
    return _score_fn_of(type(router))


def _find_router(block: nn.Module, num_experts: int) -> tuple[str, nn.Module] | None:
    for attr in _ROUTER_NAMES:
        router = getattr(block, attr, None)
        if isinstance(router, nn.Module):
            weight = _router_weight(router)
            if weight is not None and weight.shape[0] == num_experts:
                return attr, router
    return None


def _top_k(block: nn.Module, router: nn.Module, config) -> int | None:
    for obj in (router, block):
        for attr in ("top_k", "num_experts_per_tok", "topk"):
            value = getattr(obj, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    for attr in ("num_experts_per_tok", "moe_topk", "top_k", "num_experts_per_token"):
        value = getattr(config, attr, None)
        if isinstance(value, (list, tuple)):
            value = value[0]
        if isinstance(value, int) and value > 0:
            return value
    return None


def _num_experts(experts: nn.Module) -> int | None:
    if isinstance(experts, nn.ModuleList):
        return len(experts)
    for n, p in experts.named_parameters(recurse=False):
        if n in _FUSED_PARAM_NAMES and p.dim() == 3:
            return p.shape[0]
    value = getattr(experts, "num_experts", None)
    return value if isinstance(value, int) else None


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Return every sparse MoE layer of ``model`` (a transformers model, possibly PEFT/DDP-wrapped), in order.

    Raises:
        NotAnMoEModelError: when the model has no MoE layer, or has experts whose router cannot be read.
    """
    base = unwrap_model(model)
    config = getattr(base, "config", None)
    family = getattr(config, "model_type", type(base).__name__)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers: list[MoELayer] = []
    unreadable: list[str] = []
    for raw_name, module in base.named_modules():
        name = clean_module_name(raw_name)
        leaf = name.rsplit(".", 1)[-1]
        if leaf != "experts" or "base_layer" in raw_name:  # PEFT's inner copies are reached from the outer one
            continue
        fused = _is_fused_experts(module)
        if not fused and not isinstance(module, nn.ModuleList):
            # PEFT wraps fused experts in ParamWrapper; the wrapped module is reached through base_layer.
            inner = getattr(module, "base_layer", None)
            while inner is not None and not _is_fused_experts(inner):
                inner = getattr(inner, "base_layer", None)
            if inner is None:
                continue
            module, fused = inner, True
        num_experts = _num_experts(module)
        block_name = name.rsplit(".", 1)[0] if "." in name else ""
        block = base.get_submodule(raw_name.rsplit(".", 1)[0]) if "." in raw_name else base
        if num_experts is None:
            continue
        found = _find_router(block, num_experts)
        if found is None:
            unreadable.append(f"{block_name} ({type(block).__name__})")
            continue
        router_attr, router = found
        top_k = _top_k(block, router, text_config)
        if top_k is None:
            unreadable.append(f"{block_name} ({type(block).__name__}: top-k unknown)")
            continue
        shared = [f"{block_name}.{n}" for n in _SHARED_NAMES if isinstance(getattr(block, n, None), nn.Module)]
        match = _LAYER_INDEX.search(f".{block_name}.")
        index = int(match.group(1)) if match else len(layers)
        layers.append(
            MoELayer(
                index=index,
                name=block_name,
                block=block,
                router=router,
                router_name=f"{block_name}.{router_attr}",
                experts=module,
                experts_name=name,
                num_experts=num_experts,
                top_k=top_k,
                shared_experts=shared,
                fused=fused,
                score_fn=_score_fn(router),
                family=family,
            )
        )
    if unreadable and not layers:
        raise NotAnMoEModelError(
            f"Found experts in {type(base).__name__} ({family}) but could not read their router: "
            f"{', '.join(unreadable[:4])}. A router must be a child named {' or '.join(_ROUTER_NAMES)} with an "
            f"[num_experts, hidden] weight. Supported families: {', '.join(supported_families())}."
        )
    if not layers:
        raise NotAnMoEModelError(
            f"{type(base).__name__} ({family}) has no Mixture-of-Experts layer: hf-moe-unlearn needs a sparse MoE "
            f"model (routed experts + router). For dense models use a plain unlearning method. "
            f"Supported families: {', '.join(supported_families())}."
        )
    return layers


def get_moe_layer(layers: list[MoELayer], index: int) -> MoELayer:
    """The MoE layer with decoder index ``index``, or a clear error listing the MoE layer indices."""
    for layer in layers:
        if layer.index == index:
            return layer
    raise MoEUnlearnError(f"Layer {index} is not an MoE layer of this model; MoE layers are {[l.index for l in layers]}.")


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The module path and the ``nn.ModuleList`` of the decoder layers holding the MoE blocks.

    Read off the MoE blocks' own paths (``model.layers.3.mlp`` → ``model.layers``) rather than a per-family
    attribute name, so it holds for every family :func:`find_moe_layers` reads. RMU steers the output of one of
    these layers (the residual stream), which need not be an MoE layer (DeepSeek's first layers are dense).
    """
    base = unwrap_model(model)
    layer = find_moe_layers(base)[0]
    parts = layer.name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        if parts[cut].isdigit():
            path = ".".join(parts[:cut])
            container = base.get_submodule(path)
            if isinstance(container, nn.ModuleList):
                return path, container
    raise MoEUnlearnError(f"Cannot find the list of decoder layers above {layer.name} in {type(base).__name__}.")


def parameter_layer(name: str, layers_path: str) -> int | None:
    """Decoder layer index of a parameter (``...<layers_path>.<i>.…``), under any wrapper prefix; None if outside."""
    marker = f"{layers_path}."
    name = clean_module_name(name)
    at = name.find(marker)
    if at < 0:
        return None
    rest = name[at + len(marker):]
    index = rest.split(".", 1)[0]
    return int(index) if index.isdigit() else None


def config_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's architecture config, so routing statistics are never applied to another model.

    Only fields that change the architecture or the weights' shapes take part (not dtype, attention backend or
    generation settings), so the same checkpoint loaded in bf16 or fp32 gets the same fingerprint.
    """
    base = unwrap_model(model)
    cfg = base.config.to_dict()
    ignore = {
        "torch_dtype", "dtype", "_attn_implementation", "_experts_implementation", "transformers_version",
        "use_cache", "output_router_logits", "_name_or_path", "architectures", "name_or_path",
        "attn_implementation", "experts_implementation", "auto_map", "tie_word_embeddings",
    }

    def clean(obj):
        if isinstance(obj, dict):
            return {str(k): clean(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0])) if str(k) not in ignore and not str(k).startswith("_")}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        return obj

    payload = json.dumps(clean(cfg), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def supported_families() -> list[str]:
    """Model types with a tiny config in :mod:`hf_moe_unlearn.moe.tiny`, i.e. tested families."""
    from .tiny import TINY_CONFIGS

    return sorted(TINY_CONFIGS)
