"""Atomic saves, one run per output folder, and resuming the latest complete checkpoint (issue 12, items 1 and 4).

The kill tests run a real save in a child process and SIGKILL it at several points (inside the Trainer's writes,
and at each step of the publication), then check that the folder holds either the previous complete save or the new
one — every file byte-identical to one uninterrupted save, all from the same one — or is refused by the loader.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import make_tiny_tokenizer
from hf_moe_unlearn import saving
from hf_moe_unlearn.adapter.model import ExpertPeftModel
from hf_moe_unlearn.cli import main
from hf_moe_unlearn.config import MoEUnlearnConfig
from hf_moe_unlearn.errors import MoEUnlearnError
from hf_moe_unlearn.moe import tiny_moe_model
from hf_moe_unlearn.trainer import MoEUnlearnTrainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FORGET = [" ".join(f"w{(i * 3) % 20}" for i in range(j, j + 8)) for j in range(4)]
TESTS = os.path.dirname(os.path.abspath(__file__))


def _trainer(out, **kw):
    args = dict(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, report_to="none", disable_tqdm=True,
                use_cpu=True, logging_steps=1, save_strategy="steps", save_steps=1, seed=0, retain_loss="none")
    args.update(kw)
    return MoEUnlearnTrainer(tiny_moe_model("qwen3_moe"), MoEUnlearnConfig(**args), forget_dataset=FORGET,
                             processing_class=make_tiny_tokenizer(), selection={1: [0]})


def _listed(folder):
    with open(os.path.join(folder, saving.SAVE_MARKER)) as f:
        return json.load(f)["files"]


# ------------------------------------------------------------------------------------------------ markers
def test_checkpoints_and_final_save_are_marked_complete(tmp_path):
    out = tmp_path / "out"
    trainer = _trainer(out, save_total_limit=2)
    trainer.train()
    trainer.save_model(str(out))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]  # rotated after
    for checkpoint in out.glob("checkpoint-*"):
        listed = _listed(checkpoint)
        # every file the Trainer and we wrote, with its size on disk (the optimizer and the state come last)
        on_disk = {p.name: p.stat().st_size for p in checkpoint.iterdir() if p.name != saving.SAVE_MARKER
                   and p.name != "README.md"}
        assert listed == on_disk
        assert {"optimizer.pt", "trainer_state.json", "adapter_model.safetensors", "selection.json",
                "unlearn_config.json", "training_args.bin"} <= set(listed)
        # written back with the real limit after the rotation was deferred
        assert json.loads((checkpoint / "unlearn_config.json").read_text())["save_total_limit"] == 2
        assert torch.load(checkpoint / "training_args.bin", weights_only=False).save_total_limit == 2
    final = _listed(out)
    assert {"adapter_model.safetensors", "adapter_config.json", "selection.json", "unlearn_config.json"} <= set(final)
    assert not any(name.startswith("checkpoint-") for name in final)
    assert not (out / saving.STAGING_DIR).exists()


# ------------------------------------------------------------------------------------------ output folders
def test_second_run_into_a_used_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    _trainer(out, max_steps=1).train()
    second = _trainer(out, max_steps=1)
    with pytest.raises(MoEUnlearnError, match=r"already holds a run \(checkpoint-1\).*resume_from_checkpoint=True.*"
                                              r"overwrite_output_dir=True"):
        second.train()
    assert second.state.global_step == 0


def test_overwrite_output_dir_replaces_the_previous_run(tmp_path):
    out = tmp_path / "out"
    first = _trainer(out, max_steps=3)
    first.train()
    first.save_model(str(out))
    (out / "notes.txt").write_text("mine")  # not part of a run: kept
    _trainer(out, max_steps=1, overwrite_output_dir=True).train()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "notes.txt"]


def test_resume_latest_skips_an_incomplete_checkpoint(tmp_path):
    out = tmp_path / "out"
    _trainer(out, max_steps=3).train()
    (out / "checkpoint-3" / "optimizer.pt").write_bytes(b"half")  # as a kill mid-write leaves it
    with pytest.raises(MoEUnlearnError, match=r"checkpoint-3: its save did not finish \(optimizer.pt has 4 bytes"):
        _trainer(out, max_steps=4).train(resume_from_checkpoint=str(out / "checkpoint-3"))
    resumed = _trainer(out, max_steps=4)
    loaded = []
    original = resumed._load_from_checkpoint
    resumed._load_from_checkpoint = lambda path, *a, **k: (loaded.append(os.path.basename(path)),
                                                           original(path, *a, **k))[1]
    resumed.train(resume_from_checkpoint="latest")
    assert loaded == ["checkpoint-2"] and resumed.state.global_step == 4
    # the incomplete one was set aside, so neither rotation nor a later resume can take it
    assert (out / "checkpoint-3.incomplete").is_dir()
    assert saving.last_complete_checkpoint(str(out)) == str(out / "checkpoint-4")


def test_loader_refuses_an_interrupted_final_save(tmp_path):
    out = tmp_path / "out"
    trainer = _trainer(out, max_steps=1, save_strategy="no")
    trainer.train()
    trainer.save_model(str(out))
    ExpertPeftModel.from_pretrained(tiny_moe_model("qwen3_moe"), str(out))  # complete: loads
    (out / saving.STAGING_DIR).mkdir()
    (out / saving.SAVE_MARKER).unlink()  # what a kill between the marker's removal and the new one leaves
    with pytest.raises(MoEUnlearnError, match=r"did not finish .*no save_complete.json.*\.incomplete-save/ is still"):
        ExpertPeftModel.from_pretrained(tiny_moe_model("qwen3_moe"), str(out))


# ------------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_moe_model("qwen3_moe").save_pretrained(root / "model")
    make_tiny_tokenizer().save_pretrained(root / "model")
    (root / "forget.txt").write_text("\n".join(FORGET) + "\n")
    return root


def _unlearn(root, out, *flags):
    return main(["unlearn", "--model", str(root / "model"), "--forget", str(root / "forget.txt"),
                 "--retain_loss", "none", "--output_dir", str(out), "--report_to", "none", "--use_cpu", "true",
                 "--disable_tqdm", "true", "--per_device_train_batch_size", "4", "--save_steps", "1",
                 "--selection_method", "seuf", *flags])


def test_cli_refuses_a_used_folder_and_resumes_with_a_bare_flag(cli_files, tmp_path, capsys):
    out = tmp_path / "out"
    assert _unlearn(cli_files, out, "--max_steps", "2") == 0
    capsys.readouterr()
    assert _unlearn(cli_files, out, "--max_steps", "3") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "already holds a run" in err[0] and "--overwrite_output_dir" in err[0], err
    assert "Tokenizing" not in err[0] and "Traceback" not in err[0]
    assert _unlearn(cli_files, out, "--max_steps", "3", "--resume_from_checkpoint") == 0  # no value: the latest
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and (out / "checkpoint-2").is_dir()
    assert _unlearn(cli_files, out, "--max_steps", "1", "--overwrite_output_dir", "true") == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]


# --------------------------------------------------------------------------------------------- kill tests
CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from conftest import make_tiny_tokenizer
    from hf_moe_unlearn import saving
    from hf_moe_unlearn.config import MoEUnlearnConfig
    from hf_moe_unlearn.moe import tiny_moe_model
    from hf_moe_unlearn.trainer import MoEUnlearnTrainer

    out, kill = sys.argv[1], sys.argv[2]
    args = MoEUnlearnConfig(output_dir=out, max_steps=2, per_device_train_batch_size=4, report_to="none",
                            disable_tqdm=True, use_cpu=True, save_strategy="steps", save_steps=2, seed=0,
                            retain_loss="none", learning_rate=0.05, lr_scheduler_type="constant")
    trainer = MoEUnlearnTrainer(tiny_moe_model("qwen3_moe"), args, forget_dataset={forget!r},
                                processing_class=make_tiny_tokenizer(), selection={{1: [0]}})

    armed = []  # kill points fire only in the save under test, not in the first, complete one

    def die(where):
        if armed and where == kill:
            os.kill(os.getpid(), signal.SIGKILL)

    publish = saving.publish
    saving.publish = lambda staging, folder, kill_point=None: publish(staging, folder, kill_point=die)
    write_run_files = trainer._write_run_files
    def written(folder):
        write_run_files(folder)
        die("staged" if os.path.basename(folder) == saving.STAGING_DIR else "checkpoint model written")
    trainer._write_run_files = written

    trainer.train()
    if kill.startswith("checkpoint"):  # checkpoint-2 complete; the resumed run dies while writing checkpoint-4
        armed.append(True)
        args.max_steps = 4
        trainer.train(resume_from_checkpoint=True)
    else:  # a first final save (A) complete, then two more steps and a second save into the same folder (B)
        trainer.save_model(out)
        if kill == "after A":
            sys.exit(0)
        armed.append(True)
        trainer.train()
        trainer.save_model(out)
""")


def _child(out, kill):
    """Run the child in ``out``'s parent with the relative output folder ``out`` (the saved configs name it, so
    every run's files can be byte-identical)."""
    script = CHILD.format(tests=TESTS, forget=FORGET)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-c", script, "out", kill], env=env, capture_output=True, text=True,
                          timeout=300, cwd=out.parent)


def _contents(folder):
    return {name: (folder / name).read_bytes() for name in saving.read_marker(str(folder)) or {}}


@pytest.fixture(scope="module")
def saves(tmp_path_factory):
    """The two uninterrupted final saves, A (after 2 steps) and B (after 4), byte by byte."""
    root = tmp_path_factory.mktemp("saves")
    first = _child(root / "a" / "out", "after A")
    assert first.returncode == 0, first.stderr[-3000:]
    both = _child(root / "b" / "out", "none")
    assert both.returncode == 0, both.stderr[-3000:]
    a, b = _contents(root / "a" / "out"), _contents(root / "b" / "out")
    assert a.keys() == b.keys() and a["adapter_model.safetensors"] != b["adapter_model.safetensors"]
    return a, b


@pytest.mark.parametrize("kill", ["staged", "marker removed", "moved adapter_model.safetensors", "marker written"])
def test_kill_during_a_final_save(saves, tmp_path, kill):
    a, b = saves
    result = _child(tmp_path / "out", kill)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    folder = tmp_path / "out"
    if saving.marker_problem(str(folder)) is None:
        contents = _contents(folder)
        assert contents in (a, b), kill  # every listed file from one complete save, none mixed
        ExpertPeftModel.from_pretrained(tiny_moe_model("qwen3_moe"), str(folder))
        expected = {"staged": a, "marker written": b}[kill]
        assert contents == expected
    else:
        assert kill in ("marker removed", "moved adapter_model.safetensors")
        with pytest.raises(MoEUnlearnError, match="did not finish"):
            ExpertPeftModel.from_pretrained(tiny_moe_model("qwen3_moe"), str(folder))


def test_kill_during_a_checkpoint_leaves_the_previous_one(tmp_path):
    result = _child(tmp_path / "out", "checkpoint model written")
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    out = tmp_path / "out"
    # checkpoint-2 was complete (the first run); the kill hit the resumed run's checkpoint-4 before its optimizer
    assert saving.marker_problem(str(out / "checkpoint-2")) is None
    assert saving.marker_problem(str(out / "checkpoint-4")) == f"it has no {saving.SAVE_MARKER}"
    assert saving.last_complete_checkpoint(str(out)) == str(out / "checkpoint-2")
