"""The trainer: schedules, kill -> resume continues the same curve, NaN stops keeping the last good checkpoint,
checkpoints are never overwritten by another run, and 2 data-parallel processes match 1."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_thinkfast_teacher, write_distill_files
import torch

from thinkfast.data.packing import DataConfig, build_data
from thinkfast.distill.stages import SFTTask, StageConfig, distill, fsdp_runs_on_cpu
from thinkfast.distill.toy import chain_sum_problems
from thinkfast.distill.trainer import TrainConfig, TrainingDiverged, lr_at, train
from thinkfast.errors import CheckpointError, ConfigError, command_line




def _teacher(tok, seed=0):
    return tiny_thinkfast_teacher(tok, seed)


DATA = DataConfig(specs=[chain_sum_problems(60, seed=1)], instruction="none", chat=False)


def _tc(steps, B=4, T=64, **kw):
    kw.setdefault("log_every", 1)
    return TrainConfig(tokens=steps * B * T, batch_size=B, seq_len=T, **kw)


def _stages(**kw):
    return [
        StageConfig("matrix", _tc(5, lr=3e-3, **kw)),
        StageConfig("hidden", _tc(6, lr=3e-3, **kw)),
        StageConfig("kd", _tc(5, lr=3e-3, **kw)),
    ]


def _curve(out: Path):
    recs = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["step_loss"], r["loss"]) for r in recs]


def test_schedules():
    cfg = TrainConfig(tokens=100 * 8 * 16, batch_size=8, seq_len=16, lr=1.0, min_lr_ratio=0.1, warmup=10)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # cosine falls monotonically
    assert lrs[-1] == pytest.approx(0.1)
    wsd = [lr_at(s, cfg.replace(schedule="wsd", decay=0.2)) for s in range(100)]
    assert all(x == pytest.approx(1.0) for x in wsd[10:80])
    assert wsd[-1] == pytest.approx(0.1) and wsd[85] < 1.0


def test_killed_run_resumes_on_the_same_curve(tmp_path, tok):
    full = tmp_path / "full"
    distill(_teacher(tok), "llamba", DATA, _stages(ckpt_every=2), tokenizer=tok, out_dir=full, progress=False)

    killed = tmp_path / "killed"
    seen = []

    def die(step, record):
        seen.append((record.get("stage"), step))
        if record.get("stage") == "hidden" and step == 5:  # after step 5; the last checkpoint is step 4
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(_teacher(tok), "llamba", DATA, _stages(ckpt_every=2), tokenizer=tok, out_dir=killed,
                progress=False, callback=die)
    state = json.loads((killed / "stages/02-hidden/ckpt/state.json").read_text())
    assert state["step"] == 4 and not state["done"]
    assert not (killed / "model.safetensors").exists()
    # a new process: fresh models, same command with resume
    distill(_teacher(tok), "llamba", DATA, _stages(ckpt_every=2), tokenizer=tok, out_dir=killed, progress=False,
            resume=True)
    a, b = _curve(full), _curve(killed)
    assert [x[:2] for x in a] == [x[:2] for x in b]  # the killed steps were dropped from the log, then redone
    for x, y in zip(a, b):
        assert x[2] == pytest.approx(y[2], rel=1e-6, abs=1e-8), (x, y)
        assert x[3] == pytest.approx(y[3], rel=1e-6, abs=1e-8), (x, y)
    from safetensors.torch import load_file

    wa, wb = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def _killed_at_step_3(out, tok) -> list:
    """A kd run into `out` killed at step 3, after its step-2 checkpoint; its stages, to resume."""
    def die(step, record):
        if record.get("stage") == "kd" and step == 3:
            raise KeyboardInterrupt

    stages = [StageConfig("kd", _tc(4, ckpt_every=2))]
    with pytest.raises(KeyboardInterrupt):
        distill(_teacher(tok), "llamba", DATA, stages, tokenizer=tok, out_dir=out, progress=False, callback=die)
    return stages


@pytest.mark.parametrize("name,keep", [("optimizer.pt", 300), ("rng.pt", 300), ("optimizer.pt", 0), ("rng.pt", 0)])
def test_a_cut_optimizer_or_rng_state_is_named_as_damaged(tmp_path, tok, name, keep):
    # a cut rng.pt was reported as "optimizer state unreadable", its cause cut mid-sentence; an empty one (what a
    # power loss leaves) was an EOFError traceback
    out = tmp_path / "run"

    stages = _killed_at_step_3(out, tok)
    state = out / "stages" / "01-kd" / "ckpt" / name
    state.write_bytes(state.read_bytes()[:keep])
    with pytest.raises(CheckpointError) as e:
        distill(_teacher(tok), "llamba", DATA, stages, tokenizer=tok, out_dir=out, progress=False, resume=True)
    assert str(e.value).startswith(f"{state}: damaged or incomplete (") and "\n" not in str(e.value)
    assert f"delete {state.parent} and resume to run this stage again" in str(e.value)


def test_a_state_json_of_another_shape_and_data_that_changed_are_refused(tmp_path, tok):
    """Valid JSON of another shape was a traceback (AttributeError, ValueError, KeyError); a data file whose
    examples changed under the same spec resumed silently on the new ones."""
    import json

    out = tmp_path / "run"

    stages = _killed_at_step_3(out, tok)
    state_file = out / "stages" / "01-kd" / "ckpt" / "state.json"
    good = json.loads(state_file.read_text())
    assert isinstance(good["data"]["digest"], str)
    for bad, says in [([], "not a JSON object"), ({**good, "step": "five"}, 'step is "five", not a count'),
                      ({k: v for k, v in good.items() if k != "data"}, "no data position"), ({}, "step is null, not a count")]:
        state_file.write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=f"state.json: {says}; the checkpoint is damaged"):
            distill(_teacher(tok), "llamba", DATA, stages, tokenizer=tok, out_dir=out, progress=False, resume=True)
    state_file.write_text(json.dumps({**good, "data": {**good["data"], "digest": "0" * 16}}))
    with pytest.raises(CheckpointError, match="other examples under the same data spec"):
        distill(_teacher(tok), "llamba", DATA, stages, tokenizer=tok, out_dir=out, progress=False, resume=True)
    old = {**good, "data": {k: v for k, v in good["data"].items() if k != "digest"}}  # before the digest: resumes
    state_file.write_text(json.dumps(old))
    distill(_teacher(tok), "llamba", DATA, stages, tokenizer=tok, out_dir=out, progress=False, resume=True)


def test_a_refusal_names_added_stages_and_where_long_values_differ():
    from thinkfast.distill.trainer import setting_changes

    spec = "rg:basic_arithmetic?operators=+&allow_parentheses=false&allow_negation=false&min_terms=2&size=200&seed=555"
    saved = {"stages": [{"kind": "hidden"}, {"kind": "kd"}], "data": {"specs": [spec]}}
    now = {"stages": [{"kind": "hidden"}, {"kind": "kd"}, {"kind": "sft"}], "data": {"specs": [spec[:-1] + "6"]}}
    said = setting_changes(saved, now)
    assert "stages were hidden,kd, now hidden,kd,sft" in said
    assert 'size=200&seed=555"], now ...' in said and 'size=200&seed=556"]; stages were' in said


def test_existing_run_is_never_overwritten(tmp_path, tok):
    out = tmp_path / "run"
    distill(_teacher(tok), "llamba", DATA, [StageConfig("kd", _tc(2))], tokenizer=tok, out_dir=out, progress=False)
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # from Python the line names the arguments to pass; `thinkfast distill` names its flags
    with pytest.raises(CheckpointError, match="already holds a run; pass resume=True to continue it, or choose a new out_dir"):
        distill(_teacher(tok), "llamba", DATA, [StageConfig("kd", _tc(2))], tokenizer=tok, out_dir=out, progress=False)
    with command_line(), pytest.raises(CheckpointError, match="pass --resume to continue it, or choose a new --out$"):
        distill(_teacher(tok), "llamba", DATA, [StageConfig("kd", _tc(2))], tokenizer=tok, out_dir=out, progress=False)
    with pytest.raises(CheckpointError, match="other settings"):  # resume with another budget = another run
        distill(_teacher(tok), "llamba", DATA, [StageConfig("kd", _tc(3))], tokenizer=tok, out_dir=out,
                progress=False, resume=True)
    with pytest.raises(CheckpointError, match="other settings"):  # another teacher of the same shape
        distill(_teacher(tok, seed=5), "llamba", DATA, [StageConfig("kd", _tc(2))], tokenizer=tok, out_dir=out,
                progress=False, resume=True)
    # the same teacher fine-tuned with its embeddings frozen (or a LoRA merged in): only a deeper weight differs
    tuned = _teacher(tok)
    with torch.no_grad():
        tuned.lm.layers[-1].mlp.down_proj.weight.mul_(1.01)
    with pytest.raises(CheckpointError, match=r"other settings \(teacher weights differ \(another model of the same shape\)\)"):
        distill(tuned, "llamba", DATA, [StageConfig("kd", _tc(2))], tokenizer=tok, out_dir=out, progress=False, resume=True)
    # a run started before the sampled digest existed resumes (its run.json has only the embeddings' digest)
    run_json = out / "run.json"
    saved = json.loads(run_json.read_text())
    del saved["teacher"]["weights_sampled"]
    run_json.write_text(json.dumps(saved))
    files[run_json] = run_json.read_bytes()
    distill(_teacher(tok), "llamba", DATA, [StageConfig("kd", _tc(2))], tokenizer=tok, out_dir=out, progress=False,
            resume=True)  # finished already: nothing to do
    assert files == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="token budget 0"):
        distill(_teacher(tok), "llamba", DATA, [StageConfig("kd", _tc(0))], tokenizer=tok, out_dir=tmp_path / "z",
                progress=False)
    assert not (tmp_path / "z").exists()


class _NaNAfter(SFTTask):
    def __init__(self, model, at):
        super().__init__(model)
        self.calls, self.at = 0, at

    def loss(self, batch):
        self.calls += 1
        loss, parts = super().loss(batch)
        return (loss * float("nan") if self.calls >= self.at else loss), parts


def test_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path, tok):
    model = _teacher(tok)
    mix = build_data(DATA, tok, 64)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 6.*last good checkpoint \(step 4\)"):
        train(_NaNAfter(model, 6), mix, _tc(10, ckpt_every=2), ckpt_dir=ckpt, log_path=tmp_path / "log.jsonl", progress=False)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 4
    # the weights in memory were not touched by the NaN step: they are the step-5 weights, finite
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # resuming replays from step 4 with the same data
    again = _teacher(tok)
    res = train(SFTTask(again), build_data(DATA, tok, 64), _tc(10, ckpt_every=2), ckpt_dir=ckpt,
                log_path=tmp_path / "log.jsonl", progress=False, resume=True)
    assert res.resumed_from == 4 and res.steps == 10


@pytest.fixture(scope="module")
def saved_teacher(tmp_path_factory, tok):
    return write_distill_files(tmp_path_factory.mktemp("teacher"), tok, problems=40)


TWO_RUNS = """
import sys
from thinkfast.cli import main
from thinkfast.distill.stages import fsdp_runs_on_cpu
args, root = sys.argv[1:-1], sys.argv[-1]
assert main(args + ["--out", root + "/two"]) == 0
assert main(args + ["--out", root + "/fsdp", "--fsdp-teacher"]) == (0 if fsdp_runs_on_cpu() else 2)
"""


def test_two_processes_match_one_with_the_same_global_batch(saved_teacher):
    """DDP (gloo, 2 processes, 2 rows each) vs 1 process (2 micro-batches of 2): the same losses; and FSDP for
    the teacher gives them too. One torchrun launch runs both 2-process commands (process start-up is slow)."""
    from thinkfast.cli import main

    root = saved_teacher
    common = ["distill", "--teacher", str(root / "teacher"), "--student", "llamba", "--stages", "matrix,kd",
              "--data", f"jsonl:{root}/chain.jsonl?solution=solution", "--tokens", "1536", "--seq-len", "128",
              "--batch-size", "4", "--instruction", "none", "--no-chat", "--log-every", "1", "--no-progress",
              "--lr", "3e-3"]
    assert main(common + ["--out", str(root / "one"), "--micro-batch-size", "2"]) == 0
    script = root / "two_runs.py"
    script.write_text(TWO_RUNS)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(cmd + common + [str(root)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = ("two", "fsdp")
    if not fsdp_runs_on_cpu():  # torch < 2.7: refused in one line, not a CUDA error from inside FSDP
        assert "--fsdp-teacher on a CPU needs torch 2.7 or newer" in proc.stderr
        runs = ("two",)
    one = _curve(root / "one")
    assert len(one) == 6 and one[-1][2] < one[3][2]  # and it did train
    for other in (_curve(root / d) for d in runs):
        assert [x[:2] for x in one] == [x[:2] for x in other]
        for x, y in zip(one, other):
            assert x[2] == pytest.approx(y[2], rel=1e-4, abs=1e-6), (x, y)


def test_kill_before_the_first_checkpoint_restarts_cleanly(tmp_path, tok):
    mix = lambda: build_data(DATA, tok, 64)  # noqa: E731
    ckpt, log = tmp_path / "ckpt", tmp_path / "log.jsonl"

    def die(step, record):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(SFTTask(_teacher(tok)), mix(), _tc(5, ckpt_every=0), ckpt_dir=ckpt, log_path=log, progress=False, callback=die)
    assert not ckpt.exists() and len(log.read_text().splitlines()) == 3
    res = train(SFTTask(_teacher(tok)), mix(), _tc(5, ckpt_every=0), ckpt_dir=ckpt, log_path=log, progress=False, resume=True)
    steps = [json.loads(x)["step"] for x in log.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5] and res.resumed_from == 0


def test_progress_bars_write_rarely_into_logs_and_often_to_terminals():
    import io

    from thinkfast.utils import progress_bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    log, tty = io.StringIO(), Terminal()
    for stream in (log, tty):
        with progress_bar(1000, "steps", "step", file=stream) as bar:
            for _ in range(1000):
                bar.update(1)
    # a log gets the opening and closing states only; both end at the same final count
    assert log.getvalue().count("\r") <= 3 and "1000/1000" in log.getvalue()
    assert bar.mininterval < 1 and "1000/1000" in tty.getvalue()


def test_one_example_rows_spend_the_budget_in_real_tokens(tmp_path, tok):
    # rows of one example are mostly padding: the budget counts their real tokens, so the steps are
    # budget / (rows per step x mean example length), not budget / (rows x seq_len)
    data = build_data(dataclasses.replace(DATA, pack=False), tok, 256)
    assert data.row_tokens < 100
    cfg = TrainConfig(tokens=2000, batch_size=2, seq_len=256, lr=1e-3, log_every=1)
    result = train(SFTTask(_teacher(tok)), data, cfg, progress=False)
    assert result.steps == int(2000 // (2 * data.row_tokens)) > cfg.total_steps
    assert abs(result.tokens - 2000) < 2 * data.row_tokens


@pytest.mark.parametrize("kw,says", [(dict(batch_size=1.5), "batch_size=1.5 must be a whole number"),
                                     (dict(batch_size=2.0), "batch_size=2.0 must be a whole number"),
                                     (dict(seq_len=True), "seq_len=True must be a whole number"),
                                     (dict(batch_size=2, micro_batch_size=3), "micro_batch_size=3 is larger than batch_size=2")])
def test_python_training_settings_are_checked_before_anything_is_written(tmp_path, tok, kw, says):
    from thinkfast.distill.stages import sft

    cfg = TrainConfig(**{"tokens": 256, "seq_len": 64, **kw})
    with pytest.raises(ConfigError, match=says):
        sft(_teacher(tok), DATA, cfg, tokenizer=tok, out_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # the corrected call starts afresh, no --resume needed


def test_an_out_dir_that_is_a_file_is_one_clear_error(tmp_path, tok):
    from thinkfast.distill.stages import sft

    (tmp_path / "f").write_text("mine")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        sft(_teacher(tok), DATA, _tc(1), tokenizer=tok, out_dir=tmp_path / "f", progress=False)
    assert (tmp_path / "f").read_text() == "mine"
