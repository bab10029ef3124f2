"""Held-out evaluation during training: the logged eval_loss is the task's loss on the held-out rows, it does not
change what training does, and the CLI and recipes reach it (bad held-out specs fail before anything is written)."""

import json
from pathlib import Path

import pytest
from conftest import tiny_thinkfast_teacher
import torch

from thinkfast.cli import main
from thinkfast.data.packing import DataConfig, build_data
from thinkfast.distill.recipes import make_plan
from thinkfast.distill.stages import SFTTask, StageConfig, distill
from thinkfast.distill.toy import chain_sum_problems
from thinkfast.distill.trainer import TrainConfig, held_out_batch, train
from thinkfast.errors import ConfigError


TRAIN = DataConfig(specs=[chain_sum_problems(60, seed=1)], instruction="none", chat=False)
HELD = DataConfig(specs=[chain_sum_problems(20, seed=7)], instruction="none", chat=False)


def _tc(steps, B=4, T=64, **kw):
    return TrainConfig(tokens=steps * B * T, batch_size=B, seq_len=T, log_every=1, lr=3e-3, **kw)


def _log(out: Path):
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def test_eval_loss_is_the_task_loss_on_the_held_out_rows(tok):
    model = tiny_thinkfast_teacher(tok)
    data, held = build_data(TRAIN, tok, 64), build_data(HELD, tok, 64)
    task = SFTTask(model)
    res = train(task, data, _tc(6, eval_every=2, eval_rows=5), progress=False, eval_data=held)
    assert [e["step"] for e in res.evals] == [2, 4, 6]
    assert all(e["eval_rows"] == 5 for e in res.evals)
    # recomputed by hand with the trained model on the first 5 held-out rows
    batch = held_out_batch(build_data(HELD, tok, 64), 5)
    with torch.no_grad():
        logits = model(batch["input_ids"]).logits
    mask = batch["targets"] != -100
    ce = torch.nn.functional.cross_entropy(logits[mask], batch["targets"][mask])
    assert res.eval_loss == pytest.approx(float(ce), rel=1e-5)
    assert res.evals[-1]["eval_loss"] < res.evals[0]["eval_loss"]  # lr 3e-3 on the same task: it learns


def test_evaluating_does_not_change_training(tmp_path, tok):
    plain = distill(tiny_thinkfast_teacher(tok, 1), "llamba", TRAIN, [StageConfig("hidden", _tc(4)), StageConfig("sft", _tc(4))],
                    tokenizer=tok, out_dir=tmp_path / "plain", progress=False)
    held = distill(tiny_thinkfast_teacher(tok, 1), "llamba", TRAIN, [StageConfig("hidden", _tc(4, eval_every=1)),
                                                     StageConfig("sft", _tc(4, eval_every=3))],
                   tokenizer=tok, out_dir=tmp_path / "held", progress=False, eval_data=HELD)
    a, b = _log(tmp_path / "plain"), _log(tmp_path / "held")
    train_b = [r for r in b if "loss" in r]
    assert [(r["stage"], r["step"], r["step_loss"]) for r in a] == [(r["stage"], r["step"], r["step_loss"]) for r in train_b]
    evals = [(r["stage"], r["step"]) for r in b if "eval_loss" in r]
    assert evals == [("hidden", 1), ("hidden", 2), ("hidden", 3), ("hidden", 4), ("sft", 3), ("sft", 4)]
    assert all("eval_layer0" in r for r in b if "eval_loss" in r and r["stage"] == "hidden")  # per-layer parts too
    for p, q in zip(plain.state_dict().values(), held.state_dict().values()):
        assert torch.equal(p, q)
    # from the CLI: every 2 steps, and at the end
    assert main(["sft", "--model", str(tmp_path / "held"), "--data", _jsonl(tmp_path, TRAIN, "t"), "--eval-data",
                 _jsonl(tmp_path, HELD, "h"), "--instruction", "none", "--no-chat", "--seq-len", "64", "--batch-size", "2",
                 "--tokens", "512", "--eval-every", "2", "--no-progress", "--out", str(tmp_path / "cli")]) == 0
    recs = _log(tmp_path / "cli")
    assert [r["step"] for r in recs if "eval_loss" in r] == [2, 4]


def test_a_killed_run_logs_each_evaluation_once(tmp_path, tok):
    def stages():
        return [StageConfig("sft", _tc(6, eval_every=1, ckpt_every=2))]

    def die(step, record):
        if step == 3:  # after step 3's evaluation; the last checkpoint is step 2
            raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        distill(tiny_thinkfast_teacher(tok), "llamba", TRAIN, stages(), tokenizer=tok, out_dir=out, progress=False, eval_data=HELD,
                callback=die)
    assert [r["step"] for r in _log(out) if "eval_loss" in r] == [1, 2, 3]
    distill(tiny_thinkfast_teacher(tok), "llamba", TRAIN, stages(), tokenizer=tok, out_dir=out, progress=False, eval_data=HELD,
            resume=True)
    whole = tmp_path / "whole"
    distill(tiny_thinkfast_teacher(tok), "llamba", TRAIN, stages(), tokenizer=tok, out_dir=whole, progress=False, eval_data=HELD)
    resumed, straight = ([(r["step"], r["eval_loss"]) for r in _log(d) if "eval_loss" in r] for d in (out, whole))
    assert [s for s, _ in resumed] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in resumed] == pytest.approx([v for _, v in straight], rel=1e-5)


def test_evaluation_settings_may_change_on_resume(tmp_path, tok):
    def die(step, record):
        if step == 3:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        distill(tiny_thinkfast_teacher(tok), "llamba", TRAIN, [StageConfig("sft", _tc(6, eval_every=1, ckpt_every=2))], tokenizer=tok,
                out_dir=out, progress=False, eval_data=HELD, callback=die)
    distill(tiny_thinkfast_teacher(tok), "llamba", TRAIN, [StageConfig("sft", _tc(6, eval_every=3, eval_rows=4, ckpt_every=2))],
            tokenizer=tok, out_dir=out, progress=False, eval_data=HELD, resume=True)
    assert [(r["step"], r["eval_rows"]) for r in _log(out) if "eval_loss" in r] == [(1, 20), (2, 20), (3, 4), (6, 4)]


def _jsonl(root: Path, cfg: DataConfig, name: str) -> str:
    path = root / f"{name}.jsonl"
    with open(path, "w") as f:
        for p in cfg.specs[0]:
            f.write(json.dumps({"question": p.question, "answer": p.answer, "solution": p.solution}) + "\n")
    return f"jsonl:{path}?solution=solution"


def test_held_out_data_must_not_be_the_training_rows(tok):
    data = build_data(TRAIN, tok, 64)
    with pytest.raises(ConfigError, match="held-out data is the training data"):
        train(SFTTask(tiny_thinkfast_teacher(tok)), data, _tc(2), progress=False, eval_data=data)


def test_recipe_eval_keys_and_bad_held_out_specs(tmp_path, tok, capsys):
    plan = make_plan({"stages": ["sft"], "tokens": 100, "data": ["rg:chain_sum"], "data_weights": [2.0],
                      "eval_data": "rg:chain_sum?seed=9", "eval_every": "5", "pack": False}, {}, "sft")
    assert plan.eval_data.specs == ["rg:chain_sum?seed=9"] and plan.eval_data.weights is None
    assert plan.eval_data.pack is False and plan.stages[0].train.eval_every == 5
    with pytest.raises(ConfigError, match="eval_every=-1 must be >= 0"):
        make_plan({"stages": ["sft"], "tokens": 100, "eval_every": -1}, {}, "sft")
    with pytest.raises(ConfigError, match="eval_rows=0 must be positive"):
        make_plan({"stages": ["sft"], "tokens": 100, "eval_rows": 0}, {}, "sft")
    model = tmp_path / "m"
    tiny_thinkfast_teacher(tok).save_pretrained(model)
    tok.save_pretrained(model)
    out = tmp_path / "bad"
    rc = main(["sft", "--model", str(model), "--data", _jsonl(tmp_path, TRAIN, "t"), "--eval-data", "gsm8k:/nonexistent.jsonl",
               "--instruction", "none", "--tokens", "256", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "does not exist" in err[-1] and "Traceback" not in "".join(err)
    assert not (out / "run.json").exists()
    rc = main(["sft", "--model", str(model), "--data", _jsonl(tmp_path, TRAIN, "t"), "--eval-every", "5",
               "--instruction", "none", "--tokens", "256", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "--eval-every without held-out data: add --eval-data" in err[-1]
    assert not (out / "run.json").exists()
