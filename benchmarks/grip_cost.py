"""Memory and time cost of GRIP's router constraint (``router_constraint="grip"``), against the same trainer without it.

    python benchmarks/grip_cost.py                 # the built-in benchmark's model (hidden 64, 4 MoE layers), CPU
    python benchmarks/grip_cost.py --size gpu      # the 0.49B Qwen3-MoE of docs/performance.md (hidden 1024), CUDA

The model is the benchmark's architecture with random weights (cost does not depend on what it learnt), the data
the synthetic benchmark's forget/retain passages and tokenizer. The routers of every MoE layer train (one expert
per layer with LoRA): the most routers GRIP can have to constrain. Printed, all measured in this one run:

- memory: bytes GRIP holds during the collection (per constrained layer the float64 sums of h h^T, [d, d]) and
  during training (the routers' start values [E, d] and protected directions U [d, r], float32); the null space's
  size per layer;
- collection: the seconds of GRIP's collection pass (forward over the retain set + eigendecompositions), and as a
  ratio to a plain no-grad forward over the same examples in the same batches;
- per step: the median wall time of a training step with GRIP over the same without it (interleaved repeats, a
  fresh trainer each, the first step of each left out as warm-up), and the projection alone (median of repeated
  calls) as a share of a step without GRIP.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from hf_moe_unlearn.bench.pretrain import default_model_config
from hf_moe_unlearn.bench.synthetic import BenchmarkSpec, make_benchmark
from hf_moe_unlearn.bench.tokenizer import build_benchmark_tokenizer
from hf_moe_unlearn.config import MoEUnlearnConfig
from hf_moe_unlearn.data.text import PaddingCollator, tokenize_dataset
from hf_moe_unlearn.moe.layers import find_moe_layers
from hf_moe_unlearn.moe.tiny import benchmark_qwen3_moe_config
from hf_moe_unlearn.trainer import MoEUnlearnTrainer


class StepTimer(TrainerCallback):
    """Wall time of every training step (``on_step_begin`` to ``on_step_end``, device synchronised)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times, self._start = device, [], 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._start)


def _mib(n: int) -> str:
    return f"{n / 2**20:.3f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=["tiny", "gpu"], default="tiny")
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bench = make_benchmark(BenchmarkSpec.preset("small"))
    tokenizer = build_benchmark_tokenizer(bench)
    if args.size == "gpu":
        config, dtype = benchmark_qwen3_moe_config(vocab_size=max(32000, len(tokenizer))), torch.bfloat16
    else:
        config, dtype = default_model_config(tokenizer), torch.float32
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).to(dtype=dtype)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    layers = [layer.index for layer in find_moe_layers(base)]
    forget, retain = list(bench.forget_text["text"]), list(bench.retain_text["text"])

    def trainer(constraint: str, steps: int) -> MoEUnlearnTrainer:
        model = AutoModelForCausalLM.from_config(config).to(dtype=dtype)
        model.load_state_dict(state)
        cfg = MoEUnlearnConfig(
            output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=args.batch, report_to="none",
            disable_tqdm=True, logging_steps=10**6, save_strategy="no", seed=0, use_cpu=device.type == "cpu",
            bf16=dtype == torch.bfloat16, router_constraint=constraint, max_length=256,
            max_param_norm_growth=None)
        return MoEUnlearnTrainer(model.to(device), cfg, forget_dataset=forget, retain_dataset=retain,
                                 processing_class=tokenizer, selection={l: [0] for l in layers})

    # --- collection: GRIP's pass against a plain no-grad forward over the same examples, same batches
    grip = trainer("grip", 1).grip
    data = tokenize_dataset(retain, tokenizer, 256, name="retain set")
    collate = PaddingCollator(tokenizer.pad_token_id)
    model = trainer("none", 1).model.eval()
    plain = []
    for _ in range(2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(data), 8):  # attribution_batch_size, the collection's batch
                batch = collate([dict(data[j]) for j in range(i, min(i + 8, len(data)))])
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                      use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        plain.append(time.perf_counter() - start)
    collection = grip.collection_seconds
    tokens = next(iter(grip.layers.values())).tokens

    # --- memory
    print(f"model: {config.model_type}, hidden {config.hidden_size}, {len(layers)} MoE layers, "
          f"{config.num_experts} experts, {dtype}, {device}; constrained routers: {len(grip.layers)} (every layer)")
    print("\n| layer | d (H + bias) | protected r | null space d - r | retain energy left | collection sums "
          "[d, d] f64 | held in training (start + U, f32) |")
    print("|---|---|---|---|---|---|---|")
    collect_bytes = held_bytes = 0
    for index, layer in grip.layers.items():
        d, r = layer.directions.shape
        sums = (d * d + d + 1) * 8
        held = layer.start.numel() * 4 + layer.directions.numel() * 4
        collect_bytes, held_bytes = collect_bytes + sums, held_bytes + held
        print(f"| {index} | {d} | {r} | {d - r} | {layer.retain_energy_left:.1e} | {_mib(sums)} | {_mib(held)} |")
    router_bytes = sum(layer.start.numel() * 4 for layer in grip.layers.values())
    print(f"\nmemory: collection {_mib(collect_bytes)} (freed after it), training {_mib(held_bytes)} "
          f"({held_bytes / router_bytes:.1f}x the constrained router weights in float32)")
    print(f"collection: {tokens} retain tokens, {collection:.3f} s; plain no-grad forward over the same examples "
          f"{statistics.median(plain):.3f} s -> ratio {collection / statistics.median(plain):.2f}")

    # --- per step: interleaved, fresh trainers, first step of each left out
    medians = {"none": [], "grip": []}
    for _ in range(args.repeats):
        for constraint in ("none", "grip"):
            t = trainer(constraint, args.steps + 1)
            timer = StepTimer(device)
            t.add_callback(timer)
            t.train()
            medians[constraint].append(statistics.median(timer.times[1:]))
    ratios = [g / n for g, n in zip(medians["grip"], medians["none"])]
    calls = []
    for _ in range(50):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        grip.project()
        if device.type == "cuda":
            torch.cuda.synchronize()
        calls.append(time.perf_counter() - start)
    step = statistics.median(medians["none"])
    print(f"step (median, batch {args.batch} forget + {args.batch} retain): without GRIP "
          f"{', '.join(f'{m * 1e3:.1f}' for m in medians['none'])} ms, with GRIP "
          f"{', '.join(f'{m * 1e3:.1f}' for m in medians['grip'])} ms -> ratio with/without per repeat "
          f"{', '.join(f'{r:.3f}' for r in ratios)}")
    print(f"projection alone: {statistics.median(calls) * 1e6:.0f} us per step = "
          f"{statistics.median(calls) / step:.4f} of a step without GRIP")


if __name__ == "__main__":
    main()
