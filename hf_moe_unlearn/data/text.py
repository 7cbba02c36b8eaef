"""Reading forget/retain data and turning it into token batches with the right labels.

Two shapes of example are understood, as in TRL: plain documents (a ``text`` column) where every token is
trained on, and question/answer pairs (``prompt``/``question`` + ``answer``/``completion``) where only answer
tokens carry labels. An optional ``idk`` column (an "I don't know"-style answer) is tokenised too, for the
``idk_nll``/``idk_dpo`` forget losses.
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
#: Shortest ``max_length`` that can leave a label after the causal shift (a label on the first token is never a
#: target: nothing precedes it).
MIN_MAX_LENGTH = 2

logger = logging.getLogger(__name__)


def load_texts(path: str | os.PathLike, name: str = "dataset"):
    """Load a forget/retain file as a ``datasets.Dataset``.

    ``.txt``: one document per non-empty line; ``.jsonl``/``.json``/``.parquet``/``.csv``: rows with a ``text``
    column or prompt/answer columns; a directory: a dataset saved with ``save_to_disk``.
    """
    import datasets

    path = os.fspath(path)
    if not os.path.exists(path):
        raise MoEUnlearnError(f"The {name} file {path} does not exist.")
    if os.path.isdir(path):
        dataset = datasets.load_from_disk(path)
        if isinstance(dataset, datasets.DatasetDict):
            split = "train" if "train" in dataset else next(iter(dataset))
            dataset = dataset[split]
    elif path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
        dataset = datasets.Dataset.from_dict({"text": [line for line in lines if line.strip()]})
    elif path.endswith((".jsonl", ".json")):
        rows = _read_json_rows(path)
        dataset = datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict({"text": []})
    elif path.endswith(".parquet"):
        dataset = datasets.Dataset.from_parquet(path)
    elif path.endswith(".csv"):
        dataset = datasets.Dataset.from_csv(path)
    else:
        raise MoEUnlearnError(
            f"Cannot read {path}: use .txt (one document per line), .jsonl, .json, .parquet, .csv, or a directory "
            f"written by datasets' save_to_disk."
        )
    check_examples(dataset, name)
    return dataset


def _read_json_rows(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        data = json.load(f)
    if isinstance(data, dict):
        data = data.get("data", data.get("rows", [data]))
    return list(data)


def example_format(columns: Sequence[str]) -> str:
    """``"text"``, ``"qa"`` or ``"tokenized"``, from a dataset's column names; a clear error otherwise."""
    columns = set(columns)
    if "input_ids" in columns:
        return "tokenized"
    if "text" in columns:
        return "text"
    if columns & set(PROMPT_COLUMNS) and columns & set(ANSWER_COLUMNS):
        return "qa"
    raise MoEUnlearnError(
        f"Examples need a 'text' column, or a prompt column ({'/'.join(PROMPT_COLUMNS)}) and an answer column "
        f"({'/'.join(ANSWER_COLUMNS)}); got columns {sorted(columns)}."
    )


def check_examples(dataset, name: str = "dataset") -> None:
    """Fail early on an empty dataset or one in a format we cannot train on."""
    if dataset is None or len(dataset) == 0:
        raise MoEUnlearnError(f"The {name} is empty: it needs at least one example.")
    example_format(dataset.column_names if hasattr(dataset, "column_names") else list(dataset[0]))


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
        else:
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
        if example.get(IDK_COLUMN):
            idk = _encode_pair(tokenizer, prompt, example[IDK_COLUMN], max_length)
            out.update({f"idk_{k}": v for k, v in idk.items()})
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
    keys, and forget batches carry ``idk_*`` copies too. An ``example_index`` column (the trainer's key of its
    reference cache) becomes a ``[B]`` tensor."""

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
