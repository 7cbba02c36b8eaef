"""FSDP2 runs launched by test_distributed.py with the shipped config:

    accelerate launch --config_file examples/accelerate/fsdp.yaml --num_processes 2 tests/distributed_fsdp.py OUT BS

accelerate (1.16) applies FSDP only on accelerator process groups: on a CPU-only machine it drops the FSDP plugin
and wraps the model in DDP (``AcceleratorState.__init__`` sets ``DistributedType.FSDP`` only for MULTI_GPU/XPU/...
types, not MULTI_CPU). To test our code under accelerate's real FSDP2 preparation (``fully_shard`` of every decoder
layer, parameters as DTensors over gloo), this script lets that branch run on CPU; everything after it is
accelerate's and transformers' own code. Configurations are those of distributed_equivalence.py, plus a checkpoint
every step and the final adapter saved with ``save_model`` (the standard PEFT adapter).
"""

import json
import os
import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor

import distributed_equivalence as eq

FSDP_CONFIGS = ("graddiff_seuf", "npo_kl", "rmu", "trace")


def fsdp_on_cpu() -> None:
    """Let AcceleratorState take its FSDP branch on the gloo (MULTI_CPU) process group built by the config."""
    state = PartialState()
    if state.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


if __name__ == "__main__":
    output_dir, per_device = sys.argv[1], int(sys.argv[2])
    only = set(os.environ.get("EQUIVALENCE_CONFIGS", "").split(",")) - {""}
    for name in FSDP_CONFIGS:
        if only and name not in only:
            continue
        trainer = eq.run(name, output_dir, per_device, save_strategy="steps", save_steps=1, before_trainer=fsdp_on_cpu)
        assert trainer.is_fsdp_enabled, trainer.accelerator.distributed_type
        # What was sharded: every parameter is a DTensor holding this process's share.
        sharded = [n for n, p in trainer.model.named_parameters() if isinstance(p, DTensor)]
        total = len(list(trainer.model.parameters()))
        with open(os.path.join(output_dir, name, f"sharded_rank{trainer.accelerator.process_index}.json"), "w") as f:
            json.dump({"sharded": len(sharded), "parameters": total}, f)
        trainer.save_model(os.path.join(output_dir, name, "final"))
