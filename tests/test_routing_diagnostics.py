"""routing_diagnostics against an independent reference: forward hooks on the tiny model's routers, each text run
alone (so no padding exists), counting the tokens whose top-k contains the expert."""

import pytest
import torch

from hf_moe_unlearn.evaluation import get_metric
from hf_moe_unlearn.moe import tiny_moe_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hand_shares(model, tokenizer, texts, pairs):
    """{(layer, expert): fraction of the texts' tokens whose top-k at ``layer`` contains ``expert``}.

    Reads the router output directly (Qwen3-MoE's router returns (logits, gate values, indices); the indices are
    its one integer tensor). Every text is run alone and unpadded; its tokens are the ones the metric counts for
    a plain text: the tokenizer's ids plus EOS, all label-bearing.
    """
    captured = {}
    handles = [
        model.model.layers[layer].mlp.gate.register_forward_hook(
            lambda module, inputs, output, layer=layer: captured.__setitem__(
                layer, next(t for t in output if torch.is_tensor(t) and not t.is_floating_point())
            )
        )
        for layer in {l for l, _ in pairs}
    ]
    hits = {pair: 0 for pair in pairs}
    tokens = 0
    try:
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
                model(input_ids=torch.tensor([ids]))
                tokens += len(ids)
                for layer, expert in pairs:
                    topk = captured[layer].reshape(len(ids), -1)
                    hits[(layer, expert)] += int((topk == expert).any(-1).sum())
    finally:
        for handle in handles:
            handle.remove()
    return {pair: hits[pair] / tokens for pair in pairs}


def test_routing_diagnostics_matches_router_hooks_before_and_after(tiny_tokenizer):
    before, after = tiny_moe_model("qwen3_moe", seed=0), tiny_moe_model("qwen3_moe", seed=1)
    # Lengths 13 / 2 / 7 tokens: in the metric's batches (batch_size 2 below) the short texts are padded, so
    # counting padding or ignoring the mask would change the shares.
    forget = ["w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12", "w5", "w13 w14 w15 w16 w17 w18"]
    retain = ["w50 w60 w70 w71 w72 w73 w74 w75 w76 w77 w78", "w80", "w90 w91 w92 w93 w94"]
    pairs = [(0, 0), (1, 2)]
    result = get_metric("routing_diagnostics")(after, tiny_tokenizer, forget, retain, {1: [2], 0: [0]},
                                               model_before=before, batch_size=2)
    expected = {
        (when, split): hand_shares(model, tiny_tokenizer, texts, pairs)
        for when, model in (("before", before), ("after", after))
        for split, texts in (("forget", forget), ("retain", retain))
    }
    assert set(result["experts"]) == {"L0E0", "L1E2"}
    ratios = []
    for layer, expert in pairs:
        row = result["experts"][f"L{layer}E{expert}"]
        for (when, split), shares in expected.items():
            assert row[f"{split}_{when}"] == pytest.approx(shares[(layer, expert)], abs=1e-9), (layer, expert, split, when)
        ratio = expected["after", "forget"][(layer, expert)] / expected["before", "forget"][(layer, expert)]
        assert row["forget_ratio"] == pytest.approx(ratio)
        ratios.append(ratio)
    assert result["mean_forget_ratio"] == pytest.approx(sum(ratios) / len(ratios))
    # The reference separates what the metric must not mix up: before/after and forget/retain differ here.
    for pair in pairs:
        assert expected["before", "forget"][pair] != pytest.approx(expected["after", "forget"][pair], abs=0.02)
        assert expected["after", "forget"][pair] != pytest.approx(expected["after", "retain"][pair], abs=0.02)


def test_routing_diagnostics_without_model_before(tiny_tokenizer):
    model = tiny_moe_model("qwen3_moe", seed=0)
    forget, retain = ["w1 w2 w3 w4", "w5 w6 w7"], ["w50 w60 w70", "w80 w90"]
    result = get_metric("routing_diagnostics")(model, tiny_tokenizer, forget, retain, {1: [2]})
    row = result["experts"]["L1E2"]
    assert set(row) == {"forget_after", "retain_after"} and "mean_forget_ratio" not in result
    assert row["forget_after"] == pytest.approx(hand_shares(model, tiny_tokenizer, forget, [(1, 2)])[(1, 2)])
    assert row["retain_after"] == pytest.approx(hand_shares(model, tiny_tokenizer, retain, [(1, 2)])[(1, 2)])
