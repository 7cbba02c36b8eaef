"""Write a recipe's forget / retain (/ holdout) files from the Hub datasets, with the package's own loaders.

    python examples/recipes/prepare_data.py wmdp_cyber data/wmdp_cyber
    python examples/recipes/prepare_data.py muse_books data/muse_books

Writes ``forget.jsonl``, ``retain.jsonl`` and, for MUSE, ``holdout.jsonl`` (one ``{"text": ...}`` row per
document), the files ``hf-moe-unlearn unlearn --forget/--retain/--holdout`` reads. ``--data_dir`` reads local
copies in the Hub layout instead (how the tests run it; see ``hf_moe_unlearn.data.hub``), ``--max_docs`` keeps the
first N documents of each set.

Sources: WMDP-Cyber: ``cais/wmdp-corpora`` ``cyber-forget-corpus`` / ``cyber-retain-corpus`` (the bio forget
corpus is not on the Hub). MUSE-Books: ``muse-bench/MUSE-Books`` ``raw`` ``forget`` / ``retain1`` / ``holdout``.
"""

from __future__ import annotations

import argparse
import json
import os

from hf_moe_unlearn.data.hub import load_muse, load_wmdp_corpora

#: recipe data -> {file: loader()} (each loader takes data_dir=)
SOURCES = {
    "wmdp_cyber": {
        "forget": lambda data_dir: load_wmdp_corpora("cyber-forget-corpus", data_dir=data_dir),
        "retain": lambda data_dir: load_wmdp_corpora("cyber-retain-corpus", data_dir=data_dir),
    },
    "muse_books": {
        "forget": lambda data_dir: load_muse("Books", "raw", "forget", data_dir=data_dir),
        "retain": lambda data_dir: load_muse("Books", "raw", "retain1", data_dir=data_dir),
        "holdout": lambda data_dir: load_muse("Books", "raw", "holdout", data_dir=data_dir),
    },
}


def prepare(data: str, output: str, data_dir: str | None = None, max_docs: int | None = None) -> dict[str, str]:
    """Write the files of ``data`` into ``output``; returns ``{set: path}``."""
    os.makedirs(output, exist_ok=True)
    written = {}
    for name, load in SOURCES[data].items():
        texts = [t for t in load(data_dir)["text"] if t.strip()]
        texts = texts[:max_docs] if max_docs else texts
        path = os.path.join(output, f"{name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for text in texts:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        written[name] = path
        print(f"{name}: {len(texts)} documents -> {path}")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", choices=sorted(SOURCES))
    parser.add_argument("output", help="folder for forget.jsonl, retain.jsonl (and holdout.jsonl)")
    parser.add_argument("--data_dir", default=None, help="local copies in the Hub layout instead of the Hub")
    parser.add_argument("--max_docs", type=int, default=None, help="keep the first N documents of each set")
    args = parser.parse_args(argv)
    prepare(args.data, args.output, args.data_dir, args.max_docs)


if __name__ == "__main__":
    main()
