"""A PEFT LoRA layer for fused experts that adapts only the selected experts, at the cost of those experts.

PEFT's own adapter for 3-D expert tensors (``ParamWrapper``) keeps a rank-r pair for *every* expert and adds the
product for all of them to the weights on every forward, so memory and compute are those of all experts and the
backward computes the gradient of the whole [E, out, in] tensor. Here the base experts run exactly as transformers
runs them (tokens sorted by expert, one ``grouped_mm`` per projection, all experts), and the adaptation is added
row-wise, only where it belongs:

- LoRA mode: after the sort, each selected expert's rows are one contiguous window, of at most ``tokens`` rows.
  A fixed window of that size per selected expert (its start read on the device, the padding masked) goes through
  ``x @ A_e^T @ B_e^T`` and is scatter-added to the gate/up output *before* the activation (and to the down
  output): exactly ``x @ (W_e + s B_e A_e)^T``. Cost O(S * tokens * r * (in + out)); the only weight gradients
  are those of A and B, and only the window rows are kept for backward.
- Full mode: the effective weight ``W.index_add(0, selected, delta)`` is passed to the same ``grouped_mm``; the
  trainable ``delta`` holds only the S selected experts. The base tensor is never written (until an explicit
  ``merge``), so it *is* the selected experts' original weights: with the adapter disabled the layer runs them
  (the reference model of NPO/KL), at no memory beyond the S slices of ``delta``.

On an H100 the benchmark's 0.49B model (8x1024 tokens) trained at a rate set by the CPU that launches kernels, not
by the GPU (docs/performance.md), so every aten call added per layer counts: compared with transformers' own experts
forward and backward, a selected layer adds about 16 kernels forward and 17 backward (plus ~30 view ops that launch
nothing), and no Python ``autograd.Function``.

Everything stays on the device: no ``nonzero``, boolean indexing or ``.item()`` (a host sync each), no Python loop
over experts.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, Optional, Sequence

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ..errors import MoEUnlearnError

try:  # transformers' dispatcher picks torch's grouped_mm or its own fallback exactly as the stock experts do
    from transformers.integrations.moe import _grouped_mm as _hf_grouped_mm
except ImportError:  # pragma: no cover - older/newer transformers without the private helper
    _hf_grouped_mm = None


def _grouped_mm(inp: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``inp`` rows (sorted by group) times ``weight[group]`` ([G, in, out]); groups delimited by ``offsets``."""
    if _hf_grouped_mm is not None:
        return _hf_grouped_mm(inp, weight, offsets)
    grouped = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    return grouped(inp.to(weight.dtype), weight, offs=offsets)


def _grouped_linear(inp: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Per-expert linear map of sorted rows; ``weight`` is [E, out, in] (or [E, in, out] when ``transposed``)."""
    return _grouped_mm(inp, weight if transposed else weight.transpose(-2, -1), offsets)


def _expert_offsets(sorted_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Cumulative rows per expert, as transformers computes them (``histc``: no sync, CUDA-graph safe)."""
    on_cpu = sorted_ids.device.type in ("cpu", "mps")  # histc takes floats on CPU/MPS, ints on CUDA
    counts = torch.histc(sorted_ids.float() if on_cpu else sorted_ids.int(), bins=num_experts, min=0, max=num_experts - 1)
    return torch.cumsum(counts, dim=0, dtype=torch.int32)


def _routing_args(base: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k indices, top-k weights) from an experts call, whatever the family names them.

    Families call ``experts(hidden, indices, weights)`` positionally or by keyword (``router_indices``,
    ``routing_weights``, ...); the indices are the integer tensor, the weights the floating one.
    """
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    index = [t for t in tensors if not t.is_floating_point()]
    weights = [t for t in tensors if t.is_floating_point()]
    if len(index) != 1 or len(weights) != 1:
        raise MoEUnlearnError(
            f"{type(base).__name__} was called with an unexpected signature (expected hidden states, top-k indices "
            "and top-k weights); expert-selective training does not support this family yet."
        )
    return index[0], weights[0]


def _add_rows_(target: torch.Tensor, rows: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``target[rows[i]] += source[i]`` in place, keeping only ``rows`` for backward.

    ``scatter_add_`` with the row index expanded along the features (a stride-0 view, no memory) rather than
    ``index_add_``, whose autograd keeps the whole ``source`` (a [S*N, out] tensor per projection), or
    ``index_put_(accumulate=True)``, which sorts (150-230 us of CPU per call on an H100, and steps at this scale are
    CPU-bound). Its backward is one ``gather``.
    """
    index = rows.unsqueeze(-1).expand(-1, target.shape[-1])
    return target.scatter_add_(0, index, source.to(target.dtype))


class SelectedExpertsLayer(nn.Module, LoraLayer):
    """PEFT tuner layer around a fused experts module that trains only ``expert_ids`` (LoRA or full deltas).

    Parameters (per adapter, in ``nn.ParameterDict`` s keyed by the expert tensor's name, S = len(expert_ids)):
        ``lora_A[adapter][w]``: [S, r, in]; ``lora_B[adapter][w]``: [S, r, out] (LoRA mode): expert s's pair is
        ``A_s = lora_A[s]`` and ``B_s = lora_B[s].T``, as PEFT's ``ParamWrapper`` keeps them for all E experts. B is
        stored transposed so that ``B_cat`` ([S*r, out]) is a view, not a copy made on every forward.
        ``lora_delta[adapter][w]``: [S, *w.shape[1:]], and ``[w + "_bias"]``: [S, out] when the experts have
        biases (full mode).
    """

    adapter_layer_names = LoraLayer.adapter_layer_names + ("lora_delta",)

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        *,
        expert_ids: Sequence[int],
        mode: str = "lora",
        r: int = 8,
        lora_alpha: float = 16,
        config: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        with warnings.catch_warnings():  # older peft warns "Unsupported layer type" for any non-Linear base layer
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            LoraLayer.__init__(self, base_layer)
        config = config if config is not None else kwargs.get("lora_config")
        base = self.get_base_layer()
        self.lora_delta = nn.ModuleDict({})
        self.expert_mode = mode
        self.weight_names = [n for n, p in base.named_parameters(recurse=False) if p.dim() == 3]
        self.bias_names = [f"{w}_bias" for w in self.weight_names if isinstance(getattr(base, f"{w}_bias", None), nn.Parameter)]
        self.num_experts = getattr(base, self.weight_names[0]).shape[0]
        self.is_transposed = bool(getattr(base, "is_transposed", False))
        ids = sorted({int(e) for e in expert_ids})
        device = getattr(base, self.weight_names[0]).device
        # Non-persistent: derived from the selection, never part of a checkpoint.
        ids_tensor = torch.tensor(ids, dtype=torch.long, device=device)
        self.register_buffer("selected_ids", ids_tensor, persistent=False)
        self.register_buffer("window_bounds", torch.cat([ids_tensor, ids_tensor + 1]), persistent=False)
        self._ranges: dict[str, Any] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    # ------------------------------------------------------------------------------------------- construction
    def _get_in_out_features(self, module: nn.Module) -> tuple[None, None]:
        return None, None  # several tensors of different shapes; see _in_out

    def _in_out(self, name: str) -> tuple[int, int]:
        shape = getattr(self.get_base_layer(), name).shape
        return (shape[1], shape[2]) if self.is_transposed else (shape[2], shape[1])

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: Any, **kwargs: Any) -> None:
        if adapter_name in self.r:
            raise MoEUnlearnError("An expert-selective layer holds a single adapter; create a new model for another.")
        if config is not None and (config.lora_dropout or config.use_dora or config.lora_bias):
            raise MoEUnlearnError("Expert LoRA supports neither dropout, DoRA nor lora_bias (PEFT's format cannot save them).")
        use_rslora = bool(getattr(config, "use_rslora", False))
        init = getattr(config, "init_lora_weights", True)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.use_rslora[adapter_name] = use_rslora
        self.use_dora[adapter_name] = False
        self.lora_bias[adapter_name] = False
        self.lora_dropout[adapter_name] = nn.Identity()
        base = self.get_base_layer()
        num_selected = len(self.selected_ids)
        if self.expert_mode == "lora":
            a_params, b_params = {}, {}
            for name in self.weight_names:
                weight = getattr(base, name)
                d_in, d_out = self._in_out(name)
                a_params[name] = nn.Parameter(torch.empty(num_selected, r, d_in, dtype=weight.dtype, device=weight.device))
                b_params[name] = nn.Parameter(torch.zeros(num_selected, r, d_out, dtype=weight.dtype, device=weight.device))
            self.lora_A[adapter_name] = nn.ParameterDict(a_params)
            self.lora_B[adapter_name] = nn.ParameterDict(b_params)
            self._init_lora(adapter_name, init)
        else:
            deltas = {}
            for name in self.weight_names + self.bias_names:
                param = getattr(base, name)
                deltas[name] = nn.Parameter(torch.zeros(num_selected, *param.shape[1:], dtype=param.dtype, device=param.device))
            self.lora_delta[adapter_name] = nn.ParameterDict(deltas)
        self.set_adapter(self.active_adapters, inference_mode=bool(getattr(config, "inference_mode", False)))

    @torch.no_grad()
    def _init_lora(self, adapter_name: str, init: Any) -> None:
        """PEFT's LoRA initialisation, per selected expert: A like ``nn.Linear`` (or Gaussian), B zero.

        ``init_lora_weights=False`` draws B at random too (a non-identity adapter, as PEFT does for testing).
        """
        if self.lora_A[adapter_name][self.weight_names[0]].device.type == "meta":
            return
        for name in self.weight_names:
            a, b = self.lora_A[adapter_name][name], self.lora_B[adapter_name][name]
            for s in range(a.shape[0]):  # a handful of selected experts, at construction only
                if init == "gaussian":
                    nn.init.normal_(a[s], std=1 / self.r[adapter_name])
                else:
                    nn.init.kaiming_uniform_(a[s], a=math.sqrt(5))
                if init is False:
                    nn.init.kaiming_uniform_(b[s].t(), a=math.sqrt(5))  # B_s = b[s].T, shaped like PEFT's

    # ------------------------------------------------------------------------------------------- deltas / merging
    def _adapter(self) -> Optional[str]:
        """The active adapter of this layer (at most one), or None when disabled / merged / absent."""
        if self.disable_adapters or self.merged:
            return None
        active = [a for a in self.active_adapters if a in self.r]
        return active[0] if active else None

    def get_delta_weight(self, adapter_name: str, name: str) -> torch.Tensor:
        """The change of the selected experts' slices of tensor ``name``: [S, *base.<name>.shape[1:]], base layout."""
        if self.expert_mode == "full":
            return self.lora_delta[adapter_name][name]
        a, b = self.lora_A[adapter_name][name], self.lora_B[adapter_name][name]
        delta = torch.bmm(b.transpose(-2, -1), a) * self.scaling[adapter_name]  # [S, out, in]
        return delta.transpose(-2, -1) if self.is_transposed else delta

    def _delta_names(self) -> list[str]:
        return self.weight_names + (self.bias_names if self.expert_mode == "full" else [])

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.r:
                continue
            base = self.get_base_layer()
            for name in self._delta_names():
                param = getattr(base, name)
                delta = self.get_delta_weight(adapter, name).detach().to(param.dtype)
                merged = param.data.index_add(0, self.selected_ids, delta)
                if safe_merge and not torch.isfinite(merged).all():
                    raise MoEUnlearnError(f"NaNs/infs in the merged {name}: the adapter {adapter} seems broken.")
                param.data = merged
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            for name in self._delta_names():
                param = getattr(base, name)
                param.data.index_add_(0, self.selected_ids, -self.get_delta_weight(adapter, name).detach().to(param.dtype))

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        if self.disable_adapters and self.merged:
            self.unmerge()
        adapter = self._adapter()
        if adapter is None:
            return base(hidden_states, *args, **kwargs)
        top_k_index, top_k_weights = _routing_args(base, args, kwargs)
        return self._selected_forward(adapter, hidden_states, top_k_index, top_k_weights)

    def _window_offsets(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        """``arange(num_tokens)``, kept between steps (the batch shape rarely changes)."""
        if self._ranges.get("key") != (num_tokens, device):
            self._ranges = {"key": (num_tokens, device), "offsets": torch.arange(num_tokens, device=device)}
        return self._ranges["offsets"]

    def _selected_windows(
        self, sorted_ids: torch.Tensor, num_tokens: int, scaling: float, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Row windows of the selected experts in the expert-sorted rows, sized without a host sync.

        Expert e's rows are contiguous in the sorted order, and there are at most ``num_tokens`` of them (top-k picks
        distinct experts, so a token reaches e at most once). A fixed window of ``num_tokens`` rows from each selected
        expert's first row (found on the device) therefore covers all its rows; the part past its last row is masked.

        Returns ``rows`` ([S*N] row indices, clamped in range) and ``scale`` ([S*N, 1]: the LoRA scaling on the
        expert's rows, 0 on padding). One ``searchsorted`` finds both ends: for integer ids, the first row past
        expert e is the first row of a value >= e + 1 (``window_bounds`` holds ``[ids, ids + 1]``).
        """
        bounds = torch.searchsorted(sorted_ids, self.window_bounds).view(2, -1, 1)
        window = bounds[0] + self._window_offsets(num_tokens, sorted_ids.device)  # [S, N]
        scale = (window < bounds[1]).to(dtype).mul_(scaling).view(-1, 1)
        return window.clamp_(max=sorted_ids.numel() - 1).view(-1), scale

    def _low_up(self, adapter: str, name: str, hidden: torch.Tensor, token_of_row: torch.Tensor,
                rows: torch.Tensor) -> torch.Tensor:
        """``x @ A_e^T`` for the window rows of the up projection ([S*N, r]), from the token-level inputs.

        The rank-r product is taken once per token ([N, S*r]) and each window row picks its token's block of its own
        expert: autograd then keeps ``hidden`` (the layer input, which the router's gradient keeps anyway), not a
        gathered [S*N, in] copy of it.
        """
        a = self._cast(self.lora_A[adapter][name], hidden.dtype)
        num_selected, rank, d_in = a.shape
        low_tok = torch.nn.functional.linear(hidden, a.view(num_selected * rank, d_in))
        token_rows = token_of_row.index_select(0, rows)
        if num_selected == 1:
            return low_tok.index_select(0, token_rows)
        # window s ([N] token ids) picks rows of expert s's block: gather along the tokens of the [S, N, r] view
        per_expert = low_tok.view(-1, num_selected, rank).transpose(0, 1)
        index = token_rows.view(num_selected, -1, 1).expand(-1, -1, rank)
        return per_expert.gather(1, index).reshape(-1, rank)

    def _low_down(self, adapter: str, name: str, act_rows: torch.Tensor) -> torch.Tensor:
        """``a @ A_e^T`` for the activated window rows of the down projection ([S*N, I] in, [S*N, r] out)."""
        a = self._cast(self.lora_A[adapter][name], act_rows.dtype)
        num_selected, rank, d_in = a.shape
        if num_selected == 1:
            return torch.nn.functional.linear(act_rows, a.view(rank, d_in))
        return torch.bmm(act_rows.view(num_selected, -1, d_in), a.transpose(1, 2)).view(-1, rank)

    def _times_b(self, adapter: str, name: str, low: torch.Tensor, scale: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
        """``(scale * low) @ B_e^T`` per window ([S*N, r] in, [S*N, out] out). The mask-and-scale multiplies the
        rank-r intermediate, the cheapest place for it."""
        b = self._cast(self.lora_B[adapter][name], dtype)
        num_selected, rank, d_out = b.shape
        low = (low * scale).to(dtype)
        if num_selected == 1:
            return low @ b.view(rank, d_out)
        return torch.bmm(low.view(num_selected, -1, rank), b).view(-1, d_out)

    @staticmethod
    def _cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Float32 adapter weights on a bf16/fp16 model (or under autocast) are cast per use, as PEFT does."""
        return weight if weight.dtype == dtype else weight.to(dtype)

    def _effective(self, adapter: str, name: str) -> torch.Tensor:
        """Base tensor ``name`` with the full-mode deltas of the selected experts added (a new tensor)."""
        param = getattr(self.get_base_layer(), name)
        if self.expert_mode != "full":
            return param
        return param.index_add(0, self.selected_ids, self.lora_delta[adapter][name].to(param.dtype))

    def _selected_forward(
        self, adapter: str, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """transformers' ``grouped_mm`` experts forward, plus the selected experts' adaptation (see module doc)."""
        base = self.get_base_layer()
        num_tokens, top_k = top_k_index.shape[0], top_k_index.shape[-1]
        up_name, down_name = self.weight_names
        lora = self.expert_mode == "lora"

        expert_ids = top_k_index.reshape(-1)
        sorted_ids, perm = torch.sort(expert_ids)
        token_of_row = perm // top_k
        rows_in = hidden_states[token_of_row]
        offsets = _expert_offsets(sorted_ids, self.num_experts)

        up = _grouped_linear(rows_in, self._effective(adapter, up_name), offsets, self.is_transposed)
        if f"{up_name}_bias" in self.bias_names:
            up = up + self._effective(adapter, f"{up_name}_bias")[sorted_ids]
        if lora:
            rows, scale = self._selected_windows(sorted_ids, num_tokens, self.scaling[adapter], hidden_states.dtype)
            low = self._low_up(adapter, up_name, hidden_states, token_of_row, rows)
            up = _add_rows_(up, rows, self._times_b(adapter, up_name, low, scale, up.dtype))
        act = base._apply_gate(up) if getattr(base, "has_gate", True) else base.act_fn(up)

        out = _grouped_linear(act, self._effective(adapter, down_name), offsets, self.is_transposed)
        if f"{down_name}_bias" in self.bias_names:
            out = out + self._effective(adapter, f"{down_name}_bias")[sorted_ids]
        if lora:  # only the window rows of the activations are kept for backward
            low = self._low_down(adapter, down_name, act.index_select(0, rows))
            out = _add_rows_(out, rows, self._times_b(adapter, down_name, low, scale, out.dtype))
        if getattr(base, "has_post_expert_norm", False):
            out = base.post_expert_norm(out)

        out = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1).to(out.dtype)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        out = out[inverse]
        return out.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)

    def __repr__(self) -> str:
        ids = self.selected_ids.tolist()
        return f"hf_moe_unlearn.SelectedExpertsLayer(mode={self.expert_mode}, experts={ids}, base={type(self.get_base_layer()).__name__})"


def selected_experts_factory(expert_ids_by_module: dict[str, list[int]], mode: str):
    """What ``LoraConfig._register_custom_module`` maps an experts class to: builds our layer for each target.

    PEFT calls ``factory(target, adapter_name, config=..., target_name=<module path>, r=..., lora_alpha=...)``; the
    module path says which experts of that layer are selected.
    """

    def build(target: nn.Module, adapter_name: str, **kwargs: Any) -> SelectedExpertsLayer:
        name = kwargs.pop("target_name", None) or kwargs.get("current_key")
        if name not in expert_ids_by_module:
            raise MoEUnlearnError(f"Internal error: PEFT targeted {name}, which is not a selected experts module.")
        allowed = set(inspect.signature(SelectedExpertsLayer.__init__).parameters) - {"self", "kwargs"}
        chosen = {k: v for k, v in kwargs.items() if k in allowed or k == "lora_config"}
        return SelectedExpertsLayer(target, adapter_name, expert_ids=expert_ids_by_module[name], mode=mode, **chosen)

    return build
