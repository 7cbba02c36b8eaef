"""The OpenUnlearning methods added as losses: DPO with alternate answers, UNDIAL, WGA, SatImp, CE-U.

Each loss is checked against a hand computation written here from the published definitions (explicit loops over
tokens with ``math``; nothing from ``hf_moe_unlearn.losses.functional``), including the -100 labels left out, and for
its direction: one gradient step on the logits lowers the probability of the forget tokens. Then each runs end to end
through ``MoEUnlearnTrainer`` on a tiny MoE with a SEUF selection and the anchor on, and with a TRACE selection and
TRACE-weighted retain loss; the trainer's value of the reference-reading losses (dpo, undial) after training is
recomputed by hand from the trained model and a copy of the start model. Last, the CLI takes the new names.
"""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch

from hf_moe_unlearn.config import MoEUnlearnConfig
from hf_moe_unlearn.errors import MoEUnlearnError
from hf_moe_unlearn.losses import LOSS_DEFAULTS, LossContext, get_loss, get_loss_spec, list_losses
from hf_moe_unlearn.moe import tiny_moe_model
from hf_moe_unlearn.trainer import MoEUnlearnTrainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NEW_FORGET_LOSSES = ("dpo", "undial", "wga", "satimp", "ceu")


# ------------------------------------------------------------------------------------------ hand maths
def log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    log_total = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - log_total for v in row]


def softmax(row: list[float]) -> list[float]:
    finite = [v for v in row if v != -math.inf]
    top = max(finite)
    e = [0.0 if v == -math.inf else math.exp(v - top) for v in row]
    return [v / sum(e) for v in e]


def targets(labels: list[int]) -> list[tuple[int, int]]:
    """(position t predicting, target token) for every counted label: position t's logits predict labels[t + 1]."""
    return [(t - 1, y) for t, y in enumerate(labels) if t >= 1 and y != -100]


def hand_weighted_ga(logits, labels, weight) -> float:
    """−mean over counted tokens of weight(p)·nll, p = p(target), over the whole batch."""
    total, count = 0.0, 0
    for z, y_row in zip(logits, labels):
        for t, y in targets(y_row):
            log_p = log_softmax(z[t])[y]
            total += weight(math.exp(log_p)) * (-log_p)
            count += 1
    return -total / count


def hand_undial(logits, ref_logits, labels, beta) -> float:
    total, count = 0.0, 0
    for z, r, y_row in zip(logits, ref_logits, labels):
        for t, y in targets(y_row):
            adjusted = [v - (beta if v_index == y else 0.0) for v_index, v in enumerate(r[t])]
            q = softmax(adjusted)
            log_p = log_softmax(z[t])
            total += -sum(q_v * lp for q_v, lp in zip(q, log_p))
            count += 1
    return total / count


def hand_ceu(logits, labels, ignore_first_n) -> float:
    total, count = 0.0, 0
    for z, y_row in zip(logits, labels):
        counted = [t for t, y in enumerate(y_row) if y != -100]
        dropped = set(counted[:ignore_first_n])  # the first answer tokens of the row (unshifted positions)
        for t, y in targets(y_row):
            if t + 1 in dropped:
                continue
            q = softmax([(-math.inf if v_index == y else v) for v_index, v in enumerate(z[t])])
            log_p = log_softmax(z[t])
            total += -sum(q_v * lp for v_index, (q_v, lp) in enumerate(zip(q, log_p)) if v_index != y)
            count += 1
    return total / count


def hand_sequence_nll(z, y_row) -> float:
    return -sum(log_softmax(z[t])[y] for t, y in targets(y_row))


def hand_dpo(win, win_ref, lose, lose_ref, win_labels, lose_labels, beta) -> float:
    """OpenUnlearning's compute_dpo_loss: −(2/β)·mean log σ(β(r_win − r_lose)), r = −(ℓθ − ℓref) summed NLLs."""
    total = 0.0
    for b in range(len(win)):
        r_win = -(hand_sequence_nll(win[b], win_labels[b]) - hand_sequence_nll(win_ref[b], win_labels[b]))
        r_lose = -(hand_sequence_nll(lose[b], lose_labels[b]) - hand_sequence_nll(lose_ref[b], lose_labels[b]))
        x = beta * (r_win - r_lose)
        total += -math.log(1.0 / (1.0 + math.exp(-x)))
    return 2.0 / beta * total / len(win)


# Two rows, vocabulary 5: row 0 is a prompt/answer pair (-100 on the prompt), row 1 has padding at the end.
LABELS = [[-100, -100, 3, 1, 4], [-100, 2, 0, -100, -100]]
torch.manual_seed(0)
LOGITS = (torch.randn(2, 5, 5) * 2).tolist()
REF_LOGITS = (torch.randn(2, 5, 5) * 2).tolist()


def _forget_log_prob(logits: torch.Tensor, labels: list[list[int]]) -> float:
    return sum(log_softmax(logits[b, t].tolist())[y] for b, row in enumerate(labels) for t, y in targets(row))


def _ctx(logits, labels, config=None, ref_logits=None, **extra) -> LossContext:
    batch = {"input_ids": torch.zeros(len(labels), len(labels[0]), dtype=torch.long),
             "attention_mask": torch.ones(len(labels), len(labels[0]), dtype=torch.long),
             "labels": torch.tensor(labels)}
    batch.update(extra.pop("batch", {}))
    reference = None if ref_logits is None else (lambda split: ref_logits[split])
    return LossContext(forget_batch=batch, forget_logits=logits, config=config, reference_logits=reference, **extra)


# ---------------------------------------------------------------------------------- values by hand
@pytest.mark.parametrize("beta", [1.0, 2.5, 0.0])
def test_wga_matches_hand_computation(beta):
    logits = torch.tensor(LOGITS)
    expected = hand_weighted_ga(LOGITS, LABELS, lambda p: p**beta)
    value = get_loss("wga", kind="forget")(_ctx(logits, LABELS, SimpleNamespace(wga_beta=beta)))
    assert value.item() == pytest.approx(expected, rel=1e-5)
    if beta == 0.0:  # p^0 = 1: plain gradient ascent
        assert value.item() == pytest.approx(get_loss("ga")(_ctx(logits, LABELS)).item(), rel=1e-6)


@pytest.mark.parametrize("beta1,beta2", [(5.0, 1.0), (0.5, 2.0), (1.0, 0.0)])
def test_satimp_matches_hand_computation(beta1, beta2):
    logits = torch.tensor(LOGITS)
    expected = hand_weighted_ga(LOGITS, LABELS, lambda p: p**beta1 * (1.0 - p) ** beta2)
    config = SimpleNamespace(satimp_beta1=beta1, satimp_beta2=beta2)
    assert get_loss("satimp")(_ctx(logits, LABELS, config)).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("beta", [10.0, 3.0])
def test_undial_matches_hand_computation(beta):
    logits, ref = torch.tensor(LOGITS), torch.tensor(REF_LOGITS)
    asked = []

    def reference(split):
        asked.append(split)
        return ref

    ctx = LossContext(forget_batch=_ctx(logits, LABELS).forget_batch, forget_logits=logits,
                      config=SimpleNamespace(undial_beta=beta), reference_logits=reference)
    expected = hand_undial(LOGITS, REF_LOGITS, LABELS, beta)
    assert get_loss("undial")(ctx).item() == pytest.approx(expected, rel=1e-5)
    assert asked == ["forget"]


@pytest.mark.parametrize("n", [1, 0, 2])
def test_ceu_matches_hand_computation(n):
    logits = torch.tensor(LOGITS)
    expected = hand_ceu(LOGITS, LABELS, n)
    config = SimpleNamespace(ceu_ignore_first_n_answer_tokens=n)
    assert get_loss("ceu")(_ctx(logits, LABELS, config)).item() == pytest.approx(expected, rel=1e-5)


def test_ceu_leaves_out_the_first_answer_token():
    """With the default n = 1, the position that predicts each row's first answer token gets no gradient."""
    logits = torch.tensor(LOGITS, requires_grad=True)
    get_loss("ceu")(_ctx(logits, LABELS)).backward()
    # row 0: first answer token at t=2 (predicted from 1); row 1: at t=1 (predicted from 0)
    assert logits.grad[0, 1].abs().max().item() == 0 and logits.grad[1, 0].abs().max().item() == 0
    assert logits.grad[0, 2].abs().max().item() > 0 and logits.grad[1, 1].abs().max().item() > 0


def test_dpo_matches_hand_computation_with_alternate_answers():
    torch.manual_seed(1)
    lose, lose_ref = torch.tensor(LOGITS), torch.tensor(REF_LOGITS)
    win, win_ref = torch.randn(2, 5, 5), torch.randn(2, 5, 5)
    alt_labels = [[-100, 0, 2, -100, -100], [-100, -100, 1, 1, 3]]
    beta = 0.3
    refs = {"forget": lose_ref, "alternate": win_ref}
    asked = []

    def reference(split):
        asked.append(split)
        return refs[split]

    ctx = LossContext(forget_batch={**_ctx(lose, LABELS).forget_batch, "alternate_labels": torch.tensor(alt_labels)},
                      forget_logits=lose, config=SimpleNamespace(dpo_beta=beta), reference_logits=reference,
                      alternate_logits=lambda: win)
    expected = hand_dpo(win.tolist(), win_ref.tolist(), LOGITS, REF_LOGITS, alt_labels, LABELS, beta)
    assert get_loss("dpo")(ctx).item() == pytest.approx(expected, rel=1e-5)
    assert sorted(asked) == ["alternate", "forget"]
    # the model as its own reference: (2/β)·log 2
    same = LossContext(forget_batch=ctx.forget_batch, forget_logits=lose, config=SimpleNamespace(dpo_beta=beta),
                       reference_logits=lambda split: {"forget": lose, "alternate": win}[split],
                       alternate_logits=lambda: win)
    assert get_loss("dpo")(same).item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)


def _hand_gradient(labels, per_target):
    """``[B, T, V]`` gradient of a mean over counted targets, ``per_target(b, t, y) -> dL_t/dz`` (a list over V)."""
    count = sum(len(targets(row)) for row in labels)
    grad = [[[0.0] * 5 for _ in range(5)] for _ in labels]
    for b, row in enumerate(labels):
        for t, y in targets(row):
            grad[b][t] = [g / count for g in per_target(b, t, y)]
    return torch.tensor(grad)


@pytest.mark.parametrize("name", ["wga", "satimp", "undial", "ceu"])
def test_gradient_in_the_logits_is_the_published_one(name):
    """Weights and targets are constants (detached): WGA/SatImp's gradient is −w·(p − onehot(y)), UNDIAL's and CE-U's
    p − q, per counted target divided by their number; zero elsewhere."""
    logits = torch.tensor(LOGITS, requires_grad=True)
    ref = torch.tensor(REF_LOGITS)
    labels = LABELS
    config = SimpleNamespace(wga_beta=1.5, satimp_beta1=2.0, satimp_beta2=1.5, undial_beta=4.0,
                             ceu_ignore_first_n_answer_tokens=0)
    get_loss(name)(_ctx(logits, labels, config, ref_logits={"forget": ref})).backward()

    def per_target(b, t, y):
        p = softmax(LOGITS[b][t])
        onehot = [1.0 if v == y else 0.0 for v in range(5)]
        if name in ("wga", "satimp"):
            w = p[y] ** 1.5 if name == "wga" else p[y] ** 2.0 * (1 - p[y]) ** 1.5
            return [-w * (p_v - o) for p_v, o in zip(p, onehot)]
        if name == "undial":
            q = softmax([v - 4.0 * o for v, o in zip(REF_LOGITS[b][t], onehot)])
        else:
            q = softmax([-math.inf if o else v for v, o in zip(LOGITS[b][t], onehot)])
        return [p_v - q_v for p_v, q_v in zip(p, q)]

    torch.testing.assert_close(logits.grad, _hand_gradient(labels, per_target), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------ directions
def _one_step(name, config=None, **ctx_kw):
    logits = torch.tensor(LOGITS, requires_grad=True)
    loss = get_loss(name)(_ctx(logits, LABELS, config, **ctx_kw))
    loss.backward()
    stepped = (logits - 0.1 * logits.grad).detach()
    return logits, stepped


@pytest.mark.parametrize("name", ["wga", "satimp", "ceu", "undial"])
def test_a_gradient_step_lowers_the_forget_tokens_probability(name):
    ref = {"forget": torch.tensor(LOGITS)}  # at the start the model is its own reference
    logits, stepped = _one_step(name, ref_logits=ref if name == "undial" else None)
    labels = LABELS
    if name == "ceu":  # its first answer token of each row is left out: compare on the counted ones only
        labels = [[-100, -100, -100, 1, 4], [-100, -100, 0, -100, -100]]
    assert _forget_log_prob(stepped, labels) < _forget_log_prob(logits.detach(), labels) - 1e-4
    # positions predicting an uncounted label (prompt, padding, the last position) get no gradient at all
    uncounted = [(0, 0), (0, 4), (1, 2), (1, 3), (1, 4)]
    for b, t in uncounted:
        assert logits.grad[b, t].abs().max().item() == 0, (name, b, t)


def test_dpo_step_raises_the_alternate_and_lowers_the_forget_answer():
    alt_labels = [[-100, 0, 2, -100, -100], [-100, -100, 1, 1, 3]]
    lose = torch.tensor(LOGITS, requires_grad=True)
    torch.manual_seed(2)
    win = torch.randn(2, 5, 5, requires_grad=True)
    refs = {"forget": lose.detach().clone(), "alternate": win.detach().clone()}
    ctx = LossContext(forget_batch={**_ctx(lose, LABELS).forget_batch, "alternate_labels": torch.tensor(alt_labels)},
                      forget_logits=lose, reference_logits=lambda split: refs[split], alternate_logits=lambda: win)
    get_loss("dpo")(ctx).backward()
    assert _forget_log_prob(lose - 0.1 * lose.grad, LABELS) < _forget_log_prob(lose.detach(), LABELS)
    assert _forget_log_prob(win - 0.1 * win.grad, alt_labels) > _forget_log_prob(win.detach(), alt_labels)


# ------------------------------------------------------------------------- registry and config
def test_registered_with_their_needs():
    assert list_losses("forget")[-5:] == list(NEW_FORGET_LOSSES)
    assert get_loss_spec("dpo").requires == ("forget_logits", "reference", "alternate")
    assert get_loss_spec("dpo").reference == "sequence"  # served from the per-example reference cache
    assert get_loss_spec("undial").reference == "logits"  # token logits: a reference forward every step
    for name in ("wga", "satimp", "ceu"):
        assert get_loss_spec(name).requires == ("forget_logits",) and get_loss_spec(name).reference is None


def test_defaults_are_openunlearnings():
    """configs/trainer/{DPO,UNDIAL,WGA,SatImp,CEU}.yaml of locuslab/open-unlearning."""
    expected = dict(dpo_beta=0.1, undial_beta=10.0, wga_beta=1.0, satimp_beta1=5.0, satimp_beta2=1.0,
                    ceu_ignore_first_n_answer_tokens=1)
    config = MoEUnlearnConfig(output_dir="unused", report_to="none", use_cpu=True)
    for name, value in expected.items():
        assert LOSS_DEFAULTS[name] == value and getattr(config, name) == value


@pytest.mark.parametrize("kw,message", [
    (dict(dpo_beta=0.0), "dpo_beta=0.0 must be > 0"),
    (dict(undial_beta=-1.0), "undial_beta=-1.0 must be > 0"),
    (dict(wga_beta=-0.5), "wga_beta=-0.5 must be a finite number >= 0"),
    (dict(satimp_beta1=float("nan")), "satimp_beta1=nan must be a finite number >= 0"),
    (dict(satimp_beta2=float("inf")), "satimp_beta2=inf must be a finite number >= 0"),
    (dict(ceu_ignore_first_n_answer_tokens=-1), "ceu_ignore_first_n_answer_tokens=-1 must be >= 0"),
])
def test_config_refuses_out_of_range(kw, message):
    with pytest.raises(MoEUnlearnError, match=message):
        MoEUnlearnConfig(output_dir="unused", report_to="none", use_cpu=True, **kw)


def test_missing_inputs_say_what_to_do():
    logits = torch.tensor(LOGITS)
    with pytest.raises(MoEUnlearnError, match="loss 'undial' needs a reference model"):
        get_loss("undial")(_ctx(logits, LABELS))
    with pytest.raises(MoEUnlearnError, match="loss 'dpo' needs an alternate answer per forget example.*`alternate`"):
        get_loss("dpo")(_ctx(logits, LABELS, ref_logits={"forget": logits}))


# -------------------------------------------------------------------------------- end to end
QA_FORGET = [{"prompt": " ".join(f"w{1 + (i + j) % 9}" for i in range(2 + j % 3)),
              "answer": " ".join(f"w{10 + (i * 5 + j) % 15}" for i in range(3 + j % 3)),
              "alternate": " ".join(f"w{30 + (i * 3 + j) % 11}" for i in range(2 + j % 2))} for j in range(8)]
QA_RETAIN = [{"prompt": f"w{50 + j} w51", "answer": " ".join(f"w{60 + (i + j) % 30}" for i in range(3 + j % 3))}
             for j in range(8)]


def _trainer(tmp_path, tokenizer, model=None, **kw):
    args = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, report_to="none",
                disable_tqdm=True, use_cpu=True, logging_steps=1, save_strategy="no", seed=0)
    args.update(kw)
    model = model if model is not None else tiny_moe_model("qwen3_moe")
    return MoEUnlearnTrainer(model, MoEUnlearnConfig(**args), forget_dataset=QA_FORGET, retain_dataset=QA_RETAIN,
                             processing_class=tokenizer)


@pytest.mark.parametrize("name", NEW_FORGET_LOSSES)
@pytest.mark.parametrize("method", ["seuf", "trace"])
def test_trains_with_seuf_and_trace(tmp_path, tiny_tokenizer, name, method):
    """SEUF: attribution-selected expert, anchor on; TRACE: TRACE selection and TRACE-weighted retain NLL."""
    kw = (dict(selection_method="seuf", anchor_loss_weight=1.0) if method == "seuf" else
          dict(selection_method="trace", retain_weighting="trace", anchor_loss_weight=0.0, trace_tau=0.0,
               trace_rho=0.0))
    trainer = _trainer(tmp_path, tiny_tokenizer, forget_loss=name, retain_loss="nll", **kw)
    assert trainer.selection.method == method and trainer.selection.pairs
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "forget_loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert math.isfinite(entry["forget_loss"]) and math.isfinite(entry["retain_loss"])
        assert ("anchor_loss" in entry) == (method == "seuf")
    if name == "dpo":  # step 0: the model is its own reference on both answers
        assert logs[0]["forget_loss"] == pytest.approx(2 / 0.1 * math.log(2), rel=1e-4)


class _Spy:
    """Wraps the trainer's forget loss: keeps the value and the forget batch of the last call."""

    def __init__(self, fn):
        self.fn, self.value, self.batch = fn, None, None
        self.requires, self.name, self.kind = fn.requires, fn.name, fn.kind

    def __call__(self, ctx):
        self.value, self.batch = self.fn(ctx), {k: v.clone() for k, v in ctx.forget_batch.items()}
        return self.value


@pytest.mark.parametrize("name", ["dpo", "undial"])
def test_trainer_value_after_training_is_the_hand_value(tmp_path, tiny_tokenizer, name):
    """After two SGD steps the trainer's loss on a batch equals the hand formula on the trained model's logits and a
    copy of the start model's (the reference), for the forget answer and (dpo) the alternate answer."""
    model = tiny_moe_model("qwen3_moe")
    start = copy.deepcopy(model).eval()
    trainer = _trainer(tmp_path, tiny_tokenizer, model=model, forget_loss=name, retain_loss="nll", optim="sgd",
                       learning_rate=0.5, selection_method="seuf", anchor_loss_weight=1.0, undial_beta=3.0,
                       dpo_beta=0.5)
    trainer.train()
    spy = _Spy(trainer.forget_loss_fn)
    trainer.forget_loss_fn = spy
    trainer.model.eval()
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
        f = spy.batch

        def logits(m, prefix=""):
            return m(input_ids=f[f"{prefix}input_ids"], attention_mask=f[f"{prefix}attention_mask"]).logits.tolist()

        labels = f["labels"].tolist()
        if name == "undial":
            expected = hand_undial(logits(trainer.model), logits(start), labels, 3.0)
        else:
            alt_labels = f["alternate_labels"].tolist()
            expected = hand_dpo(logits(trainer.model, "alternate_"), logits(start, "alternate_"),
                                logits(trainer.model), logits(start), alt_labels, labels, 0.5)
    assert spy.value.item() == pytest.approx(expected, rel=1e-4)
    # training moved the model away from its reference, so the comparison is not the trivial θ = ref one
    with torch.no_grad():
        moved = torch.tensor(logits(trainer.model)) - torch.tensor(logits(start))
    assert moved.abs().max().item() > 1e-3


def test_dpo_without_alternate_column_is_refused(tmp_path, tiny_tokenizer):
    forget = [{k: v for k, v in row.items() if k != "alternate"} for row in QA_FORGET]
    with pytest.raises(MoEUnlearnError, match="forget loss 'dpo' needs an alternate answer.*'alternate' column"):
        MoEUnlearnTrainer(tiny_moe_model("qwen3_moe"), MoEUnlearnConfig(
            output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True, forget_loss="dpo"),
            forget_dataset=forget, retain_dataset=QA_RETAIN, processing_class=tiny_tokenizer)


# ----------------------------------------------------------------------------------------- CLI
def test_cli_help_lists_the_new_losses(capsys):
    from hf_moe_unlearn.cli import main

    with pytest.raises(SystemExit):
        main(["unlearn", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    described = text.rsplit("--forget_loss FORGET_LOSS, --forget-loss FORGET_LOSS", 1)[1].split("(default", 1)[0]
    for name in list_losses("forget"):  # the help is written from the registry
        assert f" {name}," in described or f" {name} " in described, (name, described)
    for flag in ("--dpo_beta", "--undial_beta", "--wga_beta", "--satimp_beta1", "--satimp_beta2",
                 "--ceu_ignore_first_n_answer_tokens"):
        assert flag in text


@pytest.mark.parametrize("name", ["undial", "dpo"])
def test_cli_unlearn_with_new_loss(tmp_path, tiny_tokenizer, name):
    from hf_moe_unlearn.cli import main

    model_dir = tmp_path / "model"
    tiny_moe_model("qwen3_moe").save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    forget, retain = tmp_path / "forget.jsonl", tmp_path / "retain.jsonl"
    forget.write_text("".join(json.dumps(row) + "\n" for row in QA_FORGET))
    retain.write_text("".join(json.dumps(row) + "\n" for row in QA_RETAIN))
    out = tmp_path / "out"
    code = main(["unlearn", "--model", str(model_dir), "--forget", str(forget), "--retain", str(retain),
                 "--forget_loss", name, f"--{name}_beta", "0.5", "--output_dir", str(out), "--report_to", "none",
                 "--use_cpu", "true", "--disable_tqdm", "true", "--max_steps", "1",
                 "--per_device_train_batch_size", "2", "--save_strategy", "no"])
    assert code == 0
    used = json.loads((out / "unlearn_config.json").read_text())
    assert used["forget_loss"] == name and used[f"{name}_beta"] == 0.5


@pytest.mark.parametrize("value", [None, "  "])
def test_alternate_missing_in_some_rows_is_refused(tiny_tokenizer, value):
    from hf_moe_unlearn.data.text import tokenize_dataset

    rows = [dict(row) for row in QA_FORGET]
    rows[3]["alternate"] = value
    with pytest.raises(MoEUnlearnError, match="1 of the 8 examples of the forget set has no 'alternate' answer "
                                              r"\(the first: example 3\)"):
        tokenize_dataset(rows, tiny_tokenizer, 64, name="forget set")


def test_alternate_is_tokenised_with_the_prompt(tiny_tokenizer):
    from hf_moe_unlearn.data.text import tokenize_dataset

    row = {"prompt": "w1 w2", "answer": "w3 w4", "alternate": "w7 w8 w9"}
    out = tokenize_dataset([row], tiny_tokenizer, 64)[0]
    ids = lambda text: tiny_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = tiny_tokenizer("w1 w2", add_special_tokens=True)["input_ids"]
    eos = [tiny_tokenizer.eos_token_id]
    assert out["alternate_input_ids"] == prompt + ids("w7 w8 w9") + eos
    assert out["alternate_labels"] == [-100] * len(prompt) + ids("w7 w8 w9") + eos
    assert out["input_ids"] == prompt + ids("w3 w4") + eos  # the true answer is unchanged


def test_docs_table_lists_every_registered_loss():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "unlearning.md").read_text()
    section = text.split("## Losses (registry names)", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[2].strip().strip("`") for line in section.splitlines() if line.startswith("| ")}
    assert set(list_losses()) <= rows, set(list_losses()) - rows
    for setting in LOSS_DEFAULTS:  # every loss hyper-parameter is named in the table (or the anchor notes below it)
        assert f"`{setting}`" in section, setting
