"""The two model computations every metric is built from, written once.

1. **Scoring**: the log-probability of each token of a *continuation* given a *prompt*, teacher-forced,
   with only the continuation counted (the prompt is context, as labels = -100 would make it).
   MCQ log-likelihoods, answer probabilities, truth ratios, Min-K%, perplexity, exact memorisation and
   extraction strength are all reductions of this one result.
2. **Greedy generation** of continuations for a batch of prompts (VerbMem, KnowMem, TOFU ROUGE).

Padding is built here by hand rather than with the tokenizer: scoring pads on the *right* (so positions
of real tokens are ``0..n-1`` without position-id bookkeeping), generation on the *left* (so every row's
next token comes at the same column). Because of that the tokenizer's ``padding_side`` and pad token are
never read nor changed: results do not depend on how the caller configured the tokenizer, and nothing
has to be restored afterwards, even when a forward pass raises.

Both computations run under :func:`inference_mode`, which disables gradients, puts the model in eval
mode (dropout off; MoE routers that add jitter in train mode become deterministic) and restores every
submodule's previous train/eval flag on exit.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import MoEUnlearnError

__all__ = [
    "ContinuationScore",
    "EncodedPair",
    "choice_loglikelihoods",
    "cut_at_stop_strings",
    "encode_pair",
    "encode_pairs",
    "generate_greedy",
    "inference_mode",
    "next_token_logprobs",
    "pad_sequences",
    "score_continuations",
    "score_encoded",
    "score_texts",
]


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of a prompt (context, not scored) and of its continuation (scored)."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]

    @property
    def ids(self) -> list[int]:
        return [*self.context, *self.continuation]


@dataclass
class ContinuationScore:
    """Teacher-forced statistics of one continuation, one entry per continuation token (CPU tensors).

    Attributes:
        token_logprobs: log p(y_t | x, y_<t), float32.
        target_ids: the continuation's token ids y_t.
        argmax_ids: the model's most likely token at each position (for exact memorisation and
            extraction strength).
        expected_logprob, std_logprob: mean and standard deviation of log p over the model's own
            next-token distribution at each position (Min-K%++); ``None`` unless requested.
    """

    token_logprobs: torch.Tensor
    target_ids: torch.Tensor
    argmax_ids: torch.Tensor
    expected_logprob: torch.Tensor | None = None
    std_logprob: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.token_logprobs.numel())

    @property
    def sum_logprob(self) -> float:
        return float(self.token_logprobs.sum())

    @property
    def mean_nll(self) -> float:
        """Mean negative log-likelihood per continuation token (the TOFU/OpenUnlearning ``avg_loss``)."""
        return -float(self.token_logprobs.mean())


# --------------------------------------------------------------------------------------------------
# Model state
# --------------------------------------------------------------------------------------------------


@contextmanager
def inference_mode(model: nn.Module) -> Iterator[None]:
    """Evaluate ``model`` without gradients and in eval mode, then restore each submodule's mode.

    Restoring per submodule (not ``model.train(was_training)``) keeps a caller's deliberate mix intact,
    e.g. a trainer that keeps a frozen reference submodule in eval mode while the rest trains.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, was_training in modes:
            module.training = was_training


def model_device(model: nn.Module) -> torch.device:
    """The device inputs must be on: ``model.device`` for transformers/PEFT models, else the first parameter's."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


# --------------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------------


def encode_pair(
    tokenizer,
    prompt: str,
    continuation: str,
    *,
    add_special_tokens: bool = True,
    max_length: int | None = None,
) -> EncodedPair:
    """Split ``prompt + continuation`` into context and continuation token ids, lm-eval-harness style.

    Trailing whitespace of the prompt is moved to the continuation (lm-eval ``_encode_pair``), because
    SentencePiece/BPE tokenizers attach a leading space to the next word ("Answer:" + " A" is one
    token "▁A", "Answer: " + "A" is not). The continuation is the tail of the joint tokenisation after
    the prompt's tokens; when the boundary merges across the two (the prompt's tokens are not a prefix
    of the joint ones) the continuation is tokenised on its own instead.

    With an empty prompt the continuation is a whole text (MIA, perplexity): it is scored from the
    tokenizer's BOS token if it adds one, otherwise from its second token, as the Min-K% reference
    code does, since nothing predicts the first token.

    ``max_length`` (tokens) truncates the continuation on the right and then the prompt on the left,
    keeping at least one context token.
    """
    n_spaces = len(prompt) - len(prompt.rstrip())
    if n_spaces:
        prompt, continuation = prompt[:-n_spaces], prompt[-n_spaces:] + continuation
    context = list(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
    whole = list(tokenizer(prompt + continuation, add_special_tokens=add_special_tokens)["input_ids"])
    if not context:
        context, cont = whole[:1], whole[1:]
    elif whole[: len(context)] == context:
        cont = whole[len(context) :]
    else:
        cont = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
    if max_length is not None:
        if max_length < 2:
            raise MoEUnlearnError(f"max_length must be at least 2 tokens (1 context + 1 scored), got {max_length}.")
        cont = cont[: max_length - 1]
        context = context[-(max_length - len(cont)) :]
    return EncodedPair(tuple(context), tuple(cont))


def encode_pairs(
    tokenizer,
    prompts: Sequence[str],
    continuations: Sequence[str],
    *,
    add_special_tokens: bool = True,
    max_length: int | None = None,
) -> list[EncodedPair]:
    """:func:`encode_pair` over aligned lists; every continuation must keep at least one token."""
    prompts, continuations = list(prompts), list(continuations)
    if len(prompts) != len(continuations):
        raise MoEUnlearnError(
            f"Got {len(prompts)} prompts but {len(continuations)} continuations; they must be aligned one to one."
        )
    pairs = []
    for i, (prompt, continuation) in enumerate(zip(prompts, continuations)):
        pair = encode_pair(
            tokenizer, prompt, continuation, add_special_tokens=add_special_tokens, max_length=max_length
        )
        if not pair.continuation:
            raise MoEUnlearnError(
                f"Example {i} has nothing to score: its continuation {continuation!r} (prompt {prompt[-40:]!r}) is "
                "empty after tokenisation. Remove empty answers/texts, or give texts of at least two tokens when "
                "the tokenizer adds no BOS token."
            )
        pairs.append(pair)
    return pairs


def pad_token_id_of(tokenizer) -> int:
    """Id used to fill padding. Its value never matters (padding is masked), only that it is a valid id."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def pad_sequences(
    sequences: Sequence[Sequence[int]], pad_token_id: int, side: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token id lists into ``(input_ids, attention_mask)`` padded on ``side`` ("left" or "right")."""
    if side not in ("left", "right"):
        raise MoEUnlearnError(f"Padding side must be 'left' or 'right', got {side!r}.")
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        input_ids[row, span] = torch.tensor(list(seq), dtype=torch.long)
        attention_mask[row, span] = 1
    return input_ids, attention_mask


def _length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped in batches of similar length (longest first), so padding is small and an
    out-of-memory error, if any, happens on the first batch rather than after an hour."""
    if batch_size < 1:
        raise MoEUnlearnError(f"batch_size must be a positive integer, got {batch_size}.")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _forward_logits(
    model: nn.Module, sequences: Sequence[Sequence[int]], pad_token_id: int, batch_size: int
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Right-padded forward passes over ``sequences``; yields ``(indices, logits [b, T, V])`` per batch.

    The single batching loop behind every scoring function. Must be called under :func:`inference_mode`.
    """
    device = model_device(model)
    for indices in _length_sorted_batches([len(s) for s in sequences], batch_size):
        input_ids, attention_mask = pad_sequences([sequences[i] for i in indices], pad_token_id, "right")
        outputs = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
        yield indices, outputs.logits


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


def score_encoded(
    model: nn.Module,
    pairs: Sequence[EncodedPair],
    *,
    pad_token_id: int = 0,
    batch_size: int = 8,
    with_distribution: bool = False,
) -> list[ContinuationScore]:
    """Teacher-forced statistics of each pair's continuation, in input order.

    Token ``t`` of the sequence is predicted by the logits at position ``t - 1``, so a continuation
    occupying positions ``c .. c+n-1`` is read from logits ``c-1 .. c+n-2``. Log-softmax is taken in
    float32 on those rows only (not on the whole [b, T, V] tensor) to keep memory at one row block.
    """
    results: list[ContinuationScore | None] = [None] * len(pairs)
    with inference_mode(model):
        for indices, logits in _forward_logits(model, [p.ids for p in pairs], pad_token_id, batch_size):
            for row, index in enumerate(indices):
                pair = pairs[index]
                start, n = len(pair.context), len(pair.continuation)
                rows = logits[row, start - 1 : start + n - 1].float()
                results[index] = _continuation_statistics(rows, pair.continuation, with_distribution)
    return results  # type: ignore[return-value]


def _continuation_statistics(
    logits: torch.Tensor, continuation: Sequence[int], with_distribution: bool
) -> ContinuationScore:
    log_probs = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor(list(continuation), dtype=torch.long, device=log_probs.device)
    token_logprobs = log_probs.gather(-1, targets[:, None]).squeeze(-1)
    expected = std = None
    if with_distribution:
        probs = log_probs.exp()
        expected = (probs * log_probs).sum(-1)
        variance = (probs * log_probs.square()).sum(-1) - expected.square()
        std = variance.clamp_min(1e-12).sqrt()
        expected, std = expected.cpu(), std.cpu()
    return ContinuationScore(
        token_logprobs=token_logprobs.cpu(),
        target_ids=targets.cpu(),
        argmax_ids=log_probs.argmax(-1).cpu(),
        expected_logprob=expected,
        std_logprob=std,
    )


def score_continuations(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    continuations: Sequence[str],
    *,
    batch_size: int = 8,
    add_special_tokens: bool = True,
    max_length: int | None = None,
    with_distribution: bool = False,
) -> list[ContinuationScore]:
    """Score ``continuations[i]`` given ``prompts[i]`` (only the continuation's tokens are counted)."""
    pairs = encode_pairs(
        tokenizer, prompts, continuations, add_special_tokens=add_special_tokens, max_length=max_length
    )
    pad_id = pad_token_id_of(tokenizer)
    return score_encoded(model, pairs, pad_token_id=pad_id, batch_size=batch_size, with_distribution=with_distribution)


def score_texts(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    with_distribution: bool = False,
) -> list[ContinuationScore]:
    """Score whole texts (every token that has a predecessor), as MIA and perplexity do."""
    return score_continuations(
        model,
        tokenizer,
        [""] * len(texts),
        texts,
        batch_size=batch_size,
        add_special_tokens=True,
        max_length=max_length,
        with_distribution=with_distribution,
    )


def next_token_logprobs(
    model: nn.Module, contexts: Sequence[Sequence[int]], *, pad_token_id: int = 0, batch_size: int = 8
) -> torch.Tensor:
    """Log-distribution of the token following each context, ``[len(contexts), V]`` float32 on CPU.

    One forward pass per context, however many single-token continuations are compared (the
    lm-eval-harness shortcut for multiple-choice letters).
    """
    out: list[torch.Tensor | None] = [None] * len(contexts)
    with inference_mode(model):
        for indices, logits in _forward_logits(model, contexts, pad_token_id, batch_size):
            for row, index in enumerate(indices):
                last = len(contexts[index]) - 1
                out[index] = torch.log_softmax(logits[row, last].float(), dim=-1).cpu()
    return torch.stack(out)  # type: ignore[arg-type]


def choice_loglikelihoods(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    choices: Sequence[Sequence[str]],
    *,
    batch_size: int = 8,
    add_special_tokens: bool = True,
) -> list[list[float]]:
    """Summed log-likelihood of each choice (continuation) of each prompt, as lm-eval ``multiple_choice``.

    When every choice is a single token after its prompt (the usual " A"/" B"/" C"/" D"), one forward pass
    per prompt gives all of them; otherwise every (prompt, choice) pair is scored on its own.
    """
    flat_prompts = [p for p, cs in zip(prompts, choices) for _ in cs]
    flat_choices = [c for cs in choices for c in cs]
    pairs = encode_pairs(tokenizer, flat_prompts, flat_choices, add_special_tokens=add_special_tokens)
    pad_id = pad_token_id_of(tokenizer)
    if all(len(p.continuation) == 1 for p in pairs):
        # All choices of a prompt share its context ids (encode_pair tokenises the prompt alone).
        contexts, offsets = [], []
        offset = 0
        for cs in choices:
            contexts.append(pairs[offset].context)
            offsets.append(offset)
            offset += len(cs)
        dists = next_token_logprobs(model, contexts, pad_token_id=pad_id, batch_size=batch_size)
        return [
            [float(dists[q, pairs[off + j].continuation[0]]) for j in range(len(cs))]
            for q, (off, cs) in enumerate(zip(offsets, choices))
        ]
    scores = score_encoded(model, pairs, pad_token_id=pad_id, batch_size=batch_size)
    result, offset = [], 0
    for cs in choices:
        result.append([scores[offset + j].sum_logprob for j in range(len(cs))])
        offset += len(cs)
    return result


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


def generate_greedy(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    add_special_tokens: bool = True,
    stop_strings: Sequence[str] = (),
) -> list[str]:
    """Greedy continuations of ``prompts`` (decoded, special tokens skipped), batched with left padding.

    Each output is cut at the first occurrence of any of ``stop_strings`` (MUSE cuts KnowMem answers at
    "\\n\\n" / "Question"), after decoding, as the reference implementations do.
    """
    if max_new_tokens < 1:
        raise MoEUnlearnError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    encoded = [list(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise MoEUnlearnError(
                f"Prompt {i} ({prompts[i]!r}) is empty after tokenisation and the tokenizer adds no BOS token; "
                "generation needs at least one prompt token."
            )
    pad_id = pad_token_id_of(tokenizer)
    config = _greedy_generation_config(model, max_new_tokens, pad_id)
    device = model_device(model)
    outputs: list[str | None] = [None] * len(prompts)
    with inference_mode(model):
        for indices in _length_sorted_batches([len(e) for e in encoded], batch_size):
            input_ids, attention_mask = pad_sequences([encoded[i] for i in indices], pad_id, "left")
            generated = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
            )
            new_tokens = generated[:, input_ids.shape[1] :].cpu()
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for index, text in zip(indices, texts):
                outputs[index] = cut_at_stop_strings(text, stop_strings)
    return outputs  # type: ignore[return-value]


def cut_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """Keep what precedes the first stop string, applying them in order as MUSE's helper does."""
    for stop in stop_strings:
        if stop:
            text = text.split(stop)[0]
    return text


def _greedy_generation_config(model: nn.Module, max_new_tokens: int, pad_token_id: int):
    """The model's own generation config (keeps its EOS ids) switched to plain greedy decoding.

    Sampling parameters shipped with chat checkpoints (temperature, top_p, top_k) are cleared so that
    greedy decoding is what runs and transformers does not warn about unused flags.
    """
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    config.do_sample = False
    config.num_beams = 1
    config.temperature = None
    config.top_p = None
    config.top_k = None
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    config.pad_token_id = pad_token_id
    return config
