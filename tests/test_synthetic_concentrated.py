"""The "concentrated" benchmark preset: domain-specific vocabulary, its pre-training preset and the cache key.

Nothing here pre-trains (the preset takes minutes): ``benchmarks/routing_concentration.py`` measures it.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from hf_moe_unlearn.bench.pretrain import (
    DEFAULT_MODEL_KWARGS,
    PRESET_MODEL_KWARGS,
    PretrainSettings,
    _BucketedLengthTrainer,
    _training_arguments,
    cache_key,
    default_model_config,
    model_kwargs_for,
)
from hf_moe_unlearn.bench.synthetic import (
    BenchmarkSpec,
    domain_lexicons,
    make_benchmark,
    shared_template_words,
    value_pool,
)
from hf_moe_unlearn.bench.tokenizer import benchmark_texts, build_benchmark_tokenizer
from hf_moe_unlearn.errors import MoEUnlearnError
from hf_moe_unlearn.moe import find_moe_layers

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The concentrated preset's vocabulary on a benchmark a few times smaller (same domains and attributes).
SPEC = BenchmarkSpec.preset("concentrated", entities_per_domain=6)
_WORDS = re.compile(r"[^\W\d_]+")  # words, without punctuation and numbers (numeric values are domain-specific too)


def _words(texts):
    return {w for t in texts for w in _WORDS.findall(t)}


@pytest.fixture(scope="module")
def plain_and_localised():
    return make_benchmark(BenchmarkSpec(**{**SPEC.to_dict(), "domain_vocabulary": False})), make_benchmark(SPEC)


def test_concentrated_preset_is_full_written_in_domain_vocabularies():
    spec, full = BenchmarkSpec.preset("concentrated"), BenchmarkSpec.preset("full")
    spec.validate()
    assert spec.domain_vocabulary and not full.domain_vocabulary
    differs = {k for k, v in spec.to_dict().items() if full.to_dict().get(k, object()) != v}
    assert differs == {"domain_vocabulary"}  # same domains, entities, facts per entity, passages
    assert BenchmarkSpec.preset("concentrated", forget="entities").forget == "entities"
    for size in ("micro", "small", "full"):
        assert not BenchmarkSpec.preset(size).domain_vocabulary
    with pytest.raises(MoEUnlearnError, match="True or False"):
        BenchmarkSpec(domain_vocabulary="yes").validate()


def test_concentrated_pretraining_preset_and_model_kwargs():
    kwargs = model_kwargs_for("concentrated")
    assert kwargs["num_experts"] > DEFAULT_MODEL_KWARGS["num_experts"]
    assert kwargs.get("num_experts_per_tok", DEFAULT_MODEL_KWARGS["num_experts_per_tok"]) == 2  # still top-2
    reference = Qwen3MoeConfig()
    assert all(hasattr(reference, k) for k in kwargs)  # overrides of real config fields, nothing misspelt
    # The model it builds: layer 0 dense, the three others MoE layers of 32 experts.
    tok = build_benchmark_tokenizer(make_benchmark(BenchmarkSpec.preset("micro")))
    layers = find_moe_layers(AutoModelForCausalLM.from_config(default_model_config(tok, **kwargs)))
    assert [layer.index for layer in layers] == [1, 2, 3] and {layer.num_experts for layer in layers} == {32}
    kwargs["num_experts"] = 1  # a fresh deep copy: the caller's to change
    kwargs["mlp_only_layers"].append(3)
    assert model_kwargs_for("concentrated")["mlp_only_layers"] == [0]
    assert PRESET_MODEL_KWARGS["concentrated"]["mlp_only_layers"] == [0]
    assert model_kwargs_for("concentrated")["num_experts"] == 32
    for size in ("micro", "small", "full"):  # the existing presets keep the default architecture
        assert model_kwargs_for(size) == {}
    assert PretrainSettings.preset("concentrated") != PretrainSettings.preset("full")
    with pytest.raises(MoEUnlearnError, match="choose one of"):
        model_kwargs_for("huge")


def test_forget_domain_passages_use_words_no_retain_passage_uses(plain_and_localised):
    plain, localised = plain_and_localised
    # The default wording shares function words between domains ("the", "is", "of", ...) ...
    assert {"the", "is", "of"} <= _words(plain.forget_text["text"]) & _words(plain.retain_text["text"])
    # ... the domain vocabulary shares none: forget passages and questions have no word of the retain ones.
    for name in ("text", "qa", "mcq"):
        column = "text" if name == "text" else "question"
        forget_words = _words(getattr(localised, f"forget_{name}")[column])
        retain_words = _words(getattr(localised, f"retain_{name}")[column])
        assert forget_words and not forget_words & retain_words, name
    # Holdout passages are in the forget domain's vocabulary, general text in the retain domains'.
    assert not _words(localised.holdout_text["text"]) & _words(localised.retain_text["text"])
    assert not _words(localised.general_text["text"]) & _words(localised.forget_text["text"])


def test_domain_vocabulary_changes_the_wording_not_the_facts(plain_and_localised):
    plain, localised = plain_and_localised
    for split in ("forget_entities", "retain_entities", "holdout_entities"):
        assert [e.facts for e in getattr(plain, split)] == [e.facts for e in getattr(localised, split)]
    assert plain.forget_mcq["choices"] == localised.forget_mcq["choices"]
    # Values are untouched (MCQ choices come from the pools), every fact is still stated in the passages.
    for entity in localised.forget_entities:
        text = " ".join(t for t, e in zip(localised.forget_text["text"], localised.forget_text["entity"])
                        if e == entity.name)
        for attribute, value in entity.facts.items():
            assert value in value_pool(entity.domain, attribute) and re.search(rf"\b{re.escape(value)}\b", text)
    tok = build_benchmark_tokenizer(localised)
    for text in benchmark_texts(localised)[:400]:
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids, skip_special_tokens=True) == text


def test_domain_lexicons_are_distinct_words_of_their_own(plain_and_localised):
    plain, localised = plain_and_localised
    lexicons = domain_lexicons(0)
    shared = shared_template_words()
    assert {"the", "is", "of", "a", "in", "by"} <= set(shared)
    new_words = [w for lexicon in lexicons.values() for w in lexicon.values()]
    assert all(set(lexicon) == set(shared) for lexicon in lexicons.values())
    assert len(set(new_words)) == len(new_words)  # no two domains (or words) share a replacement
    # None is a word of the default wording (templates, values, names), in any case.
    assert not set(new_words) & {w.lower() for w in _words(benchmark_texts(plain))}
    # Capitalisation is kept: a sentence starting with "The" starts with the capitalised replacement.
    virology = lexicons["virology"]
    first_words = {t.split()[0] for t in localised.forget_text["text"]}
    assert virology["the"].capitalize() in {w for t in localised.forget_text["text"] for w in t.split()}
    assert not any(w[0].islower() for w in first_words)
    assert domain_lexicons(0) == lexicons and domain_lexicons(1) != lexicons  # seeded


def test_cache_key_covers_the_domain_vocabulary_and_leaves_old_specs_alone(plain_and_localised):
    plain, localised = plain_and_localised
    # Specs without the new field serialise exactly as before it existed (old caches stay valid).
    assert "domain_vocabulary" not in plain.spec.to_dict()
    assert set(BenchmarkSpec.preset("full").to_dict()) == {
        "seed", "n_domains", "entities_per_domain", "attributes_per_entity", "passages_per_entity", "forget",
        "forget_fraction", "forget_domain", "n_perturbed"}
    assert localised.spec.to_dict()["domain_vocabulary"] is True
    assert BenchmarkSpec(**localised.spec.to_dict()) == localised.spec  # the dict round-trips
    tok = build_benchmark_tokenizer(localised)
    config, settings = default_model_config(tok), PretrainSettings.preset("full")
    assert cache_key(localised.spec, config, settings) != cache_key(plain.spec, config, settings)
    concentrated = default_model_config(tok, **model_kwargs_for("concentrated"))
    assert cache_key(localised.spec, concentrated, settings) != cache_key(localised.spec, config, settings)
    assert (cache_key(localised.spec, config, PretrainSettings.preset("concentrated"))
            != cache_key(localised.spec, config, settings))
    # The new settings field: left out at its default (old keys unchanged), in the key otherwise.
    assert "length_bucket" not in PretrainSettings.preset("full").to_dict()
    assert PretrainSettings.preset("concentrated").to_dict()["length_bucket"] > 1
    assert (cache_key(plain.spec, config, PretrainSettings(length_bucket=48))
            != cache_key(plain.spec, config, PretrainSettings()))


def _batches(length_bucket, lengths, tmp_path, batch_size=16):
    settings = PretrainSettings(batch_size=batch_size, length_bucket=length_bucket)
    trainer = _BucketedLengthTrainer(length_bucket=length_bucket, model=nn.Linear(1, 1),
                                     args=_training_arguments(settings, tmp_path, device="cpu"),
                                     train_dataset=Dataset.from_dict({"input_ids": [[5] * n for n in lengths]}))
    torch.manual_seed(0)
    order = list(trainer._get_train_sampler())
    assert sorted(order) == list(range(len(lengths)))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def test_length_buckets_batch_by_kind_of_text_and_mix_the_domains(tmp_path):
    # Two domains: short QA-like texts (10-19 tokens) and passages whose length differs by domain (50-55 / 65-70).
    lengths, domains = [], []
    for domain, shortest in enumerate((50, 65)):
        for i in range(64):
            lengths += [shortest + i % 6, 10 + i % 10]
            domains += [domain, domain]
    long_ = [n >= 50 for n in lengths]

    def majority(batch):  # share of a batch's texts from its most frequent domain
        return max(Counter(domains[i] for i in batch).values()) / len(batch)

    exact = [b for b in _batches(1, lengths, tmp_path) if all(long_[i] for i in b)]
    assert exact and sum(map(majority, exact)) / len(exact) > 0.9  # exact lengths: one domain per batch
    bucketed = _batches(48, lengths, tmp_path)  # short texts in the first bucket (<= 48), passages in the second
    mixed_kinds = [b for b in bucketed if len({long_[i] for i in b}) > 1]
    assert len(mixed_kinds) <= 4  # at most one per mega-batch (4 of 64 texts here): QA and passages apart
    passages = [b for b in bucketed if all(long_[i] for i in b)]
    assert passages and sum(map(majority, passages)) / len(passages) < 0.8  # both domains in a batch
