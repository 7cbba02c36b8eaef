"""routing_diagnostics reports the selected experts' forget/retain shares, as the recorder measures them."""

import pytest

from hf_moe_unlearn.evaluation import get_metric
from hf_moe_unlearn.moe import tiny_moe_model
from hf_moe_unlearn.routing import attribute_experts


def test_routing_diagnostics_before_after(tiny_tokenizer):
    before, after = tiny_moe_model("qwen3_moe", seed=0), tiny_moe_model("qwen3_moe", seed=1)
    forget, retain = ["w1 w2 w3 w4", "w5 w6 w7"], ["w50 w60 w70", "w80 w90"]
    result = get_metric("routing_diagnostics")(after, tiny_tokenizer, forget, retain, {1: [2], 0: [0]},
                                               model_before=before)
    row = result["experts"]["L1E2"]
    expected_after = attribute_experts(after, forget, tiny_tokenizer, show_progress=False).frequency(1)[2]
    expected_before = attribute_experts(before, forget, tiny_tokenizer, show_progress=False).frequency(1)[2]
    retain_after = attribute_experts(after, retain, tiny_tokenizer, show_progress=False).frequency(1)[2]
    assert row["forget_after"] == pytest.approx(expected_after)
    assert row["forget_before"] == pytest.approx(expected_before)
    assert row["retain_after"] == pytest.approx(retain_after)
    assert row["forget_ratio"] == pytest.approx(expected_after / expected_before)
    assert set(result["experts"]) == {"L0E0", "L1E2"}
    assert "mean_forget_ratio" in result
