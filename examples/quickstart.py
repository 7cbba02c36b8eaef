"""Unlearn a forget set from an MoE model with SEUF (one expert, LoRA, router anchor) + GradDiff, TRL style.

Real use: `model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen1.5-MoE-A2.7B")` and your own datasets.
Here a tiny random Qwen3-MoE and word-list texts stand in, so it runs anywhere in seconds.
"""

from datasets import Dataset

from hf_moe_unlearn import MoEUnlearnConfig, MoEUnlearnTrainer, tiny_moe_model
from hf_moe_unlearn.bench.tokenizer import build_tokenizer

forget = Dataset.from_dict({"text": [f"the agent z{i} binds receptor q{i % 5} and spreads fast" for i in range(32)]})
retain = Dataset.from_dict({"text": [f"the river r{i} flows past town t{i % 7} in spring" for i in range(32)]})
tokenizer = build_tokenizer(list(forget["text"]) + list(retain["text"]))
model = tiny_moe_model("qwen3_moe", vocab_size=len(tokenizer))

args = MoEUnlearnConfig(output_dir="out/quickstart", forget_loss="ga", retain_loss="nll", anchor_loss_weight=1.0,
                        selection_method="seuf", max_steps=8, per_device_train_batch_size=4, report_to="none")
trainer = MoEUnlearnTrainer(model, args, forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer)
trainer.train()
trainer.save_model()  # a standard PEFT adapter + selection.json + model card
print("selected experts:", trainer.selection.experts, "-> saved to", args.output_dir)
