"""`thinkfast demo --quick`: the whole pipeline on the embedded teacher, its outputs, resume and refusal."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from thinkfast import demo as demo_module
from thinkfast.cli import main
from thinkfast.data import load_problems
from thinkfast.eval.samples import read_samples

ROLES = {"teacher": "teacher", "llamba": "llamba", "hybrid": "hybrid"}


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def test_quick_demo_writes_the_report_contract(quick_demo):
    m = json.loads((quick_demo / "metrics.json").read_text())
    assert m["wall_seconds"] > 0 and load_problems(m["dataset"])  # the held-out spec reads back
    assert set(m["models"]) == set(ROLES)
    for name, role in ROLES.items():
        entry = m["models"][name]
        assert entry["role"] == role
        assert set(entry["pass_at_k"]) == {"1", "2", "4"}  # --quick: n = 4
        for key in ("maj_at_k", "pass_at_k"):
            assert all(0.0 <= v <= 1.0 for v in entry[key].values())
        assert entry["seconds_per_sample"] > 0 and entry["tokens_per_second"] > 0
        assert "bon_at_k" in entry and "weighted_bon_at_k" in entry
        model = AutoModelForCausalLM.from_pretrained(quick_demo / "models" / name)
        assert model.config.role == role and (quick_demo / "models" / name / "tokenizer.json").is_file()
    assert [c["claim"] for c in m["claims"]]  # each target is stated with what was measured
    compared = [c for c in m["claims"][:-1] if "target" in c]  # every claim against the teacher but the wall time
    assert len(compared) == 4 and all("margin_ci" in c for c in compared)  # pass@1 ratios, fixed-time claims
    for c in compared:
        lo, hi = c["margin_ci"]
        assert lo <= c["margin"] <= hi and c["problems"] == len(load_problems(m["dataset"]))
        assert c["margin"] == pytest.approx(c["measured"] - c["target"], abs=1e-9)
    wall = m["claims"][-1]  # the wall-time target, checked on the demo's own clock
    assert wall["claim"] == "whole demo within 3 minutes wall"
    assert wall["held"] == (m["wall_seconds"] <= 180) and wall["measured"] == pytest.approx(m["wall_seconds"] / 60)
    for png in ("coverage_vs_k.png", "coverage_vs_seconds.png", "accuracy_vs_k.png", "accuracy_vs_seconds.png"):
        assert (quick_demo / png).stat().st_size > 1000
    report = (quick_demo / "report.md").read_text()
    assert "DID NOT HOLD" in report or "held" in report
    # accuracy by the held-out sums' number of terms, the same problems as the whole table
    assert m["by_group"]["field"] == "terms" and "## By terms" in report
    for name in ROLES:
        groups = m["by_group"]["models"][name]
        assert sum(g["problems"] for g in groups.values()) == len(load_problems(m["dataset"]))
        assert all(2 <= int(terms) <= 8 for terms in groups)
    # each stage's held-out loss, read back from the students' training logs, beside the teacher's CE on those rows
    env = m["demo"]["environment"]  # what each step ran under: the numbers repeat only where it is the same
    assert list(env) == list(demo_module.STEPS) and all(e["torch"] == torch.__version__ for e in env.values())
    assert len({json.dumps(e) for e in env.values()}) == 1 and "different environments" not in report
    held = m["demo"]["held_out_loss"]
    assert list(held["llamba"]) == ["matrix", "hidden", "kd", "sft"] and list(held["hybrid"]) == ["hidden", "sft"]
    assert held["rows"] == 8 and load_problems(held["spec"]) and "no model of the run trained on" in held["selection"]
    for name in ("llamba", "hybrid"):
        logged = [json.loads(x) for x in (quick_demo / "work" / name / "train_log.jsonl").read_text().splitlines()]
        assert held[name]["sft"] == [r["eval_loss"] for r in logged if r.get("stage") == "sft" and "eval_loss" in r][-1]
    assert 0 < held["teacher_sft"] < held["llamba"]["sft"]  # the trained teacher fits them better than a --quick student
    assert f"The teacher's CE on the same solutions: {held['teacher_sft']:.4g}" in report
    # a verifier needs right and wrong training completions: --quick's reward-model problems are short sums, whose
    # chains fit its 160 tokens (longer ones were all cut short and wrong: no reward model, no Best-of-N, ever)
    assert m["models"]["teacher"]["bon_at_k"] and m["models"]["teacher"]["weighted_bon_at_k"]
    assert "Best-of-4 with the reward model" in report and "no reward model" not in report
    rm_problems = [json.loads(line) for line in (quick_demo / "data" / "rm_train.jsonl").read_text().splitlines()]
    assert len(rm_problems) == 4 and all(p["terms"] == 2 for p in rm_problems)


def test_summary_says_what_the_verifier_adds_over_voting():
    def entry(p1, bon, wbon, maj):
        return {"pass_at_k": {"1": p1, "8": p1}, "bon_at_k": {"1": p1, "8": bon}, "weighted_bon_at_k": {"1": p1, "8": wbon},
                "maj_at_k": {"1": p1, "8": maj}, "seconds_per_sample": 0.1}
    metrics = {"models": {"teacher": entry(0.5, 0.9, 0.91, 0.8), "hybrid": entry(0.6, 0.95, 0.96, 0.85)}}
    lines = demo_module.summary_notes(metrics, [], 60.0)
    assert ("Best-of-8 with the reward model (weighted; majority vote): teacher 0.900 (0.910; 0.800); "
            "hybrid 0.950 (0.960; 0.850).") in lines
    metrics["models"]["teacher"]["bon_at_k"] = metrics["models"]["hybrid"]["bon_at_k"] = None  # no reward model
    assert not any("Best-of" in line for line in demo_module.summary_notes(metrics, [], 60.0))


def test_paired_margin_separates_settled_claims_from_noise():
    teacher = {f"p{i}": (0.5, 0.5) for i in range(40)}
    better = {p: (0.7, 0.5) for p in teacher}  # 0.2 above on every problem
    assert demo_module.paired_margin(better, teacher, 0) == {"margin": pytest.approx(0.2), "margin_ci": [pytest.approx(0.2)] * 2,
                                                               "problems": 40}
    # the same mean margin carried by one problem in 40: the interval reaches zero
    lucky = {p: (0.5 + (8.0 if i == 0 else 0.0), 0.5) for i, p in enumerate(teacher)}
    m = demo_module.paired_margin(lucky, teacher, 0)
    assert m["margin"] == pytest.approx(0.2) and m["margin_ci"][0] <= 0 < m["margin_ci"][1]
    # scale: pass@1 >= 0.8 x the teacher's, paired per problem; problems only one side has are left out
    scaled = demo_module.paired_margin({**{p: (0.4, 0.0) for p in teacher}, "extra": (1.0, 1.0)}, teacher, 0, 0.8)
    assert scaled["margin"] == pytest.approx(0.0) and scaled["problems"] == 40
    # the majority-vote entry is read when asked for
    assert demo_module.paired_margin(better, {p: (0.5, 0.9) for p in teacher}, 1)["margin"] == pytest.approx(-0.4)
    line = demo_module.summary_notes({"models": {}}, [{"claim": "c", "measured": 0.99, "target": 0.98, "held": True, **m}], 1.0)[-1]
    assert line.startswith("held: c: measured 0.990 (target 0.980; margin +0.200") and "40 problems cannot settle it" in line
    # a bound just under zero keeps its sign readable (three decimals would print -0.000, as in a real run)
    near = {"claim": "c", "measured": 0.997, "target": 0.991, "held": True, "margin": 0.0055,
            "margin_ci": [-0.00022, 0.0125], "problems": 40}
    line = demo_module.summary_notes({"models": {}}, [near], 1.0)[-1]
    assert "[-2.2e-04, +0.013]" in line and "-0.000" not in line and "cannot settle it" in line


def test_demo_samples_can_be_reproduced_with_thinkfast_sample(quick_demo, capsys):
    m = json.loads((quick_demo / "metrics.json").read_text())
    settings = m["demo"]["settings"]
    samples = quick_demo / "samples" / "llamba.jsonl"
    before = samples.read_bytes()
    # the same configuration from the command line: everything is already there, nothing is redone
    rc = main(["sample", "--model", str(quick_demo / "models" / "llamba"), "--data", m["dataset"], "--n", str(settings["n"]),
               "--temperature", str(settings["temperature"]), "--top-p", str(settings["top_p"]),
               "--max-new-tokens", str(settings["max_new_tokens"]), "--seed", str(settings["seed"]),
               "--out", str(samples), "--quiet"])
    assert rc == 0 and "nothing to do" in capsys.readouterr().out
    assert samples.read_bytes() == before
    assert len(read_samples(samples).samples) == settings["problems"] * settings["n"]


def test_rerun_skips_finished_steps_and_other_settings_are_refused(quick_demo, capsys):
    state = json.loads((quick_demo / "demo.json").read_text())
    assert state["done"] == list(demo_module.STEPS)
    assert main(["demo", "--quick", "--out", str(quick_demo), "--no-progress"]) == 0
    assert "done in an earlier run" in capsys.readouterr().out
    assert main(["demo", "--quick", "--n", "2", "--out", str(quick_demo), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0]


def test_interrupted_demo_continues_from_the_last_finished_step(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    calls = []
    original = demo_module.Demo.step_hybrid

    def crash(self):
        calls.append("crash")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_module.Demo, "step_hybrid", crash)
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 130
    assert json.loads((out / "demo.json").read_text())["done"] == ["data", "teacher", "llamba"]
    monkeypatch.setattr(demo_module.Demo, "step_hybrid", original)
    monkeypatch.setattr(demo_module.Demo, "step_llamba", lambda self: calls.append("llamba again"))
    state = json.loads((out / "demo.json").read_text())  # as if the first part had run under another torch
    state["environment"]["llamba"]["torch"] = "2.4.0"
    (out / "demo.json").write_text(json.dumps(state))
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert calls == ["crash"]  # the finished llamba step was not redone
    assert json.loads((out / "demo.json").read_text())["done"] == list(demo_module.STEPS)
    # the report says the resumed run mixed environments, and which step ran under which
    env = json.loads((out / "metrics.json").read_text())["demo"]["environment"]
    assert env["llamba"]["torch"] == "2.4.0" and env["hybrid"]["torch"] == torch.__version__
    report = (out / "report.md").read_text()
    assert "llamba: torch 2.4.0" in report and "different environments" in report


def test_a_student_as_teacher_is_refused_before_anything_is_written(quick_demo, tmp_path, capsys):
    """Refused only at the teacher step, it left a demo.json that refused the corrected command."""
    out = tmp_path / "run"
    assert main(["demo", "--quick", "--teacher", str(quick_demo / "models" / "llamba"), "--out", str(out)]) == 2
    assert "a thinkfast llamba, not an all-attention teacher" in capsys.readouterr().err
    assert not out.exists()


def test_held_out_rows_leave_out_every_trained_question(tmp_path):
    """The held-out loss rows were drawn without that check: 14 of the demo's 64 were training questions."""
    from thinkfast.data.sources import load_questions
    from thinkfast.embedded import TEACHER_SPEC

    d = demo_module.Demo(tmp_path / "run", demo_module.DemoSettings(), progress=False, log=lambda m: None)
    rows = d.eval_problems()
    assert len(rows) == 64 and not {p.question for p in rows} & set(load_questions(TEACHER_SPEC))
    assert not {p.question for p in rows} & set(load_questions(d.distill_spec))
    drawn = load_problems(demo_module.sums_spec(64, demo_module.EVAL_SEED))
    assert {p.question for p in drawn} & d.trained_questions()  # the old draw held some: the check does work


def test_out_folder_with_other_content_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_hybrid_keeps_attention_where_stage_two_was_hardest(tmp_path):
    d = demo_module.Demo(tmp_path / "run", demo_module.DemoSettings.quick_settings(), progress=False, log=lambda m: None)
    assert d.hybrid_attention_layers() is None  # no Llamba run yet: the evenly spread default
    log = d.out / "work" / "llamba" / "train_log.jsonl"
    log.parent.mkdir(parents=True)
    rows = [{"stage": "hidden", "step": 1, "layer0": 9.0, "layer1": 1.0, "layer2": 2.0, "layer3": 3.0},
            {"stage": "hidden", "step": 2, "layer0": 4.1, "layer1": 2.0, "layer2": 2.0, "layer3": 11.6},
            {"stage": "hidden", "step": 2, "eval_loss": 5.0, "eval_layer0": 20.0, "eval_layer3": 1.0},  # held out
            {"stage": "kd", "step": 1, "loss": 0.5}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert d.hybrid_attention_layers() == [3]  # the last stage-2 record, one layer in four


def test_demo_recipe_keeps_the_stage_order_and_the_tokens_of_every_step():
    s = demo_module.DemoSettings()
    stages = demo_module.distill_stages(s, s.llamba_tokens)
    assert [st.kind for st in stages] == list(s.llamba_tokens)
    assert [st.train.tokens for st in stages] == list(s.llamba_tokens.values())
    # stage 1 may use shorter rows, more of them per step; every other stage one full-length row per step
    shapes = {st.kind: (st.train.batch_size, st.train.seq_len) for st in stages}
    assert shapes.pop("matrix") == (s.distill_batch * s.seq_len // s.matrix_seq_len, s.matrix_seq_len)
    assert set(shapes.values()) == {(s.distill_batch, s.seq_len)}
    assert [st.loss for st in stages if st.kind == "kd"] == [s.kd_loss]
    longer = demo_module.distill_stages(demo_module.DemoSettings(seq_len=1024, distill_batch=2), {"matrix": 8192})[0]
    assert (longer.train.seq_len, longer.train.batch_size) == (s.matrix_seq_len, 4)


def test_demo_rows_hold_the_longest_worked_example_whole():
    # a cut example never shows a student how a long sum ends: the rows must hold the longest one the
    # distillation split can draw (8 terms of 3 digits, a carry in every column)
    from transformers import AutoTokenizer

    from thinkfast.data.packing import encode_problems, pack_examples
    from thinkfast.data.prompts import PromptStyle
    from thinkfast.data.sources import Problem
    from thinkfast.data.worked import sum_solution
    from thinkfast.embedded import PROMPT_STYLE, TINY_TEACHER

    s = demo_module.DemoSettings()
    assert not s.pack
    tok = AutoTokenizer.from_pretrained(TINY_TEACHER)
    expression = " + ".join(["999"] * 8)
    worst = Problem("worst", f"Calculate {expression}.", str(999 * 8), "number", sum_solution(expression))
    examples = encode_problems([worst], tok, PromptStyle(**PROMPT_STYLE))
    assert 1000 < len(examples[0].ids) <= s.seq_len
    rows = pack_examples(examples, s.seq_len, pad_id=0, pack=s.pack)
    assert rows.n_truncated == 0
    assert s.max_new_tokens >= len(examples[0].ids) - examples[0].n_prompt  # and sampling can write it out


@pytest.mark.parametrize("student", ["llamba", "hybrid"])
def test_shipped_tiny_recipes_are_the_demo_recipe(student):
    from thinkfast.distill.recipes import load_recipe, make_plan

    s = demo_module.DemoSettings()
    plan = make_plan(load_recipe(f"tiny-{student}"), {})
    ours = demo_module.distill_stages(s, getattr(s, f"{student}_tokens"))
    assert plan.student == student and plan.data.pack == s.pack
    assert plan.ssm_param == (s.llamba_ssm_param if student == "llamba" else None)  # None: the hybrid's default, mamba2
    keys = ("tokens", "lr", "warmup", "batch_size", "seq_len", "weight_decay", "min_lr_ratio", "schedule", "grad_clip")
    assert [(st.kind, st.loss if st.kind == "kd" else None, [getattr(st.train, k) for k in keys]) for st in plan.stages] == \
           [(st.kind, st.loss, [getattr(st.train, k) for k in keys]) for st in ours]
