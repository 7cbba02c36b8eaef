"""Unlearning run used by test_distributed.py: `accelerate launch --num_processes N tests/distributed_unlearn.py OUT BS`.

``use_cpu`` is left at its default, as a user launching on this CPU-only machine has it.

Every text has the same length, so per-process mean losses average to the single-process mean and N processes
with per-device batch BS/N see the same effective batch as one process with BS.
"""

import json
import sys

import datasets

from conftest import make_tiny_tokenizer
from hf_moe_unlearn import MoEUnlearnConfig, MoEUnlearnTrainer, tiny_moe_model

datasets.disable_progress_bar()
output_dir, per_device = sys.argv[1], int(sys.argv[2])
forget = [" ".join(f"w{(i * 3 + j) % 20}" for i in range(10)) for j in range(16)]
retain = [" ".join(f"w{40 + (i * 7 + j) % 80}" for i in range(10)) for j in range(16)]
holdout = [" ".join(f"w{20 + (i * 3 + j) % 20}" for i in range(4 + j)) for j in range(7)]  # 7 texts, unequal lengths
args = MoEUnlearnConfig(
    output_dir=output_dir, max_steps=3, per_device_train_batch_size=per_device, learning_rate=1e-2,
    forget_loss="npo", retain_loss="nll", selection_method="seuf", retain_weighting="none", report_to="none",
    save_strategy="no", disable_tqdm=True, seed=0, logging_steps=1, eval_steps=1,
    per_device_eval_batch_size=2,
)
trainer = MoEUnlearnTrainer(tiny_moe_model("qwen3_moe"), args, forget_dataset=forget, retain_dataset=retain,
                            processing_class=make_tiny_tokenizer(), holdout_dataset=holdout)
trainer.train()
trainer.save_model(output_dir)
# Every process's own record of the evaluations (NLL sums are reduced over processes: they must agree).
evals = [e for e in trainer.state.log_history if "eval_holdout_nll" in e]
with open(f"{output_dir}/evals_rank{trainer.accelerator.process_index}.json", "w") as f:
    json.dump(evals, f)
