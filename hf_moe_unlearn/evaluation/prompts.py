"""Prompt formats of the reference benchmarks, in one place so that numbers stay comparable.

- Multiple choice, "letters": lm-eval-harness ``wmdp_*`` / ``mmlu`` (default, zero-shot) tasks:
  ``description + question.strip() + "\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:"``, scored on " A".." D".
- Multiple choice, "choices": lm-eval-harness ``mmlu_continuation``: ``"Question: {q}\\nAnswer:"`` and
  each choice text as continuation (after a space).
- MUSE KnowMem: few-shot blocks ``"Question: {q}\\nAnswer: {a}\\n\\n"`` then ``"Question: {q}\\nAnswer: "``
  (note the trailing space), as in the MUSE repository's ``eval_knowmem``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from ..errors import MoEUnlearnError

__all__ = [
    "KNOWMEM_STOP_STRINGS",
    "LETTERS",
    "WMDP_SUBJECTS",
    "chat_prompts",
    "choices_prompt",
    "knowmem_prompt",
    "letters_prompt",
    "mcq_description",
]

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# Subjects lm-eval-harness writes in the description line of each WMDP task.
WMDP_SUBJECTS = {"wmdp-bio": "biology", "wmdp-chem": "chemistry", "wmdp-cyber": "cybersecurity"}

# MUSE's KnowMem generations are cut at the first of these (in this order).
KNOWMEM_STOP_STRINGS = ("\n\n", "\nQuestion", "Question:")


def mcq_description(subject: str | None, mode: str) -> str:
    """lm-eval's task description line; MMLU subjects are written with spaces ("college_biology")."""
    if not subject:
        return ""
    subject = subject.replace("_", " ")
    if mode == "letters":
        return f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    return f"The following are questions (with answers) about {subject}.\n\n"


def letters_prompt(question: str, choices: Sequence[str], subject: str | None = None) -> str:
    """Zero-shot lm-eval WMDP/MMLU prompt; the model is then scored on " A", " B", ..."""
    if len(choices) > len(LETTERS):
        raise MoEUnlearnError(f"At most {len(LETTERS)} choices can be lettered, got {len(choices)}.")
    lines = [question.strip()] + [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(choices)]
    return mcq_description(subject, "letters") + "\n".join(lines) + "\nAnswer:"


def choices_prompt(question: str, subject: str | None = None) -> str:
    """lm-eval ``mmlu_continuation`` prompt; each choice is scored as the continuation " {choice}"."""
    return mcq_description(subject, "choices") + f"Question: {question.strip()}\nAnswer:"


def knowmem_prompt(question: str, icl_examples: Iterable[tuple[str, str] | Mapping[str, str]] = ()) -> str:
    """MUSE KnowMem few-shot prompt. ``icl_examples`` are (question, answer) pairs or dicts with those keys."""
    blocks = []
    for example in icl_examples:
        q, a = _question_answer(example)
        blocks.append(f"Question: {q}\nAnswer: {a}\n\n")
    return "".join(blocks) + f"Question: {question}\nAnswer: "


def chat_prompts(tokenizer, questions: Sequence[str], system_prompt: str | None = None) -> list[str]:
    """Wrap each question in the tokenizer's chat template with the assistant turn opened.

    TOFU models are fine-tuned on chat-formatted questions and must be evaluated the same way. The
    template already contains the BOS token, so score and generate these prompts with
    ``add_special_tokens=False``.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise MoEUnlearnError(
            "This tokenizer has no chat template; pass the questions as plain prompts instead, or set "
            "tokenizer.chat_template to the template the model was fine-tuned with."
        )
    prompts = []
    for question in questions:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": question}
        ]
        prompts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return prompts


def _question_answer(example: tuple[str, str] | Mapping[str, str]) -> tuple[str, str]:
    if isinstance(example, Mapping):
        try:
            return example["question"], example["answer"]
        except KeyError:
            raise MoEUnlearnError(
                f"An in-context example needs 'question' and 'answer' keys, got keys {sorted(example)}."
            ) from None
    question, answer = example
    return question, answer
