"""Samples files -> reports: validation of lines, time axes, metrics.json schema, plots, CLI errors."""

import json
import random

import numpy as np
import pytest

from thinkfast.cli import main as cli
from thinkfast.errors import DataError, command_line
from thinkfast.eval.metrics import pass_at_k
from thinkfast.eval.report import build_report
from thinkfast.eval.samples import read_samples


def make_samples(path, model, role, p_correct, seconds, n=8, problems=12, hardware="cpu: test", rewards=True, seed=0):
    rng = random.Random(seed)
    rows = []
    for p in range(problems):
        gold = str(7 * p)
        for i in range(n):
            ok = rng.random() < p_correct
            ans = gold if ok else rng.choice([str(7 * p + 1), str(7 * p + 2), None])
            rows.append(dict(
                problem_id=f"gsm8k_test:{p}", sample_idx=i, model=model, role=role,
                completion=f"work\n#### {ans}" if ans else "no idea", answer=ans, gold=gold, kind="gsm8k",
                correct=ans == gold, grade_error=None, reward=(0.5 * ok + 0.5 * rng.random()) if rewards else None,
                gen_tokens=100, prompt_tokens=30, seconds=seconds, seed=i, finish_reason="stop", hardware=hardware, config="c0",
            ))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.fixture()
def runs(tmp_path):
    make_samples(tmp_path / "teacher.jsonl", "teacher", "teacher", 0.6, 0.4, seed=1)
    make_samples(tmp_path / "llamba.jsonl", "llamba", "llamba", 0.4, 0.1, seed=2)
    return [tmp_path / "teacher.jsonl", tmp_path / "llamba.jsonl"]


# ------------------------------------------------------------------------------------------ reading


def test_reader_groups_by_model_and_problem(runs):
    sset = read_samples(runs)
    by = sset.by_model()
    assert list(by) == ["teacher", "llamba"]
    assert len(by["teacher"]) == 12 and all(len(v) == 8 for v in by["teacher"].values())
    assert [s.sample_idx for s in by["llamba"]["gsm8k_test:3"]] == list(range(8))


def test_same_file_twice_counts_once(runs):
    sset = read_samples([runs[0], runs[0]])
    assert len(sset.samples) == 96 and sset.duplicates == 96


@pytest.mark.parametrize("mutate,match", [
    (lambda line: line[:-5], "not valid JSON"),
    (lambda line: line.replace('"gold": "7"', '"gold": ""'), "missing gold"),
    (lambda line: line.replace('"kind": "gsm8k"', '"kind": "algebra"'), "kind='algebra'"),
    (lambda line: line.replace('"correct": ', '"correct": "yes", "x": '), "correct='yes'"),
    (lambda line: line.replace('"seconds": 0.4', '"seconds": -1'), "seconds"),
])
def test_malformed_line_names_file_and_line(runs, mutate, match):
    lines = runs[0].read_text().splitlines()
    lines[9] = mutate(lines[9])  # line 10 is problem 1's second sample (gold "7")
    runs[0].write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=match) as e:
        read_samples(runs)
    assert f"{runs[0]}:10:" in str(e.value) and "pass skip_bad_lines=True to skip it" in str(e.value)
    with command_line(), pytest.raises(DataError, match="pass --skip-bad-lines to skip it"):
        read_samples(runs)
    sset = read_samples(runs, skip_bad_lines=True)
    assert len(sset.bad) == 1 and sset.bad[0].line == 10
    assert len(sset.samples) == 2 * 96 - 1


# ------------------------------------------------------------------------------------------ report


def test_report_files_and_schema(runs, tmp_path):
    out = tmp_path / "report"
    spec = write_levels(tmp_path / "problems.jsonl")  # the problems the samples carry the answers of
    m = build_report(runs, out, dataset=spec, wall_seconds=12.5, summary_notes="Students win.")
    for name in ("report.md", "metrics.json", "coverage_vs_k.png", "coverage_vs_seconds.png", "accuracy_vs_k.png",
                 "accuracy_vs_seconds.png", "pareto.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["wall_seconds"] == 12.5 and on_disk["dataset"] == spec
    assert set(on_disk["models"]) == {"teacher", "llamba"}
    t = on_disk["models"]["teacher"]
    assert t["role"] == "teacher"
    for key in ("pass_at_k", "maj_at_k", "bon_at_k", "weighted_bon_at_k"):
        assert list(t[key]) == ["1", "2", "4", "8"], key
        assert all(0.0 <= v <= 1.0 for v in t[key].values())
        assert all(lo <= t[key][k] <= hi for k, (lo, hi) in t[key + "_ci"].items())
    assert t["seconds_per_sample"] == pytest.approx(0.4)
    assert t["seconds_per_problem"]["4"] == pytest.approx(1.6)  # k x seconds per sample
    assert t["tokens_per_second"] == pytest.approx(100 / 0.4)
    # pass@k is the mean of the per-problem unbiased estimates
    rows = [json.loads(x) for x in runs[0].read_text().splitlines()]
    per = [pass_at_k(8, sum(r["correct"] for r in rows if r["problem_id"] == f"gsm8k_test:{p}"), 2) for p in range(12)]
    assert t["pass_at_k"]["2"] == pytest.approx(np.mean(per))
    # the faster model owns the cheap end of the Pareto front
    assert on_disk["pareto"]["pass_at_k"][0]["model"] == "llamba"
    text = (out / "report.md").read_text()
    assert "Students win." in text and "![coverage vs k](coverage_vs_k.png)" in text
    assert m["models"]["llamba"]["pass_at_k"] == on_disk["models"]["llamba"]["pass_at_k"]


def test_report_without_rewards_has_null_bon(tmp_path):
    make_samples(tmp_path / "a.jsonl", "a", "hybrid", 0.5, 0.2, rewards=False)
    m = build_report([tmp_path / "a.jsonl"], tmp_path / "r", plots=False)
    assert m["models"]["a"]["bon_at_k"] is None and m["models"]["a"]["maj_at_k"]["8"] >= 0


def test_problems_not_shared_are_left_out(tmp_path):
    make_samples(tmp_path / "a.jsonl", "a", "teacher", 0.5, 0.2, problems=12)
    make_samples(tmp_path / "b.jsonl", "b", "llamba", 0.5, 0.1, problems=9)
    m = build_report([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "r", plots=False)
    assert m["n_problems"] == 9 and m["models"]["a"]["n_problems"] == 9
    assert any("3 problem(s)" in n for n in m["notes"])


def test_mixed_hardware_is_refused_unless_allowed(tmp_path):
    make_samples(tmp_path / "a.jsonl", "a", "teacher", 0.5, 0.2, hardware="NVIDIA H100")
    make_samples(tmp_path / "b.jsonl", "b", "llamba", 0.5, 0.1, hardware="cpu")
    with pytest.raises(DataError, match="different hardware"):
        build_report([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "r", plots=False)
    m = build_report([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "r", plots=False, allow_mixed_hardware=True)
    assert m["hardware"] is None and any("not comparable" in n for n in m["notes"])
    # one model's own samples timed on two (a run resumed with other --threads): named as that
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    lines[-1] = lines[-1].replace('"NVIDIA H100"', '"NVIDIA H100 (2 GPUs)"')
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"model 'a'\'s samples were timed on 2 machines or thread counts") as e:
        build_report([tmp_path / "a.jsonl"], tmp_path / "r2", plots=False)
    assert "resumed" in str(e.value) and "NVIDIA H100 (2 GPUs)" in str(e.value)


def test_json_errors_read_as_one_sentence(tmp_path):
    bad = tmp_path / "s.jsonl"
    bad.write_text('{"problem_id": "a\tb"}\n')  # a raw tab inside a JSON string
    with pytest.raises(DataError, match=r"not valid JSON \(Invalid control character at column \d+\)"):
        read_samples(bad)


def test_cli_report_and_errors(runs, tmp_path, capsys):
    assert cli(["report", *map(str, runs), "--out", str(tmp_path / "r"), "--no-plots", "--subsets", "32", "--bootstrap", "50"]) == 0
    assert "pass@8" in capsys.readouterr().out
    assert cli(["report", *map(str, runs), "--out", str(tmp_path / "r"), "--ks", "1,16", "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "k=16 is larger than the 8 samples" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    lines = runs[1].read_text().splitlines()
    lines[3] = "{not json"
    runs[1].write_text("\n".join(lines) + "\n")
    assert cli(["report", *map(str, runs), "--out", str(tmp_path / "r"), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert f"{runs[1]}:4:" in err and len(err.strip().splitlines()) == 1
    assert cli(["report", *map(str, runs), "--out", str(tmp_path / "r"), "--no-plots", "--skip-bad-lines"]) == 0
    assert cli(["report", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "r")]) == 2


def test_a_tie_at_a_budget_is_reported_as_a_tie(tmp_path):
    # every sample correct for both models: at every budget both reach 1.0, so neither is "best"
    a = make_samples(tmp_path / "a.jsonl", "a", "teacher", 1.0, 0.4, n=4, problems=3)
    b = make_samples(tmp_path / "b.jsonl", "b", "llamba", 1.0, 0.1, n=4, problems=3)
    assert all(r["correct"] for r in a + b)
    m = build_report([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "rep", plots=False)
    rows = m["budgets"]["pass_at_k"]
    assert rows and all(r["winner"] is None and r["tied"] == ["a", "b"] for r in rows)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| tie: a, b |" in md
    # a clear winner is still named, and the tie list stays empty
    make_samples(tmp_path / "c.jsonl", "c", "llamba", 0.0, 0.1, n=4, problems=3)
    m = build_report([tmp_path / "a.jsonl", tmp_path / "c.jsonl"], tmp_path / "rep2", plots=False)
    assert all(r["winner"] == "a" and r["tied"] == [] for r in m["budgets"]["pass_at_k"])


# ------------------------------------------------------------------------------------------ by group


def write_levels(path, problems=12, skip=()):
    """A jsonl data file for make_samples' problems: ids gsm8k_test:P, a `level` field (P % 3) except for `skip`."""
    rows = []
    for p in range(problems):
        row = {"id": f"gsm8k_test:{p}", "question": f"q{p}", "answer": str(7 * p)}
        if p not in skip:
            row["level"] = f"Level {p % 3 + 1}"
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"jsonl:{path}?id=id&kind=gsm8k"


def test_report_breaks_accuracy_down_by_a_field_of_the_problems(runs, tmp_path):
    spec = write_levels(tmp_path / "problems.jsonl")
    m = build_report(runs, tmp_path / "r", dataset=spec, group_by="level", plots=False, n_subsets=32, n_boot=20)
    assert m["by_group"]["field"] == "level"
    rows = [json.loads(line) for line in runs[1].read_text().splitlines()]
    for level in (1, 2, 3):
        got = m["by_group"]["models"]["llamba"][f"Level {level}"]
        mine = [r for r in rows if int(r["problem_id"].split(":")[1]) % 3 == level - 1]
        assert got["problems"] == 4
        assert got["pass_at_1"] == pytest.approx(np.mean([r["correct"] for r in mine]))
        solved = {r["problem_id"] for r in mine if r["correct"]}
        assert got["pass_at_8"] == pytest.approx(len(solved) / 4)
        assert 0 <= got["maj_at_8"] <= got["pass_at_8"]
    # the groups' problem-weighted mean is the whole set's pass@1
    whole = sum(g["pass_at_1"] * g["problems"] for g in m["by_group"]["models"]["llamba"].values()) / 12
    assert whole == pytest.approx(m["models"]["llamba"]["pass_at_k"]["1"])
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## By level" in md and "| Level 2 | 4 |" in md and "llamba pass@1" in md


def test_problems_without_the_field_form_their_own_group(runs, tmp_path):
    spec = write_levels(tmp_path / "problems.jsonl", skip=(0, 1))
    m = build_report(runs, tmp_path / "r", dataset=spec, group_by="level", plots=False, n_subsets=8, n_boot=10)
    groups = m["by_group"]["models"]["teacher"]
    assert groups["(none)"]["problems"] == 2 and sum(g["problems"] for g in groups.values()) == 12
    assert any("2 problem(s) of the data have no 'level'" in n for n in m["notes"])


def test_grouping_errors_are_one_line(runs, tmp_path, capsys):
    spec = write_levels(tmp_path / "problems.jsonl")
    with pytest.raises(DataError, match=r"no problem of .* has a field 'subject' to group by \(fields: level\)"):
        build_report(runs, tmp_path / "r", dataset=spec, group_by="subject", plots=False)
    assert cli(["report", *map(str, runs), "--out", str(tmp_path / "r"), "--no-plots", "--by", "level"]) == 2
    err = capsys.readouterr().err
    assert "--dataset SPEC" in err and len(err.strip().splitlines()) == 1
    assert cli(["report", *map(str, runs), "--out", str(tmp_path / "r"), "--no-plots", "--dataset", spec, "--by", "level",
                "--subsets", "8", "--bootstrap", "10"]) == 0
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["by_group"]["field"] == "level"


def test_ks_without_1_and_max_k_name_their_columns(runs, tmp_path, capsys):
    # the Models table once read pass@1 whatever k were chosen (a KeyError without k=1, a pass@n column holding pass@4)
    assert cli(["report", *map(str, runs), "--out", str(tmp_path / "r"), "--no-plots", "--ks", "2,4"]) == 0
    text = (tmp_path / "r" / "report.md").read_text()
    assert "| pass@2 | pass@4 | maj@4 | BoN@4 | wBoN@4 |" in text and "| pass@1 |" not in text
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert f"| {m['models']['teacher']['pass_at_k']['2']:.3f} | {m['models']['teacher']['pass_at_k']['4']:.3f} |" in text
    assert cli(["report", *map(str, runs), "--out", str(tmp_path / "r"), "--no-plots", "--max-k", "4"]) == 0
    assert "| pass@1 | pass@4 | maj@4 |" in (tmp_path / "r" / "report.md").read_text()
    # models with different k: each cell says its k
    make_samples(tmp_path / "c.jsonl", "c", "hybrid", 0.5, 0.2, n=4)
    assert cli(["report", str(runs[0]), str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "r2"), "--no-plots"]) == 0
    text = (tmp_path / "r2" / "report.md").read_text()
    assert "| pass@1 | pass@(largest k) | maj@(largest k) |" in text and "(k=8)" in text and "(k=4)" in text


def test_ungraded_samples_are_refused_when_none_is_graded_and_noted_otherwise(tmp_path, capsys):
    rows = make_samples(tmp_path / "a.jsonl", "a", "teacher", 0.5, 0.2, rewards=False)
    for r in rows:
        r["correct"] = None
    (tmp_path / "u.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli(["report", str(tmp_path / "u.jsonl"), "--out", str(tmp_path / "r"), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "none of its 96 samples is graded" in err and "thinkfast score" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
    # some ungraded: reported, said on the console, and counted as their answers' grades (maj@1 = pass@1 still)
    rows = make_samples(tmp_path / "a.jsonl", "a", "teacher", 0.5, 0.2, rewards=False)
    for r in rows[::2]:
        r["correct"] = None
    (tmp_path / "h.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli(["report", str(tmp_path / "h.jsonl"), "--out", str(tmp_path / "r"), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "note: a: 48 ungraded sample(s)" in out
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())["models"]["a"]
    assert m["ungraded"] == 48 and m["maj_at_k"]["1"] == pytest.approx(m["pass_at_k"]["1"])
    full = build_report([tmp_path / "a.jsonl"], tmp_path / "full", plots=False)["models"]["a"]
    # an ungraded right answer counts where another sample of its problem has it graded, not elsewhere
    by_problem = {}
    for r in rows:
        by_problem.setdefault(r["problem_id"], []).append(r)
    expected = np.mean([r["correct"] is True or (r["correct"] is None and any(o["correct"] and o["answer"] == r["answer"] for o in rs))
                        for rs in by_problem.values() for r in rs])
    assert m["pass_at_k"]["1"] == pytest.approx(expected) and m["accuracy"] == pytest.approx(expected)
    assert np.mean([r["correct"] is True for r in rows]) < expected < full["pass_at_k"]["1"]


def test_a_report_rewritten_without_plots_drops_the_old_ones(runs, tmp_path):
    out = tmp_path / "r"
    first = build_report(runs, out, n_boot=20)
    assert first["plots"] and all((out / p).exists() for p in first["plots"])
    (out / "mine.png").write_bytes(b"not ours")
    build_report(runs[:1], out, n_boot=20, plots=False)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "mine.png", "report.md"]


@pytest.mark.parametrize("theirs", ["report.md", "metrics.json", "pareto.png"])
def test_build_report_never_replaces_a_file_no_report_wrote(runs, tmp_path, theirs):
    """The Python API writes into any folder (as save_pretrained does), but a report.md, metrics.json or plot of
    someone else's there is refused, not replaced; the user's other files and a report's own files are fine."""
    from thinkfast.errors import ConfigError

    out = tmp_path / "mine"
    out.mkdir()
    (out / theirs).write_text("keep me\n")
    (out / "notes.txt").write_text("kept\n")
    with pytest.raises(ConfigError, match=rf"out_dir {out}: its {theirs} did not come from a thinkfast report"):
        build_report(runs, out, n_boot=20, plots=False)
    assert sorted(p.name for p in out.iterdir()) == sorted([theirs, "notes.txt"])
    assert (out / theirs).read_text() == "keep me\n"
    (out / theirs).unlink()
    for _ in range(2):  # beside other files, then over its own report
        build_report(runs, out, n_boot=20)
    assert (out / "notes.txt").read_text() == "kept\n"
