"""A tiny tokenizer and a tiny random MoE causal LM, both built offline in milliseconds (test helper).

The tokenizer is character-level (a BPE model with the printable ASCII characters as vocabulary) plus
four merges " A", " B", " C", " D", so that multiple-choice answer letters after "Answer:" are single
tokens as with real tokenizers, while any other continuation spans several tokens. It adds a BOS token
like Llama tokenizers and decodes losslessly (``Fuse`` decoder), so ROUGE on decoded text is exact.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast, Qwen3MoeForCausalLM

from hf_moe_unlearn.moe import tiny_moe_model

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
LETTER_MERGES = [(" ", letter) for letter in "ABCD"]
VOCAB_SIZE = 128


def char_tokenizer() -> PreTrainedTokenizerFast:
    chars = list(dict.fromkeys(list(string.printable[:95]) + ["\n"]))
    tokens = SPECIAL_TOKENS + chars + [a + b for a, b in LETTER_MERGES]
    vocab = {token: index for index, token in enumerate(tokens)}
    assert len(vocab) <= VOCAB_SIZE
    backend = Tokenizer(models.BPE(vocab=vocab, merges=LETTER_MERGES, unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_moe_lm(seed: int = 0) -> Qwen3MoeForCausalLM:
    # Larger initial weights than the default 0.02 make the random model's predictions peaked rather than
    # near-uniform, so argmax ties (which could differ between batched and unbatched runs by float rounding)
    # do not occur.
    model = tiny_moe_model("qwen3_moe", seed=seed, vocab_size=VOCAB_SIZE, max_position_embeddings=1024,
                           initializer_range=0.5)
    return model
