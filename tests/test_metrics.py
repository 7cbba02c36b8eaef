"""Metrics against hand-computed references: unbatched forward passes of a tiny random MoE LM, fixed
numbers, and the reference libraries (rouge_score, scipy, sklearn)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from _tiny_tokenizer import char_tokenizer, tiny_moe_lm
from rouge_score import rouge_scorer
from scipy.stats import hmean, ks_2samp

from hf_moe_unlearn.errors import MoEUnlearnError
from hf_moe_unlearn.evaluation import (
    answer_probability,
    exact_memorization,
    exact_memorization_from_ids,
    extraction_strength,
    extraction_strength_from_ids,
    forget_quality,
    get_metric,
    knowmem,
    list_metrics,
    mcq_accuracy,
    mia_auc,
    min_k,
    min_k_from_logprobs,
    min_k_prob,
    model_utility,
    perplexity,
    plot_tradeoff,
    privleak,
    register_metric,
    results_table,
    rouge_l,
    truth_ratio,
    verbmem,
)
from hf_moe_unlearn.evaluation.prompts import KNOWMEM_STOP_STRINGS, knowmem_prompt, letters_prompt
from hf_moe_unlearn.evaluation.scoring import (
    EncodedPair,
    choice_loglikelihoods,
    cut_at_stop_strings,
    encode_pair,
    generate_greedy,
    score_continuations,
    score_encoded,
)
from hf_moe_unlearn.evaluation.tofu import aggregate_truth_ratios, truth_ratio_from_nll


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def lm():
    return tiny_moe_lm()


# ------------------------------------------------------------------------------ hand references


def hand_token_logprobs(model, tok, prompt: str, continuation: str, add_special_tokens: bool = True) -> torch.Tensor:
    """Log-probs of the continuation's tokens from one unpadded forward pass of prompt + continuation."""
    context = tok(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    whole = tok(prompt + continuation, add_special_tokens=add_special_tokens)["input_ids"]
    assert whole[: len(context)] == context
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0]
    log_probs = torch.log_softmax(logits[len(context) - 1 : -1].float(), dim=-1)
    return log_probs.gather(-1, torch.tensor(whole[len(context) :])[:, None]).squeeze(-1)


def hand_mean_nll(model, tok, prompt, continuation, add_special_tokens=True) -> float:
    return -float(hand_token_logprobs(model, tok, prompt, continuation, add_special_tokens).mean())


def hand_greedy(model, tok, prompt: str, max_new_tokens: int) -> str:
    """Unbatched, unpadded greedy generation."""
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


QUESTIONS = [
    {"question": "Which port does HTTPS use?", "choices": ["21", "80", "443", "8080"], "answer": 2},
    {"question": "What is 2+2?", "choices": ["3", "4", "5", "22"], "answer": 1},
    {"question": "Pick the hash function.", "choices": ["AES", "RSA", "DH", "SHA-256"], "answer": 3},
    {"question": "Sky colour on a clear day?", "choices": ["blue", "green", "red", "black"], "answer": 0},
]


# ---------------------------------------------------------------------------------------- MCQ


def test_mcq_letters_matches_argmax_of_letter_logits(lm, tok):
    letter_ids = [tok(f" {letter}", add_special_tokens=False)["input_ids"] for letter in "ABCD"]
    assert all(len(ids) == 1 for ids in letter_ids)  # the single-token shortcut is exercised
    hand_predictions = []
    for row in QUESTIONS:
        prompt = letters_prompt(row["question"], row["choices"], "cybersecurity")
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            last = lm(torch.tensor([ids])).logits[0, -1]
        hand_predictions.append(int(torch.argmax(last[[i[0] for i in letter_ids]])))
    # Make exactly half of the gold answers agree with the model, so accuracy must come out 0.5.
    rows = [
        dict(row, answer=pred if i % 2 == 0 else (pred + 1) % 4)
        for i, (row, pred) in enumerate(zip(QUESTIONS, hand_predictions))
    ]
    result = mcq_accuracy(lm, tok, rows, subject="cybersecurity", batch_size=3)
    assert result["predictions"] == hand_predictions
    assert result["correct"] == [1.0, 0.0, 1.0, 0.0]
    assert result["accuracy"] == 0.5
    assert result["chance"] == 0.25
    json.dumps(result)


def test_single_token_shortcut_equals_full_scoring(lm, tok):
    prompts = [letters_prompt(r["question"], r["choices"]) for r in QUESTIONS]
    letters = [[" A", " B", " C", " D"]] * len(prompts)
    fast = choice_loglikelihoods(lm, tok, prompts, letters, add_special_tokens=False)
    flat = score_continuations(
        lm, tok, [p for p in prompts for _ in "ABCD"], [c for cs in letters for c in cs], add_special_tokens=False
    )
    slow = [[flat[4 * q + j].sum_logprob for j in range(4)] for q in range(len(prompts))]
    assert torch.allclose(torch.tensor(fast), torch.tensor(slow), atol=1e-5)


def test_mcq_choices_mode_acc_and_acc_norm_by_hand(lm, tok):
    expected_acc, expected_norm = [], []
    for row in QUESTIONS:
        prompt = f"Question: {row['question']}\nAnswer:"
        lls = [float(hand_token_logprobs(lm, tok, prompt, f" {c}", False).sum()) for c in row["choices"]]
        normed = [ll / len(c) for ll, c in zip(lls, row["choices"])]
        expected_acc.append(float(max(range(4), key=lambda i: lls[i]) == row["answer"]))
        expected_norm.append(float(max(range(4), key=lambda i: normed[i]) == row["answer"]))
    result = mcq_accuracy(lm, tok, QUESTIONS, mode="choices", batch_size=5)
    assert result["correct"] == expected_acc
    assert result["accuracy"] == pytest.approx(sum(expected_acc) / 4)
    assert result["acc_norm"] == pytest.approx(sum(expected_norm) / 4)


def test_mcq_rejects_bad_rows_and_modes(lm, tok):
    with pytest.raises(MoEUnlearnError, match="lacks \\['answer'\\]"):
        mcq_accuracy(lm, tok, [{"question": "q", "choices": ["a", "b"]}])
    with pytest.raises(MoEUnlearnError, match="index"):
        mcq_accuracy(lm, tok, [{"question": "q", "choices": ["a", "b"], "answer": 2}])
    with pytest.raises(MoEUnlearnError, match="letters, choices"):
        mcq_accuracy(lm, tok, QUESTIONS, mode="logits")


# ------------------------------------------------------------------------------ scoring plumbing


def test_batched_right_padded_scoring_equals_unpadded_forward(lm, tok):
    prompts = ["Q: who?\nA:", "Hi", "The quick brown fox jumps over"]
    answers = [" nobody at all", " there", " the lazy dog"]
    batched = score_continuations(lm, tok, prompts, answers, batch_size=3)
    for score, prompt, answer in zip(batched, prompts, answers):
        assert torch.allclose(score.token_logprobs, hand_token_logprobs(lm, tok, prompt, answer), atol=1e-5)


def test_encode_pair_moves_trailing_space_and_scores_texts_from_bos(tok):
    pair = encode_pair(tok, "Answer: ", "A")  # lm-eval: the space belongs to the continuation
    assert tok.convert_ids_to_tokens(list(pair.continuation)) == [" A"]
    text = encode_pair(tok, "", "abc")
    assert list(text.context) == [tok.bos_token_id]
    assert tok.decode(list(text.continuation)) == "abc"
    with pytest.raises(MoEUnlearnError, match="nothing to score"):
        score_continuations(None, tok, ["prompt"], [""])


def test_generation_left_padded_batch_equals_unbatched(lm, tok):
    prompts = ["Once upon a time", "Hi", "The wizard raised his wand and", "abc"]
    batched = generate_greedy(lm, tok, prompts, max_new_tokens=10, batch_size=4)
    assert batched == [hand_greedy(lm, tok, p, 10) for p in prompts]


def test_tokenizer_padding_side_and_model_mode_are_untouched(lm, tok):
    results = {}
    for side in ("left", "right"):
        tok.padding_side = side
        results[side] = (
            generate_greedy(lm, tok, ["ab", "abcdef"], max_new_tokens=4, batch_size=2),
            score_continuations(lm, tok, ["ab", "abcdef"], [" x", " yz"], batch_size=2)[1].token_logprobs,
        )
        assert tok.padding_side == side
    assert results["left"][0] == results["right"][0]
    assert torch.equal(results["left"][1], results["right"][1])
    tok.padding_side = "right"


def test_model_modes_are_restored_even_when_the_forward_fails(lm, tok, monkeypatch):
    lm.train()
    lm.model.layers[0].eval()  # a deliberate mix of modes must survive evaluation
    try:
        perplexity(lm, tok, ["hello"])
        assert lm.training and not lm.model.layers[0].training and lm.model.layers[1].training

        def failing_forward(*args, **kwargs):
            assert not lm.training  # evaluation runs in eval mode
            raise RuntimeError("out of memory")

        monkeypatch.setattr(lm, "forward", failing_forward)
        with pytest.raises(RuntimeError, match="out of memory"):
            perplexity(lm, tok, ["hello"])
        assert lm.training and not lm.model.layers[0].training and lm.model.layers[1].training
    finally:
        lm.eval()


# --------------------------------------------------------------------------------------- ROUGE


def test_rouge_l_on_fixed_strings():
    # LCS("the cat sat on the mat", "the cat lay on the mat") = 5 of 6 words.
    assert rouge_l(["the cat lay on the mat"], ["the cat sat on the mat"]) == [pytest.approx(5 / 6)]
    # Reference "a b c d", prediction "a c": LCS 2 -> recall 1/2, precision 1, F1 2/3.
    assert rouge_l(["a c"], ["a b c d"], measure="recall") == [0.5]
    assert rouge_l(["a c"], ["a b c d"], measure="precision") == [1.0]
    assert rouge_l(["a c"], ["a b c d"]) == [pytest.approx(2 / 3)]
    # Stemming (TOFU) makes "running" match "run"; MUSE scores without it.
    assert rouge_l(["he was running"], ["he run"], measure="recall", use_stemmer=True) == [1.0]
    assert rouge_l(["he was running"], ["he run"], measure="recall", use_stemmer=False) == [0.5]
    pred, ref = "Kuwait City is where he was born", "He was born in Kuwait City, Kuwait."
    direct = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(ref, pred)["rougeL"]
    assert rouge_l([pred], [ref], measure="fmeasure", use_stemmer=True) == [direct.fmeasure]


def test_verbmem_is_rouge_of_greedy_continuation_against_truncated_gold(lm, tok):
    prompts = ["It was a bright cold day", "The wizard raised"]
    gold = ["in april, and the clocks were striking thirteen.", "his wand and the door swung open."]
    result = verbmem(lm, tok, prompts, gold, max_new_tokens=12, batch_size=2)
    outputs = [hand_greedy(lm, tok, p, 12) for p in prompts]
    # MUSE truncates the gold continuation to max_new_tokens tokens, BOS included: 11 characters here.
    references = [g[:11] for g in gold]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    expected = [scorer.score(r, o)["rougeL"].fmeasure for r, o in zip(references, outputs)]
    assert result["generations"] == outputs
    assert result["per_example"] == pytest.approx(expected)
    assert result["verbmem"] == pytest.approx(sum(expected) / 2)
    json.dumps(result)


def test_knowmem_uses_muse_prompt_and_stop_strings(lm, tok):
    icl = [{"question": "What opened every Saturday?", "answer": "The village market"}]
    assert knowmem_prompt("Who?", icl) == (
        "Question: What opened every Saturday?\nAnswer: The village market\n\nQuestion: Who?\nAnswer: "
    )
    assert cut_at_stop_strings("Paris\nQuestion: next", KNOWMEM_STOP_STRINGS) == "Paris"
    assert cut_at_stop_strings("Paris\n\nmore", KNOWMEM_STOP_STRINGS) == "Paris"
    questions, answers = ["What did the wizard raise?", "How many strikes?"], ["His wand", "Thirteen"]
    result = knowmem(lm, tok, questions, answers, icl_examples=icl, max_new_tokens=8)
    outputs = [hand_greedy(lm, tok, knowmem_prompt(q, icl), 8) for q in questions]
    outputs = [cut_at_stop_strings(o, KNOWMEM_STOP_STRINGS) for o in outputs]
    assert result["generations"] == outputs
    assert result["per_example"] == rouge_l(outputs, answers)


# ------------------------------------------------------------------------------------------ MIA


def test_min_k_on_fixed_logprobs():
    logprobs = [-1.0, -5.0, -2.0, -8.0, -3.0]
    assert min_k_from_logprobs(logprobs, 0.4) == -6.5  # int(5 * 0.4) = 2 lowest: -8, -5
    assert min_k_from_logprobs(logprobs, 0.1) == -8.0  # at least one token
    assert min_k_from_logprobs(logprobs, 1.0) == pytest.approx(-3.8)
    with pytest.raises(MoEUnlearnError, match="fraction"):
        min_k_from_logprobs(logprobs, 0.0)


def test_min_k_prob_of_model_matches_hand_logprobs(lm, tok):
    texts = ["It was a bright cold day in April.", "short one"]
    scores = min_k_prob(lm, tok, texts, k=0.4, batch_size=2)
    for score, text in zip(scores, texts):
        hand = hand_token_logprobs(lm, tok, "", text)  # every token after BOS
        assert score == pytest.approx(min_k_from_logprobs(hand, 0.4), abs=1e-5)


def test_auc_and_privleak_on_fixed_scores():
    # Pairs (member > non-member): 0.9 beats both, 0.8 beats both, 0.3 beats only 0.1 -> 5 of 6.
    auc = mia_auc([0.9, 0.8, 0.3], [0.5, 0.1])
    assert auc == pytest.approx(5 / 6)
    assert mia_auc([2.0, 3.0], [0.0, 1.0]) == 1.0  # members more likely -> AUC 1
    result = privleak(auc, 0.5)
    assert result["privleak"] == pytest.approx(((1 / 6) - 0.5) / 0.5 * 100)  # -66.7: under-unlearned
    assert privleak(0.5, 0.5)["privleak"] == 0.0
    with pytest.raises(MoEUnlearnError, match="privleak needs the retrained model's AUC.*auc_retrain="):
        privleak(auc)
    with pytest.raises(MoEUnlearnError, match="in \\[0, 1\\]"):
        privleak(1.5, 0.5)


def test_min_k_metric_auc_uses_member_orientation(tok):
    """Members are texts a copy of the tiny LM was fine-tuned on (so it memorised them): the Min-K% AUC must say
    they are members (> 0.5; here 1.0), and equal sklearn's AUC of Min-K% scores computed by hand (sorted token
    log-probs of unpadded forwards, mean of the lowest max(1, int(0.4 n)), higher = member)."""
    from sklearn.metrics import roc_auc_score

    members = ["The red fox ran far.", "Seven owls sang at dawn.", "A tall ship left port.", "Cold rain fell all day."]
    nonmembers = ["The old dog slept in.", "Nine bees flew at noon.", "A small boat came home.", "Warm wind blew all night."]
    model = tiny_moe_lm(seed=3)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        ids = [tok(text)["input_ids"] for text in members]
        model.train()
        for _ in range(10):  # untrained, the AUC of these texts is 0.5; after 10 epochs 1.0
            for row in ids:
                batch = torch.tensor([row])
                loss = model(input_ids=batch, labels=batch).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.eval()
    finally:
        torch.random.set_rng_state(generator_state)

    def hand_min_k(text: str, k: float = 0.4) -> float:
        logprobs = np.sort(hand_token_logprobs(model, tok, "", text).double().numpy())
        return float(logprobs[: max(1, int(k * len(logprobs)))].mean())

    hand_members = [hand_min_k(t) for t in members]
    hand_nonmembers = [hand_min_k(t) for t in nonmembers]
    hand_auc = roc_auc_score([1] * len(members) + [0] * len(nonmembers), hand_members + hand_nonmembers)
    assert hand_auc > 0.9, (hand_members, hand_nonmembers)  # the fine-tuned copy recognises its training texts
    result = min_k(model, tok, members, nonmembers, batch_size=3)
    assert result["member_scores"] == pytest.approx(hand_members, abs=1e-5)
    assert result["nonmember_scores"] == pytest.approx(hand_nonmembers, abs=1e-5)
    assert result["auc"] == pytest.approx(hand_auc)
    json.dumps(result)


# ----------------------------------------------------------------------------------------- TOFU


def test_truth_ratio_on_hand_made_probabilities():
    paraphrased = -(math.log(0.5) + math.log(0.5)) / 2  # per-token probs 0.5, 0.5 -> P = 0.5
    perturbed = [-(2 * math.log(0.25)) / 2, -(math.log(0.5) + math.log(0.125)) / 2]  # both P = 0.25
    assert truth_ratio_from_nll(paraphrased, perturbed) == pytest.approx(0.5)
    ratios = [0.5, 2.0, 1.0]
    assert aggregate_truth_ratios(ratios, "closer_to_1_better") == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert aggregate_truth_ratios(ratios, "true_better") == pytest.approx(0.5 / 3)
    with pytest.raises(MoEUnlearnError, match="closer_to_1_better, true_better"):
        aggregate_truth_ratios(ratios, "forget")


def test_truth_ratio_and_probability_of_model_match_hand_nll(lm, tok):
    questions = ["Where was Basil born?", "What does Nikolai write?"]
    paraphrased = [" In Kuwait City.", " African American literature."]
    perturbed = [[" In Cairo.", " In Doha, Qatar."], [" Poetry.", " Science fiction.", " Plays."]]
    result = truth_ratio(lm, tok, questions, paraphrased, perturbed, batch_size=3)
    expected = []
    for q, para, wrong in zip(questions, paraphrased, perturbed):
        false_nll = sum(hand_mean_nll(lm, tok, q, w) for w in wrong) / len(wrong)
        expected.append(math.exp(-false_nll) / math.exp(-hand_mean_nll(lm, tok, q, para)))
    assert result["per_example"] == pytest.approx(expected, rel=1e-4)
    assert result["truth_ratio"] == pytest.approx(sum(min(t, 1 / t) for t in expected) / 2, rel=1e-4)

    prob = answer_probability(lm, tok, questions, paraphrased, perturbed)
    p = [math.exp(-hand_mean_nll(lm, tok, q, a)) for q, a in zip(questions, paraphrased)]
    assert prob["per_example"] == pytest.approx(p, rel=1e-4)
    wrong = [sum(math.exp(-hand_mean_nll(lm, tok, q, w)) for w in ws) for q, ws in zip(questions, perturbed)]
    assert prob["normalized_per_example"] == pytest.approx([a / (a + b) for a, b in zip(p, wrong)], rel=1e-4)
    json.dumps(result), json.dumps(prob)


def test_forget_quality_is_scipy_ks_pvalue_and_needs_retrain_values():
    unlearned = [0.1, 0.4, 0.35, 0.8, 0.9, 0.05]
    retrained = [0.5, 0.6, 0.7, 0.65, 0.55]
    result = forget_quality(unlearned, retrained)
    assert result["forget_quality"] == ks_2samp(unlearned, retrained).pvalue
    assert result["ks_statistic"] == ks_2samp(unlearned, retrained).statistic
    with pytest.raises(MoEUnlearnError, match="retrained model's per-question truth ratios"):
        forget_quality(unlearned)
    with pytest.raises(MoEUnlearnError, match="retrain_tr"):
        forget_quality(unlearned, [])


def test_model_utility_harmonic_mean():
    assert model_utility([0.5, 1.0])["model_utility"] == pytest.approx(2 / 3)
    scores = {"retain_prob": 0.9, "retain_rouge": 0.6, "retain_tr": 0.4}
    assert model_utility(scores)["model_utility"] == pytest.approx(hmean([0.9, 0.6, 0.4]))
    assert model_utility([0.0, 0.9])["model_utility"] == 0.0
    with pytest.raises(MoEUnlearnError, match="non-negative"):
        model_utility([0.5, -0.1])


# ------------------------------------------------------------------------- memorisation, perplexity


def test_extraction_strength_and_exact_memorization_on_hand_ids():
    argmax = [1, 2, 3, 4]
    assert extraction_strength_from_ids(argmax, [1, 2, 3, 4]) == 1.0  # k = 0
    assert extraction_strength_from_ids(argmax, [9, 2, 3, 4]) == 0.75  # suffix from k = 1 matches
    assert extraction_strength_from_ids(argmax, [1, 9, 3, 4]) == 0.5  # k = 2
    assert extraction_strength_from_ids(argmax, [1, 2, 3, 9]) == 0.0  # not even the last token
    assert exact_memorization_from_ids(argmax, [1, 9, 3, 9]) == 0.5
    with pytest.raises(MoEUnlearnError, match="differ"):
        exact_memorization_from_ids([1, 2], [1, 2, 3])


def test_memorization_metrics_of_model_match_hand_argmax(lm, tok):
    prompts = ["Q: x?\nA:", "The wizard raised"]
    answers = [" forty two", " his wand and the door"]
    es = extraction_strength(lm, tok, prompts, answers, batch_size=2)
    em = exact_memorization(lm, tok, prompts, answers, batch_size=2)
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        context = tok(prompt)["input_ids"]
        whole = tok(prompt + answer)["input_ids"]
        with torch.no_grad():
            argmax = lm(torch.tensor([whole])).logits[0, len(context) - 1 : -1].argmax(-1)
        targets = whole[len(context) :]
        assert es["per_example"][i] == extraction_strength_from_ids(argmax, targets)
        assert em["per_example"][i] == exact_memorization_from_ids(argmax, targets)


def test_greedy_token_ids_are_fully_extracted(lm, tok):
    """Teacher-forcing the model's own greedy ids reproduces them: ES = EM = 1 (id level, no decoding)."""
    context = tok("Q: x?\nA:")["input_ids"]
    with torch.no_grad():
        out = lm.generate(torch.tensor([context]), max_new_tokens=6, do_sample=False, eos_token_id=None)
    greedy = out[0, len(context) :].tolist()
    (score,) = score_encoded(lm, [EncodedPair(tuple(context), tuple(greedy))])
    assert extraction_strength_from_ids(score.argmax_ids, score.target_ids) == 1.0
    assert exact_memorization_from_ids(score.argmax_ids, score.target_ids) == 1.0


def test_perplexity_is_exp_of_token_weighted_mean_nll(lm, tok):
    texts = ["hello world", "a much longer text than the first"]
    per_text = [hand_token_logprobs(lm, tok, "", t) for t in texts]
    total = torch.cat(per_text)
    result = perplexity(lm, tok, texts, batch_size=2)
    assert result["perplexity"] == pytest.approx(math.exp(-float(total.mean())), rel=1e-5)
    assert result["num_tokens"] == len(total)
    assert result["per_example"] == pytest.approx([math.exp(-float(t.mean())) for t in per_text], rel=1e-5)


# -------------------------------------------------------------------------------- registry, report


def test_registry_names_and_errors():
    required = {
        "mcq_accuracy", "verbmem", "knowmem", "privleak", "min_k", "truth_ratio", "forget_quality",
        "model_utility", "extraction_strength", "exact_memorization", "perplexity", "answer_probability",
    }  # fmt: skip
    assert required <= set(list_metrics())
    assert get_metric("privleak") is privleak
    with pytest.raises(MoEUnlearnError, match="Unknown metric 'rouge'.*mcq_accuracy"):
        get_metric("rouge")
    with pytest.raises(MoEUnlearnError, match="already registered"):
        register_metric("perplexity")(lambda model, tokenizer: {})


def test_results_table_markdown():
    rows = {"base": {"wmdp": 0.5123, "mmlu": 0.6}, "ga": {"wmdp": 0.26}}
    assert results_table(rows, ["wmdp", "mmlu"], precision=2) == (
        "| run | wmdp | mmlu |\n|---|---:|---:|\n| base | 0.51 | 0.60 |\n| ga | 0.26 | – |\n"
    )
    assert results_table({"a": {"x": 1.0, "per_example": [1.0]}}).startswith("| run | x |\n")
    assert "| a | 0.250 |" in results_table({"a": {"x": np.float32(0.25)}})
    with pytest.raises(MoEUnlearnError, match="not a number"):
        results_table({"a": {"x": [1.0]}}, ["x"])


def test_plot_tradeoff_writes_png(tmp_path):
    rows = {"base": {"forget": 0.9, "utility": 0.6}, "ga": {"forget": 0.3, "utility": 0.4}, "other": {"x": 1.0}}
    path = plot_tradeoff(rows, "forget", "utility", tmp_path / "plots" / "tradeoff.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(MoEUnlearnError, match="no run has both"):
        plot_tradeoff(rows, "forget", "missing", tmp_path / "x.png")
