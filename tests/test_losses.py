"""Tests for hf_moe_unlearn.losses: every formula against a value computed by hand (math/numpy)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hf_moe_unlearn.errors import MoEUnlearnError
from hf_moe_unlearn.losses import (
    LOSS_DEFAULTS,
    LossContext,
    dpo_loss,
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


def hand_anchor(logits, topk, expert, mask, masked=True, sigmoid=False, reduction="paper") -> float:
    """SEUF anchor by explicit loops: p = softmax (or normalised sigmoid); g = p masked to the token's top-k
    (not renormalised) when ``masked``; mean over counted tokens of Σ_e (g_e − onehot_e)² (/E for "code")."""
    total, count = 0.0, 0.0
    for z, top, m in zip(logits, topk, mask):
        s = [1.0 / (1.0 + math.exp(-v)) for v in z] if sigmoid else [math.exp(v) for v in z]
        p = [v / sum(s) for v in s]
        g = [p[e] if (not masked or e in top) else 0.0 for e in range(len(z))]
        dist = sum((g[e] - (1.0 if e == expert else 0.0)) ** 2 for e in range(len(z)))
        total += m * (dist if reduction == "paper" else dist / len(z))
        count += m
    return total / max(count, 1.0)


def hand_sequence_nll(logits, labels) -> float:
    """Σ over counted targets t ≥ 1 of −log softmax(logits[t−1])[labels[t]], by explicit loops."""
    total = 0.0
    for t in range(1, len(labels)):
        if labels[t] == -100:
            continue
        z = logits[t - 1]
        total += math.log(sum(math.exp(v) for v in z)) - z[labels[t]]
    return total


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


def test_dpo_loss_matches_hand_formula():
    beta = 0.5
    win, win_ref, lose, lose_ref = [3.0, 1.0], [4.0, 1.5], [2.0, 6.0], [2.5, 5.0]
    expected = -(2 / beta) * np.mean([
        log_sigmoid(beta * (-(w - wr) - (-(l - lr)))) for w, wr, l, lr in zip(win, win_ref, lose, lose_ref)
    ])
    got = dpo_loss(torch.tensor(win), torch.tensor(win_ref), torch.tensor(lose), torch.tensor(lose_ref), beta)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_dpo_at_reference_is_two_over_beta_log_two():
    win, lose = torch.tensor([3.0, 9.0]), torch.tensor([5.0, 0.5])
    for beta in (0.1, 2.0):
        got = dpo_loss(win, win.clone(), lose, lose.clone(), beta).item()
        assert got == pytest.approx(2 / beta * math.log(2), rel=1e-6)


def test_dpo_signs_reward_idk_and_punish_forget_answer():
    beta, ref = 0.1, torch.tensor([4.0])
    at_ref = dpo_loss(ref, ref, ref, ref, beta)
    # raising the IDK (win) likelihood = lowering its NLL lowers the loss
    assert dpo_loss(torch.tensor([3.0]), ref, ref, ref, beta) < at_ref
    # raising the true forget answer's (lose) likelihood raises the loss
    assert dpo_loss(ref, ref, torch.tensor([3.0]), ref, beta) > at_ref
    win = torch.tensor([4.0], requires_grad=True)
    lose = torch.tensor([4.0], requires_grad=True)
    win_ref = torch.tensor([4.0], requires_grad=True)
    dpo_loss(win, win_ref, lose, ref, beta).backward()
    assert win.grad.item() > 0 and lose.grad.item() < 0  # descent lowers the IDK NLL, raises the forget NLL
    assert win_ref.grad is None  # the reference is detached


def test_dpo_without_winner_term_is_npo():
    lose, lose_ref = torch.tensor([6.0, 2.0]), torch.tensor([3.0, 4.0])
    same = torch.tensor([1.0, 7.0])  # win at the reference: win_log_ratio = 0, as compute_dpo_loss(win_inputs=None)
    got = dpo_loss(same, same.clone(), lose, lose_ref, 0.3).item()
    assert got == pytest.approx(npo_loss(lose, lose_ref, 0.3).item(), rel=1e-6)


def test_dpo_rejects_bad_shapes_and_beta():
    one = torch.zeros(2)
    with pytest.raises(MoEUnlearnError, match="four \\[B\\] tensors"):
        dpo_loss(one, one, torch.zeros(3), torch.zeros(3), 0.1)
    with pytest.raises(MoEUnlearnError, match="beta"):
        dpo_loss(one, one, one, one, -1.0)


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
def test_seuf_anchor_full_form_paper_matches_hand_and_code_is_paper_over_E():
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    mask = torch.tensor([1.0, 1.0, 0.0])
    g = np.exp(np_log_softmax(logits.numpy()))
    onehot = np.array([0.0, 1.0, 0.0, 0.0])
    per_token = ((g - onehot) ** 2).sum(-1)
    expected = (per_token[0] + per_token[1]) / 2
    paper = seuf_anchor_loss(logits, 1, mask, reduction="paper", form="full_softmax").item()
    code = seuf_anchor_loss(logits, 1, mask, reduction="code", form="full_softmax").item()
    assert paper == pytest.approx(expected, rel=1e-6)
    assert code == pytest.approx(paper / 4, rel=1e-6)


# Four tokens, E = 4, k = 2. Row 1's top-k is not its two largest logits: the mask must come from the given
# indices (the model's actual choice), never from a top-k recomputed here. Row 3 is padding.
ANCHOR_LOGITS = [[1.0, 0.0, -1.0, 2.0], [0.5, -0.5, 1.5, 0.0], [0.3, 0.2, 0.1, 0.0], [9.0, 9.0, 9.0, 9.0]]
ANCHOR_TOPK = [[3, 0], [1, 3], [0, 1], [2, 3]]
ANCHOR_MASK = [1.0, 1.0, 1.0, 0.0]


def test_seuf_anchor_masked_form_matches_hand_for_both_reductions():
    logits, topk, mask = torch.tensor(ANCHOR_LOGITS), torch.tensor(ANCHOR_TOPK), torch.tensor(ANCHOR_MASK)
    for reduction in ("paper", "code"):
        expected = hand_anchor(ANCHOR_LOGITS, ANCHOR_TOPK, 1, ANCHOR_MASK, reduction=reduction)
        got = seuf_anchor_loss(logits, 1, mask, reduction=reduction, form="masked_softmax", topk_indices=topk)
        assert got.item() == pytest.approx(expected, rel=1e-6)
    # the paper's form is the default, and it really differs from the full distribution here
    default = seuf_anchor_loss(logits, 1, mask, topk_indices=topk).item()
    assert default == pytest.approx(hand_anchor(ANCHOR_LOGITS, ANCHOR_TOPK, 1, ANCHOR_MASK), rel=1e-6)
    full = hand_anchor(ANCHOR_LOGITS, ANCHOR_TOPK, 1, ANCHOR_MASK, masked=False)
    assert default != pytest.approx(full, rel=1e-3)


def test_seuf_anchor_masked_sigmoid_router_matches_hand():
    logits, topk, mask = torch.tensor(ANCHOR_LOGITS), torch.tensor(ANCHOR_TOPK), torch.tensor(ANCHOR_MASK)
    expected = hand_anchor(ANCHOR_LOGITS, ANCHOR_TOPK, 2, ANCHOR_MASK, sigmoid=True)
    got = seuf_anchor_loss(logits, 2, mask, score_fn="sigmoid", topk_indices=topk).item()
    assert got == pytest.approx(expected, rel=1e-6)
    full = hand_anchor(ANCHOR_LOGITS, ANCHOR_TOPK, 2, ANCHOR_MASK, sigmoid=True, masked=False)
    assert seuf_anchor_loss(logits, 2, mask, score_fn="sigmoid", form="full_softmax").item() == pytest.approx(full)


def test_seuf_anchor_masked_form_pulls_back_token_outside_its_topk():
    z = [2.0, 1.0, 0.5, -1.0]
    target, top = 3, [0, 1]  # e* = 3 is not in the token's top-k, so g[e*] = 0
    logits = torch.tensor([z], requires_grad=True)
    seuf_anchor_loss(logits, target, torch.ones(1), topk_indices=torch.tensor([top])).backward()
    p = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
    expected = -2 * p[target] * sum(p[j] ** 2 for j in top)  # −2 p_{e*} Σ_{j∈topk} g_j²
    assert logits.grad[0, target].item() < 0  # gradient descent raises e*'s logit
    assert logits.grad[0, target].item() == pytest.approx(expected, rel=1e-5)


def test_seuf_anchor_masked_sigmoid_gradient_outside_topk_matches_hand():
    z = [2.0, 1.0, 0.5, -1.0]
    target, top = 3, [0, 1]
    logits = torch.tensor([z], requires_grad=True)
    seuf_anchor_loss(logits, target, torch.ones(1), score_fn="sigmoid", topk_indices=torch.tensor([top])).backward()
    s = [1 / (1 + math.exp(-v)) for v in z]
    total = sum(s)
    # L = Σ_{j∈topk} (s_j/S)² + 1; ∂(s_j/S)/∂z_{e*} = −s_j σ'(z_{e*}) / S² for j ≠ e*
    ds = s[target] * (1 - s[target])
    expected = sum(2 * (s[j] / total) * (-s[j] * ds / total**2) for j in top)
    assert logits.grad[0, target].item() < 0
    assert logits.grad[0, target].item() == pytest.approx(expected, rel=1e-5)


def test_seuf_anchor_gradient_pulls_router_towards_selected_expert():
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.5, 0.2, 0.1, 0.0]], requires_grad=True)
    for form, topk in (("full_softmax", None), ("masked_softmax", torch.tensor([[3, 2], [0, 1]]))):
        logits.grad = None
        loss = seuf_anchor_loss(logits, 2, torch.ones(2), form=form, topk_indices=topk)
        loss.backward()
        stepped = (logits - 1.0 * logits.grad).detach()
        assert seuf_anchor_loss(stepped, 2, torch.ones(2), form=form, topk_indices=topk) < loss
        assert (logits.grad[:, 2] < 0).all()  # descending raises the selected expert's logit


def test_seuf_anchor_several_experts_is_average_and_sigmoid_normalised():
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0]])
    mask = torch.ones(1)
    both = seuf_anchor_loss(logits, [0, 3], mask, form="full_softmax").item()
    single = [seuf_anchor_loss(logits, e, mask, form="full_softmax").item() for e in (0, 3)]
    assert both == pytest.approx(sum(single) / 2, rel=1e-6)
    topk = torch.tensor([[3, 1]])
    both = seuf_anchor_loss(logits, [0, 3], mask, topk_indices=topk).item()
    expected = (hand_anchor([[1.0, 0.0, -1.0, 2.0]], [[3, 1]], 0, [1.0])
                + hand_anchor([[1.0, 0.0, -1.0, 2.0]], [[3, 1]], 3, [1.0])) / 2
    assert both == pytest.approx(expected, rel=1e-6)
    s = 1 / (1 + np.exp(-logits.numpy()[0]))
    g = s / s.sum()
    expected = ((g - np.array([0.0, 0.0, 0.0, 1.0])) ** 2).sum()
    got = seuf_anchor_loss(logits, 3, mask, score_fn="sigmoid", form="full_softmax").item()
    assert got == pytest.approx(expected, rel=1e-6)


def test_seuf_anchor_is_zero_at_target_and_rejects_bad_expert():
    logits = torch.tensor([[-50.0, 50.0, -50.0]])
    topk = torch.tensor([[1, 0]])
    assert seuf_anchor_loss(logits, 1, torch.ones(1), topk_indices=topk).item() == pytest.approx(0.0, abs=1e-8)
    assert seuf_anchor_loss(logits, 1, torch.ones(1), form="full_softmax").item() == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(MoEUnlearnError, match=r"\[0, 3\)"):
        seuf_anchor_loss(logits, 3, torch.ones(1), topk_indices=topk)


def test_seuf_anchor_form_and_topk_errors():
    logits, mask = torch.zeros(2, 4), torch.ones(2)
    with pytest.raises(MoEUnlearnError, match="needs topk_indices"):
        seuf_anchor_loss(logits, 1, mask)
    for bad in (torch.zeros(3, 2, dtype=torch.long), torch.zeros(2, dtype=torch.long), torch.zeros(2, 2)):
        with pytest.raises(MoEUnlearnError, match="topk_indices must be an integer tensor \\[N, k\\] with N = 2"):
            seuf_anchor_loss(logits, 1, mask, topk_indices=bad)
    with pytest.raises(MoEUnlearnError, match="anchor form must be one of masked_softmax, full_softmax; got 'topk'"):
        seuf_anchor_loss(logits, 1, mask, form="topk")
    with pytest.raises(MoEUnlearnError, match="anchor reduction must be one of paper, code"):
        seuf_anchor_loss(logits, 1, mask, reduction="sum", form="full_softmax")


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
    k0, k1 = torch.randint(4, (8, 2)), torch.randint(4, (8, 2))
    ctx = _ctx(router_logits={0: r0, 1: r1}, forget_topk={0: k0, 1: k1}, selected_experts={0: [2], 1: [0, 1]},
               score_fn={0: "softmax", 1: "sigmoid"}, config=SimpleNamespace(anchor_reduction="code"))
    mask = LossContext.token_mask(ctx.forget_batch).reshape(-1)
    expected = (seuf_anchor_loss(r0, [2], mask, reduction="code", topk_indices=k0)
                + seuf_anchor_loss(r1, [0, 1], mask, "sigmoid", reduction="code", topk_indices=k1))
    assert get_loss("seuf_anchor", kind="router")(ctx).item() == pytest.approx(expected.item())


def test_seuf_anchor_builtin_defaults_to_paper_form_with_forget_topk():
    assert LOSS_DEFAULTS["anchor_form"] == "masked_softmax" and LOSS_DEFAULTS["anchor_reduction"] == "paper"
    logits = torch.tensor(ANCHOR_LOGITS * 2)  # N = B·T = 8 rows for the 2×4 batch of _ctx
    topk = torch.tensor(ANCHOR_TOPK * 2)
    ctx = _ctx(router_logits={3: logits}, forget_topk={3: topk}, selected_experts={3: [1]}, score_fn={3: "softmax"})
    mask = LossContext.token_mask(ctx.forget_batch).reshape(-1).tolist()
    anchor = get_loss("seuf_anchor", kind="router")
    expected = hand_anchor(ANCHOR_LOGITS * 2, ANCHOR_TOPK * 2, 1, mask)
    assert anchor(ctx).item() == pytest.approx(expected, rel=1e-6)
    ctx.config = SimpleNamespace(anchor_form="full_softmax", anchor_reduction="code")  # the public code's anchor
    expected = hand_anchor(ANCHOR_LOGITS * 2, ANCHOR_TOPK * 2, 1, mask, masked=False, reduction="code")
    assert anchor(ctx).item() == pytest.approx(expected, rel=1e-6)


def test_seuf_anchor_builtin_errors_without_topk_or_score_fn():
    anchor = get_loss("seuf_anchor", kind="router")
    ctx = _ctx(router_logits={0: torch.randn(8, 4)}, selected_experts={0: [1]}, score_fn={0: "softmax"})
    with pytest.raises(MoEUnlearnError, match="anchor_form='masked_softmax' needs .*ctx.forget_topk"):
        anchor(ctx)
    ctx.config = SimpleNamespace(anchor_form="full_softmax")
    assert torch.isfinite(anchor(ctx))  # the full form needs no top-k
    ctx.score_fn = {}
    with pytest.raises(MoEUnlearnError, match="No score_fn for layer 0"):
        anchor(ctx)


def test_idk_nll_builtin_is_hand_nll_on_idk_answer():
    idk_logits = torch.randn(2, 4, 5)
    idk_labels = [[-100, -100, 4, 4], [-100, 2, 2, -100]]
    ctx = _ctx(idk_logits=lambda: idk_logits)
    ctx.forget_batch["idk_labels"] = torch.tensor(idk_labels)
    rows = idk_logits.tolist()
    expected = sum(hand_sequence_nll(z, y) for z, y in zip(rows, idk_labels)) / 4  # 4 counted IDK targets
    assert get_loss("idk_nll")(ctx).item() == pytest.approx(expected, rel=1e-5)


def test_idk_dpo_builtin_on_tiny_logits_matches_hand_log_probs():
    # B = 1, T = 3, V = 3. Forget answer labels [-, 1, 2]; IDK answer labels [-, 0, 0].
    forget_logits = [[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [3.0, 1.0, 2.0]]
    forget_ref = [[0.5, 0.0, 0.0], [1.0, -1.0, 2.0], [0.0, 0.0, 0.0]]
    idk_logits = [[2.0, 0.0, 1.0], [1.0, 1.0, -1.0], [0.0, 0.0, 0.0]]
    idk_ref = [[0.0, 1.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.0]]
    labels, idk_labels = [-100, 1, 2], [-100, 0, 0]
    refs = {"forget": torch.tensor([forget_ref]), "idk": torch.tensor([idk_ref])}
    asked: list[str] = []

    def reference(split: str) -> torch.Tensor:
        asked.append(split)
        return refs[split]

    beta = 0.5
    batch = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "labels": torch.tensor([labels]), "idk_labels": torch.tensor([idk_labels])}
    ctx = LossContext(forget_batch=batch, forget_logits=torch.tensor([forget_logits]), reference_logits=reference,
                      idk_logits=lambda: torch.tensor([idk_logits]), config=SimpleNamespace(idk_dpo_beta=beta))
    win_ratio = -(hand_sequence_nll(idk_logits, idk_labels) - hand_sequence_nll(idk_ref, idk_labels))
    lose_ratio = -(hand_sequence_nll(forget_logits, labels) - hand_sequence_nll(forget_ref, labels))
    expected = -(2 / beta) * log_sigmoid(beta * (win_ratio - lose_ratio))
    assert get_loss("idk_dpo", kind="forget")(ctx).item() == pytest.approx(expected, rel=1e-5)
    assert sorted(asked) == ["forget", "idk"]
    assert LOSS_DEFAULTS["idk_dpo_beta"] == 0.1
    ctx.config = None  # default β = 0.1
    expected = -(2 / 0.1) * log_sigmoid(0.1 * (win_ratio - lose_ratio))
    assert get_loss("idk_dpo")(ctx).item() == pytest.approx(expected, rel=1e-5)
    ctx.reference_logits = None
    with pytest.raises(MoEUnlearnError, match="loss 'idk_dpo' needs a reference model"):
        get_loss("idk_dpo")(ctx)


def test_old_idk_name_says_what_replaced_it():
    with pytest.raises(MoEUnlearnError, match="Unknown forget loss 'idk'.*'idk_nll'.*'idk_dpo'"):
        get_loss("idk", kind="forget")


# ------------------------------------------------------------------------------ context / registry
def test_require_says_what_is_missing_and_what_to_do():
    ctx = _ctx()
    with pytest.raises(MoEUnlearnError, match="loss 'npo' needs a reference model: .*frozen reference"):
        get_loss("npo")(ctx)
    with pytest.raises(MoEUnlearnError, match="loss 'idk_nll' needs 'I don't know' answers"):
        get_loss("idk_nll")(ctx)
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
    assert "Registered: ga, npo, simnpo, rmu, idk_nll, idk_dpo" in msg and "@register_loss" in msg
    with pytest.raises(MoEUnlearnError, match="'nll' is a retain loss"):
        get_loss("nll", kind="forget")
    with pytest.raises(MoEUnlearnError, match="Unknown loss kind"):
        list_losses("sideways")


def test_builtin_kinds_and_requirements():
    assert list_losses("retain") == ["nll", "kl", "rmu_retain"]
    assert list_losses("router") == ["seuf_anchor"] and list_losses("weighting") == ["trace"]
    assert "reference" in get_loss_spec("npo").requires and "hidden" in get_loss_spec("rmu").requires
    assert get_loss_spec("idk_dpo").requires == ("forget_logits", "reference", "idk")
    assert get_loss_spec("idk_nll").requires == ("idk",)
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
