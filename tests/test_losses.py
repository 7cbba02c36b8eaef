"""Tests for hf_moe_unlearn.losses: every formula against a value computed by hand (math/numpy)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hf_moe_unlearn.errors import MoEUnlearnError
from hf_moe_unlearn.losses import (
    LossContext,
    ga_loss,
    get_loss,
    get_loss_spec,
    kl_loss,
    list_losses,
    nll_loss,
    npo_loss,
    prediction_mask,
    register_loss,
    rmu_control_vector,
    rmu_forget_loss,
    rmu_retain_loss,
    routing_share,
    sequence_nll,
    seuf_anchor_loss,
    simnpo_loss,
    token_nll,
    trace_retain_shares,
    trace_token_weights,
    unregister_loss,
)


# ---------------------------------------------------------------------------------------- helpers
def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# One sequence, T = 3, V = 3: position 0 predicts labels[1] = 1, position 1 predicts labels[2] = 2.
LOGITS_1x3 = torch.tensor([[[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [3.0, 1.0, 2.0]]])
LABELS_1x3 = torch.tensor([[-100, 1, 2]])
NLL_POS0 = math.log(math.e + math.e**2 + 1.0) - 2.0  # −log softmax([1,2,0])[1]
NLL_POS1 = math.log(3.0)  # −log softmax([0,0,0])[2]


# -------------------------------------------------------------------------------------- token NLL
def test_token_nll_matches_hand_computation():
    nll, mask = token_nll(LOGITS_1x3, LABELS_1x3)
    assert nll.shape == (1, 2) and mask.shape == (1, 2)
    assert nll[0].tolist() == pytest.approx([NLL_POS0, NLL_POS1], rel=1e-6)
    assert mask[0].tolist() == [1.0, 1.0]


def test_token_nll_ignores_minus_100_and_uses_float32():
    labels = torch.tensor([[5, 1, -100]])  # labels[0] is never a target; labels[2] ignored
    nll, mask = token_nll(LOGITS_1x3.to(torch.bfloat16), labels)
    assert nll.dtype == torch.float32
    assert mask[0].tolist() == [1.0, 0.0]
    assert nll[0, 1].item() == 0.0
    assert nll[0, 0].item() == pytest.approx(NLL_POS0, abs=2e-2)  # bf16 inputs, float32 math


def test_token_nll_rejects_mismatched_shapes():
    with pytest.raises(MoEUnlearnError, match="unshifted labels"):
        token_nll(LOGITS_1x3, torch.tensor([[1, 2]]))


def test_sequence_nll_sums_per_sequence():
    logits = torch.cat([LOGITS_1x3, LOGITS_1x3])
    labels = torch.tensor([[-100, 1, 2], [-100, -100, 2]])
    nll_sum, n_tokens = sequence_nll(logits, labels)
    assert nll_sum.tolist() == pytest.approx([NLL_POS0 + NLL_POS1, NLL_POS1], rel=1e-6)
    assert n_tokens.tolist() == [2.0, 1.0]


# ----------------------------------------------------------------------------------- forget losses
def test_ga_loss_is_minus_mean_nll_over_counted_tokens():
    logits = torch.cat([LOGITS_1x3, LOGITS_1x3])
    labels = torch.tensor([[-100, 1, 2], [-100, -100, 2]])
    expected = -(NLL_POS0 + NLL_POS1 + NLL_POS1) / 3
    assert ga_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_ga_loss_without_counted_tokens_is_zero_not_nan():
    assert ga_loss(LOGITS_1x3, torch.full((1, 3), -100)).item() == 0.0


def test_ga_gradient_is_negative_of_nll_gradient():
    torch.manual_seed(0)
    base = torch.randn(2, 4, 6)
    labels = torch.tensor([[-100, 1, 5, 2], [3, 0, -100, 4]])
    a = base.clone().requires_grad_(True)
    b = base.clone().requires_grad_(True)
    ga_loss(a, labels).backward()
    nll_loss(b, labels).backward()
    assert torch.allclose(a.grad, -b.grad)
    assert b.grad.abs().sum() > 0


def test_npo_equal_likelihoods_gives_two_over_beta_log_two():
    nll = torch.tensor([3.0, 7.5])
    for beta in (0.1, 1.0):
        assert npo_loss(nll, nll.clone(), beta).item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)


def test_npo_matches_hand_formula():
    beta = 0.5
    nll, ref = [4.0, 1.0], [2.0, 3.0]
    expected = -(2 / beta) * np.mean([log_sigmoid(beta * (a - r)) for a, r in zip(nll, ref)])
    got = npo_loss(torch.tensor(nll), torch.tensor(ref), beta).item()
    assert got == pytest.approx(expected, rel=1e-6)
    # higher NLL on forget data than the reference → lower loss (NPO rewards forgetting)
    forgotten = npo_loss(torch.tensor([9.0]), torch.tensor([2.0]), beta)
    assert forgotten < npo_loss(torch.tensor([2.0]), torch.tensor([2.0]), beta)


def test_npo_does_not_backprop_into_reference():
    nll = torch.tensor([2.0], requires_grad=True)
    ref = torch.tensor([1.0], requires_grad=True)
    npo_loss(nll, ref, 0.1).backward()
    assert ref.grad is None and nll.grad is not None


def test_npo_rejects_bad_beta():
    with pytest.raises(MoEUnlearnError, match="beta"):
        npo_loss(torch.zeros(1), torch.zeros(1), 0.0)


def test_simnpo_matches_openunlearning_sign_convention():
    beta, delta = 2.5, 0.3
    nll_sum, n = [6.0, 2.0], [3.0, 4.0]
    expected = -(2 / beta) * np.mean([log_sigmoid(beta * (s / k - delta)) for s, k in zip(nll_sum, n)])
    got = simnpo_loss(torch.tensor(nll_sum), torch.tensor(n), beta, delta).item()
    assert got == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------------- retain losses
def test_nll_loss_weighted_matches_hand_computation():
    logits = torch.cat([LOGITS_1x3, LOGITS_1x3])
    labels = torch.tensor([[-100, 1, 2], [-100, -100, 2]])
    # weights aligned with the unshifted labels: w[:, t] weights the term whose target is labels[:, t]
    weights = torch.tensor([[9.0, 2.0, 0.5], [9.0, 9.0, 3.0]])
    expected = (2.0 * NLL_POS0 + 0.5 * NLL_POS1 + 3.0 * NLL_POS1) / 3  # Σ w·nll / Σ 1
    assert nll_loss(logits, labels, weights).item() == pytest.approx(expected, rel=1e-6)
    assert nll_loss(logits, labels).item() == pytest.approx((NLL_POS0 + 2 * NLL_POS1) / 3, rel=1e-6)


def test_nll_loss_rejects_shifted_weights():
    with pytest.raises(MoEUnlearnError, match="unshifted labels"):
        nll_loss(LOGITS_1x3, LABELS_1x3, torch.ones(1, 2))


def test_kl_of_identical_logits_is_zero():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[0, 1, 2, 3], [-100, 1, -100, 3]])
    assert kl_loss(logits, logits.clone(), labels).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_matches_numpy_in_both_directions():
    torch.manual_seed(2)
    logits, ref = torch.randn(1, 4, 5), torch.randn(1, 4, 5)
    labels = torch.tensor([[0, 3, -100, 1]])  # counted predictions: positions 0 and 2
    lp, lq = np_log_softmax(logits[0, :-1].numpy()), np_log_softmax(ref[0, :-1].numpy())
    kl_pq = (np.exp(lp) * (lp - lq)).sum(-1)  # KL(pθ‖pref) per position
    kl_qp = (np.exp(lq) * (lq - lp)).sum(-1)
    assert kl_loss(logits, ref, labels).item() == pytest.approx((kl_pq[0] + kl_pq[2]) / 2, rel=1e-5)
    got_rev = kl_loss(logits, ref, labels, direction="ref_to_model").item()
    assert got_rev == pytest.approx((kl_qp[0] + kl_qp[2]) / 2, rel=1e-5)
    assert kl_pq[0] != pytest.approx(kl_qp[0], rel=1e-3)  # the directions really differ here
    weights = torch.tensor([[0.0, 2.0, 7.0, 5.0]])
    weighted = kl_loss(logits, ref, labels, weights).item()
    assert weighted == pytest.approx((2.0 * kl_pq[0] + 5.0 * kl_pq[2]) / 2, rel=1e-5)


def test_kl_rejects_mismatched_reference():
    with pytest.raises(MoEUnlearnError, match="same shape"):
        kl_loss(torch.zeros(1, 3, 4), torch.zeros(1, 3, 5), torch.zeros(1, 3, dtype=torch.long))


# ------------------------------------------------------------------------------------------- RMU
def test_rmu_losses_match_masked_mse():
    h = torch.tensor([[[1.0, 2.0], [3.0, -1.0], [9.0, 9.0]]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    c = torch.tensor([0.5, 1.5])
    expected = (((1 - 0.5) ** 2 + (2 - 1.5) ** 2) / 2 + ((3 - 0.5) ** 2 + (-1 - 1.5) ** 2) / 2) / 2
    assert rmu_forget_loss(h, c, mask).item() == pytest.approx(expected, rel=1e-6)
    ref = torch.zeros_like(h)
    assert rmu_retain_loss(h, ref, mask).item() == pytest.approx(((1 + 4) / 2 + (9 + 1) / 2) / 2, rel=1e-6)


def test_rmu_control_vector_is_deterministic_scaled_and_positive():
    a = rmu_control_vector(16, 6.5, seed=3)
    b = rmu_control_vector(16, 6.5, seed=3)
    c = rmu_control_vector(16, 6.5, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.norm().item() == pytest.approx(6.5, rel=1e-6)
    assert (a >= 0).all()
    with pytest.raises(MoEUnlearnError, match="control vector"):
        rmu_forget_loss(torch.zeros(1, 2, 8), a, torch.ones(1, 2))


# ------------------------------------------------------------------------------------ SEUF anchor
def test_seuf_anchor_paper_matches_hand_and_code_is_paper_over_E():
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    mask = torch.tensor([1.0, 1.0, 0.0])
    g = np.exp(np_log_softmax(logits.numpy()))
    onehot = np.array([0.0, 1.0, 0.0, 0.0])
    per_token = ((g - onehot) ** 2).sum(-1)
    expected = (per_token[0] + per_token[1]) / 2
    paper = seuf_anchor_loss(logits, 1, mask, reduction="paper").item()
    code = seuf_anchor_loss(logits, 1, mask, reduction="code").item()
    assert paper == pytest.approx(expected, rel=1e-6)
    assert code == pytest.approx(paper / 4, rel=1e-6)


def test_seuf_anchor_several_experts_is_average_and_sigmoid_normalised():
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0]])
    mask = torch.ones(1)
    both = seuf_anchor_loss(logits, [0, 3], mask).item()
    single = [seuf_anchor_loss(logits, e, mask).item() for e in (0, 3)]
    assert both == pytest.approx(sum(single) / 2, rel=1e-6)
    s = 1 / (1 + np.exp(-logits.numpy()[0]))
    g = s / s.sum()
    expected = ((g - np.array([0.0, 0.0, 0.0, 1.0])) ** 2).sum()
    assert seuf_anchor_loss(logits, 3, mask, score_fn="sigmoid").item() == pytest.approx(expected, rel=1e-6)


def test_seuf_anchor_is_zero_at_target_and_rejects_bad_expert():
    logits = torch.tensor([[-50.0, 50.0, -50.0]])
    assert seuf_anchor_loss(logits, 1, torch.ones(1)).item() == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(MoEUnlearnError, match=r"\[0, 3\)"):
        seuf_anchor_loss(logits, 3, torch.ones(1))


# ------------------------------------------------------------------------------------------ TRACE
def test_trace_token_weights_hand_made_batch():
    topk = {
        0: torch.tensor([[1, 0], [2, 3], [1, 2], [0, 3], [1, 2]]),
        1: torch.tensor([[2, 0], [0, 1], [3, 1], [2, 1], [2, 3]]),
    }
    critical = {0: {1: 3.0}, 1: {2: 20.0}}  # layer 1's ratio is capped at w_max = 10
    mask = torch.tensor([1, 1, 1, 1, 0])
    # raw: t0 hits both → 1 + 2 + 9 = 12; t1 none → 1; t2 hits (0,1) → 3; t3 hits (1,2) → 10; t4 masked.
    raw = np.array([12.0, 1.0, 3.0, 10.0])
    expected = np.append(raw / raw.mean(), 0.0)
    got = trace_token_weights(topk, critical, mask, w_max=10.0)
    assert got.tolist() == pytest.approx(expected.tolist(), rel=1e-6)
    assert got[:4].mean().item() == pytest.approx(1.0, rel=1e-6)
    assert not got.requires_grad


def test_trace_token_weights_clip_after_normalising():
    topk = {0: torch.tensor([[0, 1]] + [[2, 3]] * 9), 1: torch.tensor([[0, 1]] + [[2, 3]] * 9)}
    critical = {0: {0: 4.0}, 1: {1: 4.0}}
    # raw: token 0 = 1 + 3 + 3 = 7, nine tokens at 1; mean 1.6 → 4.375 and 0.625; clip at w_max = 4.
    got = trace_token_weights(topk, critical, torch.ones(10), w_max=4.0)
    assert got[0].item() == pytest.approx(4.0)
    assert got[1:].tolist() == pytest.approx([1 / 1.6] * 9, rel=1e-6)


def test_trace_token_weights_errors():
    with pytest.raises(MoEUnlearnError, match="recorded layers"):
        trace_token_weights({0: torch.zeros(2, 1, dtype=torch.long)}, {1: {0: 2.0}}, torch.ones(2))
    with pytest.raises(MoEUnlearnError, match="w_max"):
        trace_token_weights({}, {}, torch.ones(2), w_max=0.5)


def test_routing_share_plain_and_weighted():
    topk = torch.tensor([[0, 1], [1, 2], [2, 3], [1, 3]])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert routing_share(topk, 1, mask).item() == pytest.approx(2 / 3)
    w = torch.tensor([2.0, 0.5, 0.5, 9.0])
    assert routing_share(topk, 1, mask, w).item() == pytest.approx(2.5 / 3.0)


def test_trace_builtin_aligns_routing_with_predictions():
    labels = torch.tensor([[7, 8, 9, -100]])  # predictions at positions 0, 1 are counted; 2 predicts -100
    topk = {0: torch.tensor([[1, 0], [2, 3], [0, 1], [1, 2]])}
    ctx = LossContext(
        forget_batch={"labels": labels},
        retain_batch={"labels": labels},
        retain_topk=topk,
        critical_ratios={0: {1: 3.0}},
    )
    w = get_loss("trace", kind="weighting")(ctx)
    # routing frame: counted positions 0 and 1, raw 3 and 1 → 1.5, 0.5; moved to label positions 1 and 2.
    assert w.shape == labels.shape
    assert w.tolist() == [pytest.approx([0.0, 1.5, 0.5, 0.0])]
    ctx.retain_token_weights = w
    shares = trace_retain_shares(ctx)
    assert shares[(0, 1)].item() == pytest.approx(1.5 / 2.0)


# --------------------------------------------------------------------------- built-ins through ctx
def _ctx(**kw) -> LossContext:
    torch.manual_seed(5)
    labels = torch.tensor([[-100, 1, 2, 0], [-100, 3, -100, 1]])
    batch = {"input_ids": labels.clamp_min(0), "attention_mask": torch.ones_like(labels), "labels": labels}
    base = dict(forget_batch=batch, retain_batch=dict(batch), forget_logits=torch.randn(2, 4, 5),
                retain_logits=torch.randn(2, 4, 5))
    base.update(kw)
    return LossContext(**base)


def test_builtins_call_the_functionals_with_config_settings():
    ref = torch.randn(2, 4, 5)
    ctx = _ctx(reference_logits=lambda split: ref, config=SimpleNamespace(npo_beta=0.3))
    labels = ctx.forget_batch["labels"]
    nll_sum, n = sequence_nll(ctx.forget_logits, labels)
    ref_sum, _ = sequence_nll(ref, labels)
    assert get_loss("npo")(ctx).item() == pytest.approx(npo_loss(nll_sum, ref_sum, 0.3).item())
    assert get_loss("simnpo")(ctx).item() == pytest.approx(simnpo_loss(nll_sum, n, 4.5, 0.0).item())
    assert get_loss("kl")(ctx).item() == pytest.approx(kl_loss(ctx.retain_logits, ref, labels).item())
    assert get_loss("nll")(ctx).item() == pytest.approx(nll_loss(ctx.retain_logits, labels).item())


def test_rmu_builtin_builds_control_vector_from_config():
    hidden = torch.randn(2, 4, 8)
    ctx = _ctx(hidden_states=lambda split, reference: hidden * (0 if reference else 1),
               config=SimpleNamespace(rmu_steering_coeff=3.0, rmu_seed=1))
    got = get_loss("rmu")(ctx).item()
    control = rmu_control_vector(8, 3.0, 1)
    assert torch.equal(ctx.rmu_control, control)
    assert got == pytest.approx(rmu_forget_loss(hidden, control, LossContext.token_mask(ctx.forget_batch)).item())
    ctx.retain_token_weights = torch.ones(2, 4)
    with pytest.raises(MoEUnlearnError, match="'rmu_retain' cannot use them"):
        get_loss("rmu_retain")(ctx)


def test_seuf_anchor_builtin_sums_layers():
    r0, r1 = torch.randn(8, 4), torch.randn(8, 4)
    ctx = _ctx(router_logits={0: r0, 1: r1}, selected_experts={0: [2], 1: [0, 1]},
               config=SimpleNamespace(anchor_reduction="code"))
    mask = LossContext.token_mask(ctx.forget_batch).reshape(-1)
    expected = seuf_anchor_loss(r0, [2], mask, reduction="code") + seuf_anchor_loss(r1, [0, 1], mask, reduction="code")
    assert get_loss("seuf_anchor", kind="router")(ctx).item() == pytest.approx(expected.item())


def test_idk_builtin_is_nll_on_idk_answer():
    idk_logits = torch.randn(2, 4, 5)
    ctx = _ctx(idk_logits=lambda: idk_logits)
    ctx.forget_batch["idk_labels"] = torch.tensor([[-100, -100, 4, 4], [-100, 2, 2, -100]])
    assert get_loss("idk")(ctx).item() == pytest.approx(nll_loss(idk_logits, ctx.forget_batch["idk_labels"]).item())


# ------------------------------------------------------------------------------ context / registry
def test_require_says_what_is_missing_and_what_to_do():
    ctx = _ctx()
    with pytest.raises(MoEUnlearnError, match="loss 'npo' needs a reference model: .*frozen reference"):
        get_loss("npo")(ctx)
    with pytest.raises(MoEUnlearnError, match="loss 'idk' needs 'I don't know' answers"):
        ctx.require("idk", loss="idk")
    with pytest.raises(MoEUnlearnError, match="Unknown requirement"):
        ctx.require("telepathy")


def test_setting_reads_config_then_defaults():
    ctx = _ctx(config=SimpleNamespace(npo_beta=0.7))
    assert ctx.setting("npo_beta") == 0.7
    assert ctx.setting("simnpo_beta") == 4.5
    with pytest.raises(MoEUnlearnError, match="Unknown loss setting"):
        ctx.setting("no_such_knob")


def test_unknown_name_lists_registered_of_that_kind():
    with pytest.raises(MoEUnlearnError) as err:
        get_loss("foo", kind="forget")
    msg = str(err.value)
    assert "Unknown forget loss 'foo'" in msg
    assert "Registered: ga, npo, simnpo, rmu, idk" in msg and "@register_loss" in msg
    with pytest.raises(MoEUnlearnError, match="'nll' is a retain loss"):
        get_loss("nll", kind="forget")
    with pytest.raises(MoEUnlearnError, match="Unknown loss kind"):
        list_losses("sideways")


def test_builtin_kinds_and_requirements():
    assert list_losses("retain") == ["nll", "kl", "rmu_retain"]
    assert list_losses("router") == ["seuf_anchor"] and list_losses("weighting") == ["trace"]
    assert "reference" in get_loss_spec("npo").requires and "hidden" in get_loss_spec("rmu").requires
    assert "none" not in list_losses()


def test_duplicate_registration_raises_unless_override():
    with pytest.raises(MoEUnlearnError, match="already registered"):
        register_loss("ga", kind="forget")(lambda ctx: torch.tensor(0.0))
    with pytest.raises(MoEUnlearnError, match="Unknown requirement"):
        register_loss("x", kind="forget", requires=("oracle",))
    with pytest.raises(MoEUnlearnError, match="Unknown loss kind"):
        register_loss("x", kind="sideways")


def test_user_registers_custom_function_and_class():
    @register_loss("ga_clipped_test", kind="forget", requires=("forget_logits",))
    def ga_clipped(ctx):
        return ga_loss(ctx.forget_logits, ctx.forget_batch["labels"]).clamp_min(-0.5)

    @register_loss("scaled_nll_test", kind="retain")
    class ScaledNLL:
        def __init__(self):
            self.calls = 0

        def __call__(self, ctx):
            self.calls += 1
            return 2.0 * nll_loss(ctx.retain_logits, ctx.retain_batch["labels"])

    try:
        ctx = _ctx()
        assert "ga_clipped_test" in list_losses("forget")
        assert get_loss("ga_clipped_test", kind="forget")(ctx).item() >= -0.5
        scaled = get_loss("scaled_nll_test", kind="retain")
        assert isinstance(scaled.fn, ScaledNLL)
        assert scaled(ctx).item() == pytest.approx(2 * get_loss("nll")(ctx).item())
        assert scaled.fn.calls == 1
        register_loss("ga_clipped_test", kind="forget", override=True)(lambda ctx: torch.ones(3))
        with pytest.raises(MoEUnlearnError, match="must return a scalar"):
            get_loss("ga_clipped_test")(ctx)
    finally:
        unregister_loss("ga_clipped_test")
        unregister_loss("scaled_nll_test")
    assert "ga_clipped_test" not in list_losses()


def test_prediction_mask():
    assert prediction_mask(torch.tensor([[-100, 1, -100, 3]])).tolist() == [[1.0, 0.0, 1.0, 0.0]]


def test_seuf_anchor_gradient_pulls_router_towards_selected_expert():
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.5, 0.2, 0.1, 0.0]], requires_grad=True)
    loss = seuf_anchor_loss(logits, 2, torch.ones(2))
    loss.backward()
    stepped = (logits - 1.0 * logits.grad).detach()
    assert seuf_anchor_loss(stepped, 2, torch.ones(2)) < loss
    assert (logits.grad[:, 2] < 0).all()  # descending raises the selected expert's logit
