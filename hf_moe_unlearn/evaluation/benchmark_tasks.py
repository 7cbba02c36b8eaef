"""MUSE, TOFU and routing as tasks of ``hf-moe-unlearn evaluate``: the package's own metrics on the Hub datasets.

Each task has a ``load_*`` step (the data, through :mod:`hf_moe_unlearn.data.hub`; run before the model loads, so a
missing dataset fails early) and a ``run_*`` step (the metrics). Values that need a model retrained without the forget
set (MUSE PrivLeak, TOFU forget quality) are computed only when that model is given, and otherwise reported as not
computed with the reason: they have no meaning without it, and a published constant would not fit another model.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from ..errors import MoEUnlearnError

__all__ = ["BENCHMARK_TASKS", "load_task_data", "run_task"]

#: Task name -> what it reads (for the list of known tasks and the messages).
BENCHMARK_TASKS = {
    "muse_books": "muse-bench/MUSE-Books (verbmem, knowmem, privleak)",
    "muse_news": "muse-bench/MUSE-News (verbmem, knowmem, privleak)",
    "tofu": "locuslab/TOFU (the forget split's *_perturbed config, retain_perturbed, real_authors_perturbed, "
            "world_facts_perturbed)",
    "routing": "routing_forget and routing_retain text files (--task_data routing_forget=FILE,routing_retain=FILE)",
}
#: ``--task_data`` keys that are not task names: the routing task's two files.
EXTRA_DATA_KEYS = {"routing_forget": "routing", "routing_retain": "routing"}
TOFU_FORGET_SPLITS = ("forget01", "forget05", "forget10")


def _limit(dataset, limit: int | None):
    return dataset if limit is None else dataset.select(range(min(limit, len(dataset))))


def _hub_error(task: str, repo: str, err: MoEUnlearnError) -> MoEUnlearnError:
    return MoEUnlearnError(
        f"Task {task}: {err} To run offline, download it elsewhere (hf download {repo} --repo-type dataset "
        f"--local-dir DIR), copy DIR over and pass --task_data {task}=DIR."
    )


def load_task_data(task: str, task_data: dict[str, str], *, limit: int | None = None,
                   tofu_forget_split: str = "forget10") -> dict[str, Any]:
    """The datasets ``task`` reads, from ``task_data[task]`` (a local copy in the Hub layout) or the Hub."""
    from ..data.hub import load_muse, load_tofu

    if task in ("muse_books", "muse_news"):
        corpus = "Books" if task == "muse_books" else "News"
        data_dir = task_data.get(task)
        parts = {"verbmem": ("verbmem", "forget"), "knowmem_forget": ("knowmem", "forget_qa"),
                 "knowmem_forget_icl": ("knowmem", "forget_qa_icl"), "knowmem_retain": ("knowmem", "retain_qa"),
                 "knowmem_retain_icl": ("knowmem", "retain_qa_icl"), "privleak_forget": ("privleak", "forget"),
                 "privleak_holdout": ("privleak", "holdout")}
        try:
            data = {key: load_muse(corpus, subset, split, data_dir=data_dir) for key, (subset, split) in parts.items()}
        except MoEUnlearnError as err:
            if data_dir is not None:
                raise MoEUnlearnError(f"--task_data {task}={data_dir}: {err}") from err
            raise _hub_error(task, f"muse-bench/MUSE-{corpus}", err) from err
        # The few-shot examples are the prompt, not the evaluated set: never cut by --limit.
        return {k: v if k.endswith("_icl") else _limit(v, limit) for k, v in data.items()}
    if task == "tofu":
        if tofu_forget_split not in TOFU_FORGET_SPLITS:
            raise MoEUnlearnError(f"--tofu_forget_split {tofu_forget_split}: choose one of {', '.join(TOFU_FORGET_SPLITS)}.")
        data_dir = task_data.get(task)
        configs = {"forget": f"{tofu_forget_split}_perturbed", "retain": "retain_perturbed",
                   "real_authors": "real_authors_perturbed", "world_facts": "world_facts_perturbed"}
        try:
            return {key: _limit(load_tofu(config, data_dir=data_dir), limit) for key, config in configs.items()}
        except MoEUnlearnError as err:
            if data_dir is not None:
                raise MoEUnlearnError(f"--task_data tofu={data_dir}: {err}") from err
            raise _hub_error(task, "locuslab/TOFU", err) from err
    if task == "routing":
        from ..data.text import load_texts

        missing = [key for key in ("routing_forget", "routing_retain") if key not in task_data]
        if missing:
            raise MoEUnlearnError(
                f"Task routing needs the forget and retain texts it compares: pass "
                f"--task_data {','.join(f'{key}=FILE' for key in missing)} (.txt, .jsonl, .parquet or .csv)."
            )
        return {split: _limit(load_texts(task_data[f"routing_{split}"], f"routing {split}"), limit)
                for split in ("forget", "retain")}
    raise MoEUnlearnError(f"Unknown task {task!r}.")  # the harness checks names first; kept for direct callers


def run_task(task: str, model, tokenizer, data: dict[str, Any], *, retrain_model=None, selection=None,
             batch_size: int = 8) -> dict[str, Any]:
    """Compute ``task``'s metrics on ``model``; ``{"metrics": {...}, "not_computed": {metric: why}, ...}``."""
    if task in ("muse_books", "muse_news"):
        return _run_muse(model, tokenizer, data, retrain_model, batch_size)
    if task == "tofu":
        return _run_tofu(model, tokenizer, data, retrain_model, batch_size)
    if task == "routing":
        return _run_routing(model, tokenizer, data, selection, batch_size)
    raise MoEUnlearnError(f"Unknown task {task!r}.")


def _run_muse(model, tokenizer, data, retrain_model, batch_size) -> dict[str, Any]:
    from .mia import min_k, privleak
    from .muse import knowmem, verbmem

    common = {"batch_size": batch_size}
    vm = verbmem(model, tokenizer, data["verbmem"]["prompt"], data["verbmem"]["gt"], **common)
    kf = knowmem(model, tokenizer, data["knowmem_forget"]["question"], data["knowmem_forget"]["answer"],
                 icl_examples=list(data["knowmem_forget_icl"]), **common)
    kr = knowmem(model, tokenizer, data["knowmem_retain"]["question"], data["knowmem_retain"]["answer"],
                 icl_examples=list(data["knowmem_retain_icl"]), **common)
    texts = (data["privleak_forget"]["text"], data["privleak_holdout"]["text"])
    auc = min_k(model, tokenizer, *texts, **common)["auc"]
    metrics = {"verbmem_forget": vm["verbmem"], "knowmem_forget": kf["knowmem"], "knowmem_retain": kr["knowmem"],
               "min_k_auc": auc}
    not_computed = {}
    if retrain_model is not None:
        auc_retrain = min_k(retrain_model, tokenizer, *texts, **common)["auc"]
        metrics.update(privleak=privleak(auc, auc_retrain)["privleak"], min_k_auc_retrain=auc_retrain)
    else:
        not_computed["privleak"] = ("needs the Min-K% AUC of a model retrained without the forget set: pass "
                                    "--retrain_model")
    return {"metrics": metrics, "not_computed": not_computed,
            "n_samples": {"verbmem": len(data["verbmem"]), "knowmem_forget": len(data["knowmem_forget"]),
                          "knowmem_retain": len(data["knowmem_retain"]),
                          "privleak": [len(data["privleak_forget"]), len(data["privleak_holdout"])]}}


def _run_tofu(model, tokenizer, data, retrain_model, batch_size) -> dict[str, Any]:
    """TOFU as OpenUnlearning evaluates it: forget-set truth ratio (and forget quality against the retrained model's
    truth ratios), and model utility = harmonic mean of probability, ROUGE-L recall and truth ratio on the retain,
    real-authors and world-facts sets (probability normalised over the options on the last two)."""
    from .tofu import answer_probability, forget_quality, model_utility, qa_rouge, truth_ratio

    common = {"batch_size": batch_size}
    forget = data["forget"]
    f_tr = truth_ratio(model, tokenizer, forget["question"], forget["paraphrased_answer"], forget["perturbed_answer"],
                       "closer_to_1_better", **common)
    metrics = {"forget_truth_ratio": f_tr["truth_ratio"],
               "forget_probability": answer_probability(model, tokenizer, forget["question"], forget["answer"],
                                                        **common)["probability"],
               "forget_rouge": qa_rouge(model, tokenizer, forget["question"], forget["answer"], **common)["rouge"]}
    utility = {}
    for name in ("retain", "real_authors", "world_facts"):
        rows = data[name]
        if name == "retain":
            prob = answer_probability(model, tokenizer, rows["question"], rows["answer"], **common)["probability"]
            true_answers = rows["paraphrased_answer"]
        else:  # no paraphrase on these sets: the answer itself is the true option
            prob = answer_probability(model, tokenizer, rows["question"], rows["answer"], rows["perturbed_answer"],
                                      **common)["normalized_probability"]
            true_answers = rows["answer"]
        utility[f"{name}_probability"] = prob
        utility[f"{name}_rouge"] = qa_rouge(model, tokenizer, rows["question"], rows["answer"], **common)["rouge"]
        utility[f"{name}_truth_ratio"] = truth_ratio(model, tokenizer, rows["question"], true_answers,
                                                     rows["perturbed_answer"], "true_better", **common)["truth_ratio"]
    metrics.update(utility)
    metrics["model_utility"] = model_utility(utility)["model_utility"]
    not_computed = {}
    if retrain_model is not None:
        r_tr = truth_ratio(retrain_model, tokenizer, forget["question"], forget["paraphrased_answer"],
                           forget["perturbed_answer"], "closer_to_1_better", **common)
        metrics["forget_quality"] = forget_quality(f_tr["per_example"], r_tr["per_example"])["forget_quality"]
    else:
        not_computed["forget_quality"] = ("needs the forget-set truth ratios of a model retrained on the retain split "
                                          "only: pass --retrain_model")
    return {"metrics": metrics, "not_computed": not_computed, "n_samples": {k: len(v) for k, v in data.items()}}


def _run_routing(model, tokenizer, data, selection, batch_size) -> dict[str, Any]:
    """Each selected expert's share of forget and retain tokens with the adapter and, for a PEFT model, without it
    (the same weights with the adapter disabled: no second copy of the model)."""
    from .routing import routing_diagnostics

    if selection is None:
        raise MoEUnlearnError("Task routing needs the experts to watch: pass an hf-moe-unlearn --adapter (its "
                              "selection is read from adapter_config.json) or --selection FILE (a selection.json).")
    common = {"batch_size": batch_size}
    after = routing_diagnostics(model, tokenizer, data["forget"], data["retain"], selection, **common)
    disable = getattr(model, "disable_adapter", None)
    if disable is None:
        return {"metrics": _flatten_routing(after["experts"]), "not_computed": {
            "forget_ratio": "no adapter: there is no before/after to compare"}}
    with disable() if callable(disable) else nullcontext():
        before = routing_diagnostics(model, tokenizer, data["forget"], data["retain"], selection, **common)
    metrics, ratios = {}, []
    for key, row in after["experts"].items():
        row = {**row, **{k.replace("_after", "_before"): v for k, v in before["experts"][key].items()}}
        row["forget_ratio"] = row["forget_after"] / max(row["forget_before"], 1e-12)
        ratios.append(row["forget_ratio"])
        metrics.update({f"{key}_{k}": v for k, v in row.items()})
    metrics["mean_forget_ratio"] = sum(ratios) / len(ratios)
    return {"metrics": metrics, "not_computed": {}}


def _flatten_routing(experts: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{key}_{k}": v for key, row in experts.items() for k, v in row.items()}
