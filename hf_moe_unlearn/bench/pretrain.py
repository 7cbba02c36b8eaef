"""Pre-train the benchmark's two models: the *target* (all data) and the *retrain* reference (no forget set).

The retrained model is the ideal outcome of unlearning, the reference no public MoE benchmark has. Both
are small Qwen3-MoE models trained from scratch with a plain ``transformers.Trainer`` on the generated
passages and on the QA pairs written as ``"Question: ...\\nAnswer: ..."`` (the format the metrics ask in).
MCQs are *not* trained on: they are scored by the log-likelihood of each choice after the same question
prompt, and since every QA answer starts with the value, that scoring asks exactly what the QA text
taught; training MCQ text would only teach a letter-picking format the metrics do not use.

Training takes minutes, so results are cached on disk under ``output_dir/<key>/{target,retrain,tokenizer}``
where ``key`` hashes everything that determines the result (benchmark spec, model config, training
settings, library versions); a later call with the same inputs loads instead of training.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForLanguageModeling,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3MoeConfig,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_pt_utils import LengthGroupedSampler

from ..errors import MoEUnlearnError
from .synthetic import BenchmarkSpec, SyntheticBenchmark, format_qa, format_qa_prompt, make_benchmark
from .tokenizer import build_benchmark_tokenizer, load_tokenizer, save_tokenizer

# Bump when the generator or the training recipe changes in a way the hashed inputs do not show, so that
# stale caches are not reused.
CACHE_VERSION = 1
_INFO_FILE = "pretrain_info.json"
_MODEL_NAMES = ("target", "retrain")

#: Architecture defaults: 4 layers, 8 experts, top-2, hidden size 64 (0.55 M parameters). Measured: enough to
#: memorise the "full" benchmark (800 facts) perfectly, and twice as fast on CPU as hidden size 128.
DEFAULT_MODEL_KWARGS: dict[str, Any] = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,  # unused (every layer is MoE) but kept small; the MLP of mlp_only_layers if any
    moe_intermediate_size=64,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    max_position_embeddings=256,
    # The load-balancing loss is on only while pre-training (see _train_one): without it a MoE trained from
    # scratch tends to collapse on a few experts, and expert attribution would be meaningless.
    router_aux_loss_coef=0.01,
    tie_word_embeddings=False,
)

#: Per benchmark size, the overrides of :data:`DEFAULT_MODEL_KWARGS` its models are pre-trained with (see
#: :func:`model_kwargs_for`). Sizes not listed use the defaults unchanged, so their configs and cache keys are
#: what they were before this table existed.
#:
#: "concentrated" (``PretrainSettings.preset`` lists what was measured):
#:   - 32 experts, top-2 (uniform share 2/32): finer experts leave each domain room for experts of its own, as in
#:     the fine-grained MoEs (DeepSeekMoE, Qwen3) where SEUF/TRACE see concentration. 32 experts took no more
#:     time than 16 here (the expert loop only visits experts that got tokens).
#:   - layer 0 dense (``mlp_only_layers=[0]``; its MLP has ``intermediate_size``), so 3 MoE layers, as DeepSeek-V2/V3
#:     and Kimi-K2 keep their first layer(s) dense. With all 4 layers MoE, layer 0 routed by kind of token, not
#:     domain (with 16 experts one expert took 0.093 of the 0.096 of forget tokens that are entity names and
#:     0.073 of the 0.100 of retain ones); in 11 runs with domain_vocabulary and mixed batches its ratio was
#:     1.2-2.4 (>= 2 once).
PRESET_MODEL_KWARGS: dict[str, dict[str, Any]] = {
    "concentrated": dict(num_experts=32, num_experts_per_tok=2, mlp_only_layers=[0]),
}


def model_kwargs_for(size: str) -> dict[str, Any]:
    """The ``model_config`` overrides for a benchmark size: pass them to :func:`pretrain_models`.

    ``{}`` (the defaults, :data:`DEFAULT_MODEL_KWARGS`) for every size but those in :data:`PRESET_MODEL_KWARGS`;
    a fresh dict each call, so the caller may change it.
    """
    PretrainSettings.preset(size)  # an unknown size raises here, with the sizes to choose from
    return copy.deepcopy(PRESET_MODEL_KWARGS.get(size, {}))


@dataclass(frozen=True)
class PretrainSettings:
    """Training hyper-parameters shared by the target and the retrain model.

    Both models train for the same number of *epochs* over their own data, so each retain example is seen
    equally often by both and only the forget set differs.

    Attributes:
        epochs: passes over the training texts.
        max_steps: if positive, stop after this many optimiser steps instead (tests use a handful).
        learning_rate, weight_decay, warmup_ratio, lr_scheduler_type: AdamW and its schedule.
        batch_size: sequences per step.
        max_length: tokens per sequence (passages are ~60 tokens; longer ones are truncated).
        seed: seeds the model initialisation and the data order.
        length_bucket: batches group texts of similar length (less padding), lengths counted in buckets of
            this many tokens: 1 (the default) groups by exact length; a bucket wider than the spread of passage
            lengths but narrower than the gap between QA texts and passages groups only by kind of text, and
            leaves the domains mixed in every batch. That matters for expert specialisation: exact-length
            batches are skewed towards one domain (domains differ in passage length), and the load-balancing
            loss is computed per batch, so it then pushes each domain to spread over all experts — the
            micro-batch vs global-batch balancing effect of Qiu et al. 2025 ("Demons in the Detail"), the
            reason Qwen3 balances over the global batch. Measured on the "full" benchmark, batches of 32 (5
            sampler seeds): the batch's majority domain holds 0.49 of its texts with exact lengths, 0.34 with
            48-token buckets, 0.34 with random batches; padded tokens per epoch 50.2k, 55.1k and 85.9k.
    """

    epochs: float = 25.0
    max_steps: int = -1
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    lr_scheduler_type: str = "cosine"
    batch_size: int = 16
    max_length: int = 128
    seed: int = 0
    length_bucket: int = 1

    def to_dict(self) -> dict[str, Any]:
        """The fields, for the cache key; fields added after the first presets are left out at their default
        (:data:`_SETTINGS_OMITTED_AT_DEFAULT`), so that the settings not using them keep their old keys."""
        out = asdict(self)
        for name, default in _SETTINGS_OMITTED_AT_DEFAULT.items():
            if out[name] == default:
                del out[name]
        return out

    @classmethod
    def preset(cls, size: str, **overrides: Any) -> PretrainSettings:
        """Settings for a benchmark size (``"micro"``, ``"small"``, ``"full"``, ``"concentrated"``), with any field
        overridden."""
        presets: dict[str, dict[str, Any]] = {
            "micro": dict(max_steps=4, batch_size=8),
            # Measured (see docs): the target answers >= 0.95 of its forget MCQs, the retrain model ~chance.
            "small": dict(),  # the defaults
            "full": dict(epochs=30.0, batch_size=32),
            # The "full" recipe with length_bucket=48 (QA texts, <= 25 tokens, in the first bucket, passages,
            # 53-72, in the second: batches by kind of text, domains mixed), for the model of
            # model_kwargs_for("concentrated") on BenchmarkSpec.preset("concentrated"). Measured on the target
            # model only (seed 0, "domain" setting, full-sized data; layers at ratio = MoE layers where the forget
            # set's most-used expert e* has f_F(e*) >= 2 f_R(e*); one torch thread on a busy 2-core machine):
            #   "full" itself (8 experts, default wording): 1/4;  domain_vocabulary, 8 experts: 1/4;
            #   16 experts, default wording: 0/4 (random batches, "small"-sized data: 0/4 too);
            #   domain_vocabulary + 16 experts: exact lengths 0/4, random batches 2/4 (296 s instead of 190 s),
            #   32-token buckets 2/4, 48-token buckets 1/4 (40 epochs: 1/4);
            #   + 32 / 64 experts, 48-token buckets: 2/4 / 2/4 (64 experts, init seed 1: 1/4);
            #   router_aux_loss_coef 0.001 (random batches) or 0.05 (32 experts): 1/4, 2/4 (default 0.01);
            #   32 experts, 48-token buckets, layer 0 dense (5 layers, 4 MoE): 3/4 but 237 s for the target alone;
            #   this preset (4 layers, layer 0 dense, 3 MoE): 3/3, forget MCQ 0.975; init seed 1: 2/3, 1.0.
            #   this preset without domain_vocabulary (default wording): 1/3 (ratios 2.12, 1.10, 1.05).
            # Layers 2-3 reach 2x in most runs with domain_vocabulary; the first MoE layer rarely does.
            "concentrated": dict(epochs=30.0, batch_size=32, length_bucket=48),
        }
        if size not in presets:
            raise MoEUnlearnError(f"Unknown pre-training size {size!r}; choose one of {sorted(presets)}.")
        return cls(**{**presets[size], **overrides})


#: PretrainSettings fields that :meth:`PretrainSettings.to_dict` leaves out at these (default) values.
_SETTINGS_OMITTED_AT_DEFAULT: dict[str, Any] = {"length_bucket": 1}


@dataclass
class PretrainedPair:
    """The pre-trained target and retrain models, their tokenizer, and where they live on disk.

    Attributes:
        directory: ``output_dir/<key>``, holding ``target/``, ``retrain/``, ``tokenizer/`` and the info file.
        key: the cache key (hash of everything that determines the models).
        target: trained on everything, forget set included.
        retrain: trained on everything except the forget set: the reference unlearning should reach.
        tokenizer: the benchmark's word-level tokenizer.
        reused: True when the models were loaded from the cache instead of trained.
        info: what was recorded at training time (settings, config, final losses, seconds per model).
    """

    directory: Path
    key: str
    target: PreTrainedModel
    retrain: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    reused: bool
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def target_path(self) -> Path:
        return self.directory / "target"

    @property
    def retrain_path(self) -> Path:
        return self.directory / "retrain"

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / "tokenizer"


# ----------------------------------------------------------------------------------------------------------
# Configuration and cache key
# ----------------------------------------------------------------------------------------------------------


def default_model_config(tokenizer: PreTrainedTokenizerFast, **overrides: Any) -> Qwen3MoeConfig:
    """The default Qwen3-MoE config for ``tokenizer``'s vocabulary, with any field overridden."""
    kwargs = {**DEFAULT_MODEL_KWARGS, **overrides}
    return Qwen3MoeConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs)


def _resolve_config(model_config: transformers.PretrainedConfig | dict[str, Any] | None,
                    tokenizer: PreTrainedTokenizerFast) -> transformers.PretrainedConfig:
    """A config object from None (defaults), a dict (overrides of the defaults) or a ready config."""
    if model_config is None:
        return default_model_config(tokenizer)
    if isinstance(model_config, dict):
        return default_model_config(tokenizer, **model_config)
    if model_config.vocab_size < len(tokenizer):
        raise MoEUnlearnError(
            f"model_config.vocab_size={model_config.vocab_size} is smaller than the benchmark tokenizer "
            f"({len(tokenizer)} tokens); set it to len(tokenizer) or pass a dict of overrides instead.")
    return model_config


# TrainingArguments fields that do not change the trained weights (paths, logging, device choice).
_ARGS_NOT_IN_KEY = frozenset({"output_dir", "logging_dir", "use_cpu", "hub_token", "report_to", "disable_tqdm",
                              "logging_steps", "logging_strategy", "logging_first_step"})


def cache_key(spec: BenchmarkSpec, config: transformers.PretrainedConfig, settings: PretrainSettings) -> str:
    """A short hash of everything that determines the pre-trained models.

    The full ``TrainingArguments`` built from ``settings`` are hashed, not only ``settings``, so that a change
    of the training recipe in this module invalidates old caches by itself. Library versions are part of it
    too: a new transformers or torch may initialise or train differently.
    """
    args = _training_arguments(settings, Path("unused"), device=None).to_dict()
    payload = {
        "cache_version": CACHE_VERSION,
        "spec": spec.to_dict(),
        "model_config": json.loads(config.to_json_string(use_diff=False)),
        "settings": settings.to_dict(),
        "training_arguments": {k: v for k, v in args.items() if k not in _ARGS_NOT_IN_KEY},
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]},
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def training_texts(benchmark: SyntheticBenchmark, *, include_forget: bool) -> list[str]:
    """Passages and QA texts a model trains on: everything for the target, no forget data for the retrain."""
    splits = ("forget", "retain") if include_forget else ("retain",)
    texts: list[str] = []
    for split in splits:
        texts += getattr(benchmark, f"{split}_text")["text"]
        texts += [format_qa(q, a) for q, a in zip(getattr(benchmark, f"{split}_qa")["question"],
                                                   getattr(benchmark, f"{split}_qa")["answer"])]
    return texts


def _tokenize(texts: list[str], tokenizer: PreTrainedTokenizerFast, max_length: int) -> Dataset:
    """``<bos> text <eos>`` token ids, truncated to ``max_length`` (the collator pads and builds labels)."""
    eos = tokenizer.eos_token_id
    ids = [row[: max_length - 1] + [eos] for row in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    return Dataset.from_dict({"input_ids": ids})


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def _training_arguments(settings: PretrainSettings, output_dir: Path, device: str | None) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_ratio,
        lr_scheduler_type=settings.lr_scheduler_type,
        seed=settings.seed,
        data_seed=settings.seed,
        use_cpu=device == "cpu",
        save_strategy="no",
        logging_steps=0.1,
        report_to="none",
        disable_tqdm=True,
        # Passages (~60 tokens) and QA texts (~20) differ in length: batching similar lengths avoids
        # spending most of a QA batch on padding (PretrainSettings.length_bucket: how similar).
        train_sampling_strategy="group_by_length",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )


class _BucketedLengthTrainer(Trainer):
    """A ``Trainer`` whose ``group_by_length`` sampler compares lengths rounded up to ``length_bucket`` tokens.

    With ``length_bucket=1`` it is the plain ``Trainer`` (exact lengths). Ties keep the sampler's random order,
    so texts of one bucket are batched at random.
    """

    def __init__(self, *args: Any, length_bucket: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.length_bucket = length_bucket

    def _get_train_sampler(self, train_dataset: Dataset | None = None):
        if self.length_bucket <= 1:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = [-(-len(ids) // self.length_bucket) for ids in dataset["input_ids"]]
        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    lengths=lengths)


def _train_one(texts: list[str], tokenizer: PreTrainedTokenizerFast, config: transformers.PretrainedConfig,
               settings: PretrainSettings, save_dir: Path, device: str | None) -> dict[str, Any]:
    """Train one model from scratch with ``Trainer`` and save it; return its training record."""
    set_seed(settings.seed)  # the initial weights: same seed, same start for target and retrain
    train_config = copy.deepcopy(config)
    train_config.output_router_logits = True
    model = AutoModelForCausalLM.from_config(train_config)
    trainer = _BucketedLengthTrainer(
        length_bucket=settings.length_bucket,
        model=model,
        args=_training_arguments(settings, save_dir.parent / f"{save_dir.name}-trainer", device),
        train_dataset=_tokenize(texts, tokenizer, settings.max_length),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    # Saved without the router loss: unlearning code must not get the aux loss folded into outputs.loss.
    model.config.output_router_logits = False
    model.save_pretrained(str(save_dir))
    shutil.rmtree(trainer.args.output_dir, ignore_errors=True)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": round(seconds, 2), "steps": result.global_step, "examples": len(texts),
            "train_loss": round(result.training_loss, 4), "last_logged_loss": losses[-1] if losses else None}


def pretrain_models(
    benchmark: SyntheticBenchmark,
    output_dir: str | Path,
    *,
    model_config: transformers.PretrainedConfig | dict[str, Any] | None = None,
    settings: PretrainSettings | None = None,
    seed: int | None = None,
    device: str | None = None,
    force: bool = False,
) -> PretrainedPair:
    """Pre-train (or load from the cache) the target and retrain models of ``benchmark``.

    Args:
        benchmark: from :func:`~hf_moe_unlearn.bench.synthetic.make_benchmark`.
        output_dir: cache root; the models go to ``output_dir/<key>/``.
        model_config: None for the default Qwen3-MoE (:data:`DEFAULT_MODEL_KWARGS`), a dict overriding some of
            its fields, or a complete ``PretrainedConfig`` of any causal-LM MoE family.
        settings: training hyper-parameters; default :class:`PretrainSettings`.
        seed: overrides ``settings.seed``.
        device: ``"cpu"`` forces the CPU; None lets the Trainer pick (a GPU when there is one). The loaded
            models are moved there.
        force: retrain even when a cached result exists (and replace it).

    The thread count of torch is left as the caller set it.
    """
    settings = settings or PretrainSettings()
    if seed is not None:
        settings = replace(settings, seed=seed)
    tokenizer = build_benchmark_tokenizer(benchmark)
    config = _resolve_config(model_config, tokenizer)
    key = cache_key(benchmark.spec, config, settings)
    final = Path(output_dir) / key
    reused = (final / _INFO_FILE).is_file() and not force
    if not reused:
        _train_pair(benchmark, tokenizer, config, settings, final, device)
    return load_pretrained_pair(final, device=device, reused=reused)


def _train_pair(benchmark: SyntheticBenchmark, tokenizer: PreTrainedTokenizerFast,
                config: transformers.PretrainedConfig, settings: PretrainSettings, final: Path,
                device: str | None) -> None:
    """Train both models into a scratch directory, then move it into place.

    The move is the last step, so an interrupted run never leaves a directory that looks like a valid cache.
    """
    scratch = final.parent / f"{final.name}.partial-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    save_tokenizer(tokenizer, scratch / "tokenizer")
    records = {}
    for name in _MODEL_NAMES:
        texts = training_texts(benchmark, include_forget=(name == "target"))
        records[name] = _train_one(texts, tokenizer, config, settings, scratch / name, device)
    info = {"key": final.name, "spec": benchmark.spec.to_dict(), "settings": asdict(settings),
            "model_config": json.loads(config.to_json_string(use_diff=True)),
            "models": records, "transformers": transformers.__version__, "torch": torch.__version__,
            "datasets": datasets.__version__}
    (scratch / _INFO_FILE).write_text(json.dumps(info, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    try:
        os.replace(scratch, final)
    except OSError:
        # Another process finished the same key first (same inputs, so the same models): keep theirs.
        if not (final / _INFO_FILE).is_file():
            raise
        shutil.rmtree(scratch, ignore_errors=True)


def load_pretrained_pair(directory: str | Path, *, device: str | None = None, reused: bool = True) -> PretrainedPair:
    """Load a pair written by :func:`pretrain_models` from ``directory`` (``output_dir/<key>``)."""
    directory = Path(directory)
    if not (directory / _INFO_FILE).is_file():
        raise MoEUnlearnError(f"{directory} holds no pre-trained pair (no {_INFO_FILE}); run pretrain_models first.")
    info = json.loads((directory / _INFO_FILE).read_text())
    models = {}
    for name in _MODEL_NAMES:
        model = AutoModelForCausalLM.from_pretrained(str(directory / name), local_files_only=True)
        models[name] = model.to(device or _default_device()).eval()
    return PretrainedPair(directory=directory, key=directory.name, target=models["target"],
                          retrain=models["retrain"], tokenizer=load_tokenizer(directory / "tokenizer"),
                          reused=reused, info=info)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------------------
# Quality check: is the benchmark informative?
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _choice_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, mcq: Dataset) -> float:
    """Share of questions whose true choice has the highest summed log-probability after the question prompt.

    Minimal on purpose (the evaluation package has the full metric); here it only checks the pre-training.
    """
    device = next(model.parameters()).device
    correct = 0
    for row in mcq:
        prompt_len = len(tokenizer(format_qa_prompt(row["question"]))["input_ids"])
        enc = tokenizer([f"{format_qa_prompt(row['question'])} {c}" for c in row["choices"]],
                        padding=True, return_tensors="pt").to(device)
        logprobs = torch.log_softmax(model(**enc).logits[:, :-1].float(), dim=-1)
        targets = enc["input_ids"][:, 1:]
        token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        mask = enc["attention_mask"][:, 1:].clone()
        mask[:, : prompt_len - 1] = 0  # score only the choice's tokens
        scores = (token_lp * mask).sum(-1)
        correct += int(scores.argmax().item() == row["answer"])
    return correct / len(mcq)


@torch.no_grad()
def _concentration(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, forget_texts: list[str],
                   retain_texts: list[str]) -> dict[str, Any]:
    """Per layer: the share of forget-token picks taken by the forget set's top-k experts, and the same experts'
    share of retain-token picks (routing statistics from the package's own recorder)."""
    from ..routing import attribute_experts, forget_concentration

    stats = [attribute_experts(model, texts, tokenizer, show_progress=False, name=name)
             for texts, name in ((forget_texts, "forget set"), (retain_texts, "retain set"))]
    return forget_concentration(*stats)


def measure_pretrain_quality(pair: PretrainedPair, benchmark: SyntheticBenchmark) -> dict[str, Any]:
    """MCQ accuracy of both models on forget and retain questions, and the target's forget concentration.

    An informative benchmark has the target far above chance (0.25) on forget questions and the retrain
    model near chance, both high on retain questions.
    """
    accuracy = {name: {split: round(_choice_accuracy(model, pair.tokenizer, getattr(benchmark, f"{split}_mcq")), 4)
                       for split in ("forget", "retain")}
                for name, model in (("target", pair.target), ("retrain", pair.retrain))}
    concentration = _concentration(pair.target, pair.tokenizer, list(benchmark.forget_text["text"]),
                                   list(benchmark.retain_text["text"]))
    return {"mcq_accuracy": accuracy, "chance": 0.25, "forget_concentration": concentration}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m hf_moe_unlearn.bench.pretrain --size small``: pre-train (or load) and print the quality figures."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--size", default="small", choices=["micro", "small", "full", "concentrated"])
    parser.add_argument("--forget", default="domain", choices=["domain", "entities"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="runs/bench-pretrain")
    parser.add_argument("--device", default=None)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own). On a busy machine 1 is much faster than 2: "
                             "threads of tiny ops spin-wait on each other.")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # this command is the caller here: its choice to make
    benchmark = make_benchmark(BenchmarkSpec.preset(args.size, seed=args.seed, forget=args.forget))
    start = time.perf_counter()
    pair = pretrain_models(benchmark, args.output_dir, model_config=model_kwargs_for(args.size),
                           settings=PretrainSettings.preset(args.size),
                           seed=args.seed, device=args.device, force=args.force)
    report = {"key": pair.key, "reused": pair.reused, "wall_seconds": round(time.perf_counter() - start, 1),
              "torch_threads": torch.get_num_threads(), "training": pair.info["models"],
              **measure_pretrain_quality(pair, benchmark)}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()


__all__ = ["PretrainSettings", "PretrainedPair", "DEFAULT_MODEL_KWARGS", "PRESET_MODEL_KWARGS", "model_kwargs_for",
           "default_model_config", "cache_key",
           "training_texts", "pretrain_models", "load_pretrained_pair", "measure_pretrain_quality", "CACHE_VERSION"]
