"""Reading forget/retain data and turning it into token batches with the right labels.

Two shapes of example are understood, as in TRL: plain documents (a ``text`` column) where every token is
trained on, and question/answer pairs (``prompt``/``question`` + ``answer``/``completion``) where only answer
tokens carry labels. Optional other answers to the same prompt are tokenised too, each with the prompt and its own
labels: an ``idk`` column (an "I don't know"-style answer, for the ``idk_nll``/``idk_dpo`` forget losses) into
``idk_input_ids``/``idk_attention_mask``/``idk_labels``, an ``alternate`` column (an answer to prefer over the true
one, for the ``dpo`` forget loss) into ``alternate_*``.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
from typing import Any, Sequence

import torch

from ..errors import MoEUnlearnError

PROMPT_COLUMNS = ("prompt", "question")
ANSWER_COLUMNS = ("answer", "completion", "response")
IDK_COLUMN = "idk"
ALTERNATE_COLUMN = "alternate"
#: Other answers to a prompt/answer example's prompt, each tokenised like the answer into ``{column}_input_ids`` etc.
OTHER_ANSWER_COLUMNS = (IDK_COLUMN, ALTERNATE_COLUMN)
#: Shortest ``max_length`` that can leave a label after the causal shift (a label on the first token is never a
#: target: nothing precedes it).
MIN_MAX_LENGTH = 2

logger = logging.getLogger(__name__)


def load_texts(path: str | os.PathLike, name: str = "dataset"):
    """Load a forget/retain file as a ``datasets.Dataset``.

    ``.txt``: one document per non-empty line; ``.jsonl``/``.json``/``.parquet``/``.csv``: rows with a ``text``
    column or prompt/answer columns; a directory: a dataset saved with ``save_to_disk``.

    Everything that can be told from the file alone is checked here, before any model is loaded: UTF-8, JSON
    syntax (with the line), one object per row, the columns, the type of every text/prompt/answer value, empty
    answers. Each refusal is a :class:`MoEUnlearnError` naming the file and what to fix.
    """
    import datasets

    path = os.fspath(path)
    if not os.path.exists(path):
        raise MoEUnlearnError(f"The {name} file {path} does not exist.")
    where = f"the {name} file {path}"
    label = _example_label
    if os.path.isdir(path):
        try:
            dataset = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError, OSError) as err:
            raise MoEUnlearnError(
                f"Cannot read {where}: a directory must hold a dataset written by datasets' save_to_disk "
                f"({_reason(err)}). Give a .txt, .jsonl, .json, .parquet or .csv file instead."
            ) from err
        if isinstance(dataset, datasets.DatasetDict):
            split = "train" if "train" in dataset else next(iter(dataset))
            dataset = dataset[split]
    elif path.endswith(".txt"):
        lines = _read_utf8(path, where).splitlines()
        dataset = datasets.Dataset.from_dict({"text": [line for line in lines if line.strip()]})
    elif path.endswith((".jsonl", ".json")):
        rows, line_numbers = _read_json_rows(path, where)
        if rows:
            label = (lambda i: f"line {line_numbers[i]}") if line_numbers else (lambda i: f"row {i}")
            check_rows(rows, where, label)  # before from_list: mixed types would fail inside pyarrow
        dataset = datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict({"text": []})
    elif path.endswith((".parquet", ".csv")):
        kind = "Parquet" if path.endswith(".parquet") else "CSV"
        reader = datasets.Dataset.from_parquet if kind == "Parquet" else datasets.Dataset.from_csv
        verbosity = datasets.logging.get_verbosity()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # it also logs the failure: one message is enough
        bars = not datasets.utils.are_progress_bars_disabled()
        datasets.utils.disable_progress_bars()  # "Generating train split" for one local file is noise
        try:
            dataset = reader(path)
        except Exception as err:  # datasets wraps pyarrow/pandas errors in several types; the root says why
            reason = _reason(err)
            hint = " Save it as UTF-8." if "utf" in reason.lower() or isinstance(_root(err), UnicodeError) else ""
            raise MoEUnlearnError(f"Cannot read {where} as {kind}: {reason}.{hint}") from err
        finally:
            datasets.logging.set_verbosity(verbosity)
            if bars:
                datasets.utils.enable_progress_bars()
        if kind == "CSV":
            label = lambda i: f"data row {i + 1}"  # noqa: E731
    else:
        raise MoEUnlearnError(
            f"Cannot read {path}: use .txt (one document per line), .jsonl, .json, .parquet, .csv, or a directory "
            f"written by datasets' save_to_disk."
        )
    check_examples(dataset, name, path=path, label=label)
    if example_format(dataset.column_names) == "qa":
        check_answers(dataset, f"{name} ({path})")
    return dataset


def _root(err: BaseException) -> BaseException:
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return err


def _reason(err: BaseException) -> str:
    """The first line of the innermost error: datasets' own wrapper says only "An error occurred"."""
    root = _root(err)
    text = (str(root).strip().splitlines() or [type(root).__name__])[0]
    return text.rstrip(".")


def _read_utf8(path: str, where: str) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise MoEUnlearnError(
            f"{where[0].upper()}{where[1:]} is not UTF-8 text: byte 0x{raw[err.start]:02x} on line {line} cannot be "
            f"decoded. Re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
        ) from None


def _read_json_rows(path: str, where: str) -> tuple[list[Any], list[int]]:
    """Rows of a .jsonl (one JSON object per line; blank lines skipped) or .json file (a list of objects, an object
    with a ``data``/``rows`` list, or one object), and the line of each row (.jsonl only)."""
    text = _read_utf8(path, where)
    if path.endswith(".jsonl"):
        rows, numbers = [], []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise MoEUnlearnError(
                    f"{where[0].upper()}{where[1:]} is not valid JSON Lines: line {number}, column {err.colno}: "
                    f"{err.msg}. Each line must be one JSON object, e.g. {{\"text\": \"...\"}}."
                ) from None
            numbers.append(number)
        return rows, numbers
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise MoEUnlearnError(
            f"{where[0].upper()}{where[1:]} is not valid JSON: line {err.lineno}, column {err.colno}: {err.msg}."
        ) from None
    if isinstance(data, dict):
        data = data.get("data", data.get("rows", [data]))
    if not isinstance(data, list):
        raise MoEUnlearnError(
            f"{where[0].upper()}{where[1:]} holds a JSON {type(data).__name__}; expected a list of objects "
            f"(rows), or an object with a 'data' or 'rows' list."
        )
    return data, []


def _example_label(index: int) -> str:
    return f"example {index}"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, numbers.Number):
        return f"a number ({value!r})"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def check_rows(rows: Sequence[Any], where: str, label=_example_label) -> None:
    """Every row is an object (a dict) whose columns have the types training needs (see :func:`check_columns`)."""
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise MoEUnlearnError(
                f"{where[0].upper()}{where[1:]}: {label(index)} is {_kind(row)}, not an object with a 'text' or "
                f"prompt/answer fields."
            )
    columns = sorted({key for row in rows for key in row})
    example_format(columns, where)
    check_columns({c: [row.get(c) for row in rows] for c in columns}, where, label)


def check_columns(columns: dict[str, Sequence[Any]], where: str, label=_example_label) -> None:
    """Refuse values training cannot use, naming the first bad one: ``text`` must be a string in every example;
    a prompt/answer pair needs a string prompt (answers may be missing: :func:`check_answers` refuses those with
    its own message) and string answers/``idk``/``alternate``; ``input_ids``/``labels`` lists of integers of the same
    length."""
    fmt = example_format(list(columns), where)
    size = len(next(iter(columns.values()), []))

    def fail(index: int, column: str, value: Any, wanted: str) -> None:
        missing = value is None
        raise MoEUnlearnError(
            f"{where[0].upper()}{where[1:]}: {label(index)} "
            + (f"has no '{column}' value (missing or null)" if missing else f"has {_kind(value)} in '{column}'")
            + f"; every example needs {wanted}. Fill it in or drop the example."
        )

    if fmt == "text":
        for index, value in enumerate(columns["text"]):
            if not isinstance(value, str):
                fail(index, "text", value, "a string in 'text'")
            if not value.strip():  # it would train on its end-of-text token alone, as an empty answer would
                raise MoEUnlearnError(
                    f"{where[0].upper()}{where[1:]}: {label(index)} has an empty 'text': only its end-of-text token "
                    f"would carry a label. Drop the example (a .txt file skips blank lines)."
                )
    elif fmt == "qa":
        prompts = [c for c in PROMPT_COLUMNS if c in columns]
        for index in range(size):
            values = [columns[c][index] for c in prompts]
            value = next((v for v in values if v is not None), None)
            if not isinstance(value, str):
                fail(index, prompts[0] if value is None else prompts[values.index(value)], value,
                     f"a string prompt ({'/'.join(prompts)})")
        for column in [c for c in (*ANSWER_COLUMNS, *OTHER_ANSWER_COLUMNS) if c in columns]:
            for index, value in enumerate(columns[column]):
                if value is not None and not isinstance(value, str):
                    fail(index, column, value, f"a string (or nothing) in '{column}'")
    else:
        def integers(value: Any) -> bool:
            return isinstance(value, (list, tuple)) and all(
                isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in value)

        labels = columns.get("labels", [None] * size)
        for index, ids in enumerate(columns["input_ids"]):
            if not integers(ids):
                fail(index, "input_ids", ids, "a list of integer token ids in 'input_ids'")
            if labels[index] is not None and not (integers(labels[index]) and len(labels[index]) == len(ids)):
                raise MoEUnlearnError(
                    f"{where[0].upper()}{where[1:]}: {label(index)} has 'labels' that are not a list of integers "
                    f"as long as its 'input_ids' ({len(ids)}); give one label per token (-100: not trained on)."
                )


def example_format(columns: Sequence[str], where: str | None = None) -> str:
    """``"text"``, ``"qa"`` or ``"tokenized"``, from a dataset's column names; a clear error otherwise."""
    columns = set(columns)
    if "input_ids" in columns:
        return "tokenized"
    if "text" in columns:
        return "text"
    if columns & set(PROMPT_COLUMNS) and columns & set(ANSWER_COLUMNS):
        return "qa"
    prefix = f"{where[0].upper()}{where[1:]} has columns {sorted(columns)}; examples" if where else "Examples"
    suffix = "" if where else f"; got columns {sorted(columns)}"
    raise MoEUnlearnError(
        f"{prefix} need a 'text' column, or a prompt column ({'/'.join(PROMPT_COLUMNS)}) and an answer column "
        f"({'/'.join(ANSWER_COLUMNS)}), or 'input_ids'{suffix}. Rename the columns."
    )


def check_examples(dataset, name: str = "dataset", path: str | None = None, label=_example_label) -> None:
    """Fail early on an empty dataset, one in a format we cannot train on, or values of the wrong type
    (``path``: the file it was read from, for the message)."""
    if dataset is None or len(dataset) == 0:
        raise MoEUnlearnError(f"The {name} is empty{f' ({path})' if path else ''}: it needs at least one example.")
    where = f"the {name} file {path}" if path else f"the {name}"
    columns = dataset.column_names if hasattr(dataset, "column_names") else list(dataset[0])
    example_format(columns, where)
    needed = [c for c in ("text", "input_ids", "labels", *OTHER_ANSWER_COLUMNS, *PROMPT_COLUMNS, *ANSWER_COLUMNS)
              if c in columns]
    if "input_ids" in needed and _integer_lists(dataset, needed):
        return  # the Arrow types already say so; the lengths of labels are checked by _integer_lists
    check_columns({c: dataset[c] for c in needed}, where, label)


def _integer_lists(dataset, columns: Sequence[str]) -> bool:
    """True when a tokenized ``datasets.Dataset`` stores ``input_ids``/``labels`` as non-null integer lists of equal
    lengths: checked on the Arrow columns, without turning millions of token ids into Python objects."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not hasattr(dataset, "with_format"):
        return False
    table = dataset.with_format("arrow")[:]
    wanted = [c for c in ("input_ids", "labels") if c in columns]
    for column in wanted:
        array = table[column]
        if not (pa.types.is_list(array.type) or pa.types.is_large_list(array.type)):
            return False
        if not pa.types.is_integer(array.type.value_type) or array.null_count or pc.sum(
                pc.is_null(pc.list_flatten(array))).as_py():
            return False
    if len(wanted) == 2:
        same = pc.equal(pc.list_value_length(table["input_ids"]), pc.list_value_length(table["labels"]))
        return bool(pc.all(same).as_py())
    return True


def as_dataset(data, name: str = "dataset"):
    """Accept a ``datasets.Dataset``, a list of strings or a list of dicts; return a ``datasets.Dataset``."""
    import datasets

    if isinstance(data, datasets.Dataset):
        check_examples(data, name)
        return data
    if isinstance(data, (list, tuple)):
        if not data:
            raise MoEUnlearnError(f"The {name} is empty: it needs at least one example.")
        if all(isinstance(x, str) for x in data):
            data = datasets.Dataset.from_dict({"text": list(data)})
        elif isinstance(data[0], str):
            index = next(i for i, x in enumerate(data) if not isinstance(x, str))
            raise MoEUnlearnError(f"The {name}: example {index} is {_kind(data[index])}, but example 0 is a text: give "
                                  f"a list of texts (strings) or a list of dicts.")
        else:
            check_rows(data, f"the {name}")  # before from_list: mixed types would fail inside pyarrow
            data = datasets.Dataset.from_list(list(data))
        check_examples(data, name)
        return data
    raise MoEUnlearnError(f"The {name} must be a datasets.Dataset or a list of texts/dicts, not {type(data).__name__}.")


def _first(example: dict[str, Any], columns: Sequence[str]) -> str:
    return next(example[c] for c in columns if c in example and example[c] is not None)


def encode_example(example: dict[str, Any], tokenizer, max_length: int) -> dict[str, list[int]]:
    """Token ids, attention mask and labels for one example (labels only on answers for prompt/answer pairs).

    Documents get the tokenizer's BOS (if it adds one) and an EOS, so that a model learns where they end.
    """
    fmt = example_format(list(example))
    if fmt == "tokenized":
        ids = list(example["input_ids"])[:max_length]
        labels = list(ids) if example.get("labels") is None else list(example["labels"])[:max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
    if fmt == "text":
        ids = tokenizer(example["text"], add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        ids = ids[:max_length]
        out = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}
    else:
        prompt = _first(example, PROMPT_COLUMNS)
        out = _encode_pair(tokenizer, prompt, _first(example, ANSWER_COLUMNS), max_length)
        for column in OTHER_ANSWER_COLUMNS:
            if example.get(column):
                other = _encode_pair(tokenizer, prompt, example[column], max_length)
                out.update({f"{column}_{k}": v for k, v in other.items()})
    return out


def _encode_pair(tokenizer, prompt: str, answer: str, max_length: int) -> dict[str, list[int]]:
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(" " + answer.lstrip(), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + answer_ids)[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def check_max_length(max_length, flag: str = "max_length") -> None:
    """Refuse a ``max_length`` that cannot leave one next-token target (negative values would slice from the end)."""
    if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral) or max_length < MIN_MAX_LENGTH:
        raise MoEUnlearnError(
            f"{flag}={max_length!r} cannot leave a label to train on: an example's first token has nothing before "
            f"it to predict it, so {flag} must be an integer of at least {MIN_MAX_LENGTH} (default 512)."
        )


def example_targets(labels: Sequence[int]) -> int:
    """Next-token targets of one example: labels after the causal shift (the first position is never a target)."""
    return sum(1 for x in labels[1:] if x != -100)


def check_answers(dataset, name: str = "dataset") -> None:
    """Refuse prompt/answer data with empty answers: only their end-of-text token would carry a label."""
    columns = [c for c in ANSWER_COLUMNS if c in dataset.column_names]
    empty = []
    for index, values in enumerate(zip(*(dataset[c] for c in columns))):
        answer = next((v for v in values if v is not None), None)
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            empty.append(index)
    if empty:
        verb = "has" if len(empty) == 1 else "have"
        raise MoEUnlearnError(
            f"{len(empty)} of the {len(dataset)} examples of the {name} {verb} an empty answer (the first: example "
            f"{empty[0]}): only the end-of-text token would carry a label, so the loss would train on that token "
            f"alone. Fill in the answer column ({'/'.join(columns)}) or drop those examples."
        )
    # An idk/alternate column is all or nothing: a batch pairs every forget example with its own other answer (and a
    # column missing from some rows would silently vanish in the tokenised set).
    for column in [c for c in OTHER_ANSWER_COLUMNS if c in dataset.column_names]:
        missing = [i for i, v in enumerate(dataset[column]) if v is None or (isinstance(v, str) and not v.strip())]
        if missing:
            verb = "has" if len(missing) == 1 else "have"
            raise MoEUnlearnError(
                f"{len(missing)} of the {len(dataset)} examples of the {name} {verb} no '{column}' answer (the first: "
                f"example {missing[0]}): the losses that read it pair every example with its own. Fill it in for "
                f"every example, or drop the '{column}' column."
            )


def tokenize_dataset(dataset, tokenizer, max_length: int = 512, name: str = "dataset"):
    """Tokenise every example (see :func:`encode_example`).

    Refuses prompt/answer examples with an empty answer, a ``max_length`` below 2, and a set in which no example
    keeps a counted token (a label after the causal shift); examples without one are dropped with a warning.
    """
    check_max_length(max_length)
    dataset = as_dataset(dataset, name)
    fmt = example_format(dataset.column_names)
    if fmt != "tokenized" and tokenizer is None:
        raise MoEUnlearnError(f"The {name} holds raw text: pass a tokenizer (processing_class) to tokenise it.")
    if fmt == "qa":
        check_answers(dataset, name)
    columns = dataset.column_names
    tokenized = dataset.map(
        lambda ex: encode_example(ex, tokenizer, max_length), remove_columns=columns, desc=f"Tokenizing {name}"
    )
    counted = [example_targets(labels) for labels in tokenized["labels"]]
    if not any(counted):
        raise MoEUnlearnError(
            f"The {name} has no counted token: no example keeps a label after the causal shift (a labelled token "
            f"after the first), so every loss and NLL on it would be 0. Are the answers cut off by max_length="
            f"{max_length}, or is every example a single token? Raise max_length, or give longer examples."
        )
    keep = [i for i, c in enumerate(counted) if c > 0]
    if len(keep) < len(tokenized):
        dropped = next(i for i, c in enumerate(counted) if c == 0)
        logger.warning(
            "%d of the %d examples of the %s have no counted token (the first: example %d; answer cut off by "
            "max_length=%d, or a single token) and are left out.", len(tokenized) - len(keep), len(tokenized), name,
            dropped, max_length)
    return tokenized.select(keep) if len(keep) < len(tokenized) else tokenized


class PaddingCollator:
    """Pads every ``*input_ids``/``*attention_mask``/``*labels`` key of a batch to its longest row (right
    padding; labels padded with -100). Written by hand because transformers' collators pad only the standard
    keys, and forget batches carry ``idk_*``/``alternate_*`` copies too. An ``example_index`` column (the trainer's key
    of its reference cache) becomes a ``[B]`` tensor."""

    INDEX_KEY = "example_index"

    def __init__(self, pad_token_id: int, prefix: str = "", pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.prefix = prefix
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        groups = sorted({k[: -len("input_ids")] for k in rows[0] if k.endswith("input_ids")})
        for group in groups:
            longest = max(len(r[f"{group}input_ids"]) for r in rows)
            if self.pad_to_multiple_of:
                longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
            for key, pad in (("input_ids", self.pad_token_id), ("attention_mask", 0), ("labels", -100)):
                name = f"{group}{key}"
                if name not in rows[0]:
                    continue
                batch[f"{self.prefix}{name}"] = torch.tensor(
                    [list(r[name]) + [pad] * (longest - len(r[name])) for r in rows], dtype=torch.long
                )
        if self.INDEX_KEY in rows[0]:
            batch[f"{self.prefix}{self.INDEX_KEY}"] = torch.tensor([r[self.INDEX_KEY] for r in rows], dtype=torch.long)
        return batch


def counted_mask(batch: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    """[B, T] mask of the tokens that count: attended and label-bearing (label positions, not shifted)."""
    mask = batch[f"{prefix}attention_mask"]
    if f"{prefix}labels" in batch:
        mask = mask * (batch[f"{prefix}labels"] != -100)
    return mask
