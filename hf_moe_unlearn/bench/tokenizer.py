"""A word-level tokenizer for the synthetic benchmark, built offline with the ``tokenizers`` library.

Nothing can be downloaded, and the benchmark's vocabulary is closed (templates, value pools, generated
names), so a word-level vocabulary over every text of the benchmark is exact and small: each attribute
value is one token, which keeps the choices of a multiple-choice question comparable by log-likelihood.

Pre-tokenisation keeps the spaces in the tokens (SentencePiece's "▁" marker) and isolates punctuation
and newlines, so ``decode(encode(text)) == text`` for any text made of known words.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ..errors import MoEUnlearnError
from .synthetic import SyntheticBenchmark, format_qa

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
_SPACE = "▁"
MODEL_MAX_LENGTH = 512


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="first", split=True),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Split("\n", behavior="isolated"),
    ])


def build_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is every word and punctuation mark of ``texts``.

    The tokenizer prepends ``<bos>`` (as Llama-style tokenizers do) but never appends ``<eos>``: a prompt
    must stay open for its continuation. Training code appends ``eos_token`` itself.
    """
    pre = _pre_tokenizer()
    words = {piece for text in texts for piece, _ in pre.pre_tokenize_str(text)}
    if not words:
        raise MoEUnlearnError("build_tokenizer got no text to build a vocabulary from; pass the benchmark's texts.")
    # Sorted, so that the same texts always give the same ids, whatever their order.
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *sorted(words - set(SPECIAL_TOKENS))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Metaspace(replacement=_SPACE, prepend_scheme="first", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS,
        model_max_length=MODEL_MAX_LENGTH, padding_side="right")


def benchmark_texts(benchmark: SyntheticBenchmark) -> list[str]:
    """Every text a model may be given on this benchmark: passages, QA in training format, answers and choices.

    Holdout and general texts are included although no model trains on them: words missing from the
    vocabulary would become ``<unk>`` there and make them trivially different from the training data.
    """
    texts: list[str] = []
    for name in ("forget_text", "retain_text", "holdout_text", "general_text"):
        texts += getattr(benchmark, name)["text"]
    for name in ("forget_qa", "retain_qa"):
        for row in getattr(benchmark, name):
            texts += [format_qa(row["question"], row["answer"]), row["paraphrased_answer"], *row["perturbed_answers"]]
    for name in ("forget_mcq", "retain_mcq"):
        for row in getattr(benchmark, name):
            texts += [format_qa(row["question"], c) for c in row["choices"]]
    return texts


def build_benchmark_tokenizer(benchmark: SyntheticBenchmark) -> PreTrainedTokenizerFast:
    """The tokenizer for ``benchmark``: :func:`build_tokenizer` over :func:`benchmark_texts`."""
    return build_tokenizer(benchmark_texts(benchmark))


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> Path:
    """Save with ``save_pretrained`` (a standard tokenizer directory any ``AutoTokenizer`` can read)."""
    path = Path(directory)
    tokenizer.save_pretrained(str(path))
    return path


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by :func:`save_tokenizer` from a local directory (never the Hub)."""
    path = Path(directory)
    if not (path / "tokenizer.json").is_file():
        raise MoEUnlearnError(f"No tokenizer.json in {path}; build one with build_tokenizer() and save_tokenizer().")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


__all__ = ["build_tokenizer", "build_benchmark_tokenizer", "benchmark_texts", "save_tokenizer", "load_tokenizer",
           "SPECIAL_TOKENS", "PAD", "UNK", "BOS", "EOS"]
