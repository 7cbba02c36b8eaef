"""Routing attacks (hf_moe_unlearn.evaluation.attacks), each against a computation that does not use it:

- expert masking of every expert but one = that expert forced, computed by hand from the weights (MLP × gate, plus
  shared experts) on four families; masking = the model with those experts cut out of its weights (metric path);
  a bias-corrected router (DeepSeek-V3) whose correction bias would pick the masked expert for every token;
- routing restore: an unlearned model whose router alone changed gives the base model's logits; one whose last
  layer's experts alone changed gives its own logits (its routing is the base's anyway);
- every refusal (no edited experts, every expert of a layer, no original routing, generation with a cache).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from hf_moe_unlearn import MoEUnlearnError, find_moe_layers, get_expert_peft_model, tiny_moe_model
from hf_moe_unlearn.evaluation import get_metric, mcq_accuracy, perplexity
from hf_moe_unlearn.evaluation.attacks import edited_experts, mask_experts, restore_routing
from hf_moe_unlearn.moe.tiny import TINY_CONFIGS, tiny_modulelist_moe_model, tiny_moe_config
from hf_moe_unlearn.routing import RouterRecorder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IDS = torch.randint(4, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def _expert_by_hand(model, layer, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e``'s MLP on tokens ``x`` [N, H], from the fused weight tensors (not the experts module)."""
    experts = layer.experts
    if model.config.model_type == "gpt_oss":  # [E, H, 2I] interleaved gate/up with biases, clamped SwiGLU
        gate_up = x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
        gate, up = gate_up[..., ::2].clamp(max=experts.limit), gate_up[..., 1::2].clamp(-experts.limit, experts.limit)
        glu = gate * torch.sigmoid(gate * experts.alpha)
        return ((up + 1) * glu) @ experts.down_proj[e] + experts.down_proj_bias[e]
    gate, up = (x @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
    assert model.config.hidden_act == "silu"
    return (F.silu(gate) * up) @ experts.down_proj[e].T


def _lone_gate(model, layer, e: int, x: torch.Tensor) -> torch.Tensor:
    """The gate of the one expert left, [N, 1], by each family's formula."""
    config = model.config
    if config.model_type == "deepseek_v3":  # sigmoid affinity, normalised over the chosen (one), scaled
        s = torch.sigmoid(x @ layer.router.weight[e])
        gate = s / (s + 1e-20) if config.norm_topk_prob else s
        return (gate * config.routed_scaling_factor)[:, None]
    # softmax over the one finite logit (qwen3 / mixtral), or over the top-k logits of which one is finite (gpt_oss)
    return torch.ones(x.shape[0], 1)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"])
def test_masking_every_expert_but_one_forces_that_expert(family):
    model = tiny_moe_model(family)
    layer = find_moe_layers(model)[-1]
    keep = 2
    seen = {}
    handles = [layer.block.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0])),
               layer.block.register_forward_hook(lambda m, a, o: seen.__setitem__("y", o[0] if isinstance(o, tuple)
                                                                                   else o))]
    try:
        with torch.no_grad(), mask_experts(model, {layer.index: [e for e in range(layer.num_experts) if e != keep]}):
            model(input_ids=IDS)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        x = seen["x"].reshape(-1, seen["x"].shape[-1])
        expected = _expert_by_hand(model, layer, keep, x) * _lone_gate(model, layer, keep, x)
        for name in layer.shared_experts:
            expected = expected + model.get_submodule(name)(x)
    torch.testing.assert_close(seen["y"].reshape(expected.shape), expected, rtol=1e-5, atol=1e-5)


def test_masking_overrides_a_correction_bias_that_would_pick_the_expert():
    """DeepSeek-V3 chooses by sigmoid + e_score_correction_bias: −inf logits alone leave a biased expert selectable."""
    model = tiny_moe_model("deepseek_v3")
    layer = find_moe_layers(model)[-1]
    with torch.no_grad():
        layer.router.e_score_correction_bias[1] = 10.0
    with torch.no_grad(), RouterRecorder(model) as recorder:
        model(input_ids=IDS)
    assert recorder.stats().frequency(layer.index)[1] == 1.0  # the bias picks expert 1 for every token
    with torch.no_grad(), mask_experts(model, {layer.index: [1]}), RouterRecorder(model) as recorder:
        logits = model(input_ids=IDS).logits
    assert recorder.stats().frequency(layer.index)[1] == 0.0
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_masked_expert_gets_no_token_on_every_family(family):
    model = tiny_moe_model(family)
    layers = find_moe_layers(model)
    with torch.no_grad(), RouterRecorder(model) as recorder:
        before = model(input_ids=IDS).logits
    assert all(recorder.stats().frequency(l.index)[1] > 0 for l in layers)
    with torch.no_grad(), mask_experts(model, {l.index: [1] for l in layers}), RouterRecorder(model) as recorder:
        after = model(input_ids=IDS).logits
    stats = recorder.stats()
    for l in layers:
        assert stats.frequency(l.index)[1] == 0.0
        assert stats.frequency(l.index).sum() == pytest.approx(l.top_k)  # every token still gets top-k experts
    assert not torch.allclose(before, after)
    with torch.no_grad():  # the hooks are gone after the context
        torch.testing.assert_close(model(input_ids=IDS).logits, before)


def _pruned_mixtral(model, drop: int):
    """The same Mixtral with expert ``drop`` cut out of every layer's router and expert weights: what softmax →
    top-k → renormalise over the other experts means, built without any hook."""
    config = tiny_moe_config("mixtral", num_local_experts=model.config.num_local_experts - 1)
    pruned = AutoModelForCausalLM.from_config(config).eval()
    keep = [e for e in range(model.config.num_local_experts) if e != drop]
    state = {}
    for name, value in model.state_dict().items():
        if name.endswith("mlp.gate.weight") or ".mlp.experts." in name:
            value = value[keep]
        state[name] = value
    pruned.load_state_dict(state)
    return pruned


def _forget_sets():
    rows = [{"question": f"w{i} w{i + 1} w{i + 2}", "choices": [f"w{i + 3}", f"w{i + 4} w5", f"w{i + 7}", "w9 w9"],
             "answer": i % 4} for i in range(6)]
    texts = [" ".join(f"w{(i * 7 + j) % 100}" for j in range(5 + i)) for i in range(5)]
    return rows, texts


def test_masking_metric_equals_the_model_without_those_experts(tiny_tokenizer):
    base = tiny_moe_model("mixtral")
    model = get_expert_peft_model(copy.deepcopy(base), {0: [3], 1: [3]}, train_router=False)
    with torch.no_grad():  # edit the selected experts (the masked ones: their edits must not matter)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=1.0)
    rows, texts = _forget_sets()
    result = get_metric("expert_masking")(model, tiny_tokenizer, rows, texts)
    pruned = _pruned_mixtral(base, drop=3)
    assert result["masked"] == {"0": [3], "1": [3]}
    assert result["forget_nll"] == pytest.approx(perplexity(pruned, tiny_tokenizer, texts)["mean_nll"], rel=1e-5)
    pruned_mcq = mcq_accuracy(pruned, tiny_tokenizer, rows, mode="choices", add_special_tokens=True)["accuracy"]
    assert result["forget_mcq"] == pruned_mcq
    assert result["forget_nll_no_attack"] == pytest.approx(perplexity(model, tiny_tokenizer, texts)["mean_nll"])
    assert result["forget_nll_no_attack"] != pytest.approx(result["forget_nll"], rel=1e-3)  # the edits did matter


# ----------------------------------------------------------------------------------------------------------------
# Routing restore
# ----------------------------------------------------------------------------------------------------------------

def _perturbed(model, what: str, layers=None):
    out = copy.deepcopy(model)
    moe = find_moe_layers(out)
    with torch.no_grad():
        for layer in moe if layers is None else [moe[i] for i in layers]:
            module = layer.router if what == "router" else layer.experts
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    return out


RESTORE_FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "granitemoe", "phimoe", "qwen2_moe", "olmoe"]


@pytest.mark.parametrize("family", RESTORE_FAMILIES + ["modulelist"])
def test_restore_after_a_router_only_change_gives_the_base_model(family):
    base = tiny_modulelist_moe_model() if family == "modulelist" else tiny_moe_model(family)
    unlearned = _perturbed(base, "router")
    with torch.no_grad():
        expected = base(input_ids=IDS).logits
        changed = unlearned(input_ids=IDS).logits
        with restore_routing(unlearned, original=base):
            restored = unlearned(input_ids=IDS).logits
    assert (changed - expected).abs().max() > 1e-3  # the router change did change the output
    torch.testing.assert_close(restored, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_restore_after_a_last_layer_expert_change_gives_the_unlearned_model(family):
    base = tiny_moe_model(family)
    unlearned = _perturbed(base, "experts", layers=[-1])  # router untouched, nothing below the last MoE layer moved
    with torch.no_grad():
        own = unlearned(input_ids=IDS).logits
        with restore_routing(unlearned, original=base):
            restored = unlearned(input_ids=IDS).logits
    assert (own - base(input_ids=IDS).logits).abs().max() > 1e-3
    torch.testing.assert_close(restored, own, rtol=1e-5, atol=1e-5)


def test_restore_on_an_adapter_takes_the_routing_with_the_adapter_disabled(tiny_tokenizer):
    base = tiny_moe_model("qwen3_moe")
    model = get_expert_peft_model(copy.deepcopy(base), {1: [0]}, train_router=True)
    with torch.no_grad():  # the adapter changes the router only (LoRA B starts at zero)
        for name, p in model.named_parameters():
            if "modules_to_save" in name and "gate" in name:
                p.copy_(p.flip(0))
    with torch.no_grad():
        expected = base(input_ids=IDS).logits
        assert (model(input_ids=IDS).logits - expected).abs().max() > 1e-3
        with restore_routing(model):
            torch.testing.assert_close(model(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)
    _, texts = _forget_sets()
    result = get_metric("routing_restore")(model, tiny_tokenizer, forget_texts=texts)
    assert result["forget_nll"] == pytest.approx(perplexity(base, tiny_tokenizer, texts)["mean_nll"], rel=1e-5)
    assert result["forget_nll_no_attack"] == pytest.approx(perplexity(model, tiny_tokenizer, texts)["mean_nll"])


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------

def test_attack_on_a_model_without_edited_experts_is_refused(tiny_tokenizer):
    model = tiny_moe_model("qwen3_moe")
    with pytest.raises(MoEUnlearnError, match="records no edited experts.*pass experts="):
        get_metric("expert_masking")(model, tiny_tokenizer, forget_texts=["w1 w2 w3"])
    with pytest.raises(MoEUnlearnError, match="names no expert"):
        edited_experts(model, {})


def test_masking_every_expert_of_a_layer_is_refused():
    model = tiny_moe_model("qwen3_moe")
    with pytest.raises(MoEUnlearnError, match="all 4 routed experts of layer 1"):
        with mask_experts(model, {1: [0, 1, 2, 3]}):
            pass
    with pytest.raises(MoEUnlearnError, match="do not exist"):
        with mask_experts(model, {1: [7]}):
            pass


def test_restore_without_an_original_routing_is_refused(tiny_tokenizer):
    model = tiny_moe_model("qwen3_moe")
    with pytest.raises(MoEUnlearnError, match="no adapter to disable: pass original="):
        with restore_routing(model):
            pass
    with pytest.raises(MoEUnlearnError, match="no adapter to disable"):
        get_metric("routing_restore")(model, tiny_tokenizer, forget_texts=["w1 w2 w3"])
    with pytest.raises(MoEUnlearnError, match="the unlearned model itself"):
        with restore_routing(model, original=model):
            pass


def test_restore_refuses_cached_generation():
    base = tiny_moe_model("qwen3_moe")
    unlearned = _perturbed(base, "router")
    with restore_routing(unlearned, original=base), torch.no_grad():
        with pytest.raises(MoEUnlearnError, match="use_cache=False"):
            unlearned.generate(input_ids=IDS[:1], max_new_tokens=3, do_sample=False)
        out = unlearned.generate(input_ids=IDS[:1], max_new_tokens=3, do_sample=False, use_cache=False)
    assert out.shape == (1, IDS.shape[1] + 3)
