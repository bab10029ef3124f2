"""Bad input to the commands that write results: one line, exit 2, nothing already there replaced."""

import json

from thinkfast.cli import main


def _record(pid, j, model="teacher", config="aaaa", correct=True):
    return {"problem_id": pid, "sample_idx": j, "model": model, "role": "teacher", "completion": "#### 2",
            "answer": "2", "gold": "2", "kind": "number", "correct": correct, "grade_error": None, "reward": None,
            "gen_tokens": 3, "prompt_tokens": 5, "seconds": 0.01, "seed": j, "finish_reason": "eos",
            "hardware": "cpu", "config": config}


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _one_line_error(capsys, needle):
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


def test_report_refuses_two_runs_under_one_model_name(tmp_path, capsys):
    a = _write(tmp_path / "a.jsonl", [_record("p1", j) for j in range(2)])
    b = _write(tmp_path / "b.jsonl", [_record("p1", j, config="bbbb") for j in range(4)])
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "rep")]) == 2
    _one_line_error(capsys, "two sampling configurations")
    assert not (tmp_path / "rep").exists()
    c = _write(tmp_path / "c.jsonl", [_record("p1", j, model="other", config="bbbb") for j in range(2)])
    assert main(["report", str(a), str(c), "--out", str(tmp_path / "rep")]) == 0  # other names: two models


def test_train_rm_never_replaces_what_its_out_names(tmp_path, capsys):
    samples = _write(tmp_path / "s.jsonl", [_record(f"p{i}", j, correct=j == 0) for i in range(2) for j in range(2)])
    before = samples.read_bytes()
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for out, needle in ((samples, "a file is there"), (model, "holds other files")):
        assert main(["train-rm", "--samples", str(samples), "--backbone", str(model), "--out", str(out)]) == 2
        _one_line_error(capsys, needle)
    assert samples.read_bytes() == before and (model / "config.json").read_text() == "{}"
    assert main(["train-rm", "--samples", str(samples), "--backbone", str(model), "--out", str(tmp_path / "rm"),
                 "--l2", "-1"]) == 2
    _one_line_error(capsys, "--l2 -1")


def test_bench_checks_its_flags_before_running_and_keeps_old_results(tmp_path, capsys):
    old = tmp_path / "tiny.md"
    old.write_text("previous results\n")
    for extra, needle in ((["--dtype", "fp64x"], "dtype 'fp64x'"), (["--device", "gpu"], "is not a device"),
                          (["--repeats", "0"], "--repeats 0")):
        assert main(["bench", "--preset", "tiny", "--out", str(old), *extra]) == 2
        _one_line_error(capsys, needle)
    assert old.read_text() == "previous results\n"
    assert main(["bench", "--preset", "tiny", "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "a folder is there")


def test_distill_with_a_bad_device_leaves_no_run_behind(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", "--teacher", "t", "--stages", "sft", "--tokens", "8", "--device", "gpu", "--out", str(out)]) == 2
    _one_line_error(capsys, "is not a device")
    assert not out.exists()


def test_demo_refuses_a_teacher_that_is_not_a_model_before_recording_it(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--teacher", str(tmp_path / "nope"), "--out", str(out), "--no-progress"]) == 2
    _one_line_error(capsys, "no such folder")
    assert not (out / "demo.json").exists()
    (tmp_path / "f.jsonl").write_text("x")
    assert main(["demo", "--quick", "--out", str(tmp_path / "f.jsonl"), "--no-progress"]) == 2
    _one_line_error(capsys, "a file is there")
