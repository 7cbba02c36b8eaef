"""DeepSpeed ZeRO-3: what the trainer sets up (no DeepSpeed needed), and, where DeepSpeed is installed, a run of
the shipped examples/accelerate/zero3.yaml on 1 and 2 processes against the same run without DeepSpeed.

Run as a script (``accelerate launch tests/test_zero3.py OUT PER_DEVICE``) it is the training job of that test.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

HERE = Path(__file__).parent
ROOT = HERE.parent
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def _zero_args(stage: int = 3, moe_names=None) -> SimpleNamespace:
    """What the trainer reads: ``args.deepspeed_plugin`` (accelerate's DeepSpeedPlugin) and its config dict."""
    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": stage}}, transformer_moe_cls_names=moe_names)
    return SimpleNamespace(deepspeed_plugin=plugin)


def test_zero3_turns_off_every_leaf_module_for_fused_experts(monkeypatch):
    from hf_moe_unlearn import tiny_moe_model
    from hf_moe_unlearn.deepspeed_support import configure_zero3

    monkeypatch.delenv("ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES", raising=False)
    args = _zero_args()
    assert configure_zero3(tiny_moe_model("qwen3_moe"), args) is True
    # Empty lists, not an absent key: an absent key gives DeepSpeed's defaults, which include Qwen3MoeSparseMoeBlock.
    assert args.deepspeed_plugin.deepspeed_config["zero_optimization"]["leaf_module"] == {
        "classes": [], "names": [], "name_suffixes": []}
    assert configure_zero3(tiny_moe_model("qwen3_moe"), args) is True  # a second trainer on the same args


def test_other_stages_are_left_alone():
    from hf_moe_unlearn import tiny_moe_model
    from hf_moe_unlearn.deepspeed_support import configure_zero3

    args = _zero_args(stage=2)
    assert configure_zero3(tiny_moe_model("qwen3_moe"), args) is False
    assert args.deepspeed_plugin.deepspeed_config == {"zero_optimization": {"stage": 2}}
    assert configure_zero3(tiny_moe_model("qwen3_moe"), SimpleNamespace(deepspeed_plugin=None)) is False


def test_requested_leaf_classes_are_refused(monkeypatch):
    from hf_moe_unlearn import tiny_moe_model
    from hf_moe_unlearn.deepspeed_support import configure_zero3
    from hf_moe_unlearn.errors import MoEUnlearnError

    with pytest.raises(MoEUnlearnError, match="deepspeed_moe_layer_cls_names=Qwen3MoeSparseMoeBlock"):
        configure_zero3(tiny_moe_model("qwen3_moe"), _zero_args(moe_names="Qwen3MoeSparseMoeBlock"))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES", "Qwen3MoeSparseMoeBlock")  # accelerate launch
    with pytest.raises(MoEUnlearnError, match="remove deepspeed_moe_layer_cls_names"):
        configure_zero3(tiny_moe_model("qwen3_moe"), _zero_args())
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES")
    args = _zero_args()
    args.deepspeed_plugin.deepspeed_config["zero_optimization"]["leaf_module"] = {"classes": ["Qwen3MoeSparseMoeBlock"]}
    with pytest.raises(MoEUnlearnError, match="leaf_module"):
        configure_zero3(tiny_moe_model("qwen3_moe"), args)


def test_trainer_refuses_modulelist_experts_and_partitioned_models(tiny_tokenizer, tmp_path, monkeypatch):
    """Through MoEUnlearnTrainer: the checks run before the model is read (a partitioned model would otherwise fail
    in find_moe_layers with a misleading 'could not read their router')."""
    from hf_moe_unlearn import MoEUnlearnConfig, MoEUnlearnTrainer, tiny_moe_model
    from hf_moe_unlearn.errors import MoEUnlearnError
    from hf_moe_unlearn.moe.tiny import tiny_modulelist_moe_model

    monkeypatch.delenv("ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES", raising=False)
    args = MoEUnlearnConfig(output_dir=str(tmp_path), report_to="none", max_steps=1)
    args.deepspeed_plugin = _zero_args().deepspeed_plugin
    forget = ["w1 w2 w3 w4", "w5 w6 w7 w8"]
    with pytest.raises(MoEUnlearnError, match="ZeRO-3 cannot train ListExpertsMoeBlock"):
        MoEUnlearnTrainer(tiny_modulelist_moe_model(), args, forget_dataset=forget, processing_class=tiny_tokenizer)
    model = tiny_moe_model("qwen3_moe")
    next(model.parameters()).ds_id = 0  # what zero.Init leaves on every parameter (with a [0]-shaped slice)
    with pytest.raises(MoEUnlearnError, match="no_zero3_init"):
        MoEUnlearnTrainer(model, args, forget_dataset=forget, processing_class=tiny_tokenizer)


def test_no_zero3_init_lifts_the_zero3_registration_and_restores_it():
    from transformers.integrations import deepspeed as hf_deepspeed

    from hf_moe_unlearn.deepspeed_support import no_zero3_init

    class Zero3Config:  # what transformers keeps a weak reference to (HfDeepSpeedConfig, which needs DeepSpeed)
        def is_zero3(self) -> bool:
            return True

    config = Zero3Config()
    hf_deepspeed.set_hf_deepspeed_config(config)
    try:
        assert hf_deepspeed.is_deepspeed_zero3_enabled()
        with no_zero3_init():
            assert not hf_deepspeed.is_deepspeed_zero3_enabled()  # from_pretrained would not use zero.Init here
        assert hf_deepspeed.is_deepspeed_zero3_enabled()
    finally:
        hf_deepspeed.unset_hf_deepspeed_config()


# ------------------------------------------------------------------------------------------- a real ZeRO-3 run
def _launch(out: Path, processes: int | None, per_device: int) -> None:
    """``processes=None``: the same job without accelerate (one process, no DeepSpeed), the reference."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator; it falls back to gloo without oneCCL
    job = [str(HERE / "test_zero3.py"), str(out), str(per_device)]
    if processes is None:
        cmd = [sys.executable, *job]
    else:
        accelerate = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
        cmd = [accelerate, "launch", "--config_file", str(ROOT / "examples" / "accelerate" / "zero3.yaml"),
               "--num_processes", str(processes), "--mixed_precision", "no",
               "--main_process_port", str(29700 + processes), *job]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="DeepSpeed is not installed (pip install 'hf-moe-unlearn[deepspeed]')")
def test_zero3_run_equals_the_run_without_deepspeed(tmp_path):
    """GA + NLL retain (two forwards per step), SGD, 4 sequences per step: ZeRO-3 on 1 and on 2 processes (2 x 2)
    saves the adapter the same job saves without DeepSpeed, and plain PEFT loads it."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from hf_moe_unlearn import tiny_moe_model

    _launch(tmp_path / "plain", None, 4)
    _launch(tmp_path / "z1", 1, 4)
    _launch(tmp_path / "z2", 2, 2)
    plain = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    update = max(float(v.abs().max()) for k, v in plain.items() if "lora_B" in k)  # B starts at zero
    assert update > 0
    for run in ("z1", "z2"):
        assert (tmp_path / run / "selection.json").read_text() == (tmp_path / "plain" / "selection.json").read_text()
        saved = load_file(tmp_path / run / "adapter_model.safetensors")
        assert saved.keys() == plain.keys()
        worst = max(float((saved[k] - plain[k]).abs().max()) for k in plain)
        assert worst <= 1e-4 * update, f"ZeRO-3 ({run}) differs by {worst:.3g} (LoRA B update {update:.3g})"
    ids = torch.arange(4, 24).view(2, 10)
    logits = {}
    for run in ("plain", "z2"):
        model = PeftModel.from_pretrained(tiny_moe_model("qwen3_moe"), tmp_path / run)  # plain PEFT, no hf_moe_unlearn
        with torch.no_grad():
            logits[run] = model(input_ids=ids).logits
    torch.testing.assert_close(logits["z2"], logits["plain"], rtol=1e-4, atol=1e-5)


def _train(output_dir: str, per_device: int) -> None:
    import datasets

    from conftest import make_tiny_tokenizer
    from hf_moe_unlearn import MoEUnlearnConfig, MoEUnlearnTrainer, tiny_moe_model
    from hf_moe_unlearn.deepspeed_support import no_zero3_init

    datasets.disable_progress_bar()
    forget = [" ".join(f"w{(i * 3 + j) % 20}" for i in range(10)) for j in range(16)]  # equal lengths: the mean
    retain = [" ".join(f"w{40 + (i * 7 + j) % 80}" for i in range(10)) for j in range(16)]  # loss splits exactly
    args = MoEUnlearnConfig(
        output_dir=output_dir, max_steps=3, per_device_train_batch_size=per_device, learning_rate=0.5, optim="sgd",
        forget_loss="ga", retain_loss="nll", selection_method="seuf", retain_weighting="none", report_to="none",
        save_strategy="no", disable_tqdm=True, seed=0, logging_steps=1,
    )
    with no_zero3_init():  # built after the config, as the CLI does: without this ZeRO-3 would partition it now
        model = tiny_moe_model("qwen3_moe")
    trainer = MoEUnlearnTrainer(model, args, forget_dataset=forget, retain_dataset=retain,
                                processing_class=make_tiny_tokenizer())
    trainer.train()
    trainer.save_model(output_dir)


if __name__ == "__main__":
    _train(sys.argv[1], int(sys.argv[2]))
