"""Full-expert SEUF (``mode="full"``) with reference-based losses: ``disable_adapter()`` is the frozen start model.

The independent reference is a ``copy.deepcopy`` of the plain model taken before wrapping. Inside the context the
selected experts (fused 3-D tensors of every layout, or ``ModuleList`` experts) and the trained routers must compute
exactly as that copy does; outside it, as the trained model; and entering it must change neither the next
gradients nor which parameters train. The memory kept for the reference is measured too: the original weights are
never copied, the only extra state is the selected experts' slices.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_moe_unlearn.adapter import ExpertPeftModel, get_expert_peft_model
from hf_moe_unlearn.moe import find_moe_layers, tiny_modulelist_moe_model, tiny_moe_model

FAMILIES = ["qwen3_moe", "gpt_oss", "mixtral", "deepseek_v3", "modulelist"]  # gpt_oss: transposed, with biases
INPUT_IDS = torch.arange(3, 3 + 2 * 11).remainder(120).add(3).view(2, 11)
EXACT = dict(rtol=0.0, atol=1e-6)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(family: str) -> nn.Module:
    return tiny_modulelist_moe_model(0) if family == "modulelist" else tiny_moe_model(family, 0)


def _selection(model: nn.Module) -> dict[int, list[int]]:
    """Two experts of the last MoE layer and one of the first (when there are two)."""
    layers = find_moe_layers(model)
    selection = {layers[-1].index: [0, 2]}
    if len(layers) > 1:
        selection[layers[0].index] = [1]
    return selection


def _wrapped(family: str, train_router: bool = True) -> tuple[ExpertPeftModel, nn.Module]:
    """(full-mode expert PEFT model, deep copy of the plain model taken before wrapping)."""
    model = _model(family)
    reference = copy.deepcopy(model).eval()
    return get_expert_peft_model(model, _selection(model), mode="full", train_router=train_router), reference


def _loss(logits: torch.Tensor, reference_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy, plus a KL to the reference when given (what NPO/KL-style losses look like)."""
    labels = INPUT_IDS.roll(-1, dims=1)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    if reference_logits is not None:
        loss = loss + F.kl_div(logits.log_softmax(-1), reference_logits.log_softmax(-1), log_target=True,
                               reduction="batchmean")
    return loss


def _train(peft_model: ExpertPeftModel, steps: int = 3) -> None:
    """A few plain SGD steps (large rate): the selected experts and routers move far from the start."""
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (4, 16), generator=generator)
    for _ in range(steps):
        logits = peft_model(input_ids=ids).logits
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.roll(-1, 1).reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad()


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _grads(model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _tensors(output) -> list[torch.Tensor]:
    """The tensors of a module output (a tensor or a tuple of them), detached."""
    items = output if isinstance(output, (tuple, list)) else (output,)
    return [t.detach().clone() for t in items if isinstance(t, torch.Tensor)]


@contextmanager
def _recording(modules: list[nn.Module]) -> Iterator[list[list[torch.Tensor]]]:
    """Record the outputs of ``modules`` (one list per call) while the context is open."""
    seen: list[list[torch.Tensor]] = []
    handles = [m.register_forward_hook(lambda _m, _a, out: seen.append(_tensors(out))) for m in modules]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _routers(model: nn.Module, reference: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(routers as the PEFT model calls them: PEFT's modules_to_save wrappers, the reference's routers)."""
    names = [layer.router_name for layer in find_moe_layers(reference) if layer.index in _selection(reference)]
    base = model.get_base_model()
    return [base.get_submodule(n) for n in names], [reference.get_submodule(n) for n in names]


def _assert_same(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> None:
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        assert len(x) == len(y)
        for s, t in zip(x, y):
            torch.testing.assert_close(s, t, **EXACT)


def _differs(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> bool:
    return any(not torch.allclose(s.float(), t.float(), atol=1e-4) for x, y in zip(a, b) for s, t in zip(x, y))


# ----------------------------------------------------------------------------------------------- logits and routers
@pytest.mark.parametrize("family", FAMILIES)
def test_disabled_adapter_is_the_start_model_and_exit_restores_the_trained_one(family):
    peft_model, reference = _wrapped(family, train_router=True)
    _train(peft_model)
    peft_model.eval()
    routers, reference_routers = _routers(peft_model, reference)
    with _recording(routers) as trained_routes:
        trained = _logits(peft_model)
    with _recording(reference_routers) as start_routes:
        start = _logits(reference)
    assert (trained - start).abs().max() > 1e-2, "training did not change the model: the test would prove nothing"
    assert _differs(trained_routes, start_routes), "the routers did not train"

    with peft_model.disable_adapter(), _recording(routers) as inside_routes:
        inside = _logits(peft_model)
    torch.testing.assert_close(inside, start, **EXACT)
    _assert_same(inside_routes, start_routes)  # train_router=True: the original router decides inside

    with _recording(routers) as after_routes:
        after = _logits(peft_model)
    torch.testing.assert_close(after, trained, **EXACT)
    _assert_same(after_routes, trained_routes)


def test_merged_full_adapter_still_gives_the_start_model():
    """After ``merge_adapter`` (the base tensors hold base + delta), disabling unmerges, as PEFT's LoRA layers do."""
    peft_model, reference = _wrapped("gpt_oss")
    _train(peft_model)
    peft_model.eval()
    trained = _logits(peft_model)
    peft_model.merge_adapter()
    torch.testing.assert_close(_logits(peft_model), trained, rtol=0.0, atol=1e-5)
    with peft_model.disable_adapter():
        torch.testing.assert_close(_logits(peft_model), _logits(reference), rtol=0.0, atol=1e-5)
    torch.testing.assert_close(_logits(peft_model), trained, rtol=0.0, atol=1e-5)


# ----------------------------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("family", FAMILIES)
def test_reference_pass_leaves_the_training_gradients_unchanged(family):
    peft_model, reference = _wrapped(family)
    _train(peft_model)
    peft_model.eval()  # deterministic: the same loss twice must give the same gradients bit for bit
    trainable = _trainable(peft_model)

    def plain() -> torch.Tensor:
        return _loss(peft_model(input_ids=INPUT_IDS).logits)

    before = _grads(peft_model, plain)
    assert set(before) == trainable and all(g.abs().sum() > 0 for g in before.values())

    # As the trainer does it: training forward, reference forward inside the context (no grad), then backward.
    def with_independent_reference() -> torch.Tensor:
        return _loss(peft_model(input_ids=INPUT_IDS).logits, _logits(reference))

    def with_disabled_adapter() -> torch.Tensor:
        logits = peft_model(input_ids=INPUT_IDS).logits
        with torch.no_grad(), peft_model.disable_adapter():
            reference_logits = peft_model(input_ids=INPUT_IDS).logits
        return _loss(logits, reference_logits)

    expected = _grads(peft_model, with_independent_reference)
    through_context = _grads(peft_model, with_disabled_adapter)
    assert set(through_context) == set(expected) == trainable
    for name in expected:
        torch.testing.assert_close(through_context[name], expected[name], **EXACT, msg=name)

    assert _trainable(peft_model) == trainable
    after = _grads(peft_model, plain)  # the next step, after having been in the context
    assert set(after) == set(before)
    for name in before:
        assert torch.equal(after[name], before[name]), name


@pytest.mark.parametrize("family", ["gpt_oss", "modulelist"])
def test_exception_inside_the_context_restores_the_trained_model(family):
    peft_model, _ = _wrapped(family)
    _train(peft_model)
    peft_model.eval()
    trained, trainable = _logits(peft_model), _trainable(peft_model)
    with pytest.raises(RuntimeError, match="inside"):
        with peft_model.disable_adapter():
            raise RuntimeError("inside")
    torch.testing.assert_close(_logits(peft_model), trained, **EXACT)
    assert _trainable(peft_model) == trainable


def test_frozen_model_stays_frozen_after_the_context():
    """PEFT's own exit marks the adapter trainable again; a model loaded for inference must stay frozen."""
    peft_model, _ = _wrapped("qwen3_moe")
    for param in peft_model.parameters():
        param.requires_grad_(False)
    with peft_model.disable_adapter():
        pass
    assert _trainable(peft_model) == set()


# ----------------------------------------------------------------------------------------------- memory
def _storage_bytes(model: nn.Module) -> int:
    """Bytes of every distinct storage behind the model's parameters and buffers (tied weights counted once)."""
    storages = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@pytest.mark.parametrize("train_router", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_reference_costs_only_the_selected_experts_slices(family, train_router):
    """The originals are the base tensors themselves (never copied, never written by training); what full mode
    adds is one slice per selected expert (fused: ``S x`` a row of each expert tensor, biases included;
    ``ModuleList``: PEFT's copy of each selected expert), the trained routers' copies, and the selected ids."""
    model = _model(family)
    selection = _selection(model)
    layers = {layer.index: layer for layer in find_moe_layers(model)}
    start = copy.deepcopy(model)
    before = _storage_bytes(model)
    base_tensors = {}
    expected = 0
    for index, experts in selection.items():
        layer = layers[index]
        if layer.fused:
            for name, param in layer.experts.named_parameters(recurse=False):
                slice_bytes = param[0].numel() * param.element_size()
                expected += len(experts) * slice_bytes
                assert len(experts) * slice_bytes < param.numel() * param.element_size()
                base_tensors[f"{layer.experts_name}.{name}"] = param
            expected += 3 * len(experts) * torch.tensor(0).element_size()  # selected_ids + window_bounds (int64)
        else:
            expected += sum(_module_bytes(layer.experts[e]) for e in experts)
        if train_router:
            expected += _module_bytes(layer.router)

    peft_model = get_expert_peft_model(model, selection, mode="full", train_router=train_router)
    assert _storage_bytes(peft_model) - before == expected
    _train(peft_model)
    base = peft_model.get_base_model()
    for name, original in base_tensors.items():
        experts_name, _, tensor_name = name.rpartition(".")
        kept = getattr(base.get_submodule(experts_name).get_base_layer(), tensor_name)
        assert kept is original  # the very tensor, not a copy
        assert torch.equal(kept, start.get_parameter(name)), f"training wrote the original weights of {name}"


# ----------------------------------------------------------------------------------------------- through the trainer
def test_trainer_reference_logits_are_the_start_model_in_full_mode(tmp_path, tiny_tokenizer):
    """NPO + KL through MoEUnlearnTrainer on a full-mode model: every reference it hands the losses is the start
    model's output (the model is passed already wrapped, so the trainer's adapter flag is not involved)."""
    from hf_moe_unlearn.config import MoEUnlearnConfig
    from hf_moe_unlearn.losses import get_loss, register_loss
    from hf_moe_unlearn.losses.registry import unregister_loss
    from hf_moe_unlearn.trainer import MoEUnlearnTrainer

    model = tiny_moe_model("qwen3_moe")
    reference = copy.deepcopy(model).eval()
    peft_model = get_expert_peft_model(model, {1: [0, 2]}, mode="full")
    npo = get_loss("npo", kind="forget")
    seen = []

    @register_loss("npo_recorded", kind="forget", requires=("forget_logits", "reference"))
    def npo_recorded(ctx):
        batch = ctx.forget_batch
        seen.append((batch["input_ids"], batch["attention_mask"], ctx.reference_logits("forget").clone(),
                     ctx.forget_logits.detach().clone()))
        return npo(ctx)

    forget = [" ".join(f"w{(i * 3) % 20}" for i in range(j, j + 12)) for j in range(8)]
    retain = [" ".join(f"w{40 + (i * 7) % 80}" for i in range(j, j + 12)) for j in range(8)]
    args = MoEUnlearnConfig(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                            learning_rate=5e-2, report_to="none", disable_tqdm=True, use_cpu=True, save_strategy="no",
                            seed=0, forget_loss="npo_recorded", retain_loss="kl")
    try:
        trainer = MoEUnlearnTrainer(peft_model, args, forget_dataset=forget, retain_dataset=retain,
                                    processing_class=tiny_tokenizer)
        trainer.train()
    finally:
        unregister_loss("npo_recorded")
    assert len(seen) == 3
    for input_ids, attention_mask, reference_logits, _ in seen:
        with torch.no_grad():
            start = reference(input_ids=input_ids, attention_mask=attention_mask).logits
        torch.testing.assert_close(reference_logits, start, **EXACT)
    torch.testing.assert_close(seen[0][3], seen[0][2], **EXACT)  # step 0: the model is its own reference
    assert (seen[-1][3] - seen[-1][2]).abs().max() > 1e-3, "the experts did not train"
