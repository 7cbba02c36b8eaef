"""The ``hf-moe-unlearn`` command line.

Subcommands: ``attribute`` (routing statistics + expert selection), ``unlearn`` (train with every
``MoEUnlearnConfig`` field as a flag), ``evaluate`` (WMDP/MMLU through lm-eval, MUSE, TOFU, routing), ``demo`` / ``bench`` (the built-in benchmark), ``families`` (supported
model families).
Bad input (a missing file, an empty dataset, a dense model, ...) prints one clear line and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .errors import MoEUnlearnError

EXIT_BAD_INPUT = 2


#: What a Hub model name looks like: ``name`` or ``org/name``. Anything else that is not on disk is a path.
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_model_path(name_or_path: str) -> str:
    """Refuse, before anything loads, a ``--model`` that is meant as a local path but is not a saved model.

    A string that exists on disk must be a directory with a ``config.json``; one that is not on disk and does not
    look like a Hub name (``org/name``) is a path that does not exist. Saying so beats transformers' message, which
    reports a failed Hub look-up for any string it cannot find locally.
    """
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise MoEUnlearnError(
                f"--model {name_or_path}: the directory holds no config.json, so it is not a saved transformers model. "
                f"Give the directory model.save_pretrained() (and the tokenizer's save_pretrained) wrote."
            )
        return path
    if os.path.exists(path):
        raise MoEUnlearnError(f"--model {name_or_path} is a file: give the directory that holds the model's "
                              f"config.json and weights, or a Hub name (org/name).")
    if name_or_path.startswith((".", "~", os.sep)) or not _HUB_NAME.match(name_or_path):
        raise MoEUnlearnError(f"--model {name_or_path}: the local path {os.path.abspath(path)} does not exist. Check "
                              f"the path (relative paths start from {os.getcwd()}).")
    return name_or_path


def _trainable_quantization(name_or_path: str) -> dict:
    """``from_pretrained`` arguments that load a quantized checkpoint as trainable weights.

    GPT-OSS checkpoints store their experts in MXFP4; where triton and ``kernels`` are installed, transformers keeps
    them quantized (``Mxfp4GptOssExperts``), which cannot train and which the expert adapter cannot wrap. Unlearning
    changes those experts, so they are dequantized to bf16 at load (transformers' ``Mxfp4Config(dequantize=True)``,
    what it does anyway without the kernels). Other checkpoints load as they are."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError):
        return {}  # from_pretrained below reports the problem
    quantization = getattr(config, "quantization_config", None) or {}
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization,
                                                                                             "quant_method", None)
    if str(method).lower().endswith("mxfp4"):
        from transformers import Mxfp4Config

        return {"quantization_config": Mxfp4Config(dequantize=True)}
    return {}


def _check_vocabulary_before_weights(name_or_path: str, tokenizer) -> None:
    """The trainer's tokenizer-vs-embeddings check, on the config's ``vocab_size`` (the embedding rows
    ``from_pretrained`` builds) before the weights load, which can take minutes; the trainer checks the loaded
    embeddings again."""
    from transformers import AutoConfig

    from .trainer import MoEUnlearnTrainer

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError):
        return  # from_pretrained reports the problem
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    rows = getattr(config, "vocab_size", None)
    if isinstance(rows, int) and rows > 0:
        MoEUnlearnTrainer._check_vocabulary(rows, tokenizer, {})


def _load_model_and_tokenizer(name_or_path: str):
    """Load a causal LM and its tokenizer from a local path or a Hub name (the Hub needs network access)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    name_or_path = check_model_path(name_or_path)
    hf_logging.disable_progress_bar()  # one bar per weight file is noise next to our own progress bars
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        from .deepspeed_support import no_zero3_init

        _check_vocabulary_before_weights(name_or_path, tokenizer)
        with no_zero3_init():  # loaded whole under a ZeRO-3 config (the selection needs it); the engine shards it
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype="auto",
                                                         **_trainable_quantization(name_or_path))
    except (OSError, ValueError) as err:
        if isinstance(err, MoEUnlearnError):
            raise
        where = "" if os.path.isdir(name_or_path) else " (not a local directory, so it was looked up on the Hub)"
        raise MoEUnlearnError(
            f"Cannot load --model '{name_or_path}'{where}: {str(err).strip().splitlines()[0]}"
        ) from err
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

    _check_attribute_flags(args)
    if args.method == "trace" and not args.retain:
        raise MoEUnlearnError("--method trace needs --retain: TRACE compares forget and retain routing.")
    check_model_path(args.model)
    forget_data = load_texts(args.forget, "forget set")
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


def _check_attribute_flags(args: argparse.Namespace) -> None:
    """The numbers of ``attribute`` out of range, refused before any file or model is read."""
    from .data.text import check_max_length

    for flag in ("top_m", "batch_size"):
        if getattr(args, flag) < 1:
            raise MoEUnlearnError(f"--{flag} {getattr(args, flag)} must be at least 1.")
    for flag in ("max_layers", "max_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise MoEUnlearnError(f"--{flag} {getattr(args, flag)} must be at least 1 (leave it out for no limit).")
    for flag in ("tau", "rho"):
        if not getattr(args, flag) >= 0:
            raise MoEUnlearnError(f"--{flag} {getattr(args, flag)} must be >= 0.")
    check_max_length(args.max_length)


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
    script, config = _parse_with_config_file(parser, args.extra)  # ranges: MoEUnlearnConfig.__post_init__
    check_model_path(script.model)
    forget = load_texts(script.forget, "forget set")
    retain = load_texts(script.retain, "retain set") if script.retain else None
    holdout = load_texts(script.holdout, "holdout set") if script.holdout else None
    forget_probe = load_texts(script.forget_probe, "forget probe set") if script.forget_probe else None
    _check_before_model(config, retain, holdout)
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


def _parse_with_config_file(parser, extra: list[str]):
    """TrlParser's parse, with a bad ``--config`` file (missing, not YAML, not a mapping, an unknown key) said in one
    line naming the file, instead of TRL's ``ValueError`` / yaml's traceback."""
    import yaml

    config_file = extra[extra.index("--config") + 1] if "--config" in extra[:-1] else None
    if config_file is not None and not os.path.isfile(config_file):
        raise MoEUnlearnError(f"The --config file {config_file} does not exist.")
    try:
        return parser.parse_args_and_config(args=extra)
    except yaml.YAMLError as err:
        raise MoEUnlearnError(f"The --config file {config_file} is not valid YAML: "
                              f"{' '.join(str(err).split())}") from err
    except ValueError as err:
        if config_file is None or isinstance(err, MoEUnlearnError):
            raise
        message = str(err).split(". Please remove them")[0].rstrip(".")
        raise MoEUnlearnError(
            f"The --config file {config_file}: {message}. Each key must be a flag of `hf-moe-unlearn unlearn` "
            f"(see --help) without the leading --."
        ) from err


def _check_before_model(config, retain, holdout) -> None:
    """What the trainer would refuse without needing the model, checked before the model loads (which can take
    minutes): the selection file's syntax, the loss names and the data they need, the stopping settings. The layers
    and experts of the selection need the model: the trainer checks them before the first step."""
    from types import SimpleNamespace

    from .routing import ExpertSelection
    from .trainer import MoEUnlearnTrainer

    if config.selection:
        ExpertSelection.load(config.selection)
    elif config.selection_method == "trace" and retain is None:
        raise MoEUnlearnError("--selection_method trace needs --retain: TRACE compares forget and retain routing.")
    # The trainer's own checks, run now rather than copied: _resolve_losses only looks names up in the registry
    # (it stores them on its first argument, here a throw-away namespace).
    MoEUnlearnTrainer._resolve_losses(SimpleNamespace(), config, retain)
    MoEUnlearnTrainer._check_probe_args(config, holdout, retain, {})
    from .saving import check_output_dir  # the trainer checks it again at train(); here before the model loads

    check_output_dir(config.output_dir, config.resume_from_checkpoint is not None, config.overwrite_output_dir)


#: The trainer's Python arguments that a CLI flag sets.
_ARGUMENT_FLAGS = {"forget_dataset": "--forget FILE", "retain_dataset": "--retain FILE",
                   "holdout_dataset": "--holdout FILE", "forget_probe_dataset": "--forget_probe FILE"}
_VALUE = r"""'[^']*'|"[^"]*"|\{[^}]*\}|\[[^\]]*\]|[^\s,;)]+"""


def in_flags(message: str, names) -> str:
    """Say ``message`` in the words of the command line: ``name=value`` becomes ``--name value`` and a bare
    ``snake_case`` field name ``--name`` for every name in ``names`` (the command's flags), and the trainer's
    dataset arguments (``retain_dataset=...``) become their flags (``--retain FILE``).

    The library's messages speak Python (``MoEUnlearnConfig(max_length=...)``), which is right for the API; the
    CLI translates them here, in one place, instead of every message carrying both spellings.
    """
    message = re.sub(r" \(CLI: [^)]*\)", "", message)  # the few messages that already give the flag
    for argument, flag in _ARGUMENT_FLAGS.items():
        message = re.sub(rf"\b{argument}=(\.\.\.)?", flag, message)
    message = re.sub(r"\bprocessing_class=", "", message)
    names = sorted(set(names), key=len, reverse=True)
    if not names:
        return message
    alternatives = "|".join(map(re.escape, names))

    def flag_value(match: re.Match) -> str:
        value, tail = match.group(2), ""
        if value[:1] in "'\"" and value[-1:] == value[:1]:
            value = value[1:-1]
        elif value.endswith((".", ":")) and not value[:1] in "{[":
            value, tail = value[:-1], value[-1]
        value = {"True": "true", "False": "false", "None": "none"}.get(value, value)
        return f"--{match.group(1)} {value}{tail}"

    message = re.sub(rf"(?<![\w\-./'\"])({alternatives})=({_VALUE})", flag_value, message)
    bare = "|".join(re.escape(n) for n in names if "_" in n)
    if bare:
        message = re.sub(rf"(?<![\w\-./'\"])({bare})(?![\w(]|\.\w)", r"--\1", message)
    return message


def _flag_names(args: argparse.Namespace) -> list[str]:
    """The flags of the command that ran (their ``dest`` names)."""
    if args.command == "unlearn":
        from .config import MoEUnlearnConfig

        return [f.name for cls in (MoEUnlearnConfig, UnlearnScriptArguments) for f in dataclasses.fields(cls)]
    return [name for name in vars(args) if name not in ("func", "command", "extra", "accepts_extra")]


def _add_evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="Evaluate a model (and adapter) on WMDP, MMLU (lm-eval), MUSE, TOFU, routing.")
    p.add_argument("--model", required=True, help="local path or Hub name of the base model")
    p.add_argument("--adapter", help="PEFT adapter folder to evaluate on top of --model")
    p.add_argument("--tasks", required=True,
                   help="comma-separated tasks: wmdp_bio, wmdp_chem, wmdp_cyber, wmdp, mmlu, mmlu_stem, ..., "
                        "mmlu_<subject>, muse_books, muse_news, tofu, routing")
    p.add_argument("--output", required=True, help="directory for results.json and results.md")
    p.add_argument("--task_data", action="append", default=[], metavar="NAME=PATH[,NAME=PATH]",
                   help="a local copy of a task's data in the Hub format (repeatable): a question/choices/answer "
                        "file for lm-eval tasks, the dataset folder for muse_*/tofu, routing_forget=FILE and "
                        "routing_retain=FILE for routing")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="at most N examples per dataset (smoke runs)")
    p.add_argument("--retrain_model", help="a model retrained without the forget set: MUSE PrivLeak, TOFU forget quality")
    p.add_argument("--selection", help="selection.json for the routing task (default: the adapter's selection)")
    p.add_argument("--tofu_forget_split", default="forget10", help="forget01, forget05 or forget10")
    p.add_argument("--log_samples", action="store_true", help="keep lm-eval's per-question log-likelihoods")
    p.add_argument("--attacks", default="",
                   help="comma-separated routing attacks to run every task under again: expert_masking (the "
                        "adapter's edited experts removed from routing), routing_restore (the original model's "
                        "routing forced); needs --adapter")
    p.add_argument("--model_card", action="store_true",
                   help="write the results into the adapter's README.md as Hub model-index metadata")
    p.set_defaults(func=run_evaluate)


def parse_task_data(items: Sequence[str]) -> dict[str, str]:
    """``["a=x,b=y", "c=z"]`` -> ``{"a": "x", "b": "y", "c": "z"}``; a malformed or repeated entry is refused."""
    out: dict[str, str] = {}
    for item in items:
        for part in item.split(","):
            name, sep, path = part.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise MoEUnlearnError(f"--task_data {part!r}: write NAME=PATH, e.g. --task_data wmdp_cyber=wmdp_cyber.jsonl.")
            if name.strip() in out:
                raise MoEUnlearnError(f"--task_data names {name.strip()} twice.")
            out[name.strip()] = path.strip()
    return out


def run_evaluate(args: argparse.Namespace) -> int:
    from .evaluation.harness import check_tasks, evaluate_model

    task_data = parse_task_data(args.task_data)
    tasks = check_tasks(args.tasks.split(","), task_data)  # before the model path, so the cheapest error comes first
    from .evaluation.harness import check_attacks

    attacks = check_attacks(args.attacks.split(","), args.adapter, tasks)
    check_model_path(args.model)
    if args.retrain_model:
        check_model_path(args.retrain_model)
    report = evaluate_model(args.model, adapter=args.adapter, tasks=tasks, task_data=task_data,
                            output_dir=args.output, batch_size=args.batch_size, limit=args.limit,
                            retrain_model=args.retrain_model, selection=args.selection,
                            tofu_forget_split=args.tofu_forget_split, log_samples=args.log_samples,
                            model_card=args.model_card, attacks=attacks)
    from .evaluation.harness import results_markdown

    print(results_markdown(report))
    print(f"results: {os.path.join(args.output, 'results.json')}")
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


COMMANDS: list[Callable] = [_add_attribute_parser, _add_unlearn_parser, _add_evaluate_parser, _add_bench_parsers,
                            _add_families_parser]


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
        message = " ".join(in_flags(str(err), _flag_names(args)).split())  # one line, in flags
        print(f"hf-moe-unlearn {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
