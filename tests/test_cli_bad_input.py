"""Bad input to the commands that write results: one line, exit 2, nothing already there replaced."""

import json
from pathlib import Path

import pytest

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


def _argparse_refuses(capsys, argv, needle):
    """argparse type errors: one `error:` line (no usage block); exit 2 before any work."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert f"thinkfast {argv[0]}: error:" in err and "(see thinkfast" in err


def test_a_value_starting_with_a_dash_is_shown_how_to_pass(tmp_path, capsys):
    """argparse reads `-1,2` as an option and says the flag got no value: the line says to write `--flag=-1,2`."""
    distill = ["distill", "--teacher", str(tmp_path), "--data", "gsm8k:x", "--out", str(tmp_path / "run")]
    _argparse_refuses(capsys, distill + ["--data-weights", "-1,2"], "goes after '=': --data-weights=-1,2")
    _argparse_refuses(capsys, ["sample", "--model", "m", "--stop", "-x"], "--stop=-x")
    with pytest.raises(SystemExit):  # no value at all: no hint about dashes
        main(distill + ["--data-weights"])
    assert "goes after '='" not in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_numeric_flags_of_report_score_and_train_rm_refuse_nonsense(tmp_path, capsys):
    samples = _write(tmp_path / "s.jsonl", [_record("p1", j) for j in range(2)])
    before = samples.read_bytes()
    rep = ["report", str(samples), "--out", str(tmp_path / "rep")]
    for flag, value in (("--wall-seconds", "-5"), ("--wall-seconds", "0")):
        _argparse_refuses(capsys, rep + [flag, value], f"argument {flag}: {value} must be a number above 0")
    _argparse_refuses(capsys, rep + ["--wall-seconds", "nan"], "argument --wall-seconds: nan is not a finite number")
    _argparse_refuses(capsys, rep + ["--seed", "-1"], "argument --seed: -1 must be 0 or more")  # numpy refuses it later
    _argparse_refuses(capsys, ["score", str(samples), "--grade-timeout", "-1"], "argument --grade-timeout: -1 must be a number above 0")
    _argparse_refuses(capsys, ["score", str(samples), "--grade-timeout", "soon"], "argument --grade-timeout: 'soon' is not a number")
    rm = ["train-rm", "--samples", str(samples), "--backbone", str(tmp_path), "--out", str(tmp_path / "rm")]
    _argparse_refuses(capsys, rm + ["--lr", "0"], "argument --lr: 0 must be a number above 0")
    _argparse_refuses(capsys, rm + ["--train-layers", "-1"], "argument --train-layers: -1 must be 0 or more")
    _argparse_refuses(capsys, rm + ["--seed", "-3"], "argument --seed: -3 must be 0 or more")
    assert main(rm + ["--l2", "inf"]) == 2
    _one_line_error(capsys, "--l2 inf")
    assert not (tmp_path / "rep").exists() and not (tmp_path / "rm").exists() and samples.read_bytes() == before


@pytest.mark.parametrize("correct", [True, False])
def test_train_rm_refuses_one_class_labels_before_loading_the_backbone(tmp_path, capsys, monkeypatch, correct):
    import thinkfast.eval.scoring as scoring

    def never(*a, **k):
        raise AssertionError("the backbone was loaded before the labels were checked")

    monkeypatch.setattr(scoring, "load_backbone", never)
    samples = _write(tmp_path / "s.jsonl", [_record(f"p{i}", j, correct=correct) for i in range(2) for j in range(2)])
    assert main(["train-rm", "--samples", str(samples), "--backbone", str(tmp_path), "--out", str(tmp_path / "rm")]) == 2
    _one_line_error(capsys, f"all 4 graded completions are {'correct' if correct else 'wrong'}")


@pytest.mark.parametrize("command", [["train-teacher"], ["distill", "--teacher", "t", "--stages", "sft", "--tokens", "8"],
                                     ["sft", "--model", "m", "--tokens", "8"]])
def test_resume_on_a_missing_folder_is_refused_by_every_training_command(tmp_path, capsys, command):
    out = tmp_path / "never-made"
    assert main(command + ["--out", str(out), "--resume", "--no-progress"]) == 2
    _one_line_error(capsys, f"--resume: nothing to resume at {out} (no such folder); drop --resume to start a run there")
    assert not out.exists()
    out.mkdir()  # there but empty: no run in it either
    assert main(command + ["--out", str(out), "--resume", "--no-progress"]) == 2
    _one_line_error(capsys, "holds no run to resume (no run.json); drop --resume to start one")
    assert not any(out.iterdir())


def test_a_bad_data_spec_is_refused_before_the_teacher_loads(tmp_path, capsys, monkeypatch):
    import thinkfast.models.teacher as teacher

    def never(*a, **k):
        raise AssertionError("the model was loaded before the data spec was checked")

    monkeypatch.setattr(teacher, "load_thinkfast", never)
    for spec, says in (("rg:chain_sum?size=abc", "size='abc' is not an integer"), ("rg:chain_sum?limit=-1", "limit=-1 must be at least 1")):
        assert main(["distill", "--teacher", "t", "--stages", "kd", "--tokens", "8", "--data", spec, "--out", str(tmp_path / "r")]) == 2
        _one_line_error(capsys, f"data spec {spec!r}: {says}")
    assert not (tmp_path / "r").exists()


@pytest.fixture()
def offline_empty_cache(tmp_path, monkeypatch):
    """No hub, and a Hugging Face cache with nothing in it."""
    import huggingface_hub.constants

    import thinkfast.models.teacher as teacher

    monkeypatch.setattr(teacher, "hub_reachable", lambda: False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "hf-cache"


def test_a_name_that_is_neither_a_path_nor_cached_fails_at_once_naming_its_flag(tmp_path, capsys, offline_empty_cache):
    import time

    asset = str(Path(__file__).resolve().parent.parent / "thinkfast" / "assets" / "tiny-teacher")
    data = ["--data", "rg:chain_sum?size=2", "--tokens", "8", "--no-progress"]
    cases = [
        (["sample", "--model", "nope", "--data", "rg:chain_sum?size=2", "--out", str(tmp_path / "s.jsonl"), "--quiet"], "--model nope"),
        (["distill", "--teacher", "nope", "--stages", "kd", *data, "--out", str(tmp_path / "d1")], "--teacher nope"),
        (["distill", "--teacher", asset, "--student", "org/nope", "--stages", "kd", *data, "--out", str(tmp_path / "d2")], "--student org/nope"),
        (["sft", "--model", "nope", *data, "--out", str(tmp_path / "d3")], "--model nope"),
    ]
    for argv, role in cases:
        t0 = time.perf_counter()
        assert main(argv) == 2
        took = time.perf_counter() - t0
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Retry" not in err, err  # was ~30 s of connection retries, then "teacher nope"
        assert f"error: {role}: no such folder or file, and no hub model of that name in the local cache" in err, err
        assert took < 20, took  # was >= 23 s per case; the distill cases load the tiny teacher first


def test_a_cached_hub_id_loads_offline(tmp_path, offline_empty_cache):
    import shutil

    from thinkfast.models.teacher import hub_kwargs, load_thinkfast

    snap = offline_empty_cache / "models--org--tiny" / "snapshots" / "abc"
    shutil.copytree(Path(__file__).resolve().parent.parent / "thinkfast" / "assets" / "tiny-teacher", snap)
    (offline_empty_cache / "models--org--tiny" / "refs").mkdir()
    (offline_empty_cache / "models--org--tiny" / "refs" / "main").write_text("abc")
    assert hub_kwargs("org/tiny", "--model") == {"local_files_only": True}
    model, tok = load_thinkfast("org/tiny", where="--model")
    assert model.config.role == "teacher" and tok is not None


@pytest.mark.parametrize("flags, needle", [
    (["--grad-clip", "-1"], "grad_clip=-1.0 must be a finite number >= 0"),
    (["--warmup", "nan"], "warmup=nan must be a finite number >= 0"),
    (["--decay", "1.5"], "decay=1.5 must be between 0 and 1"),
    (["--min-lr-ratio", "-0.1"], "min_lr_ratio=-0.1 must be between 0 and 1"),
    (["--weight-decay", "inf"], "weight_decay=inf must be a finite number >= 0"),
    (["--seed", "-3"], "seed=-3 must be >= 0"),
    (["--temperature", "nan"], "temperature nan must be a finite number > 0"),
    (["--ce-weight", "nan"], "ce_weight nan must be a finite number >= 0"),
    (["--tokens-per-chunk", "0"], "chunk_tokens=0 must be at least 1"),
])
def test_training_settings_out_of_range_are_refused_before_any_model_loads(tmp_path, capsys, flags, needle):
    # "t" is no model: reaching the loader would fail with another message
    out = tmp_path / "run"
    assert main(["distill", "--teacher", "t", "--stages", "kd", "--tokens", "8", *flags, "--out", str(out)]) == 2
    _one_line_error(capsys, needle)
    assert not out.exists()


@pytest.mark.parametrize("value, needle", [("nan", "nan is not a finite number"), ("-1", "-1 must be 0 or more"),
                                           ("hot", "'hot' is not a number")])
def test_demo_temperature_is_checked_before_the_run_records_it(tmp_path, capsys, value, needle):
    # a recorded nan would fail only at the sampling step, and every later run in that folder would be refused
    out = tmp_path / "demo"
    _argparse_refuses(capsys, ["demo", "--quick", "--out", str(out), "--temperature", value], f"argument --temperature: {needle}")
    assert not out.exists()


def test_messages_name_flags_under_the_command_and_arguments_from_python(tmp_path, capsys):
    from thinkfast import errors
    from thinkfast.eval.report import build_report

    samples = _write(tmp_path / "a.jsonl", [_record("p1", j) for j in range(2)])
    empty = tmp_path / "none.jsonl"
    empty.write_text("")
    assert main(["report", str(samples), "--out", str(tmp_path / "rep"), "--dataset", f"jsonl:{empty}"]) == 2
    _one_line_error(capsys, f"--dataset 'jsonl:{empty}' names no problems")
    assert errors._command_line is False  # the command's style ends with it, failed or not
    with pytest.raises(errors.DataError, match=r"^dataset='jsonl:.*' names no problems"):
        build_report([samples], tmp_path / "rep", dataset=f"jsonl:{empty}", plots=False)
