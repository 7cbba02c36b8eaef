"""The reference cache (``cache_reference``): NPO/IdkDPO read the frozen model's sequence NLL of each example from a
cache filled the first time the example is seen, and train exactly as with a reference forward at every step.

Independent references: the same run with ``cache_reference=False`` (the per-step reference forward, as before the
cache), and the plain model deep-copied before the trainer wrapped it, whose log-probabilities are summed by hand.
Training is plain SGD (no Adam: after a few Adam steps every weight has moved by about ±lr whatever the gradient),
over three epochs of a forget set whose examples have different lengths, so later epochs put each example in another
batch with another padding length than the one its value was cached from.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass, field

import pytest
import torch
from transformers import TrainerCallback

from hf_moe_unlearn.config import MoEUnlearnConfig
from hf_moe_unlearn.errors import MoEUnlearnError
from hf_moe_unlearn.losses import REFERENCE_USES, get_loss_spec, npo_loss, register_loss, sequence_nll
from hf_moe_unlearn.losses.registry import unregister_loss
from hf_moe_unlearn.moe import tiny_moe_model
from hf_moe_unlearn.reference_cache import EXAMPLE_INDEX, ReferenceCache
from hf_moe_unlearn.trainer import MoEUnlearnTrainer, unwrap_peft

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 8 forget examples of 6..13 words: batches of 4 pad to different lengths in every epoch.
FORGET = [" ".join(f"w{(i * 3 + j) % 20}" for i in range(6 + j)) for j in range(8)]
RETAIN = [" ".join(f"w{40 + (i * 7 + j) % 80}" for i in range(5 + (j * 3) % 7)) for j in range(8)]
QA_FORGET = [{"prompt": " ".join(f"w{1 + (i + j) % 9}" for i in range(2 + j % 3)),
              "answer": " ".join(f"w{10 + (i * 5 + j) % 15}" for i in range(2 + j % 4)),
              "idk": " ".join(["w30"] * (1 + j % 2) + ["w31"])} for j in range(8)]
QA_RETAIN = [{"prompt": f"w{50 + j} w51", "answer": " ".join(f"w{60 + (i + j) % 30}" for i in range(2 + j % 3))}
             for j in range(8)]
EPOCHS, BATCH = 3, 4
STEPS_PER_EPOCH = len(FORGET) // BATCH
CLOSE = dict(rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ recorders
class _StepRecorder(TrainerCallback):
    """Per optimizer step: the gradients of the trainable parameters and the reference forwards run in the step
    (forwards of the model while its adapter is disabled, counted by a hook on the input embeddings)."""

    def __init__(self, trainer: MoEUnlearnTrainer) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.reference_forwards: list[int] = []
        self._inside = False
        self._count = 0
        peft_model = unwrap_peft(trainer.model)
        original = peft_model.disable_adapter
        recorder = self

        @contextmanager
        def counting_disable_adapter():
            with original():
                recorder._inside = True
                try:
                    yield
                finally:
                    recorder._inside = False

        peft_model.disable_adapter = counting_disable_adapter  # what the trainer's reference forward enters
        peft_model.get_input_embeddings().register_forward_pre_hook(self._seen)

    def _seen(self, module, args) -> None:
        self._count += self._inside

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()
                           if p.requires_grad and p.grad is not None})

    def on_step_end(self, args, state, control, **kwargs):
        self.reference_forwards.append(self._count)
        self._count = 0


@dataclass
class Run:
    trainer: MoEUnlearnTrainer
    reference: torch.nn.Module  # the plain model, deep-copied before the trainer wrapped it
    recorder: _StepRecorder
    forget_losses: list[torch.Tensor] = field(default_factory=list)
    retain_losses: list[torch.Tensor] = field(default_factory=list)


def _config(output_dir, cache: bool, forget_loss: str, retain_loss: str, **kw) -> MoEUnlearnConfig:
    return MoEUnlearnConfig(
        output_dir=str(output_dir), num_train_epochs=EPOCHS, per_device_train_batch_size=kw.pop("per_device", BATCH),
        optim="sgd", learning_rate=kw.pop("learning_rate", 1.0), lr_scheduler_type="constant", report_to="none",
        # no logging step: the retain top-k stability log runs one more adapter-disabled forward at each, which
        # would be counted with the reference forwards these tests count
        disable_tqdm=True, logging_steps=10_000, save_strategy="no", seed=0, anchor_loss_weight=0.0,
        forget_loss=forget_loss, retain_loss=retain_loss, cache_reference=cache, **kw)


def _train(tmp_path, tokenizer, cache: bool, forget_loss: str, retain_loss: str = "none", forget=FORGET,
           retain=RETAIN, **kw) -> Run:
    model = tiny_moe_model("qwen3_moe")
    reference = copy.deepcopy(model).eval()
    args = _config(tmp_path / f"out_{cache}", cache, forget_loss, retain_loss, use_cpu=True, **kw)
    trainer = MoEUnlearnTrainer(model, args, forget_dataset=forget, retain_dataset=retain if retain_loss != "none"
                                else None, processing_class=tokenizer, selection={1: [0, 2]})
    run = Run(trainer, reference, _StepRecorder(trainer))
    trainer.add_callback(run.recorder)
    for name, store in (("forget_loss_fn", run.forget_losses), ("retain_loss_fn", run.retain_losses)):
        loss_fn = getattr(trainer, name)
        if loss_fn is not None:
            setattr(trainer, name, _recording(loss_fn, store))
    trainer.train()
    assert len(run.forget_losses) == EPOCHS * STEPS_PER_EPOCH
    return run


def _recording(loss_fn, store: list[torch.Tensor]):
    def call(ctx):
        value = loss_fn(ctx)
        store.append(value.detach().clone())
        return value
    return call


def _assert_same_training(cached: Run, uncached: Run) -> None:
    """The same losses and gradients at every step: bit for bit in the first epoch (the same reference forward
    computed the values), to float rounding afterwards (values cached from other batches, other padding)."""
    first = STEPS_PER_EPOCH
    for step, (a, b) in enumerate(zip(cached.forget_losses, uncached.forget_losses)):
        if step < first:
            assert torch.equal(a, b), (step, a, b)
        torch.testing.assert_close(a, b, **CLOSE, msg=f"forget loss, step {step}")
    for step, (a, b) in enumerate(zip(cached.retain_losses, uncached.retain_losses)):
        torch.testing.assert_close(a, b, **CLOSE, msg=f"retain loss, step {step}")
    assert len(cached.recorder.grads) == len(uncached.recorder.grads) == EPOCHS * STEPS_PER_EPOCH
    for step, (a, b) in enumerate(zip(cached.recorder.grads, uncached.recorder.grads)):
        assert a.keys() == b.keys() and a
        for name in a:
            torch.testing.assert_close(a[name], b[name], **CLOSE, msg=f"{name}, step {step}")
    last = cached.recorder.grads[-1]
    assert all(g.abs().sum() > 0 for g in last.values()), "some trainable tensor got no gradient"


def _assert_trained_away_from_reference(run: Run) -> None:
    """The test is only meaningful if the model moved: its forget NLL must differ from the reference's by far more
    than the tolerance, so a cache holding the current model's value (or another example's) would be caught."""
    row = run.trainer.train_dataset[0]
    ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
    with torch.no_grad():
        now, _ = sequence_nll(run.trainer.model.eval()(input_ids=ids).logits, labels)
        start, _ = sequence_nll(run.reference(input_ids=ids).logits, labels)
    assert (now - start).abs().item() > 0.05, (now, start)


# ---------------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("forget_loss,retain_loss,cached_forwards", [
    ("npo", "none", 0),  # after the first epoch: no reference forward at all
    ("npo", "kl", 1),  # KL needs the reference's token logits of the retain batch: one forward a step, retain only
])
def test_npo_with_and_without_cache(tmp_path, tiny_tokenizer, forget_loss, retain_loss, cached_forwards):
    cached = _train(tmp_path, tiny_tokenizer, True, forget_loss, retain_loss)
    uncached = _train(tmp_path, tiny_tokenizer, False, forget_loss, retain_loss)
    _assert_same_training(cached, uncached)
    _assert_trained_away_from_reference(cached)
    per_step = 1 + (retain_loss == "kl")  # forget (+ retain) reference forwards of a step without the cache
    assert uncached.recorder.reference_forwards == [per_step] * (EPOCHS * STEPS_PER_EPOCH)
    assert cached.recorder.reference_forwards == ([per_step] * STEPS_PER_EPOCH
                                                  + [cached_forwards] * ((EPOCHS - 1) * STEPS_PER_EPOCH))
    cache = cached.trainer._reference_cache
    assert cache.known("forget") == len(FORGET) and cache.known("retain") == 0
    assert uncached.trainer._reference_cache is None


def test_idk_dpo_with_and_without_cache(tmp_path, tiny_tokenizer):
    """IdkDPO reads two reference values per example (true answer and IDK answer): both come from the cache."""
    kw = dict(forget=QA_FORGET, retain=QA_RETAIN, learning_rate=2.0)
    cached = _train(tmp_path, tiny_tokenizer, True, "idk_dpo", "nll", **kw)
    uncached = _train(tmp_path, tiny_tokenizer, False, "idk_dpo", "nll", **kw)
    _assert_same_training(cached, uncached)
    _assert_trained_away_from_reference(cached)
    assert uncached.recorder.reference_forwards == [2] * (EPOCHS * STEPS_PER_EPOCH)
    assert cached.recorder.reference_forwards == [2] * STEPS_PER_EPOCH + [0] * ((EPOCHS - 1) * STEPS_PER_EPOCH)
    cache = cached.trainer._reference_cache
    assert cache.known("forget") == cache.known("idk") == len(QA_FORGET)


def test_loss_reading_reference_logits_keeps_its_forward(tmp_path, tiny_tokenizer):
    """A user loss registered with requires=("reference",) and no `reference=` is taken to read token logits: it gets
    the reference forward at every step, cache on or off, and trains as the built-in (cached) NPO does."""

    @register_loss("npo_by_hand", kind="forget", requires=("forget_logits", "reference"))
    def npo_by_hand(ctx):
        labels = ctx.forget_batch["labels"]
        with torch.no_grad():
            ref, _ = sequence_nll(ctx.reference_logits("forget"), labels)
        return npo_loss(sequence_nll(ctx.forget_logits, labels)[0], ref, 0.1)

    try:
        assert get_loss_spec("npo_by_hand").reference == "logits"
        by_hand = _train(tmp_path, tiny_tokenizer, True, "npo_by_hand")
    finally:
        unregister_loss("npo_by_hand")
    builtin = _train(tmp_path, tiny_tokenizer, True, "npo")
    assert by_hand.recorder.reference_forwards == [1] * (EPOCHS * STEPS_PER_EPOCH)
    assert by_hand.trainer._reference_cache is None  # nothing asked for a sequence value
    _assert_same_training(builtin, by_hand)


# ------------------------------------------------------------------------------------- independent reference
def _hand_nll(model: torch.nn.Module, input_ids: list[int], labels: list[int]) -> tuple[float, int]:
    """−Σ log p(label_t | < t) over counted targets, of one example alone (no batch partner, no padding), in float64
    from the plain model's logits."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([input_ids])).logits[0].double()
    log_probs = torch.log_softmax(logits, dim=-1)
    total, count = 0.0, 0
    for t in range(1, len(labels)):
        if labels[t] != -100:
            total -= float(log_probs[t - 1, labels[t]])
            count += 1
    return total, count


def test_cached_values_are_the_plain_models_log_probabilities(tmp_path, tiny_tokenizer):
    run = _train(tmp_path, tiny_tokenizer, True, "idk_dpo", "nll", forget=QA_FORGET, retain=QA_RETAIN,
                 learning_rate=2.0)
    cache = run.trainer._reference_cache
    for split, prefix in (("forget", ""), ("idk", "idk_")):
        stored = cache.stored(split)
        assert sorted(stored) == list(range(len(QA_FORGET)))
        for index, (nll_sum, n_tokens) in stored.items():
            row = run.trainer.train_dataset[index]
            assert row[EXAMPLE_INDEX] == index
            expected, count = _hand_nll(run.reference, row[f"{prefix}input_ids"], row[f"{prefix}labels"])
            assert n_tokens == count
            assert nll_sum == pytest.approx(expected, rel=1e-5), (split, index)


# ------------------------------------------------------------------------------------------------ the cache
def test_cache_serves_known_rows_and_keeps_first_values():
    cache = ReferenceCache(4)
    calls = []

    def compute(values):
        def run():
            calls.append(values)
            return torch.tensor(values), torch.tensor([3.0] * len(values))
        return run

    first = cache.sequence_nll("forget", torch.tensor([2, 0]), compute([1.5, 2.5]))
    assert first[0].tolist() == [1.5, 2.5] and cache.known("forget") == 2
    served = cache.sequence_nll("forget", torch.tensor([0, 2, 0]), compute([9.0, 9.0, 9.0]))
    assert served[0].tolist() == [2.5, 1.5, 2.5] and served[1].tolist() == [3.0] * 3 and len(calls) == 1
    # A row unknown: the step's own values are returned; the known row keeps its first value.
    fresh = cache.sequence_nll("forget", torch.tensor([0, 3]), compute([7.0, 4.0]))
    assert fresh[0].tolist() == [7.0, 4.0] and cache.stored("forget") == {0: (2.5, 3.0), 2: (1.5, 3.0), 3: (4.0, 3.0)}
    assert cache.known("idk") == 0  # splits are separate
    with pytest.raises(MoEUnlearnError, match="example_index 4 is outside the 4 examples"):
        cache.sequence_nll("forget", torch.tensor([1, 4]), compute([0.0, 0.0]))


def test_cache_across_processes_decides_together_and_shares_values():
    """Two processes simulated: the other one's vote forces a forward here (FSDP/ZeRO-3 forwards are collectives),
    and the rows it computed (its shorter batch padded with index -1) are stored here too."""
    other = {"needs": True, "index": torch.tensor([5, 1, -1]), "values": torch.tensor([[50.0, 6.0], [10.0, 2.0],
                                                                                       [-1.0, -1.0]])}

    def any_process(flag: bool) -> bool:
        return flag or other["needs"]

    def gather(tensor: torch.Tensor) -> torch.Tensor:
        mine = torch.nn.functional.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, 3 - tensor.shape[0]), value=-1)
        theirs = other["index"] if tensor.dim() == 1 else other["values"]
        return torch.cat([mine, theirs])

    cache = ReferenceCache(8, any_process=any_process, gather=gather)
    computed = []

    def compute(values):
        def run():
            computed.append(values)
            return torch.tensor(values), torch.tensor([4.0] * len(values))
        return run

    cache.sequence_nll("forget", torch.tensor([0, 1]), compute([1.0, 2.0]))
    assert cache.stored("forget") == {0: (1.0, 4.0), 1: (2.0, 4.0), 5: (50.0, 6.0)}  # 1: this process's, first
    # Everything known here, but the other process still needs the reference: this one runs it too.
    cache.sequence_nll("forget", torch.tensor([5, 0]), compute([50.0, 1.0]))
    assert len(computed) == 2
    other["needs"] = False
    served = cache.sequence_nll("forget", torch.tensor([5, 1]), compute([0.0, 0.0]))
    assert len(computed) == 2 and served[0].tolist() == [50.0, 2.0] and served[1].tolist() == [6.0, 4.0]


# --------------------------------------------------------------------------------------------- declarations
def test_losses_declare_how_they_read_the_reference():
    assert REFERENCE_USES == ("logits", "sequence")
    assert get_loss_spec("npo").reference == get_loss_spec("idk_dpo").reference == "sequence"
    assert get_loss_spec("kl").reference == "logits"
    assert get_loss_spec("simnpo").reference is None and get_loss_spec("rmu_retain").reference is None
    try:
        register_loss("seq_only", kind="forget", reference="sequence")(lambda ctx: torch.tensor(0.0))
        assert get_loss_spec("seq_only").requires == ("reference",)  # declaring a use implies the requirement
    finally:
        unregister_loss("seq_only")
    with pytest.raises(MoEUnlearnError, match="reference='tokens' for loss 'x' must be one of logits, sequence"):
        register_loss("x", kind="forget", reference="tokens")


def test_collated_batches_carry_the_example_index(tmp_path, tiny_tokenizer):
    run_args = MoEUnlearnConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, report_to="none",
                                use_cpu=True, save_strategy="no", seed=0, forget_loss="npo")
    trainer = MoEUnlearnTrainer(tiny_moe_model("qwen3_moe"), run_args, forget_dataset=FORGET, retain_dataset=RETAIN,
                                processing_class=tiny_tokenizer, selection={1: [0]})
    seen = []
    for batch in trainer.get_train_dataloader():
        assert f"retain_{EXAMPLE_INDEX}" not in batch  # the pair's index keys the retain side too
        for row, index in enumerate(batch[EXAMPLE_INDEX].tolist()):
            expected = trainer.train_dataset[index]["input_ids"]
            assert batch["input_ids"][row, :len(expected)].tolist() == expected
            seen.append(index)
    assert sorted(seen) == list(range(len(FORGET)))


# ------------------------------------------------------------------------------------------- two processes
def _two_process_run(out: str) -> None:
    """Run by ``accelerate launch --num_processes 2`` (``python tests/test_reference_cache.py OUT``): the NPO run of
    the tests, each process at half the batch, cache on; writes the adapter and the cache's counts per process."""
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_tiny_tokenizer

    args = _config(out, True, "npo", "none", per_device=BATCH // 2)
    trainer = MoEUnlearnTrainer(tiny_moe_model("qwen3_moe"), args, forget_dataset=FORGET,
                                processing_class=make_tiny_tokenizer(), selection={1: [0, 2]})
    trainer.train()
    rank = trainer.accelerator.process_index
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    save_file({n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
              os.path.join(out, f"adapter{rank}.safetensors"))
    cache = trainer._reference_cache
    with open(os.path.join(out, f"cache{rank}.json"), "w") as f:
        json.dump({"computed": cache.computed, "served": cache.served, "known": cache.known("forget")}, f)


@pytest.mark.slow
def test_two_processes_share_the_cache_and_equal_one_uncached_process(tmp_path, tiny_tokenizer):
    """DDP over gloo, 2 processes x 2 examples: the sampler deals examples to the other process in later epochs, so
    each process stores what both computed; after the first epoch neither runs the reference, and the adapter equals
    the one-process run without the cache (~20 s)."""
    from safetensors.torch import load_file

    accelerate = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # No GPU here: --multi_gpu starts torchrun and MoEUnlearnConfig turns use_cpu on (DDP over gloo).
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", "29533", __file__, str(tmp_path / "two")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one = _train(tmp_path, tiny_tokenizer, False, "npo")
    expected = {n: p.detach() for n, p in one.trainer.model.named_parameters() if p.requires_grad}
    for rank in (0, 1):
        counts = json.loads((tmp_path / "two" / f"cache{rank}.json").read_text())
        steps = EPOCHS * STEPS_PER_EPOCH
        assert counts == {"computed": STEPS_PER_EPOCH, "served": steps - STEPS_PER_EPOCH, "known": len(FORGET)}
        adapter = load_file(str(tmp_path / "two" / f"adapter{rank}.safetensors"))
        assert adapter.keys() == expected.keys()
        for name, tensor in adapter.items():
            torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=name)


if __name__ == "__main__":
    _two_process_run(sys.argv[1])
