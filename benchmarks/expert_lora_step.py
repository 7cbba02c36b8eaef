"""Training-step speed and memory of expert-selective LoRA against full fine-tuning, PEFT LoRA on all experts and
frozen-model ceilings.

    python benchmarks/expert_lora_step.py --device cpu --size tiny --repeats 2 --steps 5 --threads 1
    python benchmarks/expert_lora_step.py --device cuda --size gpu --repeats 3 --steps 30 --warmup 5

Two scenarios on a Qwen3-MoE model with random weights (same seed for every variant):

- every layer: one expert selected in every layer (+ the routers). Compared with the all-depth ceiling (whole model
  frozen except a negligible parameter added to the input embeddings, so the backward runs through every layer and
  computes no weight gradient) and with PEFT ``target_parameters`` LoRA on all experts of all layers.
- SEUF default: one expert in layer 6 of 8 (+ its router). Compared with the depth-limited ceiling (frozen except a
  negligible parameter added at layer 6's input, so the backward stops there).

Every variant is built once and stays resident; in each repeat the variants take turns of ``--block`` steps until
each has run ``--steps``, and ratios are taken within a repeat, so drift in the machine's speed (+-10% over tens of
seconds on shared machines) falls on all variants alike. Memory, measured once per variant while it is built: the real
peak on CUDA (counted from what was allocated before the variant was built), and on every device an estimate
(parameters + gradients + optimizer state + tensors saved for backward) that needs no allocator statistics.

Imports only torch, transformers and peft (+ hf_moe_unlearn.adapter): the GPU machine has no trl/datasets/evaluate.
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

# Keep the import surface of the GPU machine: fail loudly if the package starts pulling in training extras.
from hf_moe_unlearn.adapter import get_expert_peft_model  # noqa: E402

SIZES = {
    # A Qwen3-MoE small enough for two CPU cores, with the same depth (8 layers) so "layer 6 of 8" means the same.
    "tiny": dict(
        config=dict(hidden_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                    vocab_size=512, intermediate_size=256, moe_intermediate_size=128, num_experts=8,
                    num_experts_per_tok=2),
        batch=4, seq=128, dtype="float32",
    ),
    # The 0.49B Qwen3-MoE of every GPU figure (hf_moe_unlearn.moe.tiny.benchmark_qwen3_moe_config).
    "gpu": dict(config=None, batch=8, seq=1024, dtype="bfloat16"),
}
SEUF_LAYER = 6


@dataclass
class Variant:
    name: str
    scenario: str
    build: Callable[[nn.Module], tuple[nn.Module, list[nn.Parameter]]]


def build_model(size: str, device: torch.device) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_moe_unlearn.moe.tiny import benchmark_qwen3_moe_config

    spec = SIZES[size]
    if spec["config"] is None:
        config = benchmark_qwen3_moe_config()
    else:
        config = AutoConfig.for_model("qwen3_moe", **spec["config"], tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, spec["dtype"]))
    return model.train()


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def full_ft(model):
    return model, [p for p in model.parameters()]


def ceiling_input(model):
    """Frozen model + a zero [hidden] vector added to the embeddings' output: backward through every layer."""
    _freeze(model)
    probe = nn.Parameter(torch.zeros(model.config.hidden_size, device=model.device, dtype=model.dtype))
    model.get_input_embeddings().register_forward_hook(lambda mod, args, out: out + probe)
    return model, [probe]


def ceiling_at_layer(layer_index: int):
    def build(model):
        """Frozen model + a zero vector added to the input of decoder layer ``layer_index``: backward stops there."""
        _freeze(model)
        probe = nn.Parameter(torch.zeros(model.config.hidden_size, device=model.device, dtype=model.dtype))

        def add(mod, args, kwargs):
            if args:
                return (args[0] + probe, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + probe}

        model.model.layers[layer_index].register_forward_pre_hook(add, with_kwargs=True)
        return model, [probe]

    return build


def peft_all_experts(model):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=[],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    peft_model = get_peft_model(model, config)
    return peft_model, [p for p in peft_model.parameters() if p.requires_grad]


def ours(selection_of: Callable[[nn.Module], dict[int, list[int]]], mode: str = "lora"):
    def build(model):
        peft_model = get_expert_peft_model(model, selection_of(model), r=8, lora_alpha=16, train_router=True, mode=mode)
        return peft_model, [p for p in peft_model.parameters() if p.requires_grad]

    return build


def every_layer(model) -> dict[int, list[int]]:
    num_experts = model.config.num_experts
    return {i: [i % num_experts] for i in range(model.config.num_hidden_layers)}


def seuf_default(model) -> dict[int, list[int]]:
    return {SEUF_LAYER: [0]}


VARIANTS = [
    Variant("full fine-tuning", "both", full_ft),
    Variant("ceiling: frozen, input-side param", "every layer", ceiling_input),
    Variant("PEFT target_parameters LoRA, all experts", "every layer", peft_all_experts),
    Variant("ours: LoRA, 1 expert/layer + routers", "every layer", ours(every_layer)),
    Variant(f"ceiling: frozen, param at layer {SEUF_LAYER} input", "SEUF default", ceiling_at_layer(SEUF_LAYER)),
    Variant(f"ours: LoRA, 1 expert in layer {SEUF_LAYER} + router", "SEUF default", ours(seuf_default)),
    Variant(f"ours: full expert, layer {SEUF_LAYER} + router", "SEUF default", ours(seuf_default, mode="full")),
]


def make_optimizer(params: list[nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """AdamW as the Trainer builds it by default (``adamw_torch_fused``: ``fused=True`` on every device, CPU
    included), the same for every variant."""
    return torch.optim.AdamW(params, lr=1e-5, fused=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, optimizer, batch) -> None:
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def footprint_step(model, optimizer, batch, params) -> int:
    """One training step that also returns an estimate of its memory: params + grads + optimizer state + saved
    activations (distinct storages that autograd saved for backward, parameters excluded)."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    grads = sum(p.grad.nbytes for p in params if p.grad is not None)
    optimizer.step()
    state = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    optimizer.zero_grad(set_to_none=True)
    weights = sum(p.nbytes for p in model.parameters())
    return weights + grads + state + sum(saved.values())


@dataclass
class Prepared:
    """One variant, built and warmed up, kept resident so that its steps can be interleaved with the others'."""

    variant: Variant
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: torch.Tensor
    trainable: int
    peak: int | None  # bytes the variant added to the CUDA allocator's peak (None off CUDA)
    estimate: int  # parameters + gradients + optimizer state + saved activations, any device
    experts_impl: str | None


def prepare_variant(variant: Variant, size: str, device: torch.device, warmup: int) -> Prepared:
    """Build ``variant``, measure its memory over one step, warm it up.

    The models of earlier variants stay resident (their gradients freed), so the peak counts from what was allocated
    before this variant was built: the same figure as with this model alone on the device.
    """
    gc.collect()
    resident = 0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        resident = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    model, params = variant.build(build_model(size, device))
    optimizer = make_optimizer(params, device)
    spec = SIZES[size]
    generator = torch.Generator(device="cpu").manual_seed(1)
    batch = torch.randint(0, model.config.vocab_size, (spec["batch"], spec["seq"]), generator=generator).to(device)
    estimate = footprint_step(model, optimizer, batch, params)
    for _ in range(warmup):
        train_step(model, optimizer, batch)
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - resident if device.type == "cuda" else None
    impl = getattr(getattr(model, "config", None), "_experts_implementation", None)
    return Prepared(variant, model, optimizer, batch, sum(p.numel() for p in params), peak, estimate, impl)


def interleaved_elapsed(run_steps: Callable[[int, int], None], variants: int, steps: int, block: int,
                        device: torch.device, repeat: int) -> list[float]:
    """Total seconds of ``steps`` steps of each of ``variants`` variants, timed in round-robin blocks of ``block``
    steps; ``run_steps(i, n)`` runs ``n`` steps of variant ``i``.

    Throughput on a shared machine drifts by +-10% over tens of seconds; running every variant for a few steps in
    turn puts the same drift into each variant's total, so the ratios between them hold. The order rotates with
    ``repeat`` so that no variant always follows the same one.
    """
    elapsed = [0.0] * variants
    order = [(i + repeat) % variants for i in range(variants)]
    gc.disable()  # as timeit does: no collector pauses inside the timed loop
    try:
        for done in range(0, steps, block):
            for i in order:
                sync(device)
                start = time.perf_counter()
                run_steps(i, min(block, steps - done))
                sync(device)
                elapsed[i] += time.perf_counter() - start
    finally:
        gc.enable()
    return elapsed


def interleaved_throughput(prepared: list[Prepared], steps: int, block: int, device: torch.device,
                           repeat: int) -> list[float]:
    """Tokens/s of every variant over one repeat (:func:`interleaved_elapsed`)."""
    def run_steps(i: int, n: int) -> None:
        for _ in range(n):
            train_step(prepared[i].model, prepared[i].optimizer, prepared[i].batch)

    elapsed = interleaved_elapsed(run_steps, len(prepared), steps, block, device, repeat)
    tokens = prepared[0].batch.numel() * steps
    return [tokens / e for e in elapsed]


CHECKS = [
    # (label, numerator variant, denominator variant, kind, bound)
    ("every layer: ours / all-depth ceiling", 3, 1, "speed", 0.95),
    ("every layer: ours / PEFT all experts", 3, 2, "speed", 1.15),
    ("every layer: ours peak memory / full FT", 3, 0, "memory", 0.70),
    ("SEUF default: ours / depth-limited ceiling", 5, 4, "speed", 0.90),
    ("SEUF default: ours peak memory / full FT", 5, 0, "memory", 0.70),
]


class _SyncOpRecorder:
    """Records host-syncing aten ops (CPU stand-in for ``torch.cuda.set_sync_debug_mode``)."""

    SYNC_OPS = {"aten.nonzero", "aten._local_scalar_dense", "aten.masked_select", "aten.item"}

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        recorder = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if str(func.overloadpacket) in recorder.SYNC_OPS:
                    recorder.syncs.append(str(func.overloadpacket))
                return func(*args, **(kwargs or {}))

        self.syncs: list[str] = []
        self.mode = Mode()


def sanity_check(device: torch.device, dtype: torch.dtype) -> bool:
    """Our experts layer, forward + backward, makes no host sync, and leaves rows of unselected experts bit-identical
    to the stock transformers forward (tiny model, so it costs nothing)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3_moe", **SIZES["tiny"]["config"])
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    router = model.model.layers[1].mlp.gate
    peft_model = get_expert_peft_model(model, {1: [0, 2]}, init_lora_weights=False)
    layer = peft_model.fast_layers()["model.layers.1.mlp.experts"]
    x = torch.randn(256, config.hidden_size, device=device, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        _, weights, index = router(x)
    recorder = _SyncOpRecorder()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")  # raises on any host sync
        try:
            layer(x, index, weights).float().square().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    else:
        with recorder.mode:
            layer(x, index, weights).float().square().sum().backward()
    with torch.no_grad():
        stock = layer.get_base_layer()(x, index, weights)
        ours = layer(x, index, weights)
    untouched = ~((index == 0) | (index == 2)).any(-1)
    identical = torch.equal(stock[untouched], ours[untouched])
    ok = not recorder.syncs and identical and all(p.grad is not None for p in layer.parameters() if p.requires_grad)
    print(f"sanity: selected-experts forward+backward host syncs: {recorder.syncs or 'none'}; rows of unselected "
          f"experts bit-identical to stock grouped_mm forward: {identical} -> {'PASS' if ok else 'FAIL'}")
    return ok


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _at_least_one(text: str) -> int:
    """argparse type for counts that must be positive: zero repeats would pass every check without measuring."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--repeats", type=_at_least_one, default=2)
    parser.add_argument("--steps", type=_at_least_one, default=5, help="timed optimizer steps per variant and repeat")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--block", type=_at_least_one, default=5,
                        help="steps each variant runs in its turn; the variants take turns until --steps are done")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU intra-op threads (1 is steadier when other processes share the cores)")
    parser.add_argument("--profile", type=int, nargs="*", default=[],
                        help="variant numbers (0-based, table order) to profile one step of, after the table")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    import peft
    import transformers

    print(f"device: {device_name(device)}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"python {sys.version.split()[0]}")
    spec = SIZES[args.size]
    probe = build_model(args.size, torch.device("meta"))
    total = sum(p.numel() for p in probe.parameters())
    shape = {k: getattr(probe.config, k) for k in ("hidden_size", "num_hidden_layers", "num_experts",
                                                     "num_experts_per_tok", "moe_intermediate_size", "vocab_size")}
    print(f"model: qwen3_moe {shape}, {total / 1e9:.3f}B params, {spec['dtype']}, "
          f"batch {spec['batch']}x{spec['seq']} tokens; {args.steps} timed steps after {args.warmup} warm-up, "
          f"{args.repeats} repeats")
    del probe
    sane = sanity_check(device, getattr(torch, spec["dtype"]))

    prepared = [prepare_variant(v, args.size, device, args.warmup) for v in VARIANTS]
    speeds = [interleaved_throughput(prepared, args.steps, args.block, device, r) for r in range(args.repeats)]
    print(f"experts implementation: {prepared[0].experts_impl}\n")

    def memory(p: Prepared) -> int:
        return p.peak if device.type == "cuda" else p.estimate

    header = ("| scenario | variant | trainable params | tokens/s per repeat | speed vs full FT | peak GiB | est. GiB "
              "| memory vs full FT |")
    print(header)
    print("|" + "---|" * 8)
    for i, p in enumerate(prepared):
        tps = " / ".join(f"{rep[i]:,.0f}" for rep in speeds)
        speed = " / ".join(f"{rep[i] / rep[0]:.2f}" for rep in speeds)
        peak = f"{p.peak / 2**30:.2f}" if p.peak is not None else "n/a"
        print(f"| {p.variant.scenario} | {p.variant.name} | {p.trainable:,} | {tps} | {speed} | {peak} | "
              f"{p.estimate / 2**30:.3f} | {memory(p) / memory(prepared[0]):.2f} |")

    print(f"\nchecks (speed: ratio per repeat; memory: {'CUDA peak' if device.type == 'cuda' else 'estimate'}):")
    failed = not sane
    for label, num, den, kind, bound in CHECKS:
        if kind == "speed":
            ratios = [rep[num] / rep[den] for rep in speeds]
            ok = all(r >= bound for r in ratios)
        else:
            ratios = [memory(prepared[num]) / memory(prepared[den])]
            ok = ratios[0] <= bound
        failed |= not ok
        sign = ">=" if kind == "speed" else "<="
        print(f"  {'PASS' if ok else 'FAIL'}  {label}: {', '.join(f'{r:.2f}' for r in ratios)} (target {sign} {bound})")
    del prepared, p  # free every model before profiling builds its own
    gc.collect()
    for index in args.profile:
        profile_variant(VARIANTS[index], args.size, device)
    return 1 if failed else 0


def profile_variant(variant: Variant, size: str, device: torch.device, rows: int = 12) -> None:
    """Where one training step of ``variant`` spends its time (torch.profiler), and how often it syncs the host."""
    model, params = variant.build(build_model(size, device))
    optimizer = make_optimizer(params, device)
    spec = SIZES[size]
    batch = torch.randint(0, model.config.vocab_size, (spec["batch"], spec["seq"])).to(device)
    for _ in range(3):
        train_step(model, optimizer, batch)
    sync(device)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        train_step(model, optimizer, batch)
        sync(device)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    busy = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e3
    print(f"\nstep wall {wall * 1e3:.1f} ms (profiled), kernels busy {busy:.1f} ms, "
          f"{sum(e.count for e in events if e.key.startswith('aten::'))} aten calls")
    syncs = {e.key: e.count for e in events if "Synchronize" in e.key or "Memcpy" in e.key or "local_scalar" in e.key}
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile of one step: {variant.name}; host syncs/copies: {syncs or 'none'}")
    print(events.table(sort_by=sort, row_limit=rows, max_name_column_width=60))


if __name__ == "__main__":
    sys.exit(main())
