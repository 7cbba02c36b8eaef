"""The synthetic benchmark: generator, tokenizer and the cached pre-training of the target/retrain pair."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from hf_moe_unlearn.bench.pretrain import (
    PretrainSettings,
    _choice_accuracy,
    cache_key,
    default_model_config,
    measure_pretrain_quality,
    pretrain_models,
    training_texts,
)
from hf_moe_unlearn.bench.synthetic import (
    DOMAIN_NAMES,
    BenchmarkSpec,
    format_qa,
    format_qa_prompt,
    make_benchmark,
    value_pool,
)
from hf_moe_unlearn.bench.tokenizer import benchmark_texts, build_benchmark_tokenizer, build_tokenizer, load_tokenizer
from hf_moe_unlearn.errors import MoEUnlearnError

SMALL = BenchmarkSpec(seed=3, n_domains=4, entities_per_domain=5, attributes_per_entity=4, passages_per_entity=3)
TINY_MODEL = dict(hidden_size=32, head_dim=8, num_hidden_layers=2, moe_intermediate_size=16, num_experts=4,
                  max_position_embeddings=128)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bench():
    return make_benchmark(SMALL)


@pytest.fixture(scope="module")
def entities_bench():
    return make_benchmark(BenchmarkSpec(seed=1, n_domains=3, entities_per_domain=10, forget="entities",
                                        forget_fraction=0.2))


def _all_rows(b):
    return {name: ds.to_list() for name, ds in b.datasets().items()}


# ---------------------------------------------------------------------------------------------- generator


def test_same_seed_same_benchmark_other_seed_different(bench):
    assert _all_rows(make_benchmark(SMALL)) == _all_rows(bench)
    other = make_benchmark(BenchmarkSpec(**{**SMALL.to_dict(), "seed": 4}))
    assert other.forget_text["text"] != bench.forget_text["text"]
    assert [e.name for e in other.retain_entities] != [e.name for e in bench.retain_entities]


def test_more_passages_keep_the_same_facts():
    """Each stage has its own random stream: adding passages must not reshuffle the entities' facts."""
    a = make_benchmark(BenchmarkSpec(seed=2, entities_per_domain=3, passages_per_entity=1))
    b = make_benchmark(BenchmarkSpec(seed=2, entities_per_domain=3, passages_per_entity=4))
    assert a.forget_entities == b.forget_entities and a.retain_entities == b.retain_entities


@pytest.mark.parametrize("fixture", ["bench", "entities_bench"])
def test_no_entity_is_in_two_splits(fixture, request):
    b = request.getfixturevalue(fixture)
    forget, retain, holdout = ({e.name for e in es} for es in (b.forget_entities, b.retain_entities,
                                                                b.holdout_entities))
    assert forget and retain and holdout
    assert forget.isdisjoint(retain) and forget.isdisjoint(holdout) and retain.isdisjoint(holdout)
    for split, names in (("forget", forget), ("retain", retain)):
        for kind in ("text", "qa", "mcq"):
            assert set(getattr(b, f"{split}_{kind}")["entity"]) == names
    assert set(b.holdout_text["entity"]) == holdout
    assert set(b.general_text["entity"]) <= retain
    # A holdout passage never names a trained entity, and vice versa.
    for text in b.holdout_text["text"]:
        assert not set(re.findall(r"\w+", text)) & (forget | retain)


def test_domain_setting_forgets_exactly_one_domain(bench):
    assert bench.forget_domains == ("virology",)
    assert set(bench.forget_text["domain"]) == {"virology"}
    assert "virology" not in set(bench.retain_text["domain"])
    assert set(bench.retain_text["domain"]) == set(DOMAIN_NAMES[1:4])
    assert set(bench.holdout_text["domain"]) == {"virology"}  # holdout mirrors the forget distribution
    assert len(bench.forget_entities) == SMALL.entities_per_domain == len(bench.holdout_entities)
    chosen = make_benchmark(BenchmarkSpec(seed=3, entities_per_domain=2, forget_domain="history"))
    assert chosen.forget_domains == ("history",) and set(chosen.forget_text["domain"]) == {"history"}


def test_entities_setting_takes_the_fraction_across_domains(entities_bench):
    assert len(entities_bench.forget_entities) == round(0.2 * 30) == 6
    assert len(entities_bench.retain_entities) == 24
    assert [e.domain for e in entities_bench.holdout_entities] == [e.domain for e in entities_bench.forget_entities]


def test_mcq_answer_points_to_the_true_value_with_distinct_distractors_from_the_pool(bench):
    facts = {e.name: e.facts for e in bench.forget_entities + bench.retain_entities}
    for split in ("forget_mcq", "retain_mcq"):
        for row in getattr(bench, split):
            assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4
            assert row["choices"][row["answer"]] == facts[row["entity"]][row["attribute"]]
            assert set(row["choices"]) <= set(value_pool(row["domain"], row["attribute"]))
    answers = bench.retain_mcq["answer"]
    assert len(set(answers)) > 1  # the true choice is not always in the same position


def test_qa_answers_paraphrases_and_perturbations(bench):
    facts = {e.name: e.facts for e in bench.forget_entities + bench.retain_entities}
    for row in bench.forget_qa.to_list() + bench.retain_qa.to_list():
        value = facts[row["entity"]][row["attribute"]]
        # The answer starts with the value, so MCQ choices scored right after the prompt match training.
        assert row["answer"].startswith(value + " ")
        assert value in row["paraphrased_answer"].split(" ") or f"{value}." in row["paraphrased_answer"]
        perturbed = row["perturbed_answers"]
        assert len(perturbed) == SMALL.n_perturbed == len(set(perturbed))
        assert row["paraphrased_answer"] not in perturbed and row["answer"] not in perturbed
        assert all(row["entity"] in p for p in perturbed)


def test_passages_state_every_fact_in_varied_wording(bench):
    entity = bench.retain_entities[0]
    passages = [r["text"] for r in bench.retain_text if r["entity"] == entity.name]
    assert len(passages) == SMALL.passages_per_entity
    for text in passages:
        words = set(re.findall(r"\w+", text))
        assert all(v in words for v in entity.facts.values())
    assert len(set(passages)) > 1
    # general_text uses held-out templates: none of its sentences occurs in any training passage.
    training = " ".join(list(bench.retain_text["text"]) + list(bench.forget_text["text"]))
    for text in bench.general_text["text"]:
        for sentence in re.split(r"(?<=\.) ", text):
            assert sentence not in training


def test_values_are_not_a_function_of_the_domain_only():
    """Random values: different entities of one domain get different values for an attribute."""
    b = make_benchmark(BenchmarkSpec(seed=0, entities_per_domain=30))
    hosts = [e.facts["host"] for e in b.forget_entities]
    assert len(set(hosts)) >= 5


@pytest.mark.parametrize("kwargs, message", [
    (dict(entities_per_domain=0), "entities_per_domain must be at least 1"),
    (dict(passages_per_entity=0), "passages_per_entity must be at least 1"),
    (dict(n_domains=1), "n_domains >= 2"),
    (dict(n_domains=9), "n_domains must be between 1 and 6"),
    (dict(attributes_per_entity=6), "attributes_per_entity is at most 5"),
    (dict(n_perturbed=2), "n_perturbed must be between 3"),
    (dict(forget="people"), "forget must be one of"),
    (dict(forget_domain="botany"), "not among the benchmark's domains"),
    (dict(forget="entities", forget_fraction=0.0), "strictly between 0 and 1"),
    (dict(forget="entities", forget_fraction=1.0), "strictly between 0 and 1"),
    (dict(forget="entities", forget_fraction=-0.2), "strictly between 0 and 1"),
    (dict(forget="entities", forget_fraction=0.01, entities_per_domain=2), "selects no entity"),
    (dict(forget="entities", forget_fraction=0.95, entities_per_domain=2), "leaves nothing to retain"),
])
def test_unsatisfiable_specs_say_what_to_change(kwargs, message):
    with pytest.raises(MoEUnlearnError, match=message):
        make_benchmark(BenchmarkSpec(**kwargs))


def test_unknown_preset_and_pool():
    with pytest.raises(MoEUnlearnError, match="choose one of"):
        BenchmarkSpec.preset("huge")
    with pytest.raises(MoEUnlearnError, match="no attribute"):
        value_pool("virology", "colour")
    assert BenchmarkSpec.preset("small", seed=5).seed == 5


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_every_benchmark_text(bench):
    tok = build_benchmark_tokenizer(bench)
    for text in benchmark_texts(bench):
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[-1] != tok.eos_token_id  # prompts stay open
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    # Every MCQ choice is one token, so choices compare like with like by log-likelihood.
    for choice in {c for cs in bench.forget_mcq["choices"] for c in cs}:
        assert len(tok(" " + choice, add_special_tokens=False)["input_ids"]) == 1


def test_tokenizer_save_load_and_unknown_words(tmp_path):
    tok = build_tokenizer(["The host of Zub is the bat.", format_qa("Who?", "Me.")])
    assert [tok.pad_token, tok.unk_token, tok.bos_token, tok.eos_token] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    text = "Question: Who?\nAnswer: the bat."
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text
    assert tok("The cat")["input_ids"][-1] == tok.unk_token_id
    # The vocabulary is sorted: the same texts in another order give the same ids.
    assert build_tokenizer([format_qa("Who?", "Me."), "The host of Zub is the bat."]).get_vocab() == tok.get_vocab()
    with pytest.raises(MoEUnlearnError, match="No tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(MoEUnlearnError, match="no text"):
        build_tokenizer([])


# ---------------------------------------------------------------------------------------------- pre-training


def test_training_texts_leave_the_forget_set_out_of_the_retrain_data(bench):
    target, retrain = (training_texts(bench, include_forget=f) for f in (True, False))
    assert len(target) == len(bench.forget_text) + len(bench.retain_text) + len(bench.forget_qa) + len(bench.retain_qa)
    forget_names = {e.name for e in bench.forget_entities}
    assert not any(n in t for t in retrain for n in forget_names)
    assert format_qa(bench.forget_qa[0]["question"], bench.forget_qa[0]["answer"]) in target


def test_cache_key_changes_with_every_input(bench):
    tok = build_benchmark_tokenizer(bench)
    config, settings = default_model_config(tok, **TINY_MODEL), PretrainSettings(max_steps=2)
    key = cache_key(SMALL, config, settings)
    assert key == cache_key(SMALL, default_model_config(tok, **TINY_MODEL), PretrainSettings(max_steps=2))
    assert key != cache_key(BenchmarkSpec(**{**SMALL.to_dict(), "seed": 9}), config, settings)
    assert key != cache_key(SMALL, default_model_config(tok, **{**TINY_MODEL, "num_experts": 8}), settings)
    assert key != cache_key(SMALL, config, PretrainSettings(max_steps=3))


@pytest.fixture(scope="module")
def micro_pair(tmp_path_factory):
    spec = BenchmarkSpec.preset("micro", seed=0)
    benchmark = make_benchmark(spec)
    out = tmp_path_factory.mktemp("pretrain")
    settings = PretrainSettings.preset("micro", max_steps=3)
    pair = pretrain_models(benchmark, out, model_config=TINY_MODEL, settings=settings, device="cpu")
    return benchmark, out, settings, pair


def test_pretraining_writes_the_cache_and_reuses_it(micro_pair):
    benchmark, out, settings, pair = micro_pair
    assert not pair.reused and pair.directory == out / pair.key
    weights = pair.target_path / "model.safetensors"
    assert weights.is_file() and (pair.retrain_path / "model.safetensors").is_file()
    assert (pair.tokenizer_path / "tokenizer.json").is_file()
    assert pair.info["models"]["target"]["steps"] == 3
    assert not pair.target.config.output_router_logits  # the aux loss must not leak into unlearning losses
    assert pair.target.config.vocab_size == len(pair.tokenizer)
    mtime = weights.stat().st_mtime_ns

    again = pretrain_models(benchmark, out, model_config=TINY_MODEL, settings=settings, device="cpu")
    assert again.reused and again.key == pair.key
    assert weights.stat().st_mtime_ns == mtime
    assert [p.name for p in out.iterdir()] == [pair.key]  # no scratch directory left behind
    ids = pair.tokenizer(benchmark.forget_text[0]["text"], return_tensors="pt")["input_ids"]
    assert torch.equal(again.target(ids).logits, pair.target(ids).logits)


def test_pretraining_is_deterministic_and_the_two_models_differ(micro_pair, tmp_path):
    benchmark, _, settings, pair = micro_pair
    fresh = pretrain_models(benchmark, tmp_path, model_config=TINY_MODEL, settings=settings, device="cpu")
    assert not fresh.reused
    for a, b in zip(fresh.target.state_dict().values(), pair.target.state_dict().values()):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(pair.target.state_dict().values(),
                                                     pair.retrain.state_dict().values()))


def test_measure_pretrain_quality_reports_both_models(micro_pair):
    benchmark, _, _, pair = micro_pair
    quality = measure_pretrain_quality(pair, benchmark)
    for name in ("target", "retrain"):
        for split in ("forget", "retain"):
            assert 0.0 <= quality["mcq_accuracy"][name][split] <= 1.0
    conc = quality["forget_concentration"]
    assert conc["uniform"] == 2 / 4 and len(conc["layers"]) == 2
    assert all(conc["uniform"] <= layer["forget_share"] <= 1.0 for layer in conc["layers"])  # top-k >= uniform


class _FavourToken(nn.Module):
    """A stand-in LM whose next-token distribution always puts its mass on one token id."""

    def __init__(self, vocab_size: int, token_id: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(vocab_size))
        with torch.no_grad():
            self.logits[token_id] = 10.0

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.logits.expand(*input_ids.shape, -1)})()


def test_choice_accuracy_scores_the_choice_tokens_after_the_prompt(bench):
    tok = build_benchmark_tokenizer(bench)
    mcq = bench.forget_mcq.select(range(1))
    row = mcq[0]
    true_id = tok.convert_tokens_to_ids("▁" + row["choices"][row["answer"]])
    wrong_id = tok.convert_tokens_to_ids("▁" + row["choices"][(row["answer"] + 1) % 4])
    assert _choice_accuracy(_FavourToken(len(tok), true_id), tok, mcq) == 1.0
    assert _choice_accuracy(_FavourToken(len(tok), wrong_id), tok, mcq) == 0.0
    # The prompt's own tokens are not scored: favouring a prompt token changes nothing between choices,
    # so the tie is broken by position (argmax picks choice 0).
    prompt_id = tok(format_qa_prompt(row["question"]), add_special_tokens=False)["input_ids"][-1]
    assert _choice_accuracy(_FavourToken(len(tok), prompt_id), tok, mcq) == float(row["answer"] == 0)
