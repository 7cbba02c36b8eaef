"""Training-step time of reference-based unlearning with and without the reference cache (``cache_reference``).

    OMP_NUM_THREADS=1 python benchmarks/reference_cache.py --device cpu --size tiny --repeats 3 --steps 8 --threads 1
    python benchmarks/reference_cache.py --device cuda --size gpu --repeats 3 --steps 20

NPO and IdkDPO compare the model with its frozen start through the reference's summed NLL of each example. Without
the cache the trainer runs the model a second time every step, adapter disabled, to get it (IdkDPO: twice, on the
true and on the IDK answer); with it, only the first time an example is seen. Each loss setting is trained by two
``MoEUnlearnTrainer`` s (cache on, cache off) built from the same model weights, seed and data, stepped through the
Trainer's own ``training_step`` and optimizer (AdamW, the Trainer's default). One epoch of warm-up fills the cache;
the timed steps are the later epochs, where the cache serves every reference value.

Every variant is built once and stays resident; in each repeat the variants take turns of ``--block`` steps until
each has run ``--steps``, in an order rotated every repeat, and ratios are taken within a repeat, so drift in the
machine's speed falls on all variants alike. Printed: seconds per step of each variant, the ratio (cache off / cache
on: how much faster the cached run steps), the reference forwards each variant ran in its timed steps, and the
largest difference between the two adapters after the run (the cache must not change the training).
"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch

# One definition for the step benchmarks: the same model sizes ("tiny", and "gpu" = the 0.49B of every GPU
# figure), device naming and argument checks as benchmarks/expert_lora_step.py.
from expert_lora_step import SIZES, _at_least_one, build_model, device_name, interleaved_elapsed, sync

SELECTION = {6: [0]}  # SEUF's default: one expert in layer 6 of 8, plus its router (anchor on)
EXAMPLES = 16  # forget examples (and retain examples): EXAMPLES / batch steps per epoch

#: name -> MoEUnlearnConfig overrides; "qa": prompt/answer/IDK examples instead of documents
SETTINGS = {
    "NPO": dict(forget_loss="npo", retain_loss="none"),
    "NPO + GradDiff retain": dict(forget_loss="npo", retain_loss="nll"),
    "IdkDPO + GradDiff retain": dict(forget_loss="idk_dpo", retain_loss="nll", qa=True),
}


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over ``w0 w1 ...`` filling the model's vocabulary (no download; one word, one token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(vocab_size - 4)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                   unk_token="<unk>")


def texts(count: int, words: int, vocab_size: int, seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size - 4, (count, words), generator=generator)
    return [" ".join(f"w{i}" for i in row.tolist()) for row in ids]


def datasets_for(setting: dict, size: str, vocab_size: int):
    """(forget, retain or None): documents of ``seq`` tokens, or prompt/answer/IDK rows of the same total length."""
    seq = SIZES[size]["seq"]
    retain = texts(EXAMPLES, seq - 1, vocab_size, seed=2) if setting["retain_loss"] != "none" else None
    if not setting.get("qa"):
        return texts(EXAMPLES, seq - 1, vocab_size, seed=1), retain
    prompt_words = seq // 4
    prompts = texts(EXAMPLES, prompt_words, vocab_size, seed=3)
    answers = texts(EXAMPLES, seq - prompt_words - 1, vocab_size, seed=4)
    idk = texts(EXAMPLES, 16, vocab_size, seed=5)  # an "I don't know" answer is short
    return [{"prompt": p, "answer": a, "idk": i} for p, a, i in zip(prompts, answers, idk)], retain


@dataclass
class Prepared:
    name: str
    cache: bool
    trainer: object
    optimizer: torch.optim.Optimizer
    batches: list[dict[str, torch.Tensor]]
    reference_forwards: int = 0  # counted while timed
    counting: bool = False
    step: int = 0


def prepare(name: str, setting: dict, cache: bool, size: str, device: torch.device, tmp: str) -> Prepared:
    from hf_moe_unlearn import MoEUnlearnConfig, MoEUnlearnTrainer
    from hf_moe_unlearn.trainer import unwrap_peft

    model = build_model(size, device)
    tokenizer = word_tokenizer(model.config.vocab_size)
    forget, retain = datasets_for(setting, size, model.config.vocab_size)
    overrides = {k: v for k, v in setting.items() if k != "qa"}
    args = MoEUnlearnConfig(output_dir=tmp, per_device_train_batch_size=SIZES[size]["batch"], report_to="none",
                            disable_tqdm=True, save_strategy="no", seed=0, learning_rate=1e-4,
                            max_length=SIZES[size]["seq"], use_cpu=device.type == "cpu", cache_reference=cache,
                            **overrides)
    trainer = MoEUnlearnTrainer(model, args, forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer,
                                selection=SELECTION)
    trainer.create_optimizer()
    batches = [trainer._prepare_inputs(b) for b in trainer.get_train_dataloader()]
    prepared = Prepared(name, cache, trainer, trainer.optimizer, batches)

    # Count the reference forwards: model forwards while the adapter is disabled (what the trainer's reference runs).
    peft_model = unwrap_peft(trainer.model)
    original = peft_model.disable_adapter

    @contextmanager
    def counted():
        with original():
            prepared.counting = True
            try:
                yield
            finally:
                prepared.counting = False

    peft_model.disable_adapter = counted
    peft_model.get_input_embeddings().register_forward_pre_hook(
        lambda module, inputs: setattr(prepared, "reference_forwards", prepared.reference_forwards + prepared.counting))
    trainer._attach_hooks()  # as Trainer.train does (router hooks live only while training)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop, read by training_step
    for _ in batches:  # warm-up: one epoch, which fills the cache
        train_step(prepared)
    prepared.reference_forwards = 0
    return prepared


def train_step(prepared: Prepared) -> None:
    """One optimizer step of the Trainer: its ``training_step`` (train mode, autocast, compute_loss, backward),
    then the optimizer."""
    trainer = prepared.trainer
    batch = prepared.batches[prepared.step % len(prepared.batches)]
    prepared.step += 1
    trainer.training_step(trainer.model, batch)
    prepared.optimizer.step()
    prepared.optimizer.zero_grad(set_to_none=True)


def interleaved_seconds(prepared: list[Prepared], steps: int, block: int, device: torch.device,
                        repeat: int) -> list[float]:
    """Seconds per step of every variant over one repeat, timed in round-robin blocks (:func:`interleaved_elapsed`)."""
    def run_steps(i: int, n: int) -> None:
        for _ in range(n):
            train_step(prepared[i])

    return [e / steps for e in interleaved_elapsed(run_steps, len(prepared), steps, block, device, repeat)]


def adapter_difference(a: Prepared, b: Prepared) -> float:
    """Largest |difference| between the trainable tensors of two variants (the same steps, the same batches)."""
    pa = {n: p.detach() for n, p in a.trainer.model.named_parameters() if p.requires_grad}
    pb = {n: p.detach() for n, p in b.trainer.model.named_parameters() if p.requires_grad}
    return max(float((pa[n].float() - pb[n].float()).abs().max()) for n in pa)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--repeats", type=_at_least_one, default=3)
    parser.add_argument("--steps", type=_at_least_one, default=8, help="timed optimizer steps per variant and repeat")
    parser.add_argument("--block", type=_at_least_one, default=4,
                        help="steps each variant runs in its turn; the variants take turns until --steps are done")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU intra-op threads (1 is steadier when other processes share the cores)")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    import tempfile

    import datasets
    import transformers

    datasets.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    logging.getLogger("hf_moe_unlearn").setLevel(logging.WARNING)
    spec = SIZES[args.size]
    print(f"device: {device_name(device)}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {sys.version.split()[0]}")
    print(f"model: qwen3_moe, size {args.size} ({spec['dtype']}), batch {spec['batch']}x{spec['seq']} tokens, "
          f"LoRA on expert 0 of layer 6 + its router (SEUF anchor on); {EXAMPLES} forget examples; one epoch of "
          f"warm-up, then {args.steps} timed steps per variant and repeat, {args.repeats} repeats")

    with tempfile.TemporaryDirectory() as tmp:
        prepared = [prepare(name, SETTINGS[name], cache, args.size, device, tmp)
                    for name in args.settings for cache in (False, True)]
        seconds = [interleaved_seconds(prepared, args.steps, args.block, device, r) for r in range(args.repeats)]

    print("\n| setting | s/step, cache off (per repeat) | s/step, cache on | off / on | reference forwards in "
          "timed steps (off / on) | max adapter diff |")
    print("|" + "---|" * 6)
    failed = False
    for i in range(0, len(prepared), 2):
        off, on = prepared[i], prepared[i + 1]
        ratios = [rep[i] / rep[i + 1] for rep in seconds]
        diff = adapter_difference(off, on)
        failed |= on.reference_forwards != 0 or diff > 1e-4
        print(f"| {off.name} | {' / '.join(f'{rep[i]:.4f}' for rep in seconds)} | "
              f"{' / '.join(f'{rep[i + 1]:.4f}' for rep in seconds)} | {', '.join(f'{r:.2f}' for r in ratios)} | "
              f"{off.reference_forwards} / {on.reference_forwards} | {diff:.1e} |")
    print(f"\ncheck: no reference forward with the cache after the first epoch, and the same adapter (max diff <= 1e-4)"
          f" -> {'FAIL' if failed else 'PASS'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
