"""Comparing methods at matched forgetting: the matching rule, the trajectory probes, the reports, bad input.

The matching rule is tested on hand-made trajectories; the probes and reports on the micro benchmark (two
pre-training steps, two unlearning steps: the numbers mean nothing, but every stage runs and must be consistent).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerControl

from hf_moe_unlearn.bench.pretrain import PretrainSettings, pretrain_models
from hf_moe_unlearn.bench.run import (
    FORGET_TARGET_MARGIN,
    MATCHED_COLUMNS,
    METHODS,
    PROBE_METRICS,
    BenchBudget,
    TrajectoryCallback,
    _eval_data,
    _unlearn,
    choose_matched,
    load_trainable_state,
    probe_metrics,
    run_benchmark,
    trainable_state,
)
from hf_moe_unlearn.bench.synthetic import BenchmarkSpec, make_benchmark
from hf_moe_unlearn.cli import main
from hf_moe_unlearn.errors import MoEUnlearnError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_MICRO = PretrainSettings.preset("micro", max_steps=2)


def _quiet(*_):
    pass


def _points(*triples):
    return [{"step": s, "forget_mcq": f, "utility_mcq": u} for s, f, u in triples]


# ----------------------------------------------------------------------------------------------------------
# The matching rule on hand-made trajectories
# ----------------------------------------------------------------------------------------------------------


def test_first_point_reaching_the_target_is_chosen_not_a_later_better_one():
    # Step 20 has better utility, but the matched point is the FIRST one at or below the target.
    trajectories = {2e-3: _points((0, 1.0, 0.9), (10, 0.60, 0.9), (20, 0.30, 0.80), (30, 0.25, 0.95))}
    choice = choose_matched(trajectories, 0.35)
    assert (choice["reached"], choice["lr"], choice["step"]) == (True, 2e-3, 20)
    assert choice["utility_mcq"] == 0.80 and choice["forget_mcq"] == 0.30


def test_best_utility_among_learning_rates_at_their_first_matched_points():
    trajectories = {
        2e-3: _points((0, 1.0, 0.9), (10, 0.8, 0.9), (20, 0.3, 0.70)),  # first match: utility 0.70
        6e-3: _points((0, 1.0, 0.9), (10, 0.34, 0.85), (20, 0.2, 0.99)),  # first match: 0.85 (not the later 0.99)
        2e-2: _points((0, 1.0, 0.9), (10, 0.1, 0.50)),
    }
    choice = choose_matched(trajectories, 0.35)
    assert (choice["reached"], choice["lr"], choice["step"], choice["utility_mcq"]) == (True, 6e-3, 10, 0.85)


def test_utility_ties_go_to_the_smaller_learning_rate_and_points_are_taken_in_step_order():
    # Given larger learning rate first and points out of order: the rule must not depend on either.
    trajectories = {
        2e-2: _points((10, 0.2, 0.8), (0, 1.0, 0.9)),
        2e-3: _points((20, 0.3, 0.8), (0, 1.0, 0.9), (10, 0.9, 0.9)),
    }
    choice = choose_matched(trajectories, 0.35)
    assert (choice["lr"], choice["step"]) == (2e-3, 20)


def test_target_is_inclusive_despite_float_rounding_and_step_zero_counts():
    # A retrain forget MCQ of 7/20 gives the target 7/20 + 0.05, which rounds to just below 8/20 = 0.4 in floating
    # point; a point at 8/20 must still reach it.
    target = 7 / 20 + FORGET_TARGET_MARGIN
    assert 8 / 20 > target
    assert choose_matched({1e-3: _points((0, 1.0, 0.9), (5, 8 / 20, 0.9))}, target)["reached"]
    # A target the start model already meets is met at step 0, by every lr alike: the smaller lr is chosen.
    choice = choose_matched({6e-3: _points((0, 0.4, 0.9), (5, 0.2, 0.9)), 2e-3: _points((0, 0.4, 0.9))}, 0.5)
    assert (choice["lr"], choice["step"]) == (2e-3, 0)


def test_not_reached_reports_the_closest_forget_level():
    trajectories = {
        2e-3: _points((0, 1.0, 0.9), (10, 0.7, 0.9), (20, 0.55, 0.8)),
        6e-3: _points((0, 1.0, 0.9), (10, 0.50, 0.6), (20, 0.50, 0.7), (30, 0.6, 0.9)),  # closest, 2 points
        2e-2: _points((0, 1.0, 0.9), (10, 0.50, 0.7)),  # as close, same utility, larger lr
    }
    choice = choose_matched(trajectories, 0.35)
    assert choice["reached"] is False
    assert (choice["lr"], choice["step"], choice["forget_mcq"], choice["utility_mcq"]) == (6e-3, 20, 0.50, 0.7)


def test_no_probe_point_at_all_is_an_error():
    with pytest.raises(MoEUnlearnError, match="no probe point"):
        choose_matched({2e-3: []}, 0.3)


# ----------------------------------------------------------------------------------------------------------
# The trajectory callback
# ----------------------------------------------------------------------------------------------------------


def test_callback_probes_in_eval_mode_without_grad_and_restores_the_modes():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train()
    model[1].eval()  # a deliberate mix that must survive the probe
    seen = []

    def probe(m):
        seen.append((m.training, torch.is_grad_enabled()))
        return {"forget_mcq": 0.5, "utility_mcq": 0.5}

    class _State:
        global_step, max_steps = 3, 10

    callback = TrajectoryCallback(lambda m: (m.eval(), probe(m))[1], 3)
    callback.on_step_end(None, _State(), None, model=model)
    callback.on_step_end(None, type("S", (), {"global_step": 4, "max_steps": 10})(), None, model=model)  # not due
    assert seen == [(False, False)]
    assert model[0].training and not model[1].training
    assert [p["step"] for p in callback.points] == [3] and set(callback.states) == {3}


def test_callback_stops_the_run_at_the_first_point_meeting_stop_when():
    model = torch.nn.Linear(2, 2)
    values = iter([0.9, 0.5, 0.2, 0.1])
    callback = TrajectoryCallback(lambda m: {"forget_mcq": next(values)}, 1, stop_when=lambda p: p["forget_mcq"] <= 0.3)
    control = TrainerControl()
    for step in (1, 2):
        callback.on_step_end(None, type("S", (), {"global_step": step, "max_steps": 10})(), control, model=model)
        assert not control.should_training_stop
    callback.on_step_end(None, type("S", (), {"global_step": 3, "max_steps": 10})(), control, model=model)
    assert control.should_training_stop and [p["step"] for p in callback.points] == [1, 2, 3]


@pytest.fixture(scope="module")
def micro_pair(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("matched-pair")
    benchmark = make_benchmark(BenchmarkSpec.preset("micro", seed=0))
    pair = pretrain_models(benchmark, workdir / "pretrain-cache", settings=_MICRO, device="cpu")
    return workdir, benchmark, pair


def _probed_graddiff(micro_pair, steps: int):
    """GradDiff on the micro pair for ``steps`` steps at lr 5e-2, probed every 2 steps; the live LoRA model."""
    workdir, benchmark, pair = micro_pair
    budget = BenchBudget.preset("micro", steps=steps, eval_every=2)
    data = _eval_data(benchmark, budget)
    callback = TrajectoryCallback(lambda m: probe_metrics(m, pair.tokenizer, data), budget.eval_every)
    model, _ = _unlearn(pair.target, pair.tokenizer, benchmark, METHODS["GradDiff"], budget, 0, workdir, "cpu",
                        learning_rate=5e-2, callbacks=[callback], merge=False)
    return model, callback, data, budget


def test_callback_records_step_zero_every_k_steps_and_the_last_step(micro_pair):
    pair = micro_pair[2]
    model, callback, data, _ = _probed_graddiff(micro_pair, steps=5)
    assert [p["step"] for p in callback.points] == [0, 2, 4, 5]
    assert sorted(callback.states) == [0, 2, 4, 5]
    assert all(set(PROBE_METRICS) <= set(p) for p in callback.points)
    # Step 0 is the target model itself (the LoRA starts at zero): its probe equals the target's, measured apart.
    assert {k: callback.points[0][k] for k in PROBE_METRICS} == pytest.approx(probe_metrics(pair.target, pair.tokenizer,
                                                                                            data))
    assert callback.trainer is None  # the trainer is not kept alive by the callback
    assert model.training  # the probes left the model in the mode the trainer had put it in


def test_state_restored_at_a_probe_point_reproduces_its_probe_values(micro_pair):
    workdir, benchmark, pair = micro_pair
    model, callback, data, budget = _probed_graddiff(micro_pair, steps=4)
    final = trainable_state(model)
    middle = callback.states[2]
    assert any(not torch.equal(middle[n], final[n]) for n in final)  # restoring step 2 really changes the model
    load_trainable_state(model, middle)
    recorded = {k: callback.points[1][k] for k in PROBE_METRICS}
    assert callback.points[1]["step"] == 2
    assert probe_metrics(model, pair.tokenizer, data) == pytest.approx(recorded, rel=1e-6)
    # ... and after merging the LoRA, as the full evaluation does.
    assert probe_metrics(model.merge_and_unload(), pair.tokenizer, data) == pytest.approx(recorded, rel=1e-4)

    # The probes do not change the training: the same run without probes ends in the same state.
    silent = TrajectoryCallback(lambda m: {}, 1000, keep_states=False)
    again, _ = _unlearn(pair.target, pair.tokenizer, benchmark, METHODS["GradDiff"], budget, 0, workdir, "cpu",
                        learning_rate=5e-2, callbacks=[silent], merge=False)
    assert all(torch.allclose(p, final[n], atol=1e-6) for n, p in trainable_state(again).items())


def test_loading_a_state_with_unknown_names_is_an_error():
    with pytest.raises(MoEUnlearnError, match="no parameter"):
        load_trainable_state(torch.nn.Linear(2, 2), {"nope.weight": torch.zeros(2, 2)})


# ----------------------------------------------------------------------------------------------------------
# The driver and its reports
# ----------------------------------------------------------------------------------------------------------

_METHODS = ["GradDiff", "GradDiff+SEUF"]
_SEEDS = [0, 1]


@pytest.fixture(scope="module")
def matched_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("matched")
    result = run_benchmark(_METHODS, _SEEDS, size="micro", workdir=workdir, device="cpu", pretrain_settings=_MICRO,
                           learning_rates=(2e-3, 5e-2), log=_quiet)
    return workdir, result


def test_results_json_holds_every_trajectory_the_choices_and_the_full_rows(matched_run):
    workdir, result = matched_run
    saved = json.loads((workdir / "results.json").read_text())
    retrain = saved["rows"]["retrain"]["forget_mcq"]
    assert saved["forget_target"] == pytest.approx(retrain + FORGET_TARGET_MARGIN)
    assert saved["match"] == "forget" and saved["budget"]["learning_rates"] == [2e-3, 5e-2]
    runs = {(t["method"], t["seed"], t["lr"]) for t in saved["trajectories"]}
    assert runs == {(m, s, lr) for m in _METHODS for s in _SEEDS for lr in (2e-3, 5e-2)}
    target = saved["forget_target"]
    for trajectory in saved["trajectories"]:
        # micro: 2 steps, probed every step; a trajectory ends at its first point reaching the target
        steps = [p["step"] for p in trajectory["points"]]
        reaching = [p["step"] for p in trajectory["points"] if p["forget_mcq"] <= target + 1e-9]
        assert steps == [0, 1, 2][: (reaching[0] + 1 if reaching else 3)]
        assert trajectory["first_reached_step"] == (reaching[0] if reaching else None)
        assert all(set(PROBE_METRICS) <= set(p) for p in trajectory["points"])
    # The choices follow the rule when recomputed from the saved trajectories.
    assert len(saved["choices"]) == len(_METHODS) * len(_SEEDS)
    for choice in saved["choices"]:
        mine = {t["lr"]: t["points"] for t in saved["trajectories"]
                if (t["method"], t["seed"]) == (choice["method"], choice["seed"])}
        expected = choose_matched(mine, saved["forget_target"])
        assert {k: choice[k] for k in ("reached", "lr", "step")} == {k: expected[k] for k in ("reached", "lr", "step")}
    # The full evaluation ran on the model restored at the chosen point: its probe metrics are the recorded ones.
    for name in _METHODS:
        assert len(saved["per_seed"][name]) == len(_SEEDS)
        for row in saved["per_seed"][name]:
            choice = next(c for c in saved["choices"] if (c["method"], c["seed"]) == (name, row["seed"]))
            assert (row["lr"], row["step"], row["reached"]) == (choice["lr"], choice["step"], choice["reached"])
            assert row["forget_mcq"] == pytest.approx(row["probe"]["forget_mcq"])
            assert row["utility_mcq"] == pytest.approx(row["probe"]["utility_mcq"])
            assert row["ppl_general"] == pytest.approx(row["probe"]["ppl_general"], rel=1e-4)
            assert {"verbmem", "relearn_mcq", "forget_quality"} <= set(row)
        aggregated = saved["rows"][name]
        assert aggregated["n_seeds"] == len(_SEEDS)
        assert aggregated["reached"] == sum(r["reached"] for r in saved["per_seed"][name])
    assert len(saved["summary"]) == len(_METHODS)


def test_results_md_has_the_matched_table_and_one_line_per_method(matched_run):
    workdir, result = matched_run
    text = (workdir / "results.md").read_text()
    assert "## Matched forgetting" in text and f"forget MCQ <= {result['forget_target']:.3f}" in text
    c = result["forget_concentration"]
    assert f"retain share in {c['layers_at_ratio']} of {c['num_layers']} layers" in text
    header = next(line for line in text.splitlines() if line.startswith("| run |"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["run", *MATCHED_COLUMNS]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]]
            for line in text.splitlines() if line.startswith("| ") and "---" not in line and "| run |" not in line}
    assert list(rows) == ["target", "retrain", *_METHODS]
    reached = MATCHED_COLUMNS.index("reached")
    for name in _METHODS:
        assert rows[name][reached] == f"{result['rows'][name]['reached']}/{len(_SEEDS)}"
        line = next(line for line in text.splitlines() if line.startswith(f"- {name}: "))
        assert ("reached forget MCQ" in line) != ("did NOT reach" in line) and "utility MCQ" in line
    assert rows["target"][reached] == "–"
    assert (workdir / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_target_met_at_the_start_is_matched_at_step_zero_with_the_smallest_lr(micro_pair):
    workdir, _, _ = micro_pair  # the same pre-training cache
    result = run_benchmark(["GradDiff+SEUF"], [0], size="micro", workdir=workdir, device="cpu",
                           pretrain_settings=_MICRO, learning_rates=(5e-2, 2e-3), forget_target=1.0, log=_quiet)
    (choice,) = result["choices"]
    assert (choice["reached"], choice["lr"], choice["step"]) == (True, 2e-3, 0)
    assert result["forget_target_source"] == "user"
    # The full evaluation ran on the restored step-0 state (the target itself), not on the trained end state.
    for column in ("forget_mcq", "utility_mcq", "ppl_general", "verbmem", "forget_knowmem"):
        assert result["rows"]["GradDiff+SEUF"][column] == pytest.approx(result["rows"]["target"][column], rel=1e-4)


def test_single_budget_mode_evaluates_the_last_step(micro_pair):
    workdir, _, _ = micro_pair
    result = run_benchmark(["GradDiff+SEUF"], [0], size="micro", workdir=workdir, device="cpu",
                           pretrain_settings=_MICRO, learning_rates=[2e-2], steps=3, eval_every=2, match="none",
                           log=_quiet)
    (choice,) = result["choices"]
    assert (choice["lr"], choice["step"]) == (2e-2, 3)
    assert [p["step"] for p in result["trajectories"][0]["points"]] == [0, 2, 3]


# ----------------------------------------------------------------------------------------------------------
# Bad input: one clear error each, before any work
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(learning_rates=[]), "learning-rate grid is empty"),
    (dict(learning_rates=[2e-3, 0.0]), "positive finite"),
    (dict(learning_rates=[-1e-3]), "positive finite"),
    (dict(learning_rates=[float("nan")]), "positive finite"),
    (dict(steps=0), "steps must be a positive integer"),
    (dict(eval_every=-5), "eval_every must be a positive integer"),
    (dict(forget_target=1.5), r"forget_target must be a forget MCQ accuracy in \[0, 1\]"),
    (dict(forget_target=-0.1), r"in \[0, 1\]"),
    (dict(match="budget"), "match must be one of"),
    (dict(match="none"), "one learning rate"),  # the micro grid has two
])
def test_bad_settings_are_refused_before_any_work(tmp_path, kwargs, message):
    with pytest.raises(MoEUnlearnError, match=message):
        run_benchmark(["GA"], [0], size="micro", workdir=tmp_path / "run", device="cpu", **kwargs)
    assert not (tmp_path / "run").exists()


def test_a_target_the_retrain_model_misses_is_refused(micro_pair):
    workdir, _, _ = micro_pair
    with pytest.raises(MoEUnlearnError, match="missed by the retrain model itself") as err:
        run_benchmark(["GA"], [0], size="micro", workdir=workdir, device="cpu", pretrain_settings=_MICRO,
                      forget_target=0.0, log=_quiet)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("flags", "message"), [
    (["--learning_rates", " , "], "--learning_rates is empty"),
    (["--learning_rates", "2e-3,fast"], "comma list of numbers"),
    (["--learning_rates", "2e-3,-1"], "positive finite"),
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--eval_every", "ten"], "--eval_every must be a positive integer"),
    (["--forget_target", "2"], r"in \[0, 1\]"),
    (["--threads", "0"], "--threads must be a positive integer"),
])
@pytest.mark.parametrize("command", ["bench", "demo"])
def test_cli_bad_flags_give_one_line_and_exit_2(tmp_path, capsys, command, flags, message):
    import re

    code = main([command, "--output", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "out").exists()
