"""``ExpertPeftModel``: a ``peft.PeftModel`` that trains only the selected experts (and routers), fast, and saves a
standard PEFT adapter.

Training runs PEFT's own machinery (injection, ``modules_to_save`` for routers, trainable-parameter bookkeeping,
``disable_adapter``, ``merge_and_unload``) with one custom layer registered through
``LoraConfig._register_custom_module`` for fused experts (:class:`.layer.SelectedExpertsLayer`). Because it is a
``PeftModel``, ``transformers.Trainer`` treats it as one: it calls ``save_pretrained`` for checkpoints and
``load_adapter`` to resume, and both are overridden here to write/read the standard format (:mod:`.convert`).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
from peft import LoraConfig, PeftModelForCausalLM
from peft.tuners.lora import ParamWrapper
from peft.utils import get_peft_model_state_dict
from peft.utils.other import AuxiliaryTrainingWrapper
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import MoEUnlearnError
from ..moe.layers import MoELayer, unwrap_model
from ..routing.selection import ExpertSelection
from ..saving import check_save_complete
from .card import build_model_card
from .config import DUMMY_TARGET_MODULES, META_KEY, adapter_metadata, expert_lora_config, resolve_selection
from .convert import PREFIX, _whole, layer_to_standard, standard_to_layer
from .layer import SelectedExpertsLayer, selected_experts_factory

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
TRAINING_STATE = "expert_training_state.safetensors"


def _training_config(standard: LoraConfig, layers: dict[int, MoELayer], selection: ExpertSelection, mode: str) -> LoraConfig:
    """The config PEFT injects with: our layer on fused experts, PEFT's own handling of everything else.

    Only fused experts differ from the standard config (``target_modules`` = their module, served by our layer); the
    routers and ``ModuleList`` experts are configured exactly as in the saved adapter, so PEFT saves them itself.
    """
    fused = {layer.experts_name: selection.experts[i] for i, layer in layers.items() if layer.fused}
    target_parameters = [t for t in standard.target_parameters or [] if t.rpartition(".")[0] not in fused]
    modules_to_save = [m for m in standard.modules_to_save or [] if m not in fused]
    target_modules: list[str] | str = sorted(fused)
    if not target_modules and not target_parameters:
        target_modules = DUMMY_TARGET_MODULES
    config = LoraConfig(
        r=standard.r,
        lora_alpha=standard.lora_alpha,
        use_rslora=standard.use_rslora,
        init_lora_weights=standard.init_lora_weights,
        inference_mode=standard.inference_mode,
        target_modules=target_modules,
        target_parameters=target_parameters or None,
        modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    if fused:
        factory = selected_experts_factory(fused, mode)
        config._register_custom_module({type(layers[i].experts): factory for i in layers if layers[i].fused})
    return config


def _uses_reentrant_checkpointing(model: nn.Module) -> bool:
    """Whether activation checkpointing is on with ``use_reentrant=True`` (which needs inputs that require grad)."""
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is not None and getattr(module, "gradient_checkpointing", False):
            return bool(getattr(func, "keywords", {}).get("use_reentrant", True))
    return False


def _peft_renames_keys(model: nn.Module, config: LoraConfig, state: dict[str, torch.Tensor], adapter_name: str) -> bool:
    """Whether plain PEFT, loading ``state``, would rename its LoRA keys (its transformers-v5 weight conversion)."""
    try:
        from peft.utils.transformers_weight_conversion import convert_peft_adapter_state_dict_for_transformers
    except ImportError:  # peft without the conversion: keys are loaded as saved
        return False
    converted = convert_peft_adapter_state_dict_for_transformers(model, config, dict(state), adapter_name=adapter_name)
    return set(converted) != set(state)


def _adapter_dir(model_id: str | os.PathLike, revision: str | None = None, token: str | None = None) -> str:
    """A local directory with the adapter: ``model_id`` itself, or a Hub snapshot of its adapter files."""
    path = os.fspath(model_id)
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    return snapshot_download(path, revision=revision, token=token, allow_patterns=["adapter_*", "README.md"])


def _read_adapter(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    check_save_complete(path)  # a save killed half-way is refused, not read as a mix of two saves
    config_file = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.exists(config_file):
        raise MoEUnlearnError(f"No {ADAPTER_CONFIG} in {path}: not a PEFT adapter directory.")
    with open(config_file) as f:
        config = json.load(f)
    weights = os.path.join(path, ADAPTER_WEIGHTS)
    if os.path.exists(weights):
        return config, load_file(weights)
    if os.path.exists(os.path.join(path, ADAPTER_WEIGHTS_BIN)):
        return config, torch.load(os.path.join(path, ADAPTER_WEIGHTS_BIN), map_location="cpu", weights_only=True)
    raise MoEUnlearnError(f"No {ADAPTER_WEIGHTS} in {path}.")


class ExpertPeftModel(PeftModelForCausalLM):
    """A PEFT model whose only trainable parameters are the selected experts' LoRA (or full deltas) and routers.

    Build it with :func:`get_expert_peft_model`. ``save_pretrained`` writes a standard PEFT adapter (plus a model
    card), loadable by plain ``peft.PeftModel.from_pretrained``; ``load_adapter``/``from_pretrained`` read one back.

    Attributes:
        expert_selection: the :class:`ExpertSelection` being trained.
        standard_config: the ``LoraConfig`` written to ``adapter_config.json``.
        card_info: ``method``/``losses``/``eval_results`` for the model card; trainers fill it in.
    """

    def __init__(
        self,
        model: nn.Module,
        peft_config: LoraConfig,
        adapter_name: str = "default",
        *,
        standard_config: LoraConfig,
        selection: ExpertSelection,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, peft_config, adapter_name, **kwargs)
        self.standard_config = standard_config
        self.expert_selection = selection
        meta = adapter_metadata(standard_config)
        self.expert_mode: str = meta["mode"]
        self.train_router: bool = meta["train_router"]
        self.card_info: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------- reference model
    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the frozen start model inside the context (the reference of NPO/KL/DPO losses), in both modes.

        No weight is copied in or out: training never writes the base weights. LoRA and full mode keep the selected
        experts' trainable state beside them (full mode: a delta of the S selected slices, added on the fly), so
        with our layers disabled the experts run their original weights; trained routers and ``ModuleList`` experts
        are PEFT ``modules_to_save`` copies, and PEFT's context switches those wrappers to the original modules.

        PEFT marks the active adapter trainable on exit (``set_adapter``), which would unfreeze a model loaded with
        ``is_trainable=False`` or built with ``inference_mode=True``; here every parameter's ``requires_grad`` is put
        back as it was, also when the body raises.
        """
        flags = [(param, param.requires_grad) for param in self.parameters()]
        try:
            with super().disable_adapter():
                yield
        finally:
            for param, requires_grad in flags:
                param.requires_grad_(requires_grad)

    # ------------------------------------------------------------------------------------------- introspection
    def fast_layers(self) -> dict[str, SelectedExpertsLayer]:
        """``{experts module path: layer}`` of the fused experts served by our layer."""
        return {n: m for n, m in self.base_model.model.named_modules() if isinstance(m, SelectedExpertsLayer)}

    def standard_adapter(self, adapter_name: str = "default", state_dict: Mapping[str, torch.Tensor] | None = None
                         ) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
        """The adapter in PEFT's standard format: ``(config, tensors)``, what ``PeftModel.from_pretrained`` reads.

        ``ModuleList`` experts keep their LoRA pairs, except on model types for which PEFT converts per-expert LoRA
        keys into fused ones when loading (``mixtral``, ``qwen2_moe``, ``deepseek_v2``, ... on transformers 5: a
        remote-code checkpoint with such a type has per-expert modules, so the converted keys match nothing). There the
        selected experts are saved merged and whole (``modules_to_save``): exact, and loadable everywhere.

        ``state_dict``: this model's full state dict (``self.state_dict()`` keys) to read the tensors from instead of
        the parameters: what the Trainer gathers from FSDP-sharded parameters (FULL_STATE_DICT) on the main process.
        """
        if adapter_name not in self.peft_config:
            raise MoEUnlearnError(f"No adapter named {adapter_name!r}; this model has {list(self.peft_config)}.")
        config = copy.deepcopy(self.standard_config)
        state = get_peft_model_state_dict(self, state_dict=dict(state_dict) if state_dict is not None else None,
                                          adapter_name=adapter_name)
        fast = self.fast_layers()
        ours = tuple(f"{PREFIX}{name}." for name in fast)
        state = {k: _whole(v.detach(), k).cpu().contiguous() for k, v in state.items() if not k.startswith(ours)}
        for name, layer in fast.items():
            prefix = f"{PREFIX}{name}."
            tensors = None if state_dict is None else {k[len(prefix):]: v for k, v in state_dict.items()
                                                       if k.startswith(prefix)}
            state.update(layer_to_standard(layer, name, adapter_name, tensors))
        wrappers = self._modulelist_lora(adapter_name)
        if wrappers and _peft_renames_keys(self, config, state, adapter_name):
            config, state = self._merge_modulelist(config, state, wrappers, adapter_name)
        return config, state

    def _modulelist_lora(self, adapter_name: str) -> dict[str, nn.Module]:
        """``{module path: PEFT ParamWrapper}`` of LoRA on ``ModuleList`` experts' Linear layers."""
        targets = {t.rpartition(".")[0] for t in self.standard_config.target_parameters or []}
        return {n: m for n, m in self.base_model.model.named_modules()
                if n in targets and isinstance(m, ParamWrapper) and adapter_name in m.lora_A}

    @torch.no_grad()
    def _merge_modulelist(self, config: LoraConfig, state: dict[str, torch.Tensor], wrappers: dict[str, nn.Module],
                          adapter_name: str) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
        """Replace LoRA on ``ModuleList`` experts by the merged experts, saved whole through ``modules_to_save``."""
        experts = sorted({name.rpartition(".")[0] for name in wrappers})  # "...experts.3.w1" -> "...experts.3"
        state = {k: v for k, v in state.items() if not any(k.startswith(f"{PREFIX}{w}.lora_") for w in wrappers)}
        model = self.base_model.model
        for expert in experts:
            for key, value in model.get_submodule(expert).state_dict().items():
                key = key.replace("base_layer.", "")
                if ".lora_" in key:
                    continue
                owner = f"{expert}.{key.rpartition('.')[0]}"
                if key.endswith(".weight") and owner in wrappers:
                    value = value + wrappers[owner].get_delta_weight(adapter_name).to(value.dtype)
                state[f"{PREFIX}{expert}.{key}"] = value.detach().cpu().contiguous()
        remaining = [t for t in config.target_parameters or [] if t.rpartition(".")[0] not in wrappers]
        config.target_parameters = remaining or None
        config.target_modules = set() if remaining else DUMMY_TARGET_MODULES
        config.modules_to_save = list(config.modules_to_save or []) + experts
        config.auto_mapping[META_KEY]["modulelist_saved_merged"] = True
        return config, state

    def _trainable_state(self, state_dict: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Every trainable tensor under its in-memory name: the exact state to resume from (read from
        ``state_dict`` when given, see :meth:`standard_adapter`)."""
        names = [n for n, p in self.named_parameters() if p.requires_grad]
        if state_dict is None:
            return {n: _whole(self.get_parameter(n).detach(), n).cpu().contiguous() for n in names}
        missing = [n for n in names if n not in state_dict]
        if missing:
            raise MoEUnlearnError(f"The state dict given to save_pretrained lacks trainable tensors {missing[:3]}.")
        return {n: state_dict[n].detach().cpu().contiguous() for n in names}

    # ------------------------------------------------------------------------------------------- saving
    def _base_name(self) -> str | None:
        base = self.get_base_model()
        return getattr(base, "name_or_path", None) or getattr(base.config, "_name_or_path", None) or None

    def model_card(self, **overrides: Any):
        """The model card the adapter directory gets (see :func:`build_model_card`)."""
        info = {**self.card_info, **{k: v for k, v in overrides.items() if v is not None}}
        return build_model_card(
            self._base_name(),
            self.expert_selection,
            method=info.get("method", self.expert_selection.method),
            losses=info.get("losses"),
            eval_results=info.get("eval_results"),
            mode=self.expert_mode,
            r=self.standard_config.r,
            train_router=self.train_router,
        )

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        is_main_process: bool = True,
        *,
        method: str | None = None,
        losses: Any = None,
        eval_results: Any = None,
        include_training_state: bool = True,
        **kwargs: Any,
    ) -> None:
        """Write ``adapter_config.json``, ``adapter_model.safetensors`` (standard PEFT format) and ``README.md``.

        With ``include_training_state`` (default) also ``expert_training_state.safetensors``: the trainable tensors
        under their in-memory names, which plain PEFT ignores and :meth:`load_adapter` uses to resume exactly (the
        standard format can lose precision: full-mode experts are stored merged, in the model's dtype).

        ``state_dict`` (keyword): the model's full state dict, which the Trainer gathers from FSDP-sharded
        parameters; the tensors are then read from it instead of the (sharded) parameters. Other keyword arguments
        of ``PeftModel.save_pretrained`` (``save_embedding_layers``, ...) are accepted for compatibility with
        ``Trainer`` and ignored. Weights are always written as safetensors.
        """
        if selected_adapters not in (None, ["default"]) or list(self.peft_config) != ["default"]:
            raise MoEUnlearnError("An expert-selective model holds exactly one adapter, named 'default'.")
        if not is_main_process:
            return
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise MoEUnlearnError(f"{save_directory} is a file; save_pretrained needs a directory.")
        os.makedirs(save_directory, exist_ok=True)
        state_dict = kwargs.get("state_dict")
        config, state = self.standard_adapter(state_dict=state_dict)
        save_file(state, os.path.join(save_directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        if include_training_state:
            save_file(self._trainable_state(state_dict), os.path.join(save_directory, TRAINING_STATE),
                      metadata={"format": "pt"})
        config.base_model_name_or_path = config.base_model_name_or_path or self._base_name()
        config.inference_mode = True
        config.save_pretrained(save_directory)
        self.model_card(method=method, losses=losses, eval_results=eval_results).save(os.path.join(save_directory, "README.md"))

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str = "Upload expert-selective unlearning adapter",
        create_pr: bool = False,
        method: str | None = None,
        losses: Any = None,
        eval_results: Any = None,
        **kwargs: Any,
    ):
        """Create ``repo_id`` if needed and upload the saved adapter folder (adapter files + model card)."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, method=method, losses=losses, eval_results=eval_results,
                                 include_training_state=False)
            return api.upload_folder(
                repo_id=getattr(url, "repo_id", repo_id),
                folder_path=folder,
                commit_message=commit_message,
                revision=revision,
                create_pr=create_pr,
            )

    # ------------------------------------------------------------------------------------------- loading
    def load_adapter(
        self, model_id: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False, **kwargs: Any
    ):
        """Load a saved (standard-format) adapter of the same selection into this model's fast layers.

        This is what ``Trainer`` calls to resume from a checkpoint. Loading a second, differently named adapter is
        not supported (the fast layers hold one).
        """
        if adapter_name not in self.peft_config:
            raise MoEUnlearnError(
                f"An expert-selective model holds one adapter ('default'), cannot add {adapter_name!r}. For several "
                "adapters use plain `peft.PeftModel.from_pretrained` on the base model."
            )
        path = _adapter_dir(model_id, kwargs.get("revision"), kwargs.get("token"))
        config, state = _read_adapter(path)
        self._check_compatible(config)
        exact = os.path.join(path, TRAINING_STATE)
        if os.path.exists(exact):
            self._load_trainable_state(load_file(exact))
        else:
            self._load_standard(state, adapter_name, adapter_metadata(config))
        if not is_trainable:
            for param in self.parameters():
                param.requires_grad_(False)

    @torch.no_grad()
    def _load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        if set(state) != set(params):
            missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            raise MoEUnlearnError(f"{TRAINING_STATE} does not match this model (missing {missing[:3]}, extra {extra[:3]}).")
        for name, value in state.items():
            params[name].copy_(value)

    @torch.no_grad()
    def _load_standard(self, state: dict[str, torch.Tensor], adapter_name: str, meta: Mapping[str, Any]) -> None:
        """Read a standard-format adapter into this model (our layers, routers, ``ModuleList`` LoRA).

        Done by hand rather than with ``set_peft_model_state_dict``: on some model types that function renames
        per-expert LoRA keys for fused experts (see :meth:`standard_adapter`).
        """
        if meta.get("modulelist_saved_merged"):
            raise MoEUnlearnError(
                f"This adapter stores its ModuleList experts merged (see the config) and has no {TRAINING_STATE}, so "
                "the LoRA factors cannot be recovered. Use it with plain `peft.PeftModel.from_pretrained`."
            )
        used: set[str] = set()
        for name, layer in self.fast_layers().items():
            used |= standard_to_layer(layer, name, state, adapter_name)
        targets: dict[str, torch.Tensor] = {}
        for name, module in self.named_modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                for saved, loaded in module.adapter_state_dict_load_map(adapter_name).items():
                    targets[f"{name}.{saved}"] = module.get_parameter(loaded)
            elif isinstance(module, ParamWrapper) and adapter_name in module.lora_A:
                targets[f"{name}.lora_A.weight"] = module.lora_A[adapter_name].weight
                targets[f"{name}.lora_B.weight"] = module.lora_B[adapter_name].weight
        missing = sorted(set(targets) - set(state))
        unexpected = sorted(set(state) - set(targets) - used)
        if missing or unexpected:
            raise MoEUnlearnError(f"The adapter does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}.")
        for key, param in targets.items():
            param.copy_(state[key])

    def _check_compatible(self, config: Mapping[str, Any]) -> None:
        meta = adapter_metadata(config)
        saved = ExpertSelection.from_dict(meta["selection"])
        mine = self.standard_config
        expected = {"selection": self.expert_selection.experts, "mode": self.expert_mode, "train_router": self.train_router,
                    "r": mine.r, "lora_alpha": mine.lora_alpha, "use_rslora": mine.use_rslora}
        found = {"selection": saved.experts, "mode": meta["mode"], "train_router": meta["train_router"],
                 "r": config.get("r"), "lora_alpha": config.get("lora_alpha"), "use_rslora": config.get("use_rslora", False)}
        diff = {k: (found[k], expected[k]) for k in expected if found[k] != expected[k]}
        if diff:
            raise MoEUnlearnError(
                "The saved adapter does not match this model's expert adapter (saved vs here): "
                + "; ".join(f"{k}: {a} vs {b}" for k, (a, b) in diff.items())
                + ". Load it with `ExpertPeftModel.from_pretrained(base_model, path)` instead."
            )

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        **kwargs: Any,
    ) -> "ExpertPeftModel":
        """Rebuild the fast expert-selective model from a saved adapter (the inverse of ``save_pretrained``)."""
        path = _adapter_dir(model_id, kwargs.get("revision"), kwargs.get("token"))
        config, _ = _read_adapter(path)
        meta = adapter_metadata(config)
        peft_model = get_expert_peft_model(
            model,
            ExpertSelection.from_dict(meta["selection"]),
            r=config["r"],
            lora_alpha=config["lora_alpha"],
            train_router=meta["train_router"],
            mode=meta["mode"],
            use_rslora=config.get("use_rslora", False),
        )
        peft_model.load_adapter(path, adapter_name, is_trainable=is_trainable)
        return peft_model

    # ------------------------------------------------------------------------------------------- checkpointing
    def _prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        """PEFT makes the *input embeddings* require grad whenever checkpointing is on, which drags the backward
        down to layer 0. Only reentrant checkpointing needs that; with ``use_reentrant=False`` (transformers' default)
        the backward stops below the lowest selected layer, as it should."""
        if _uses_reentrant_checkpointing(model):
            return super()._prepare_model_for_gradient_checkpointing(model)
        return model

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """Turn on activation checkpointing (non-reentrant by default) without forcing the backward to the input."""
        kw = activation_checkpointing_kwargs or {"use_reentrant": False}
        base = self.get_base_model()
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kw, **kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw, **kwargs)
        if not kw.get("use_reentrant", True) and hasattr(base, "_require_grads_hook"):
            base.disable_input_require_grads()  # transformers enables it unconditionally; non-reentrant needs none

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """Alias of :meth:`activation_checkpointing_enable` (the name transformers < 5.24 and older callers use)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)


def get_expert_peft_model(
    model: nn.Module,
    selection: ExpertSelection | Mapping | str | os.PathLike,
    r: int = 8,
    lora_alpha: float = 16,
    train_router: bool = True,
    mode: str = "lora",
    **lora_kwargs: Any,
) -> ExpertPeftModel:
    """Wrap ``model`` so that only the selected experts (LoRA, or full weights with ``mode="full"``) and, with
    ``train_router``, the selected layers' routers train. Everything is validated before the model is touched.

    The backward pass stops below the lowest selected layer: nothing below it is trainable and the input embeddings
    are never made to require grad.
    """
    selection, layers = resolve_selection(model, selection)
    standard = expert_lora_config(model, selection, r, lora_alpha, train_router, mode=mode, **lora_kwargs)
    training = _training_config(standard, layers, selection, mode)
    with warnings.catch_warnings():  # PEFT reads the deprecated `is_gradient_checkpointing` (transformers >= 5.24)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return ExpertPeftModel(unwrap_model(model), training, standard_config=standard, selection=selection)
