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
    (dict(learning_rate=-1e-3), r"learning_rate=-0.001 must be > 0"),  # 0: tests/test_default_learning_rate.py
    (dict(learning_rate=float("nan")), r"learning_rate=nan must be > 0"),
    (dict(forget_loss_weight=-1.0), r"Loss weights must be non-negative"),
    (dict(retain_loss_weight=-0.5), r"Loss weights must be non-negative"),
    (dict(anchor_loss_weight=-1.0), r"Loss weights must be non-negative"),
    (dict(forget_probe_size=0), r"forget_probe_size and retain_probe_size must be at least 1"),
    (dict(retain_probe_size=0), r"forget_probe_size and retain_probe_size must be at least 1"),
    (dict(max_retain_nll_rise=0.0), r"max_retain_nll_rise=0.0 must be > 0"),
    (dict(adapter="qlora"), r"adapter='qlora' is not one of lora, full"),
    (dict(selection_method="random"), r"selection_method='random' is not one of seuf, trace"),
    (dict(retain_weighting="trace", retain_loss="none"), r"retain_weighting='trace' reweights the retain loss"),
    (dict(trace_tau=-1.0), r"trace_tau=-1.0 must be >= 0"),
    (dict(trace_rho=-0.5), r"trace_rho=-0.5 must be >= 0"),
    (dict(weight_decay=-0.1), r"weight_decay=-0.1 must be >= 0"),
    (dict(max_grad_norm=-1.0), r"max_grad_norm=-1.0 must be >= 0"),
    (dict(rmu_steering_coeff=0.0), r"rmu_steering_coeff=0.0 must be > 0"),
    (dict(rmu_layer=-1), r"rmu_layer=-1 must be a decoder layer index >= 0"),
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
    (True, r"resume_from_checkpoint \(latest\) but .* holds no complete checkpoint-N folder"),
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


def test_saving_a_stopped_run_warns(tmp_path, caplog):
    trainer = _trainer(tmp_path, forget_loss_bound=1e-9, retain_loss="none", retain=None)
    with pytest.raises(MoEUnlearnError):
        trainer.train()
    with caplog.at_level(logging.WARNING, logger="hf_moe_unlearn.trainer"):
        trainer.save_model(str(tmp_path / "saved"))
    assert [r for r in caplog.records if "run that was stopped (The forget loss is" in r.getMessage()]
    assert (tmp_path / "saved" / "adapter_model.safetensors").is_file()


def test_loss_bound_stop_names_the_last_checkpoint(tmp_path, monkeypatch):
    from hf_moe_unlearn import saving

    for step in (2, 10):  # the latest complete one by number, not by name
        (tmp_path / "out" / f"checkpoint-{step}").mkdir(parents=True)
        saving.write_marker(str(tmp_path / "out" / f"checkpoint-{step}"))
    (tmp_path / "out" / "checkpoint-11").mkdir()  # incomplete (no marker): not "the last saved checkpoint"
    monkeypatch.setattr(saving, "check_output_dir", lambda *a: None)  # as if these were this run's
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


@pytest.mark.parametrize("flags,message", [  # in flags, not Python arguments (issue 12, item 5)
    (("--per_device_train_batch_size", "0"), "--per_device_train_batch_size 0 must be at least 1"),
    (("--gradient_accumulation_steps", "-1"), "--gradient_accumulation_steps -1 must be at least 1"),
    (("--max_steps", "0"), "--max_steps 0 would train no step"),
    (("--max_length", "-3"), "--max_length -3 cannot leave a label"),
    (("--max_length", "1"), "--max_length 1 cannot leave a label"),
    (("--logging_steps", "0"), "requires non-zero --logging_steps"),
    (("--lora_r", "0"), "--lora_r 0 must be at least 1"),
    (("--learning_rate", "0"), "--learning_rate 0.0 must be > 0"),
    (("--num_train_epochs", "0", "--max_steps", "-1"), "--num_train_epochs 0.0 with --max_steps -1 would train no step"),
    (("--max_grad_norm", "-1"), "--max_grad_norm -1.0 must be >= 0"),
])
def test_cli_refuses_flags_out_of_range(tmp_path, saved_models, capsys, flags, message):
    assert _unlearn(saved_models, tmp_path, *flags) == 2
    assert message in _one_error_line(capsys)


def test_cli_refuses_empty_answers(tmp_path, saved_models, capsys, no_progress_bars):
    forget = tmp_path / "forget.jsonl"
    forget.write_text("\n".join(json.dumps(row) for row in QA + [{"prompt": "w3", "answer": ""}]) + "\n")
    assert _unlearn(saved_models, tmp_path, forget=forget) == 2
    assert (f"1 of the 3 examples of the forget set ({forget}) has an empty answer (the first: example 2)"
            in _one_error_line(capsys))


def test_cli_refuses_a_tokenizer_that_does_not_fit(tmp_path, saved_models, capsys, no_progress_bars, monkeypatch):
    import transformers

    def no_weights(*args, **kwargs):  # refused from the config's vocab_size, before the weights load
        raise AssertionError("the weights were loaded before the vocabulary was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
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
    assert "Cannot resume from" in line and "--forget_loss ('ga' in the checkpoint, 'npo' now)" in line


# ------------------------------------------------- data and selection files, model paths, early checks (item 2-3)
# Every case below is refused before the model loads: the CLI runs with the model loader replaced by one that
# fails the test, so a case that reached it would not exit 2 with its own message.
@pytest.fixture
def model_never_loads(monkeypatch):
    import hf_moe_unlearn.cli as cli

    def refuse(name):
        raise AssertionError(f"the model was loaded ({name}) before the bad input was refused")

    monkeypatch.setattr(cli, "_load_model_and_tokenizer", refuse)


def _cli_error(capsys, code, command="unlearn"):
    """The exit code is 2 and stderr is one error line, without a traceback; returns that line."""
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"hf-moe-unlearn {command}: error: ")
    return lines[0]


TEXT_LINES = "\n".join(json.dumps({"text": t}) for t in FORGET[:2])
# (file name, content, fragments of the message after the file's path)
BAD_DATA_FILES = [
    ("invalid.json", '[{"text": "w1 w2"}, {"text": ', ["is not valid JSON: line 1, column 30"]),
    ("invalid.jsonl", TEXT_LINES + '\n\n{"text": "w3"\n', ["is not valid JSON Lines: line 4, column 14"]),
    ("number.jsonl", TEXT_LINES + '\n{"text": 5}\n', ["line 3 has a number (5) in 'text'", "a string in 'text'"]),
    ("numbers.json", '[{"text": 5}, {"text": 6}]', ["row 0 has a number (5) in 'text'"]),
    ("null.jsonl", TEXT_LINES + '\n{"text": null}\n', ["line 3 has no 'text' value (missing or null)"]),
    ("blank.jsonl", TEXT_LINES + '\n{"text": "  "}\n', ["line 3 has an empty 'text'"]),
    ("missing.jsonl", TEXT_LINES + '\n{"title": "w1"}\n', ["line 3 has no 'text' value (missing or null)"]),
    ("list_row.jsonl", '["w1", "w2"]\n', ["line 1 is a list, not an object"]),
    ("scalar.json", "5", ["holds a JSON int; expected a list of objects"]),
    ("columns.jsonl", '{"body": "w1", "title": "w2"}\n', ["has columns ['body', 'title']", "a 'text' column, or a "
                                                                "prompt column (prompt/question) and an answer column"]),
    ("null_prompt.jsonl", '{"prompt": null, "answer": "w1"}\n', ["line 1 has no 'prompt' value"]),
    ("number_answer.jsonl", '{"prompt": "w1", "answer": 7}\n', ["line 1 has a number (7) in 'answer'"]),
    ("number_idk.jsonl", '{"prompt": "w1", "answer": "w2", "idk": 3}\n', ["line 1 has a number (3) in 'idk'"]),
    ("bad_ids.jsonl", '{"input_ids": [5, "w6"]}\n', ["line 1 has a list in 'input_ids'", "integer token ids"]),
    ("bad_labels.jsonl", '{"input_ids": [5, 6, 7], "labels": [5, 6]}\n', ["line 1 has 'labels' that are not a list of "
                                                                          "integers as long as its 'input_ids' (3)"]),
    ("latin1.txt", "w1 w2\nw3 caf\xe9\n".encode("latin-1"), ["is not UTF-8 text: byte 0xe9 on line 2"]),
    ("latin1.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1"), ["is not UTF-8 text: byte 0xe9 on line 1"]),
    ("latin1.csv", "text\ncaf\xe9\n".encode("latin-1"), ["as CSV", "Save it as UTF-8"]),
    ("broken.csv", 'text\n"w1 w2\n', ["as CSV: Error tokenizing data"]),
    ("numbers.csv", "text\n1\n2\n", ["data row 1 has a number (1) in 'text'"]),
    ("columns.csv", "a,b\nw1,w2\n", ["has columns ['a', 'b']"]),
    ("broken.parquet", "not a parquet file", ["as Parquet: Parquet magic bytes not found"]),
    ("not_a_dataset", None, ["a directory must hold a dataset written by datasets' save_to_disk"]),
]


def _write_data(tmp_path, name, content):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize("name,content,fragments", BAD_DATA_FILES, ids=[case[0] for case in BAD_DATA_FILES])
def test_load_texts_refuses_bad_data_file(tmp_path, name, content, fragments):
    from hf_moe_unlearn.data.text import load_texts

    path = _write_data(tmp_path, name, content)
    with pytest.raises(MoEUnlearnError) as err:
        load_texts(path, "forget set")
    assert f"the forget set file {path}".lower() in str(err.value).lower()
    for fragment in fragments:
        assert fragment in str(err.value)


@pytest.mark.parametrize("flag", ["--forget", "--retain"])
@pytest.mark.parametrize("name,content,fragments", BAD_DATA_FILES, ids=[case[0] for case in BAD_DATA_FILES])
def test_cli_refuses_bad_data_file_before_the_model(tmp_path, saved_models, capsys, model_never_loads, flag, name,
                                                    content, fragments):
    path = _write_data(tmp_path, name, content)
    flags = {"--forget": dict(forget=path), "--retain": dict()}[flag]
    extra = ("--retain", str(path)) if flag == "--retain" else ()
    line = _cli_error(capsys, _unlearn(saved_models, tmp_path, *extra, **flags))
    assert f"{flag.strip('-')} set file {path}" in line
    for fragment in fragments:
        assert fragment in line


def test_attribute_refuses_bad_data_file_before_the_model(tmp_path, saved_models, capsys, model_never_loads):
    path = _write_data(tmp_path, "number.jsonl", TEXT_LINES + '\n{"text": 5}\n')
    code = main(["attribute", "--model", str(saved_models / "moe"), "--forget", str(path),
                 "--output", str(tmp_path / "o")])
    assert f"forget set file {path}: line 3 has a number (5) in 'text'" in _cli_error(capsys, code, "attribute")


@pytest.mark.parametrize("rows,message", [
    ([{"text": "w1 w2"}, {"text": 5}], r"The forget set: example 1 has a number \(5\) in 'text'"),
    ([{"text": "w1 w2"}, {"text": None}], r"The forget set: example 1 has no 'text' value \(missing or null\)"),
    (["w1 w2", ""], r"The forget set: example 1 has an empty 'text': only its end-of-text token"),
    ([{"text": "w1 w2"}, {"title": "w3"}], r"The forget set: example 1 has no 'text' value"),
    ([{"prompt": ["w1"], "answer": "w2"}], r"The forget set: example 0 has a list in 'prompt'"),
    (["w1 w2", 3], r"The forget set: example 1 is a number \(3\), but example 0 is a text"),
    ([{"text": "w1"}, "w2"], r"The forget set: example 1 is a str, not an object"),
    ([{"body": "w1"}], r"The forget set has columns \['body'\]; examples need a 'text' column"),
])
def test_python_api_refuses_wrong_types(tmp_path, rows, message):
    with pytest.raises(MoEUnlearnError, match=message):
        _trainer(tmp_path, forget=rows)


def test_python_api_refuses_wrong_types_in_a_dataset(tiny_tokenizer):
    import datasets

    with pytest.raises(MoEUnlearnError, match=r"The retain set: example 0 has a number \(1\) in 'text'"):
        tokenize_dataset(datasets.Dataset.from_dict({"text": [1, 2]}), tiny_tokenizer, name="retain set")
    ids = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [5, 6]], "labels": [[5, 6, 7], [5]]})
    with pytest.raises(MoEUnlearnError, match=r"example 1 has 'labels' that are not a list of integers as long"):
        tokenize_dataset(ids, tiny_tokenizer, name="retain set")


SELECTION_FILES = [
    ("invalid", '{"experts": {"1": [0]', "is not valid JSON: line 1, column 22"),
    ("not_utf8", b'{"experts": {"1": [0]}, "method": "\xff"}', "is not UTF-8 text"),
    ("list", "[1, 0]", "a selection must be a JSON object with an 'experts' mapping"),
    ("no_experts", '{"method": "seuf"}', "a selection needs an 'experts' mapping {layer: [expert, ...]}; found keys "
                                         "['method']"),
    ("null_experts", '{"experts": null}', "'experts' must map layer indices to lists of expert ids"),
    ("experts_list", '{"experts": [1, 0]}', "'experts' must map layer indices to lists of expert ids"),
    ("layer_name", '{"experts": {"mlp": [0]}}', "a layer index in 'experts' must be an integer >= 0, not the string "
                                                "'mlp'"),
    ("expert_string", '{"experts": {"1": "0"}}', "'experts' of layer 1 must be a list of expert ids, not the string"),
    ("expert_float", '{"experts": {"1": [0.5]}}', "an expert id in layer 1 of 'experts' (a routed expert's index; "
                                                  "shared experts are always active, have no id and are never "
                                                  "selectable) must be an integer >= 0, not the number 0.5"),
    ("expert_negative", '{"experts": {"1": [-1]}}', "must be an integer >= 0, not the number -1"),
    ("scores", '{"experts": {"1": [0]}, "scores": {"1": {"0": "high"}}}', "'scores' of layer 1, expert 0 must be a "
                                                                          "number"),
    ("version", '{"experts": {"1": [0]}, "schema_version": "1"}', "'schema_version' must be an integer"),
    ("empty", '{"experts": {"1": []}}', "the expert selection names no expert"),
]


@pytest.mark.parametrize("name,content,fragment", SELECTION_FILES, ids=[case[0] for case in SELECTION_FILES])
def test_selection_file_refused_before_the_model(tmp_path, saved_models, capsys, model_never_loads, name, content,
                                                 fragment):
    from hf_moe_unlearn.routing import ExpertSelection

    path = _write_data(tmp_path, f"{name}.json", content)
    with pytest.raises(MoEUnlearnError) as err:
        ExpertSelection.load(path)
    assert str(err.value).startswith(f"The selection file {path}") and fragment in str(err.value)
    line = _cli_error(capsys, _unlearn(saved_models, tmp_path, "--selection", str(path)))
    assert f"The selection file {path}" in line and fragment in line


@pytest.mark.parametrize("experts,fragment", [
    ({"5": [0]}, "names layer 5, which is not an MoE layer of this model. MoE layers: [0, 1]"),
    ({"1": [4]}, "names expert(s) [4] in layer 1, which has routed experts 0..3"),
])
def test_selection_out_of_range_for_the_model(tmp_path, saved_models, capsys, no_progress_bars, experts, fragment):
    path = tmp_path / "selection.json"
    path.write_text(json.dumps({"experts": experts}))
    line = _cli_error(capsys, _unlearn(saved_models, tmp_path, "--selection", str(path), "--save_strategy", "steps",
                                       "--save_steps", "1"))
    assert f"The selection in {path} {fragment}" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # refused before the first step


@pytest.mark.parametrize("make,fragment", [
    (lambda tmp: "./no/such/dir", "the local path {cwd}/no/such/dir does not exist"),
    (lambda tmp: str(tmp / "missing_model"), "the local path {tmp}/missing_model does not exist"),
    (lambda tmp: "no/such/model/dir", "the local path {cwd}/no/such/model/dir does not exist"),
    (lambda tmp: (tmp / "empty_dir").mkdir() or str(tmp / "empty_dir"), "the directory holds no config.json"),
    (lambda tmp: (tmp / "weights.bin").write_text("x") and str(tmp / "weights.bin"), "is a file: give the directory"),
])
@pytest.mark.parametrize("command", ["unlearn", "attribute"])
def test_model_path_that_does_not_exist(tmp_path, capsys, model_never_loads, make, fragment, command):
    import os

    model = make(tmp_path)
    forget = tmp_path / "forget.txt"
    forget.write_text("\n".join(FORGET) + "\n")
    if command == "unlearn":
        code = main(["unlearn", "--model", model, "--forget", str(forget), "--output_dir", str(tmp_path / "out"),
                     "--report_to", "none", "--retain_loss", "none"])
    else:
        code = main(["attribute", "--model", model, "--forget", str(forget), "--output", str(tmp_path / "o")])
    line = _cli_error(capsys, code, command)
    assert f"--model {model}" in line and fragment.format(cwd=os.getcwd(), tmp=tmp_path) in line
    assert "looked up on the Hub" not in line  # says the path is missing, not that the Hub failed


def test_hub_name_not_found_says_it_was_looked_up(tmp_path, capsys, monkeypatch):
    from hf_moe_unlearn.cli import _load_model_and_tokenizer

    monkeypatch.chdir(tmp_path)  # no local folder of that name
    with pytest.raises(MoEUnlearnError, match=r"Cannot load --model 'nobody/no-such-model' \(not a local directory, "
                                              r"so it was looked up on the Hub\): "):
        _load_model_and_tokenizer("nobody/no-such-model")


@pytest.mark.parametrize("flags,message", [
    (("--top_m", "0"), "--top_m 0 must be at least 1"),
    (("--batch_size", "0"), "--batch_size 0 must be at least 1"),
    (("--batch_size", "-4"), "--batch_size -4 must be at least 1"),
    (("--max_tokens", "0"), "--max_tokens 0 must be at least 1"),
    (("--max_layers", "0"), "--max_layers 0 must be at least 1"),
    (("--tau", "-1"), "--tau -1.0 must be >= 0"),
    (("--rho", "-0.5"), "--rho -0.5 must be >= 0"),
    (("--max_length", "1"), "--max_length 1 cannot leave a label"),
    (("--method", "trace"), "--method trace needs --retain"),
])
def test_attribute_refuses_flags_before_the_model(tmp_path, saved_models, capsys, model_never_loads, flags, message):
    forget = tmp_path / "forget.txt"
    forget.write_text("\n".join(FORGET) + "\n")
    code = main(["attribute", "--model", str(saved_models / "moe"), "--forget", str(forget),
                 "--output", str(tmp_path / "o"), *flags])
    assert message in _cli_error(capsys, code, "attribute")


@pytest.mark.parametrize("flags,message", [
    (("--forget_loss", "gaa"), "Unknown forget loss 'gaa'"),
    (("--retain_loss", "nll", "--no_retain"), "needs a retain dataset: pass --retain FILE, or set --retain_loss none"),
    (("--stop_at_holdout", "true"), "--stop_at_holdout true needs a holdout set to stop at: pass --holdout FILE,"),
    (("--selection_method", "trace", "--retain_loss", "none", "--no_retain"), "--selection_method trace needs --retain"),
])
def test_unlearn_refuses_settings_before_the_model(tmp_path, saved_models, capsys, model_never_loads, flags, message):
    if "--no_retain" in flags:
        flags = tuple(f for f in flags if f != "--no_retain")
        forget = tmp_path / "forget.txt"
        forget.write_text("\n".join(FORGET) + "\n")
        code = main(["unlearn", "--model", str(saved_models / "moe"), "--forget", str(forget), "--output_dir",
                     str(tmp_path / "out"), "--report_to", "none", *flags])
    else:
        code = _unlearn(saved_models, tmp_path, *flags)
    line = _cli_error(capsys, code)
    assert message in line
    assert "_dataset" not in line and "(CLI:" not in line


# ------------------------------------------------------------------------- messages in flags (item 5)
def test_cli_translates_python_arguments_to_flags():
    import argparse

    from hf_moe_unlearn.cli import _flag_names, in_flags

    names = _flag_names(argparse.Namespace(command="unlearn"))
    cases = {
        "max_length=0 cannot leave a label: max_length must be at least 2.":
            "--max_length 0 cannot leave a label: --max_length must be at least 2.",
        "pass retain_dataset=..., or set retain_loss='none' (plain GA).":
            "pass --retain FILE, or set --retain_loss none (plain GA).",
        "stop_at_holdout=True needs a holdout: pass holdout_dataset=... (CLI: --holdout FILE), text":
            "--stop_at_holdout true needs a holdout: pass --holdout FILE, text",
        "forget_loss ('ga' in the checkpoint, 'npo' now)": "--forget_loss ('ga' in the checkpoint, 'npo' now)",
        # left alone: flags already, file names, paths, words that are no flag
        "requires non-zero --logging_steps": "requires non-zero --logging_steps",
        "see unlearn_config.json in /runs/output_dir/x and forget_probe.txt": "see unlearn_config.json in "
                                                                              "/runs/output_dir/x and forget_probe.txt",
        "the adapter and its selection": "the adapter and its selection",
        "pass raw text and processing_class=the model's tokenizer": "pass raw text and the model's tokenizer",
    }
    for python, cli in cases.items():
        assert in_flags(python, names) == cli


# --------------------------------------------------------------------------- special tokens (item 5)
def test_builtin_tokenizer_and_tiny_models_agree_on_special_tokens():
    from hf_moe_unlearn.bench.tokenizer import build_tokenizer
    from hf_moe_unlearn.moe import tiny_moe_config

    words = build_tokenizer(["the river flows past the town"])
    assert words.convert_ids_to_tokens([0, 2, 3]) == [words.pad_token, words.bos_token, words.eos_token]
    for model_type in ("qwen3_moe", "mixtral", "deepseek_v3"):
        config = tiny_moe_config(model_type, vocab_size=len(words))
        assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (
            words.pad_token_id, words.bos_token_id, words.eos_token_id), model_type
    # the quickstart's pairing: generation stops on the token the tokenizer calls end-of-text
    model = tiny_moe_model("qwen3_moe", vocab_size=len(words))
    assert model.generation_config.eos_token_id == words.eos_token_id
    assert model.generation_config.pad_token_id in (None, words.pad_token_id)
    assert words("the town")["input_ids"][0] == model.config.bos_token_id
