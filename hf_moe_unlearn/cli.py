"""The ``hf-moe-unlearn`` command line.

Subcommands: ``attribute`` (routing statistics + expert selection), ``unlearn`` (train with every
``MoEUnlearnConfig`` field as a flag), ``demo`` / ``bench`` (the built-in benchmark), ``families`` (supported
model families).
Bad input (a missing file, an empty dataset, a dense model, ...) prints one clear line and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .errors import MoEUnlearnError

EXIT_BAD_INPUT = 2


def _load_model_and_tokenizer(name_or_path: str):
    """Load a causal LM and its tokenizer from a local path or a Hub name (the Hub needs network access)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per weight file is noise next to our own progress bars
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        from .deepspeed_support import no_zero3_init

        with no_zero3_init():  # loaded whole under a ZeRO-3 config (the selection needs it); the engine shards it
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype="auto")
    except OSError as err:
        raise MoEUnlearnError(f"Cannot load model '{name_or_path}': {str(err).splitlines()[0]}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _add_attribute_parser(sub) -> None:
    p = sub.add_parser("attribute", help="Attribute a forget set to the experts it depends on and select experts.")
    p.add_argument("--model", required=True, help="local path or Hub name of an MoE causal LM")
    p.add_argument("--forget", required=True, help="forget data: .txt (one document per line), .jsonl, or a saved dataset")
    p.add_argument("--retain", help="retain data (required for --method trace; shown next to forget otherwise)")
    p.add_argument("--method", choices=["seuf", "trace"], default="seuf")
    p.add_argument("--output", required=True, help="directory for selection.json, statistics and routing.png")
    p.add_argument("--top_m", type=int, default=1, help="experts to select (SEUF: globally; TRACE: per layer)")
    p.add_argument("--per_layer", action="store_true", help="SEUF: top-M in every layer instead of globally")
    p.add_argument("--seuf_score", choices=["masked_softmax", "gate"], default="masked_softmax",
                   help="SEUF Eq. 2's g: masked_softmax (the paper: router probabilities masked to the top-k, not "
                        "renormalised) or gate (the gate weights the model applies)")
    p.add_argument("--tau", type=float, default=1.0, help="TRACE: forget frequency ≥ tau·k/E")
    p.add_argument("--rho", type=float, default=1.1, help="TRACE: forget/retain frequency ratio ≥ rho")
    p.add_argument("--max_layers", type=int, default=None, help="TRACE: keep only the N best layers")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--max_tokens", type=int, default=None, help="stop after this many counted tokens per dataset")
    p.set_defaults(func=run_attribute)


def run_attribute(args: argparse.Namespace) -> int:
    from .data.text import load_texts
    from .moe.layers import find_moe_layers
    from .routing import attribute_experts, select_seuf, select_trace
    from .routing.report import plot_routing_heatmap, top_experts_table

    forget_data = load_texts(args.forget, "forget set")
    if args.method == "trace" and not args.retain:
        raise MoEUnlearnError("--method trace needs --retain: TRACE compares forget and retain routing.")
    retain_data = load_texts(args.retain, "retain set") if args.retain else None
    model, tokenizer = _load_model_and_tokenizer(args.model)
    find_moe_layers(model)  # a dense model fails here, before any work
    common = dict(batch_size=args.batch_size, max_length=args.max_length, max_tokens=args.max_tokens)
    forget = attribute_experts(model, forget_data, tokenizer, name="forget set", **common)
    retain = attribute_experts(model, retain_data, tokenizer, name="retain set", **common) if retain_data else None
    if args.method == "seuf":
        selection = select_seuf(forget, top_m=args.top_m, per_layer=args.per_layer, score=args.seuf_score)
    else:
        selection = select_trace(
            forget, retain, tau=args.tau, rho=args.rho, top_m=args.top_m, max_layers=args.max_layers
        )
    os.makedirs(args.output, exist_ok=True)
    selection_path = selection.save(os.path.join(args.output, "selection.json"))
    forget.save(os.path.join(args.output, "forget_stats.json"))
    if retain is not None:
        retain.save(os.path.join(args.output, "retain_stats.json"))
    plot_path = plot_routing_heatmap(forget, retain, selection, os.path.join(args.output, "routing.png"))
    print(top_experts_table(forget, retain, selection))
    print(f"selection: {selection_path}\nheatmap:   {plot_path}")
    return 0


@dataclass
class UnlearnScriptArguments:
    """Arguments of `hf-moe-unlearn unlearn` that are not training settings."""

    model: str = field(metadata={"help": "Local path or Hub name of the MoE causal LM."})
    forget: str = field(metadata={"help": "Forget data: .txt, .jsonl, .parquet, .csv or a saved dataset."})
    retain: str | None = field(default=None, metadata={"help": "Retain data (same formats)."})
    holdout: str | None = field(
        default=None,
        metadata={"help": "Text of the same kind as the forget set that the model never saw (same formats): turns "
                          "the evaluation on; with --stop_at_holdout, training stops when the forget probe's NLL "
                          "reaches the holdout's."},
    )
    forget_probe: str | None = field(
        default=None,
        metadata={"help": "Probe set whose NLL is compared with the holdout's (default: a fixed sample of the "
                          "forget set, --forget_probe_size examples)."},
    )


def _add_unlearn_parser(sub) -> None:
    p = sub.add_parser(
        "unlearn", add_help=False,
        help="Unlearn a forget set (every MoEUnlearnConfig field is a flag; --config file.yaml also works).",
    )
    p.set_defaults(func=run_unlearn, accepts_extra=True)


def run_unlearn(args: argparse.Namespace) -> int:
    """Parse the flags with TRL's parser (HfArgumentParser + ``--config file.yaml``), train, save the adapter."""
    from trl import TrlParser

    from .config import MoEUnlearnConfig
    from .data.text import load_texts
    from .trainer import MoEUnlearnTrainer

    parser = TrlParser((UnlearnScriptArguments, MoEUnlearnConfig), prog="hf-moe-unlearn unlearn")
    script, config = parser.parse_args_and_config(args=args.extra)
    forget = load_texts(script.forget, "forget set")
    retain = load_texts(script.retain, "retain set") if script.retain else None
    holdout = load_texts(script.holdout, "holdout set") if script.holdout else None
    forget_probe = load_texts(script.forget_probe, "forget probe set") if script.forget_probe else None
    model, tokenizer = _load_model_and_tokenizer(script.model)
    trainer = MoEUnlearnTrainer(model, config, forget_dataset=forget, retain_dataset=retain,
                                processing_class=tokenizer, holdout_dataset=holdout,
                                forget_probe_dataset=forget_probe)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    trainer.save_state()
    trainer.create_model_card()
    stop = trainer.stop_callback
    if stop is not None and stop.outcome is not None and stop.outcome_level < logging.WARNING:
        print(stop.outcome)  # warnings reach stderr through logging already
    print(f"adapter, selection and config saved to {config.output_dir}")
    return 0


def _add_families_parser(sub) -> None:
    p = sub.add_parser("families", help="Print the table of supported MoE families (markdown).")
    p.set_defaults(func=lambda args: print(families_markdown()) or 0)


def families_markdown() -> str:
    """Markdown table of every supported family, read off tiny models built from the code (not typed by hand)."""
    from .moe.layers import find_moe_layers
    from .moe.tiny import CORE_FAMILIES, TINY_CONFIGS, tiny_moe_model

    rows = ["| family | MoE block | router | experts | layout | shared experts | router scores |", "|---|---|---|---|---|---|---|"]
    for family in sorted(TINY_CONFIGS):
        layer = find_moe_layers(tiny_moe_model(family))[0]
        block_attr = layer.name.rsplit(".", 1)[-1]
        layout = "fused 3-D" + (", transposed" if layer.is_transposed else "")
        shared = ", ".join(s.rsplit(".", 1)[-1] for s in layer.shared_experts) or "—"
        name = f"**{family}**" if family in CORE_FAMILIES else family
        rows.append(
            f"| {name} | `{type(layer.block).__name__}` (`{block_attr}`) | `{type(layer.router).__name__}` "
            f"(`{layer.router_name.rsplit('.', 1)[-1]}`) | `{type(layer.experts).__name__}` | {layout} | {shared} "
            f"| {layer.score_fn} |"
        )
    return "\n".join(rows)


def _add_bench_parsers(sub) -> None:
    from .bench.commands import add_bench_parser, add_demo_parser

    add_demo_parser(sub)
    add_bench_parser(sub)


COMMANDS: list[Callable] = [_add_attribute_parser, _add_unlearn_parser, _add_bench_parsers, _add_families_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-moe-unlearn", description="Machine unlearning for Mixture-of-Experts language models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return int(args.func(args) or 0)
    except MoEUnlearnError as err:
        print(f"hf-moe-unlearn {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
