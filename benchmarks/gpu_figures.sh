#!/usr/bin/env bash
# The GPU figures that docs/performance.md reports, in one run from the repository root (about 3 minutes on an H100):
# the attribution-pass overhead and the expert-LoRA training step, on the 0.49B Qwen3-MoE (bf16, 8x1024 tokens).
#
#     bash benchmarks/gpu_figures.sh                              # writes to $OUT (the device tool's folder) or ./bench-gpu
#     BENCH_DEVICE=cpu BENCH_SIZE=tiny bash benchmarks/gpu_figures.sh   # the same run on the tiny model, to try it out
#
# Needs torch, transformers and peft only; the package is used from the checkout (PYTHONPATH), not installed.
# A benchmark whose targets fail exits 1; the other still runs, and each one's exit status is kept in status.txt.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
device="${BENCH_DEVICE:-cuda}"
size="${BENCH_SIZE:-gpu}"
out="${OUT:-bench-gpu}"
mkdir -p "$out"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
fi
python benchmarks/attribution_overhead.py --device "$device" --size "$size" --repeats 7 2>&1 |
    tee "$out/attribution_overhead.txt"
echo "attribution_overhead: ${PIPESTATUS[0]}" >"$out/status.txt"
python benchmarks/expert_lora_step.py --device "$device" --size "$size" --repeats 3 --steps 30 --warmup 5 2>&1 |
    tee "$out/expert_lora_step.txt"
echo "expert_lora_step: ${PIPESTATUS[0]}" >>"$out/status.txt"
cat "$out/status.txt"
