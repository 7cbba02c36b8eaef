"""MoEUnlearnTrainer end to end on tiny models: losses by name, SEUF anchor, TRACE weights, errors, resume."""

import os

import numpy as np
import pytest
import torch

from hf_moe_unlearn.config import MoEUnlearnConfig
from hf_moe_unlearn.errors import MoEUnlearnError
from hf_moe_unlearn.losses import register_loss
from hf_moe_unlearn.losses.registry import unregister_loss
from hf_moe_unlearn.moe import tiny_moe_model
from hf_moe_unlearn.routing import ExpertSelection
from hf_moe_unlearn.trainer import MoEUnlearnTrainer

FORGET = [" ".join(f"w{(i * 3) % 20}" for i in range(j, j + 12)) for j in range(16)]
RETAIN = [" ".join(f"w{40 + (i * 7) % 80}" for i in range(j, j + 12)) for j in range(16)]


def _args(tmp_path, **kw):
    defaults = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, report_to="none",
                    disable_tqdm=True, use_cpu=True, logging_steps=1, save_strategy="no", seed=0)
    defaults.update(kw)
    return MoEUnlearnConfig(**defaults)


def _trainer(tmp_path, tokenizer, model=None, selection=None, forget=FORGET, retain=RETAIN, **kw):
    model = model if model is not None else tiny_moe_model("qwen3_moe")
    return MoEUnlearnTrainer(model, _args(tmp_path, **kw), forget_dataset=forget, retain_dataset=retain,
                             processing_class=tokenizer, selection=selection)


@pytest.mark.parametrize("forget_loss,retain_loss", [("ga", "nll"), ("npo", "kl"), ("simnpo", "none"),
                                                     ("rmu", "rmu_retain")])
def test_losses_train_and_log(tmp_path, tiny_tokenizer, forget_loss, retain_loss):
    trainer = _trainer(tmp_path, tiny_tokenizer, selection={1: [0]}, forget_loss=forget_loss, retain_loss=retain_loss)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert "forget_loss" in logged and "anchor_loss" in logged and "route/L1E0/forget" in logged
    assert ("retain_loss" in logged) == (retain_loss != "none")
    if retain_loss != "none":
        assert "route/L1E0/retain" in logged
    if forget_loss == "npo":  # at step 0 the model is its own reference: NPO = (2/β)·log 2
        assert logged["forget_loss"] == pytest.approx(2 / 0.1 * np.log(2), rel=0.05)


def test_only_selected_expert_and_router_change(tmp_path, tiny_tokenizer):
    model = tiny_moe_model("qwen3_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _trainer(tmp_path, tiny_tokenizer, model=model, selection={1: [2]}, learning_rate=1e-2, max_steps=3)
    trainer.train()
    merged = trainer.model.merge_and_unload().state_dict()
    changed = {k for k in before if not torch.equal(before[k], merged[k])}
    assert changed == {"model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj",
                       "model.layers.1.mlp.gate.weight"}
    for name in ("gate_up_proj", "down_proj"):
        key = f"model.layers.1.mlp.experts.{name}"
        diff = (before[key] != merged[key]).flatten(1).any(1)
        assert diff.tolist() == [False, False, True, False]


def test_trace_weights_match_hand_reference(tmp_path, tiny_tokenizer):
    selection = ExpertSelection({0: [1], 1: [3]}, method="trace",
                                stats={"ratio": {0: {1: 3.0}, 1: {3: 20.0}}})
    trainer = _trainer(tmp_path, tiny_tokenizer, selection=selection, retain_weighting="trace", anchor_loss_weight=0)
    captured = {}
    original = trainer.weighting_fn

    def spy(ctx):
        captured["w"] = original(ctx)
        captured["topk"] = {k: v.clone() for k, v in ctx.retain_topk.items()}
        captured["batch"] = ctx.retain_batch
        return captured["w"]

    trainer.weighting_fn = spy
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.compute_loss(trainer.model, batch)
    retain = captured["batch"]
    # Hand computation: raw weight of token t from its routing; term with target labels[t] uses token t-1.
    B, T = retain["input_ids"].shape
    raw = torch.ones(B * T)
    for layer, expert, ratio in ((0, 1, 3.0), (1, 3, 10.0)):  # 20 is capped at w_max = 10
        hit = (captured["topk"][layer] == expert).any(-1).float()
        raw += hit * (ratio - 1)
    raw = raw.reshape(B, T)
    counted = (retain["labels"][:, 1:] != -100) & (retain["attention_mask"][:, 1:] > 0)
    expected = torch.zeros(B, T)
    expected[:, 1:] = raw[:, :-1] * counted
    expected = expected / expected[:, 1:][counted].mean()
    expected = expected.clamp(max=10.0)
    torch.testing.assert_close(captured["w"].float(), expected, rtol=1e-5, atol=1e-6)
    assert captured["w"][:, 1:][counted].mean().item() == pytest.approx(1.0, abs=0.05)


def test_seuf_anchor_prevents_routing_shortcut(tmp_path):
    """The routing shortcut SEUF describes, on a tiny MoE that has learned the forget data (micro synthetic
    benchmark, 25 epochs, ~5 s): when the router can move faster than the expert changes (LoRA scale 0.01 here),
    gradient ascent sends forget tokens away from the knowledgeable expert; the anchor keeps them there.

    Measured when written: share 0.39 before; 0.12 without the anchor, 0.83 with it. (With the default LoRA scale
    the expert degrades first and GA routes *more* tokens to it: 0.80 / 0.83 — no shortcut.)"""
    import datasets
    from transformers import AutoModelForCausalLM

    from hf_moe_unlearn.bench.pretrain import PretrainSettings, pretrain_models
    from hf_moe_unlearn.bench.synthetic import BenchmarkSpec, make_benchmark
    from hf_moe_unlearn.routing import attribute_experts, select_seuf

    datasets.disable_progress_bars()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-reproducible pre-training, and fast on a busy 2-core machine
    try:
        bench = make_benchmark(BenchmarkSpec.preset("micro"))
        pair = pretrain_models(bench, tmp_path / "pre", settings=PretrainSettings.preset("small", epochs=25.0))
        forget = list(bench.forget_text["text"])
        selection = select_seuf(attribute_experts(pair.target, forget, pair.tokenizer, show_progress=False))
        (layer, expert), = selection.pairs

        def share(model):
            stats = attribute_experts(model, forget, pair.tokenizer, show_progress=False)
            return stats.frequency(layer)[expert]

        start = share(pair.target)
        after = {}
        for weight in (0.0, 1.0):
            trainer = MoEUnlearnTrainer(
                AutoModelForCausalLM.from_pretrained(pair.target_path),
                _args(tmp_path / str(weight), forget_loss="ga", retain_loss="none", anchor_loss_weight=weight,
                      learning_rate=1e-2, max_steps=30, per_device_train_batch_size=8, lora_alpha=0.01,
                      forget_loss_bound=None),
                forget_dataset=forget, processing_class=pair.tokenizer, selection=selection,
            )
            trainer.train()
            after[weight] = share(trainer.model.merge_and_unload())
    finally:
        torch.set_num_threads(threads)
    assert after[0.0] < 0.5 * start, (start, after)  # the shortcut
    assert after[1.0] > start, (start, after)  # the anchor keeps (here: raises) the share


def test_trace_calibration_protects_retain_tokens_of_the_selected_expert(tmp_path, tiny_tokenizer):
    """What TRACE's weighting is for. GradDiff (GA on forget + NLL on retain) on one selected expert, run twice with
    the same config and seed, with and without TRACE weights; plain SGD, so parameters move by their gradients (after
    a few Adam steps from a zero LoRA B every weight has moved by about ±lr whatever the loss). With f_F/f_R = 4 the
    retain tokens routed to the expert weigh ~2 and the others ~0.5, so the retain term must protect exactly the
    expert's retain tokens more: their NLL, measured unweighted against the untrained model's routing (read with a
    hook on the router), ends clearly lower with TRACE, the other retain tokens gain nothing comparable, and GA still
    unlearns the forget tokens the expert handles. The expert is in the last layer, so its LoRA changes only the
    predictions made at positions routed to it (the trained router moves the others a little).

    Measured when written (seed 0): retain NLL gain on the expert's tokens 0.021 without TRACE, 0.231 with it; on the
    other retain tokens 2e-5 / 5e-4; forget NLL rise on the expert's tokens 0.0103 / 0.0084. With the weighting
    replaced by all-ones weights the two runs are identical and the test fails.
    """
    layer, expert = 1, 0
    splits = {"forget": FORGET, "retain": RETAIN}

    def per_prediction(model):
        """Per split, over its unpadded texts: the NLL of every next-token prediction, and whether the position
        that made it has ``expert`` in its top-k at ``layer`` (the router's integer output)."""
        seen = {}
        handle = model.model.layers[layer].mlp.gate.register_forward_hook(
            lambda module, inputs, output: seen.__setitem__("topk", next(t for t in output if not t.is_floating_point()))
        )
        out = {}
        try:
            with torch.no_grad():
                for split, texts in splits.items():
                    nll, hit = [], []
                    for text in texts:
                        ids = tiny_tokenizer(text)["input_ids"] + [tiny_tokenizer.eos_token_id]
                        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
                        nll.append(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none"))
                        hit.append((seen["topk"].reshape(len(ids), -1)[:-1] == expert).any(-1))
                    out[split] = torch.cat(nll), torch.cat(hit)
        finally:
            handle.remove()
        return out

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-reproducible, and fast on a busy 2-core machine
    try:
        start = per_prediction(tiny_moe_model("qwen3_moe"))
        after = {}
        for weighting in ("none", "trace"):
            selection = ExpertSelection({layer: [expert]}, method="trace", stats={"ratio": {layer: {expert: 4.0}}})
            trainer = _trainer(tmp_path / weighting, tiny_tokenizer, selection=selection, retain_weighting=weighting,
                               forget_loss="ga", retain_loss="nll", anchor_loss_weight=0, optim="sgd",
                               learning_rate=1.0, lr_scheduler_type="constant", max_steps=8, logging_steps=8)
            trainer.train()
            after[weighting] = per_prediction(trainer.model.merge_and_unload().eval())
    finally:
        torch.set_num_threads(threads)
    retain_nll, routed = start["retain"]
    gain = {w: (retain_nll - after[w]["retain"][0])[routed].mean().item() for w in after}
    other_gain = {w: (retain_nll - after[w]["retain"][0])[~routed].mean().item() for w in after}
    forget_nll, forget_routed = start["forget"]
    forget_rise = {w: (after[w]["forget"][0] - forget_nll)[forget_routed].mean().item() for w in after}
    # TRACE's extra protection of the expert's retain tokens exceeds the whole effect of the unweighted retain term...
    assert gain["trace"] - gain["none"] > max(abs(gain["none"]), 1e-3), gain
    # ...and is specific to them (the other retain tokens are down-weighted, and the expert does not touch them)...
    assert gain["trace"] - gain["none"] > 10 * abs(other_gain["trace"] - other_gain["none"]), (gain, other_gain)
    # ...while gradient ascent still raises the NLL of the forget tokens routed to the expert, about as much.
    assert forget_rise["trace"] > 0.5 * forget_rise["none"] > 0, forget_rise


def test_forget_loss_bound_stops_and_keeps_checkpoint(tmp_path, tiny_tokenizer):
    trainer = _trainer(tmp_path, tiny_tokenizer, selection={1: [0]}, forget_loss="ga", retain_loss="none",
                       learning_rate=0.5, max_steps=30, save_strategy="steps", save_steps=1, forget_loss_bound=5.0)
    with pytest.raises(MoEUnlearnError, match="forget loss is .* training stopped"):
        trainer.train()
    checkpoints = sorted(os.listdir(tmp_path / "out"))
    assert checkpoints and all(os.path.exists(tmp_path / "out" / c / "adapter_model.safetensors") for c in checkpoints)


def test_resume_from_checkpoint_gives_same_adapter(tmp_path, tiny_tokenizer):
    full = _trainer(tmp_path / "a", tiny_tokenizer, selection={1: [0]}, max_steps=4, save_strategy="steps",
                    save_steps=2, learning_rate=1e-2)
    full.train()
    resumed = _trainer(tmp_path / "a2", tiny_tokenizer, selection={1: [0]}, max_steps=4, save_strategy="steps",
                       save_steps=2, learning_rate=1e-2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))
    a = {k: v for k, v in full.model.state_dict().items() if "lora" in k}
    b = {k: v for k, v in resumed.model.state_dict().items() if "lora" in k}
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_custom_loss_by_name(tmp_path, tiny_tokenizer):
    calls = []

    @register_loss("half_ga", kind="forget", requires=("forget_logits",))
    def half_ga(ctx):
        from hf_moe_unlearn.losses import ga_loss

        calls.append(1)
        return 0.5 * ga_loss(ctx.forget_logits, ctx.forget_batch["labels"])

    try:
        trainer = _trainer(tmp_path, tiny_tokenizer, selection={1: [0]}, forget_loss="half_ga", max_steps=1)
        trainer.train()
        assert calls
    finally:
        unregister_loss("half_ga")


def test_bad_input_errors(tmp_path, tiny_tokenizer):
    with pytest.raises(MoEUnlearnError, match="Unknown forget loss 'nope'.*ga"):
        _trainer(tmp_path, tiny_tokenizer, selection={1: [0]}, forget_loss="nope")
    with pytest.raises(MoEUnlearnError, match="forget set is empty"):
        _trainer(tmp_path, tiny_tokenizer, selection={1: [0]}, forget=[])
    with pytest.raises(MoEUnlearnError, match="needs a retain dataset"):
        _trainer(tmp_path, tiny_tokenizer, selection={1: [0]}, retain=None)
    with pytest.raises(MoEUnlearnError, match="'I don't know' answers"):
        _trainer(tmp_path, tiny_tokenizer, selection={1: [0]}, forget_loss="idk_dpo")
    with pytest.raises(MoEUnlearnError, match="layer 7, which is not an MoE layer"):
        _trainer(tmp_path, tiny_tokenizer, selection={7: [0]})
    with pytest.raises(MoEUnlearnError, match="retain_weighting"):
        _args(tmp_path, retain_weighting="sometimes")
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, vocab_size=128))
    with pytest.raises(MoEUnlearnError, match="no Mixture-of-Experts layer"):
        _trainer(tmp_path, tiny_tokenizer, model=dense)


@pytest.mark.parametrize("forget_loss", ["idk_nll", "idk_dpo"])
def test_idk_loss_with_prompt_answer_data(tmp_path, tiny_tokenizer, forget_loss):
    import math

    forget = [{"prompt": "w1 w2 w3", "answer": "w4 w5", "idk": "w9 w9"} for _ in range(4)]
    retain = [{"prompt": "w50 w51", "answer": "w52 w53"} for _ in range(4)]
    trainer = _trainer(tmp_path, tiny_tokenizer, selection={1: [0]}, forget_loss=forget_loss, forget=forget,
                       retain=retain, max_steps=1)
    trainer.train()
    logged = trainer.state.log_history[0]
    if forget_loss == "idk_dpo":  # θ = ref at the first step: −(2/β)·log σ(0) = 20·log 2 with β = 0.1
        assert logged["forget_loss"] == pytest.approx(20 * math.log(2), rel=1e-3)
    else:
        assert math.isfinite(logged["forget_loss"])


def test_hf_argument_parser_roundtrip(tmp_path):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(MoEUnlearnConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--forget_loss", "npo", "--anchor_loss_weight", "0",
         "--retain_weighting", "trace", "--max_steps", "3"])
    assert args.forget_loss == "npo" and args.anchor_loss_weight == 0 and args.retain_weighting == "trace"
    again = MoEUnlearnConfig(**{k: v for k, v in args.to_dict().items() if k in MoEUnlearnConfig.__dataclass_fields__
                                and MoEUnlearnConfig.__dataclass_fields__[k].init})
    assert again.forget_loss == "npo" and again.retain_weighting == "trace"


def test_gradient_checkpointing_and_accumulation(tmp_path, tiny_tokenizer):
    trainer = _trainer(tmp_path, tiny_tokenizer, selection={1: [0]}, gradient_checkpointing=True,
                       gradient_accumulation_steps=2, per_device_train_batch_size=2, forget_loss="npo",
                       retain_loss="kl", retain_weighting="trace", max_steps=2)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert np.isfinite(logged["loss"]) and "route/L1E0/retain" in logged
    # the embeddings never require grad: the backward stops at the lowest selected layer
    assert not trainer.model.get_input_embeddings().weight.requires_grad


def test_bf16_mixed_precision(tmp_path, tiny_tokenizer):
    trainer = _trainer(tmp_path, tiny_tokenizer, selection={1: [0]}, bf16=True, forget_loss="npo", max_steps=1)
    trainer.train()
    assert np.isfinite(trainer.state.log_history[0]["loss"])


def test_forget_examples_without_counted_tokens(tmp_path, tiny_tokenizer):
    # answers cut off entirely by max_length: no example keeps a label-bearing token
    forget = [{"prompt": "w1 w2 w3 w4 w5 w6", "answer": "w7"} for _ in range(3)]
    with pytest.raises(MoEUnlearnError, match="The forget set has no counted token: no example keeps a label"):
        _trainer(tmp_path, tiny_tokenizer, selection={1: [0]}, forget=forget, max_length=4)


def test_trained_model_carries_no_trainer_hooks(tmp_path, tiny_tokenizer):
    import copy

    trainer = _trainer(tmp_path, tiny_tokenizer, selection={1: [0]}, forget_loss="rmu", retain_loss="rmu_retain",
                       max_steps=1)
    trainer.train()
    merged = trainer.model.merge_and_unload()
    assert all(not m._forward_hooks for m in merged.modules())
    copy.deepcopy(merged)  # RMU's captured hidden states once made this fail
