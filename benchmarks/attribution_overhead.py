"""Throughput of the attribution pass (forward under RouterRecorder) relative to a plain no-grad forward.

    python benchmarks/attribution_overhead.py                  # tiny model on CPU
    python benchmarks/attribution_overhead.py --size gpu       # 0.49B Qwen3-MoE, bf16, 8x1024 tokens, on CUDA

Both are measured in one run, interleaved (plain, recorded, plain, recorded, ...), and the ratio of the medians
is printed: recorded throughput / plain throughput. Target on GPU: >= 0.97. Imports only torch/transformers
(no datasets/trl), so it runs where those are missing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from hf_moe_unlearn.moe.tiny import benchmark_qwen3_moe_config, tiny_moe_config
from hf_moe_unlearn.routing.recorder import RouterRecorder


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=["tiny", "gpu"], default="tiny")
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.size == "gpu":
        config, dtype, batch, seq = benchmark_qwen3_moe_config(), torch.bfloat16, 8, 1024
    else:
        config, dtype, batch, seq = tiny_moe_config("qwen3_moe", num_hidden_layers=4, num_experts=8), torch.float32, 8, 128
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    mask = torch.ones(batch, seq, device=device)
    mask[:, -seq // 8 :] = 0  # some padding, as real batches have
    recorder = RouterRecorder(model)

    def run(recorded: bool) -> float:
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(args.iters):
                if recorded:
                    recorder.set_mask(mask)
                model(input_ids=ids, attention_mask=mask.long(), use_cache=False)
        _sync(device)
        return batch * seq * args.iters / (time.perf_counter() - start)

    run(False)  # warm-up (kernels, allocator)
    with recorder:
        run(True)
    plain, recorded = [], []
    for _ in range(args.repeats):
        plain.append(run(False))
        with recorder:
            recorded.append(run(True))
    stats = recorder.stats()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    params = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"device: {name}; torch {torch.__version__}; model: qwen3_moe {params:.2f}B params, {dtype}, "
          f"batch {batch}x{seq}, {args.repeats} repeats x {args.iters} forwards")
    print(f"| forward | tokens/s (median) |\n|---|---|\n| plain no-grad | {statistics.median(plain):,.0f} |\n"
          f"| under RouterRecorder | {statistics.median(recorded):,.0f} |")
    ratios = [r / p for r, p in zip(recorded, plain)]
    print(f"ratio recorded/plain: median {statistics.median(ratios):.3f} (per repeat: "
          f"{', '.join(f'{r:.3f}' for r in ratios)}); counted tokens {stats.tokens:,.0f}")


if __name__ == "__main__":
    main()
