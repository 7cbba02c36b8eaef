"""``evaluate_model``: the function behind ``hf-moe-unlearn evaluate``.

Runs a list of tasks on a model (with an unlearning adapter or without) and writes ``results.json``, ``results.md``
and, when asked, the results into the adapter's model card as Hub ``model-index`` metadata:

- ``wmdp_bio``/``wmdp_chem``/``wmdp_cyber``/``wmdp``, ``mmlu``, its field groups and ``mmlu_<subject>``: through
  lm-evaluation-harness (:mod:`.lm_eval_tasks`), as the papers report them;
- ``muse_books``/``muse_news``, ``tofu``, ``routing``: this package's metrics (:mod:`.benchmark_tasks`).

Every name, file and the adapter are checked, and every dataset is loaded, before the model is.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import MoEUnlearnError
from .benchmark_tasks import BENCHMARK_TASKS, EXTRA_DATA_KEYS, load_task_data, run_task
from .lm_eval_tasks import LM_EVAL_TASKS

__all__ = ["ATTACKS", "KNOWN_TASKS", "evaluate_model", "known_tasks_text", "load_adapter_for_eval", "write_model_card_results"]

logger = logging.getLogger(__name__)

KNOWN_TASKS = (*LM_EVAL_TASKS, *BENCHMARK_TASKS)


def known_tasks_text() -> str:
    """The known task names, short: MMLU's 57 subjects as one pattern."""
    short = [t for t in KNOWN_TASKS if not (t.startswith("mmlu_") and LM_EVAL_TASKS.get(t, ("", None))[1])]
    return ", ".join(short) + ", mmlu_<subject> (the 57 MMLU subjects, e.g. mmlu_anatomy)"


def check_tasks(tasks: Sequence[str], task_data: Mapping[str, str]) -> list[str]:
    """The requested task names, checked: known, not repeated, and every ``task_data`` key used by one of them."""
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise MoEUnlearnError(f"No task given: pass --tasks with one or more of {known_tasks_text()}.")
    unknown = [t for t in tasks if t not in KNOWN_TASKS]
    if unknown:
        raise MoEUnlearnError(f"Unknown task(s) {', '.join(unknown)}. Known tasks: {known_tasks_text()}.")
    repeated = sorted({t for t in tasks if tasks.count(t) > 1})
    if repeated:
        raise MoEUnlearnError(f"Task(s) {', '.join(repeated)} given twice in --tasks.")
    for key, path in task_data.items():
        owner = EXTRA_DATA_KEYS.get(key, key)
        if owner not in KNOWN_TASKS:
            raise MoEUnlearnError(f"--task_data {key}={path}: {key} is not a task (nor routing_forget/routing_retain). "
                                  f"Known tasks: {known_tasks_text()}.")
        if owner not in tasks:
            raise MoEUnlearnError(f"--task_data {key}={path} is for task {owner}, which is not in --tasks "
                                  f"({', '.join(tasks)}): add it to --tasks or drop the file.")
        if not os.path.exists(path):
            raise MoEUnlearnError(f"--task_data {key}={path}: no such file or folder.")
    return tasks


# ------------------------------------------------------------------------------------------- model and adapter


def _read_adapter_config(adapter: str) -> dict[str, Any]:
    path = Path(adapter)
    if not path.is_dir():
        raise MoEUnlearnError(f"--adapter {adapter}: not a directory (give the folder save_pretrained wrote, with "
                              "adapter_config.json and adapter_model.safetensors).")
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise MoEUnlearnError(f"--adapter {adapter}: no adapter_config.json, so it is not a PEFT adapter folder.")
    try:
        return json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MoEUnlearnError(f"--adapter {adapter}: adapter_config.json is not valid JSON ({err}).") from err


def check_adapter_matches(model, adapter: str, config: Mapping[str, Any]):
    """Refuse an adapter made for another base model; return its expert selection (None for a plain PEFT adapter).

    An hf-moe-unlearn adapter records the selection with the base model's config fingerprint, which is compared
    with the model's (the names can differ: a local copy of a Hub model). A plain PEFT adapter records only
    ``base_model_name_or_path``: a different name is reported as a warning, and a different architecture fails
    when the weights do not fit.
    """
    from ..adapter.config import META_KEY, selection_from_config
    from ..moe.layers import config_fingerprint

    if META_KEY in (config.get("auto_mapping") or {}):
        selection = selection_from_config(config)
        if selection.model_fingerprint is not None and selection.model_fingerprint != config_fingerprint(model):
            raise MoEUnlearnError(
                f"--adapter {adapter} was made for another base model ({config.get('base_model_name_or_path')!r}, "
                f"config fingerprint {selection.model_fingerprint}); --model has fingerprint "
                f"{config_fingerprint(model)}. Pass the base model the adapter was trained on."
            )
        return selection
    base = config.get("base_model_name_or_path")
    mine = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if base and mine and Path(str(base)).name.lower() != Path(str(mine)).name.lower():
        logger.warning("--adapter %s names base model %r, --model is %r: check that they are the same model.",
                       adapter, base, mine)
    return None


def load_adapter_for_eval(model, adapter: str):
    """``(peft_model, selection)``: the adapter on ``model`` for inference, after checking it fits."""
    config = _read_adapter_config(adapter)
    selection = check_adapter_matches(model, adapter, config)
    try:
        if selection is not None:
            from ..adapter import ExpertPeftModel

            peft_model = ExpertPeftModel.from_pretrained(model, adapter)
        else:
            from peft import PeftModel

            peft_model = PeftModel.from_pretrained(model, adapter)
    except (RuntimeError, ValueError, KeyError) as err:  # shape mismatches, missing modules
        if isinstance(err, MoEUnlearnError):
            raise
        raise MoEUnlearnError(f"--adapter {adapter} does not fit --model: {str(err).strip().splitlines()[0]}") from err
    return peft_model.eval(), selection


def _load_model(model_or_name, tokenizer):
    if isinstance(model_or_name, (str, os.PathLike)):
        from ..cli import _load_model_and_tokenizer  # the loader (and its errors) every command uses

        model, loaded_tokenizer = _load_model_and_tokenizer(os.fspath(model_or_name))
        return model.eval(), tokenizer if tokenizer is not None else loaded_tokenizer, os.fspath(model_or_name)
    if tokenizer is None:
        raise MoEUnlearnError("evaluate_model(model, ...) with a model object needs tokenizer=.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    name = getattr(model_or_name, "name_or_path", None) or getattr(model_or_name.config, "_name_or_path", "") or None
    return model_or_name.eval(), tokenizer, name


# ------------------------------------------------------------------------------------------------ evaluation


def evaluate_model(
    model_or_name,
    tokenizer=None,
    adapter: str | None = None,
    tasks: Sequence[str] = ("wmdp_cyber", "mmlu"),
    task_data: Mapping[str, str] | None = None,
    *,
    output_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    retrain_model=None,
    selection=None,
    tofu_forget_split: str = "forget10",
    log_samples: bool = False,
    model_card: bool = False,
    attacks: Sequence[str] = (),
) -> dict[str, Any]:
    """Evaluate a model, with an unlearning adapter or not, on ``tasks``.

    Args:
        model_or_name: a local path or Hub name, or a loaded model (then ``tokenizer`` is required).
        adapter: a PEFT adapter folder (hf-moe-unlearn's or any LoRA adapter of this base model).
        tasks: task names (:data:`KNOWN_TASKS`).
        task_data: ``{task: local copy}`` in the Hub format, for offline runs: a question/choices/answer file (or a
            folder in the Hub layout) for lm-eval tasks, the dataset folder for ``muse_*``/``tofu``, and
            ``routing_forget``/``routing_retain`` text files for ``routing``.
        output_dir: where ``results.json`` and ``results.md`` go (nothing is written when None).
        limit: at most this many examples per dataset (a smoke run; the numbers are then not the benchmark's).
        retrain_model: a model retrained without the forget set (path or object): enables MUSE PrivLeak and TOFU
            forget quality, which are reported as not computed without it.
        selection: an ``ExpertSelection`` (or selection.json path) for the ``routing`` task when the adapter is not
            an hf-moe-unlearn adapter.
        log_samples: keep lm-eval's per-question log-likelihoods in the results.
        model_card: write the results into ``adapter``'s README.md as model-index metadata.
        attacks: routing attacks (:data:`ATTACKS`: ``expert_masking``, ``routing_restore``) under which every task
            is run again (hf_moe_unlearn.evaluation.attacks; docs/routing-attacks.md): does the forgetting survive
            when the edited experts are removed from routing, or when the original model's routing is forced? Needs
            an adapter that records its edited experts. Results go to ``report["attacks"][attack][task]``.

    Returns:
        ``{"results": {task: {"metrics": .., ...}}, "model": .., "adapter": .., "tasks": .., "versions": .., ...}``.
    """
    task_data = dict(task_data or {})
    tasks = check_tasks(list(tasks), task_data)
    if batch_size < 1:
        raise MoEUnlearnError(f"batch_size {batch_size} must be at least 1.")
    if limit is not None and limit < 1:
        raise MoEUnlearnError(f"limit {limit} must be at least 1 (leave it out for every example).")
    attacks = check_attacks(list(attacks), adapter, tasks)
    if model_card and adapter is None:
        raise MoEUnlearnError("model_card writes the results into the adapter's README.md: it needs an adapter.")
    adapter_config = _read_adapter_config(adapter) if adapter is not None else None
    if selection is not None:
        from ..routing import ExpertSelection

        selection = ExpertSelection.load(selection) if isinstance(selection, (str, os.PathLike)) else \
            ExpertSelection.coerce(selection)

    # Data first (a missing dataset must not cost a model load), then the model.
    lm_tasks = [t for t in tasks if t in LM_EVAL_TASKS]
    prepared = []
    if lm_tasks:
        from .lm_eval_tasks import prepare_lm_eval_tasks

        prepared = prepare_lm_eval_tasks(lm_tasks, {t: p for t, p in task_data.items() if t in lm_tasks})
    own_data = {t: load_task_data(t, task_data, limit=limit, tofu_forget_split=tofu_forget_split)
                for t in tasks if t in BENCHMARK_TASKS}

    model, tokenizer, model_name = _load_model(model_or_name, tokenizer)
    if adapter is not None:
        model, adapter_selection = load_adapter_for_eval(model, adapter)
        selection = selection or adapter_selection
    if retrain_model is not None and isinstance(retrain_model, (str, os.PathLike)):
        retrain_model = _load_model(retrain_model, tokenizer)[0]

    results: dict[str, Any] = {}
    if prepared:
        from .lm_eval_tasks import run_lm_eval

        results.update(run_lm_eval(model, tokenizer, prepared, batch_size=batch_size, limit=limit,
                                   log_samples=log_samples))
    for task, data in own_data.items():
        results[task] = run_task(task, model, tokenizer, data, retrain_model=retrain_model, selection=selection,
                                 batch_size=batch_size)
        if task in task_data:
            results[task]["local_data"] = os.path.abspath(task_data[task])
    attacked = {attack: _run_under_attack(attack, model, tokenizer, tasks, prepared, own_data,
                                          retrain_model=retrain_model, selection=selection, batch_size=batch_size,
                                          limit=limit, log_samples=log_samples) for attack in attacks}
    report = {
        "model": model_name,
        "adapter": os.path.abspath(adapter) if adapter else None,
        "adapter_base_model": (adapter_config or {}).get("base_model_name_or_path"),
        "tasks": tasks,
        "task_data": {k: os.path.abspath(v) for k, v in task_data.items()},
        "limit": limit,
        "batch_size": batch_size,
        "retrain_model": getattr(retrain_model, "name_or_path", None) if retrain_model is not None else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(bool(prepared)),
        "results": results,
        **({"attacks": attacked} if attacks else {}),
    }
    if output_dir is not None:
        write_results(report, output_dir)
    if model_card:
        write_model_card_results(adapter, report)
    return report


#: Routing attacks ``evaluate`` can run every task under (the context managers of evaluation/attacks.py).
ATTACKS = ("expert_masking", "routing_restore")
#: Tasks an attack cannot run: routing diagnostics compare the model's own routing (an attack replaces it), and
#: routing restore reruns the original model on each forward's whole input, which generation with a cache breaks
#: (MUSE's VerbMem/KnowMem and TOFU's ROUGE generate).
_NOT_UNDER_ATTACK = {"expert_masking": {"routing": "routing diagnostics read the model's own routing"},
                     "routing_restore": {"routing": "routing diagnostics read the model's own routing",
                                         "muse_books": "it generates with a cache", "muse_news": "it generates with a cache",
                                         "tofu": "it generates with a cache"}}


def check_attacks(attacks: Sequence[str], adapter: str | None, tasks: Sequence[str]) -> list[str]:
    """The attacks, validated before anything loads: known names, no repeats, an adapter to take the edited experts
    (masking) and the original routing (restore, the adapter disabled) from, and a task each can run."""
    attacks = [a.strip() for a in attacks if a.strip()]
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise MoEUnlearnError(f"Unknown attack {unknown[0]!r}: the attacks are {', '.join(ATTACKS)}.")
    if len(set(attacks)) != len(attacks):
        raise MoEUnlearnError(f"An attack is named twice in {','.join(attacks)}.")
    if attacks and adapter is None:
        raise MoEUnlearnError("The routing attacks need --adapter: expert masking removes the experts the adapter "
                              "edited, routing restore takes the routing of the model with the adapter disabled.")
    for attack in attacks:
        if all(task in _NOT_UNDER_ATTACK[attack] for task in tasks):
            raise MoEUnlearnError(f"No task of {','.join(tasks)} can run under {attack}: "
                                  + "; ".join(f"{t}: {_NOT_UNDER_ATTACK[attack][t]}" for t in tasks) + ".")
    return attacks


def _run_under_attack(attack: str, model, tokenizer, tasks, prepared, own_data, *, retrain_model, selection,
                      batch_size: int, limit, log_samples: bool) -> dict[str, Any]:
    """Every task that ``attack`` can run, inside its context; the others are listed with the reason."""
    from .attacks import mask_experts, restore_routing

    context = mask_experts(model) if attack == "expert_masking" else restore_routing(model)
    skipped = _NOT_UNDER_ATTACK[attack]
    out: dict[str, Any] = {}
    with context:
        if prepared:
            from .lm_eval_tasks import run_lm_eval

            out.update(run_lm_eval(model, tokenizer, prepared, batch_size=batch_size, limit=limit,
                                   log_samples=log_samples))
        for task, data in own_data.items():
            if task not in skipped:
                out[task] = run_task(task, model, tokenizer, data, retrain_model=retrain_model, selection=selection,
                                     batch_size=batch_size)
    for task in tasks:
        if task in skipped:
            out[task] = {"metrics": {}, "not_computed": {"all": f"not run under {attack}: {skipped[task]}"}}
    return out


def _versions(with_lm_eval: bool) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("hf-moe-unlearn", "transformers", "peft", "torch", "datasets") + (("lm-eval",) if with_lm_eval else ()):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


# ------------------------------------------------------------------------------------------------ outputs


def results_markdown(report: Mapping[str, Any]) -> str:
    """One row per task and metric, then what was not computed and why."""
    lines = [f"Model: `{report['model']}`" + (f", adapter: `{report['adapter']}`" if report.get("adapter") else ""),
             f"Date: {report['date']}" + (f", limit: {report['limit']} examples per dataset (not the full benchmark)"
                                          if report.get("limit") else ""), "",
             "| task | metric | value | data |", "|---|---|---|---|"]
    notes = []
    for task, entry in report["results"].items():
        info = entry.get("lm_eval", {})
        if "local_file" in info:
            where = f"local {Path(info['local_file']).name} (sha256 {info['local_sha256'][:12]})"
        elif info:
            where = f"{info.get('dataset')}@{(info.get('dataset_revision') or 'unknown revision')[:12]}, " \
                    f"lm-eval {info.get('lm_eval_version')} task v{info.get('task_version')}"
        else:
            where = f"local {entry['local_data']}" if entry.get("local_data") else "Hub"
        for metric, value in entry["metrics"].items():
            lines.append(f"| {task} | {metric} | {value:.4f} | {where} |")
        notes += [f"- {task} {metric}: not computed ({why})" for metric, why in entry.get("not_computed", {}).items()]
    for attack, entries in report.get("attacks", {}).items():
        lines += ["", f"Under {attack} (docs/routing-attacks.md):", "", "| task | metric | value |", "|---|---|---|"]
        for task, entry in entries.items():
            lines += [f"| {task} | {metric} | {value:.4f} |" for metric, value in entry["metrics"].items()]
            notes += [f"- {task} {metric} under {attack}: not computed ({why})"
                      for metric, why in entry.get("not_computed", {}).items()]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write_results(report: Mapping[str, Any], output_dir: str | os.PathLike) -> Path:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "results.md").write_text(results_markdown(report))
    return out


#: lm-eval task -> (Hub dataset id, config) for the model-index ``dataset`` block; others use BENCHMARK_TASKS' repo.
_CARD_DATASETS = {"muse_books": ("muse-bench/MUSE-Books", None), "muse_news": ("muse-bench/MUSE-News", None),
                  "tofu": ("locuslab/TOFU", None), "routing": ("routing-diagnostics", None)}


def write_model_card_results(adapter: str, report: Mapping[str, Any]) -> Path:
    """Put ``report``'s metrics into ``adapter``/README.md as Hub evaluation metadata (``model-index``).

    Uses ``huggingface_hub``'s ``ModelCard``/``EvalResult``, the format the Hub parses. Results of other datasets
    already in the card are kept; those of the evaluated tasks are replaced. A card that does not exist yet is
    created with the metadata block only.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    path = Path(adapter) / "README.md"
    card = ModelCard.load(path) if path.is_file() else ModelCard(f"---\n{ModelCardData().to_yaml()}\n---\n")
    new = []
    for task, entry in report["results"].items():
        info = entry.get("lm_eval", {})
        dataset, config = _CARD_DATASETS.get(task, (info.get("dataset"), info.get("dataset_config")))
        local = "local_file" in info or bool(entry.get("local_data"))  # no Hub revision to name
        for metric, value in entry["metrics"].items():
            new.append(EvalResult(
                task_type="text-generation", dataset_type=dataset or task, dataset_name=task,
                dataset_config=config, dataset_split="test" if info else None,
                dataset_revision=None if local else info.get("dataset_revision"),
                dataset_args={"limit": report["limit"]} if report.get("limit") else None,
                metric_type=metric, metric_value=float(value), metric_name=f"{task} {metric}",
            ))
    evaluated = {r.dataset_name for r in new}
    kept = [r for r in (card.data.eval_results or []) if r.dataset_name not in evaluated]
    card.data.eval_results = kept + new
    if not card.data.model_name:
        card.data.model_name = Path(os.path.abspath(adapter)).name
    card.text = _replace_evaluation_section(card.text, card.data.eval_results)
    card.save(path)
    return path


def _replace_evaluation_section(text: str, results) -> str:
    """The body's "## Evaluation" section (written by build_model_card) rewritten as the table of ``results``."""
    table = "\n".join(["| dataset | metric | value |", "|---|---|---|"]
                      + [f"| {r.dataset_name} | {r.metric_type} | {r.metric_value:.4g} |" for r in results])
    section = f"## Evaluation\n\n{table}\n"
    start = text.find("## Evaluation")
    if start < 0:
        return text.rstrip() + "\n\n" + section
    end = text.find("\n## ", start + 1)
    return text[:start] + section + ("\n" + text[end + 1:] if end >= 0 else "")
