"""A damaged or hand-edited model folder: one line naming the file and the fix, exit 2, results already there kept."""

import json
import re
import shutil

import pytest

from thinkfast.cli import main
from thinkfast.embedded import embedded_teacher_dir
from thinkfast.errors import ConfigError
from thinkfast.models.config import ModelConfig

RG = "rg:basic_arithmetic?size=2&seed=1"


@pytest.fixture()
def model_copy(tmp_path):
    dest = tmp_path / "model"
    shutil.copytree(embedded_teacher_dir(), dest)
    return dest


def _one_line(capsys, *needles):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("key, value, words", [
    ("n_layers", "4", "must be an integer"), ("rms_norm_eps", "small", "must be a number"),
    ("attn_layers", [0.5], "must be a list of integers"), ("tie_embeddings", 1, "must be true or false"),
    ("head_dim", True, "must be an integer (or null)"),
])
def test_a_config_value_of_the_wrong_type_is_refused_naming_the_key(key, value, words):
    with pytest.raises(ConfigError, match=rf"{key}=.*{re.escape(words)}"):
        ModelConfig(**{key: value})


def test_a_hand_edited_config_names_the_file_and_the_key(model_copy, tmp_path, capsys):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["n_layers"] = "four"
    (model_copy / "config.json").write_text(json.dumps(cfg))
    assert main(["sample", "--model", str(model_copy), "--data", RG, "--n", "1", "--max-new-tokens", "2",
                 "--out", str(tmp_path / "s.jsonl")]) == 2
    _one_line(capsys, "config.json", "n_layers='four' must be an integer", "fix that value")
    assert not (tmp_path / "s.jsonl").exists()


@pytest.mark.parametrize("keep_bytes", [0, 100, 3_000_000])
def test_a_cut_weight_file_is_called_damaged_with_the_fix(model_copy, tmp_path, capsys, keep_bytes):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:keep_bytes])
    assert main(["sample", "--model", str(model_copy), "--data", RG, "--n", "1", "--max-new-tokens", "2",
                 "--out", str(tmp_path / "s.jsonl")]) == 2
    _one_line(capsys, f"--model {model_copy}", "damaged or incomplete", "re-download, re-copy or re-save")


def test_bench_with_a_checkpoint_that_does_not_load_keeps_the_previous_results(model_copy, tmp_path, capsys):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # its config reads, so the bench starts; its weights do not
    results = tmp_path / "models.md"
    results.write_text("previous results\n")
    assert main(["bench", "--model", str(embedded_teacher_dir()), "--model", str(model_copy), "--no-hf",
                 "--no-isolate", "--configs", "1x4x2", "--out", str(results)]) == 2
    _one_line(capsys, "damaged or incomplete", f"nothing written to {results}")
    assert results.read_text() == "previous results\n"
