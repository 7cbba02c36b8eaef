"""Every recipe in examples/recipes runs end to end through the CLI on a tiny model of its family (issue 13.2).

The recipe's own config file is used (`--config`); only what cannot run here is overridden on the command line:
the model (a tiny random one of the same family), the data (prepare_data.py on local copies of the Hub files), the
output folder, the number of steps, the batch and the precision. The test then checks that the saved run used the
recipe's method settings (losses, selection, adapter, anchor, weighting, learning rate), not defaults.
"""

import json
import os
import runpy
from pathlib import Path

import pytest
import yaml

from conftest import make_tiny_tokenizer
from hf_moe_unlearn.cli import main
from hf_moe_unlearn.moe import tiny_moe_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECIPES = Path(__file__).resolve().parents[1] / "examples" / "recipes"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hub"
#: Hub model of a recipe -> the tiny family that stands in for it (the model's config.json "model_type").
FAMILY = {
    "Qwen/Qwen1.5-MoE-A2.7B": "qwen2_moe",
    "deepseek-ai/DeepSeek-V2-Lite": "deepseek_v2",
    "allenai/OLMoE-1B-7B-0924": "olmoe",
    "openai/gpt-oss-20b": "gpt_oss",
}
#: What the data name in a recipe's forget path is prepared from (prepare_data.py's sources, local copies).
DATA_DIRS = {"wmdp_cyber": FIXTURES / "wmdp-corpora", "muse_books": FIXTURES / "MUSE-Books"}
#: The settings that make a recipe the method it says it is: each must reach the saved run unchanged.
METHOD_KEYS = ("forget_loss", "retain_loss", "retain_loss_weight", "selection_method", "seuf_top_m", "adapter",
               "train_router", "anchor_loss_weight", "anchor_form", "retain_weighting", "npo_beta", "learning_rate",
               "stop_at_holdout", "max_retain_nll_rise", "lora_r")

recipes = sorted(p.name for p in RECIPES.iterdir() if (p / "config.yaml").is_file())


def test_every_recipe_has_a_readme_and_a_known_family():
    assert len(recipes) == 5, recipes
    for name in recipes:
        config = yaml.safe_load((RECIPES / name / "config.yaml").read_text())
        assert config["model"] in FAMILY, (name, config["model"])
        readme = (RECIPES / name / "README.md").read_text()
        assert f"--config examples/recipes/{name}/config.yaml" in readme
        assert "hf-moe-unlearn evaluate" in readme and "GPU memory" in readme


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe_data")
    prepare = runpy.run_path(str(RECIPES / "prepare_data.py"))["prepare"]
    return {data: prepare(data, str(root / data), data_dir=str(DATA_DIRS[data])) for data in DATA_DIRS}


def test_prepare_data_writes_the_hub_documents(prepared):
    forget = [json.loads(line)["text"] for line in Path(prepared["wmdp_cyber"]["forget"]).read_text().splitlines()]
    expected = [json.loads(line)["text"] for line in
                (FIXTURES / "wmdp-corpora" / "cyber-forget-corpus" / "train-00000-of-00001.jsonl").read_text().splitlines()]
    assert forget == [t for t in expected if t.strip()] and forget
    assert set(prepared["muse_books"]) == {"forget", "retain", "holdout"}


@pytest.mark.parametrize("name", recipes)
def test_recipe_runs_on_a_tiny_model_of_its_family(name, prepared, tmp_path, capsys):
    config = yaml.safe_load((RECIPES / name / "config.yaml").read_text())
    family = FAMILY[config["model"]]
    model_dir = tmp_path / family
    tiny_moe_model(family).save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    data = Path(config["forget"]).parent.name  # data/<name>/forget.jsonl
    files = prepared[data]
    flags = ["--model", str(model_dir), "--forget", files["forget"], "--retain", files["retain"],
             "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--num_train_epochs", "1",
             "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_length", "32",
             "--bf16", "false", "--use_cpu", "true", "--disable_tqdm", "true", "--save_steps", "2",
             "--eval_steps", "1", "--attribution_max_tokens", "2000"]
    if "holdout" in config:
        flags += ["--holdout", files["holdout"]]
    if config.get("selection_method") == "trace":  # a random tiny model routes forget and retain text alike
        flags += ["--trace_rho", "1.0"]
    assert main(["unlearn", "--config", str(RECIPES / name / "config.yaml"), *flags]) == 0, capsys.readouterr().err
    saved = json.loads((tmp_path / "out" / "unlearn_config.json").read_text())
    for key in METHOD_KEYS:
        if key in config:
            assert saved[key] == config[key], (name, key, saved[key], config[key])
    selection = json.loads((tmp_path / "out" / "selection.json").read_text())
    assert selection["experts"], name
    if config.get("selection_method") == "seuf" and config.get("seuf_top_m") == 1:
        assert sum(len(e) for e in selection["experts"].values()) == 1, selection["experts"]
    assert os.path.isfile(tmp_path / "out" / "adapter_model.safetensors")


def test_mxfp4_checkpoints_load_dequantized(tmp_path):
    """GPT-OSS Hub checkpoints are MXFP4: the CLI asks transformers to dequantize them (trainable experts)."""
    from transformers import Mxfp4Config

    from hf_moe_unlearn.cli import _trainable_quantization
    from hf_moe_unlearn.moe import tiny_moe_config

    config = tiny_moe_config("gpt_oss")
    config.save_pretrained(tmp_path / "plain")
    assert _trainable_quantization(str(tmp_path / "plain")) == {}
    config.quantization_config = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    config.save_pretrained(tmp_path / "mxfp4")
    chosen = _trainable_quantization(str(tmp_path / "mxfp4"))["quantization_config"]
    assert isinstance(chosen, Mxfp4Config) and chosen.dequantize is True


@pytest.mark.parametrize("text,message", [
    (None, r"The --config file .*missing.yaml does not exist"),
    ("model: [\n", r"The --config file .*bad.yaml is not valid YAML: .*line 2"),
    ("- a\n", r"The --config file .*bad.yaml: Config file .* must contain a YAML mapping\. Each key"),
    ("model: m\nforget: f\nanchor_los_weight: 1\n", r"Unknown arguments from config file: \['--anchor_los_weight'"),
])
def test_bad_config_file_is_one_line(tmp_path, capsys, text, message):
    import re

    path = tmp_path / ("missing.yaml" if text is None else "bad.yaml")
    if text is not None:
        path.write_text(text)
    assert main(["unlearn", "--config", str(path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and re.search(message, err[0]), err
