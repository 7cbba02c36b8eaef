"""`accelerate launch --num_processes 2` (CPU, gloo) gives the same selection and adapter as one process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent


def _launch(out: Path, processes: int, per_device: int) -> None:
    accelerate = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    # On a machine without GPUs, `--multi_gpu` starts torchrun and accelerate falls back to gloo on CPU
    # (`--cpu` with several processes would need mpirun).
    mode = "--multi_gpu" if processes > 1 else "--cpu"
    cmd = [accelerate, "launch", mode, "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(29500 + processes),
           str(HERE / "distributed_unlearn.py"), str(out), str(per_device)]
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
