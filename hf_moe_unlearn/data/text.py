"""Reading forget/retain data and turning it into token batches with the right labels.

Two shapes of example are understood, as in TRL: plain documents (a ``text`` column) where every token is
trained on, and question/answer pairs (``prompt``/``question`` + ``answer``/``completion``) where only answer
tokens carry labels. An optional ``idk`` column (an "I don't know"-style answer) is tokenised too, for the
``idk_nll``/``idk_dpo`` forget losses.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import torch

from ..errors import MoEUnlearnError

PROMPT_COLUMNS = ("prompt", "question")
ANSWER_COLUMNS = ("answer", "completion", "response")
IDK_COLUMN = "idk"


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
        labels = list(example.get("labels", ids))[:max_length]
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


def tokenize_dataset(dataset, tokenizer, max_length: int = 512, name: str = "dataset"):
    """Tokenise every example (see :func:`encode_example`) and drop examples with no label-bearing token."""
    dataset = as_dataset(dataset, name)
    if example_format(dataset.column_names) != "tokenized" and tokenizer is None:
        raise MoEUnlearnError(f"The {name} holds raw text: pass a tokenizer (processing_class) to tokenise it.")
    columns = dataset.column_names
    tokenized = dataset.map(
        lambda ex: encode_example(ex, tokenizer, max_length), remove_columns=columns, desc=f"Tokenizing {name}"
    )
    counted = [sum(1 for x in labels if x != -100) for labels in tokenized["labels"]]
    if not any(counted):
        raise MoEUnlearnError(
            f"No example of the {name} has a label-bearing token (answers empty, or cut off by max_length="
            f"{max_length}). Raise max_length or check the answer column."
        )
    keep = [i for i, c in enumerate(counted) if c > 0]
    return tokenized.select(keep) if len(keep) < len(tokenized) else tokenized


class PaddingCollator:
    """Pads every ``*input_ids``/``*attention_mask``/``*labels`` key of a batch to its longest row (right
    padding; labels padded with -100). Written by hand because transformers' collators pad only the standard
    keys, and forget batches carry ``idk_*`` copies too."""

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
        return batch


def counted_mask(batch: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    """[B, T] mask of the tokens that count: attended and label-bearing (label positions, not shifted)."""
    mask = batch[f"{prefix}attention_mask"]
    if f"{prefix}labels" in batch:
        mask = mask * (batch[f"{prefix}labels"] != -100)
    return mask
