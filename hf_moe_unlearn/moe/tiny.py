"""Tiny random configs of every supported MoE family: for tests, benchmarks and the demo.

Nothing can be downloaded in CI, so every family is exercised through a config that builds in milliseconds
(hidden 64, 2 layers, 4 routed experts, top-2). A family is listed here only once the whole package works
on it; :func:`hf_moe_unlearn.moe.layers.supported_families` reads this table, so the README's list of
supported families cannot drift from what is tested.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from ..errors import MoEUnlearnError

#: Special-token ids of every tiny model: those of the built-in word-level tokenizer (hf_moe_unlearn.bench.tokenizer:
#: ``<pad>`` 0, ``<unk>`` 1, ``<bos>`` 2, ``<eos>`` 3), so a tiny model paired with it (the quickstart) pads, starts and
#: stops on the tokens the tokenizer writes. Only the config's ids change with it: pad stays 0 (the embedding's
#: padding row), and the benchmark's pre-training reads its ids from the tokenizer anyway.
SPECIAL_TOKEN_IDS: dict[str, int] = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)

_BASE: dict[str, Any] = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    intermediate_size=64,
    moe_intermediate_size=32,
    max_position_embeddings=128,
    num_experts_per_tok=2,
    **SPECIAL_TOKEN_IDS,
    tie_word_embeddings=False,
)
# DeepSeek-style multi-head latent attention: no head_dim, LoRA-ranked q/kv, a dense first layer.
_MLA = dict(
    head_dim=None,
    num_key_value_heads=4,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
)
_DEEPSEEK = dict(_MLA, n_routed_experts=4, n_group=2, topk_group=1, first_k_dense_replace=1, n_shared_experts=1)

#: model_type -> overrides of the tiny base config. Everything in this table is tested in tests/.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2_moe": dict(num_experts=4, shared_expert_intermediate_size=64),
    "qwen3_moe": dict(num_experts=4),
    "qwen3_next": dict(
        num_experts=4,
        shared_expert_intermediate_size=64,
        layer_types=["linear_attention", "full_attention"],
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
    ),
    "mixtral": dict(num_local_experts=4),
    "minimax": dict(num_local_experts=4),
    "minimax_m2": dict(num_local_experts=4),
    "olmoe": dict(num_experts=4),
    "flex_olmo": dict(num_experts=4),
    "deepseek_v2": dict(_DEEPSEEK),
    "deepseek_v3": dict(_DEEPSEEK),
    "glm4_moe": dict(n_routed_experts=4, n_group=2, topk_group=1, first_k_dense_replace=1, n_shared_experts=1),
    "glm4_moe_lite": dict(_DEEPSEEK),
    "dots1": dict(n_routed_experts=4, n_group=2, topk_group=1, first_k_dense_replace=1, n_shared_experts=1),
    "exaone_moe": dict(num_experts=4, n_routed_experts=4, n_group=2, topk_group=1, first_k_dense_replace=1, n_shared_experts=1),
    "ernie4_5_moe": dict(moe_num_experts=4, moe_k=2, moe_layer_start_index=1, moe_num_shared_experts=1),
    "gpt_oss": dict(num_local_experts=4, layer_types=["full_attention", "full_attention"]),
    "phimoe": dict(num_local_experts=4),
    "granitemoe": dict(num_local_experts=4),
    "granitemoeshared": dict(num_local_experts=4, shared_intermediate_size=64),
    "granitemoehybrid": dict(
        num_local_experts=4,
        layer_types=["mamba", "attention"],
        mamba_n_heads=8,
        mamba_d_head=16,
        mamba_d_state=8,
        mamba_n_groups=1,
        mamba_expand=2,
        shared_intermediate_size=64,
    ),
    "jamba": dict(
        num_experts=4,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=1,
        expert_layer_offset=0,
        mamba_d_state=8,
        mamba_dt_rank=8,
    ),
    "hunyuan_v1_moe": dict(num_experts=4, moe_topk=2),
    "cohere2_moe": dict(num_experts=4),
    "afmoe": dict(num_experts=4, num_dense_layers=1, num_shared_experts=1),
    "lfm2_moe": dict(num_experts=4, layer_types=["full_attention", "full_attention"], num_dense_layers=0),
}

#: The families the project promises by name (issue 2); the rest of TINY_CONFIGS is a bonus.
CORE_FAMILIES = (
    "qwen2_moe",
    "qwen3_moe",
    "mixtral",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "gpt_oss",
    "phimoe",
    "granitemoe",
)


def tiny_moe_config(model_type: str = "qwen3_moe", **overrides: Any) -> PretrainedConfig:
    """A tiny config of ``model_type`` (a key of :data:`TINY_CONFIGS`), with ``overrides`` applied last."""
    if model_type not in TINY_CONFIGS:
        raise MoEUnlearnError(
            f"No tiny config for model type '{model_type}'. Known: {', '.join(sorted(TINY_CONFIGS))}."
        )
    kwargs = {**_BASE, **TINY_CONFIGS[model_type], **overrides}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_moe_model(model_type: str = "qwen3_moe", seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A tiny causal LM of ``model_type`` with random weights drawn from ``seed``, in eval mode, float32.

    Router weights are re-drawn with a larger scale: several families initialise them at zero or near
    zero, which gives every expert the same score and makes routing (and everything tested on it) arbitrary.
    """
    config = tiny_moe_config(model_type, **overrides)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config)
        from .layers import find_moe_layers

        for layer in find_moe_layers(model):
            for p in layer.router.parameters():
                if p.dim() == 2:
                    torch.nn.init.normal_(p, std=0.5)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()


class ListExpertMLP(torch.nn.Module):
    """One expert as older/remote-code checkpoints keep it: three ``nn.Linear`` (Mixtral's w1, w2, w3)."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.w1 = torch.nn.Linear(hidden, intermediate, bias=False)
        self.w3 = torch.nn.Linear(hidden, intermediate, bias=False)
        self.w2 = torch.nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


class ListExpertsMoeBlock(torch.nn.Module):
    """A sparse MoE block in the pre-5.x / remote-code style: ``gate`` is an ``nn.Linear`` returning logits and
    ``experts`` an ``nn.ModuleList``. Used to test that such checkpoints work like fused ones."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = torch.nn.Linear(hidden, num_experts, bias=False)
        self.experts = torch.nn.ModuleList(ListExpertMLP(hidden, intermediate) for _ in range(num_experts))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        probs = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        # Dense over experts (each expert on every token, weighted by its gate, zero where unrouted): simple and
        # correct, which is all a test model needs.
        gates = torch.zeros(x.shape[0], len(self.experts), dtype=x.dtype, device=x.device).scatter(1, index, weights)
        out = sum(gates[:, e : e + 1] * expert(x) for e, expert in enumerate(self.experts))
        return out.reshape(shape)


def tiny_modulelist_moe_model(seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A tiny Mixtral whose MoE blocks keep experts as an ``nn.ModuleList`` (as remote-code checkpoints do)."""
    config = tiny_moe_config("mixtral", **overrides)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config)
        for layer in model.model.layers:
            layer.mlp = ListExpertsMoeBlock(
                config.hidden_size, config.intermediate_size, config.num_local_experts, config.num_experts_per_tok
            )
            torch.nn.init.normal_(layer.mlp.gate.weight, std=0.5)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()


def benchmark_qwen3_moe_config(**overrides: Any) -> PretrainedConfig:
    """The ~0.49B-parameter Qwen3-MoE every GPU figure in docs/ is measured on: hidden 1024, 8 layers,
    32 experts, top-4 (moe_intermediate 512, 16 heads of 64, 4 KV heads, vocab 32000: a 151k vocabulary would make
    the LM head, not the experts, the model). Shared by every benchmark in benchmarks/."""
    kwargs = dict(
        hidden_size=1024,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        intermediate_size=2816,
        moe_intermediate_size=512,
        num_experts=32,
        num_experts_per_tok=4,
        vocab_size=32000,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return AutoConfig.for_model("qwen3_moe", **kwargs)
