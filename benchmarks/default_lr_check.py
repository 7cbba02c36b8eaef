"""Do the default learning rates forget? ``unlearn`` as a user runs it, on the built-in benchmark.

For each method, unlearns the benchmark's pre-trained target model with ``MoEUnlearnTrainer`` and everything at
its default — learning rate (``DEFAULT_LEARNING_RATES``, picked by what trains), epochs (3 over the forget set),
batch size, eval_steps — except what the method sets, with the benchmark's holdout passages as ``holdout_dataset``
and ``stop_at_holdout=True`` (the CLI's ``--holdout FILE --stop_at_holdout``). Prints per method the learning rate
used, whether the forget probe reached the holdout's NLL and at which step, the retain NLL rise, and forget /
utility MCQ after the run (the bench's probe metrics) next to the target's and the retrain model's.

    python benchmarks/default_lr_check.py --size small --output runs/default-lr

Methods: the demo's (``DEMO_METHODS``) and "GradDiff+SEUF" with ``adapter="full"`` (``--methods`` to choose).
The pre-trained pair is cached under ``--output`` (the bench's cache format: point it at a bench/demo output to reuse).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="small", choices=["small", "full"])
    parser.add_argument("--output", default="runs/default-lr")
    parser.add_argument("--methods", default=None, help="comma list (default: the demo's and GradDiff+SEUF full)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning_rate", type=float, default=None, help="instead of the defaults (to explore)")
    parser.add_argument("--eval_steps", type=int, default=None, help="instead of the default (10)")
    args = parser.parse_args()

    import datasets
    import transformers

    from hf_moe_unlearn import MoEUnlearnConfig, MoEUnlearnTrainer
    from hf_moe_unlearn.bench.pretrain import PretrainSettings, pretrain_models
    from hf_moe_unlearn.bench.run import DEMO_METHODS, METHODS, BenchBudget, _eval_data, method_selection, probe_metrics
    from hf_moe_unlearn.bench.synthetic import BenchmarkSpec, make_benchmark

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    names = args.methods.split(",") if args.methods else [*DEMO_METHODS, "GradDiff+SEUF full"]
    benchmark = make_benchmark(BenchmarkSpec.preset(args.size))
    pair = pretrain_models(benchmark, Path(args.output) / "pretrain-cache", settings=PretrainSettings.preset(args.size),
                           device="cpu")
    data = _eval_data(benchmark, BenchBudget.preset(args.size))
    tokenizer = pair.tokenizer
    for name in ("target", "retrain"):
        m = probe_metrics(getattr(pair, name), tokenizer, data)
        print(f"{name:22s} forget_mcq {m['forget_mcq']:.3f}  utility_mcq {m['utility_mcq']:.3f}")
    for name in names:
        base_name, _, adapter = name.partition(" ")
        method = dataclasses.replace(METHODS[base_name], adapter=adapter or "lora")
        config = MoEUnlearnConfig(
            output_dir=str(Path(args.output) / "scratch"), **method.config_fields(), stop_at_holdout=True,
            learning_rate=args.learning_rate, **({"eval_steps": args.eval_steps} if args.eval_steps else {}),
            max_length=128, seed=args.seed, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        )
        model = copy.deepcopy(pair.target)
        trainer = MoEUnlearnTrainer(
            model, config, forget_dataset=benchmark.forget_text,
            retain_dataset=None if method.retain_loss == "none" else benchmark.retain_text,
            holdout_dataset=benchmark.holdout_text, processing_class=tokenizer,
            selection=method_selection(method, model),
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        evals = [e for e in trainer.state.log_history if "eval_holdout_nll" in e]
        last = evals[-1]
        callback = trainer.stop_callback
        reached = f"reached at step {callback.reached_step}" if callback.reached_step is not None else "NOT reached"
        m = probe_metrics(trainer.model, tokenizer, data)
        print(f"{name:22s} lr {config.learning_rate:g}: {reached} of {trainer.state.max_steps} "
              f"(probe NLL {evals[0]['eval_forget_probe_nll']:.2f} -> {last['eval_forget_probe_nll']:.2f}, holdout "
              f"{last['eval_holdout_nll']:.2f}, retain NLL rise {last.get('eval_retain_nll_rise', float('nan')):+.1%}); "
              f"forget_mcq {m['forget_mcq']:.3f}  utility_mcq {m['utility_mcq']:.3f}  ({seconds:.0f}s)")
        del trainer, model


if __name__ == "__main__":
    main()
