"""RouterRecorder sees the routing the model really used; attribution and the selection strategies."""

import json

import numpy as np
import pytest
import torch

from hf_moe_unlearn.errors import MoEUnlearnError
from hf_moe_unlearn.moe import TINY_CONFIGS, find_moe_layers, tiny_modulelist_moe_model, tiny_moe_model
from hf_moe_unlearn.routing import (
    ExpertSelection,
    ExpertStats,
    RouterRecorder,
    attribute_experts,
    forget_concentration,
    parse_router_output,
    select_explicit,
    select_seuf,
    select_trace,
)
from hf_moe_unlearn.routing.report import top_experts_table
from hf_moe_unlearn.routing.stats import STATS_SCHEMA_VERSION

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _router_linear(router, num_experts):
    """The router's own projection (weight [E, d] and its additive bias, if any), read off its parameters."""
    named = dict(router.named_parameters())
    weight = next(p for p in named.values() if p.dim() == 2 and p.shape[0] == num_experts)
    bias = next((p for n, p in named.items() if n == "bias" or n.endswith(".bias")), None)
    return weight, bias


def _per_sequence_mean_sum(values, mask):
    """Σ_j (1/L_j) Σ_{t∈j} values[t] over sequences with a counted token: SEUF Eq. 2's numerator, by hand."""
    per_token = values.reshape(*mask.shape, -1) * mask[..., None]
    counted = mask.sum(1)
    return (per_token.sum(1)[counted > 0] / counted[counted > 0, None]).sum(0)


def _independent_routing(model, input_ids, mask):
    """Per layer, computed by hand, never by the recorder: top-k hits and gates from the *experts* module's
    inputs (its top_k_index / top_k_weights arguments), router probabilities from the router's *input* times its
    weight (softmax, or sigmoid normalised to one), masked to those top-k indices."""
    seen, handles = {}, []
    for layer in find_moe_layers(model):
        def router_hook(module, args, output, layer=layer):
            weight, bias = _router_linear(module, layer.num_experts)
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            logits = torch.nn.functional.linear(x, weight.double(), None if bias is None else bias.double())
            if layer.score_fn == "sigmoid":
                probs = torch.sigmoid(logits) / torch.sigmoid(logits).sum(-1, keepdim=True)
            else:
                probs = torch.softmax(logits, -1)
            seen.setdefault(layer.index, {})["probs"] = probs

        def experts_hook(module, args, layer=layer):
            index, weights = args[1].reshape(-1, args[1].shape[-1]), args[2].reshape(-1, args[1].shape[-1])
            zeros = torch.zeros(index.shape[0], layer.num_experts, dtype=torch.float64)
            seen.setdefault(layer.index, {}).update(
                onehot=zeros.scatter(1, index, 1.0), gates=zeros.scatter(1, index, weights.double())
            )

        handles += [layer.router.register_forward_hook(router_hook),
                    layer.experts.register_forward_pre_hook(experts_hook)]
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=(mask > 0).long() | 1)
    for h in handles:
        h.remove()
    mask = mask.double()
    out = {}
    for index, r in seen.items():
        out[index] = {
            "hits": (r["onehot"] * mask.reshape(-1, 1)).sum(0),
            "seq_gate_mean_sum": _per_sequence_mean_sum(r["gates"], mask),
            "seq_masked_prob_mean_sum": _per_sequence_mean_sum(r["probs"] * r["onehot"], mask),
            "probs": r["probs"],
            "onehot": r["onehot"],
        }
    return out


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (3, 7), generator=g)
    mask = torch.ones(3, 7)
    mask[1, 5:] = 0  # padding
    mask[2, :2] = 0  # prompt tokens without labels
    return ids, mask


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_recorder_counts_match_experts_inputs(family):
    model = tiny_moe_model(family)
    ids, mask = _batch()
    expected = _independent_routing(model, ids, mask)
    with RouterRecorder(model, keep_current=True) as rec:
        rec.set_mask(mask)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=(mask > 0).long() | 1)
    stats = rec.stats()
    assert stats.tokens == mask.sum().item()
    assert stats.sequences == 3
    for i, layer in enumerate(stats.layers):
        np.testing.assert_allclose(stats.frequency(layer) * stats.tokens, expected[layer]["hits"].numpy())
        # SEUF Eq. 2 numerators over counted tokens only (padding and unlabelled prompt tokens excluded): the
        # paper's top-k-masked probabilities and the applied gates
        np.testing.assert_allclose(stats.seq_masked_prob_mean_sum[i], expected[layer]["seq_masked_prob_mean_sum"],
                                   rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(stats.seq_gate_mean_sum[i], expected[layer]["seq_gate_mean_sum"],
                                   rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(stats.seuf_scores(layer), expected[layer]["seq_masked_prob_mean_sum"] / 3,
                                   rtol=1e-5, atol=1e-7)
        assert rec.current_indices[layer].shape == (ids.numel(), 2)
        # each counted token is routed to exactly top-k experts
        assert stats.frequency(layer).sum() == pytest.approx(2.0)
    # hooks are gone after the context
    for layer in find_moe_layers(model):
        assert not layer.router._forward_hooks


def test_gate_and_probability_sums_match_hand_computation():
    model = tiny_moe_model("qwen3_moe")
    ids, mask = _batch(1)
    layer = find_moe_layers(model)[1]
    outputs = []
    h = layer.router.register_forward_hook(lambda m, i, o: outputs.append(o))
    with RouterRecorder(model) as rec, torch.no_grad():
        rec.set_mask(mask)
        model(input_ids=ids)
    h.remove()
    logits, scores, index = outputs[0]
    flat_mask = mask.reshape(-1, 1)
    probs = torch.softmax(logits.float(), -1)
    gates = torch.zeros_like(probs).scatter(1, index, scores.float())
    stats = rec.stats()
    np.testing.assert_allclose(stats.mean_probability(1) * stats.tokens, (probs * flat_mask).sum(0).double(), rtol=1e-5)
    np.testing.assert_allclose(stats.mean_gate(1) * stats.tokens, (gates * flat_mask).sum(0).double(), rtol=1e-5)
    # SEUF Eq. 2: per-sequence mean, then mean over sequences; default g = probabilities masked to the top-k
    per_seq = (gates.reshape(3, 7, -1) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    np.testing.assert_allclose(stats.seuf_scores(1, score="gate"), per_seq.mean(0).double(), rtol=1e-5)
    masked = probs * torch.zeros_like(probs).scatter(1, index, 1.0)
    per_seq = (masked.reshape(3, 7, -1) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    np.testing.assert_allclose(stats.seuf_scores(1), per_seq.mean(0).double(), rtol=1e-5)
    np.testing.assert_allclose(stats.seuf_scores(1, score="masked_softmax"), stats.seuf_scores(1))


def test_masked_probabilities_use_the_models_top_k_not_the_scores():
    """DeepSeek-V3 picks experts on bias-corrected, grouped scores: masking the probabilities to their own top-k
    would be wrong for some tokens; the recorder masks to the indices the model used."""
    model = tiny_moe_model("deepseek_v3")
    ids, mask = _batch()
    expected = _independent_routing(model, ids, mask)
    with RouterRecorder(model) as rec, torch.no_grad():
        rec.set_mask(mask)
        model(input_ids=ids)
    stats = rec.stats()
    layer = stats.layers[0]
    probs = expected[layer]["probs"]
    own_top_k = torch.zeros_like(probs).scatter(1, probs.topk(2).indices, 1.0)
    assert not torch.equal(own_top_k, expected[layer]["onehot"])  # the case this test is about does occur
    wrong = _per_sequence_mean_sum(probs * own_top_k, mask.double())
    assert not np.allclose(stats.seq_masked_prob_mean_sum[0], wrong, rtol=1e-4)
    np.testing.assert_allclose(stats.seq_masked_prob_mean_sum[0], expected[layer]["seq_masked_prob_mean_sum"],
                               rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_does_not_count_twice():
    model = tiny_moe_model("qwen3_moe")
    ids, mask = _batch(2)
    with RouterRecorder(model) as rec, torch.no_grad():
        rec.set_mask(mask)
        model(input_ids=ids)
    plain = rec.stats()
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    handle = find_moe_layers(model)[0].router.register_forward_hook(lambda *a: calls.append(1))
    with RouterRecorder(model, keep_current=True) as rec:
        rec.set_mask(mask)
        out = model(input_ids=ids, labels=ids)
        kept = {k: v.clone() for k, v in rec.current_indices.items()}
        out.logits.float().pow(2).mean().backward()
    handle.remove()
    assert len(calls) == 2  # the router did run again during backward ...
    ckpt = rec.stats()
    assert ckpt.tokens == plain.tokens  # ... but was not counted again
    np.testing.assert_allclose(ckpt.hits, plain.hits)
    for k in kept:
        assert torch.equal(kept[k], rec.current_indices[k])


def test_hooks_removed_on_exception():
    model = tiny_moe_model("mixtral")
    with pytest.raises(RuntimeError, match="boom"):
        with RouterRecorder(model):
            raise RuntimeError("boom")
    assert all(not l.router._forward_hooks for l in find_moe_layers(model))


def test_router_output_order_does_not_matter():
    layer = find_moe_layers(tiny_moe_model("granitemoe"))[0]
    logits = torch.randn(5, 4)
    weights, index = torch.topk(torch.softmax(logits, -1), 2)
    a = parse_router_output((logits, weights, index), layer)
    b = parse_router_output((index, weights, logits), layer)  # GraniteMoE 5.17-5.20 order
    assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights) and torch.equal(a.logits, b.logits)


def test_module_list_router_logits_only():
    model = tiny_modulelist_moe_model()
    ids, mask = _batch(3)
    with RouterRecorder(model) as rec, torch.no_grad():
        rec.set_mask(mask)
        model(input_ids=ids)
    stats = rec.stats()
    layer = find_moe_layers(model)[0]
    with torch.no_grad():
        hidden = []
        h = layer.router.register_forward_hook(lambda m, i, o: hidden.append(o))
        model(input_ids=ids)
        h.remove()
    top = torch.topk(hidden[0], 2).indices
    expected = (torch.nn.functional.one_hot(top, 4).sum(1) * mask.reshape(-1, 1)).sum(0)
    np.testing.assert_allclose(stats.frequency(0) * stats.tokens, expected.double())


def test_mask_size_mismatch_is_clear():
    model = tiny_moe_model("qwen3_moe")
    with RouterRecorder(model) as rec, torch.no_grad():
        rec.set_mask(torch.ones(2, 3))
        with pytest.raises(MoEUnlearnError, match="mask has 6 positions"):
            model(input_ids=torch.randint(3, 128, (2, 5)))


# --- attribution ---------------------------------------------------------------------------------------------


def test_attribute_experts_matches_recorder_and_roundtrips(tmp_path, tiny_tokenizer):
    model = tiny_moe_model("qwen2_moe")
    texts = ["w1 w2 w3 w4 w5", "w6 w7", "w8 w9 w10"]
    stats = attribute_experts(model, texts, tiny_tokenizer, batch_size=2, show_progress=False)
    # tokens: bos + words + eos per text
    assert stats.tokens == sum(len(t.split()) + 1 for t in texts) + (len(texts) if tiny_tokenizer.bos_token_id in
                                                                        tiny_tokenizer("w1")["input_ids"] else 0)
    single = attribute_experts(model, texts, tiny_tokenizer, batch_size=1, show_progress=False)
    np.testing.assert_allclose(stats.hits, single.hits)  # batching and padding change nothing
    np.testing.assert_allclose(stats.seq_gate_mean_sum, single.seq_gate_mean_sum, rtol=1e-5)
    np.testing.assert_allclose(stats.seq_masked_prob_mean_sum, single.seq_masked_prob_mean_sum, rtol=1e-5)
    path = tmp_path / "stats.json"
    stats.save(path)
    saved = json.loads(path.read_text())
    assert saved["schema_version"] == STATS_SCHEMA_VERSION == 2
    assert saved["seq_masked_prob_mean_sum"] == stats.seq_masked_prob_mean_sum
    loaded = ExpertStats.load(path)
    assert loaded == stats
    loaded.check_model(model)
    with pytest.raises(MoEUnlearnError, match="another model"):
        loaded.check_model(tiny_moe_model("qwen2_moe", num_hidden_layers=3))


def test_prompt_answer_pairs_count_only_answers(tiny_tokenizer):
    model = tiny_moe_model("qwen3_moe")
    qa = [{"prompt": "w1 w2 w3", "answer": "w4 w5"}]
    stats = attribute_experts(model, qa, tiny_tokenizer, show_progress=False)
    assert stats.tokens == 3  # two answer words + eos


def test_empty_dataset_error(tiny_tokenizer):
    with pytest.raises(MoEUnlearnError, match="empty"):
        attribute_experts(tiny_moe_model(), [], tiny_tokenizer, show_progress=False)


def test_attribution_under_accelerate_single_process(tiny_tokenizer):
    from accelerate import Accelerator

    model = tiny_moe_model()
    texts = ["w1 w2 w3", "w4 w5 w6 w7"]
    a = attribute_experts(model, texts, tiny_tokenizer, accelerator=Accelerator(cpu=True), show_progress=False)
    b = attribute_experts(model, texts, tiny_tokenizer, show_progress=False)
    np.testing.assert_allclose(a.hits, b.hits)


# --- selection strategies ------------------------------------------------------------------------------------


def _stats(hits, tokens=10.0, seq=None, fingerprint="f", masked=None):
    hits = [list(map(float, row)) for row in hits]
    return ExpertStats(
        layers=list(range(len(hits))), num_experts=[len(hits[0])] * len(hits), top_k=[2] * len(hits),
        hits=hits, prob_sum=hits, gate_sum=hits, seq_gate_mean_sum=seq or hits, tokens=tokens, sequences=1.0,
        model_fingerprint=fingerprint, seq_masked_prob_mean_sum=masked or seq or hits,
    )


def test_select_seuf_global_and_per_layer():
    stats = _stats([[1, 2, 3, 14], [9, 1, 5, 5]], seq=[[0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.2, 0.2]])
    sel = select_seuf(stats)
    assert sel.experts == {1: [0]} and sel.scores == {1: {0: 0.5}} and sel.method == "seuf"
    assert sel.params == {"top_m": 1, "per_layer": False, "score": "masked_softmax"}
    assert select_seuf(stats, top_m=2).experts == {0: [3], 1: [0]}
    assert select_seuf(stats, top_m=2, per_layer=True).experts == {0: [2, 3], 1: [0, 2]}


def test_select_seuf_score_names_the_table_it_ranks():
    gate = [[0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.2, 0.2]]
    masked = [[0.1, 0.6, 0.1, 0.1], [0.2, 0.1, 0.1, 0.1]]
    stats = _stats([[1, 1, 1, 1], [1, 1, 1, 1]], seq=gate, masked=masked)
    paper, applied = select_seuf(stats), select_seuf(stats, score="gate")
    assert paper.experts == {0: [1]} and paper.scores == {0: {1: 0.6}}
    assert paper.stats["seuf_score"][1] == dict(enumerate(masked[1]))
    assert applied.experts == {1: [0]} and applied.scores == {1: {0: 0.5}} and applied.params["score"] == "gate"
    with pytest.raises(MoEUnlearnError, match="Unknown SEUF score 'softmax'.*masked_softmax, gate"):
        select_seuf(stats, score="softmax")
    with pytest.raises(MoEUnlearnError, match="masked_softmax, gate"):
        stats.seuf_scores(0, score="probability")


def _set_router_logits(router, router_inputs, logits):
    """Set a bias-free router's weight so that its logits on ``router_inputs`` [N, d] are ``logits`` [N, E]
    (exact by least squares while N ≤ d and the inputs are independent)."""
    weight = torch.linalg.lstsq(router_inputs.double(), torch.tensor(logits, dtype=torch.float64)).solution.T
    with torch.no_grad():
        router.weight.copy_(weight.float())


def test_masked_softmax_and_gate_rank_differently_on_a_renormalising_router(tmp_path):
    """Mixtral renormalises its top-2 gates. Expert 0 is chosen by few tokens with probability ≈ 1; expert 3 by
    most tokens, but where the router is nearly uniform (probability ≈ 0.31, renormalised up to ≈ 0.56). The
    paper's masked softmax ranks expert 0 first, the applied gates rank expert 3 first."""
    model = tiny_moe_model("mixtral")
    router = find_moe_layers(model)[0].router
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    seen = []
    handle = router.register_forward_hook(lambda m, args, out: seen.append((args[0], out[0])))
    with torch.no_grad():
        model(input_ids=ids)  # layer 0's router inputs do not depend on its own weight
    peaked, flat = [8.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.05, 0.3]
    kinds = [[peaked, flat, flat, peaked, flat, flat, flat, peaked, flat, flat],
             [flat, flat, peaked, flat, flat, flat, peaked, flat, flat, peaked]]
    _set_router_logits(router, seen[0][0].reshape(20, -1), [row for seq in kinds for row in seq])
    mask = torch.ones(2, 10)
    seen.clear()
    with RouterRecorder(model, layers=[0]) as rec, torch.no_grad():
        rec.set_mask(mask)
        model(input_ids=ids)
    handle.remove()
    stats = rec.stats()

    # by hand from the router's logits: per-sequence means of the masked softmax and of the renormalised gates
    probs = torch.softmax(seen[0][1].double(), -1)
    top2 = probs.topk(2).indices
    masked = torch.zeros_like(probs).scatter(1, top2, probs.gather(1, top2))
    gates = masked / masked.sum(-1, keepdim=True)
    paper_hand = (masked.reshape(2, 10, 4).mean(1)).mean(0).numpy()
    gate_hand = (gates.reshape(2, 10, 4).mean(1)).mean(0).numpy()
    assert int(paper_hand.argmax()) == 0 and int(gate_hand.argmax()) == 3
    np.testing.assert_allclose(stats.seuf_scores(0), paper_hand, rtol=1e-5)
    np.testing.assert_allclose(stats.seuf_scores(0, score="gate"), gate_hand, rtol=1e-5)

    paper, applied = select_seuf(stats), select_seuf(stats, score="gate")
    assert paper.experts == {0: [0]} and applied.experts == {0: [3]}
    assert paper.scores[0][0] == pytest.approx(paper_hand[0], rel=1e-5)
    assert applied.scores[0][3] == pytest.approx(gate_hand[3], rel=1e-5)
    # selection.json says which g was used
    saved = json.loads(open(paper.save(tmp_path / "paper")).read())
    assert saved["params"]["score"] == "masked_softmax"
    assert ExpertSelection.load(applied.save(tmp_path / "gate")).params["score"] == "gate"
    assert "(gate)" in top_experts_table(stats, None, applied)


def test_stats_without_masked_probabilities_load_and_say_to_recompute(tmp_path):
    model = tiny_moe_model("qwen3_moe")
    ids, mask = _batch()
    with RouterRecorder(model) as rec, torch.no_grad():
        rec.set_mask(mask)
        model(input_ids=ids)
    data = rec.stats().to_dict()
    del data["seq_masked_prob_mean_sum"]
    data["schema_version"] = 1
    path = tmp_path / "old_stats.json"
    path.write_text(json.dumps(data))
    old = ExpertStats.load(path)
    assert old.seq_masked_prob_mean_sum is None
    with pytest.raises(MoEUnlearnError, match="(?s)no top-k-masked router probabilities.*attribute_experts"):
        old.seuf_scores(0)
    with pytest.raises(MoEUnlearnError, match="Recompute the statistics with attribute_experts"):
        select_seuf(old)
    assert select_seuf(old, score="gate").params["score"] == "gate"  # the gate ranking still works
    assert "(gate)" in top_experts_table(old, None, select_seuf(old, score="gate"))
    data["schema_version"] = STATS_SCHEMA_VERSION + 1
    with pytest.raises(MoEUnlearnError, match="newer than this hf-moe-unlearn supports"):
        ExpertStats.from_dict(data)


def test_select_trace_hand_computed():
    # 10 forget / 10 retain tokens, k=2 of E=4 → uniform rate 0.5
    forget = _stats([[8, 6, 4, 2], [5, 5, 5, 5]])
    retain = _stats([[2, 6, 6, 6], [5, 5, 5, 5]])
    sel = select_trace(forget, retain)
    # layer 0: expert 0 f_F=0.8 ≥ 0.5 and ratio 4 ≥ 1.1; expert 1 ratio 1 → not eligible; layer 1 uniform → none
    assert sel.experts == {0: [0]}
    assert sel.stats["ratio"][0][0] == pytest.approx(4.0, rel=1e-5)
    assert sel.scores[0][0] == pytest.approx(0.8 * np.log(0.8 / (0.2 + 1e-6)))
    with pytest.raises(MoEUnlearnError, match="(?s)no forget-critical expert.*layer 0 expert 0.*trace_tau"):
        select_trace(forget, retain, rho=5.0)
    with pytest.raises(MoEUnlearnError, match="different models"):
        select_trace(forget, _stats([[1, 1, 1, 1], [1, 1, 1, 1]], fingerprint="g"))


def test_selection_validation_and_json(tmp_path):
    model = tiny_moe_model("qwen2_moe")
    sel = select_explicit(model, {1: [3, 0]})
    assert sel.experts == {1: [0, 3]}
    again = ExpertSelection.load(sel.save(tmp_path))
    assert again == sel
    assert json.loads((tmp_path / "selection.json").read_text())["experts"] == {"1": [0, 3]}
    with pytest.raises(MoEUnlearnError, match="layer 5, which is not an MoE layer"):
        select_explicit(model, {5: [0]})
    with pytest.raises(MoEUnlearnError, match=r"expert\(s\) \[4\].*Shared experts"):
        select_explicit(model, {0: [4]})
    with pytest.raises(MoEUnlearnError, match="names no expert"):
        ExpertSelection({0: []})
    with pytest.raises(MoEUnlearnError, match="another model"):
        sel.validate(tiny_moe_model("qwen2_moe", num_hidden_layers=3))


def test_forget_concentration_hand_computed():
    forget = _stats([[8, 6, 4, 2], [5, 5, 5, 5]])  # 10 tokens, k=2: shares f/2
    retain = _stats([[2, 6, 6, 6], [5, 5, 5, 5]])
    conc = forget_concentration(forget, retain)
    assert conc["uniform"] == 0.5
    assert conc["layers"][0] == {"layer": 0, "experts": [0, 1], "forget_share": 0.7, "retain_share": 0.4}
    assert conc["layers"][1]["forget_share"] == 0.5
    assert conc["mean_forget_share"] == 0.6
