"""Hub loaders read local copies laid out as the Hub repositories (tests/fixtures/hub), never the network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hf_moe_unlearn.data.hub import (
    load_mmlu,
    load_muse,
    load_tofu,
    load_wmdp,
    load_wmdp_corpora,
)
from hf_moe_unlearn.errors import MoEUnlearnError

HUB = Path(__file__).parent / "fixtures" / "hub"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_wmdp_keeps_hub_columns_and_adds_lm_eval_subject():
    dataset = load_wmdp("cyber", data_dir=HUB / "wmdp")
    expected = _rows(HUB / "wmdp/wmdp-cyber/test-00000-of-00001.jsonl")
    assert len(dataset) == len(expected)
    assert dataset["question"] == [r["question"] for r in expected]
    assert dataset["choices"] == [r["choices"] for r in expected]
    assert dataset["answer"] == [r["answer"] for r in expected]
    assert set(dataset["subject"]) == {"cybersecurity"}
    # The "wmdp-" prefix of the Hub config name is accepted too.
    assert load_wmdp("wmdp-cyber", data_dir=HUB / "wmdp")["question"] == dataset["question"]


def test_wmdp_rows_feed_mcq_prompts():
    from hf_moe_unlearn.evaluation.prompts import letters_prompt

    row = load_wmdp("cyber", data_dir=HUB / "wmdp")[0]
    prompt = letters_prompt(row["question"], row["choices"], row["subject"])
    assert prompt == (
        "The following are multiple choice questions (with answers) about cybersecurity.\n\n"
        "Which TCP port does HTTPS use by default?\nA. 21\nB. 80\nC. 443\nD. 8080\nAnswer:"
    )


def test_wmdp_corpora_text_and_gated_bio_forget_corpus():
    corpus = load_wmdp_corpora("cyber-forget-corpus", data_dir=HUB / "wmdp-corpora")
    assert corpus.column_names == ["text"]
    assert corpus["text"][0].startswith("A firewall")
    with pytest.raises(MoEUnlearnError, match="on request"):
        load_wmdp_corpora("bio-forget-corpus")


def test_mmlu_subject_layout():
    dataset = load_mmlu("anatomy", data_dir=HUB / "mmlu")
    assert dataset["answer"] == [0, 1]
    assert dataset["subject"] == ["anatomy", "anatomy"]


@pytest.mark.parametrize(
    ("subset", "split", "columns"),
    [
        ("raw", "forget", {"text"}),
        ("raw", "retain1", {"text"}),
        ("raw", "holdout", {"text"}),
        ("privleak", "holdout", {"text"}),
        ("verbmem", "forget", {"prompt", "gt", "answer"}),
        ("knowmem", "forget_qa", {"question", "answer", "prompt"}),
        ("knowmem", "forget_qa_icl", {"question", "answer", "prompt"}),
    ],
)
def test_muse_subsets_have_hub_and_canonical_columns(subset, split, columns):
    dataset = load_muse("Books", subset, split, data_dir=HUB / "MUSE-Books")
    assert set(dataset.column_names) == columns
    expected = _rows(HUB / f"MUSE-Books/{subset}/{split}-00000-of-00001.jsonl")
    assert len(dataset) == len(expected)
    if subset == "verbmem":
        assert dataset["answer"] == dataset["gt"] == [r["gt"] for r in expected]
    if subset == "knowmem":
        assert dataset["prompt"] == dataset["question"] == [r["question"] for r in expected]


def test_tofu_plain_and_perturbed_configs():
    forget = load_tofu("forget01", data_dir=HUB / "TOFU")
    assert forget["prompt"] == forget["question"]
    assert len(forget) == 2
    perturbed = load_tofu("forget01_perturbed", data_dir=HUB / "TOFU")
    row = perturbed[0]
    assert isinstance(row["perturbed_answer"], list) and len(row["perturbed_answer"]) == 3
    assert row["paraphrased_answer"].startswith("Kuwait City")


def test_parquet_layout_as_downloaded_from_the_hub(tmp_path):
    """The Hub stores these datasets as parquet shards; the same loader reads them."""
    import datasets

    rows = _rows(HUB / "MUSE-Books/verbmem/forget-00000-of-00001.jsonl")
    target = tmp_path / "verbmem" / "forget-00000-of-00001.parquet"
    target.parent.mkdir(parents=True)
    datasets.Dataset.from_list(rows).to_parquet(str(target))
    dataset = load_muse("Books", "verbmem", "forget", data_dir=tmp_path)
    assert dataset["prompt"] == [r["prompt"] for r in rows]


@pytest.mark.parametrize(
    ("call", "valid"),
    [
        (lambda: load_wmdp("physics"), "bio, chem, cyber"),
        (lambda: load_wmdp_corpora("cyber-corpus"), "cyber-forget-corpus"),
        (lambda: load_mmlu("astrology"), "anatomy"),
        (lambda: load_muse("Movies"), "Books, News"),
        (lambda: load_muse("Books", "qa"), "raw, verbmem, knowmem, privleak"),
        (lambda: load_muse("Books", "knowmem", "forget"), "forget_qa"),
        (lambda: load_tofu("forget20"), "forget10"),
    ],
)
def test_invalid_names_list_the_valid_ones(call, valid):
    with pytest.raises(MoEUnlearnError, match="valid values: .*" + valid.split(",")[0]) as info:
        call()
    assert valid in str(info.value)


def test_missing_local_files_and_columns_are_explained(tmp_path):
    with pytest.raises(MoEUnlearnError, match="looked for: verbmem/forget-"):
        load_muse("Books", "verbmem", "forget", data_dir=tmp_path)
    shutil.copytree(HUB / "MUSE-Books" / "raw", tmp_path / "verbmem")
    (tmp_path / "verbmem" / "forget-00000-of-00001.jsonl").rename(tmp_path / "verbmem" / "forget.jsonl")
    with pytest.raises(MoEUnlearnError, match=r"lacks columns \['prompt', 'gt'\]"):
        load_muse("Books", "verbmem", "forget", data_dir=tmp_path)
    with pytest.raises(MoEUnlearnError, match="does not exist"):
        load_tofu("forget01", data_dir=tmp_path / "nowhere")


def test_hub_failure_points_to_data_dir(monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(MoEUnlearnError, match=r"(?s)cais/wmdp.*Couldn't reach the Hub.*data_dir=DIR") as info:
        load_wmdp("bio")
    assert "hf download cais/wmdp --repo-type dataset" in str(info.value)
