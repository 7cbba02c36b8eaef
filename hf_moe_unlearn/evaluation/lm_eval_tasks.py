"""WMDP and MMLU through lm-evaluation-harness: its task definitions, prompts, scoring and metric, not ours.

The papers (WMDP, SEUF, RMU) report `lm_eval` accuracies, so the numbers here are lm-eval's own: ``HFLM`` wraps the
(PEFT-)model object, ``simple_evaluate`` runs the registered task zero-shot. lm-eval is an optional extra
(``pip install hf-moe-unlearn[eval]``) and is imported only when one of these tasks runs.

A local copy of a task's data (``--task_data wmdp_cyber=FILE``) is given to lm-eval through its own override
mechanism: an inline group whose member is the *registered* task with only ``dataset_path``/``dataset_name``/
``dataset_kwargs`` replaced (lm-eval merges the overrides into the task's YAML), so ``doc_to_text``, the choices,
the description and ``acc`` stay lm-eval's.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.hub import MMLU_SUBJECTS
from ..errors import MoEUnlearnError

__all__ = ["LM_EVAL_TASKS", "LmEvalTask", "is_lm_eval_task", "prepare_lm_eval_tasks", "run_lm_eval"]

_WMDP = {"wmdp_bio": "wmdp-bio", "wmdp_chem": "wmdp-chem", "wmdp_cyber": "wmdp-cyber"}
#: lm-eval names MMLU's subjects ``mmlu_<subject>`` (the cais/mmlu configs) and groups them by field.
_MMLU_GROUPS = ("mmlu", "mmlu_stem", "mmlu_humanities", "mmlu_social_sciences", "mmlu_other")
#: Tasks run through lm-eval: name -> (Hub dataset, config). Groups have no single config (None).
LM_EVAL_TASKS: dict[str, tuple[str, str | None]] = {
    "wmdp": ("cais/wmdp", None),
    **{name: ("cais/wmdp", config) for name, config in _WMDP.items()},
    **{name: ("cais/mmlu", None) for name in _MMLU_GROUPS},
    **{f"mmlu_{subject}": ("cais/mmlu", subject) for subject in MMLU_SUBJECTS},
}
_LOCAL_GROUP = "hf_moe_unlearn_local_data"
_MCQ_COLUMNS = ("question", "choices", "answer")
_LOCAL_SUFFIXES = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}


def is_lm_eval_task(name: str) -> bool:
    return name in LM_EVAL_TASKS


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise MoEUnlearnError(
            f"WMDP and MMLU run through lm-evaluation-harness, which is not installed ({err}). Install it with "
            "pip install 'hf-moe-unlearn[eval]' (or pip install 'lm-eval>=0.4.12,<0.5')."
        ) from err
    return lm_eval, HFLM, TaskManager


@functools.lru_cache(maxsize=1)
def _task_manager():
    """lm-eval's index of its task YAMLs, built once per process (it reads ~15k files: seconds)."""
    _, _, TaskManager = _import_lm_eval()
    return TaskManager()


@dataclass
class LmEvalTask:
    """One requested lm-eval task, built (its data loaded) before the model, so a missing dataset fails early."""

    name: str
    local_file: str | None = None
    local_sha256: str | None = None
    built: Any = None  # lm-eval's Task or Group
    leaves: dict[str, Any] = field(default_factory=dict)  # leaf task name -> Task


def _local_file(task: str, path: str) -> str:
    """The data file of ``task`` in a local copy: ``path`` itself, or the test split inside a Hub-layout folder."""
    p = Path(path)
    if p.is_dir():
        config = LM_EVAL_TASKS[task][1]
        candidates = [f for s in _LOCAL_SUFFIXES for f in sorted(p.glob(f"{config}/test*{s}")) + sorted(p.glob(f"test*{s}"))]
        if not candidates:
            raise MoEUnlearnError(
                f"--task_data {task}={path}: the folder holds no {config}/test-*.parquet|jsonl|json (the layout of "
                f"{LM_EVAL_TASKS[task][0]} on the Hub) and no test-*.parquet|jsonl|json; give the file itself."
            )
        p = candidates[0]
    if not p.is_file():
        raise MoEUnlearnError(f"--task_data {task}={path}: no such file.")
    if p.suffix not in _LOCAL_SUFFIXES:
        raise MoEUnlearnError(f"--task_data {task}={path}: expected a .jsonl, .json or .parquet file in the "
                              f"{LM_EVAL_TASKS[task][0]} format (question, choices, answer).")
    return str(p.resolve())


def _check_mcq_file(task: str, path: str) -> None:
    """Refuse a file lm-eval would fail on deep inside (or score wrongly): rows of question, 4 choices, answer 0-3."""
    import datasets

    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()  # a bar for a check of a few rows is noise before a one-line error
    try:
        data = datasets.load_dataset(_LOCAL_SUFFIXES[Path(path).suffix], data_files={"test": path}, split="test")
    except Exception as err:  # datasets raises several unrelated types for an unreadable file
        cause = err.__cause__ or err
        raise MoEUnlearnError(f"--task_data {task}={path}: cannot read the file as "
                              f"{_LOCAL_SUFFIXES[Path(path).suffix]} rows ({type(cause).__name__}: "
                              f"{str(cause).strip().splitlines()[0] if str(cause).strip() else ''}).") from err
    finally:
        if bars_were_on:
            datasets.utils.enable_progress_bars()
    missing = [c for c in _MCQ_COLUMNS if c not in data.column_names]
    if missing:
        raise MoEUnlearnError(f"--task_data {task}={path}: rows lack {missing} (they have {data.column_names}); "
                              f"{LM_EVAL_TASKS[task][0]} rows have question, choices (4 strings) and answer (0-3).")
    if len(data) == 0:
        raise MoEUnlearnError(f"--task_data {task}={path}: the file has no rows.")
    for i, row in enumerate(data):
        choices, answer = row["choices"], row["answer"]
        if not isinstance(row["question"], str) or not isinstance(choices, list) or len(choices) != 4 \
                or not all(isinstance(c, str) for c in choices):
            raise MoEUnlearnError(f"--task_data {task}={path}: row {i} needs a question string and 4 choice strings "
                                  f"(got question {row['question']!r}, choices {choices!r}).")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < 4:
            raise MoEUnlearnError(f"--task_data {task}={path}: row {i} has answer {answer!r}; it must be the index "
                                  "(0-3) of the right choice, as in the Hub dataset.")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _spec(task: str, local_file: str | None) -> str | dict[str, Any]:
    if local_file is None:
        return task
    override = {"task": task, "dataset_path": _LOCAL_SUFFIXES[Path(local_file).suffix], "dataset_name": None,
                "dataset_kwargs": {"data_files": {"test": local_file}}}
    return {"group": f"{_LOCAL_GROUP}_{task}", "task": [override]}


def prepare_lm_eval_tasks(tasks: list[str], task_data: dict[str, str]) -> list[LmEvalTask]:
    """Check local files and build lm-eval's tasks (which loads their data) before any model is loaded.

    A task without ``--task_data`` reads the Hub dataset (or the ``datasets`` cache); when that fails offline the
    error says which dataset and how to pass a local copy.
    """
    _import_lm_eval()
    for name in task_data:
        if name in LM_EVAL_TASKS and LM_EVAL_TASKS[name][1] is None:
            raise MoEUnlearnError(
                f"--task_data {name}=...: {name} is a group of lm-eval tasks, so one file cannot stand for it; "
                f"give a file per task ({', '.join(t for t in LM_EVAL_TASKS if t.startswith(name + '_'))[:200]}, ...)."
            )
    prepared = []
    for name in tasks:  # every local file checked before lm-eval indexes its ~15k task files (seconds)
        item = LmEvalTask(name)
        if name in task_data:
            item.local_file = _local_file(name, task_data[name])
            _check_mcq_file(name, item.local_file)
            item.local_sha256 = _sha256(item.local_file)
        prepared.append(item)
    manager = _task_manager()
    for item in prepared:
        name = item.name
        try:
            loaded = manager.load([_spec(name, item.local_file)])
        except (OSError, ConnectionError, ValueError) as err:  # ConnectionError offline, FileNotFoundError, ...
            repo, config = LM_EVAL_TASKS[name]
            where = f"{repo}" + (f" (config {config})" if config else "")
            example = (f"--task_data {name}=FILE" if config else
                       "--task_data " + " ".join(f"{t}=FILE" for t in LM_EVAL_TASKS
                                                 if t.startswith(f"{name}_") and LM_EVAL_TASKS[t][1])[:120] + " ...")
            raise MoEUnlearnError(
                f"Task {name}: cannot load {where} ({type(err).__name__}: {str(err).strip().splitlines()[0]}). "
                f"Without Hub access, download it elsewhere (hf download {repo} --repo-type dataset --local-dir DIR) "
                f"and pass {example} (a .parquet/.jsonl file of question, choices, answer rows)."
            ) from err
        item.built = [loaded["groups"][g] for g in loaded["groups"] if g == name or g.startswith(_LOCAL_GROUP)] \
            or list(loaded["tasks"].values())
        item.leaves = dict(loaded["tasks"])
    return prepared


def dataset_revision(task_obj) -> str | None:
    """The Hub commit the task's data was read at, as ``datasets`` recorded it (None for a local file).

    lm-eval's WMDP/MMLU YAMLs pin no revision, and the Hub datasets have changed (WMDP in 2024), so the commit
    actually read is taken from where ``datasets`` put it: the ``hf://datasets/<repo>@<sha>/`` URLs of the
    download checksums, or the ``<sha>`` folder of its cache (the builder hash of a Hub dataset is its commit).
    """
    dataset = getattr(task_obj, "dataset", None)
    if dataset is None:
        return None
    splits = dataset.values() if hasattr(dataset, "values") else [dataset]
    for split in splits:
        urls = " ".join((split.info.download_checksums or {}).keys())
        match = re.search(r"@([0-9a-f]{40})/", urls)
        if match:
            return match.group(1)
        for cache in split.cache_files:
            for part in Path(cache["filename"]).parts:
                if re.fullmatch(r"[0-9a-f]{40}", part):
                    return part
    return None


def run_lm_eval(model, tokenizer, prepared: list[LmEvalTask], *, batch_size: int = 8, limit: int | None = None,
                log_samples: bool = False) -> dict[str, dict[str, Any]]:
    """Run the prepared tasks zero-shot on ``model`` (a transformers or PEFT model object) with lm-eval's HFLM.

    Returns ``{task: {"metrics": {...}, "lm_eval": {version, n_samples, dataset, revision, ...}, "samples": [...]}}``
    with one entry per requested task and one per leaf task of a group.
    """
    lm_eval, HFLM, _ = _import_lm_eval()
    from lm_eval import simple_evaluate

    # An already-built model object: HFLM then takes its device and config as they are (and ignores `device`).
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(_device(model)))
    objects = [obj for item in prepared for obj in item.built]
    out = simple_evaluate(lm, tasks=objects, task_manager=_task_manager(), limit=limit, log_samples=log_samples,
                          bootstrap_iters=0, num_fewshot=None)
    results: dict[str, dict[str, Any]] = {}
    for item in prepared:
        names = [item.name] + [leaf for leaf in item.leaves if leaf != item.name]
        for name in names:
            raw = out["results"].get(name)
            if raw is None:
                continue
            metrics = {key.split(",")[0]: value for key, value in raw.items()
                       if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
            config = out.get("configs", {}).get(name, {})
            leaf = item.leaves.get(name)
            info = {
                "lm_eval_version": out.get("lm_eval_version") or getattr(lm_eval, "__version__", None),
                "task_version": out.get("versions", {}).get(name),
                "n_samples": out.get("n-samples", {}).get(name),
                "num_fewshot": out.get("n-shot", {}).get(name),
                "dataset": LM_EVAL_TASKS.get(name, (config.get("dataset_path"), None))[0] or config.get("dataset_path"),
                "dataset_config": config.get("dataset_name"),
                "dataset_revision": (config.get("dataset_kwargs") or {}).get("revision")
                or (dataset_revision(leaf) if leaf is not None and item.local_file is None else None),
            }
            if item.local_file is not None:
                info.update(local_file=item.local_file, local_sha256=item.local_sha256)
            entry: dict[str, Any] = {"metrics": metrics, "lm_eval": info}
            if log_samples and name in out.get("samples", {}):
                entry["samples"] = [
                    {"doc_id": s["doc_id"], "target": s["target"], "loglikelihoods": [r[0] for r in s["filtered_resps"]],
                     "acc": s.get("acc")}
                    for s in out["samples"][name]
                ]
            results[name] = entry
    return results


def _device(model):
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return "cpu"
