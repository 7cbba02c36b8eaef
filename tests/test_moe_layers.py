"""find_moe_layers on every supported family, wrapped models, and the errors for non-MoE models."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_moe_unlearn.errors import MoEUnlearnError
from hf_moe_unlearn.moe import (
    CORE_FAMILIES,
    TINY_CONFIGS,
    NotAnMoEModelError,
    config_fingerprint,
    find_moe_layers,
    tiny_modulelist_moe_model,
    tiny_moe_model,
)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_every_family_has_readable_moe_layers(family):
    model = tiny_moe_model(family)
    layers = find_moe_layers(model)
    assert layers, family
    for layer in layers:
        assert layer.family == family
        assert layer.num_experts == 4 and layer.top_k == 2
        assert layer.fused
        assert model.get_submodule(layer.router_name) is layer.router
        assert model.get_submodule(layer.experts_name) is layer.experts
        assert set(layer.expert_param_names) >= {"down_proj"}
        for shared in layer.shared_experts:
            assert model.get_submodule(shared) is not None
        # the layer index is the decoder layer that holds the block
        assert f"layers.{layer.index}." in layer.name + "."


def test_core_families_are_all_supported():
    assert set(CORE_FAMILIES) <= set(TINY_CONFIGS)


def test_layout_facts():
    qwen2 = find_moe_layers(tiny_moe_model("qwen2_moe"))
    assert qwen2[0].shared_experts == ["model.layers.0.mlp.shared_expert", "model.layers.0.mlp.shared_expert_gate"]
    ds3 = find_moe_layers(tiny_moe_model("deepseek_v3"))
    assert [l.index for l in ds3] == [1]  # first_k_dense_replace=1: layer 0 is dense
    assert ds3[0].score_fn == "sigmoid" and ds3[0].shared_experts == ["model.layers.1.mlp.shared_experts"]
    gpt = find_moe_layers(tiny_moe_model("gpt_oss"))
    assert gpt[0].is_transposed and gpt[0].router_name.endswith("mlp.router")
    granite = find_moe_layers(tiny_moe_model("granitemoe"))
    assert granite[0].name == "model.layers.0.block_sparse_moe"


def test_module_list_experts():
    layers = find_moe_layers(tiny_modulelist_moe_model())
    assert [l.index for l in layers] == [0, 1]
    assert not layers[0].fused and layers[0].num_experts == 4 and layers[0].top_k == 2


def test_peft_wrapped_model_is_found_with_clean_names():
    from peft import LoraConfig, get_peft_model

    model = tiny_moe_model("qwen3_moe")
    peft_model = get_peft_model(
        model, LoraConfig(r=2, target_modules=[], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    )
    layers = find_moe_layers(peft_model)
    assert [l.name for l in layers] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(l.fused and l.num_experts == 4 for l in layers)


def test_dense_model_gets_clear_error():
    dense = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, vocab_size=64))
    with pytest.raises(NotAnMoEModelError, match="no Mixture-of-Experts layer.*Supported families: .*qwen3_moe"):
        find_moe_layers(dense)
    assert issubclass(NotAnMoEModelError, MoEUnlearnError)


def test_unreadable_router_gets_clear_error():
    model = tiny_moe_model("qwen3_moe")
    for layer in model.model.layers:
        layer.mlp.selector = layer.mlp.gate
        del layer.mlp.gate
    with pytest.raises(NotAnMoEModelError, match="could not read their router"):
        find_moe_layers(model)


def test_fingerprint_ignores_dtype_but_not_architecture():
    a = tiny_moe_model("qwen3_moe")
    b = tiny_moe_model("qwen3_moe", seed=1).to(torch.bfloat16)
    c = tiny_moe_model("qwen3_moe", num_hidden_layers=3)
    assert config_fingerprint(a) == config_fingerprint(b)
    assert config_fingerprint(a) != config_fingerprint(c)
