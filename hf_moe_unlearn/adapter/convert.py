"""Conversion between our fast per-selected-expert parameters and PEFT's standard adapter format.

Standard format of fused experts (PEFT ``target_parameters``, ``ParamWrapper``; verified by running peft 0.21, see
tests/test_adapter.py): for an expert tensor with E experts and rank r,
``lora_A.weight`` is [r*E, in] and expert e's rows are ``e*r:(e+1)*r``; ``lora_B.weight`` is [out, r*E] and expert
e's columns are ``[j*E + e for j in range(r)]`` (interleaved). ``in``/``out`` are those of the per-expert linear map
(for GPT-OSS's transposed [E, in, out] storage too). Unselected experts get zeros, so their delta is exactly zero.

Several tensors of one module are wrapped one inside the other, in declaration order: the first (``gate_up_proj``)
is innermost. The saved keys do not name the tensor: ``<experts>.base_layer.lora_A.weight`` is ``gate_up_proj`` and
``<experts>.lora_A.weight`` is ``down_proj`` (one ``base_layer`` per wrapper outside it).

Full mode saves the whole experts module (``modules_to_save``): ``<experts>.<tensor>`` = base + deltas.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import MoEUnlearnError
from .layer import SelectedExpertsLayer

PREFIX = "base_model.model."


def lora_keys(module_name: str, weight_names: list[str]) -> dict[str, tuple[str, str]]:
    """``{tensor name: (lora_A key, lora_B key)}`` of the standard adapter for a fused experts module."""
    keys = {}
    for i, name in enumerate(weight_names):
        path = PREFIX + module_name + ".base_layer" * (len(weight_names) - 1 - i)
        keys[name] = (f"{path}.lora_A.weight", f"{path}.lora_B.weight")
    return keys


def full_keys(module_name: str, names: list[str]) -> dict[str, str]:
    """``{tensor name: key}`` of a fused experts module saved whole through ``modules_to_save``."""
    return {name: f"{PREFIX}{module_name}.{name}" for name in names}


def _interleaved_columns(expert: int, rank: int, num_experts: int) -> list[int]:
    return [j * num_experts + expert for j in range(rank)]


def _whole(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """``tensor`` as a plain local tensor; an FSDP-sharded DTensor cannot be read by one process alone."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        raise MoEUnlearnError(
            f"{what} is sharded (FSDP DTensor): one process cannot read it whole. Save through the Trainer with "
            f"fsdp_state_dict_type FULL_STATE_DICT (it gathers the weights first), or pass "
            f"state_dict=accelerator.get_state_dict(model) to save_pretrained on every process."
        )
    return tensor


@torch.no_grad()
def layer_to_standard(layer: SelectedExpertsLayer, module_name: str, adapter: str = "default",
                      tensors: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The standard-format tensors of one of our layers (CPU, contiguous, in the adapter's dtype).

    ``tensors``: the layer's tensors by their names in it (``lora_A.default.gate_up_proj``, ``base_layer.down_proj``,
    ...) as a gathered state dict has them (FSDP); default: read from the layer, which must not be sharded.
    """
    def tensor(kind: str, name: str) -> torch.Tensor:
        key = f"base_layer.{name}" if kind == "base" else f"{kind}.{adapter}.{name}"
        if tensors is not None:
            if key not in tensors:
                raise MoEUnlearnError(f"The state dict given to save {module_name} lacks {key}.")
            return tensors[key].detach()
        value = getattr(layer.get_base_layer(), name) if kind == "base" else getattr(layer, kind)[adapter][name]
        return _whole(value.detach(), f"{module_name}.{key}")

    ids = layer.selected_ids.tolist()
    num_experts = layer.num_experts
    out: dict[str, torch.Tensor] = {}
    if layer.expert_mode == "full":
        for name, key in full_keys(module_name, layer.weight_names + layer.bias_names).items():
            param = tensor("base", name)
            selected = layer.selected_ids.to(param.device)
            merged = param.index_add(0, selected, tensor("lora_delta", name).to(param.device, param.dtype))
            out[key] = merged.cpu().contiguous()
        return out
    rank = layer.r[adapter]
    for name, (key_a, key_b) in lora_keys(module_name, layer.weight_names).items():
        a = tensor("lora_A", name)  # [S, r, in]
        b = tensor("lora_B", name)  # [S, r, out]
        full_a = a.new_zeros(rank * num_experts, a.shape[-1])
        full_b = b.new_zeros(b.shape[-1], rank * num_experts)
        for slot, expert in enumerate(ids):  # S selected experts: a few slices, once per save
            full_a[expert * rank : (expert + 1) * rank] = a[slot]
            full_b[:, _interleaved_columns(expert, rank, num_experts)] = b[slot].t()
        out[key_a] = full_a.cpu().contiguous()
        out[key_b] = full_b.cpu().contiguous()
    return out


@torch.no_grad()
def standard_to_layer(
    layer: SelectedExpertsLayer, module_name: str, state_dict: dict[str, torch.Tensor], adapter: str = "default"
) -> set[str]:
    """Load one layer's tensors from a standard adapter state dict; returns the keys used.

    Refuses (clear error) an adapter that changes experts outside this layer's selection: our layer could not
    represent it, and silently dropping part of an adapter would change the model.
    """
    ids = layer.selected_ids.tolist()
    unselected = [e for e in range(layer.num_experts) if e not in ids]
    used: set[str] = set()
    if layer.expert_mode == "full":
        base = layer.get_base_layer()
        for name, key in full_keys(module_name, layer.weight_names + layer.bias_names).items():
            saved = _take(state_dict, key, used)
            param = getattr(base, name)
            saved = saved.to(device=param.device, dtype=param.dtype)
            if unselected and not torch.equal(saved[unselected], param.detach()[unselected]):
                raise MoEUnlearnError(
                    f"{key} differs from the base model on experts outside the selection {ids}: the adapter was saved "
                    "from other base weights or with another selection. Load it on its own base model."
                )
            delta = (saved[layer.selected_ids] - param.detach()[layer.selected_ids]).to(layer.lora_delta[adapter][name].dtype)
            layer.lora_delta[adapter][name].copy_(delta)
        return used
    rank = layer.r[adapter]
    for name, (key_a, key_b) in lora_keys(module_name, layer.weight_names).items():
        full_a, full_b = _take(state_dict, key_a, used), _take(state_dict, key_b, used)
        a, b = layer.lora_A[adapter][name], layer.lora_B[adapter][name]
        if full_a.shape != (rank * layer.num_experts, a.shape[-1]) or full_b.shape != (b.shape[-1], rank * layer.num_experts):
            raise MoEUnlearnError(
                f"{key_a}/{key_b} have shapes {tuple(full_a.shape)}/{tuple(full_b.shape)}, expected rank {rank} over "
                f"{layer.num_experts} experts: the adapter does not match this model or config."
            )
        stray = [e for e in unselected if full_b[:, _interleaved_columns(e, rank, layer.num_experts)].abs().sum() > 0]
        if stray:
            raise MoEUnlearnError(
                f"{key_b} changes expert(s) {stray}, outside the selection {ids}; expert-selective loading cannot "
                "represent it. Load it with plain `peft.PeftModel.from_pretrained` instead."
            )
        for slot, expert in enumerate(ids):
            a[slot].copy_(full_a[expert * rank : (expert + 1) * rank])
            b[slot].copy_(full_b[:, _interleaved_columns(expert, rank, layer.num_experts)].t())
    return used


def _take(state_dict: dict[str, torch.Tensor], key: str, used: set[str]) -> torch.Tensor:
    if key not in state_dict:
        raise MoEUnlearnError(f"The adapter file lacks {key}: it was not saved for this model/selection.")
    used.add(key)
    return state_dict[key]
