"""What a hard kill (`kill -9`) leaves, and a second run on the same output: a killed first write of run.json is no
run, a checkpoint moved aside mid-replace is put back, temporary copies are cleared, a report killed while drawing
its plots re-runs, and one run at a time holds a training or demo folder."""

import json
import subprocess
import sys

import pytest
import torch

from test_cli_bad_input import _record, _write
from thinkfast.cli import main
from thinkfast.data.packing import DataConfig
from thinkfast.demo import Demo, DemoSettings
from thinkfast.distill.stages import StageConfig, distill
from thinkfast.distill.toy import chain_sum_problems, char_tokenizer, random_model, tiny_config
from thinkfast.distill.trainer import TrainConfig
from thinkfast.errors import ThinkfastError
from thinkfast.utils import atomic_dir, clear_leftovers


@pytest.fixture(scope="module")
def toy():
    tok = char_tokenizer()
    teacher = random_model(tiny_config(len(tok), d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=64), seed=0,
                           tokenizer=tok)
    data = DataConfig(specs=[chain_sum_problems(40, seed=1)], instruction="none", chat=False)
    return tok, teacher, data


def _run(toy, out, resume=False, callback=None):
    tok, teacher, data = toy
    train = TrainConfig(tokens=6 * 4 * 64, batch_size=4, seq_len=64, warmup=0, log_every=1, ckpt_every=2)
    return distill(teacher, "llamba", data, [StageConfig("kd", train=train)], tokenizer=tok, out_dir=out,
                   resume=resume, progress=False, callback=callback)


def _stop_at(step):
    def callback(s, record):
        if s == step:
            raise KeyboardInterrupt
    return callback


def test_a_run_killed_while_writing_its_first_run_json_starts_again(toy, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".run.json.tmp-abc123").write_text('{"command": "dis')  # the kill came before the rename
    _run(toy, out)
    assert (out / "run.json").is_file() and not list(out.glob(".run.json.tmp-*"))


def test_a_checkpoint_moved_aside_by_a_kill_is_put_back_and_temporary_copies_cleared(toy, tmp_path):
    whole = _run(toy, tmp_path / "whole")
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _run(toy, out, callback=_stop_at(5))
    ckpt = out / "stages" / "01-kd" / "ckpt"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 4
    ckpt.rename(ckpt.with_name(".ckpt.old-99999"))  # killed between atomic_dir's two renames
    (ckpt.parent / ".ckpt.tmp-zz9").mkdir()  # and a half-written newer one
    (ckpt.parent / ".ckpt.tmp-zz9" / "model.safetensors").write_bytes(b"half")
    (out / ".final.tmp-q1").mkdir()
    steps = []
    resumed = _run(toy, out, resume=True, callback=lambda s, r: steps.append(s))
    assert steps[0] == 5  # continued from the checkpoint, not from step 0
    assert not [p.name for p in out.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_atomic_dir_and_clear_leftovers_put_an_old_copy_back(tmp_path):
    final = tmp_path / "ckpt"
    (tmp_path / ".ckpt.old-4242").mkdir()
    (tmp_path / ".ckpt.old-4242" / "state.json").write_text("{}")
    assert clear_leftovers(tmp_path) == 0 and (final / "state.json").is_file()
    final.rename(tmp_path / ".ckpt.old-4243")
    with atomic_dir(final) as tmp:  # the next save finds the old one back in place first, then replaces it
        assert (final / "state.json").is_file()
        (tmp / "state.json").write_text('{"step": 2}')
    assert json.loads((final / "state.json").read_text()) == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def _hold(lock_path):
    """Another process holding `lock_path` as a running thinkfast would."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, time\n"
        f"fd = os.open({str(lock_path)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'4242\\n'); print('held', flush=True); time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_one_run_at_a_time_in_a_training_or_demo_folder(toy, tmp_path, capsys):
    """Two `--resume` runs of one killed run lost log records (one rewrote the log the other appended to), and two
    demos on one --out trained side by side: the second is refused before it writes anything."""
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _run(toy, out, callback=_stop_at(3))
    log_before = (out / "train_log.jsonl").read_bytes()
    holder = _hold(tmp_path / "run.lock")
    try:
        with pytest.raises(ThinkfastError, match=r"run is being written by another run \(process 4242"):
            _run(toy, out, resume=True)
        assert (out / "train_log.jsonl").read_bytes() == log_before
    finally:
        holder.kill()
        holder.wait()
    demo_out = tmp_path / "demo"
    holder = _hold(tmp_path / "demo.lock")
    try:
        with pytest.raises(ThinkfastError, match="let it finish, or choose another out$"):
            Demo(demo_out, DemoSettings.quick_settings(), progress=False, log=lambda m: None).run()
        assert not demo_out.exists()
    finally:
        holder.kill()
        holder.wait()
    _run(toy, out, resume=True)  # the lock a killed process left holds nothing
    assert not (tmp_path / "run.lock").exists()


def test_a_report_killed_while_drawing_its_plots_runs_again(tmp_path, capsys):
    samples = _write(tmp_path / "s.jsonl", [_record("p1", j, correct=j % 2 == 0) for j in range(4)])
    rep = tmp_path / "rep"
    assert main(["report", str(samples), "--out", str(rep)]) == 0
    (rep / "report.md").unlink()
    (rep / "metrics.json").unlink()  # killed after the first plots, before the two files written last
    (rep / ".accuracy_vs_k.png.tmp-30mpbd3c.png").write_bytes(b"half")
    assert main(["report", str(samples), "--out", str(rep)]) == 0
    assert (rep / "report.md").is_file() and not list(rep.glob(".*tmp-*"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "coverage_vs_k.png").write_bytes(b"x")
    (other / "notes.txt").write_text("mine")  # not only plots: someone's folder, still refused
    assert main(["report", str(samples), "--out", str(other)]) == 2
    assert "holds other files" in capsys.readouterr().err


def test_two_reports_into_one_folder_are_one_at_a_time(tmp_path, capsys):
    """Two `thinkfast report` runs writing one folder at once would leave one's plots beside the other's metrics
    (each removes plots the other drew): the second is refused while the first holds `rep.lock`."""
    samples = _write(tmp_path / "s.jsonl", [_record("p1", j, correct=j % 2 == 0) for j in range(4)])
    rep = tmp_path / "rep"
    assert main(["report", str(samples), "--out", str(rep)]) == 0
    before = {p.name: p.read_bytes() for p in rep.iterdir()}
    holder = _hold(tmp_path / "rep.lock")
    try:
        assert main(["report", str(samples), "--out", str(rep), "--seed", "3"]) == 2
        err = capsys.readouterr().err
        assert "is being written by another run (process 4242" in err and "choose another --out" in err, err
        assert {p.name: p.read_bytes() for p in rep.iterdir()} == before
    finally:
        holder.kill()
        holder.wait()
    assert main(["report", str(samples), "--out", str(rep)]) == 0  # a killed holder holds nothing
    assert not (tmp_path / "rep.lock").exists()


def test_a_demo_killed_while_writing_its_first_record_is_no_demo(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / ".demo.json.tmp-k2j4").write_text('{"fingerp')
    Demo(out, DemoSettings.quick_settings(), progress=False, log=lambda m: None)  # accepted as a new run
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ThinkfastError, match="not empty and holds no demo run"):
        Demo(out, DemoSettings.quick_settings(), progress=False, log=lambda m: None)


def test_score_waits_for_no_sampler_and_clears_a_killed_rewrite(tmp_path, capsys):
    """score rewrites the samples file: beside a running `thinkfast sample` (holding its lock) the samples that run
    appends would be lost, so score is refused; a killed score's temporary copy is removed by the next one."""
    samples = _write(tmp_path / "s.jsonl", [_record("p1", j, correct=None) for j in range(3)])
    before = samples.read_bytes()
    holder = _hold(tmp_path / "s.jsonl.lock")
    try:
        assert main(["score", str(samples)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "being written by another run (process 4242" in err
        assert samples.read_bytes() == before
    finally:
        holder.kill()
        holder.wait()
    (tmp_path / ".s.jsonl.tmp-zzz").write_text("half")
    assert main(["score", str(samples)]) == 0
    assert all(json.loads(x)["correct"] is True for x in samples.read_text().splitlines())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.jsonl"]


def test_a_symlinked_target_takes_the_lock_of_the_folder_it_points_to(tmp_path):
    """A second demo through a symlink took another lock and ran beside the first on the same folder."""
    from thinkfast.errors import ConfigError
    from thinkfast.utils import HeldLock

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with HeldLock.beside(tmp_path / "real", "let it finish"):
        with pytest.raises(ConfigError):
            HeldLock.beside(tmp_path / "link", "let it finish").acquire()
