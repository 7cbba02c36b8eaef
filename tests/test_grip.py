"""GRIP's router constraint (router_constraint="grip"): after training, the retain inputs' router logits are those of
the start model, while the forget inputs' may move; without it they move (so these tests can fail).

The reference is computed here, independently of hf_moe_unlearn.routing.grip: a forward hook of the test's own on
the trained layer's router reads its inputs, and the logits are ``W h + b`` with the start weights (PEFT's frozen
``original_module``) and the trained ones (``modules_to_save``). Only layer 1 (the top MoE layer) trains, so its
router inputs are the same before and after training: the logits compared are also those the trained model uses.
The retain set has ~25 counted tokens for hidden size 64: its inputs span a subspace, the null space is not empty.
"""

import json

import pytest
import torch

from hf_moe_unlearn.cli import main
from hf_moe_unlearn.config import MoEUnlearnConfig
from hf_moe_unlearn.data.text import counted_mask
from hf_moe_unlearn.errors import MoEUnlearnError
from hf_moe_unlearn.moe import find_moe_layers, tiny_moe_model
from hf_moe_unlearn.moe.tiny import TINY_CONFIGS
from hf_moe_unlearn.routing import ExpertSelection
from hf_moe_unlearn.routing.grip import GripProjection, protected_directions
from hf_moe_unlearn.trainer import MoEUnlearnTrainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FORGET = [" ".join(f"w{(i * 3) % 20}" for i in range(j, j + 10)) for j in range(8)]
RETAIN = [" ".join(f"w{40 + (i * 7) % 80}" for i in range(j, j + 8)) for j in range(0, 9, 3)]  # 3 x 8 tokens
LAYER = 1


def _trainer(tmp_path, tokenizer, family="qwen3_moe", retain=RETAIN, **kw):
    defaults = dict(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, report_to="none",
                    disable_tqdm=True, use_cpu=True, logging_steps=1, save_strategy="no", seed=0,
                    max_param_norm_growth=None, forget_loss_bound=None)
    defaults.update(kw)
    return MoEUnlearnTrainer(tiny_moe_model(family), MoEUnlearnConfig(**defaults), forget_dataset=FORGET,
                             retain_dataset=retain, processing_class=tokenizer, selection={LAYER: [0]})


def _router_inputs(trainer, data) -> torch.Tensor:
    """The counted tokens' inputs to the trained router, [N, H], read by a hook of the test's own."""
    router = trainer.moe_layers[LAYER].router
    seen = []
    handle = router.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    rows = []
    try:
        with torch.no_grad():
            for i in range(len(data)):
                batch = trainer.data_collator([dict(data[i])])
                trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                h = seen.pop()
                h = h.reshape(-1, h.shape[-1])
                rows.append(h[counted_mask(batch).reshape(-1).bool()])
    finally:
        handle.remove()
    return torch.cat(rows).double()


def _weights(trainer):
    """(start, trained) ``[W | b]`` of the trained router, float64 (b: a zero column for routers without bias)."""
    router = trainer.moe_layers[LAYER].router

    def matrix(module):
        params = dict(module.named_parameters())
        w = params["weight"].detach().double()
        b = params["bias"].detach().double() if "bias" in params else torch.zeros(w.shape[0], dtype=torch.float64)
        return torch.cat([w, b[:, None]], dim=1)

    return matrix(router.original_module), matrix(router.modules_to_save["default"])


def _logit_changes(trainer):
    """Change of the router logits of the retain and the forget inputs, [N, E] each, and the inputs' [h, 1]."""
    start, trained = _weights(trainer)
    change = trained - start
    out = {}
    for name, data in (("retain", trainer.train_dataset.retain), ("forget", trainer.train_dataset.forget)):
        h = _router_inputs(trainer, data)
        h1 = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], dim=1)
        out[name] = (h1 @ change.T, h1 @ start.T, h1)
    return out, change


CASES = [  # family (gpt_oss: a router bias), optimizer, learning rate, losses
    ("qwen3_moe", "adamw_torch", 5e-2, dict(forget_loss="ga", retain_loss="nll")),  # + SEUF anchor (default on)
    ("gpt_oss", "sgd", 2.0, dict(forget_loss="npo", retain_loss="kl", retain_weighting="trace")),
    ("mixtral", "sgd", 50.0, dict(forget_loss="ga", retain_loss="none", anchor_loss_weight=0.0)),
    ("qwen3_moe", "adamw_torch", 5e-2, dict(forget_loss="rmu", retain_loss="rmu_retain")),
    ("gpt_oss", "adamw_torch", 5e-2, dict(forget_loss="ga", retain_loss="nll", anchor_loss_weight=0.0)),
]


@pytest.mark.parametrize("family,optim,lr,losses", CASES, ids=[f"{c[0]}-{c[1]}-{c[3]['forget_loss']}" for c in CASES])
def test_grip_keeps_retain_router_logits(tmp_path, tiny_tokenizer, family, optim, lr, losses):
    # ε far below the float64 noise of the retain span's eigenvalues: the null space is the whole orthogonal
    # complement of the retain inputs, so their logits must not move beyond float32 rounding.
    trainer = _trainer(tmp_path, tiny_tokenizer, family, optim=optim, learning_rate=lr,
                       router_constraint="grip", grip_rank_cutoff=1e-12, **losses)
    trainer.train()
    changes, change = _logit_changes(trainer)
    retain_change, retain_logits, _ = changes["retain"]
    forget_change, _, _ = changes["forget"]
    assert change.abs().max() > 1e-2  # the router did train
    scale = retain_logits.abs().max()
    assert retain_change.abs().max() < 1e-5 * scale, retain_change.abs().max() / scale
    assert forget_change.abs().max() > 1e-2 * scale  # forget routing is free to move (in the null space)


@pytest.mark.parametrize("family,optim,lr,losses", CASES[:3], ids=[f"{c[0]}-{c[1]}" for c in CASES[:3]])
def test_without_grip_retain_router_logits_move(tmp_path, tiny_tokenizer, family, optim, lr, losses):
    trainer = _trainer(tmp_path, tiny_tokenizer, family, optim=optim, learning_rate=lr, **losses)
    trainer.train()
    changes, _ = _logit_changes(trainer)
    retain_change, retain_logits, _ = changes["retain"]
    assert retain_change.abs().max() > 1e-2 * retain_logits.abs().max()


def test_projecting_the_gradient_instead_is_not_enough_with_adamw(tmp_path, tiny_tokenizer):
    """Why the update is projected, not the gradient: AdamW rescales each coordinate of a null-space gradient, and
    the step leaves the null space (measured: ~10% of the logit scale here, against < 1e-5 for the update)."""
    from transformers import TrainerCallback

    from hf_moe_unlearn.routing.grip import GripCallback

    class ProjectGradient(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            for layer in trainer.grip.layers.values():
                grad = layer.params.weight.grad
                grad.copy_(grad - (grad @ layer.directions) @ layer.directions.T)

    trainer = _trainer(tmp_path, tiny_tokenizer, optim="adamw_torch", learning_rate=5e-2, router_constraint="grip",
                       grip_rank_cutoff=1e-12)
    handler = trainer.callback_handler
    handler.callbacks = [c for c in handler.callbacks if not isinstance(c, GripCallback)]
    trainer.add_callback(ProjectGradient())
    trainer.train()
    changes, _ = _logit_changes(trainer)
    retain_change, retain_logits, _ = changes["retain"]
    assert retain_change.abs().max() > 1e-2 * retain_logits.abs().max()


def test_default_cutoff_bound(tmp_path, tiny_tokenizer):
    """With the default ε some retain energy is left in the null space, and the documented bound holds:
    mean over retain tokens of ‖ΔM h‖² ≤ ‖ΔM‖₂² · ε · tr C (C: the retain inputs' second moment, [h, 1] for the bias)."""
    trainer = _trainer(tmp_path, tiny_tokenizer, "gpt_oss", optim="adamw_torch", learning_rate=5e-2,
                       router_constraint="grip")
    eps = trainer.args.grip_rank_cutoff
    trainer.train()
    changes, change = _logit_changes(trainer)
    retain_change, _, h1 = changes["retain"]
    moment = h1.T @ h1 / len(h1)
    mean_square = retain_change.pow(2).sum(1).mean()
    bound = torch.linalg.matrix_norm(change, ord=2) ** 2 * eps * torch.trace(moment)
    assert mean_square <= bound * (1 + 1e-4) + 1e-12
    # ... and it is a real constraint: some directions were left to the router
    layer = trainer.grip.layers[LAYER]
    assert 0 < layer.null_dim < h1.shape[1] and layer.retain_energy_left <= eps


def test_no_free_direction_is_said_and_freezes_the_router(tmp_path, tiny_tokenizer, caplog):
    """More retain tokens than router input dimensions fill every direction: with a tiny ε nothing is left to the
    router, which then cannot move (checked on its weights), and the run says so; with the few-token retain set of
    the other tests there is room, and no warning."""
    many = [" ".join(f"w{40 + (i * 7 + j) % 80}" for i in range(j, j + 8)) for j in range(40)]  # 320 tokens > 65
    trainer = _trainer(tmp_path, tiny_tokenizer, "qwen3_moe", retain=many, optim="sgd", learning_rate=0.5,
                       router_constraint="grip", grip_rank_cutoff=1e-12)
    with caplog.at_level("WARNING", logger="hf_moe_unlearn.routing.grip"):
        trainer.train()
    assert trainer.grip.layers[LAYER].null_dim == 0
    start, trained = _weights(trainer)
    assert torch.equal(start, trained)
    assert any("no free direction" in r.getMessage() and f"[{LAYER}]" in r.getMessage() for r in caplog.records)

    caplog.clear()
    roomy = _trainer(tmp_path / "roomy", tiny_tokenizer, "qwen3_moe", optim="sgd", learning_rate=0.5,
                     router_constraint="grip", grip_rank_cutoff=1e-12)
    with caplog.at_level("WARNING", logger="hf_moe_unlearn.routing.grip"):
        roomy.train()
    assert roomy.grip.layers[LAYER].null_dim > 0
    assert not any("no free direction" in r.getMessage() for r in caplog.records)


def test_protected_directions_by_hand():
    """The cut-off on a diagonal second moment, where the eigen-directions are the axes: energies 6, 3, 0.9, 0.1."""
    moment = torch.diag(torch.tensor([3.0, 0.1, 6.0, 0.9], dtype=torch.float64))
    for eps, kept_axes in ((0.2, {2, 0}), (0.05, {2, 0, 3}), (0.005, {2, 0, 3, 1})):
        u, _ = protected_directions(moment, eps)
        assert {int(i) for i in u.abs().argmax(0)} == kept_axes
    # the ridge adds 0.5 x the mean eigenvalue (2.5) to every direction (trace 15): three directions are needed
    # for 1 - 0.2 of it, not two (the last two carry 3.5 > 0.2 x 15)
    u, values = protected_directions(moment, 0.2, ridge=0.5)
    assert values.tolist() == pytest.approx([7.25, 4.25, 2.15, 1.35]) and u.shape[1] == 3


def _build(family, **kw):
    from hf_moe_unlearn.adapter import get_expert_peft_model
    from hf_moe_unlearn.data.text import PaddingCollator, tokenize_dataset
    from conftest import make_tiny_tokenizer

    model = tiny_moe_model(family)
    layer = find_moe_layers(model)[-1].index
    peft = get_expert_peft_model(model, ExpertSelection.coerce({layer: [0]}), r=2, lora_alpha=4, train_router=True)
    data = tokenize_dataset(RETAIN, make_tiny_tokenizer(), 64, name="retain set")
    counted = sum(sum(label != -100 for label in row["labels"]) for row in data)
    return peft, layer, GripProjection.build(peft, data, PaddingCollator(0), cutoff=1e-3, **kw), counted


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_every_family_router_is_linear_in_its_input(family):
    """Every supported family passes the linearity check the collection makes (logits = W h + b of the hooked
    input); Ernie-4.5's trainable score-correction bias is frozen."""
    peft, layer, grip, counted = _build(family)
    assert set(grip.layers) == {layer} and grip.layers[layer].tokens == counted
    frozen = grip.layers[layer].params.frozen
    assert bool(frozen) == (family == "ernie4_5_moe")
    for name, p in find_moe_layers(peft)[-1].router.named_parameters():
        if name in frozen:
            assert not p.requires_grad


def test_non_linear_router_is_refused(monkeypatch):
    from hf_moe_unlearn.moe.tiny import tiny_moe_model as build

    original = type(find_moe_layers(build("qwen3_moe"))[-1].router).forward

    def bent(self, hidden_states, *args, **kwargs):  # a router that transforms its input before the linear map
        return original(self, torch.tanh(hidden_states), *args, **kwargs)

    monkeypatch.setattr(type(find_moe_layers(build("qwen3_moe"))[-1].router), "forward", bent)
    with pytest.raises(MoEUnlearnError, match="linear map W·h"):
        _build("qwen3_moe")


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw,message", [
    (dict(grip_rank_cutoff=0.0), r"grip_rank_cutoff=0.0 must lie in \(0, 1\)"),
    (dict(grip_rank_cutoff=1.0), r"grip_rank_cutoff=1.0 must lie in \(0, 1\)"),
    (dict(grip_rank_cutoff=-0.1), r"grip_rank_cutoff=-0.1 must lie in \(0, 1\)"),
    (dict(grip_rank_cutoff=float("nan")), r"grip_rank_cutoff=nan must lie in \(0, 1\)"),
    (dict(grip_ridge=-1.0), r"grip_ridge=-1.0 must be a finite number >= 0"),
    (dict(router_constraint="grip", train_router=False), r"train_router=False freezes them: there is nothing"),
    (dict(router_constraint="null"), r"router_constraint='null' is not one of none, grip"),
])
def test_config_refuses(tmp_path, kw, message):
    with pytest.raises(MoEUnlearnError, match=message):
        MoEUnlearnConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kw)


def test_trainer_refuses_grip_without_retain_set(tmp_path, tiny_tokenizer):
    with pytest.raises(MoEUnlearnError, match="router_constraint='grip' keeps the retain set's routing, but there is "
                                              "no retain set"):
        _trainer(tmp_path, tiny_tokenizer, retain=None, retain_loss="none", router_constraint="grip")


def test_cli_flag(tmp_path, tiny_tokenizer, capsys):
    """``--router_constraint grip`` reaches the config through the CLI's parser; bad values give one line, exit 2."""
    from trl import TrlParser

    (config,) = TrlParser((MoEUnlearnConfig,)).parse_args_and_config(
        args=["--output_dir", str(tmp_path), "--use_cpu", "--router_constraint", "grip", "--grip_rank_cutoff", "1e-4",
              "--grip_ridge", "0.1"])
    assert (config.router_constraint, config.grip_rank_cutoff, config.grip_ridge) == ("grip", 1e-4, 0.1)
    model_dir = tmp_path / "model"
    tiny_moe_model("qwen3_moe").save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    forget = tmp_path / "forget.jsonl"
    forget.write_text("\n".join(json.dumps({"text": t}) for t in FORGET[:2]))
    capsys.readouterr()  # the save's progress bars
    for extra, message in ((["--grip_rank_cutoff", "2"], "--grip_rank_cutoff 2.0 must lie in (0, 1)"),
                           ([], "no retain set")):
        code = main(["unlearn", "--model", str(model_dir), "--forget", str(forget), "--output_dir",
                     str(tmp_path / "out"), "--use_cpu", "--retain_loss", "none",
                     "--router_constraint", "grip", "--max_steps", "1", "--report_to", "none", *extra])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(err) == 1 and message in err[0], err
