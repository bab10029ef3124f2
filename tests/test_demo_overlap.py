"""The demo's students side by side: the Llamba's stages after hidden-state alignment in a second process beside
the hybrid give the weights of the one-after-the-other run; a crash beside it resumes; a failure there is one line."""

import hashlib
import json
import logging
import os
import sys

import pytest
import torch

from thinkfast import demo as demo_module
from thinkfast.distill.stages import distill
from thinkfast.errors import CheckpointError, ConfigError, ThinkfastError

STUDENTS = ("llamba", "hybrid")
# the second process is for CPU training (on a GPU the students train one after the other)
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the students overlap only when training on a CPU")


@pytest.fixture(scope="module")
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the overlap needs two: one per process
    yield
    torch.set_num_threads(before)


def students(out, overlap: str, log=None) -> demo_module.Demo:
    d = demo_module.Demo(out, demo_module.DemoSettings.quick_settings(), progress=False,
                         log=log or (lambda msg: None), overlap=overlap)
    assert d.run(until="hybrid") is None  # no report yet
    return d


def weights(out, name: str) -> str:
    return hashlib.sha256((out / "models" / name / "model.safetensors").read_bytes()).hexdigest()


def losses(out, name: str) -> list:
    rows = [json.loads(line) for line in (out / "work" / name / "train_log.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r.get("loss"), r.get("eval_loss")) for r in rows]


@pytest.fixture(scope="module")
def one_after_the_other(tmp_path_factory, two_threads):
    out = tmp_path_factory.mktemp("sequential") / "run"
    d = students(out, "off")
    assert d.overlap_threads() is None
    return out


def test_students_side_by_side_have_the_weights_of_one_after_the_other_and_resume_after_a_crash(
        one_after_the_other, tmp_path, monkeypatch, two_threads):
    out = tmp_path / "run"
    original = demo_module.Demo._distill

    def crash_in_hybrid(self, name, *args, **kwargs):
        if name == "hybrid":
            raise KeyboardInterrupt
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(demo_module.Demo, "_distill", crash_in_hybrid)
    d = demo_module.Demo(out, demo_module.DemoSettings.quick_settings(), progress=False, log=lambda msg: None,
                         overlap="on")
    with pytest.raises(KeyboardInterrupt):
        d.run(until="hybrid")
    assert d.tail_process.poll() is not None  # the Llamba's process was stopped, not left running
    assert json.loads((out / "demo.json").read_text())["done"] == ["data", "teacher"]
    assert torch.get_num_threads() == 2  # restored

    monkeypatch.setattr(demo_module.Demo, "_distill", original)
    said = []
    students(out, "on", said.append)
    assert any("continue in a second process (1 of 2 threads)" in m for m in said)
    assert torch.get_num_threads() == 2
    for name in STUDENTS:
        assert weights(out, name) == weights(one_after_the_other, name)
        assert losses(out, name) == losses(one_after_the_other, name)
    state = json.loads((out / "demo.json").read_text())
    assert state["done"] == ["data", "teacher", "llamba", "hybrid"]
    assert state["step_seconds"]["llamba"] > 0 and state["step_seconds"]["hybrid"] > 0


def test_a_failure_in_the_llamba_process_is_its_one_line(tmp_path, monkeypatch, two_threads):
    out = tmp_path / "run"
    original = demo_module.Demo._distill

    def damage_kd_checkpoint(self, name, *args, **kwargs):
        original(self, name, *args, **kwargs)
        if name == "llamba" and kwargs.get("stop_after") == "hidden":  # what the second process resumes from
            ckpt = out / "work" / "llamba" / "stages" / "03-kd" / "ckpt"
            ckpt.mkdir(parents=True)
            (ckpt / "state.json").write_text("{")

    monkeypatch.setattr(demo_module.Demo, "_distill", damage_kd_checkpoint)
    with pytest.raises(CheckpointError, match="03-kd/ckpt/state.json: unreadable"):
        students(out, "on")
    assert json.loads((out / "demo.json").read_text())["done"] == ["data", "teacher"]
    assert torch.get_num_threads() == 2


def test_auto_keeps_short_stages_in_one_process(tmp_path, two_threads):
    d = demo_module.Demo(tmp_path / "run", demo_module.DemoSettings.quick_settings(), progress=False,
                         log=lambda msg: None)
    assert d.overlap_threads() is None  # --quick: 12k tokens after stage 2, less than the second process's start-up
    d.s.llamba_tokens = dict(d.s.llamba_tokens, kd=demo_module.OVERLAP_MIN_TOKENS)
    assert d.overlap_threads() == (1, 1)
    d.steps = demo_module.STEPS[:3]  # a run that stops at the Llamba trains no hybrid beside it
    assert d.overlap_threads() is None
    with pytest.raises(ConfigError, match="until='sampling' is not a step"):
        d.run(until="sampling")
    with pytest.raises(ConfigError, match="overlap='yes'"):
        demo_module.Demo(tmp_path / "other", demo_module.DemoSettings.quick_settings(), overlap="yes")


def test_child_errors_keep_their_class():
    assert type(demo_module._child_error("CheckpointError", "x")) is CheckpointError
    err = demo_module._child_error("KeyError", "the message")  # not a thinkfast error class: the base one
    assert type(err) is ThinkfastError and str(err) == "the message"


def test_llamba_process_reports_one_json_line_instead_of_raising(tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    level, threads, hf_level = logging.getLogger("thinkfast").level, torch.get_num_threads(), hf_logging.get_verbosity()
    results = {}
    try:
        results["damaged"] = demo_module.llamba_tail_main([str(tmp_path), "1"])  # no demo.json
        said = capsys.readouterr().out.splitlines()
        d = demo_module.Demo(tmp_path / "run", demo_module.DemoSettings.quick_settings(), log=lambda msg: None)
        d.out.mkdir()
        d.state_path.write_text(json.dumps(d.state))  # as a run's first step records it
        results["no teacher"] = demo_module.llamba_tail_main([str(d.out), "1"])  # an error of no thinkfast class
        said += capsys.readouterr().out.splitlines()
    finally:
        logging.getLogger("thinkfast").setLevel(level)
        torch.set_num_threads(threads)
        hf_logging.set_verbosity(hf_level)
    assert results == {"damaged": 1, "no teacher": 1}
    damaged, other = (json.loads(line) for line in said)
    assert damaged == {"error": "CheckpointError", "message": f"{tmp_path / 'demo.json'} is damaged; choose a new --out"}
    assert other["error"] == "ThinkfastError" and other["message"].startswith("the Llamba's last stages failed: ")


def test_distill_stop_after_names_a_stage_and_needs_a_folder():
    from thinkfast.distill.stages import StageConfig

    with pytest.raises(ConfigError, match="stop_after='kd' names no stage"):
        distill(None, "llamba", [], [StageConfig("matrix"), StageConfig("hidden")], stop_after="kd")
    with pytest.raises(ConfigError, match="needs an out_dir"):
        distill(None, "llamba", [], [StageConfig("hidden")], stop_after="hidden")


def test_cli_sequential_turns_the_overlap_off(tmp_path, monkeypatch):
    from thinkfast.cli import main

    seen = []
    monkeypatch.setattr(demo_module, "run_demo", lambda out, **kw: seen.append(kw["overlap"]) or {})
    assert main(["demo", "--quick", "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    assert main(["demo", "--quick", "--out", str(tmp_path / "b"), "--no-progress", "--sequential"]) == 0
    assert seen == ["auto", "off"]


def test_llamba_process_stops_when_the_first_process_is_gone(monkeypatch):
    check = demo_module.stop_when_orphaned(parent=4242)
    monkeypatch.setattr(demo_module.os, "getppid", lambda: 4242)
    check(1, {})  # the parent is alive: training goes on
    monkeypatch.setattr(demo_module.os, "getppid", lambda: 1)  # re-parented: the first process died
    with pytest.raises(KeyboardInterrupt):
        check(2, {})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_second_process_dies_with_the_first_even_when_it_is_killed_outright(tmp_path):
    """`kill -9` of the demo cannot stop its second process (its own session, so Ctrl-C reaches only the first):
    the kernel ends it with its parent, instead of a check at its next training step (~13 s late)."""
    import signal
    import subprocess
    import time

    pid_file = tmp_path / "child.pid"
    second = tmp_path / "second.py"  # the second process: dies with its parent, then waits
    second.write_text("import os, time\nfrom thinkfast.demo import die_with_parent\nassert die_with_parent(os.getppid())\n"
                      f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, {str(second)!r}], start_new_session=True)\n"
        "time.sleep(60)\n")])
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        child = int(pid_file.read_text())
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        for _ in range(50):  # gone within 5 s (the kernel signals it at once)
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(child, signal.SIGKILL)
            pytest.fail("the second process outlived the first")
    finally:
        parent.kill()
    gone = subprocess.run([sys.executable, "-c", "import sys; from thinkfast.demo import llamba_tail_main; "
                           f"sys.exit(llamba_tail_main([{str(tmp_path)!r}, '1', '1']))"], timeout=120)
    assert gone.returncode == 130  # started by a process already gone: it stops before any work
