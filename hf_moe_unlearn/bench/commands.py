"""``hf-moe-unlearn bench`` and ``hf-moe-unlearn demo``: the side-by-side benchmark from the command line.

Wired into :mod:`hf_moe_unlearn.cli` by the lead; each parser sets ``func`` to a function that takes the
argparse ``Namespace`` and returns an exit code. Bad input raises ``MoEUnlearnError``, which the CLI turns
into one line and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch

from ..errors import MoEUnlearnError
from .run import ATTACK_COLUMNS, COLUMNS, DEMO_METHODS, METHODS, run_benchmark

__all__ = ["add_bench_parser", "add_demo_parser", "parse_learning_rates", "parse_seeds", "run_bench", "run_demo"]


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]``, with a clear error for anything else."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise MoEUnlearnError(f"--seeds must be a comma list of integers such as 0,1,2; got {text!r}.") from None
    if not seeds:
        raise MoEUnlearnError("--seeds is empty; give at least one integer seed, e.g. --seeds 0.")
    return seeds


def parse_learning_rates(text: str) -> list[float]:
    """``"2e-3,6e-3,2e-2"`` → ``[0.002, 0.006, 0.02]``; empty, non-numeric or non-positive values are an error."""
    try:
        rates = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise MoEUnlearnError(
            f"--learning_rates must be a comma list of numbers such as 2e-3,6e-3,2e-2; got {text!r}.") from None
    if not rates:
        raise MoEUnlearnError("--learning_rates is empty; give at least one learning rate, e.g. --learning_rates 2e-3.")
    bad = [r for r in rates if not r > 0 or r == float("inf")]
    if bad:
        raise MoEUnlearnError(f"--learning_rates must be positive finite numbers; got {', '.join(map(repr, bad))}.")
    return rates


def _flag_value(flag: str, text: str | None, cast, valid, what: str):
    """``cast(text)`` if it is ``valid``, None when the flag is absent; otherwise a one-line error naming ``what``."""
    if text is None:
        return None
    try:
        value = cast(text)
    except ValueError:
        raise MoEUnlearnError(f"{flag} must be {what}; got {text!r}.") from None
    if not valid(value):
        raise MoEUnlearnError(f"{flag} must be {what}; got {value:g}.")
    return value


def _positive_int(flag: str, text: str | None) -> int | None:
    return _flag_value(flag, text, int, lambda v: v >= 1, "a positive integer")


def _forget_target(text: str | None) -> float | None:
    return _flag_value("--forget_target", text, float, lambda v: 0.0 <= v <= 1.0, "a forget MCQ accuracy in [0, 1]")


def _add_common(p: argparse.ArgumentParser, default_output: str) -> None:
    p.add_argument("--forget_setting", choices=["domain", "entities"], default="domain",
                   help="domain: forget a whole topical domain (WMDP-like); entities: a share of entities (TOFU-like)")
    p.add_argument("--output", default=default_output, help="directory for results.md/.json, tradeoff.png, model cache")
    p.add_argument("--device", default=None, help="cpu to force the CPU (default: a GPU if there is one)")
    p.add_argument("--steps", default=None, help="unlearning steps of every trajectory (default: the size's preset)")
    p.add_argument("--learning_rates", default=None,
                   help="comma list: the learning-rate grid every method is trained with (default: the size's preset)")
    p.add_argument("--eval_every", default=None, help="probe forget/utility MCQ every N steps (default: preset)")
    p.add_argument("--forget_target", default=None,
                   help="forget MCQ accuracy every method must reach (default: the retrain model's + 0.05)")
    p.add_argument("--threads", default=None,
                   help="torch threads on CPU (default: 1, or OMP_NUM_THREADS when set): the tiny models gain little "
                        "from more, and two threads on a busy 2-core machine spin-wait (a 60-step demo trajectory "
                        "took 17 s with 2 threads at load 2, 428 s at load 4)")
    p.add_argument("--match", choices=["forget", "none"], default="forget",
                   help="forget: compare at matched forgetting (default); none: one shared budget (one learning rate), "
                        "every method evaluated after --steps")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """The ``bench`` subcommand: any methods, seeds and size."""
    p = subparsers.add_parser(
        "bench", help="Benchmark unlearning methods side by side on the synthetic MoE benchmark.",
        description="Every method unlearns the same pre-trained target at each learning rate of one grid and is "
                    "compared at matched forgetting (docs/benchmark.md). Columns: " + ", ".join(COLUMNS) + ". The "
                    "attack columns (" + ", ".join(ATTACK_COLUMNS) + ") are the forget MCQ with the edited experts "
                    "masked (– when every expert of a layer is edited) and with the target's routing restored, and "
                    "the share of retain / held-out / forget tokens whose top-k routing is unchanged / changed.")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma list among: {', '.join(METHODS)} (+GRIP: the same method with GRIP's router "
                        f"constraint, router_constraint='grip')")
    p.add_argument("--seeds", default="0,1,2", help="comma list of unlearning seeds (table: mean over seeds)")
    p.add_argument("--size", choices=["small", "full", "concentrated"], default="full",
                   help="concentrated: the full benchmark with domain-specific vocabulary, 32 experts (top-2) and a dense "
                        "first layer, routing as concentrated as a pretrained MoE's (docs/benchmark.md)")
    _add_common(p, "runs/bench")
    p.set_defaults(func=run_bench)
    return p


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    """The ``demo`` subcommand: the small benchmark with a handful of methods (minutes on 2 CPU cores)."""
    p = subparsers.add_parser(
        "demo",
        help=f"Small end-to-end benchmark at matched forgetting: {', '.join(DEMO_METHODS)} (< 10 min on 2 CPUs).")
    p.add_argument("--seeds", default="0", help="comma list of unlearning seeds")
    _add_common(p, "runs/demo")
    p.set_defaults(func=run_demo)
    return p


def _run(args: argparse.Namespace, methods: Any, size: str) -> int:
    import datasets

    datasets.disable_progress_bars()  # one "Tokenizing" bar per dataset per method drowns the progress lines
    seeds = parse_seeds(args.seeds)
    options = dict(
        steps=_positive_int("--steps", args.steps), eval_every=_positive_int("--eval_every", args.eval_every),
        learning_rates=None if args.learning_rates is None else parse_learning_rates(args.learning_rates),
        forget_target=_forget_target(args.forget_target), match=args.match,
    )
    threads = _positive_int("--threads", args.threads)
    if threads is not None:
        torch.set_num_threads(threads)
    elif "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        torch.set_num_threads(1)
    start = time.perf_counter()
    result = run_benchmark(methods, seeds, size=size, workdir=args.output, device=args.device,
                           forget_setting=args.forget_setting, **options)
    print()
    print(result["table"])
    for line in result["summary"]:
        print(line)
    print(f"wall time: {time.perf_counter() - start:.0f}s (pre-training {result['pretrain_seconds']:.0f}s, "
          f"{'cached' if result['pretrain_reused'] else 'trained'}; device {result['device']}, "
          f"{result['torch_threads']} torch threads)")
    print(f"table:     {result['paths']['table']}\njson:      {result['paths']['json']}\n"
          f"plot:      {result['paths']['plot']}")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    """Run ``bench`` from parsed arguments; returns the exit code."""
    return _run(args, args.methods, args.size)


def run_demo(args: argparse.Namespace) -> int:
    """Run ``demo`` from parsed arguments; returns the exit code."""
    return _run(args, DEMO_METHODS, "small")
