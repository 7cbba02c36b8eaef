"""`hf-moe-unlearn attribute` end to end on a tiny saved model, and its one-line errors."""

import json
import subprocess
import sys

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from hf_moe_unlearn.cli import families_markdown, main
from hf_moe_unlearn.moe import tiny_moe_model


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from conftest import make_tiny_tokenizer

    path = tmp_path_factory.mktemp("model")
    tiny_moe_model("qwen3_moe").save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_attribute_seuf_and_trace(tmp_path, saved_model, capsys):
    forget = _write(tmp_path / "forget.txt", ["w1 w2 w3 w4 w1 w2", "w3 w4 w1 w2", "w2 w1 w3"])
    retain = tmp_path / "retain.jsonl"
    retain.write_text("\n".join(json.dumps({"text": t}) for t in ["w50 w60 w70", "w80 w90 w100 w110"]) + "\n")
    out = tmp_path / "out"
    assert main(["attribute", "--model", str(saved_model), "--forget", str(forget), "--retain", str(retain),
                 "--method", "seuf", "--output", str(out)]) == 0
    selection = json.loads((out / "selection.json").read_text())
    assert selection["method"] == "seuf" and sum(len(v) for v in selection["experts"].values()) == 1
    assert (out / "routing.png").stat().st_size > 1000
    assert "f_forget" in capsys.readouterr().out
    assert main(["attribute", "--model", str(saved_model), "--forget", str(forget), "--retain", str(retain),
                 "--method", "trace", "--rho", "1.0", "--tau", "0.5", "--output", str(out / "t")]) == 0
    trace = json.loads((out / "t" / "selection.json").read_text())
    assert trace["method"] == "trace" and set(trace["stats"]) == {"f_forget", "f_retain", "ratio"}


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_missing_file(tmp_path, saved_model, capsys):
    code = main(["attribute", "--model", str(saved_model), "--forget", str(tmp_path / "nope.txt"),
                 "--output", str(tmp_path / "o")])
    assert code == 2 and "does not exist" in _error_line(capsys)


def test_empty_dataset(tmp_path, saved_model, capsys):
    empty = _write(tmp_path / "empty.txt", ["", "  "])
    code = main(["attribute", "--model", str(saved_model), "--forget", str(empty), "--output", str(tmp_path / "o")])
    assert code == 2 and "forget set is empty" in _error_line(capsys)


def test_dense_model(tmp_path, capsys):
    from conftest import make_tiny_tokenizer

    dense = tmp_path / "dense"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 vocab_size=128)).save_pretrained(dense)
    make_tiny_tokenizer().save_pretrained(dense)
    forget = _write(tmp_path / "f.txt", ["w1 w2"])
    capsys.readouterr()
    code = main(["attribute", "--model", str(dense), "--forget", str(forget), "--output", str(tmp_path / "o")])
    assert code == 2 and "no Mixture-of-Experts layer" in _error_line(capsys)


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "hf_moe_unlearn.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "attribute" in result.stdout


def test_readme_family_table_is_generated_from_code():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert families_markdown() in readme, "README's family table is stale: paste `hf-moe-unlearn families` output"


def test_unlearn_cli_writes_standard_adapter(tmp_path, saved_model):
    forget = _write(tmp_path / "forget.txt", ["w1 w2 w3 w4 w1 w2", "w3 w4 w1 w2", "w2 w1 w3", "w5 w1 w2"])
    retain = _write(tmp_path / "retain.txt", ["w50 w60 w70", "w80 w90 w100 w110"])
    config = tmp_path / "cfg.yaml"
    config.write_text("forget_loss: npo\nretain_loss: kl\nmax_steps: 2\nper_device_train_batch_size: 2\n")
    out = tmp_path / "out"
    code = main(["unlearn", "--model", str(saved_model), "--forget", str(forget), "--retain", str(retain),
                 "--config", str(config), "--output_dir", str(out), "--anchor_loss_weight", "0",
                 "--retain_weighting", "trace", "--selection_method", "trace", "--trace_rho", "1.0",
                 "--trace_tau", "0.5", "--report_to", "none", "--use_cpu", "true", "--save_strategy", "no",
                 "--disable_tqdm", "true"])
    assert code == 0
    files = set(p.name for p in out.iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "selection.json", "unlearn_config.json",
            "trainer_state.json", "README.md"} <= files
    config_used = json.loads((out / "unlearn_config.json").read_text())
    assert config_used["forget_loss"] == "npo" and config_used["retain_loss"] == "kl"
    assert config_used["retain_weighting"] == "trace" and config_used["anchor_loss_weight"] == 0
    # loads in plain PEFT, in a process that never imports hf_moe_unlearn
    script = (
        "import sys, torch; from transformers import AutoModelForCausalLM; from peft import PeftModel;"
        f"m = AutoModelForCausalLM.from_pretrained({str(saved_model)!r});"
        f"p = PeftModel.from_pretrained(m, {str(out)!r});"
        "print(p(torch.tensor([[1, 5, 6]])).logits.shape);"
        "assert 'hf_moe_unlearn' not in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
