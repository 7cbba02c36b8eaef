"""Stopping when the forget set is forgotten: probe/holdout/retain NLLs at each evaluation, stop_at_holdout, the
retain guard, the end-of-run lines, bad input and the CLI flags.

The model is a tiny qwen3_moe that first learned the forget and retain texts (10 AdamW steps, ~1 s), so that the
forget probe's NLL starts well below the holdout's (0.83 vs 6.66) and gradient ascent has something to undo.
"""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_tokenizer
from hf_moe_unlearn.config import MoEUnlearnConfig
from hf_moe_unlearn.errors import MoEUnlearnError
from hf_moe_unlearn.moe import tiny_moe_model
from hf_moe_unlearn.probe import StopWhenForgottenCallback
from hf_moe_unlearn.trainer import MoEUnlearnTrainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FORGET = [" ".join(f"w{(i * 3) % 20}" for i in range(j, j + 12)) for j in range(16)]
RETAIN = [" ".join(f"w{40 + (i * 7) % 80}" for i in range(j, j + 12)) for j in range(16)]
HOLDOUT = [" ".join(f"w{20 + (i * 3) % 20}" for i in range(j, j + 12)) for j in range(8)]
PROBE = [" ".join(f"w{(i * 3) % 20}" for i in range(j, 2 * j + 4)) for j in range(3, 8)]  # 7..11 words: padded
EVAL_KEYS = {"eval_forget_probe_nll", "eval_holdout_nll", "eval_retain_nll", "eval_holdout_gap",
             "eval_retain_nll_rise"}


def _ids(texts, tokenizer):
    return [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]


@pytest.fixture(scope="module")
def learned_state():
    """State dict of a tiny MoE that has learned FORGET and RETAIN (plain PyTorch loop, full batch)."""
    tokenizer = make_tiny_tokenizer()
    model = tiny_moe_model("qwen3_moe")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = torch.tensor(_ids(FORGET + RETAIN, tokenizer))
    for _ in range(10):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _learned_model(state):
    model = tiny_moe_model("qwen3_moe")
    model.load_state_dict(state)
    return model.eval()


def hand_nll(model, texts, tokenizer) -> float:
    """Mean token NLL over all next-token targets of all texts: one plain forward per text, log-softmax by hand."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in _ids(texts, tokenizer):
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
            log_probs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
            total -= float(log_probs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
            count += len(ids) - 1
    return total / count


def _config(tmp_path, **kw):
    defaults = dict(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, report_to="none",
                    disable_tqdm=True, use_cpu=True, logging_steps=1, save_strategy="no", seed=0, optim="sgd",
                    learning_rate=30.0, retain_loss="none", anchor_loss_weight=0.0, eval_steps=1)
    defaults.update(kw)
    return MoEUnlearnConfig(**defaults)


def _trainer(tmp_path, state, holdout=HOLDOUT, retain=RETAIN, probe=None, **kw):
    return MoEUnlearnTrainer(_learned_model(state), _config(tmp_path, **kw), forget_dataset=FORGET,
                             retain_dataset=retain, processing_class=make_tiny_tokenizer(), selection={1: [0]},
                             holdout_dataset=holdout, forget_probe_dataset=probe)


def _evals(trainer):
    return [e for e in trainer.state.log_history if "eval_forget_probe_nll" in e]


def test_logged_nlls_match_hand_computation(tmp_path, learned_state):
    tokenizer = make_tiny_tokenizer()
    trainer = _trainer(tmp_path, learned_state, probe=PROBE, max_steps=2)
    trainer.train()
    start, _, end = _evals(trainer)
    assert start["step"] == 0 and end["step"] == 2 and EVAL_KEYS <= set(start)
    # step 0: the logged values are those of an identical fresh model (the LoRA starts at zero)
    fresh = _learned_model(learned_state)
    for key, texts in (("eval_forget_probe_nll", PROBE), ("eval_holdout_nll", HOLDOUT), ("eval_retain_nll", RETAIN)):
        assert start[key] == pytest.approx(hand_nll(fresh, texts, tokenizer), rel=1e-5), key
    assert start["eval_holdout_gap"] == pytest.approx(start["eval_holdout_nll"] - start["eval_forget_probe_nll"])
    assert start["eval_retain_nll_rise"] == 0
    # step 2: those of the trained model, and the rise is relative to step 0
    trained = trainer.model.eval()
    assert end["eval_forget_probe_nll"] == pytest.approx(hand_nll(trained, PROBE, tokenizer), rel=1e-5)
    assert abs(end["eval_forget_probe_nll"] - start["eval_forget_probe_nll"]) > 0.05  # GA at lr 30 moved it
    assert end["eval_retain_nll_rise"] == pytest.approx(end["eval_retain_nll"] / start["eval_retain_nll"] - 1)


def test_default_probe_is_a_fixed_seeded_sample_of_the_forget_set(tmp_path, learned_state):
    tokenizer = make_tiny_tokenizer()
    fresh = _learned_model(learned_state)
    probes = []
    for seed in (0, 0, 1):
        trainer = _trainer(tmp_path, learned_state, seed=seed, forget_probe_size=5, retain_probe_size=4)
        probe, retain = trainer.eval_dataset["forget_probe"], trainer.eval_dataset["retain"]
        assert len(probe) == 5 and len(retain) == 4
        texts = [FORGET[_ids(FORGET, tokenizer).index(ids)] for ids in probe["input_ids"]]
        assert len(set(texts)) == 5
        probes.append(texts)
        metrics = trainer.evaluate()
        assert metrics["eval_forget_probe_nll"] == pytest.approx(hand_nll(fresh, texts, tokenizer), rel=1e-5)
    assert probes[0] == probes[1] and probes[0] != probes[2]
    whole = _trainer(tmp_path, learned_state).eval_dataset  # default size 64 > 16 examples: the whole sets
    assert len(whole["forget_probe"]) == len(FORGET) and len(whole["retain"]) == len(RETAIN)


def test_stop_at_holdout_stops_at_first_evaluation_reaching_it(tmp_path, learned_state, caplog):
    tokenizer = make_tiny_tokenizer()
    # constant lr 5: the probe passes the holdout by 0.25 at step 6 (gap 1.95 at step 5), so a stop rule off by
    # more than that stops elsewhere
    trainer = _trainer(tmp_path, learned_state, stop_at_holdout=True, max_steps=30, save_strategy="steps",
                       save_steps=1000, learning_rate=5.0, lr_scheduler_type="constant")
    with caplog.at_level(logging.INFO, logger="hf_moe_unlearn.probe"):
        trainer.train()
    evals = _evals(trainer)
    reached = [e["step"] for e in evals if e["step"] > 0 and e["eval_forget_probe_nll"] >= e["eval_holdout_nll"]]
    assert reached and 0 < reached[0] < 30
    assert trainer.state.global_step == reached[0] == evals[-1]["step"]
    assert [e["step"] for e in evals] == list(range(reached[0] + 1))  # eval_steps=1, and one at step 0
    assert trainer.stop_callback.stop_reason == "forgotten" and trainer.stop_callback.reached_step == reached[0]
    messages = [r.getMessage() for r in caplog.records if r.name == "hf_moe_unlearn.probe"]
    assert messages == [f"forget probe NLL {evals[-1]['eval_forget_probe_nll']:.2f} reached the holdout's "
                        f"{evals[-1]['eval_holdout_nll']:.2f} at step {reached[0]}: training stopped (stop_at_holdout)."]
    assert (tmp_path / "out" / f"checkpoint-{reached[0]}").is_dir()  # a checkpoint at the stop (should_save)
    # The saved result is the evaluated state: plain PEFT on a fresh base gives the NLLs logged at the stop.
    trainer.save_model(str(tmp_path / "final"))
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(_learned_model(learned_state), str(tmp_path / "final")).eval()
    assert hand_nll(loaded, FORGET, tokenizer) == pytest.approx(evals[-1]["eval_forget_probe_nll"], rel=1e-5)
    assert hand_nll(loaded, HOLDOUT, tokenizer) == pytest.approx(evals[-1]["eval_holdout_nll"], rel=1e-5)
    checkpoint = load_file(tmp_path / "out" / f"checkpoint-{reached[0]}" / "adapter_model.safetensors")
    final = load_file(tmp_path / "final" / "adapter_model.safetensors")
    assert checkpoint.keys() == final.keys() and all(torch.equal(checkpoint[k], final[k]) for k in final)


def test_budget_out_warning_and_metrics_in_trainer_state(tmp_path, learned_state, caplog):
    trainer = _trainer(tmp_path, learned_state, stop_at_holdout=True, learning_rate=0.5, max_steps=5, eval_steps=2)
    with caplog.at_level(logging.INFO, logger="hf_moe_unlearn.probe"):
        trainer.train()
    evals = _evals(trainer)
    assert [e["step"] for e in evals] == [0, 2, 4, 5]  # the Trainer evaluates at the last step too
    assert trainer.state.global_step == 5 and trainer.stop_callback.stop_reason is None
    last = evals[-1]
    assert last["eval_forget_probe_nll"] < last["eval_holdout_nll"]
    records = [r for r in caplog.records if r.name == "hf_moe_unlearn.probe"]
    assert [r.levelno for r in records] == [logging.WARNING]
    gap = last["eval_holdout_nll"] - last["eval_forget_probe_nll"]
    assert records[0].getMessage() == (
        f"forget probe NLL {last['eval_forget_probe_nll']:.2f} did not reach the holdout's "
        f"{last['eval_holdout_nll']:.2f} (gap {gap:.2f}) in 5 steps: raise learning_rate or max_steps.")
    trainer.save_state()
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    saved = [e for e in history if "eval_forget_probe_nll" in e]
    assert [e["step"] for e in saved] == [0, 2, 4, 5] and all(EVAL_KEYS <= set(e) for e in saved)
    assert saved[-1]["eval_forget_probe_nll"] == pytest.approx(last["eval_forget_probe_nll"])
    assert any("loss" in e for e in history)  # the training log is still there next to the evaluations


def test_retain_guard_stops(tmp_path, learned_state, caplog):
    trainer = _trainer(tmp_path, learned_state, holdout=None, max_retain_nll_rise=0.5, max_steps=20)
    assert trainer.args.eval_strategy == "steps" and trainer.args.eval_on_start  # the guard turns evaluation on
    with caplog.at_level(logging.INFO, logger="hf_moe_unlearn.probe"):
        trainer.train()
    evals = _evals(trainer)
    start = evals[0]["eval_retain_nll"]
    over = [e["step"] for e in evals if e["eval_retain_nll"] > 1.5 * start]
    assert over and trainer.state.global_step == over[0] == evals[-1]["step"] < 20
    assert trainer.stop_callback.stop_reason == "retain_guard"
    rise = evals[-1]["eval_retain_nll"] / start - 1
    messages = [r.getMessage() for r in caplog.records if r.name == "hf_moe_unlearn.probe"]
    assert messages == [
        f"retain NLL rose by {rise:.0%} (limit 50%, max_retain_nll_rise) at step {over[0]}, from {start:.2f} to "
        f"{evals[-1]['eval_retain_nll']:.2f}: training stopped. The model is losing what it should keep: lower "
        f"learning_rate or raise retain_loss_weight."]
    assert "eval_holdout_nll" not in evals[0]


def test_retain_baseline_survives_resume(tmp_path, learned_state):
    """The retain guard's baseline is the step-0 value, also in a run resumed from a checkpoint (it is read back
    from the restored log history)."""
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, max_retain_nll_rise=100.0, learning_rate=5.0,
              lr_scheduler_type="constant")
    full = _trainer(tmp_path, learned_state, **kw)
    full.train()
    resumed = _trainer(tmp_path, learned_state, **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    a, b = _evals(full)[-1], _evals(resumed)[-1]
    assert a["step"] == b["step"] == 4 and b["eval_retain_nll_rise"] > 0.01
    assert b["eval_retain_nll_rise"] == pytest.approx(b["eval_retain_nll"] / _evals(full)[0]["eval_retain_nll"] - 1)
    assert b["eval_retain_nll_rise"] == pytest.approx(a["eval_retain_nll_rise"], rel=1e-4)


def test_evaluation_does_not_change_training(tmp_path, learned_state):
    """The evaluations (eval mode, no grad, router recorder paused) leave the run itself as it was."""
    plain = _trainer(tmp_path / "a", learned_state, holdout=None, max_steps=3)
    assert plain.stop_callback is None and plain.args.eval_strategy == "no"
    plain.train()
    probed = _trainer(tmp_path / "b", learned_state, max_steps=3)
    probed.train()
    assert len(_evals(probed)) == 4 and not _evals(plain)
    a = {k: v for k, v in plain.model.state_dict().items() if "lora" in k}
    b = {k: v for k, v in probed.model.state_dict().items() if "lora" in k}
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def train_logs(trainer):
        return [(e["loss"], e["route/L1E0/forget"]) for e in trainer.state.log_history if "loss" in e]

    assert train_logs(plain) == train_logs(probed) and len(train_logs(plain)) == 3


def test_evaluate_other_data(tmp_path, learned_state):
    tokenizer = make_tiny_tokenizer()
    trainer = _trainer(tmp_path, learned_state)
    trainer.model.train()
    metrics = trainer.evaluate(eval_dataset={"paraphrase": PROBE})
    assert all(module.training for module in trainer.model.modules())  # modes restored after the eval-mode pass
    assert trainer.recorder.enabled
    assert set(metrics) - {"epoch"} == {"eval_paraphrase_nll"}
    assert metrics["eval_paraphrase_nll"] == pytest.approx(hand_nll(_learned_model(learned_state), PROBE, tokenizer),
                                                           rel=1e-5)
    assert set(trainer.evaluate(eval_dataset=PROBE)) - {"epoch"} == {"eval_nll"}


@pytest.mark.parametrize("kw,message", [
    (dict(holdout=None, stop_at_holdout=True), "stop_at_holdout=True needs a holdout set"),
    (dict(retain=None, max_retain_nll_rise=0.5), "there is no retain set"),
    (dict(holdout=[{"input_ids": [5]}, {"input_ids": [6]}]), "The holdout set has no counted token"),
    (dict(probe=[{"input_ids": [5]}]), "The forget probe set has no counted token"),
    (dict(holdout=[]), "The holdout set is empty"),
])
def test_bad_input(tmp_path, learned_state, kw, message):
    with pytest.raises(MoEUnlearnError, match=message):
        _trainer(tmp_path, learned_state, **kw)


@pytest.mark.parametrize("value", [0.0, -0.1])
def test_bad_retain_guard_value(tmp_path, value):
    with pytest.raises(MoEUnlearnError, match="max_retain_nll_rise=.* must be > 0"):
        _config(tmp_path, max_retain_nll_rise=value)


def test_eval_dataset_argument_is_refused(tmp_path, learned_state):
    with pytest.raises(MoEUnlearnError, match="pass holdout_dataset"):
        MoEUnlearnTrainer(_learned_model(learned_state), _config(tmp_path), forget_dataset=FORGET,
                          processing_class=make_tiny_tokenizer(), selection={1: [0]}, eval_dataset=HOLDOUT)


def test_callback_alone():
    """The stop rule on its own: first evaluation after step 0 with probe >= holdout; step 0 only warns."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir="unused", report_to="none", save_strategy="no")
    callback, state, control = StopWhenForgottenCallback(stop_at_holdout=True), TrainerState(), TrainerControl()
    for step, probe, holdout, stops in ((0, 5.0, 4.0, False), (10, 3.0, 4.0, False), (20, 4.0, 4.0, True)):
        state.global_step = step
        callback.on_evaluate(args, state, control, {"eval_forget_probe_nll": probe, "eval_holdout_nll": holdout})
        assert control.should_training_stop is stops and not control.should_save
    assert callback.reached_step == 20


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_cli_holdout_and_stop_at_holdout(tmp_path, learned_state, capsys):
    from hf_moe_unlearn.cli import main

    model_dir = tmp_path / "model"
    _learned_model(learned_state).save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    forget, holdout = _write(tmp_path / "forget.txt", FORGET), _write(tmp_path / "holdout.txt", HOLDOUT)
    common = ["unlearn", "--model", str(model_dir), "--forget", forget, "--report_to", "none", "--use_cpu", "true",
              "--save_strategy", "no", "--disable_tqdm", "true", "--retain_loss", "none", "--anchor_loss_weight", "0",
              "--optim", "sgd", "--per_device_train_batch_size", "4", "--selection_method", "seuf"]
    out = tmp_path / "out"
    code = main(common + ["--output_dir", str(out), "--holdout", holdout, "--eval_steps", "5", "--stop_at_holdout",
                          "--learning_rate", "30", "--max_steps", "40"])
    assert code == 0
    state = json.loads((out / "trainer_state.json").read_text())
    evals = [e for e in state["log_history"] if "eval_holdout_nll" in e]
    reached = [e["step"] for e in evals if e["step"] > 0 and e["eval_forget_probe_nll"] >= e["eval_holdout_nll"]]
    assert [e["step"] for e in evals][:2] == [0, 5] and reached and state["global_step"] == reached[0] < 40
    assert f"reached the holdout's {evals[-1]['eval_holdout_nll']:.2f} at step {reached[0]}" in capsys.readouterr().out
    assert (out / "adapter_model.safetensors").is_file()
    code = main(common + ["--output_dir", str(tmp_path / "bad"), "--stop_at_holdout"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--stop_at_holdout true needs a holdout set" in err[0]  # in flags
