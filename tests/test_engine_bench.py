"""`thinkfast bench`: rows, files, the HF twin of the teacher, the roofline's byte count."""

import json

import pytest
import torch

from thinkfast.cli import main
from thinkfast.engine.bench import PRESETS, build_models, step_bytes, to_hf_llama

KEYS = {"model", "role", "engine", "batch_size", "prompt_len", "gen_len", "tokens_per_s", "seconds_per_sample", "peak_mem_bytes"}




def test_bench_writes_markdown_and_json_rows(tmp_path):
    md, js = tmp_path / "tiny.md", tmp_path / "tiny.json"
    assert main(["bench", "--preset", "tiny", "--configs", "2x8x4", "--no-isolate", "--out", str(md), "--json", str(js)]) == 0
    rows = json.loads(js.read_text())
    assert [(r["model"], r["role"], r["engine"]) for r in rows] == [
        ("teacher", "teacher", "thinkfast"), ("llamba", "llamba", "thinkfast"), ("hybrid", "hybrid", "thinkfast"), ("teacher-hf", "teacher", "hf")]
    for r in rows:
        assert KEYS <= set(r) and r["tokens_per_s"] > 0 and r["peak_mem_bytes"] >= 0
        assert (r["batch_size"], r["prompt_len"], r["gen_len"]) == (2, 8, 4)
        assert r["seconds_per_sample"] * r["batch_size"] * r["tokens_per_s"] == pytest.approx(r["batch_size"] * r["gen_len"], rel=0.01)
    text = md.read_text()
    assert "| teacher-hf | teacher | hf | 2 | 8 | 4 |" in text and "llamba / teacher" in text


def test_hf_twin_of_the_teacher_has_the_same_logits():
    teacher = build_models(PRESETS["tiny"], "teacher", "cpu", torch.float32)
    hf = to_hf_llama(teacher)
    ids = torch.randint(0, 260, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, teacher(ids).logits, rtol=0, atol=1e-4)


def test_step_bytes_grow_with_context_for_attention_only():
    teacher = build_models(PRESETS["tiny"], "teacher", "meta", torch.float32).lm
    llamba = build_models(PRESETS["tiny"], "llamba", "cpu", torch.float32).lm
    assert step_bytes(teacher, 64, 1000) > step_bytes(teacher, 64, 100)
    assert step_bytes(llamba, 64, 1000) == step_bytes(llamba, 64, 100)
    # KV bytes per row per layer at context c: 2 (k, v) x 2 kv heads x 32 dims x 4 bytes x (c + 1)
    assert step_bytes(teacher, 1, 101) - step_bytes(teacher, 1, 100) == 6 * 2 * 2 * 32 * 4


def test_bad_bench_arguments(capsys):
    assert main(["bench", "--preset", "huge"]) == 2
    assert "use one of tiny, llama-1b" in capsys.readouterr().err
    assert main(["bench", "--configs", "64x80"]) == 2
    assert "BATCHxPROMPTxGEN" in capsys.readouterr().err
    assert main(["bench", "--preset", "llama-1b", "--device", "cpu"]) == 2
    assert "sized for a GPU" in capsys.readouterr().err
