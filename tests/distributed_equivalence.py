"""Several unlearning runs in ONE launched process group, used by test_distributed.py:

    accelerate launch --num_processes N tests/distributed_equivalence.py OUT BS

Each configuration (one per loss family, with and without a retain set, and one through the CLI) trains 2 SGD
steps in fp32 from the same initial model, with ``use_cpu`` left at its default (what a user gets), and writes:

- ``OUT/<name>/adapter_rank<r>.safetensors``: the trainable tensors after training (rank r's copy);
- ``OUT/<name>/logs_rank<r>.json``: the training log entries (loss parts, routing shares) as rank r logged them;
- ``OUT/<name>/selection.json``: the selected experts.

Every text has the same length, so with N processes at per-device batch BS/N the effective batch and the mean
losses equal one process's at BS: the test compares the two runs.
"""

import json
import os
import sys

import datasets
import torch
from safetensors.torch import save_file

from conftest import make_tiny_tokenizer
from hf_moe_unlearn import MoEUnlearnConfig, MoEUnlearnTrainer, tiny_moe_model

datasets.disable_progress_bar()
FORGET = [" ".join(f"w{(i * 3 + j) % 20}" for i in range(10)) for j in range(16)]
RETAIN = [" ".join(f"w{40 + (i * 7 + j) % 80}" for i in range(10)) for j in range(16)]
COMMON = dict(max_steps=2, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", report_to="none",
              save_strategy="no", disable_tqdm=True, seed=0, logging_steps=1, attribution_batch_size=2)

#: name -> (config overrides, with a retain set)
CONFIGS = {
    "graddiff_seuf": (dict(forget_loss="ga", retain_loss="nll"), True),  # SEUF anchor (anchor_loss_weight=1)
    "ga_no_retain": (dict(forget_loss="ga", retain_loss="none"), False),
    "npo_kl": (dict(forget_loss="npo", retain_loss="kl", anchor_loss_weight=0.0), True),  # reference forwards
    "npo_no_retain": (dict(forget_loss="npo", retain_loss="none"), False),
    "rmu": (dict(forget_loss="rmu", retain_loss="rmu_retain", anchor_loss_weight=0.0,  # hooks on hidden states
                 rmu_steering_coeff=2.0, retain_loss_weight=10.0), True),
    "trace": (dict(forget_loss="npo", retain_loss="nll", selection_method="trace", retain_weighting="trace",
                   trace_rho=1.0, trace_tau=0.0), True),
}


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors, whole (an FSDP-sharded DTensor is gathered: every process calls this)."""
    def whole(p: torch.Tensor) -> torch.Tensor:
        return p.full_tensor() if hasattr(p, "full_tensor") else p
    return {n: whole(p.detach()).cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def record(trainer: MoEUnlearnTrainer, folder: str, init: dict[str, torch.Tensor]) -> None:
    rank = trainer.accelerator.process_index
    os.makedirs(folder, exist_ok=True)
    save_file(init, os.path.join(folder, f"init_rank{rank}.safetensors"))
    save_file(trainable(trainer.accelerator.unwrap_model(trainer.model_wrapped)),
              os.path.join(folder, f"adapter_rank{rank}.safetensors"))
    logs = [e for e in trainer.state.log_history if "loss" in e]
    with open(os.path.join(folder, f"logs_rank{rank}.json"), "w") as f:
        json.dump(logs, f)
    if rank == 0:
        trainer.selection.save(os.path.join(folder, "selection.json"))


def run(name: str, output_dir: str, per_device: int, before_trainer=None, **extra) -> MoEUnlearnTrainer:
    """Train configuration ``name`` and record it in ``output_dir/name`` (``before_trainer``: called between the
    config, which builds the process group, and the trainer, which builds the accelerator)."""
    overrides, with_retain = CONFIGS[name]
    args = MoEUnlearnConfig(output_dir=os.path.join(output_dir, name), per_device_train_batch_size=per_device,
                            **{**COMMON, **overrides, **extra})
    if before_trainer is not None:
        before_trainer()
    trainer = MoEUnlearnTrainer(tiny_moe_model("qwen3_moe"), args, forget_dataset=FORGET,
                                retain_dataset=RETAIN if with_retain else None, processing_class=make_tiny_tokenizer())
    init = trainable(trainer.model)
    trainer.train()
    record(trainer, os.path.join(output_dir, name), init)
    return trainer


def main(output_dir: str, per_device: int, only: set[str]) -> None:
    for name in CONFIGS:
        if not only or name in only:
            run(name, output_dir, per_device)

    if not only or "unwrapped" in only:
        # A launch whose model the Trainer's accelerator leaves unwrapped (as a custom accelerator or a model placed
        # by hand would) must be refused, on every process, before any step.
        from hf_moe_unlearn.errors import MoEUnlearnError

        args = MoEUnlearnConfig(output_dir=os.path.join(output_dir, "unwrapped"),
                                per_device_train_batch_size=per_device, **COMMON)
        trainer = MoEUnlearnTrainer(tiny_moe_model("qwen3_moe"), args, forget_dataset=FORGET, retain_dataset=RETAIN,
                                    processing_class=make_tiny_tokenizer(), selection={1: [0]})
        trainer.accelerator.prepare_model = lambda model, *a, **k: model
        try:
            trainer.train()
            outcome = "trained"
        except MoEUnlearnError as err:
            outcome = str(err)
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, f"outcome_rank{trainer.accelerator.process_index}.txt"), "w") as f:
            f.write(outcome)

    if not only or "cli" in only:
        # The CLI path (TrlParser -> MoEUnlearnConfig -> trainer -> save_model), GradDiff + SEUF, on inputs the main
        # process writes (transformers' save_pretrained writes from the main process only).
        from accelerate import PartialState

        from hf_moe_unlearn.cli import main as cli_main

        state = PartialState()
        inputs = os.path.join(output_dir, "cli_inputs")
        if state.is_main_process:
            tiny_moe_model("qwen3_moe").save_pretrained(inputs)
            make_tiny_tokenizer().save_pretrained(inputs)
            for split, texts in (("forget", FORGET), ("retain", RETAIN)):
                with open(os.path.join(inputs, f"{split}.txt"), "w") as f:
                    f.write("\n".join(texts) + "\n")
        state.wait_for_everyone()
        flags = [f"--{k}={v}" for k, v in COMMON.items()]
        code = cli_main(["unlearn", "--model", inputs, "--forget", os.path.join(inputs, "forget.txt"),
                     "--retain", os.path.join(inputs, "retain.txt"), "--output_dir", os.path.join(output_dir, "cli"),
                     "--per_device_train_batch_size", str(per_device), "--forget_loss", "ga", *flags])
        assert code == 0, code


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), set(os.environ.get("EQUIVALENCE_CONFIGS", "").split(",")) - {""})
