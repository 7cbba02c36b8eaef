"""Routing stability (hf_moe_unlearn.evaluation.routing_stability) and its logged form in the trainer, against hand
counts on tiny models whose router was edited so that the tokens that change are known in advance:

- swapping two rows (experts a, b) of the last MoE layer's router swaps their logits, so a token's top-k set
  changes exactly when one of a, b is in it (layers below are untouched: unchanged);
- a large bias on expert e (GPT-OSS routers have one) puts e in every token's top-k, so the set changes exactly
  for the tokens whose top-k lacked e.
The base model's top-k is read by a hook written here, not by the recorder the metric uses.
"""

from __future__ import annotations

import copy

import pytest
import torch

from hf_moe_unlearn import MoEUnlearnError, find_moe_layers, get_expert_peft_model, tiny_moe_model
from hf_moe_unlearn.data.text import PaddingCollator, tokenize_dataset
from hf_moe_unlearn.evaluation import get_metric, routing_stability

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RETAIN = [" ".join(f"w{(3 * i + 5 * j) % 120}" for j in range(4 + 2 * i)) for i in range(6)]  # unequal lengths: padding
FORGET = [" ".join(f"w{(11 * i + 7 * j) % 120}" for j in range(9 - i)) for i in range(5)]


def _base_topk(model, tokenizer, texts) -> dict[int, torch.Tensor]:
    """Per MoE layer, the base model's top-k ids [counted tokens, k], by a plain router hook."""
    layers = find_moe_layers(model)
    seen: dict[int, list[torch.Tensor]] = {l.index: [] for l in layers}
    handles = [l.router.register_forward_hook(
        lambda m, a, o, i=l.index: seen[i].append(next(t for t in o if not t.is_floating_point()))) for l in layers]
    data = tokenize_dataset(texts, tokenizer)
    batch = PaddingCollator(tokenizer.pad_token_id)([dict(r) for r in data])
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    counted = ((batch["labels"] != -100) & batch["attention_mask"].bool()).reshape(-1)
    return {i: torch.cat(v)[counted] for i, v in seen.items()}


def _swap_rows(router_weight: torch.Tensor, a: int, b: int) -> None:
    with torch.no_grad():
        router_weight[[a, b]] = router_weight[[b, a]].clone()


def _changed_by_swap(topk: torch.Tensor, a: int, b: int) -> torch.Tensor:
    has_a, has_b = (topk == a).any(-1), (topk == b).any(-1)
    return has_a ^ has_b


def test_stability_counts_the_tokens_a_row_swap_moves(tiny_tokenizer):
    base = tiny_moe_model("qwen3_moe")
    unlearned = copy.deepcopy(base)
    last = find_moe_layers(unlearned)[-1]
    _swap_rows(last.router.weight, 0, 2)
    retain_topk, forget_topk = _base_topk(base, tiny_tokenizer, RETAIN), _base_topk(base, tiny_tokenizer, FORGET)
    retain_changed = _changed_by_swap(retain_topk[last.index], 0, 2).float()
    forget_changed = _changed_by_swap(forget_topk[last.index], 0, 2).float()
    assert 0 < retain_changed.mean() < 1 and 0 < forget_changed.mean() < 1  # the test can tell right from wrong

    result = routing_stability(unlearned, tiny_tokenizer, RETAIN, FORGET, original=base)
    assert result["retain_tokens"] == retain_changed.numel()
    assert result["layers"]["L0"] == {"retain_unchanged": 1.0, "forget_changed": 0.0}
    assert result["layers"]["L1"]["retain_unchanged"] == pytest.approx(1 - float(retain_changed.mean()))
    assert result["layers"]["L1"]["forget_changed"] == pytest.approx(float(forget_changed.mean()))
    assert result["retain_unchanged"] == pytest.approx((1 + 1 - float(retain_changed.mean())) / 2)
    assert result["retain_unchanged_all_layers"] == pytest.approx(1 - float(retain_changed.mean()))
    assert result["forget_changed_any_layer"] == pytest.approx(float(forget_changed.mean()))


def test_stability_counts_the_tokens_a_bias_pulls_in(tiny_tokenizer):
    base = tiny_moe_model("gpt_oss")
    unlearned = copy.deepcopy(base)
    last = find_moe_layers(unlearned)[-1]
    with torch.no_grad():
        last.router.bias[3] += 100.0
    topk = _base_topk(base, tiny_tokenizer, RETAIN)[last.index]
    changed = (~(topk == 3).any(-1)).float()
    assert 0 < changed.mean() < 1
    result = get_metric("routing_stability")(unlearned, tiny_tokenizer, RETAIN, original=base, layers=[last.index])
    assert list(result["layers"]) == [f"L{last.index}"]
    assert result["retain_unchanged"] == pytest.approx(1 - float(changed.mean()))
    assert "forget_changed" not in result


def test_stability_of_an_adapter_compares_with_the_adapter_disabled(tiny_tokenizer):
    base = tiny_moe_model("qwen3_moe")
    model = get_expert_peft_model(copy.deepcopy(base), {1: [0]}, train_router=True)
    trained = next(p for n, p in model.named_parameters() if "modules_to_save" in n and "layers.1.mlp.gate" in n)
    _swap_rows(trained, 1, 3)
    changed = _changed_by_swap(_base_topk(base, tiny_tokenizer, RETAIN)[1], 1, 3).float()
    result = routing_stability(model, tiny_tokenizer, RETAIN)
    assert result["layers"]["L1"]["retain_unchanged"] == pytest.approx(1 - float(changed.mean()))
    assert result["layers"]["L0"]["retain_unchanged"] == 1.0


def test_stability_without_an_original_routing_is_refused(tiny_tokenizer):
    with pytest.raises(MoEUnlearnError, match="routing stability needs the routing of the model before unlearning"):
        routing_stability(tiny_moe_model("qwen3_moe"), tiny_tokenizer, RETAIN)


# ----------------------------------------------------------------------------------------------------------------
# The logged metric
# ----------------------------------------------------------------------------------------------------------------

def test_trainer_logs_retain_topk_stability_against_the_start(tmp_path, tiny_tokenizer):
    """One retain text, so every step's retain batch is the same: the value logged at a step must equal the
    evaluation metric on that text with the weights the step started from (taken by a callback at step begin)."""
    from transformers import TrainerCallback

    from hf_moe_unlearn import MoEUnlearnConfig, MoEUnlearnTrainer

    retain = [RETAIN[5]]
    expected: dict[int, dict] = {}

    class AtStepBegin(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            expected[state.global_step + 1] = routing_stability(model, tiny_tokenizer, retain, layers=[1])

    config = MoEUnlearnConfig(
        output_dir=str(tmp_path), forget_loss="ga", retain_loss="nll", max_steps=4,
        per_device_train_batch_size=1, learning_rate=20.0, optim="sgd", anchor_loss_weight=0.0, logging_steps=2, logging_first_step=True,
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, lr_scheduler_type="constant",
        lora_r=2, lora_alpha=4,
    )
    trainer = MoEUnlearnTrainer(tiny_moe_model("qwen3_moe"), config, forget_dataset=FORGET, retain_dataset=retain,
                                processing_class=tiny_tokenizer, selection={1: [0, 2]}, callbacks=[AtStepBegin()])
    trainer.train()
    logged = {row["step"]: row for row in trainer.state.log_history if "route/L1/retain_topk_stable" in row}
    assert sorted(logged) == [1, 2, 4]  # logging_first_step, then every 2 steps; no extra forward elsewhere
    assert logged[1]["route/L1/retain_topk_stable"] == 1.0  # nothing has moved before the first update
    for step, row in logged.items():
        assert row["route/L1/retain_topk_stable"] == pytest.approx(expected[step]["retain_unchanged"], abs=1e-6)
        assert row["route/retain_topk_stable"] == row["route/L1/retain_topk_stable"]  # one selected layer
    assert min(row["route/L1/retain_topk_stable"] for row in logged.values()) < 1.0  # the router did move
