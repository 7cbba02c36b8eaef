"""How many aten ops expert-selective LoRA adds to a training step, per selected layer, over the all-depth ceiling.

    python benchmarks/expert_lora_ops.py

On a GPU at the benchmark's size the step is bound by the CPU that launches kernels (docs/performance.md), so the
number of kernels each selected layer adds is what its speed against the frozen ceiling hangs on. This counts, with
a dispatch recorder, the ops of one forward and one backward of the tiny Qwen3-MoE of expert_lora_step.py for the
"every layer" selection and for the ceiling, and prints the difference per layer, kernels and view ops apart (views
launch nothing). Counts do not depend on the device or on timing.
"""

from __future__ import annotations

import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from expert_lora_step import VARIANTS, build_model, make_optimizer, train_step

# Ops that only make a new view of existing memory: no kernel is launched for them.
VIEW_OPS = {"t", "view", "select", "expand", "unsqueeze", "transpose", "split", "detach", "as_strided", "slice",
            "_unsafe_view", "alias", "squeeze", "permute", "reshape", "unbind"}


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts["views" if func.overloadpacket.__name__ in VIEW_OPS else "kernels"] += 1
        return func(*args, **(kwargs or {}))


def count_step(variant_index: int) -> dict[str, int]:
    """Ops of one forward and one backward (after a first step, so that caches are built) of a variant."""
    device = torch.device("cpu")
    model, params = VARIANTS[variant_index].build(build_model("tiny", device))
    optimizer = make_optimizer(params, device)
    batch = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    train_step(model, optimizer, batch)
    forward, backward = _OpCounter(), _OpCounter()
    with forward:
        loss = model(input_ids=batch, labels=batch).loss
    with backward:
        loss.backward()
    return {f"{phase} {kind}": counter.counts[kind] for phase, counter in (("forward", forward), ("backward", backward))
            for kind in ("kernels", "views")}


def main() -> int:
    ceiling, ours = count_step(1), count_step(3)  # all-depth ceiling; ours, one expert in every layer
    layers = build_model("tiny", torch.device("meta")).config.num_hidden_layers
    print(f"{VARIANTS[3].name} vs {VARIANTS[1].name}, per selected layer ({layers} layers):")
    for key in ceiling:
        print(f"  {key}: {(ours[key] - ceiling[key]) / layers:+.1f}  (step totals {ceiling[key]} -> {ours[key]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
