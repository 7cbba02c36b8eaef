"""GRIP's router constraint: router updates in the null space of the retain set's router inputs.

GRIP (Zhu, Wei, Gu, Li 2026, arXiv 2601.16905) observes that unlearning losses on an MoE often "forget" by moving
the router (forget tokens are sent away from the experts that know), not by changing the experts, and constrains
the router so that this shortcut is closed for the tokens that must keep working. A router computes logits
``z = W h (+ b)``; if every change ``ΔW`` of its weight satisfies ``ΔW h = 0`` for the retain set's router inputs
``h``, the retain tokens' logits, hence their top-k experts and gate weights, stay those of the start model, while
the router stays free in the directions the retain inputs do not use (where forget inputs may still move).

What this module does (formulas and limits in docs/unlearning.md, "GRIP"):

1. :func:`collect_router_inputs` — once, before training: the retain set through the model with the recorder's hooks
   (``RouterRecorder(keep_inputs=True)``), accumulating per constrained layer the second moment
   ``C = (1/N) Σ_t h_t h_t^T`` of the counted tokens' router inputs (padding and label-less tokens excluded), with a
   constant 1 appended to ``h`` when the router has a bias (the bias is a weight on a constant input).
2. :func:`protected_directions` — ``U``: the fewest leading eigenvectors of ``C + λ·mean_eig(C)·I`` whose eigenvalues
   carry at least ``1 − ε`` of its trace (ε = ``grip_rank_cutoff``, λ = ``grip_ridge``).
3. :class:`GripProjection` — after every optimizer step (:class:`GripCallback`, ``on_optimizer_step``), each
   constrained router's ``[W | b]`` is reset to ``M_0 + (M − M_0)(I − U U^T)``, ``M_0`` its value at the start.

The update, not the gradient, is projected: AdamW divides each coordinate of the gradient by its own running
scale, so a gradient in the null space gives an update that is not; projecting what the optimizer did works for
every optimizer (and weight decay). Projecting the change since the start (rather than each step's change) is the
same in exact arithmetic (the earlier change is already in the null space) and does not let float rounding of the
stored weights accumulate outside it over steps.

The paper speaks of an *expert-specific* null space; its exact construction (and its default thresholds) was not
available to us, so this is the layer-wise null space of all retain inputs: every logit of every retain token is
kept, a stronger (less plastic) constraint than one per expert.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from ..errors import MoEUnlearnError
from ..moe.layers import MoELayer, find_moe_layers
from .recorder import RouterRecorder, parse_router_output

logger = logging.getLogger(__name__)


@dataclass
class RouterParams:
    """The trainable tensors of one constrained router: its [E, H] weight and, if it has one, its [E] bias."""

    layer: int
    weight: nn.Parameter
    bias: nn.Parameter | None = None
    frozen: list[str] = field(default_factory=list)  # other router parameters, frozen under GRIP

    @property
    def dim(self) -> int:
        """Width of the constrained input: H, plus 1 for the bias's constant input."""
        return self.weight.shape[1] + (self.bias is not None)

    def matrix(self) -> torch.Tensor:
        """``[W | b]`` in float32, [E, dim]."""
        w = self.weight.detach().float()
        return w if self.bias is None else torch.cat([w, self.bias.detach().float()[:, None]], dim=1)

    def assign(self, matrix: torch.Tensor) -> None:
        with torch.no_grad():
            h = self.weight.shape[1]
            self.weight.copy_(matrix[:, :h].to(self.weight.dtype))
            if self.bias is not None:
                self.bias.copy_(matrix[:, h].to(self.bias.dtype))


def trainable_routers(model: nn.Module) -> dict[int, RouterParams]:
    """The routers whose parameters train (``train_router=True``: the selected layers'), by layer index.

    The weight is the router's trainable [E, H] tensor and the bias the trainable [E] tensor of the same module
    (GPT-OSS has one). Any other trainable tensor in a router (Ernie-4.5's score-correction bias, which moves the
    top-k of every token) is frozen here: it would change retain routing whatever the projection does. A router
    trained with LoRA is refused: the product of its factors is not a linear function of their updates.
    """
    found: dict[int, RouterParams] = {}
    for layer in find_moe_layers(model):
        named = [(n, p) for n, p in layer.router.named_parameters() if p.requires_grad]
        if not named:
            continue
        if any("lora_" in n for n, _ in named):
            raise MoEUnlearnError(
                f"router_constraint='grip' projects full router weight updates, but the router of layer {layer.index} "
                f"({layer.router_name}) trains through LoRA. Train routers as full weights (train_router=True in "
                f"get_expert_peft_model puts them in modules_to_save), or router_constraint='none'.")
        weights = [(n, p) for n, p in named if p.dim() == 2 and p.shape[0] == layer.num_experts]
        if len(weights) != 1:
            raise MoEUnlearnError(
                f"router_constraint='grip': cannot tell the router weight of layer {layer.index} ({layer.router_name}) "
                f"among its trainable tensors {[(n, tuple(p.shape)) for n, p in named]}.")
        weight_name, weight = weights[0]
        prefix = weight_name.rpartition(".")[0]
        bias = next((p for n, p in named if n == (f"{prefix}.bias" if prefix else "bias") and p.dim() == 1
                     and p.shape[0] == layer.num_experts), None)
        params = RouterParams(layer.index, weight, bias)
        for n, p in named:
            if p is not weight and p is not bias:
                p.requires_grad_(False)
                params.frozen.append(n)
        if params.frozen:
            logger.info("GRIP: router parameters %s of layer %d frozen (they would move every token's routing).",
                        params.frozen, layer.index)
        found[layer.index] = params
    return found


def _check_linear(layer: MoELayer, params: RouterParams, inputs: torch.Tensor, output) -> None:
    """Refuse a router whose logits are not ``W h (+ b)`` of the input the hook sees: the null space of those inputs
    would then not keep its logits. Every family of transformers passes this (tests/test_grip.py)."""
    logits = parse_router_output(output, layer).logits.float()
    bias = None if params.bias is None else params.bias.detach().float()
    expected = F.linear(inputs.reshape(-1, inputs.shape[-1]).float(), params.weight.detach().float(), bias)
    scale = expected.abs().max().clamp_min(1e-6)
    tolerance = 1e-3 if params.weight.dtype == torch.float32 else 5e-2  # bf16/fp16 matmuls round at ~1e-2
    if logits.shape != expected.shape or not ((logits - expected).abs().max() / scale < tolerance):
        raise MoEUnlearnError(
            f"router_constraint='grip' needs routers whose logits are a linear map W·h (+ b) of their input; the "
            f"router of layer {layer.index} ({type(layer.router).__name__}) gives other values, so keeping its inputs' "
            f"null space would not keep its logits. Use router_constraint='none' for this model.")


def collect_router_inputs(
    model: nn.Module,
    data,
    collate,
    routers: dict[int, RouterParams],
    *,
    batch_size: int = 8,
    max_tokens: int | None = None,
    accelerator=None,
) -> dict[int, dict[str, torch.Tensor]]:
    """Per constrained layer, the sums over the counted retain tokens of ``h h^T`` ([H, H], float64), ``h`` ([H])
    and the token count, from one ``no_grad`` pass in eval mode with the recorder's hooks.

    ``data`` is a tokenised dataset (``input_ids``, ``attention_mask``, ``labels``); counted tokens are attended and
    label-bearing, as everywhere in the package. Under ``accelerate`` each process takes a disjoint share of the
    examples and the sums are added over processes, so every process builds the same projector. ``max_tokens``
    stops each process after about that many counted tokens.
    """
    from ..data.text import counted_mask

    indices = list(range(len(data)))
    if accelerator is not None and accelerator.num_processes > 1:
        with accelerator.split_between_processes(indices, apply_padding=False) as shard:
            indices = list(shard)
    device = routers[next(iter(routers))].weight.device
    sums: dict[int, dict[str, torch.Tensor]] = {}
    layers = {l.index: l for l in find_moe_layers(model)}
    recorder = RouterRecorder(model, layers=sorted(routers), accumulate=False, keep_inputs=True)
    was_training = model.training
    model.eval()
    counted, checked = 0, False
    outputs: dict[int, Any] = {}
    hooks = []
    try:
        # the first batch's router outputs, for the linearity check
        for index in routers:
            hooks.append(layers[index].router.register_forward_hook(
                lambda m, i, o, index=index: outputs.setdefault(index, o)))
        with recorder, torch.no_grad():
            for start in range(0, len(indices), batch_size):
                batch = collate([dict(data[i]) for i in indices[start:start + batch_size]])
                mask = counted_mask(batch).reshape(-1).to(device=device, dtype=torch.float32)
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                      use_cache=False)
                for index, params in routers.items():
                    if index not in recorder.current_inputs:
                        raise MoEUnlearnError(f"router_constraint='grip': the router of layer {index} was called "
                                              f"without a positional input, so its inputs cannot be collected.")
                    h = recorder.current_inputs[index]
                    if not checked:
                        _check_linear(layers[index], params, h, outputs[index])
                    h = h.reshape(-1, h.shape[-1]).float()
                    if h.shape[0] != mask.shape[0]:
                        raise MoEUnlearnError(f"router_constraint='grip': the router of layer {index} saw "
                                              f"{h.shape[0]} tokens for a batch of {mask.shape[0]}.")
                    masked = h * mask[:, None]
                    # float32 products of one batch, summed into float64 over batches
                    part = {"xtx": masked.T @ h, "x": masked.sum(0), "n": mask.sum()}
                    acc = sums.setdefault(index, {k: torch.zeros_like(v, dtype=torch.float64) for k, v in part.items()})
                    for k, v in part.items():
                        acc[k] += v.double()
                recorder.current_inputs.clear()
                if not checked:
                    checked = True
                    for handle in hooks:
                        handle.remove()
                    hooks.clear()
                counted += int(mask.sum())
                if max_tokens is not None and counted >= max_tokens:
                    break
    finally:
        for handle in hooks:
            handle.remove()
        model.train(was_training)
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import reduce

        if not sums:  # every process must join the reduction with the same tensors
            raise MoEUnlearnError(f"Process {accelerator.process_index} got no retain example for GRIP's "
                                  f"collection: use fewer processes or a larger retain set.")
        sums = {l: {k: reduce(v.contiguous(), reduction="sum") for k, v in s.items()} for l, s in sums.items()}
    if not sums or any(float(s["n"]) <= 0 for s in sums.values()):
        raise MoEUnlearnError("router_constraint='grip': the retain set has no counted token (padding only, or every "
                              "label -100), so there are no retain router inputs to protect.")
    return sums


def second_moment(sums: dict[str, torch.Tensor], with_bias: bool) -> torch.Tensor:
    """``C = (1/N) Σ h h^T`` ([H, H]) or, for a router with a bias, of ``[h, 1]`` ([H+1, H+1]), float64."""
    n = sums["n"]
    if not with_bias:
        return sums["xtx"] / n
    top = torch.cat([sums["xtx"], sums["x"][:, None]], dim=1)
    bottom = torch.cat([sums["x"], n.reshape(1)])[None, :]
    return torch.cat([top, bottom], dim=0) / n


def protected_directions(moment: torch.Tensor, cutoff: float, ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``U`` ([d, r], float64): the fewest leading eigenvectors of ``C_λ = C + λ·(tr C / d)·I`` whose eigenvalues sum
    to at least ``(1 − ε)·tr C_λ``; and the eigenvalues of ``C_λ`` (descending). ``I − U U^T`` projects onto GRIP's
    null space; the retain energy left in it, ``tr((I − U U^T) C)``, is at most ``ε·tr C_λ``."""
    d = moment.shape[0]
    moment = (moment + moment.T) / 2
    shifted = moment + ridge * (torch.trace(moment) / d) * torch.eye(d, dtype=moment.dtype, device=moment.device)
    eigenvalues, eigenvectors = torch.linalg.eigh(shifted)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)
    total = eigenvalues.sum()
    # tail[r] = energy of the directions after the first r; keep the smallest r with tail[r] <= ε·total
    tail = total - torch.cat([eigenvalues.new_zeros(1), eigenvalues.cumsum(0)])
    rank = int(torch.nonzero(tail <= cutoff * total)[0])
    return eigenvectors[:, :rank], eigenvalues


@dataclass
class GripLayer:
    """One constrained router: its parameters, start value ``M_0`` and protected directions ``U`` (float32)."""

    params: RouterParams
    start: torch.Tensor  # [E, d]
    directions: torch.Tensor  # [d, r]
    tokens: int
    retain_energy_left: float  # tr((I − UU^T) C) / tr C, the measured share of retain energy in the null space

    @property
    def null_dim(self) -> int:
        return self.directions.shape[0] - self.directions.shape[1]


class GripProjection:
    """The constraint of every trained router; :meth:`project` applies it (after each optimizer step)."""

    def __init__(self, layers: dict[int, GripLayer], collection_seconds: float = 0.0) -> None:
        self.layers = layers
        self.collection_seconds = collection_seconds

    @classmethod
    def build(cls, model: nn.Module, data, collate, *, cutoff: float, ridge: float = 0.0, batch_size: int = 8,
              max_tokens: int | None = None, accelerator=None) -> "GripProjection":
        """Find the trained routers, collect the retain inputs and compute each layer's protected directions."""
        routers = trainable_routers(model)
        if not routers:
            raise MoEUnlearnError("router_constraint='grip' but no router trains (train_router=False): there is "
                                  "nothing to constrain. Set train_router=True, or router_constraint='none'.")
        began = time.perf_counter()
        sums = collect_router_inputs(model, data, collate, routers, batch_size=batch_size, max_tokens=max_tokens,
                                     accelerator=accelerator)
        layers = {}
        for index, params in routers.items():
            moment = second_moment(sums[index], params.bias is not None)
            directions, _ = protected_directions(moment, cutoff, ridge)
            left = torch.trace(moment) - torch.einsum("ir,ij,jr->", directions, moment, directions)
            layers[index] = GripLayer(params, params.matrix().clone(), directions.float().contiguous(),
                                      tokens=int(sums[index]["n"]),
                                      retain_energy_left=float(left / torch.trace(moment).clamp_min(1e-300)))
            del moment
        seconds = time.perf_counter() - began
        for index, layer in layers.items():
            logger.info("GRIP layer %d: %d retain tokens, null space %d of %d dimensions, %.2e of the retain energy "
                        "left in it", index, layer.tokens, layer.null_dim, layer.directions.shape[0],
                        layer.retain_energy_left)
        frozen = sorted(index for index, layer in layers.items() if layer.null_dim == 0)
        if frozen:
            # Not an error (a frozen router is a legitimate limit of the constraint), but the run and its model card
            # say "GRIP" while these routers cannot move at all: say so once, with what would free them.
            logger.warning("GRIP leaves the router of layer(s) %s no free direction (grip_rank_cutoff=%g: the retain "
                           "inputs fill every direction above it), so those routers cannot change: the run is the "
                           "same as with them frozen. A larger grip_rank_cutoff frees directions (docs/unlearning.md, "
                           "GRIP); train_router=False says 'frozen' plainly.", frozen, cutoff)
        return cls(layers, seconds)

    @torch.no_grad()
    def project(self) -> None:
        """``M ← M_0 + (M − M_0) − ((M − M_0) U) U^T`` for every constrained router."""
        for layer in self.layers.values():
            if layer.null_dim == 0:  # U spans everything: the projection is exactly the start (no float residue)
                layer.params.assign(layer.start)
                continue
            change = layer.params.matrix() - layer.start
            change -= (change @ layer.directions) @ layer.directions.T
            layer.params.assign(layer.start + change)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held during training: start values and protected directions (the [d, d] moments are freed)."""
        return {"start": sum(l.start.numel() * l.start.element_size() for l in self.layers.values()),
                "directions": sum(l.directions.numel() * l.directions.element_size() for l in self.layers.values())}


class GripCallback(TrainerCallback):
    """Applies :meth:`GripProjection.project` after every optimizer step (before the gradients are zeroed); the
    Trainer calls it once per optimizer step, also under gradient accumulation."""

    def __init__(self, projection: GripProjection) -> None:
        self.projection = projection

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.projection.project()


def check_router_constraint(args, retain_dataset) -> None:
    """Refuse GRIP without a retain set, before any work (the config cannot see the datasets)."""
    if args.router_constraint == "grip" and retain_dataset is None:
        raise MoEUnlearnError(
            "router_constraint='grip' keeps the retain set's routing, but there is no retain set: pass "
            "retain_dataset=... (CLI: --retain FILE), or router_constraint='none'.")


def setup_grip(trainer) -> GripProjection:
    """Wire GRIP into a :class:`~hf_moe_unlearn.MoEUnlearnTrainer` once the Trainer has placed the model: collect the
    retain router inputs (the start model: a resumed run rebuilds the same projector), then project after every
    optimizer step."""
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        raise MoEUnlearnError(
            "router_constraint='grip' rewrites the router weights after each optimizer step; under FSDP or DeepSpeed "
            "they are sharded or have a master copy inside the optimizer that the projection cannot reach. Run one "
            "process or DDP, or router_constraint='none'.")
    from accelerate import PartialState

    args = trainer.args
    state = PartialState()
    projection = GripProjection.build(
        trainer.model, trainer.train_dataset.retain, trainer.data_collator, cutoff=args.grip_rank_cutoff,
        ridge=args.grip_ridge, batch_size=args.attribution_batch_size, max_tokens=args.attribution_max_tokens,
        accelerator=state if state.num_processes > 1 else None)
    trainer.add_callback(GripCallback(projection))
    return projection
