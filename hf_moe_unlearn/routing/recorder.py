"""``RouterRecorder``: forward hooks on the routers that record how tokens are really routed.

Why hooks and not ``output_router_logits``: that flag costs ~14% forward time, adds the router auxiliary loss
to ``outputs.loss``, and is missing or broken for some families and transformers releases (see
docs/routing.md). A hook on the router module sees exactly what the MoE block uses.

Everything accumulates on the model's device with ``index_add_``/``scatter`` (no ``bincount``, ``.item()``
or boolean indexing), so recording forces no host synchronisation per forward; :meth:`RouterRecorder.stats`
syncs once at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import MoEUnlearnError
from ..moe.layers import MoELayer, config_fingerprint, find_moe_layers, unwrap_model
from .stats import ExpertStats


@dataclass
class RoutingOutput:
    """One router call, normalised across families: ``logits`` [N, E], ``weights`` [N, k] (the gate values the
    MoE block multiplies expert outputs by) and ``indices`` [N, k] (int64)."""

    logits: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor


def expert_scores(logits: torch.Tensor, score_fn: str) -> torch.Tensor:
    """Per-expert router probabilities [N, E] in float32: the softmax, or for sigmoid routers (DeepSeek-V3 style)
    the sigmoid scores normalised to sum to one, so both read as a distribution over experts. Masked to the top-k,
    these are SEUF Eq. 2's g (``ExpertStats.seuf_scores``); for sigmoid routers the normalised sigmoid stands in
    for the paper's softmax."""
    logits = logits.float()
    if score_fn == "sigmoid":
        scores = torch.sigmoid(logits)
        return scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)
    return torch.softmax(logits, dim=-1)


def parse_router_output(output, layer: MoELayer) -> RoutingOutput:
    """Read (logits, weights, indices) from a router's output, whatever order the family/release returns them in.

    Indices are taken as *the integer tensor* of the output, not by position (GraniteMoE in transformers
    5.17–5.20 returns them first). Routers that return logits only (``nn.Linear`` gates of remote-code models)
    get the top-k computed here, renormalised like Mixtral does.
    """
    tensors = [t for t in (output if isinstance(output, (tuple, list)) else (output,)) if torch.is_tensor(t)]
    indices = next((t for t in tensors if not t.is_floating_point()), None)
    floats = [t for t in tensors if t.is_floating_point()]
    logits = next((t for t in floats if t.shape[-1] == layer.num_experts), None)
    if logits is None:
        raise MoEUnlearnError(
            f"Cannot read the router output of {layer.router_name}: no tensor with {layer.num_experts} expert scores "
            f"(got shapes {[tuple(t.shape) for t in tensors]})."
        )
    logits = logits.reshape(-1, layer.num_experts)
    if indices is None:
        probs = expert_scores(logits, layer.score_fn)
        weights, indices = torch.topk(probs, layer.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        return RoutingOutput(logits, weights, indices)
    indices = indices.reshape(-1, indices.shape[-1])
    weights = next((t for t in floats if t is not logits and t.shape[-1] == indices.shape[-1]), None)
    if weights is None or weights.numel() != indices.numel():
        weights = expert_scores(logits, layer.score_fn).gather(1, indices)
    return RoutingOutput(logits, weights.reshape(indices.shape), indices)


#: Names of the per-layer/expert sums :meth:`RouterRecorder.raw_tensors` returns (besides ``tokens``/``sequences``),
#: in the order they are all-reduced; each is a field of :class:`ExpertStats`.
ACCUMULATORS = ("hits", "prob_sum", "gate_sum", "seq_gate_mean_sum", "seq_masked_prob_mean_sum")


def _in_backward() -> bool:
    """True while autograd runs a backward pass, i.e. when gradient checkpointing re-runs a forward.

    ``torch._C._current_graph_task_id`` is -1 outside the autograd engine; it is private but has been stable
    since torch 1.x. Without it we could not tell recomputation from a real forward without extra syncs.
    """
    getter = getattr(torch._C, "_current_graph_task_id", None)
    return getter is not None and getter() != -1


class RouterRecorder:
    """Context manager that hooks every MoE router and accumulates per layer and expert:

    - ``hits``: counted tokens whose top-k contains the expert;
    - ``prob_sum``: sum of the full router probabilities (softmax, or normalised sigmoid);
    - ``gate_sum``: sum of the top-k gate weights as the model uses them (masked, renormalised if it does);
    - ``seq_gate_mean_sum``: Σ over sequences of the per-sequence mean gate weight (SEUF Eq. 2 numerator with
      ``score="gate"``);
    - ``seq_masked_prob_mean_sum``: Σ over sequences of the per-sequence mean *top-k-masked* router probability:
      the full probability where the expert is in the token's top-k (the indices the model really used), 0
      elsewhere, not renormalised — the paper's g, so SEUF Eq. 2's numerator by default;
    - ``tokens`` / ``sequences``: counted tokens and sequences with at least one counted token.

    Tokens are counted where ``mask`` (set with :meth:`set_mask` before each forward: attention mask times
    "has a label") is non-zero; padding is routed too and must be excluded. With ``keep_current=True`` the
    last forward's top-k indices (detached) and router logits (with grad, for SEUF's anchor loss) are exposed
    as ``current_indices`` / ``current_logits``, keyed by layer index. With ``keep_inputs=True`` the last forward's
    router inputs (the hidden states the router maps to logits, detached, [N, H] or [B, T, H] as the block passes
    them) are exposed as ``current_inputs`` (GRIP's null space is built from them, hf_moe_unlearn.routing.grip).

    Forward hooks run again when gradient checkpointing recomputes a layer during backward; those calls are
    ignored, so nothing is counted twice and ``current_*`` keep the values of the real forward.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[int] | None = None,
        *,
        accumulate: bool = True,
        keep_current: bool = False,
        keep_inputs: bool = False,
    ) -> None:
        all_layers = find_moe_layers(model)
        if layers is not None:
            wanted = set(layers)
            missing = wanted - {l.index for l in all_layers}
            if missing:
                raise MoEUnlearnError(
                    f"Layers {sorted(missing)} are not MoE layers; MoE layers are {[l.index for l in all_layers]}."
                )
            all_layers = [l for l in all_layers if l.index in wanted]
        self.model = model
        self.layers = all_layers
        self.accumulate = accumulate
        self.keep_current = keep_current
        self.keep_inputs = keep_inputs
        self.current_inputs: dict[int, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None
        self.enabled = True
        self.current_indices: dict[int, torch.Tensor] = {}
        self.current_logits: dict[int, torch.Tensor] = {}
        self._handles: list = []
        self._tokens: torch.Tensor | None = None
        self._sequences: torch.Tensor | None = None
        self.reset()

    # --- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> "RouterRecorder":
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def attach(self) -> None:
        if self._handles:
            return
        for layer in self.layers:
            self._handles.append(layer.router.register_forward_hook(self._make_hook(layer)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def reset(self) -> None:
        """Zero the accumulated statistics (the hooks stay attached)."""
        # Per layer one [2, 4E] float64 accumulator:
        # (counted tokens, per-sequence mean) x (gates, hits, probabilities, top-k-masked probabilities).
        self._acc: dict[int, torch.Tensor] = {}
        self._tokens = None
        self._sequences = None
        self._coeffs = None

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Mask [batch, seq] of the tokens to count in the next forward(s); None counts every token."""
        self.mask = mask
        self._coeffs = None

    # --- the hook ----------------------------------------------------------------------------------
    def _make_hook(self, layer: MoELayer):
        def hook(module, inputs, output):
            if not self.enabled or _in_backward():
                return
            routing = parse_router_output(output, layer)
            if self.keep_inputs and inputs and torch.is_tensor(inputs[0]):  # every family passes it positionally
                self.current_inputs[layer.index] = inputs[0].detach()
            if self.keep_current:
                self.current_indices[layer.index] = routing.indices.detach()
                self.current_logits[layer.index] = routing.logits
            if self.accumulate:
                with torch.no_grad():
                    self._record(layer, routing)

        return hook

    def _token_coefficients(self, n: int, device: torch.device, name: str) -> torch.Tensor:
        """[2, N] per-token coefficients, the same for every layer of a forward, so computed once per mask:
        row 0 = counted (mask), row 1 = mask / (counted tokens of the token's sequence) for Eq. 2's per-sequence
        mean. Also adds the forward's token and sequence counts (on device, no sync)."""
        if self._coeffs is not None and self._coeffs.shape[1] == n and self._coeffs.device == device:
            return self._coeffs
        if self.mask is not None:
            if self.mask.numel() != n:
                raise MoEUnlearnError(
                    f"The recorder's mask has {self.mask.numel()} positions but router {name} saw {n} tokens. "
                    f"Set the mask to the [batch, seq] attention/label mask of the batch being run."
                )
            mask2d = self.mask.to(device=device, dtype=torch.float32).reshape(self.mask.shape[0], -1)
        else:
            mask2d = torch.ones(1, n, device=device)
        counts = mask2d.sum(1, keepdim=True)
        self._coeffs = torch.stack([mask2d.reshape(-1), (mask2d / counts.clamp_min(1.0)).reshape(-1)])
        tokens = counts.sum().to(torch.float64)
        sequences = (counts > 0).sum().to(torch.float64)
        self._tokens = tokens if self._tokens is None else self._tokens + tokens
        self._sequences = sequences if self._sequences is None else self._sequences + sequences
        return self._coeffs

    def _record(self, layer: MoELayer, routing: RoutingOutput) -> None:
        # Few kernels per layer (no bincount, .item() or boolean indexing): the top-k gates, the hits, the full
        # router probabilities and the top-k-masked probabilities as one dense [N, 4E] matrix, then one matmul
        # with the per-token coefficients gives every sum at once, added in place to a float64 accumulator
        # (float32 sums promoted by add_).
        n, num_experts = routing.logits.shape
        device = routing.logits.device
        coeffs = self._token_coefficients(n, device, layer.router_name)
        dense = torch.zeros(n, 4 * num_experts, device=device, dtype=torch.float32)
        top_k, hits, probs, masked = dense.split(num_experts, dim=1)
        top_k.scatter_(1, routing.indices, routing.weights.float())
        hits.scatter_(1, routing.indices, 1.0)
        probs.copy_(expert_scores(routing.logits.detach(), layer.score_fn))
        # The mask is the model's own top-k (``routing.indices``), which for bias-corrected/grouped routers
        # (DeepSeek-V3 style) need not be the top-k of the probabilities.
        torch.mul(probs, hits, out=masked)
        sums = coeffs @ dense  # [2, 4E]: (counted, per-sequence mean) x (gates, hits, probabilities, masked)
        if layer.index in self._acc:
            self._acc[layer.index].add_(sums)
        else:
            self._acc[layer.index] = sums.to(torch.float64)

    # --- results -----------------------------------------------------------------------------------
    def raw_tensors(self) -> dict[str, torch.Tensor]:
        """Accumulators stacked as tensors ([L, E] each, plus ``tokens``/``sequences``), still on device:
        the form to all-reduce across processes before :meth:`stats`."""
        if self._tokens is None or not self._acc:
            raise MoEUnlearnError(
                "The recorder counted no token: no forward ran inside it, or every token was masked out "
                "(padding / no labels). Check the data: empty texts, or labels that are all -100."
            )
        stacked = torch.stack([self._acc[l.index] for l in self.layers])  # [L, 2, 4E]
        gates, hits, probs, masked = stacked.split(stacked.shape[-1] // 4, dim=-1)
        # counted-token sums (row 0) of hits, probabilities and gates; per-sequence means (row 1) of the gates
        # and of the masked probabilities
        out = dict(zip(ACCUMULATORS, (hits[:, 0], probs[:, 0], gates[:, 0], gates[:, 1], masked[:, 1])))
        out["tokens"] = self._tokens.reshape(1)
        out["sequences"] = self._sequences.reshape(1)
        return out

    def stats(self, raw: dict[str, torch.Tensor] | None = None, **metadata) -> ExpertStats:
        """The accumulated statistics as :class:`ExpertStats` (one host sync)."""
        raw = raw if raw is not None else self.raw_tensors()
        host = {k: v.detach().cpu().double() for k, v in raw.items()}
        base = unwrap_model(self.model)
        if float(host["tokens"][0]) <= 0:
            raise MoEUnlearnError(
                "No token was counted (all masked: padding or no labels). Check that the data is not empty."
            )
        return ExpertStats(
            layers=[l.index for l in self.layers],
            num_experts=[l.num_experts for l in self.layers],
            top_k=[l.top_k for l in self.layers],
            hits=host["hits"].tolist(),
            prob_sum=host["prob_sum"].tolist(),
            gate_sum=host["gate_sum"].tolist(),
            seq_gate_mean_sum=host["seq_gate_mean_sum"].tolist(),
            seq_masked_prob_mean_sum=host["seq_masked_prob_mean_sum"].tolist(),
            tokens=float(host["tokens"][0]),
            sequences=float(host["sequences"][0]),
            model_fingerprint=config_fingerprint(self.model),
            model_name=getattr(base.config, "_name_or_path", "") or type(base).__name__,
            **metadata,
        )
