"""The bench's routing-attack and routing-stability columns and its GRIP rows (issue 14, item 4).

Two levels:

- :func:`_attack_metrics` on a tiny random MoE against what the attacks must give by construction, with the MCQ
  scorer replaced by a continuous one (the mean NLL of each "question"'s text), so that an equality means the same
  model was scored, not two accuracies that happen to coincide on a handful of questions: a model that differs from
  the target only in one expert equals the target once that expert is masked; one that differs only in a router
  equals the target once the target's routing is restored; an unchanged copy keeps every token's routing.
- a micro bench run (the preset test_bench_run.py uses): the columns exist in the table and results.json, hold
  numbers or None where they should, and the "+GRIP" rows really trained under ``router_constraint="grip"``
  (read from the trainer of each run, not from the method spec) on the same learning-rate grid as the others.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from _tiny_tokenizer import char_tokenizer, tiny_moe_lm
from hf_moe_unlearn.bench.pretrain import PretrainSettings
from hf_moe_unlearn.bench.run import (ATTACK_COLUMNS, COLUMNS, MATCHED_COLUMNS, METHODS, _attack_metrics, _EvalData,
                                      run_benchmark)
from hf_moe_unlearn.evaluation import mask_experts, perplexity
from hf_moe_unlearn.moe import find_moe_layers

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_TEXTS = ["the cat sat on the mat", "a dog ran in the park today", "seven blue birds sang", "rain fell all night"]


def _data() -> _EvalData:
    forget = [{"text": t} for t in _TEXTS]
    return _EvalData(forget_mcq=forget, retain_mcq=[], forget_qa=None, retain_qa=None, verbmem_prompts=[],
                     verbmem_gold=[], forget_texts=_TEXTS[:2], holdout_texts=[], general_texts=_TEXTS[2:],
                     relearn_texts=[], retain_texts=_TEXTS)


@pytest.fixture
def continuous_scorer(monkeypatch):
    """mcq_accuracy replaced by the mean NLL of each item's text: a continuous score of the model that is scored."""
    import hf_moe_unlearn.evaluation as evaluation

    def nll(model, tokenizer, questions, mode="choices", add_special_tokens=True):
        return {"accuracy": perplexity(model, tokenizer, [q["text"] for q in questions])["mean_nll"]}

    monkeypatch.setattr(evaluation, "mcq_accuracy", nll)
    return lambda model, tokenizer: nll(model, tokenizer, _data().forget_mcq)["accuracy"]


def _last_layer(model):
    return find_moe_layers(model)[-1]


def test_unchanged_copy_keeps_every_route_and_scores_as_the_target(continuous_scorer):
    tokenizer, target = char_tokenizer(), tiny_moe_lm().eval()
    model = copy.deepcopy(target)
    layer = _last_layer(target)
    out = _attack_metrics(model, target, tokenizer, _data(), {layer.index: [0]})
    plain = continuous_scorer(target, tokenizer)
    assert out["restore_forget_mcq"] == pytest.approx(plain, abs=1e-6)
    assert out["mask_forget_mcq"] == pytest.approx(out["mask_target_mcq"], abs=1e-6)
    assert abs(out["mask_target_mcq"] - plain) > 1e-3  # the masking did act
    assert out["retain_route_kept"] == 1.0 and out["general_route_kept"] == 1.0
    assert out["forget_route_changed"] == 0.0
    assert set(out["routing_stability"]) == {"retain_and_forget", "general"}


def test_masking_the_edited_expert_gives_back_the_target(continuous_scorer):
    """Expert 1 of the last layer perturbed, nothing else: masked, the model is the target masked the same way;
    restored (the edited expert kept), it is not the target."""
    tokenizer, target = char_tokenizer(), tiny_moe_lm().eval()
    model = copy.deepcopy(target)
    layer = _last_layer(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in layer.experts.parameters():
            param[1] += torch.randn(param[1].shape, generator=generator)
    edited = continuous_scorer(model, tokenizer)
    plain = continuous_scorer(target, tokenizer)
    assert abs(edited - plain) > 1e-2  # the edit changes the scored model
    out = _attack_metrics(model, target, tokenizer, _data(), {layer.index: [1]})
    assert out["mask_forget_mcq"] == pytest.approx(out["mask_target_mcq"], abs=1e-5)
    assert out["restore_forget_mcq"] == pytest.approx(edited, abs=1e-5)  # same routing as before: the edit stays
    assert out["retain_route_kept"] == 1.0  # the last layer's experts do not feed any router


def test_restoring_the_routing_undoes_a_router_only_edit(continuous_scorer):
    """Two rows of the last router swapped, experts untouched: restored, the model is the target. Masking a third
    expert leaves the swap in place, so the masked model and the masked target differ; the latter is the target
    masked by hand."""
    tokenizer, target = char_tokenizer(), tiny_moe_lm().eval()
    model = copy.deepcopy(target)
    layer = _last_layer(model)
    with torch.no_grad():
        layer.router.weight[[0, 1]] = layer.router.weight[[1, 0]].clone()
    plain = continuous_scorer(target, tokenizer)
    assert abs(continuous_scorer(model, tokenizer) - plain) > 1e-3
    out = _attack_metrics(model, target, tokenizer, _data(), {layer.index: [2]})
    assert out["restore_forget_mcq"] == pytest.approx(plain, abs=1e-5)
    assert out["retain_route_kept"] < 1.0 and out["forget_route_changed"] > 0.0
    with mask_experts(target, {layer.index: [2]}):
        assert out["mask_target_mcq"] == pytest.approx(continuous_scorer(target, tokenizer), abs=1e-6)
    assert abs(out["mask_forget_mcq"] - out["mask_target_mcq"]) > 1e-3


def test_masking_is_none_when_a_whole_layer_is_edited(continuous_scorer):
    tokenizer, target = char_tokenizer(), tiny_moe_lm().eval()
    layers = find_moe_layers(target)
    experts = {layers[0].index: [0], layers[-1].index: list(range(layers[-1].num_experts))}
    out = _attack_metrics(copy.deepcopy(target), target, tokenizer, _data(), experts)
    assert out["mask_forget_mcq"] is None and out["mask_target_mcq"] is None
    assert math.isfinite(out["restore_forget_mcq"])


# ------------------------------------------------------------------------------------------------------------
# A micro bench run with a baseline, its GRIP row and the SEUF+GRIP row
# ------------------------------------------------------------------------------------------------------------

_METHODS = ["GradDiff", "GradDiff+GRIP", "SEUF+GRIP"]


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bench_attacks")
    result = run_benchmark(_METHODS, [0], size="micro", workdir=workdir, device="cpu",
                           pretrain_settings=PretrainSettings.preset("micro", max_steps=2), log=lambda *_: None)
    return workdir, result


def test_grip_rows_are_their_base_methods_with_the_constraint():
    for grip, base in (("GradDiff+GRIP", "GradDiff"), ("SEUF+GRIP", "GradDiff+SEUF"), ("NPO+SEUF+GRIP", "NPO+SEUF")):
        assert METHODS[grip].router_constraint == "grip" and METHODS[grip].train_router
        assert METHODS[base].router_constraint == "none"
        fields, base_fields = METHODS[grip].config_fields(), METHODS[base].config_fields()
        assert {k for k in fields if fields[k] != base_fields[k]} == {"router_constraint"}
        assert METHODS[grip].all_experts == METHODS[base].all_experts


def test_attack_columns_are_in_the_table_and_the_json(micro_run):
    workdir, result = micro_run
    assert set(ATTACK_COLUMNS) <= set(COLUMNS) <= set(MATCHED_COLUMNS)
    header = next(line for line in (workdir / "results.md").read_text().splitlines() if line.startswith("| run |"))
    assert [c.strip() for c in header.strip("|").split("|")][-len(ATTACK_COLUMNS):] == list(ATTACK_COLUMNS)
    saved = json.loads((workdir / "results.json").read_text())
    assert list(saved["rows"]) == ["target", "retrain", *_METHODS]
    for name in ("target", "retrain"):  # nothing was unlearned: no attack, no stability
        assert all(saved["rows"][name][c] is None for c in ATTACK_COLUMNS), name
    for name in _METHODS:
        row = saved["rows"][name]
        for column in ("restore_forget_mcq", "retain_route_kept", "general_route_kept", "forget_route_changed",
                       "relearn_mcq"):
            assert 0.0 <= row[column] <= 1.0, (name, column)
        seed_row = saved["per_seed"][name][0]
        stability = seed_row["routing_stability"]["retain_and_forget"]
        assert row["retain_route_kept"] == stability["retain_unchanged_all_layers"]
        assert row["forget_route_changed"] == stability["forget_changed_any_layer"]
        assert row["general_route_kept"] == seed_row["routing_stability"]["general"]["retain_unchanged_all_layers"]
    # LoRA on every expert: no expert left to route to, so no masking attack; SEUF's one expert can be masked.
    for name in ("GradDiff", "GradDiff+GRIP"):
        assert saved["rows"][name]["mask_forget_mcq"] is None and saved["rows"][name]["mask_target_mcq"] is None
    assert 0.0 <= saved["rows"]["SEUF+GRIP"]["mask_forget_mcq"] <= 1.0
    assert 0.0 <= saved["rows"]["SEUF+GRIP"]["mask_target_mcq"] <= 1.0
    assert all("under attack" in line for line in saved["summary"])


def test_grip_rows_trained_under_the_constraint_on_the_same_grid(micro_run):
    _, result = micro_run
    for name in _METHODS:
        row = result["per_seed"][name][0]
        grip = name.endswith("+GRIP")
        assert row["config"]["router_constraint"] == ("grip" if grip else "none"), name
        assert row["config"]["train_router"] is True
        assert row["config"]["learning_rate"] == row["lr"]
        if not grip:
            assert row["grip"] is None
            continue
        # The trainer built a null space for every trained router: the selected layers' (SEUF: one; LoRA on all
        # experts: every MoE layer), each leaving at most ε of the retain energy outside the protected directions.
        assert sorted(row["grip"]) == sorted(f"L{layer}" for layer in row["selected_experts"]), name
        for layer in row["grip"].values():
            assert 0 <= layer["null_dim"] < layer["dim"] and layer["tokens"] > 0
            assert layer["retain_energy_left"] <= row["config"]["grip_rank_cutoff"] + 1e-9
    grid = result["budget"]["learning_rates"]
    for name in _METHODS:  # fairness: every row trained at every learning rate of one grid
        assert sorted(t["lr"] for t in result["trajectories"] if t["method"] == name) == sorted(grid), name


def test_relearning_probe_trains_every_weight_of_a_merged_model():
    """The same attack budget for every row: a merged PEFT model arrives with its base weights frozen (only the
    trained routers require grad), yet the probe must fine-tune every weight, as it does for the target."""
    from hf_moe_unlearn.bench.run import BenchBudget, _relearn

    tokenizer, model = char_tokenizer(), tiny_moe_lm()
    model.requires_grad_(False)
    layer = _last_layer(model)
    layer.router.weight.requires_grad_(True)  # what merge_and_unload leaves trainable
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    budget = BenchBudget.preset("micro", relearn_steps=2)
    probe = _relearn(model, tokenizer, _TEXTS, budget, seed=0)
    moved = {name for name, p in probe.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert moved == set(before)  # AdamW moves every weight with a gradient (and weight decay the rest)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())  # the input is left as it was
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [f"{layer.router_name}.weight"]
