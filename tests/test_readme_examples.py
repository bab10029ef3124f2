"""The README's Python examples run as written, on a tiny stand-in for the Llama checkpoint they name (no network
here) and with their token budgets cut: imports, names and signatures must stay what the README shows."""

import re
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA, tiny_llama

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_has_the_examples_this_test_runs():
    blocks = _python_blocks()
    assert len(blocks) == 2
    assert "load_teacher(\"meta-llama/Llama-3.2-1B-Instruct\")" in blocks[0] and "distill(teacher" in blocks[1]


def test_the_readme_python_examples_run(tok, tmp_path, monkeypatch):
    gsm8k = SHARED_DATA / "gsm8k_train.jsonl"
    if not gsm8k.is_file():
        pytest.skip("../shared/data/gsm8k_train.jsonl not found")
    models, distilling = _python_blocks()
    teacher_dir = tmp_path / "llama"
    tiny_llama(vocab=len(tok), hidden=32, layers=9, heads=4, kv_heads=2).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    monkeypatch.chdir(tmp_path)
    models = models.replace("meta-llama/Llama-3.2-1B-Instruct", str(teacher_dir))
    distilling = distilling.replace("../shared/data/gsm8k_train.jsonl", f"{gsm8k}?limit=40")
    distilling, cut = re.subn(r"tokens=[\d_]+", "tokens=1_024", distilling)
    assert cut == 3
    distilling = distilling.replace("TrainConfig(tokens=1_024,", "TrainConfig(tokens=1_024, batch_size=2, seq_len=256,")
    scope: dict = {}
    exec(compile(models, "README.md: models", "exec"), scope)
    assert scope["out"].shape[1] > scope["tok"](["2 + 3 ="], return_tensors="pt")["input_ids"].shape[1]
    hybrid, saved = scope["hybrid"], scope["model"]
    assert hybrid.config.attn_layers == [3, 8] and scope["llamba"].config.attn_layers == []
    ids = torch.tensor([scope["tok"].encode("12 + 30 = 42")])
    with torch.no_grad():
        torch.testing.assert_close(saved(ids).logits, hybrid(ids).logits)
    exec(compile(distilling, "README.md: distillation", "exec"), scope)
    student = scope["student"]
    assert (tmp_path / "runs" / "llamba" / "config.json").is_file()
    assert student.config.attn_layers == [] and student.config.role == "llamba"
