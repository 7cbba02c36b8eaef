"""Expert-selective adapters: only the selected experts (and routers) change, fast, saved as standard PEFT adapters."""

from __future__ import annotations

import collections
import inspect
import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM

from hf_moe_unlearn.adapter import (
    ExpertPeftModel,
    build_model_card,
    expert_lora_config,
    get_expert_peft_model,
    selection_from_config,
)
from hf_moe_unlearn.adapter.convert import layer_to_standard
from hf_moe_unlearn.adapter.model import TRAINING_STATE
from hf_moe_unlearn.errors import MoEUnlearnError
from hf_moe_unlearn.moe import TINY_CONFIGS, config_fingerprint, find_moe_layers, tiny_modulelist_moe_model, tiny_moe_model
from hf_moe_unlearn.moe import tiny as tiny_module
from hf_moe_unlearn.routing.selection import ExpertSelection

FAMILIES = sorted(TINY_CONFIGS) + ["modulelist"]
FULL_MODE_FAMILIES = ["qwen3_moe", "gpt_oss", "deepseek_v3", "modulelist"]
CASES = [(f, "lora") for f in FAMILIES] + [(f, "full") for f in FULL_MODE_FAMILIES]
INPUT_IDS = torch.arange(3, 3 + 2 * 11).remainder(120).add(3).view(2, 11)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(family: str, seed: int = 0):
    return tiny_modulelist_moe_model(seed) if family == "modulelist" else tiny_moe_model(family, seed)


def _selection(model) -> dict[int, list[int]]:
    """Two experts in the last MoE layer and one in the first (when there are two MoE layers)."""
    layers = find_moe_layers(model)
    selection = {layers[-1].index: [0, 2]}
    if len(layers) > 1:
        selection[layers[0].index] = [1]
    return selection


def _train(peft_model, steps: int = 3) -> None:
    """A few AdamW steps (with weight decay) on a random next-token loss: the adapter becomes non-trivial."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (4, 16), generator=generator)
    labels = torch.randint(0, 128, (4, 16), generator=generator)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.1)
    peft_model.train()
    for _ in range(steps):
        logits = peft_model(input_ids=ids).logits
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def _changes(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], num_experts: int) -> dict:
    """``{key: sorted changed expert ids (fused expert tensors) or True}`` for every tensor that differs."""
    out = {}
    for key, value in after.items():
        if torch.equal(value, before[key]):
            continue
        if ".experts." in key and value.dim() >= 2 and value.shape[0] == num_experts and not key.split(".experts.")[1][0].isdigit():
            out[key] = sorted({int(i) for i in (value != before[key]).flatten(1).any(1).nonzero().flatten()})
        else:
            out[key] = True
    return out


def _expected_changes(model, selection: dict[int, list[int]], mode: str) -> tuple[dict[str, list[int]], set[str]]:
    """(fused expert tensors -> selected ids, other keys allowed to change: routers, ModuleList experts)."""
    layers = {layer.index: layer for layer in find_moe_layers(model)}
    fused, others = {}, set()
    for index, experts in selection.items():
        layer = layers[index]
        others |= {f"{layer.router_name}.{n}" for n, _ in layer.router.named_parameters()}
        if layer.fused:
            for name, param in layer.experts.named_parameters(recurse=False):
                if param.dim() == 3 or mode == "full":
                    fused[f"{layer.experts_name}.{name}"] = experts
        else:
            others |= {f"{layer.experts_name}.{e}.{n}" for e in experts for n, _ in layer.experts[e].named_parameters()}
    return fused, others


def _check_only_selected_changed(changes: dict, fused: dict[str, list[int]], others: set[str]) -> None:
    unexpected = {k: v for k, v in changes.items() if k not in fused and k not in others}
    assert not unexpected, f"weights outside the selection changed: {sorted(unexpected)[:5]}"
    for key, experts in fused.items():
        assert changes.get(key) == experts, f"{key}: changed experts {changes.get(key)}, selected {experts}"
    assert any(k in changes for k in others), "neither the routers nor ModuleList experts were trained"


# ----------------------------------------------------------------------------------------------- fresh-process loading
_SUBPROCESS = r'''
import json, sys
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

torch.set_num_threads(1)
manifest = json.load(open(sys.argv[1]))
exec(manifest["modulelist_source"])  # the ModuleList MoE block, as remote code would define it

exec(manifest["changes_source"])  # the same _changes the in-process check uses

results = {}
for case in manifest["cases"]:
    if case["modulelist"]:
        config = AutoConfig.from_pretrained(case["base"])
        base = AutoModelForCausalLM.from_config(config)
        for layer in base.model.layers:
            layer.mlp = ListExpertsMoeBlock(config.hidden_size, config.intermediate_size, config.num_local_experts,
                                            config.num_experts_per_tok)
        base.load_state_dict(load_file(case["base"] + "/weights.safetensors"), strict=True)
    else:
        base = AutoModelForCausalLM.from_pretrained(case["base"], dtype=torch.float32)
    base.eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    expected = load_file(case["expected"])
    ids = expected["input_ids"]
    model = PeftModel.from_pretrained(base, case["adapter"]).eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    merged = model.merge_and_unload().eval()
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    results[case["name"]] = {
        "class": type(model).__name__,
        "logits": (logits - expected["logits"]).abs().max().item(),
        "merged": (merged_logits - expected["logits"]).abs().max().item(),
        "changes": _changes(before, merged.state_dict(), case["num_experts"]),
    }
results["hf_moe_unlearn imported"] = any(m.split(".")[0] == "hf_moe_unlearn" for m in sys.modules)
json.dump(results, open(sys.argv[2], "w"))
'''


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train every family (LoRA; full mode for a few), save base + adapter, and load them all in ONE fresh process
    that never imports hf_moe_unlearn. Returns (in-process records, fresh-process results)."""
    root = tmp_path_factory.mktemp("adapters")
    records, manifest = {}, []
    for family, mode in CASES:
        name = f"{family}-{mode}"
        base = _model(family)
        base_dir, adapter_dir = root / f"{name}-base", root / f"{name}-adapter"
        if family == "modulelist":  # a custom architecture: config + raw weights, rebuilt by the subprocess
            base.config.save_pretrained(base_dir)
            save_file(base.state_dict(), str(base_dir / "weights.safetensors"))
        else:
            base.save_pretrained(base_dir)
        before = {k: v.clone() for k, v in base.state_dict().items()}
        selection = _selection(base)
        peft_model = get_expert_peft_model(base, selection, r=4, lora_alpha=8, mode=mode)
        _train(peft_model)
        logits = _logits(peft_model)
        peft_model.save_pretrained(adapter_dir)
        expected = root / f"{name}-expected.safetensors"
        save_file({"logits": logits, "input_ids": INPUT_IDS}, str(expected))
        num_experts = find_moe_layers(base)[0].num_experts
        merged = peft_model.merge_and_unload()
        records[name] = {
            "family": family, "mode": mode, "selection": selection, "num_experts": num_experts,
            "adapter_dir": adapter_dir, "logits": logits, "fast_merged_logits": _logits(merged),
            "fast_changes": _changes(before, merged.state_dict(), num_experts),
            "expected_changes": _expected_changes(merged, selection, mode),
        }
        manifest.append({"name": name, "base": str(base_dir), "adapter": str(adapter_dir), "expected": str(expected),
                         "modulelist": family == "modulelist", "num_experts": num_experts})
    source = inspect.getsource(tiny_module.ListExpertMLP) + "\n" + inspect.getsource(tiny_module.ListExpertsMoeBlock)
    (root / "manifest.json").write_text(json.dumps({"cases": manifest, "modulelist_source": "import torch\n" + source,
                                                    "changes_source": inspect.getsource(_changes)}))
    (root / "load.py").write_text(_SUBPROCESS)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, str(root / "load.py"), str(root / "manifest.json"), str(root / "results.json")],
        capture_output=True, text=True, cwd=str(root), env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return records, json.loads((root / "results.json").read_text())


def test_fresh_process_does_not_import_hf_moe_unlearn(trained):
    assert trained[1]["hf_moe_unlearn imported"] is False


@pytest.mark.parametrize("family,mode", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_plain_peft_reproduces_trained_logits(trained, family, mode):
    records, results = trained
    result = results[f"{family}-{mode}"]
    assert result["class"] == "PeftModelForCausalLM"
    assert result["logits"] <= 1e-5
    assert result["merged"] <= 1e-5


@pytest.mark.parametrize("family,mode", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_merging_changes_only_selected_experts_and_routers(trained, family, mode):
    records, results = trained
    record = records[f"{family}-{mode}"]
    fused, others = record["expected_changes"]
    _check_only_selected_changed(results[f"{family}-{mode}"]["changes"], fused, others)  # plain PEFT merge
    _check_only_selected_changed(record["fast_changes"], fused, others)  # our merge
    assert (record["fast_merged_logits"] - record["logits"]).abs().max() <= 1e-5


def test_saved_adapter_is_standard_and_records_selection(trained):
    records, _ = trained
    record = records["qwen3_moe-lora"]
    directory = record["adapter_dir"]
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(os.listdir(directory))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # plain PEFT must not warn about unknown keys
        config = LoraConfig.from_pretrained(directory)
    assert selection_from_config(config).experts == record["selection"]
    layer = max(record["selection"])
    # PEFT's own layout: [r*E, in] / [out, r*E], unselected experts exactly zero
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    lora_b = tensors[f"base_model.model.model.layers.{layer}.mlp.experts.base_layer.lora_B.weight"]
    assert lora_b.shape == (64, 4 * 4)
    for expert in range(4):
        columns = [j * 4 + expert for j in range(4)]
        assert (lora_b[:, columns].abs().sum() > 0) == (expert in record["selection"][layer])


# ----------------------------------------------------------------------------------------------- parameter counts
def test_trainable_parameters_are_only_the_selected_experts_and_router(capsys):
    model = tiny_moe_model("qwen3_moe")  # hidden 64, moe_intermediate 32, 4 experts
    peft_model = get_expert_peft_model(model, {1: [0, 2]}, r=4)
    lora = 2 * 4 * (64 + 2 * 32) + 2 * 4 * (32 + 64)  # 2 experts x (gate_up: A r x 64 + B 64 x r ; down: ...)
    assert peft_model.get_nb_trainable_parameters()[0] == lora + 4 * 64
    peft_model.print_trainable_parameters()
    assert f"trainable params: {lora + 256:,}" in capsys.readouterr().out
    no_router = get_expert_peft_model(tiny_moe_model("qwen3_moe"), {1: [0, 2]}, r=4, train_router=False)
    assert no_router.get_nb_trainable_parameters()[0] == lora
    full = get_expert_peft_model(tiny_moe_model("qwen3_moe"), {1: [0, 2]}, mode="full")
    assert full.get_nb_trainable_parameters()[0] == 2 * (2 * 32 * 64 + 64 * 32) + 4 * 64


def _qwen15_on_meta():
    config = AutoConfig.for_model(
        "qwen2_moe", hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
        intermediate_size=5632, moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_experts=60,
        num_experts_per_tok=4, vocab_size=151936, tie_word_embeddings=False,
    )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_seuf_default_on_qwen15_moe_shape_trains_about_006_percent(mode):
    model = _qwen15_on_meta()
    total = sum(p.numel() for p in model.parameters())
    assert 14.2e9 < total < 14.4e9  # Qwen1.5-MoE-A2.7B: 14.3B parameters
    trainable, _ = get_expert_peft_model(model, {12: [7]}, r=8, mode=mode).get_nb_trainable_parameters()
    router = 60 * 2048
    if mode == "lora":
        assert trainable == 8 * (2048 + 2 * 1408) + 8 * (1408 + 2048) + router
        assert trainable / total < 0.0006 / 10  # far below the paper's 0.06%
    else:
        assert trainable == 3 * 2048 * 1408 + router
        assert 0.0005 < trainable / total < 0.0007  # the paper's 0.06%


# ----------------------------------------------------------------------------------------------- bad input
def _other_fingerprint() -> str:
    return config_fingerprint(tiny_moe_model("qwen3_moe", num_experts=8))


@pytest.mark.parametrize(
    "family,selection,kwargs,message",
    [
        ("deepseek_v3", {0: [1]}, {}, "not an MoE layer"),
        ("qwen3_moe", {1: [9]}, {}, "expert(s) [9]"),
        ("qwen3_moe", {}, {}, "names no expert"),
        ("qwen3_moe", "other-model", {}, "another model"),
        ("qwen2_moe", {1: ["shared_expert"]}, {}, "shared experts"),
        ("qwen2_moe", {1: [4]}, {}, "Shared experts (model.layers.1.mlp.shared_expert"),
        ("qwen3_moe", {1: [0]}, {"lora_dropout": 0.1}, "lora_dropout"),
        ("qwen3_moe", {1: [0]}, {"target_modules": ["q_proj"]}, "target_modules"),
        ("qwen3_moe", {1: [0]}, {"mode": "half"}, "mode must be one of"),
        ("qwen3_moe", {1: [0]}, {"r": 0}, "rank r"),
    ],
)
def test_bad_input_fails_before_anything_is_built(family, selection, kwargs, message):
    model = tiny_moe_model(family)
    if selection == "other-model":
        selection = ExpertSelection(experts={1: [0]}, model_fingerprint=_other_fingerprint())
    for build in (get_expert_peft_model, expert_lora_config):
        with pytest.raises(MoEUnlearnError, match=re.escape(message)):
            build(model, selection, **kwargs)
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_refuses_a_model_that_is_already_a_peft_model():
    model = get_expert_peft_model(tiny_moe_model("qwen3_moe"), {1: [0]})
    with pytest.raises(MoEUnlearnError, match="already carries a PEFT adapter"):
        get_expert_peft_model(model, {1: [1]})


# ----------------------------------------------------------------------------------------------- the fast layer
class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.bool_index = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops[name] += 1
        if name in ("aten.index", "aten.index_put", "aten.index_put_"):
            indices = args[1] if len(args) > 1 else []
            self.bool_index += any(i is not None and i.dtype == torch.bool for i in indices)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_fast_layer_never_syncs_and_keeps_grouped_mm(family, mode):
    model = tiny_moe_model(family)
    router = find_moe_layers(model)[1].router
    peft_model = get_expert_peft_model(model, {1: [0, 2]}, mode=mode, **({"init_lora_weights": False} if mode == "lora" else {}))
    layer = peft_model.fast_layers()["model.layers.1.mlp.experts"]
    if mode == "full":
        with torch.no_grad():
            for delta in layer.lora_delta["default"].values():
                delta.normal_(std=0.05)
    x = torch.randn(40, 64, requires_grad=True)
    with torch.no_grad():
        outputs = router(x)
    index = next(t for t in outputs if not t.is_floating_point())
    weights = next(t for t in outputs[1:] if t.is_floating_point())
    forward, backward = _OpRecorder(), _OpRecorder()
    with forward:
        y = layer(x, index, weights)
    with backward:
        y.square().sum().backward()
    for recorder in (forward, backward):
        assert not {"aten.nonzero", "aten._local_scalar_dense", "aten.masked_select", "aten.item"} & set(recorder.ops)
        assert recorder.bool_index == 0
    assert forward.ops["aten._grouped_mm"] == 2  # all experts, one grouped GEMM per projection, no per-expert loop
    with torch.no_grad():
        stock = layer.get_base_layer()(x, index, weights)
        ours = layer(x, index, weights)
    untouched = ~((index == 0) | (index == 2)).any(-1)
    assert untouched.any() and (~untouched).any()
    assert torch.equal(ours[untouched], stock[untouched])  # tokens of unselected experts: bit-identical
    assert not torch.equal(ours[~untouched], stock[~untouched])


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_gradients_equal_peft_reference_implementation(family):
    """Same adapter in our layer and in PEFT's ParamWrapper (all experts): same logits, same LoRA gradients."""
    ours_model = get_expert_peft_model(tiny_moe_model(family), {1: [0, 2]}, r=4, init_lora_weights=False, train_router=False)
    reference_base = tiny_moe_model(family)
    reference = get_peft_model(reference_base, expert_lora_config(reference_base, {1: [0, 2]}, r=4, train_router=False))
    layer = ours_model.fast_layers()["model.layers.1.mlp.experts"]
    standard = layer_to_standard(layer, "model.layers.1.mlp.experts")
    loaded = {k.replace(".weight", ".default.weight"): v for k, v in standard.items()}
    assert reference.load_state_dict(loaded, strict=False).unexpected_keys == []
    ids = torch.randint(3, 120, (2, 12), generator=torch.Generator().manual_seed(1))
    ours_logits, reference_logits = ours_model(input_ids=ids).logits, reference(input_ids=ids).logits
    assert (ours_logits - reference_logits).abs().max() < 1e-5
    ours_logits.square().mean().backward()
    reference_logits.square().mean().backward()
    with torch.no_grad():  # convert our gradients with the same converter as the weights
        for name in layer.weight_names:
            layer.lora_A["default"][name].copy_(layer.lora_A["default"][name].grad)
            layer.lora_B["default"][name].copy_(layer.lora_B["default"][name].grad)
    ours_grads = layer_to_standard(layer, "model.layers.1.mlp.experts")
    wrapper = reference.base_model.model.model.layers[1].mlp.experts
    reference_grads = {}
    for prefix, module in (("", wrapper), ("base_layer.", wrapper.base_layer)):
        for ab in ("lora_A", "lora_B"):
            reference_grads[f"base_model.model.model.layers.1.mlp.experts.{prefix}{ab}.weight"] = getattr(module, ab)["default"].weight.grad
    for key, grad in reference_grads.items():
        assert torch.allclose(ours_grads[key], grad, atol=1e-7, rtol=1e-4), key


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("experts", [[2], [0, 2]])
def test_input_gradient_equals_the_merged_experts(family, experts):
    """The gradient our layer passes down to the layer input (what lower selected layers train on) equals that of
    transformers' own experts forward with the adapter merged into the weights; one selected expert takes the
    matmul path, several the batched one."""
    model = tiny_moe_model(family)
    router = find_moe_layers(model)[1].router
    peft_model = get_expert_peft_model(model, {1: experts}, init_lora_weights=False)
    layer = peft_model.fast_layers()["model.layers.1.mlp.experts"]
    x = torch.randn(40, 64, requires_grad=True)
    with torch.no_grad():
        outputs = router(x)
    index = next(t for t in outputs if not t.is_floating_point())
    weights = next(t for t in outputs[1:] if t.is_floating_point())
    assert any((index == e).any() for e in experts)
    ours = layer(x, index, weights)
    (ours_grad,) = torch.autograd.grad(ours.square().sum(), x)
    layer.merge()
    merged = layer.get_base_layer()(x, index, weights)
    (merged_grad,) = torch.autograd.grad(merged.square().sum(), x)
    assert torch.allclose(ours, merged, atol=1e-5)
    assert torch.allclose(ours_grad, merged_grad, atol=1e-5)
    layer.unmerge()  # the stock experts without the adapter: a different gradient, so the check above has teeth
    (base_grad,) = torch.autograd.grad(layer.get_base_layer()(x, index, weights).square().sum(), x)
    assert not torch.allclose(ours_grad, base_grad, atol=1e-5)


def test_backward_stops_below_the_lowest_selected_layer():
    model = tiny_moe_model("qwen3_moe", num_hidden_layers=4)
    peft_model = get_expert_peft_model(model, {2: [1]})
    seen = {}
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, (out[0] if isinstance(out, tuple) else out).requires_grad))
    peft_model.train()
    for checkpointing in (False, True):
        if checkpointing:
            peft_model.activation_checkpointing_enable()
        peft_model(input_ids=INPUT_IDS).logits.sum().backward()
        assert seen == {0: False, 1: False, 2: True, 3: True}, f"checkpointing={checkpointing}: {seen}"
        assert not model.get_input_embeddings().weight.requires_grad
        assert getattr(model, "_require_grads_hook", None) is None  # enable_input_require_grads never in effect


def test_disabled_adapter_is_exactly_the_base_model():
    base = tiny_moe_model("qwen3_moe")
    reference = _logits(base)
    peft_model = get_expert_peft_model(base, {1: [0, 2]}, init_lora_weights=False)
    assert not torch.equal(_logits(peft_model), reference)
    with peft_model.disable_adapter():  # what NPO-style losses use for reference log-probs
        assert torch.equal(_logits(peft_model), reference)


def test_bfloat16_model_trains_with_float32_adapter_weights():
    model = tiny_moe_model("qwen3_moe").to(torch.bfloat16)
    peft_model = get_expert_peft_model(model, {1: [0, 2]})
    lora = {n: p.dtype for n, p in peft_model.named_parameters() if "lora_" in n}
    assert lora and set(lora.values()) == {torch.float32}  # PEFT's master weights; the router copy stays bf16
    logits = peft_model(input_ids=INPUT_IDS).logits
    assert logits.dtype == torch.bfloat16
    logits.float().square().mean().backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert all(grads[n].dtype == torch.float32 for n in lora)


# ----------------------------------------------------------------------------------------------- round trips / resume
@pytest.mark.parametrize("family,mode", [("qwen3_moe", "lora"), ("gpt_oss", "lora"), ("gpt_oss", "full"), ("modulelist", "lora")])
def test_saved_adapter_reloads_into_the_fast_model(trained, family, mode):
    records, _ = trained
    record = records[f"{family}-{mode}"]
    exact = ExpertPeftModel.from_pretrained(_model(family), record["adapter_dir"])  # uses the exact training state
    assert torch.equal(_logits(exact), record["logits"])
    assert not any(p.requires_grad for p in exact.parameters())
    os.rename(record["adapter_dir"] / TRAINING_STATE, record["adapter_dir"] / "moved")
    try:
        if family == "modulelist":  # mixtral-type ModuleList experts are saved merged: LoRA factors not recoverable
            with pytest.raises(MoEUnlearnError, match="merged"):
                ExpertPeftModel.from_pretrained(_model(family), record["adapter_dir"])
            return
        converted = ExpertPeftModel.from_pretrained(_model(family), record["adapter_dir"], is_trainable=True)
        assert (_logits(converted) - record["logits"]).abs().max() <= 1e-5
        assert any(p.requires_grad for p in converted.parameters())
        if mode == "lora":  # the conversion is a pure re-layout
            for (name, a), (_, b) in zip(exact.named_parameters(), converted.named_parameters()):
                assert torch.equal(a, b), name
    finally:
        os.rename(record["adapter_dir"] / "moved", record["adapter_dir"] / TRAINING_STATE)


def test_load_adapter_refuses_another_selection(trained):
    records, _ = trained
    other = get_expert_peft_model(tiny_moe_model("qwen3_moe"), {1: [3]}, r=4, lora_alpha=8)
    with pytest.raises(MoEUnlearnError, match="selection"):
        other.load_adapter(records["qwen3_moe-lora"]["adapter_dir"], "default", is_trainable=True)


def test_trainer_saves_our_format_and_resumes(tmp_path):
    from transformers import Trainer, TrainingArguments

    def model():
        return get_expert_peft_model(tiny_moe_model("qwen3_moe"), {1: [0, 2]}, r=4)

    data = [{"input_ids": INPUT_IDS[0], "labels": INPUT_IDS[0]} for _ in range(8)]
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, save_strategy="steps", save_steps=2,
                report_to=[], use_cpu=True, disable_tqdm=True, learning_rate=1e-2, logging_steps=100,
                lr_scheduler_type="constant")
    first = model()
    Trainer(model=first, args=TrainingArguments(max_steps=2, **args), train_dataset=data).train()
    checkpoint = tmp_path / "checkpoint-2"
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert selection_from_config(config).experts == {1: [0, 2]}
    assert "base_model.model.model.layers.1.mlp.experts.lora_A.weight" in load_file(str(checkpoint / "adapter_model.safetensors"))
    resumed = model()
    loaded = []
    load_adapter = resumed.load_adapter

    def spy(*args, **kwargs):  # what the Trainer loads when it resumes
        result = load_adapter(*args, **kwargs)
        loaded.append({n: p.detach().clone() for n, p in resumed.named_parameters() if p.requires_grad})
        return result

    resumed.load_adapter = spy
    trainer = Trainer(model=resumed, args=TrainingArguments(max_steps=3, **args), train_dataset=data)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 3
    saved = load_file(str(checkpoint / TRAINING_STATE))
    assert len(loaded) == 1 and set(loaded[0]) == set(saved)
    assert all(torch.equal(loaded[0][n], saved[n]) for n in saved)
    moved = [n for n, p in resumed.named_parameters() if p.requires_grad and not torch.equal(p.detach(), saved[n])]
    assert moved, "resumed training did not start from (and move away from) the checkpoint"


# ----------------------------------------------------------------------------------------------- model card / Hub
def _card_selection() -> ExpertSelection:
    return ExpertSelection(experts={3: [5], 7: [1, 2]}, method="seuf", scores={3: {5: 0.41}, 7: {1: 0.2, 2: 0.1}})


def test_model_card_names_base_method_losses_experts_and_results():
    card = build_model_card(
        "Qwen/Qwen1.5-MoE-A2.7B", _card_selection(), method="GA+SEUF", losses={"ga": 1.0, "router_anchor": 1.0},
        eval_results={"wmdp_cyber": {"accuracy": 0.299}, "mmlu": {"accuracy": 0.501}}, r=8,
    )
    reparsed = type(card)(str(card))  # what the Hub parses back
    assert reparsed.data.base_model == "Qwen/Qwen1.5-MoE-A2.7B"
    assert reparsed.data.library_name == "peft"
    assert "base_model:adapter:Qwen/Qwen1.5-MoE-A2.7B" in reparsed.data.tags
    results = {(r.dataset_name, r.metric_type): r.metric_value for r in reparsed.data.eval_results}
    assert results == {("wmdp_cyber", "accuracy"): 0.299, ("mmlu", "accuracy"): 0.501}
    text = reparsed.text
    for needle in ("GA+SEUF", "1 × ga + 1 × router_anchor", "| 3 | 5 | 0.41 |", "| 7 | 1, 2 | 0.2, 0.1 |", "LoRA (rank 8)",
                   "PeftModel.from_pretrained"):
        assert needle in text, needle


def test_model_card_without_results_or_hub_id():
    card = build_model_card("/local/checkpoint", {1: [0]}, method="trace", losses=["npo", "retain_nll"])
    assert card.data.base_model is None and not card.data.eval_results
    assert "No evaluation results" in card.text and "npo, retain_nll" in card.text


def test_push_to_hub_uploads_adapter_and_card(monkeypatch):
    from huggingface_hub import HfApi

    uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        uploaded["repo"] = repo_id
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded["files"] = sorted(os.listdir(folder_path))
        uploaded["readme"] = open(os.path.join(folder_path, "README.md")).read()
        uploaded["config"] = json.load(open(os.path.join(folder_path, "adapter_config.json")))
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    peft_model = get_expert_peft_model(tiny_moe_model("qwen3_moe"), {1: [0, 2]})
    peft_model.card_info.update(method="NPO+SEUF", losses=["npo", "router_anchor"])
    assert peft_model.push_to_hub("me/unlearned", eval_results={"wmdp/accuracy": 0.27}) == "commit"
    assert uploaded["repo"] == "me/unlearned"
    assert uploaded["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert "NPO+SEUF" in uploaded["readme"] and "router_anchor" in uploaded["readme"] and "0.27" in uploaded["readme"]
    assert selection_from_config(uploaded["config"]).experts == {1: [0, 2]}


def test_adapter_imports_no_training_extras():
    code = "import sys, hf_moe_unlearn.adapter; print(sorted({'trl', 'datasets', 'evaluate'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
