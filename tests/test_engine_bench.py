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
        if r["engine"] == "thinkfast":  # what the step ran with, on a CPU: no graphs, eager unless asked
            assert (r["cuda_graphs"], r["compiled"]) == (False, False)
            assert r["onednn_products"] == 0  # the tiny preset's weights all stay on the default GEMM
        assert r["seconds_per_sample"] * r["batch_size"] * r["tokens_per_s"] == pytest.approx(r["batch_size"] * r["gen_len"], rel=0.01)
    text = md.read_text()
    assert "| teacher-hf | teacher | hf | 2 | 8 | 4 |" in text and "llamba / teacher" in text


@pytest.mark.parametrize("source,hf_class", [("tiny", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM"),
                                             ("qwen3", "Qwen3ForCausalLM")])
def test_hf_twin_of_the_teacher_has_the_same_logits(source, hf_class):
    """The HF row's model: a Llama twin, or a Qwen2 / Qwen3 one for a teacher with q, k, v biases / q, k norms."""
    from conftest import tiny_qwen2, tiny_qwen3

    from thinkfast.models import from_teacher

    if source == "tiny":
        teacher = build_models(PRESETS["tiny"], "teacher", "cpu", torch.float32)
    else:
        teacher = from_teacher({"qwen2": tiny_qwen2, "qwen3": tiny_qwen3}[source](vocab=260), kind="teacher")
    hf = to_hf_llama(teacher)
    assert type(hf).__name__ == hf_class
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
    assert main(["bench", "--configs", ""]) == 2  # an empty one ran the preset's defaults (minutes)
    assert "--configs '' names no configuration" in capsys.readouterr().err
    assert main(["bench", "--preset", "llama-1b", "--device", "cpu"]) == 2
    assert "sized for a GPU" in capsys.readouterr().err
    assert main(["bench", "--models", "teacher,teacher", "--configs", "1x4x4"]) == 2  # a ratio of a model to itself
    assert "--models names teacher twice" in capsys.readouterr().err
    # a decode state that cannot fit: the advice names bench's own setting, not sample's flags
    assert main(["bench", "--models", "teacher", "--configs", "10000000x1x1024", "--no-isolate"]) == 2
    err = capsys.readouterr().err
    assert "or a shorter GEN in --configs" in err and "--batch-size" not in err, err


def test_a_bench_with_no_row_to_time_leaves_the_previous_results(tmp_path, capsys):
    """Every planned row dropped (HF rows asked for with --no-hf, or above the preset's HF batch limit): refused
    before anything runs; the old table was replaced by an empty one, with exit 0."""
    out, js = tmp_path / "b.md", tmp_path / "b.json"
    out.write_text("OLD")
    js.write_text("[1]")
    assert main(["bench", "--models", "teacher-hf", "--no-hf", "--configs", "1x4x4", "--out", str(out),
                 "--json", str(js)]) == 2
    assert "--models teacher-hf is an HF generate() row, and --no-hf drops those" in capsys.readouterr().err
    assert main(["bench", "--preset", "llama-1b", "--models", "teacher-hf", "--configs", "512x8x8", "--out", str(out),
                 "--json", str(js)]) == 2
    err = capsys.readouterr().err
    assert "no row to time: teacher-hf at batch 512 is above the llama-1b preset's HF batch limit" in err, err
    assert out.read_text() == "OLD" and js.read_text() == "[1]"


def test_an_hf_students_rows_run_one_fp32_state(tmp_path):
    """generate() runs the model's own fp32 state: the preset's llamba-hf got a row per --ssm-state-dtype, labelled
    bf16 and run with fp32 (a checkpoint's HF rows already had one)."""
    js = tmp_path / "rows.json"
    assert main(["bench", "--models", "llamba,llamba-hf", "--configs", "1x4x4", "--no-isolate",
                 "--ssm-state-dtype", "float32,bfloat16", "--out", str(tmp_path / "rows.md"), "--json", str(js)]) == 0
    rows = [(r["model"], r["engine"], r["ssm_state_dtype"]) for r in json.loads(js.read_text())]
    assert rows == [("llamba", "thinkfast", "float32"), ("llamba (bfloat16 state)", "thinkfast", "bfloat16"),
                    ("llamba-hf", "hf", "float32")]


# ---------------------------------------------------------------------------------------------- --model checkpoints


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory):
    """A tiny teacher whose greedy choice is always its EOS (token 0: every logit is 0), and its Llamba student."""
    from thinkfast.models import ModelConfig, ThinkfastConfig, ThinkfastForCausalLM, from_teacher

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=64, max_position_embeddings=64,
                      attn_layers=[0, 1])
    teacher = ThinkfastForCausalLM(ThinkfastConfig.from_model_config(cfg, eos_token_id=0)).eval()
    with torch.no_grad():
        teacher.lm.norm.weight.zero_()
    root = tmp_path_factory.mktemp("ckpt")
    teacher.save_pretrained(root / "teacher")
    from_teacher(teacher, kind="llamba").save_pretrained(root / "student")
    return root / "teacher", root / "student"


def test_bench_times_saved_checkpoints_with_their_roles_and_exact_token_counts(tmp_path, saved_pair):
    from thinkfast.engine.engine import Engine
    from thinkfast.engine.sampling import SamplingParams
    from thinkfast.models.teacher import load_thinkfast

    teacher_dir, student_dir = saved_pair
    model, _ = load_thinkfast(str(teacher_dir))  # the premise: left to its EOS, the teacher stops at once
    done = list(Engine(model, None, max_len=16, batch_size=1, stop_ids=[0]).generate(
        [("p", [5, 6, 7])], n=1, params=SamplingParams(temperature=0.0, max_new_tokens=5)))
    assert done[0].gen_tokens == 1

    md, js = tmp_path / "models.md", tmp_path / "models.json"
    assert main(["bench", "--model", str(teacher_dir), "--model", str(student_dir), "--name", "llamba-1",
                 "--configs", "2x8x5,1x4x3", "--no-isolate", "--rounds", "2", "--out", str(md), "--json", str(js)]) == 0
    rows = json.loads(js.read_text())
    assert [(r["model"], r["role"], r["engine"], r["path"], r["batch_size"]) for r in rows] == [
        ("teacher", "teacher", "thinkfast", str(teacher_dir), 2), ("teacher-hf", "teacher", "hf", str(teacher_dir), 2),
        ("llamba-1", "llamba", "thinkfast", str(student_dir), 2),
        ("teacher", "teacher", "thinkfast", str(teacher_dir), 1), ("teacher-hf", "teacher", "hf", str(teacher_dir), 1),
        ("llamba-1", "llamba", "thinkfast", str(student_dir), 1)]
    for r in rows:
        assert KEYS <= set(r) and r["tokens_per_s"] > 0
        assert r["generated_tokens"] == r["batch_size"] * r["gen_len"]  # EOS ignored: exactly gen per sample
        assert r["rounds"] == 2
    text = md.read_text()
    assert "fastest of 2 rounds" in text and "--rounds 2" in text and "Every round (tokens/s, in order):" in text
    assert all(len(r["round_tokens_per_s"]) == 2 and r["tokens_per_s"] in r["round_tokens_per_s"] for r in rows)
    assert f"llamba-1 = `{student_dir}` (llamba)" in text and "llamba-1 / teacher" in text and "| llamba-1 | llamba | thinkfast | 1 | 4 | 3 |" in text


def test_hf_students_get_generate_rows_against_the_teachers(tmp_path, saved_pair, capsys):
    teacher_dir, student_dir = saved_pair
    md, js = tmp_path / "models.md", tmp_path / "models.json"
    assert main(["bench", "--model", str(teacher_dir), "--model", str(student_dir), "--name", "llamba-1", "--hf-students",
                 "--configs", "2x8x5", "--out", str(md), "--json", str(js)]) == 0
    rows = json.loads(js.read_text())
    assert [(r["model"], r["role"], r["engine"]) for r in rows] == [
        ("teacher", "teacher", "thinkfast"), ("teacher-hf", "teacher", "hf"), ("llamba-1", "llamba", "thinkfast"),
        ("llamba-1-hf", "llamba", "hf")]
    assert all(r["generated_tokens"] == 10 for r in rows)  # the student's generate() ignores its EOS too
    text = md.read_text()
    assert "llamba-1 in thinkfast / HF generate" in text and "llamba-1-hf / teacher-hf" in text and "--hf-students" in text

    js2 = tmp_path / "tiny.json"
    assert main(["bench", "--preset", "tiny", "--configs", "2x8x4", "--no-isolate", "--hf-students", "--models",
                 "llamba,teacher-hf,llamba-hf", "--out", str(tmp_path / "tiny.md"), "--json", str(js2)]) == 0
    assert [(r["model"], r["engine"]) for r in json.loads(js2.read_text())] == [
        ("llamba", "thinkfast"), ("teacher-hf", "hf"), ("llamba-hf", "hf")]
    assert main(["bench", "--model", str(student_dir), "--hf-students", "--no-hf", "--out", str(md)]) == 2
    assert "--hf-students" in capsys.readouterr().err and json.loads(js.read_text()) == rows


def test_checkpoint_row_in_its_own_process(tmp_path, saved_pair):
    js = tmp_path / "rows.json"
    assert main(["bench", "--model", str(saved_pair[1]), "--configs", "2x4x3", "--out", str(tmp_path / "m.md"),
                 "--json", str(js)]) == 0
    (row,) = json.loads(js.read_text())
    assert (row["model"], row["role"], row["generated_tokens"]) == ("student", "llamba", 6) and row["peak_mem_bytes"] >= 0


def test_bad_checkpoint_arguments_are_one_line_and_leave_results_alone(tmp_path, saved_pair, capsys):
    teacher_dir, student_dir = saved_pair
    out = tmp_path / "models.md"
    out.write_text("earlier results\n")
    base = ["bench", "--configs", "1x4x3", "--no-isolate", "--out", str(out)]

    def refused(*extra):
        assert main(base + list(extra)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and out.read_text() == "earlier results\n"
        return err

    assert "both give rows named 'teacher'" in refused("--model", str(teacher_dir), "--model", str(student_dir), "--name", "teacher")
    assert "'teacher-hf'" in refused("--model", str(teacher_dir), "--model", str(student_dir), "--name", "teacher-hf")
    assert "no such folder or file" in refused("--model", str(tmp_path / "missing"))
    (tmp_path / "notes").mkdir()
    assert "no config.json" in refused("--model", str(tmp_path / "notes"))
    assert "1000 positions" in refused("--model", str(teacher_dir), "--configs", "1x500x500")
    assert "after the --model it names" in refused("--name", "x", "--model", str(teacher_dir))
    assert "--models picks among the preset's" in refused("--model", str(teacher_dir), "--models", "teacher")


def test_rounds_alternate_the_models_and_keep_each_rows_fastest_pass(saved_pair, monkeypatch):
    from thinkfast.engine import bench
    from thinkfast.errors import ConfigError

    calls = []
    walls = {("teacher", 1): 2.0, ("student", 1): 1.0, ("teacher", 2): 1.5, ("student", 2): 3.0}

    def fake_row(**args):
        calls.append(args["which"])
        rnd = calls.count(args["which"])
        wall = walls[(args["which"], rnd)]
        if wall is None:
            return {"model": args["which"], "error": "out of memory"}
        return {"model": args["which"], "tokens_per_s": 1 / wall, "wall_seconds": wall, "seconds_per_sample": wall,
                "peak_mem_bytes": 0, "round_seen": rnd}

    monkeypatch.setattr(bench, "run_row", fake_row)

    def bench_two_rounds():
        calls.clear()
        return bench.run_bench(configs=[(1, 4, 3)], isolate=False, checkpoints=[(str(p), None) for p in saved_pair],
                               hf=False, rounds=2, log=lambda *a: None)

    rows = bench_two_rounds()
    assert calls == ["teacher", "student", "teacher", "student"]  # one pass over every model, then the next
    assert [(r["model"], r["wall_seconds"], r["round_seen"], r["rounds"]) for r in rows] == [
        ("teacher", 1.5, 2, 2), ("student", 1.0, 1, 2)]
    assert [r["round_tokens_per_s"] for r in rows] == [[1 / 2.0, 1 / 1.5], [1 / 1.0, 1 / 3.0]]  # every round, in order
    walls[("student", 2)] = None  # a round that fails fails the row, whatever the other rounds measured
    rows = bench_two_rounds()
    assert rows[1]["error"] == "out of memory" and rows[0]["wall_seconds"] == 1.5
    with pytest.raises(ConfigError, match="--rounds 0"):
        bench.run_bench(configs=[(1, 4, 3)], isolate=False, rounds=0)


def test_a_checkpoints_weights_are_not_counted_as_its_rows_memory(tmp_path):
    # a safetensors checkpoint loads memory-mapped: its weights' pages arrive on first read, during the row
    # (a 135M-parameter student read 100x the teacher's peak memory before they were read ahead of the baseline)
    from thinkfast.models import ModelConfig, ThinkfastConfig, ThinkfastForCausalLM

    # weights well above a row's own lazy allocations (first kernels, allocator arenas: ~30 MiB on Python 3.11,
    # ~60 on 3.13), so that counting them would show
    cfg = ModelConfig(vocab_size=64, d_model=1024, n_layers=4, n_heads=8, n_kv_heads=8, d_mlp=4096, attn_layers=[],
                      max_position_embeddings=64)
    model = ThinkfastForCausalLM(ThinkfastConfig.from_model_config(cfg, eos_token_id=0))
    model.save_pretrained(tmp_path / "student")
    del model
    weights = (tmp_path / "student" / "model.safetensors").stat().st_size
    assert weights > 250 * 2**20
    js = tmp_path / "rows.json"
    assert main(["bench", "--model", str(tmp_path / "student"), "--configs", "2x4x3", "--out", str(tmp_path / "m.md"),
                 "--json", str(js)]) == 0
    (row,) = json.loads(js.read_text())
    assert row["role"] == "llamba" and 0 <= row["peak_mem_bytes"] < weights / 2


def test_a_row_per_ssm_state_dtype_side_by_side(tmp_path, saved_pair, capsys):
    """--ssm-state-dtype float32,bfloat16: the student gets a row per state dtype (the teacher, which has no SSM
    state, one), with the state's bytes halved and its ratio to the same model's fp32-state row."""
    teacher_dir, student_dir = saved_pair
    md, js = tmp_path / "models.md", tmp_path / "models.json"
    assert main(["bench", "--model", str(teacher_dir), "--model", str(student_dir), "--name", "llamba-1", "--no-hf",
                 "--configs", "2x8x5", "--no-isolate", "--ssm-state-dtype", "float32,bfloat16",
                 "--out", str(md), "--json", str(js)]) == 0
    rows = json.loads(js.read_text())
    assert [(r["model"], r["ssm_state_dtype"]) for r in rows] == [
        ("teacher", "float32"), ("llamba-1", "float32"), ("llamba-1 (bfloat16 state)", "bfloat16")]
    fp32, bf16 = rows[1], rows[2]
    assert bf16["generated_tokens"] == 2 * 5 and bf16["state_bytes"] < fp32["state_bytes"]
    llamba = build_models(PRESETS["tiny"], "llamba", "cpu", torch.float32).lm  # the roofline's bytes: half the state's
    assert step_bytes(llamba, 64, 100, torch.bfloat16) < step_bytes(llamba, 64, 100)
    text = md.read_text()
    assert "llamba-1 (bfloat16 state) / llamba-1 tokens/s" in text and "--ssm-state-dtype float32,bfloat16" in text
    assert text.count(f"= `{student_dir}`") == 1  # the models line names each checkpoint once
    assert main(["bench", "--model", str(student_dir), "--configs", "2x8x5", "--no-isolate",
                 "--ssm-state-dtype", "bfloat16", "--out", str(md)]) == 0
    text = md.read_text()  # only a bf16 row: still the checkpoints' table, naming the checkpoint
    assert "checkpoints side by side" in text and f"student (bfloat16 state) = `{student_dir}`" in text
    before = md.read_bytes()
    assert main(["bench", "--model", str(student_dir), "--configs", "2x8x5", "--no-isolate",
                 "--ssm-state-dtype", "float32,int8", "--out", str(md)]) == 2
    assert "--ssm-state-dtype 'float32,int8'" in capsys.readouterr().err and md.read_bytes() == before


def test_state_ratios_name_each_pair_once():
    """Without a teacher row the first row is the reference: a model's fp32 row then is both the reference and
    the base of its own bf16 row, and their ratio is listed once."""
    from thinkfast.engine.bench import ratios

    def row(model, state, tps):
        return {"model": model, "role": "llamba", "engine": "thinkfast", "batch_size": 2, "prompt_len": 8, "gen_len": 5,
                "tokens_per_s": tps, "ssm_state_dtype": state}

    lines = ratios([row("llamba", "float32", 100.0), row("llamba (bfloat16 state)", "bfloat16", 120.0),
                    row("hybrid", "float32", 80.0), row("hybrid (bfloat16 state)", "bfloat16", 88.0)])
    assert len(lines) == len(set(lines)) == 4
    assert any("llamba (bfloat16 state) / llamba tokens/s = 1.20x" in x for x in lines)
    assert any("hybrid (bfloat16 state) / hybrid tokens/s = 1.10x" in x for x in lines)
