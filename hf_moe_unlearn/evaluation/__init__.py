"""Evaluation: the unlearning metrics of WMDP, MUSE and TOFU, a metric registry, and result reports.

Importing this package registers every metric (``list_metrics()`` shows them). All metrics share the
scoring and generation code of :mod:`.scoring`. :func:`evaluate_model` (``hf-moe-unlearn evaluate``) runs whole
benchmarks: WMDP and MMLU through lm-evaluation-harness (imported only then), MUSE, TOFU and routing with these metrics.
"""

from .harness import KNOWN_TASKS, evaluate_model, write_model_card_results
from .attacks import edited_experts, expert_masking, mask_experts, restore_routing, routing_restore
from .mcq import mcq_accuracy
from .memorization import (
    exact_memorization,
    exact_memorization_from_ids,
    extraction_strength,
    extraction_strength_from_ids,
    perplexity,
)
from .mia import (
    MUSE_PUBLISHED_RETRAIN_AUC,
    loss_score,
    mia,
    mia_auc,
    mia_scores,
    min_k,
    min_k_from_logprobs,
    min_k_plus_plus,
    min_k_prob,
    privleak,
    zlib_score,
)
from .muse import knowmem, verbmem
from .prompts import chat_prompts, choices_prompt, knowmem_prompt, letters_prompt
from .registry import get_metric, list_metrics, register_metric
from .report import plot_tradeoff, results_table
from .rouge import rouge_l
from .routing import routing_diagnostics, routing_stability, same_topk
from .scoring import generate_greedy, inference_mode, score_continuations, score_texts
from .tofu import (
    aggregate_truth_ratios,
    answer_probability,
    forget_quality,
    model_utility,
    qa_rouge,
    truth_ratio,
    truth_ratio_from_nll,
)

__all__ = [
    "KNOWN_TASKS",
    "MUSE_PUBLISHED_RETRAIN_AUC",
    "aggregate_truth_ratios",
    "answer_probability",
    "chat_prompts",
    "edited_experts",
    "expert_masking",
    "choices_prompt",
    "evaluate_model",
    "exact_memorization",
    "exact_memorization_from_ids",
    "extraction_strength",
    "extraction_strength_from_ids",
    "forget_quality",
    "generate_greedy",
    "get_metric",
    "inference_mode",
    "knowmem",
    "knowmem_prompt",
    "letters_prompt",
    "list_metrics",
    "mask_experts",
    "loss_score",
    "mcq_accuracy",
    "mia",
    "mia_auc",
    "mia_scores",
    "min_k",
    "min_k_from_logprobs",
    "min_k_plus_plus",
    "min_k_prob",
    "model_utility",
    "perplexity",
    "plot_tradeoff",
    "privleak",
    "qa_rouge",
    "register_metric",
    "restore_routing",
    "results_table",
    "rouge_l",
    "routing_diagnostics",
    "routing_restore",
    "routing_stability",
    "same_topk",
    "score_continuations",
    "score_texts",
    "truth_ratio",
    "truth_ratio_from_nll",
    "verbmem",
    "write_model_card_results",
    "zlib_score",
]
