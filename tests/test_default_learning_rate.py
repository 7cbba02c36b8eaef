"""An unset learning rate is picked by what trains (issue 10.5): LoRA on a few experts needs ~10x LoRA on all."""

import pytest

from conftest import make_tiny_tokenizer
from hf_moe_unlearn.config import MoEUnlearnConfig
from hf_moe_unlearn.errors import MoEUnlearnError
from hf_moe_unlearn.moe import tiny_moe_model
from hf_moe_unlearn.trainer import MoEUnlearnTrainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FORGET = [" ".join(f"w{(i * 3) % 20}" for i in range(j, j + 10)) for j in range(8)]
RETAIN = [" ".join(f"w{40 + (i * 7) % 80}" for i in range(j, j + 10)) for j in range(8)]


def _lr_used(tmp_path, selection, **kw) -> float:
    """The learning rate the optimizer actually ran with (constant schedule, one step)."""
    args = MoEUnlearnConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4,
                            report_to="none", disable_tqdm=True, use_cpu=True, save_strategy="no",
                            lr_scheduler_type="constant", **kw)
    trainer = MoEUnlearnTrainer(tiny_moe_model("qwen3_moe"), args, forget_dataset=FORGET, retain_dataset=RETAIN,
                                processing_class=make_tiny_tokenizer(), selection=selection)
    trainer.train()
    return trainer.optimizer.param_groups[0]["lr"]


def test_unset_learning_rate_depends_on_adapter_and_selection(tmp_path):
    num_experts = tiny_moe_model("qwen3_moe").config.num_experts
    every = {0: list(range(num_experts)), 1: list(range(num_experts))}
    # The documented table (config.DEFAULT_LEARNING_RATES, docs/unlearning.md), written out by hand here.
    assert _lr_used(tmp_path, {1: [2]}) == pytest.approx(2e-2)
    assert _lr_used(tmp_path, every) == pytest.approx(6e-3)
    assert _lr_used(tmp_path, {0: list(range(num_experts)), 1: [0]}) == pytest.approx(2e-2)  # not every layer full
    assert _lr_used(tmp_path, {1: [2]}, adapter="full") == pytest.approx(6e-3)
    assert _lr_used(tmp_path, {1: [2]}, learning_rate=3e-4) == pytest.approx(3e-4)  # a given one is kept


def test_non_positive_learning_rate_is_refused():
    with pytest.raises(MoEUnlearnError, match="learning_rate=0.0 must be > 0"):
        MoEUnlearnConfig(output_dir="unused", learning_rate=0.0, report_to="none")
