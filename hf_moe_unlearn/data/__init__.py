"""Data: reading forget/retain files, tokenisation with answer-only labels, and Hub benchmark loaders."""

from .hub import load_mmlu, load_muse, load_tofu, load_wmdp, load_wmdp_corpora
from .text import PaddingCollator, load_texts, tokenize_dataset

__all__ = ["PaddingCollator", "load_mmlu", "load_muse", "load_texts", "load_tofu", "load_wmdp", "load_wmdp_corpora",
           "tokenize_dataset"]
