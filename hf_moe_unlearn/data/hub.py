"""Loaders for the real unlearning benchmarks on the Hugging Face Hub: WMDP, MMLU, MUSE and TOFU.

Each loader takes the benchmark's own names (the Hub repository, config and split) and returns a
``datasets.Dataset`` with the Hub's columns, plus the canonical columns the rest of the package reads:
``text`` for corpora, ``prompt``/``answer`` for question–answer data, ``question``/``choices``/``answer``
(+ ``subject``) for multiple choice.

``data_dir=`` reads a local copy instead of the Hub (air-gapped clusters, gated data such as the WMDP
bio forget corpus, tests). It must be laid out as the Hub repository is, one of:

- ``{data_dir}/{config}/{split}-00000-of-00001.parquet`` (cais/wmdp, cais/wmdp-corpora, cais/mmlu,
  muse-bench/MUSE-*; ``.jsonl``/``.json`` files in JSON-lines format are accepted too), or
  ``{data_dir}/{config}/{split}.parquet|jsonl|json``;
- ``{data_dir}/{config}.json`` (locuslab/TOFU, one JSON-lines file per config, split "train").

A ``hf download <repo> --repo-type dataset --local-dir <data_dir>`` produces that layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import datasets

from ..errors import MoEUnlearnError

__all__ = [
    "MMLU_SUBJECTS",
    "MUSE_CORPORA",
    "MUSE_SPLITS",
    "TOFU_CONFIGS",
    "WMDP_CORPORA",
    "WMDP_SUBSETS",
    "load_mmlu",
    "load_muse",
    "load_tofu",
    "load_wmdp",
    "load_wmdp_corpora",
]

WMDP_REPO = "cais/wmdp"
WMDP_CORPORA_REPO = "cais/wmdp-corpora"
MMLU_REPO = "cais/mmlu"
TOFU_REPO = "locuslab/TOFU"

# Subset -> the subject lm-eval-harness writes in the WMDP prompt's description line.
WMDP_SUBSETS = {"bio": "biology", "chem": "chemistry", "cyber": "cybersecurity"}
WMDP_CORPORA = ("bio-forget-corpus", "bio-retain-corpus", "cyber-forget-corpus", "cyber-retain-corpus")
# Not in the Hub repository: CAIS hands it out on request (see the cais/wmdp-corpora dataset card).
_GATED_CORPORA = ("bio-forget-corpus",)

MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine",
    "college_physics", "computer_security", "conceptual_physics", "econometrics", "electrical_engineering",
    "elementary_mathematics", "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics", "high_school_mathematics",
    "high_school_microeconomics", "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy",
    "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    "virology", "world_religions",
)  # fmt: skip
MMLU_SPLITS = ("test", "validation", "dev", "auxiliary_train")

MUSE_CORPORA = ("Books", "News")
# Splits of each MUSE config (the Books repository has kept the older "retain2" names next to "retain").
MUSE_SPLITS = {
    "raw": ("forget", "retain1", "retain2", "holdout"),
    "verbmem": ("forget",),
    "knowmem": ("forget_qa", "forget_qa_icl", "retain_qa", "retain_qa_icl", "retain2_qa", "retain2_qa_icl"),
    "privleak": ("forget", "retain", "retain2", "holdout"),
}

TOFU_CONFIGS = (
    "full", "forget01", "forget05", "forget10", "retain90", "retain95", "retain99",
    "holdout01", "holdout05", "holdout10", "world_facts", "real_authors",
    "forget01_perturbed", "forget05_perturbed", "forget10_perturbed", "retain_perturbed",
    "world_facts_perturbed", "real_authors_perturbed",
)  # fmt: skip

_LOCAL_SUFFIXES = (".parquet", ".jsonl", ".json")


# ------------------------------------------------------------------------------------------- loaders


def load_wmdp(
    subset: str = "cyber", split: str = "test", *, data_dir: str | Path | None = None
) -> datasets.Dataset:
    """WMDP multiple-choice questions (``cais/wmdp``, config ``wmdp-{subset}``).

    Columns: ``question``, ``choices`` (4 strings), ``answer`` (index) and ``subject`` (the topic
    lm-eval-harness names in the prompt), ready for ``mcq_accuracy``.
    """
    subset = subset.removeprefix("wmdp-")
    _check_choice("WMDP subset", subset, WMDP_SUBSETS)
    _check_choice("WMDP split", split, ("test",))
    dataset = _load(WMDP_REPO, f"wmdp-{subset}", split, data_dir)
    _require_columns(dataset, ("question", "choices", "answer"), f"{WMDP_REPO}/wmdp-{subset}")
    return _with_column(dataset, "subject", [WMDP_SUBSETS[subset]] * len(dataset))


def load_wmdp_corpora(
    name: str = "cyber-forget-corpus", split: str = "train", *, data_dir: str | Path | None = None
) -> datasets.Dataset:
    """A WMDP forget/retain corpus (``cais/wmdp-corpora``): one document per row in ``text``."""
    _check_choice("WMDP corpus", name, WMDP_CORPORA)
    if name in _GATED_CORPORA and data_dir is None:
        raise MoEUnlearnError(
            f"The WMDP {name} is not on the Hub: CAIS shares it on request (see the cais/wmdp-corpora dataset "
            f"card). Once you have it, pass data_dir=<folder> containing {name}/train.jsonl (rows with a 'text' "
            "field); the open corpora are " + ", ".join(c for c in WMDP_CORPORA if c not in _GATED_CORPORA) + "."
        )
    dataset = _load(WMDP_CORPORA_REPO, name, split, data_dir)
    _require_columns(dataset, ("text",), f"{WMDP_CORPORA_REPO}/{name}")
    return dataset


def load_mmlu(
    subject: str = "all", split: str = "test", *, data_dir: str | Path | None = None
) -> datasets.Dataset:
    """MMLU (``cais/mmlu``), the utility benchmark WMDP results are reported with.

    Columns: ``question``, ``subject``, ``choices``, ``answer``.
    """
    _check_choice("MMLU subject", subject, ("all", *MMLU_SUBJECTS))
    _check_choice("MMLU split", split, MMLU_SPLITS)
    dataset = _load(MMLU_REPO, subject, split, data_dir)
    _require_columns(dataset, ("question", "subject", "choices", "answer"), f"{MMLU_REPO}/{subject}")
    return dataset


def load_muse(
    corpus: str = "Books", subset: str = "raw", split: str = "forget", *, data_dir: str | Path | None = None
) -> datasets.Dataset:
    """MUSE data (``muse-bench/MUSE-{corpus}``, config ``subset``).

    - ``raw`` (forget / retain1 / retain2 / holdout) and ``privleak``: documents in ``text`` (the forget
      and retain corpora for unlearning; privleak forget/holdout for the Min-K% attack);
    - ``verbmem/forget``: ``prompt`` and ``gt`` (true continuation), with ``answer`` = ``gt`` added;
    - ``knowmem`` (forget_qa, retain_qa and their ``_icl`` few-shot examples): ``question`` and
      ``answer``, with ``prompt`` = ``question`` added.
    """
    _check_choice("MUSE corpus", corpus, MUSE_CORPORA)
    _check_choice("MUSE subset", subset, MUSE_SPLITS)
    _check_choice(f"MUSE {subset} split", split, MUSE_SPLITS[subset])
    repo = f"muse-bench/MUSE-{corpus}"
    dataset = _load(repo, subset, split, data_dir)
    where = f"{repo}/{subset}/{split}"
    if subset in ("raw", "privleak"):
        _require_columns(dataset, ("text",), where)
    elif subset == "verbmem":
        _require_columns(dataset, ("prompt", "gt"), where)
        dataset = _with_column(dataset, "answer", list(dataset["gt"]))
    else:
        _require_columns(dataset, ("question", "answer"), where)
        dataset = _with_column(dataset, "prompt", list(dataset["question"]))
    return dataset


def load_tofu(
    config: str = "forget10", split: str = "train", *, data_dir: str | Path | None = None
) -> datasets.Dataset:
    """A TOFU config (``locuslab/TOFU``): ``question`` and ``answer``, with ``prompt`` = ``question`` added.

    ``*_perturbed`` configs also have ``paraphrased_answer`` and ``perturbed_answer`` (a list of false
    answers), the inputs of ``truth_ratio``; the ``forgetXX``/``retainYY`` pairs are complementary
    (forget10 with retain90, ...).
    """
    _check_choice("TOFU config", config, TOFU_CONFIGS)
    _check_choice("TOFU split", split, ("train",))
    dataset = _load(TOFU_REPO, config, split, data_dir)
    _require_columns(dataset, ("question", "answer"), f"{TOFU_REPO}/{config}")
    if config.endswith("_perturbed"):
        _require_columns(dataset, ("paraphrased_answer", "perturbed_answer"), f"{TOFU_REPO}/{config}")
    return _with_column(dataset, "prompt", list(dataset["question"]))


# ------------------------------------------------------------------------------------------- helpers


def _check_choice(what: str, value: str, valid: Sequence[str] | dict) -> None:
    if value not in valid:
        raise MoEUnlearnError(f"Unknown {what} {value!r}; valid values: {', '.join(valid)}.")


def _load(repo: str, config: str, split: str, data_dir: str | Path | None) -> datasets.Dataset:
    if data_dir is not None:
        return _load_local(Path(data_dir), config, split)
    try:
        return datasets.load_dataset(repo, config, split=split)
    except (OSError, ConnectionError, datasets.exceptions.DatasetsError) as err:
        raise MoEUnlearnError(
            f"Could not load {repo} (config {config!r}, split {split!r}) from the Hugging Face Hub: {err}\n"
            f"Without Hub access, download the dataset repository elsewhere (hf download {repo} "
            "--repo-type dataset --local-dir DIR), copy it over and pass data_dir=DIR."
        ) from err


def _load_local(root: Path, config: str, split: str) -> datasets.Dataset:
    """Read ``config``/``split`` from a local copy laid out as on the Hub (see module docstring)."""
    if not root.is_dir():
        raise MoEUnlearnError(f"data_dir {root} does not exist or is not a folder.")
    patterns = [f"{config}/{split}-*{s}" for s in _LOCAL_SUFFIXES]
    patterns += [f"{config}/{split}{s}" for s in _LOCAL_SUFFIXES]
    patterns += [f"{config}{s}" for s in _LOCAL_SUFFIXES]
    for pattern in patterns:
        files = sorted(root.glob(pattern))
        if files:
            builder = "parquet" if files[0].suffix == ".parquet" else "json"
            return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    raise MoEUnlearnError(
        f"No files for config {config!r}, split {split!r} under {root}; looked for: {', '.join(patterns)}."
    )


def _require_columns(dataset: datasets.Dataset, columns: Sequence[str], where: str) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise MoEUnlearnError(
            f"{where} lacks columns {missing} (it has {dataset.column_names}); local copies must keep the "
            "Hub's column names."
        )


def _with_column(dataset: datasets.Dataset, name: str, values: list) -> datasets.Dataset:
    """Add (or overwrite) a column; the Hub datasets never have the canonical names we add."""
    if name in dataset.column_names:
        dataset = dataset.remove_columns(name)
    return dataset.add_column(name, values)
