"""`accelerate launch --num_processes 2` (CPU, gloo) gives the same selection, adapter and logs as one process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_moe_unlearn import MoEUnlearnTrainer, tiny_moe_model
from hf_moe_unlearn.config import MoEUnlearnConfig, _needs_cpu_backend
from hf_moe_unlearn.errors import MoEUnlearnError

HERE = Path(__file__).parent
#: The configurations of distributed_equivalence.py: one per loss family, with and without a retain set.
EQUIVALENCE = ("graddiff_seuf", "ga_no_retain", "npo_kl", "npo_no_retain", "rmu", "trace")


def _launch(out: Path, processes: int, per_device: int, script: str = "distributed_unlearn.py",
            extra: list[str] | None = None) -> None:
    accelerate = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    # On a machine without GPUs, `--multi_gpu` starts torchrun (as a plain `accelerate launch --num_processes 2`
    # does) and MoEUnlearnConfig turns use_cpu on, so accelerate runs DDP over gloo on CPU (`--cpu` with several
    # processes would need mpirun).
    # A --config_file (FSDP) names its own distributed type: no mode flag then, or it would override the config.
    mode = [] if extra else ["--multi_gpu"] if processes > 1 else ["--cpu"]
    cmd = [accelerate, "launch", *mode, "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(29500 + processes),
           *(extra or []), str(HERE / script), str(out), str(per_device)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    _launch(tmp_path / "one", 1, 4)
    _launch(tmp_path / "two", 2, 2)
    sel_one = json.loads((tmp_path / "one" / "selection.json").read_text())
    sel_two = json.loads((tmp_path / "two" / "selection.json").read_text())
    assert sel_one["experts"] == sel_two["experts"]
    a = load_file(tmp_path / "one" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    changed = False
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5)
        changed |= bool(a[key].abs().sum() > 0)
    assert changed  # the run trained something
    # Evaluations (holdout, forget probe, retain sample; every step and at step 0): each process logs the values
    # summed over both processes' shares, equal to the single-process ones.
    one = json.loads((tmp_path / "one" / "evals_rank0.json").read_text())
    ranks = [json.loads((tmp_path / "two" / f"evals_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and [e["step"] for e in one] == [e["step"] for e in ranks[0]] == [0, 1, 2, 3]
    for a, b in zip(one, ranks[0]):
        for key in ("eval_forget_probe_nll", "eval_holdout_nll", "eval_retain_nll"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key


# ------------------------------------------------------------------------------- DDP equals one process (SGD)
@pytest.fixture(scope="module")
def equivalence_runs(tmp_path_factory):
    """All configurations of distributed_equivalence.py, in one 1-process and one 2-process launch (~50 s)."""
    root = tmp_path_factory.mktemp("equivalence")
    _launch(root / "one", 1, 4, script="distributed_equivalence.py")
    _launch(root / "two", 2, 2, script="distributed_equivalence.py")
    return root


def _assert_same_adapter(one: dict, two: dict, init: dict) -> None:
    """Equal within float tolerance relative to what training changed (SGD: the change is lr x the gradients)."""
    assert one.keys() == two.keys() == init.keys()
    update = max(float((one[k] - init[k]).abs().max()) for k in one)
    assert update > 0  # the run trained something
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst <= 1e-4 * update, f"2 processes differ from 1 by {worst:.3g} (largest update {update:.3g})"


def _assert_same_logs(one: list[dict], two: list[dict]) -> None:
    assert [e["step"] for e in one] == [e["step"] for e in two] == [1, 2]
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for key in a:
            if key != "epoch":
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)


@pytest.mark.slow
@pytest.mark.parametrize("name", EQUIVALENCE)
def test_two_processes_equal_one_process(equivalence_runs, name):
    """Same effective batch, fp32, SGD, ``use_cpu`` left at its default: the adapter after 2 steps and every
    logged metric (loss parts, routing shares, grad_norm) are those of one process, on both processes."""
    one, two = equivalence_runs / "one" / name, equivalence_runs / "two" / name
    assert json.loads((one / "selection.json").read_text())["experts"] == \
        json.loads((two / "selection.json").read_text())["experts"]
    reference, init = load_file(one / "adapter_rank0.safetensors"), load_file(one / "init_rank0.safetensors")
    logs = json.loads((one / "logs_rank0.json").read_text())
    assert {"forget_loss"} <= logs[0].keys() and any(k.startswith("route/") for k in logs[0])
    for rank in (0, 1):
        _assert_same_adapter(reference, load_file(two / f"adapter_rank{rank}.safetensors"), init)
        _assert_same_logs(logs, json.loads((two / f"logs_rank{rank}.json").read_text()))


@pytest.mark.slow
def test_cli_two_processes_equal_one_process(equivalence_runs):
    """`hf-moe-unlearn unlearn` under `accelerate launch --num_processes 2`, with every default a CLI user gets."""
    one, two = equivalence_runs / "one" / "cli", equivalence_runs / "two" / "cli"
    init = load_file(equivalence_runs / "one" / "graddiff_seuf" / "init_rank0.safetensors")  # same model and seed
    state = "expert_training_state.safetensors"
    _assert_same_adapter(load_file(one / state), load_file(two / state), init)
    a, b = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    logs = [[e for e in json.loads((d / "trainer_state.json").read_text())["log_history"] if "loss" in e]
            for d in (one, two)]
    _assert_same_logs(*logs)


@pytest.mark.slow
def test_unwrapped_model_is_refused(equivalence_runs):
    """A 2-process launch whose model the accelerator leaves unwrapped stops on every process before a step."""
    assert (equivalence_runs / "one" / "unwrapped" / "outcome_rank0.txt").read_text() == "trained"
    for rank in (0, 1):
        outcome = (equivalence_runs / "two" / "unwrapped" / f"outcome_rank{rank}.txt").read_text()
        assert "wrapped by neither DDP, FSDP nor DeepSpeed" in outcome, outcome


# ----------------------------------------------------------------------------------- detection, in-process
def test_cpu_backend_needed_only_for_several_processes_without_accelerator(monkeypatch):
    import accelerate.utils.imports as imports

    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(imports, "get_torch_accelerator_backend", lambda: (None, None))
    assert not _needs_cpu_backend()  # one process: nothing to fix
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _needs_cpu_backend()
    monkeypatch.setattr(imports, "get_torch_accelerator_backend", lambda: ("cuda", torch.cuda))
    assert not _needs_cpu_backend()  # GPUs: nccl
    monkeypatch.setattr(imports, "get_torch_accelerator_backend", lambda: ("mps", None))
    assert _needs_cpu_backend()  # an accelerator without a distributed backend


def test_processes_running_alone_are_refused(tmp_path, tiny_tokenizer, monkeypatch):
    """Launched as 2 processes but accelerate gave each a world of its own: refused at the start of training."""
    import hf_moe_unlearn.config as config

    args = MoEUnlearnConfig(output_dir=str(tmp_path), max_steps=1, report_to="none", save_strategy="no",
                            disable_tqdm=True, retain_loss="none")
    trainer = MoEUnlearnTrainer(tiny_moe_model("qwen3_moe"), args, forget_dataset=["w1 w2 w3 w4"] * 4,
                                processing_class=tiny_tokenizer, selection={1: [0]})
    monkeypatch.setattr(config, "_launched_processes", lambda: 2)
    with pytest.raises(MoEUnlearnError, match="2 processes were launched, but accelerate runs each of them alone"):
        trainer.train()


# ------------------------------------------------------------------------------------ FSDP2 (shipped config)
FSDP = ("graddiff_seuf", "npo_kl", "rmu", "trace")  # SEUF anchor, reference forwards, RMU hooks, TRACE weights


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """distributed_fsdp.py under examples/accelerate/fsdp.yaml, 2 processes (~50 s)."""
    out = tmp_path_factory.mktemp("fsdp") / "two"
    _launch(out, 2, 2, script="distributed_fsdp.py",
            extra=["--config_file", str(HERE.parent / "examples" / "accelerate" / "fsdp.yaml")])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", FSDP)
def test_fsdp2_equals_one_process(equivalence_runs, fsdp_runs, name):
    """Every parameter sharded (DTensors, decoder layers fully_shard-ed by accelerate), yet the same selection,
    adapter (SGD, 2 steps) and logged metrics as one process; a checkpoint every step saved without a race."""
    one, two = equivalence_runs / "one" / name, fsdp_runs / name
    for rank in (0, 1):
        sharded = json.loads((two / f"sharded_rank{rank}.json").read_text())
        assert sharded["sharded"] == sharded["parameters"] > 0
    assert json.loads((one / "selection.json").read_text())["experts"] == \
        json.loads((two / "selection.json").read_text())["experts"]
    reference, init = load_file(one / "adapter_rank0.safetensors"), load_file(one / "init_rank0.safetensors")
    logs = json.loads((one / "logs_rank0.json").read_text())
    for rank in (0, 1):
        _assert_same_adapter(reference, load_file(two / f"adapter_rank{rank}.safetensors"), init)
        _assert_same_logs(logs, json.loads((two / f"logs_rank{rank}.json").read_text()))
    for step in (1, 2):
        assert {"selection.json", "unlearn_config.json", "adapter_model.safetensors"} <= \
            {p.name for p in (two / f"checkpoint-{step}").iterdir()}
    _assert_same_adapter(reference, load_file(two / "final" / "expert_training_state.safetensors"), init)


@pytest.mark.slow
def test_fsdp2_adapter_is_the_standard_peft_adapter(equivalence_runs, fsdp_runs):
    """The adapter saved from sharded parameters loads with plain PEFT on the base model and equals the one
    process adapter (rebuilt here from the 1-process trainable tensors), tensors and logits."""
    from peft import PeftModel

    from hf_moe_unlearn import get_expert_peft_model
    from hf_moe_unlearn.routing import ExpertSelection

    one, two = equivalence_runs / "one" / "graddiff_seuf", fsdp_runs / "graddiff_seuf" / "final"
    expected = get_expert_peft_model(tiny_moe_model("qwen3_moe"), ExpertSelection.load(one / "selection.json"))
    expected._load_trainable_state(load_file(one / "adapter_rank0.safetensors"))
    _, expected_tensors = expected.standard_adapter()
    saved = load_file(two / "adapter_model.safetensors")
    assert saved.keys() == expected_tensors.keys()
    for key in saved:
        torch.testing.assert_close(saved[key], expected_tensors[key], rtol=0, atol=1e-6)
    plain = PeftModel.from_pretrained(tiny_moe_model("qwen3_moe"), str(two)).eval()
    ids = torch.tensor([[5, 9, 17, 23, 8, 12, 30, 41]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, expected.eval()(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
        assert not torch.allclose(plain(input_ids=ids).logits, tiny_moe_model("qwen3_moe")(input_ids=ids).logits)
