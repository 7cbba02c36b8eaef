"""MoEUnlearnTrainer computes what methods.md defines, checked against the unwrapped base model by hand.

Each test here failed on the code before issue 9: the softmax anchor of sigmoid routers once wrapped by PEFT,
the train-mode (random) reference of PhiMoE, RMU steering the MoE block instead of the residual stream, and
configurations whose anchor or RMU term could not move any parameter.
"""

import pytest
import torch

from hf_moe_unlearn.config import MoEUnlearnConfig
from hf_moe_unlearn.errors import MoEUnlearnError
from hf_moe_unlearn.moe import find_moe_layers, tiny_moe_model
from hf_moe_unlearn.routing import RouterRecorder
from hf_moe_unlearn.trainer import MoEUnlearnTrainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FORGET = [" ".join(f"w{(i * 3) % 20}" for i in range(j, j + 10)) for j in range(8)]
RETAIN = [" ".join(f"w{40 + (i * 7) % 80}" for i in range(j, j + 10)) for j in range(8)]
SIGMOID_FAMILIES = ["deepseek_v3", "glm4_moe", "glm4_moe_lite", "dots1", "exaone_moe", "afmoe", "lfm2_moe",
                    "minimax_m2"]


def _args(tmp_path, **kw):
    defaults = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, report_to="none",
                    disable_tqdm=True, use_cpu=True, logging_steps=1, save_strategy="no", seed=0)
    defaults.update(kw)
    return MoEUnlearnConfig(**defaults)


def _trainer(tmp_path, tokenizer, model, selection, forget=FORGET, retain=RETAIN, **kw):
    return MoEUnlearnTrainer(model, _args(tmp_path, **kw), forget_dataset=forget, retain_dataset=retain,
                             processing_class=tokenizer, selection=selection)


def _forget_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return batch, {k: v for k, v in batch.items() if not k.startswith("retain_")}


def _router_outputs(model, layer_index, batch):
    """(logits [N, E], top-k indices [N, k]) of one router of a plain model, read with our own hook."""
    (layer,) = [l for l in find_moe_layers(model) if l.index == layer_index]
    seen = {}

    def hook(module, inputs, output):
        tensors = [t for t in (output if isinstance(output, tuple) else (output,)) if torch.is_tensor(t)]
        seen["indices"] = next(t for t in tensors if not t.is_floating_point())
        seen["logits"] = next(t for t in tensors if t.is_floating_point() and t.shape[-1] == layer.num_experts)

    handle = layer.router.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        handle.remove()
    return seen["logits"].reshape(-1, layer.num_experts).float(), seen["indices"].reshape(-1, layer.top_k)


@pytest.mark.parametrize("family", SIGMOID_FAMILIES)
def test_sigmoid_router_anchor_and_probabilities_inside_trainer(tmp_path, tiny_tokenizer, family):
    reference_model = tiny_moe_model(family)
    layer_index = find_moe_layers(reference_model)[-1].index
    trainer = _trainer(tmp_path, tiny_tokenizer, tiny_moe_model(family), {layer_index: [1]}, retain=None,
                       retain_loss="none", forget_loss="ga")  # train_router=True: the router is a PEFT wrapper
    _, forget = _forget_batch(trainer)
    logits, indices = _router_outputs(reference_model, layer_index, forget)
    scores = logits.sigmoid()
    probs = scores / scores.sum(-1, keepdim=True)
    counted = ((forget["labels"] != -100) & forget["attention_mask"].bool()).reshape(-1).float()
    # the paper's g: probabilities kept on each token's top-k, not renormalised
    g = torch.zeros_like(probs).scatter(1, indices, probs.gather(1, indices))
    target = torch.zeros_like(g)
    target[:, 1] = 1.0
    expected_anchor = (((g - target) ** 2).sum(-1) * counted).sum() / counted.sum()

    captured = {}
    original = trainer.anchor_loss_fn

    def spy(ctx):
        captured["anchor"] = original(ctx)
        return captured["anchor"]

    trainer.anchor_loss_fn = spy
    trainer.model.train()
    trainer.compute_loss(trainer.model, next(iter(trainer.get_train_dataloader())))
    torch.testing.assert_close(captured["anchor"].detach(), expected_anchor, rtol=1e-5, atol=1e-6)

    recorder = RouterRecorder(trainer.model, layers=[layer_index])
    with recorder, torch.no_grad():
        recorder.set_mask(counted.reshape(forget["labels"].shape))
        trainer.model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"], use_cache=False)
    mean_probability = recorder.stats().mean_probability(layer_index)
    expected = (probs * counted[:, None]).sum(0) / counted.sum()
    torch.testing.assert_close(torch.as_tensor(mean_probability, dtype=torch.float32), expected, rtol=1e-5,
                               atol=1e-6)


def test_phimoe_reference_is_the_eval_mode_model_and_npo_starts_at_zero(tmp_path, tiny_tokenizer, monkeypatch):
    """PhiMoE routes at random in train mode (jitter, sampled sparsemixer): NPO's log-ratio ℓθ − ℓref must still
    be exactly 0 at step 0, and the reference equal the eval-mode base model's logits."""
    from hf_moe_unlearn.losses import functional as LF

    trainer = _trainer(tmp_path, tiny_tokenizer, tiny_moe_model("phimoe"), {1: [0]}, forget_loss="npo",
                       retain_loss="nll")
    log_ratios, reference_logits = [], []
    original_npo = LF.npo_loss
    original_sequence_nll = LF.sequence_nll

    def npo_spy(nll_sum, ref_nll_sum, beta):
        log_ratios.append((nll_sum - ref_nll_sum).detach())
        return original_npo(nll_sum, ref_nll_sum, beta)

    def sequence_nll_spy(logits, labels):
        if not logits.requires_grad:
            reference_logits.append(logits.detach())
        return original_sequence_nll(logits, labels)

    monkeypatch.setattr(LF, "npo_loss", npo_spy)
    monkeypatch.setattr(LF, "sequence_nll", sequence_nll_spy)
    batch, forget = _forget_batch(trainer)
    trainer.model.train()  # what Trainer.training_step does before compute_loss
    trainer.compute_loss(trainer.model, batch)
    assert torch.equal(log_ratios[0], torch.zeros_like(log_ratios[0]))
    with torch.no_grad():
        base = tiny_moe_model("phimoe").eval()(input_ids=forget["input_ids"],
                                              attention_mask=forget["attention_mask"], use_cache=False).logits
    torch.testing.assert_close(reference_logits[0], base, rtol=1e-5, atol=1e-5)
    # modes are restored: the Trainer's train mode outside the MoE blocks
    assert trainer.model.training and trainer.model.get_input_embeddings().training


def test_rmu_steers_the_residual_stream_and_reaches_every_trainable_layer(tmp_path, tiny_tokenizer):
    """RMU's hidden state is the decoder layer's output (WMDP: model.layers[ℓ]), equal to the base model's
    hidden_states[ℓ + 1]; with ℓ = the highest selected layer every selected expert gets a forget gradient."""
    trainer = _trainer(tmp_path, tiny_tokenizer, tiny_moe_model("qwen3_moe", num_hidden_layers=3),
                       {0: [0, 1], 1: [2]}, forget_loss="rmu", retain_loss="rmu_retain", anchor_loss_weight=0.0,
                       rmu_layer=1)
    captured = {}
    original = trainer.forget_loss_fn

    def spy(ctx):
        captured["model"] = ctx.hidden_states("forget", False)
        captured["reference"] = ctx.hidden_states("forget", True)
        return original(ctx)

    trainer.forget_loss_fn = spy
    batch, forget = _forget_batch(trainer)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        hidden = tiny_moe_model("qwen3_moe", num_hidden_layers=3).eval()(
            input_ids=forget["input_ids"], attention_mask=forget["attention_mask"], output_hidden_states=True,
            use_cache=False).hidden_states
    torch.testing.assert_close(captured["reference"], hidden[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(captured["model"].detach(), hidden[2], rtol=1e-5, atol=1e-5)  # LoRA B = 0
    loss.backward()
    grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad and "lora_A" in n}
    assert grads and all(g is not None and g.abs().sum() == 0 for g in grads.values())  # B = 0: A gets none
    b_grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad and "lora_B" in n}
    assert {n.split("layers.")[1].split(".")[0] for n in b_grads} == {"0", "1"}
    assert all(g is not None and g.abs().sum() > 0 for g in b_grads.values()), sorted(b_grads)


def test_rmu_layer_must_cover_the_trainable_parameters(tmp_path, tiny_tokenizer):
    with pytest.raises(MoEUnlearnError, match="no trainable parameter lies at or\\s+below it"):
        _trainer(tmp_path, tiny_tokenizer, tiny_moe_model("qwen3_moe"), {1: [0]}, forget_loss="rmu",
                 retain_loss="rmu_retain", anchor_loss_weight=0.0, train_router=False, rmu_layer=0)
    with pytest.raises(MoEUnlearnError, match="above it"):
        _trainer(tmp_path, tiny_tokenizer, tiny_moe_model("qwen3_moe"), {0: [0], 1: [0]}, forget_loss="rmu",
                 retain_loss="rmu_retain", anchor_loss_weight=0.0, rmu_layer=0)
    with pytest.raises(MoEUnlearnError, match="not a decoder layer"):
        _trainer(tmp_path, tiny_tokenizer, tiny_moe_model("qwen3_moe"), {1: [0]}, forget_loss="rmu",
                 retain_loss="rmu_retain", rmu_layer=5)


def test_anchor_without_a_gradient_path_is_refused(tmp_path, tiny_tokenizer):
    # layer 1's router frozen and nothing trainable below it: the anchor would be a constant
    with pytest.raises(MoEUnlearnError, match="nothing trainable can change the router"):
        _trainer(tmp_path, tiny_tokenizer, tiny_moe_model("qwen3_moe"), {1: [0]}, train_router=False)
    # experts of layer 0 train, so layer 1's router logits do move; layer 0's router is the frozen one
    with pytest.raises(MoEUnlearnError, match="router\\s+logits of layer 0"):
        _trainer(tmp_path, tiny_tokenizer, tiny_moe_model("qwen3_moe"), {0: [0], 1: [0]}, train_router=False)
    _trainer(tmp_path, tiny_tokenizer, tiny_moe_model("qwen3_moe"), {1: [0]}, train_router=False,
             anchor_loss_weight=0.0)
    _trainer(tmp_path, tiny_tokenizer, tiny_moe_model("qwen3_moe"), {1: [0]}, train_router=True)


def test_reentrant_checkpointing_is_refused_when_hooks_feed_a_loss(tmp_path, tiny_tokenizer):
    reentrant = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(MoEUnlearnError, match="use_reentrant"):
        _trainer(tmp_path, tiny_tokenizer, tiny_moe_model("qwen3_moe"), {1: [0]}, **reentrant)
    with pytest.raises(MoEUnlearnError, match="use_reentrant"):
        _trainer(tmp_path, tiny_tokenizer, tiny_moe_model("qwen3_moe"), {1: [0]}, anchor_loss_weight=0.0,
                 forget_loss="rmu", retain_loss="rmu_retain", **reentrant)
    # nothing read from hooks feeds this run's loss: allowed
    _trainer(tmp_path, tiny_tokenizer, tiny_moe_model("qwen3_moe"), {1: [0]}, anchor_loss_weight=0.0, **reentrant)
    # kwargs without use_reentrant get the non-reentrant default
    args = _args(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"preserve_rng_state": True})
    assert args.gradient_checkpointing_kwargs == {"preserve_rng_state": True, "use_reentrant": False}


def test_unknown_anchor_form_is_one_clear_line(tmp_path):
    with pytest.raises(MoEUnlearnError, match="anchor_form='topk' is not one of masked_softmax, full_softmax"):
        _args(tmp_path, anchor_form="topk")
    with pytest.raises(MoEUnlearnError, match="seuf_score='prob' is not one of masked_softmax, gate"):
        _args(tmp_path, seuf_score="prob")


def test_full_expert_mode_trains_with_reference_losses(tmp_path, tiny_tokenizer):
    """adapter='full' (the SEUF paper trains the whole expert) with NPO + KL: the reference is the start model
    (the base tensors stay untouched; tests/test_full_reference.py checks the logits), so NPO starts at
    (2/β)·log 2 and KL at 0."""
    import math

    trainer = _trainer(tmp_path, tiny_tokenizer, tiny_moe_model("qwen3_moe"), {1: [0]}, adapter="full",
                       forget_loss="npo", retain_loss="kl", optim="sgd", learning_rate=0.1)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["forget_loss"] == pytest.approx(2 / 0.1 * math.log(2), rel=1e-4)
    assert logged["retain_loss"] == pytest.approx(0.0, abs=1e-6)
