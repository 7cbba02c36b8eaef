"""``hf-moe-unlearn bench`` and ``hf-moe-unlearn demo``: the side-by-side benchmark from the command line.

Wired into :mod:`hf_moe_unlearn.cli` by the lead; each parser sets ``func`` to a function that takes the
argparse ``Namespace`` and returns an exit code. Bad input raises ``MoEUnlearnError``, which the CLI turns
into one line and exit status 2.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from ..errors import MoEUnlearnError
from .run import DEMO_METHODS, METHODS, run_benchmark

__all__ = ["add_bench_parser", "add_demo_parser", "run_bench", "run_demo", "parse_seeds"]


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]``, with a clear error for anything else."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise MoEUnlearnError(f"--seeds must be a comma list of integers such as 0,1,2; got {text!r}.") from None
    if not seeds:
        raise MoEUnlearnError("--seeds is empty; give at least one integer seed, e.g. --seeds 0.")
    return seeds


def _add_common(p: argparse.ArgumentParser, default_output: str) -> None:
    p.add_argument("--forget_setting", choices=["domain", "entities"], default="domain",
                   help="domain: forget a whole topical domain (WMDP-like); entities: a share of entities (TOFU-like)")
    p.add_argument("--output", default=default_output, help="directory for results.md/.json, tradeoff.png, model cache")
    p.add_argument("--device", default=None, help="cpu to force the CPU (default: a GPU if there is one)")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """The ``bench`` subcommand: any methods, seeds and size."""
    p = subparsers.add_parser("bench", help="Benchmark unlearning methods side by side on the synthetic MoE benchmark.")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list among: {', '.join(METHODS)}")
    p.add_argument("--seeds", default="0,1,2", help="comma list of unlearning seeds (table: mean over seeds)")
    p.add_argument("--size", choices=["small", "full"], default="full")
    _add_common(p, "runs/bench")
    p.set_defaults(func=run_bench)
    return p


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    """The ``demo`` subcommand: the small benchmark with a handful of methods (minutes on 2 CPU cores)."""
    p = subparsers.add_parser("demo", help=f"Small end-to-end benchmark: {', '.join(DEMO_METHODS)} (≈10 min on 2 CPUs).")
    p.add_argument("--seeds", default="0", help="comma list of unlearning seeds")
    _add_common(p, "runs/demo")
    p.set_defaults(func=run_demo)
    return p


def _run(args: argparse.Namespace, methods: Any, size: str) -> int:
    import datasets

    datasets.disable_progress_bars()  # one "Tokenizing" bar per dataset per method drowns the progress lines
    start = time.perf_counter()
    result = run_benchmark(methods, parse_seeds(args.seeds), size=size, workdir=args.output, device=args.device,
                           forget_setting=args.forget_setting)
    print()
    print(result["table"])
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
