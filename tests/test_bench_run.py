"""The benchmark driver end to end on a micro benchmark, and its input checks.

The micro run pre-trains for two steps and unlearns for two (at each learning rate of the micro grid): the numbers
mean nothing, but every stage (pre-training cache, unlearning trajectories, matching, each metric, reports) runs,
and the reports must hold what they claim. The matching itself is tested in test_matched_forgetting.py.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest

from hf_moe_unlearn.bench.commands import add_bench_parser, add_demo_parser, parse_seeds
from hf_moe_unlearn.bench.pretrain import PretrainSettings
from hf_moe_unlearn.bench.run import (COLUMNS, DEMO_METHODS, MATCHED_COLUMNS, METHODS, BenchBudget, resolve_methods,
                                      run_benchmark)
from hf_moe_unlearn.errors import MoEUnlearnError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_METHOD = "GradDiff+SEUF"


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bench")
    result = run_benchmark([_METHOD], [0], size="micro", workdir=workdir, device="cpu",
                           pretrain_settings=PretrainSettings.preset("micro", max_steps=2), log=lambda *_: None)
    return workdir, result


def test_reports_are_written_with_reference_and_method_rows(micro_run):
    workdir, result = micro_run
    table = (workdir / "results.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| run |"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["run", *MATCHED_COLUMNS]
    assert set(COLUMNS) <= set(MATCHED_COLUMNS)  # every metric column is in the matched-forgetting table
    body = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert body == ["run", "target", "retrain", _METHOD]

    saved = json.loads((workdir / "results.json").read_text())
    assert list(saved["rows"]) == ["target", "retrain", _METHOD]
    assert saved["columns"] == list(COLUMNS)
    assert (workdir / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["paths"]["plot"] == str(workdir / "tradeoff.png")


def test_metrics_are_in_range_and_retrain_is_its_own_reference(micro_run):
    _, result = micro_run
    rows = result["rows"]
    for name, row in rows.items():
        for column in ("forget_mcq", "utility_mcq", "relearn_mcq", "forget_knowmem", "verbmem", "retain_knowmem"):
            assert 0.0 <= row[column] <= 1.0, (name, column)
        assert row["ppl_general"] > 1.0
        assert 0.0 <= row["forget_quality"] <= 1.0
    # Relative to itself, the retrain model leaks nothing and its truth ratios match exactly (KS p-value 1).
    assert rows["retrain"]["privleak"] == pytest.approx(0.0)
    assert rows["retrain"]["forget_quality"] == pytest.approx(1.0)
    # SEUF trains one expert, so the routing share is defined (it is '–' only when all experts train).
    assert math.isfinite(rows[_METHOD]["routing_share"]) and rows[_METHOD]["routing_share"] > 0
    seed_row = result["per_seed"][_METHOD][0]
    assert sum(len(v) for v in seed_row["selected_experts"].values()) == 1


def test_unknown_method_lists_the_valid_ones(tmp_path):
    with pytest.raises(MoEUnlearnError) as err:
        run_benchmark(["GradDiff", "Magic"], [0], size="micro", workdir=tmp_path)
    message = str(err.value)
    assert "'Magic'" in message and all(name in message for name in METHODS)
    assert not (tmp_path / "results.md").exists()  # validated before any work


def test_method_names_are_case_insensitive_and_deduplicated():
    assert resolve_methods("npo+seuf, GradDiff,npo+SEUF") == ["NPO+SEUF", "GradDiff"]
    with pytest.raises(MoEUnlearnError, match="No method"):
        resolve_methods(" , ")


def test_bad_seeds_and_size_are_rejected(tmp_path):
    with pytest.raises(MoEUnlearnError, match="seeds"):
        run_benchmark(["GA"], [], size="micro", workdir=tmp_path)
    with pytest.raises(MoEUnlearnError, match="comma list of integers"):
        parse_seeds("0,one")
    with pytest.raises(MoEUnlearnError, match="Unknown benchmark size"):
        BenchBudget.preset("huge")


def test_budget_presets_share_one_grid_spanning_one_expert_to_all_experts():
    for size in ("small", "full"):
        budget = BenchBudget.preset(size)
        assert len(budget.learning_rates) >= 3 and budget.learning_rates == tuple(sorted(budget.learning_rates))
        # LoRA on all experts forgets at 2e-3; one expert needs about 10x that: the grid spans both.
        assert budget.learning_rates[0] <= 2e-3 and budget.learning_rates[-1] >= 2e-2
        assert budget.steps % budget.eval_every == 0
    assert BenchBudget.preset("small", steps=None, learning_rates=None) == BenchBudget.preset("small")
    assert BenchBudget.preset("small", learning_rates=[6e-3, 2e-3, 6e-3]).learning_rates == (2e-3, 6e-3)


def test_baselines_train_all_experts_and_seuf_methods_use_the_anchor():
    for name, spec in METHODS.items():
        assert spec.all_experts == ("SEUF" not in name and "TRACE" not in name), name
        assert (spec.anchor_loss_weight > 0) == ("SEUF" in name), name
        assert (spec.retain_weighting == "trace") == ("TRACE" in name), name


def test_cli_parsers_set_defaults_and_func():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_bench_parser(sub)
    add_demo_parser(sub)
    bench = parser.parse_args(["bench", "--methods", "GA,NPO", "--seeds", "1,2", "--forget_setting", "entities"])
    assert (bench.methods, bench.seeds, bench.size, bench.forget_setting) == ("GA,NPO", "1,2", "full", "entities")
    assert callable(bench.func)
    assert (bench.steps, bench.learning_rates, bench.eval_every, bench.forget_target, bench.match) == (
        None, None, None, None, "forget")  # None: the size's preset, the retrain model's forget MCQ + 0.05
    demo = parser.parse_args(["demo", "--steps", "20", "--learning_rates", "2e-3,2e-2", "--eval_every", "5",
                              "--forget_target", "0.4", "--match", "none"])
    assert demo.forget_setting == "domain" and callable(demo.func)
    assert (demo.steps, demo.learning_rates, demo.eval_every, demo.forget_target, demo.match) == (
        "20", "2e-3,2e-2", "5", "0.4", "none")
    assert set(DEMO_METHODS) <= set(METHODS)
    assert DEMO_METHODS == ("GradDiff", "GradDiff+SEUF", "NPO+SEUF", "TRACE", "SEUF+TRACE")


def test_rmu_rows_steer_one_layer_and_differ_in_experts_only(tmp_path):
    """RMU and RMU+SEUF steer the same decoder layer ℓ (results.json's rmu_layer); RMU trains every expert of
    layers ℓ−2..ℓ (the WMDP recipe's three layers), RMU+SEUF one expert at or below ℓ."""
    result = run_benchmark(["RMU", "RMU+SEUF"], [0], size="micro", workdir=tmp_path, device="cpu",
                           pretrain_settings=PretrainSettings.preset("micro", max_steps=2), log=lambda *_: None)
    rmu_layer = result["rmu_layer"]
    assert rmu_layer >= 2
    baseline = {int(k): v for k, v in result["per_seed"]["RMU"][0]["selected_experts"].items()}
    assert sorted(baseline) == [rmu_layer - 2, rmu_layer - 1, rmu_layer]
    assert all(len(ids) == len(baseline[rmu_layer]) for ids in baseline.values())
    seuf = {int(k): v for k, v in result["per_seed"]["RMU+SEUF"][0]["selected_experts"].items()}
    assert sum(len(v) for v in seuf.values()) == 1 and max(seuf) <= rmu_layer
