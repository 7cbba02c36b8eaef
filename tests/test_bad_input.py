"""Bad input gets one clear, early MoEUnlearnError (issue 12): never a silent wrong run, never a raw traceback.

Each case names the error and a fragment of its message; the CLI cases also check exit code 2 and one stderr
line. Config ranges fail in ``MoEUnlearnConfig``; data in tokenisation; the vocabulary in the trainer's
constructor; a changed config at ``train(resume_from_checkpoint=...)``.
"""

import json
import logging
import warnings

import pytest
import torch

from conftest import make_tiny_tokenizer
from hf_moe_unlearn.cli import main
from hf_moe_unlearn.config import MoEUnlearnConfig, default_learning_rate
from hf_moe_unlearn.data.text import tokenize_dataset
from hf_moe_unlearn.errors import MoEUnlearnError
from hf_moe_unlearn.moe import tiny_moe_model
from hf_moe_unlearn.trainer import MoEUnlearnTrainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FORGET = [" ".join(f"w{(i * 3) % 20}" for i in range(j, j + 8)) for j in range(4)]
RETAIN = [" ".join(f"w{40 + (i * 7) % 80}" for i in range(j, j + 8)) for j in range(4)]
QA = [{"prompt": "w1 w2 w3", "answer": "w4 w5"}, {"prompt": "w6 w7", "answer": "w8"}]


def _args(tmp_path, **kw):
    defaults = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, report_to="none",
                    disable_tqdm=True, use_cpu=True, logging_steps=1, save_strategy="no", seed=0)
    defaults.update(kw)
    return MoEUnlearnConfig(**defaults)


def _trainer(tmp_path, model=None, tokenizer=None, selection=None, forget=FORGET, retain=RETAIN, **kw):
    return MoEUnlearnTrainer(model if model is not None else tiny_moe_model("qwen3_moe"), _args(tmp_path, **kw),
                             forget_dataset=forget, retain_dataset=retain,
                             processing_class=tokenizer if tokenizer is not None else make_tiny_tokenizer(),
                             selection=selection if selection is not None else {1: [0]})


# ------------------------------------------------------------------------------- config ranges (item 6, item 2)
@pytest.mark.parametrize("kw,message", [
    (dict(max_length=0), r"max_length=0 cannot leave a label"),
    (dict(max_length=-5), r"max_length=-5 cannot leave a label"),
    (dict(max_length=1), r"max_length=1 cannot leave a label .* at least 2"),
    (dict(per_device_train_batch_size=0), r"per_device_train_batch_size=0 must be at least 1"),
    (dict(per_device_train_batch_size=-2), r"per_device_train_batch_size=-2 must be at least 1"),
    (dict(per_device_eval_batch_size=0), r"per_device_eval_batch_size=0 must be at least 1"),
    (dict(gradient_accumulation_steps=0), r"gradient_accumulation_steps=0 must be at least 1"),
    (dict(attribution_batch_size=0), r"attribution_batch_size=0 must be at least 1"),
    (dict(seuf_top_m=0), r"seuf_top_m=0 must be at least 1"),
    (dict(trace_top_m=0), r"trace_top_m=0 must be at least 1"),
    (dict(trace_max_layers=0), r"trace_max_layers=0 must be at least 1, or None"),
    (dict(attribution_max_tokens=0), r"attribution_max_tokens=0 must be at least 1, or None"),
    (dict(lora_r=0), r"lora_r=0 must be at least 1"),
    (dict(lora_alpha=0.0), r"lora_alpha=0.0 must be > 0"),
    (dict(npo_beta=0.0), r"npo_beta=0.0 must be > 0"),
    (dict(simnpo_beta=-1.0), r"simnpo_beta=-1.0 must be > 0"),
    (dict(idk_dpo_beta=0.0), r"idk_dpo_beta=0.0 must be > 0"),
    (dict(trace_w_max=0.0), r"trace_w_max=0.0 must be > 0"),
    (dict(forget_loss_bound=0.0), r"forget_loss_bound=0.0 must be > 0, or None"),
    (dict(max_steps=0), r"max_steps=0 would train no step"),
    (dict(max_steps=-1, num_train_epochs=0), r"num_train_epochs=0 with max_steps=-1 would train no step"),
    (dict(logging_steps=-1), r"logging_steps=-1 must be > 0"),
    (dict(eval_steps=0), r"eval_steps=0 must be > 0"),
    (dict(save_strategy="steps", save_steps=0), r"save_steps=0 must be > 0"),
    (dict(dataloader_num_workers=-1), r"dataloader_num_workers=-1 must be >= 0"),
    # TrainingArguments' own checks come out as MoEUnlearnError too (one line in the CLI, not a traceback)
    (dict(logging_steps=0), r"requires non-zero --logging_steps"),
    (dict(warmup_steps=-1), r"warmup_steps >= 0"),
])
def test_config_refuses_out_of_range(tmp_path, kw, message):
    with pytest.raises(MoEUnlearnError, match=message):
        _args(tmp_path, **kw)


def test_lora_settings_are_not_checked_for_full_experts(tmp_path):
    assert _args(tmp_path, adapter="full", lora_r=0).lora_r == 0


# ------------------------------------------------------------------------------------ data (items 1 and 2)
@pytest.mark.parametrize("kw,message", [
    # empty answers: the run would do gradient ascent on the EOS token alone
    (dict(forget=QA + [{"prompt": "w1", "answer": ""}, {"prompt": "w2", "answer": "  "}]),
     r"2 of the 4 examples of the forget set have an empty answer \(the first: example 2\)"),
    (dict(forget=[{"prompt": "w1", "answer": None}] + QA),
     r"1 of the 3 examples of the forget set has an empty answer \(the first: example 0\)"),
    (dict(retain=[{"question": "w1", "completion": "w5"}, {"question": "w2", "completion": ""}]),
     r"1 of the 2 examples of the retain set has an empty answer \(the first: example 1\)"),
    # max_length too small to leave a label after the shift: every answer cut off
    (dict(forget=QA, max_length=2), r"The forget set has no counted token: no example keeps a label after the causal "
                                    r"shift.*max_length=2"),
    # only single-token examples: a label at position 0 is never a target
    (dict(forget=[{"input_ids": [5]}, {"input_ids": [6]}]), r"The forget set has no counted token"),
    (dict(retain=[{"input_ids": [5], "labels": [5]}]), r"The retain set has no counted token"),
])
def test_trainer_refuses_bad_data(tmp_path, kw, message):
    with pytest.raises(MoEUnlearnError, match=message):
        _trainer(tmp_path, **kw)


def test_examples_without_counted_token_are_dropped_with_a_warning(tiny_tokenizer, caplog):
    data = [{"input_ids": [5, 6, 7]}, {"input_ids": [8]}, {"input_ids": [9]}]
    with caplog.at_level(logging.WARNING, logger="hf_moe_unlearn.data.text"):
        kept = tokenize_dataset(data, tiny_tokenizer, max_length=8, name="forget set")
    assert kept["input_ids"] == [[5, 6, 7]]
    assert "2 of the 3 examples of the forget set have no counted token (the first: example 1" in caplog.text


@pytest.mark.parametrize("max_length", [-1, 0, 1, 2.5])
def test_tokenize_dataset_refuses_bad_max_length(tiny_tokenizer, max_length):
    with pytest.raises(MoEUnlearnError, match=r"max_length=.* cannot leave a label"):
        tokenize_dataset(FORGET, tiny_tokenizer, max_length=max_length)


# -------------------------------------------------------------------------------------- vocabulary (item 3)
def _big_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                   unk_token="<unk>")


@pytest.mark.parametrize("kw,message", [
    (dict(tokenizer=_big_tokenizer(300)), r"The tokenizer does not fit the model: its vocabulary has 304 tokens "
                                          r"\(ids up to 303\), but the model's input embeddings have 128 rows"),
    (dict(model_kw=dict(vocab_size=64)), r"its vocabulary has 128 tokens .* input embeddings have 64 rows"),
    (dict(forget=[{"input_ids": [5, 6, 200]}, {"input_ids": [5, 6]}]),
     r"The forget set holds token id 200, but the model's input embeddings have 128 rows"),
    (dict(retain=[{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [1, 128]}]),
     r"The retain set holds token id 128, but the model's input embeddings have 128 rows"),
])
def test_trainer_refuses_tokens_the_model_cannot_embed(tmp_path, kw, message):
    model = tiny_moe_model("qwen3_moe", **kw.pop("model_kw", {}))
    with pytest.raises(MoEUnlearnError, match=message):
        _trainer(tmp_path, model=model, **kw)


def test_holdout_tokens_are_checked(tmp_path):
    model = tiny_moe_model("qwen3_moe")
    with pytest.raises(MoEUnlearnError, match=r"The holdout set holds token id 500"):
        MoEUnlearnTrainer(model, _args(tmp_path), forget_dataset=FORGET, retain_dataset=RETAIN,
                          processing_class=make_tiny_tokenizer(), selection={1: [0]},
                          holdout_dataset=[{"input_ids": [5, 500, 6]}])


# ------------------------------------------------------------------------------------------- resume (item 4)
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    trainer = _trainer(root, save_strategy="steps", save_steps=1)
    trainer.train()
    return root / "out" / "checkpoint-1"


@pytest.mark.parametrize("kw,differ", [
    (dict(forget_loss="npo"), ["forget_loss ('ga' in the checkpoint, 'npo' now)"]),
    (dict(retain_loss="kl", lora_r=4), ["retain_loss ('nll' in the checkpoint, 'kl' now)",
                                         "lora_r (8 in the checkpoint, 4 now)"]),
    (dict(adapter="full"), ["adapter ('lora' in the checkpoint, 'full' now)",  # and so the default learning rate
                            f"learning_rate ({default_learning_rate('lora', False)!r} in the checkpoint, "
                            f"{default_learning_rate('full', False)!r} now)"]),
    (dict(selection={1: [1]}), ["selection ({1: [0]} in the checkpoint, {1: [1]} now)"]),
    (dict(anchor_loss_weight=0.0, learning_rate=1e-3),
     ["anchor_loss_weight (1.0 in the checkpoint, 0.0 now)",
      f"learning_rate ({default_learning_rate('lora', False)!r} in the checkpoint, 0.001 now)"]),
    (dict(max_length=64), ["max_length (512 in the checkpoint, 64 now)"]),
])
def test_resume_with_changed_config_lists_the_differences(tmp_path, checkpoint, kw, differ):
    trainer = _trainer(tmp_path, max_steps=2, **kw)
    with pytest.raises(MoEUnlearnError, match=r"Cannot resume from .*checkpoint-1: it was trained with other "
                                              r"settings") as err:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    for part in differ:
        assert part in str(err.value)
    assert str(err.value).count(" in the checkpoint, ") == len(differ), str(err.value)
    assert trainer.state.global_step == 0  # refused before any step


def test_resume_with_same_config_and_other_stop_settings(tmp_path, checkpoint):
    trainer = _trainer(tmp_path, max_steps=2, forget_loss_bound=None, logging_steps=2,
                       selection=str(checkpoint / "selection.json"))
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 2


@pytest.mark.parametrize("value,message", [
    (True, r"resume_from_checkpoint=True but .* holds no checkpoint-N folder"),
    ("nowhere/checkpoint-7", r"resume_from_checkpoint=nowhere/checkpoint-7: no such checkpoint folder"),
])
def test_resume_without_a_checkpoint(tmp_path, value, message):
    with pytest.raises(MoEUnlearnError, match=message):
        _trainer(tmp_path).train(resume_from_checkpoint=value)


# ---------------------------------------------------------------------------------- true messages (item 5)
def test_loss_bound_stop_without_checkpoint_does_not_mention_one(tmp_path):
    trainer = _trainer(tmp_path, forget_loss_bound=1e-9, retain_loss="none", retain=None)
    with pytest.raises(MoEUnlearnError, match=r"training stopped; no checkpoint was saved in .*out\.") as err:
        trainer.train()
    assert "last saved checkpoint" not in str(err.value)


def test_loss_bound_stop_names_the_last_checkpoint(tmp_path):
    for step in (2, 10):  # the latest by number, not by name
        (tmp_path / "out" / f"checkpoint-{step}").mkdir(parents=True)
    trainer = _trainer(tmp_path, forget_loss_bound=1e-9, retain_loss="none", retain=None)
    with pytest.raises(MoEUnlearnError, match=r"training stopped; the last saved checkpoint, .*checkpoint-10, is "
                                              r"intact"):
        trainer.train()


@pytest.mark.skipif(torch.accelerator.is_available(), reason="a machine without an accelerator")
def test_cpu_run_does_not_pin_memory(tmp_path):
    trainer = _trainer(tmp_path, use_cpu=False)  # TrainingArguments turns pinning off for use_cpu=True only
    assert trainer.args.dataloader_pin_memory is False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        next(iter(trainer.get_train_dataloader()))
    assert not [w for w in caught if "pin_memory" in str(w.message)]


# --------------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name, overrides in (("moe", {}), ("small_vocab", {"vocab_size": 64})):
        tiny_moe_model("qwen3_moe", **overrides).save_pretrained(root / name)
        make_tiny_tokenizer().save_pretrained(root / name)
    return root


def _unlearn(saved_models, tmp_path, *flags, model="moe", forget=None):
    if forget is None:
        forget = tmp_path / "forget.txt"
        forget.write_text("\n".join(FORGET) + "\n")
    retain = tmp_path / "retain.txt"
    retain.write_text("\n".join(RETAIN) + "\n")
    return main(["unlearn", "--model", str(saved_models / model), "--forget", str(forget), "--retain", str(retain),
                 "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--use_cpu", "true",
                 "--disable_tqdm", "true", "--max_steps", "1", "--per_device_train_batch_size", "2", *flags])


def _one_error_line(capsys):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("hf-moe-unlearn unlearn: error: ")
    return err[0]


@pytest.fixture
def no_progress_bars():
    import datasets

    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


@pytest.mark.parametrize("flags,message", [
    (("--per_device_train_batch_size", "0"), "per_device_train_batch_size=0 must be at least 1"),
    (("--gradient_accumulation_steps", "-1"), "gradient_accumulation_steps=-1 must be at least 1"),
    (("--max_steps", "0"), "max_steps=0 would train no step"),
    (("--max_length", "-3"), "max_length=-3 cannot leave a label"),
    (("--max_length", "1"), "max_length=1 cannot leave a label"),
    (("--logging_steps", "0"), "requires non-zero --logging_steps"),
    (("--lora_r", "0"), "lora_r=0 must be at least 1"),
])
def test_cli_refuses_flags_out_of_range(tmp_path, saved_models, capsys, flags, message):
    assert _unlearn(saved_models, tmp_path, *flags) == 2
    assert message in _one_error_line(capsys)


def test_cli_refuses_empty_answers(tmp_path, saved_models, capsys, no_progress_bars):
    forget = tmp_path / "forget.jsonl"
    forget.write_text("\n".join(json.dumps(row) for row in QA + [{"prompt": "w3", "answer": ""}]) + "\n")
    assert _unlearn(saved_models, tmp_path, forget=forget) == 2
    assert "1 of the 3 examples of the forget set has an empty answer (the first: example 2)" in _one_error_line(capsys)


def test_cli_refuses_a_tokenizer_that_does_not_fit(tmp_path, saved_models, capsys, no_progress_bars):
    assert _unlearn(saved_models, tmp_path, model="small_vocab") == 2
    assert ("its vocabulary has 128 tokens (ids up to 127), but the model's input embeddings have 64 rows"
            in _one_error_line(capsys))


def test_cli_refuses_resume_with_another_loss(tmp_path, saved_models, capsys, no_progress_bars):
    assert _unlearn(saved_models, tmp_path, "--save_strategy", "steps", "--save_steps", "1") == 0
    capsys.readouterr()
    code = _unlearn(saved_models, tmp_path, "--forget_loss", "npo", "--max_steps", "2",
                    "--resume_from_checkpoint", str(tmp_path / "out" / "checkpoint-1"))
    assert code == 2
    line = _one_error_line(capsys)
    assert "Cannot resume from" in line and "forget_loss ('ga' in the checkpoint, 'npo' now)" in line
