"""Bad input to score, train-rm, report and sample's data: one line, exit 2, nothing already written changed."""

import json
import shutil
from pathlib import Path

import pytest

from thinkfast.cli import main

TINY_TEACHER = Path(__file__).resolve().parents[1] / "thinkfast" / "assets" / "tiny-teacher"
RG = "rg:chain_sum?size=4&seed=3&min_terms=2&max_terms=2&min_digits=1&max_digits=1"


def _record(pid, j, model="teacher", correct=True, reward=None, gold="5"):
    return {"problem_id": pid, "sample_idx": j, "model": model, "role": "teacher", "completion": "2 + 3 = 5\n#### 5",
            "answer": "5", "gold": gold, "kind": "number", "correct": correct, "grade_error": None, "reward": reward,
            "gen_tokens": 3, "prompt_tokens": 5, "seconds": 0.01, "seed": j, "finish_reason": "eos",
            "hardware": "cpu", "config": "aaaa"}


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _rg_answers(spec=RG):
    from thinkfast.data import load_problems

    return {p.id: p.answer for p in load_problems(spec)}


def _samples(path, pids=("chain_sum:3:0", "chain_sum:3:1")):
    """Samples of RG's problems (their gold answers are the spec's)."""
    gold = _rg_answers()
    return _write(path, [_record(p, j, correct=j == 0, gold=gold.get(p, "5")) for p in pids for j in range(2)])


def _one_line_error(capsys, *needles, absent=()):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("thinkfast ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    for word in absent:
        assert word not in err, err
    return err


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    """An untrained reward model on the packaged tiny teacher (saving is all these tests need: no training)."""
    from thinkfast.eval.reward import ORMConfig, OutcomeRewardModel, load_backbone

    backbone, tok = load_backbone(TINY_TEACHER)
    out = tmp_path_factory.mktemp("rm") / "rm"
    OutcomeRewardModel(backbone, tok, ORMConfig(max_len=64, question_tokens=16, uses_question=False)).save(out)
    return out


def _copy_rm(reward_model, tmp_path):
    return Path(shutil.copytree(reward_model, tmp_path / "rmc"))


def test_a_truncated_reward_head_is_named_as_damaged(reward_model, tmp_path, capsys):
    rm = _copy_rm(reward_model, tmp_path)
    head = rm / "head.safetensors"
    head.write_bytes(head.read_bytes()[:100])  # `head -c 100`
    samples = _samples(tmp_path / "x.jsonl")
    before = samples.read_bytes()
    assert main(["score", str(samples), "--reward-model", str(rm)]) == 2
    _one_line_error(capsys, str(head), "damaged or incomplete", "thinkfast train-rm")
    assert samples.read_bytes() == before
    head.unlink()
    assert main(["score", str(samples), "--reward-model", str(rm)]) == 2
    _one_line_error(capsys, str(head), "missing", "thinkfast train-rm")


@pytest.mark.parametrize("key,value,says", [
    ("max_len", "big", "max_len='big' must be an integer"),
    ("max_len", 0, "max_len=0 must be at least 1"),
    ("question_tokens", 1.5, "question_tokens=1.5 must be an integer"),
    ("uses_question", "yes", "uses_question='yes' must be true or false"),
    ("features", "likelyhood", "features='likelyhood' must be one of likelihood, pooled, both"),
    ("max_lenght", 64, "unknown key 'max_lenght'"),
])
def test_a_hand_edited_reward_config_is_refused_on_load_naming_file_and_key(reward_model, tmp_path, capsys, key, value, says):
    rm = _copy_rm(reward_model, tmp_path)
    cfg = rm / "reward_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), key: value}))
    samples = _samples(tmp_path / "x.jsonl")
    before = samples.read_bytes()
    assert main(["score", str(samples), "--reward-model", str(rm)]) == 2
    _one_line_error(capsys, f"{cfg}: {says}", "thinkfast train-rm")
    assert samples.read_bytes() == before


def test_a_reward_model_without_its_backbone_says_to_retrain_not_to_pass_backbone(reward_model, tmp_path, capsys):
    rm = _copy_rm(reward_model, tmp_path)
    shutil.rmtree(rm / "backbone")
    samples = _samples(tmp_path / "x.jsonl")
    before = samples.read_bytes()
    assert main(["score", str(samples), "--reward-model", str(rm)]) == 2
    _one_line_error(capsys, f"{rm}: the reward model's backbone/ folder is missing", "thinkfast train-rm", absent=["--backbone"])
    assert samples.read_bytes() == before


def test_rescoring_with_the_same_rewards_says_what_it_did(reward_model, tmp_path, capsys):
    samples = _samples(tmp_path / "x.jsonl")
    assert main(["score", str(samples), "--reward-model", str(reward_model)]) == 0
    first = samples.read_bytes()
    capsys.readouterr()
    assert main(["score", str(samples), "--reward-model", str(reward_model), "--rescore"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "4 given a reward" in out[-1]
    assert "nothing to grade or score" not in out[0] and "4 given a reward" in out[0] and "left as it was" in out[0], out
    assert samples.read_bytes() == first


# ------------------------------------------------------------------------------------------ data specs


def _never_load_a_model(monkeypatch):
    import thinkfast.engine.run as run_mod

    def never(*a, **k):
        raise AssertionError("a model was loaded before the data spec was checked")

    monkeypatch.setattr(run_mod, "load_for_sampling", never)


def _sample(tmp_path, spec, *extra):
    return main(["sample", "--model", str(TINY_TEACHER), "--data", spec, "--out", str(tmp_path / "o.jsonl"), "--quiet", *extra])


@pytest.mark.parametrize("spec,key,takes", [
    ("gsm8k:{data}?limit=1&ofset=5", "'ofset' (did you mean 'offset'?)", "gsm8k specs take offset, limit"),
    ("gsm8k:{data}?limt=2", "'limt' (did you mean 'limit'?)", "gsm8k specs take offset, limit"),
    ("math:{data}?kind=math", "'kind'", "math specs take offset, limit"),
    ("jsonl:{data}?questoin=q", "'questoin' (did you mean 'question'?)",
     "jsonl specs take question, answer, solution, id, kind, offset, limit"),
    ("text:{data}?lmit=3", "'lmit'", "text specs take offset, limit"),
    (RG + "&sise=2", "'sise' (did you mean 'size'?)", "rg:chain_sum specs take "),
])
def test_every_scheme_refuses_unknown_keys_listing_what_it_takes(tmp_path, capsys, monkeypatch, spec, key, takes):
    _never_load_a_model(monkeypatch)
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "1+1?", "answer": "#### 2", "problem": "p", "q": "x"}\n')
    spec = spec.format(data=data)
    assert _sample(tmp_path, spec) == 2
    _one_line_error(capsys, f"data spec {spec!r}: unknown key {key}", takes)
    assert not (tmp_path / "o.jsonl").exists()


def test_the_keys_documented_and_used_in_the_repo_stay_accepted(tmp_path):
    from thinkfast.data.sources import check_spec, load_problems, parse_spec

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"uid": f"u{i}", "q": f"{i}+1?", "a": str(i + 1), "work": "w", "answer": f"#### {i}",
                                        "question": "q", "problem": "p"}) + "\n" for i in range(4)))
    for spec in (f"gsm8k:{data}?offset=1&limit=2", f"math:{data}?offset=1&limit=2",
                 f"jsonl:{data}?question=q&answer=a&solution=work&id=uid&kind=number&offset=1&limit=2",
                 RG + "&worked=left&max_chars=1000&kind=number&offset=1&limit=2"):
        assert len(load_problems(spec)) == 2, spec
    check_spec("rg:basic_arithmetic?operators=+&allow_parentheses=false&allow_negation=false&min_terms=2&max_terms=8"
               "&min_digits=1&max_digits=3&size=150000&seed=1000")  # the tiny teacher's recipe
    check_spec("rg:gcd?min_value=1&max_value=100&size=15000&seed=1001003&max_chars=1150")
    assert parse_spec("hf:nvidia/OpenMathInstruct-2:train_1M?question=problem&answer=expected_answer"
                      "&solution=generated_solution&kind=math&limit=5").params["solution"] == "generated_solution"


@pytest.mark.parametrize("scheme", ["gsm8k", "jsonl", "math", "text"])
def test_a_folder_given_as_the_data_file_is_called_a_folder(tmp_path, capsys, monkeypatch, scheme):
    _never_load_a_model(monkeypatch)
    (tmp_path / "adir").mkdir()
    assert _sample(tmp_path, f"{scheme}:{tmp_path / 'adir'}", "--no-grade") == 2
    _one_line_error(capsys, f"{tmp_path / 'adir'} is a folder, not a file", absent=["does not exist"])


def test_a_folder_given_as_a_samples_file_is_called_a_folder(tmp_path, capsys):
    adir = tmp_path / "adir"
    adir.mkdir()
    assert main(["score", str(adir)]) == 2
    _one_line_error(capsys, f"samples file {adir} is a folder, not a file", absent=["does not exist"])
    assert main(["train-rm", "--samples", str(adir), "--backbone", str(TINY_TEACHER), "--out", str(tmp_path / "rm")]) == 2
    _one_line_error(capsys, f"samples file {adir} is a folder, not a file")
    assert not (tmp_path / "rm").exists()


def test_sampling_ungradable_data_names_the_spec_and_suggests_no_grade(tmp_path, capsys, monkeypatch):
    _never_load_a_model(monkeypatch)
    text = tmp_path / "afile.txt"
    text.write_text("Some prose.\n\nMore prose.\n")
    assert _sample(tmp_path, f"text:{text}") == 2
    _one_line_error(capsys, f"data spec 'text:{text}'", "no answers", "--no-grade")
    rows = tmp_path / "qa.jsonl"
    rows.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?", "answer": ""}\n')
    assert _sample(tmp_path, f"jsonl:{rows}") == 2
    _one_line_error(capsys, f"data spec 'jsonl:{rows}': problem qa:1 has no gold answer", "--no-grade")
    assert not (tmp_path / "o.jsonl").exists()


# ------------------------------------------------------------------------------------------ score and report


def test_score_refuses_an_empty_samples_file(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    good = _samples(tmp_path / "good.jsonl")
    before = good.read_bytes()
    assert main(["score", str(good), str(empty)]) == 2
    _one_line_error(capsys, f"{empty}: no samples to score (it is empty)")
    assert good.read_bytes() == before and empty.read_bytes() == b""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert main(["score", str(bad), "--skip-bad-lines"]) == 2
    _one_line_error(capsys, f"{bad}: no samples to score (all 1 of its lines are malformed")
    assert bad.read_text() == "not json\n"


def test_report_checks_its_dataset_against_the_samples(tmp_path, capsys):
    samples = _samples(tmp_path / "s.jsonl")
    rep = tmp_path / "rep"
    missing = tmp_path / "nope" / "x.jsonl"
    assert main(["report", str(samples), "--out", str(rep), "--dataset", f"gsm8k:{missing}"]) == 2
    _one_line_error(capsys, f"file {missing} does not exist")
    other = tmp_path / "other.jsonl"
    other.write_text('{"problem": "p", "answer": "1", "unique_id": "test/algebra/1.json"}\n')
    assert main(["report", str(samples), "--out", str(rep), "--dataset", f"math:{other}"]) == 2
    _one_line_error(capsys, "holds none of the samples' 2 problems", "'chain_sum:3:0'", "'test/algebra/1.json'")
    assert not rep.exists()
    # one that holds only some of them is refused too, before anything is written; the spec they were drawn from works
    part = RG.replace("size=4", "size=1")
    assert main(["report", str(samples), "--out", str(rep), "--dataset", part, "--no-plots"]) == 2
    _one_line_error(capsys, "lacks 1 of the samples' 2 problems", "'chain_sum:3:1'")
    assert not rep.exists()
    # the same problem ids with other answers: a spec with the same seed and other options
    other_digits = RG.replace("max_digits=1", "max_digits=3")
    assert _rg_answers(other_digits).keys() == _rg_answers().keys() != set()
    assert main(["report", str(samples), "--out", str(rep), "--dataset", other_digits, "--no-plots"]) == 2
    _one_line_error(capsys, "is not the data these samples were drawn from", "'chain_sum:3:0'", f"{samples}:1")
    assert not rep.exists()
    assert main(["report", str(samples), "--out", str(rep), "--dataset", RG, "--no-plots"]) == 0
    assert json.loads((rep / "metrics.json").read_text())["dataset"] == RG


def test_score_checks_every_files_problems_against_its_data_before_rewriting_any(tmp_path, capsys):
    first = _samples(tmp_path / "a.jsonl")
    first.write_text(first.read_text().replace('"correct": true', '"correct": null'))  # something for score to do
    before = first.read_text()
    outside = _samples(tmp_path / "b.jsonl", pids=("chain_sum:3:9",))  # not in RG (size 4)
    assert main(["score", str(first), str(outside), "--data", RG]) == 2
    _one_line_error(capsys, f"{outside}:1", "'chain_sum:3:9' is not in the data")
    assert first.read_text() == before  # the first file was not rewritten
    other_digits = RG.replace("max_digits=1", "max_digits=3")
    assert main(["score", str(first), "--data", other_digits]) == 2
    _one_line_error(capsys, "is not the data these samples were drawn from")
    assert first.read_text() == before
    assert main(["score", str(first), "--data", RG]) == 0
    assert '"correct": null' not in first.read_text()


def test_train_rm_checks_the_samples_data_and_says_what_it_left_out(tmp_path, capsys):
    samples = _samples(tmp_path / "s.jsonl", pids=("chain_sum:3:0", "chain_sum:3:1", "chain_sum:3:2"))
    lines = samples.read_text().splitlines()
    lines[-1] = lines[-1].replace('"correct": false', '"correct": null')
    samples.write_text("\n".join(lines) + "\n")
    args = ["train-rm", "--samples", str(samples), "--backbone", str(TINY_TEACHER), "--val-fraction", "0"]
    assert main([*args, "--out", str(tmp_path / "rm0"), "--data", RG.replace("max_digits=1", "max_digits=3")]) == 2
    _one_line_error(capsys, "is not the data these samples were drawn from")
    assert not (tmp_path / "rm0").exists()
    assert main([*args, "--out", str(tmp_path / "rm"), "--data", RG]) == 0
    out = capsys.readouterr().out
    assert "on 5 completions" in out and "1 ungraded samples left out" in out, out


def test_report_refuses_a_folder_it_did_not_write_and_rewrites_its_own(tmp_path, capsys):
    samples = _samples(tmp_path / "s.jsonl")
    d = tmp_path / "d"
    d.mkdir()
    (d / "report.md").write_text("mine\n")
    assert main(["report", str(samples), "--out", str(d), "--no-plots"]) == 2
    _one_line_error(capsys, f"--out {d} holds other files", "choose a new --out")
    assert (d / "report.md").read_text() == "mine\n" and sorted(p.name for p in d.iterdir()) == ["report.md"]
    rep = tmp_path / "rep"
    for _ in range(2):  # into a new folder, then into its own previous output
        assert main(["report", str(samples), "--out", str(rep), "--no-plots"]) == 0
    (rep / "notes.txt").write_text("kept\n")  # a report folder with the user's notes beside it is still a report folder
    assert main(["report", str(samples), "--out", str(rep), "--no-plots"]) == 0
    assert (rep / "notes.txt").read_text() == "kept\n"
