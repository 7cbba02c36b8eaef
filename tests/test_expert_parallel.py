"""transformers' expert parallelism (``DistributedConfig(ep_size=2, fsdp_size=2)``) on 2 CPU processes (gloo): what
the router hooks record, where the experts live, and that expert-selective training refuses it.

Run as a script (``torchrun --nproc_per_node 2 tests/test_expert_parallel.py MODEL OUT``) it is the job of the test.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
BATCH = (4, 10)  # 4 sequences; each of the 2 processes takes 2 of them (the data-parallel share under EP)


def _batch() -> torch.Tensor:
    return torch.randint(4, 100, BATCH, generator=torch.Generator().manual_seed(0))


def _has_expert_parallel() -> bool:
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        return False
    return "ep_size" in getattr(DistributedConfig, "__dataclass_fields__", {})


@pytest.mark.slow
@pytest.mark.skipif(not _has_expert_parallel(), reason="this transformers has no DistributedConfig(ep_size=...)")
def test_expert_parallel_routing_is_per_process_and_training_is_refused(tmp_path):
    from hf_moe_unlearn import tiny_moe_model
    from hf_moe_unlearn.routing import RouterRecorder

    model = tiny_moe_model("qwen3_moe")  # 4 experts per layer, top-2
    model.save_pretrained(tmp_path / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29731",
           str(HERE / "test_expert_parallel.py"), str(tmp_path / "model"), str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    ids = _batch()
    recorder = RouterRecorder(model)  # the reference: the whole batch on one process, no parallelism
    with torch.no_grad(), recorder:
        model(input_ids=ids)
    whole = recorder.raw_tensors()["hits"]
    for rank, seen in enumerate(ranks):
        # Each process's hooks see the routing of its own tokens over all 4 (global) expert ids...
        share = RouterRecorder(model)
        with torch.no_grad(), share:
            reference_logits = model(input_ids=ids[2 * rank: 2 * rank + 2]).logits
        assert seen["hits"] == share.raw_tensors()["hits"].tolist()
        assert seen["logits_sum"] == pytest.approx(float(reference_logits.sum()), abs=1e-4)
        # ... the layer is still read as 4 experts, while the experts module holds 2 of them.
        assert seen["num_experts"] == [4, 4] and seen["local_experts"] == [2, 2]
        # Each expert lives whole on one process: process r holds experts 2r and 2r + 1.
        assert seen["local_rows_are_global"] == [[2 * rank, 2 * rank + 1]] * 2
        assert "expert-parallel" in seen["adapter_error"]
    # ... and nothing sums them: each process has its share; their sum is the whole batch's (attribute_experts
    # sums over accelerate processes, which is what that needs).
    torch.testing.assert_close(torch.tensor(ranks[0]["hits"]) + torch.tensor(ranks[1]["hits"]), whole.float())


def _job(model_path: str, out: str) -> None:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    from hf_moe_unlearn import get_expert_peft_model
    from hf_moe_unlearn.errors import MoEUnlearnError
    from hf_moe_unlearn.moe.layers import find_moe_layers
    from hf_moe_unlearn.routing import RouterRecorder

    # ep_size=2 alone is refused (ep must divide fsdp_size * tp_size) and tp_size=2 needs a tensor-parallel plan
    # (the tiny config has none): EP over the 2 processes that FSDP-shard the dense weights.
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                 distributed_config=DistributedConfig(ep_size=2, fsdp_size=2))
    rank = dist.get_rank()
    layers = find_moe_layers(model)
    rows = []
    for layer in layers:
        weight = layer.experts.gate_up_proj  # a DTensor; to_local() is this process's slice
        full, local = weight.full_tensor(), weight.to_local()
        rows.append([next(e for e in range(full.shape[0]) if torch.equal(full[e], local[i])) for i in range(local.shape[0])])
    recorder = RouterRecorder(model)
    with torch.no_grad(), recorder:
        logits = model(input_ids=_batch()[2 * rank: 2 * rank + 2]).logits
    try:
        get_expert_peft_model(model, {layers[-1].index: [0]})
        adapter_error = ""
    except MoEUnlearnError as err:
        adapter_error = str(err)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"hits": recorder.raw_tensors()["hits"].tolist(), "logits_sum": float(logits.sum()),
                   "num_experts": [layer.num_experts for layer in layers],
                   "local_experts": [layer.experts.num_experts for layer in layers],
                   "local_rows_are_global": rows, "adapter_error": adapter_error}, f)


if __name__ == "__main__":
    _job(sys.argv[1], sys.argv[2])
