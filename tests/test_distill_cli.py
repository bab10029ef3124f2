"""`thinkfast distill` / `thinkfast sft`: outputs, recipes with flag overrides, and bad input (one line, exit 2,
existing checkpoints untouched)."""

import json
from pathlib import Path

import pytest

from conftest import folder_bytes_by_file, write_distill_files
from thinkfast.cli import main
from thinkfast.distill.recipes import RECIPE_DIR, load_recipe, make_plan
from thinkfast.distill.toy import char_tokenizer
from thinkfast.errors import ConfigError




@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_distill_files(tmp_path_factory.mktemp("cli"), char_tokenizer(), teachers=(("teacher", 32), ("other", 48)))


def _args(root, out, *extra):
    return ["distill", "--teacher", str(root / "teacher"), "--data", f"jsonl:{root}/chain.jsonl?solution=solution",
            "--seq-len", "64", "--batch-size", "2", "--instruction", "none", "--no-progress", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def good_run(files):
    out = files / "good"
    assert main(_args(files, out, "--stages", "matrix,kd", "--tokens", "256,384")) == 0
    return out


def test_distill_writes_a_loadable_model_with_tokenizer_and_log(good_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(good_run)
    assert model.config.role == "llamba"
    assert AutoTokenizer.from_pretrained(good_run).decode([44]) == "H"
    recs = [json.loads(x) for x in (good_run / "train_log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in recs} == {"matrix", "kd"}
    assert max(r["step"] for r in recs if r["stage"] == "matrix") == 2  # 256 tokens / (2 x 64)
    assert max(r["step"] for r in recs if r["stage"] == "kd") == 3


def test_sft_command_and_flag_overrides_recipe(files, good_run, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('stages = ["sft"]\nlr = 1e-9\nseq_len = 32\n[sft]\ntokens = "1M"\nbatch_size = 2\n')
    out = tmp_path / "sft"
    rc = main(["sft", "--model", str(good_run), "--recipe", str(recipe), "--data",
               f"jsonl:{files}/chain.jsonl?solution=solution", "--tokens", "128", "--lr", "1e-3", "--seq-len", "64",
               "--instruction", "none", "--no-progress", "--out", str(out)])  # a bare prompt leaves room for the solution
    assert rc == 0
    run = json.loads((out / "run.json").read_text())
    train = run["stages"][0]["train"]
    assert (train["tokens"], train["seq_len"], train["batch_size"]) == (128, 64, 2)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["lr"] == 1e-3
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_length_grouped_one_example_rows_from_the_cli(files, tmp_path):
    out = tmp_path / "grouped"
    assert main(_args(files, out, "--stages", "sft", "--tokens", "2000", "--no-pack", "--group-by-length",
                      "--batch-size", "4", "--seq-len", "256")) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["stages"][0]["train"]["batch_size"] == 4 and run["data"]["group_by_length"] is True
    assert (out / "model.safetensors").is_file()


def test_students_learn_on_the_prompts_their_teacher_declares(files, tmp_path):
    """No --instruction and none in the recipe: the teacher's declared prompt style (the embedded teacher's bare
    question), not "auto", which would append an answer-format line the teacher never saw."""
    from thinkfast.models import ThinkfastForCausalLM

    teacher = ThinkfastForCausalLM.from_pretrained(files / "teacher")
    teacher.config.prompt_style = {"instruction": "none"}
    teacher.save_pretrained(tmp_path / "teacher")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "teacher" / f).write_bytes((files / "teacher" / f).read_bytes())
    recipe = tmp_path / "r.toml"
    recipe.write_text('stages = ["sft"]\nseq_len = 64\nbatch_size = 2\n[sft]\ntokens = 128\ndata = ["jsonl:%s/chain.jsonl?solution=solution"]\n' % files)
    runs = {}
    for name, extra in (("declared", []), ("flag", ["--instruction", "Go."])):
        out = tmp_path / name
        assert main(["distill", "--teacher", str(tmp_path / "teacher"), "--recipe", str(recipe), "--no-progress",
                     "--out", str(out), *extra]) == 0
        run = json.loads((out / "run.json").read_text())
        runs[name] = [run["data"]["instruction"]] + [s["data"]["instruction"] for s in run["stages"] if s.get("data")]
        # the student declares the prompts it was trained on: sampled as trained
        declared = {"declared": "none", "flag": "Go."}[name]
        assert json.loads((out / "config.json").read_text())["prompt_style"] == {"instruction": declared}
    assert runs == {"declared": ["none", "none"], "flag": ["Go.", "Go."]}
    plan = make_plan({"stages": ["sft"], "tokens": 64}, {})
    assert plan.data.instruction is None  # resolved against the teacher once it is loaded


def test_student_shape_from_flags_and_recipe(files, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('d_conv = 6\nd_state = 16\n')
    out = tmp_path / "shaped"
    assert main(_args(files, out, "--recipe", str(recipe), "--stages", "matrix", "--tokens", "128", "--d-conv", "9",
                      "--ssm-kv-heads", "4")) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["d_conv"], cfg["d_state"], cfg["ssm_kv_heads"]) == (9, 16, 4)  # the flag wins over the recipe
    from thinkfast.models import ThinkfastForCausalLM

    mixer = ThinkfastForCausalLM.from_pretrained(out).lm.layers[0].mixer
    assert mixer.conv1d.weight.shape[-1] == 9 and mixer.N == 16


def test_a_new_students_gated_norm_groups_from_the_flag(files, tmp_path, capsys):
    from thinkfast.models import ThinkfastForCausalLM

    out = tmp_path / "grouped"
    assert main(_args(files, out, "--student", "hybrid", "--attn-layers", "1", "--stages", "kd", "--tokens", "128",
                      "--ssm-norm-group", "8")) == 0
    model = ThinkfastForCausalLM.from_pretrained(out)
    assert model.model_config.ssm_norm_group == 8 and model.lm.layers[0].mixer.norm.group == 8
    _fails(capsys, _args(files, tmp_path / "d", "--stages", "kd", "--tokens", "128", "--ssm-norm-group", "8"),
           "--ssm-norm-group 8: only the mamba2 parameterisation has a gated RMSNorm")
    _fails(capsys, _args(files, tmp_path / "e", "--student", "hybrid", "--stages", "kd", "--tokens", "128",
                         "--ssm-norm-group", "5"), "--ssm-norm-group 5: must divide the Mamba mixer's width 32")
    _fails(capsys, _args(files, tmp_path / "f", "--student", str(out), "--stages", "kd", "--tokens", "128",
                         "--ssm-norm-group", "16"), "drop --ssm-norm-group 16 (it has ssm_norm_group 8)")
    assert not any((tmp_path / x).exists() for x in "def")


def _fails(capsys, argv, match, after=None):
    """Exit 2 with one error line (`after`: the one line expected before it, from a stage that started)."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [x for x in err.splitlines() if x.strip()]
    if after is not None:
        assert lines and lines[0] == after, err
        lines = lines[1:]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], lines[0]


def test_bad_input_one_line_and_checkpoints_untouched(files, good_run, tmp_path, capsys):
    before = folder_bytes_by_file(good_run)
    # a resume folder from another run, and a rerun without --resume
    _fails(capsys, _args(files, good_run, "--stages", "matrix,kd", "--tokens", "256,512", "--resume"), "other settings")
    _fails(capsys, _args(files, good_run, "--stages", "matrix,kd", "--tokens", "256,384", "--seq-len", "32", "--resume"),
           "other settings")
    _fails(capsys, _args(files, good_run, "--stages", "matrix,kd", "--tokens", "256,384"), "already holds a run")
    # sft into a distill run's folder: named as another command's run (it said "pass --resume", which could not work)
    sft = ["sft", "--model", str(files / "teacher"), "--data", f"jsonl:{files}/chain.jsonl?solution=solution", "--tokens",
           "128", "--no-progress", "--out", str(good_run)]
    for extra in ([], ["--resume"]):
        _fails(capsys, sft + extra, f"{good_run} holds a `thinkfast distill` run, not a `thinkfast sft` one; choose a new --out")
    assert folder_bytes_by_file(good_run) == before
    # mismatched teacher / student
    student = tmp_path / "student"
    from thinkfast.models import ThinkfastForCausalLM, from_teacher

    from_teacher(ThinkfastForCausalLM.from_pretrained(files / "other"), "llamba").save_pretrained(student)
    _fails(capsys, _args(files, tmp_path / "a", "--student", str(student), "--stages", "matrix", "--tokens", "256"),
           "teacher and student configs differ: d_model 32 vs 48")
    # a recipe key that does not exist
    recipe = tmp_path / "bad.toml"
    recipe.write_text('stages = ["kd"]\nlearning_rate = 1e-3\n')
    _fails(capsys, _args(files, tmp_path / "b", "--recipe", str(recipe), "--tokens", "256"), "unknown key 'learning_rate'")
    _fails(capsys, _args(files, tmp_path / "b", "--recipe", "no-such-recipe"), "shipped recipes")
    # a token budget of zero
    _fails(capsys, _args(files, tmp_path / "c", "--stages", "kd", "--tokens", "0"), "token budget 0 must be positive")
    # unreadable data specs
    _fails(capsys, _args(files, tmp_path / "d", "--stages", "kd", "--tokens", "256", "--data", "gsm8k:/nonexistent.jsonl"),
           "does not exist")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "1+1", "answer": "#### 2"}\n{not json\n')
    _fails(capsys, _args(files, tmp_path / "e", "--stages", "kd", "--tokens", "256", "--data", f"gsm8k:{broken}"),
           "broken.jsonl:2: not valid JSON")
    _fails(capsys, _args(files, tmp_path / "f", "--stages", "kd,bogus", "--tokens", "256"), "unknown stage 'bogus'")
    _fails(capsys, _args(files, tmp_path / "g", "--stages", "kd", "--tokens", "256", "--resume"), "nothing to resume at")
    # a student shape that cannot be built, or one given for a saved student
    _fails(capsys, _args(files, tmp_path / "h", "--stages", "kd", "--tokens", "256", "--d-conv", "0"),
           "d_conv='0' must be a whole number of at least 1")
    _fails(capsys, _args(files, tmp_path / "h", "--stages", "kd", "--tokens", "256", "--d-state", "4"),
           "below the teacher's head size 8")
    _fails(capsys, _args(files, tmp_path / "h", "--stages", "kd", "--tokens", "256", "--ssm-kv-heads", "3"), "ssm_kv_heads")
    _fails(capsys, _args(files, tmp_path / "h", "--student", str(good_run), "--stages", "kd", "--tokens", "256",
                         "--d-conv", "8"), "a saved student keeps its shape; drop --d-conv")
    # grouping by length is for one-example rows
    _fails(capsys, _args(files, tmp_path / "i", "--stages", "kd", "--tokens", "256", "--group-by-length"),
           "--group-by-length: group_by_length groups one-example rows")
    assert folder_bytes_by_file(good_run) == before
    for d in "abcdefghi":  # nothing half-made either
        assert not (tmp_path / d / "run.json").exists()


def test_nan_from_the_cli_is_one_line(files, tmp_path, capsys):
    # the stage's budget line comes first (training started), then the one error line
    _fails(capsys, _args(files, tmp_path / "nan", "--stages", "kd", "--tokens", "1024", "--lr", "1e30",
                         "--ckpt-every", "1", "--grad-clip", "0"), "loss became nan at step 2",
           after="kd: 1,024 tokens -> 8 steps of 128 tokens (1,024 trained)")
    # a lower learning rate is allowed on resume (here the step-1 weights are already ruined by lr=1e30,
    # so it diverges again: the point is that the resume is accepted as the same run)
    _fails(capsys, _args(files, tmp_path / "nan", "--stages", "kd", "--tokens", "1024", "--lr", "1e-3",
                         "--ckpt-every", "1", "--grad-clip", "0", "--resume"), "at step 2",
           after="kd: 1,024 tokens -> 8 steps of 128 tokens (1,024 trained); resuming at step 1")


def test_cut_examples_are_warned_once_and_each_stage_says_what_it_trains(files, tmp_path, capsys, caplog):
    spec = f"jsonl:{files}/chain.jsonl?solution=solution"
    with caplog.at_level("WARNING"):
        rc = main(_args(files, tmp_path / "run", "--stages", "kd,sft", "--tokens", "200,128", "--seq-len", "32"))
    assert rc == 0
    cut = [r.getMessage() for r in caplog.records if "are cut" in r.getMessage()]
    # kd and sft share the source and the row length: one line naming both (it was printed once per stage)
    assert len(cut) == 1 and cut[0].startswith(f"kd, sft: {spec}: 30 of 30 examples are longer than seq_len 32"), cut
    err = capsys.readouterr().err.splitlines()
    # 200 tokens do not fill a whole 4th step of 2 x 32: the run says it trains 192
    assert "kd: 200 tokens -> 3 steps of 64 tokens (192 trained)" in err, err
    assert "sft: 128 tokens -> 2 steps of 64 tokens (128 trained)" in err, err


def test_sft_whose_prompts_fill_every_row_is_refused_before_training(files, tmp_path, capsys):
    # at 16 tokens every row is prompt: SFT would report loss 0 over steps that train nothing
    out = tmp_path / "run"
    _fails(capsys, _args(files, out, "--stages", "sft", "--tokens", "128", "--seq-len", "16"),
           "has a solution token within seq_len 16 (the prompts fill the rows); raise --seq-len")
    assert not (out / "run.json").exists()  # nothing written: the corrected command starts without --resume


def test_sft_leaves_out_rows_whose_prompt_fills_them(files, tmp_path, capsys, caplog):
    # half the questions fill a 40-token row: those rows trained nothing and logged a loss of 0 (steps with only
    # them did); they are left out, said once, and every step trains a solution
    data = tmp_path / "mixed.jsonl"
    rows = [{"question": f"What is 1+{i}?" if i % 2 else "What is " + "1+" * 30 + f"{i}?", "answer": str(i + 1),
             "solution": f"1+{i}={i + 1}. #### {i + 1}"} for i in range(20)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    argv = ["distill", "--teacher", str(files / "teacher"), "--data", f"jsonl:{data}?solution=solution", "--seq-len", "40",
            "--batch-size", "2", "--instruction", "none", "--no-progress", "--out", str(out), "--stages", "sft",
            "--tokens", "400", "--no-pack", "--log-every", "1"]
    with caplog.at_level("WARNING"):
        assert main(argv) == 0
    said = [r.getMessage() for r in caplog.records if "hold no solution token" in r.getMessage()]
    assert said == ["sft: 10 of 20 rows hold no solution token within seq_len 40 (their prompts fill them); they are "
                    "left out (raise --seq-len to train them)"], said
    losses = [r["loss"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses and min(losses) > 0


def test_shipped_recipes_parse():
    names = ["llama-3.2-1b-llamba", "llama-3.2-3b-hybrid", "tiny-llamba", "tiny-hybrid"]
    assert set(names) <= {p.stem for p in RECIPE_DIR.glob("*.toml")}
    for name in names:
        plan = make_plan(load_recipe(name), {})
        assert plan.stages and all(s.train.tokens > 0 for s in plan.stages)
    hybrid = make_plan(load_recipe("llama-3.2-3b-hybrid"), {})
    assert hybrid.attn_layers == [3, 8, 13, 18, 23, 27] and hybrid.student == "hybrid"
    assert [s.kind for s in hybrid.stages] == ["kd", "sft"] and hybrid.stages[0].loss == "reverse_kl"
    llamba = make_plan(load_recipe("llama-3.2-1b-llamba"), {"tokens": "1M,2M,3M,4M", "lr": 0.5})
    assert [s.train.tokens for s in llamba.stages] == [1_000_000, 2_000_000, 3_000_000, 4_000_000]
    assert all(s.train.lr == 0.5 for s in llamba.stages)
    plain = make_plan(load_recipe("llama-3.2-1b-llamba"), {})
    m, h, k = (s.train.tokens for s in plain.stages[:3])
    assert m < h and m < k and h >= 1e9 and k >= 1e9  # the MOHAWK ratio
    with pytest.raises(ConfigError, match="one per stage"):
        make_plan(load_recipe("llama-3.2-1b-llamba"), {"tokens": "1M,2M"})
    # --data replaces the recipe's sources and with them its weights (two weights for two sources); both flags: both taken
    assert len(plain.data.specs) == len(plain.data.weights) == 2
    own = make_plan(load_recipe("llama-3.2-1b-llamba"), {"data": ["gsm8k:train.jsonl"]})
    assert own.data.specs == ["gsm8k:train.jsonl"] and own.data.weights in (None, [1.0])
    two = make_plan(load_recipe("llama-3.2-1b-llamba"), {"data": ["gsm8k:a.jsonl", "math:b.jsonl"], "data_weights": "3,1"})
    assert two.data.weights == [3.0, 1.0]
    # a caller's own table is passed through when named, refused otherwise
    assert load_recipe("tiny-teacher", extra_tables=("architecture",))["architecture"]["n_layers"] > 0
    # the GCD pilot's teacher recipe (README): the embedded shape, every source a checked rg:gcd spec
    gcd = load_recipe(str(Path(__file__).resolve().parent.parent / "benchmarks" / "gcd-teacher.toml"),
                      extra_tables=("architecture",))
    assert gcd.pop("architecture") == load_recipe("tiny-teacher", extra_tables=("architecture",))["architecture"]
    from thinkfast.data.sources import check_spec

    gcd_plan = make_plan(gcd, {}, command="sft")
    assert len(gcd_plan.data.specs) == 4 and all(check_spec(x).target == "gcd" for x in gcd_plan.data.specs)
    with pytest.raises(ConfigError, match=r"unknown table \[architecture\]"):
        load_recipe("tiny-teacher")


def test_interrupted_run_says_how_to_continue(monkeypatch, capsys, tmp_path):
    """distill needs --resume to continue (its --out then holds a run): the interrupt line says so; sample resumes as it is."""
    import thinkfast.commands.distill as distill_cmd
    import thinkfast.commands.sample as sample_cmd

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(distill_cmd, "run_distill", interrupted)
    monkeypatch.setattr(sample_cmd, "cmd_sample", interrupted)
    # interrupted while the teacher or the data loaded: no run to resume yet
    assert main(["distill", "--teacher", "t", "--stages", "sft", "--tokens", "8", "--out", str(tmp_path / "a")]) == 130
    assert "re-run the same command as it is to continue" in capsys.readouterr().err
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "run.json").write_text("{}")  # the run had started
    assert main(["distill", "--teacher", "t", "--stages", "sft", "--tokens", "8", "--out", str(tmp_path / "a")]) == 130
    assert "re-run the same command with --resume to continue" in capsys.readouterr().err
    assert main(["distill", "--teacher", "t", "--stages", "sft", "--tokens", "8", "--out", str(tmp_path / "a"), "--resume"]) == 130
    assert "re-run the same command as it is to continue" in capsys.readouterr().err
    assert main(["sample", "--model", "m", "--data", "d", "--out", str(tmp_path / "s.jsonl")]) == 130
    assert "as it is to continue" in capsys.readouterr().err


def test_ctrl_c_while_starting_is_one_line(monkeypatch, capsys, tmp_path):
    """Ctrl-C while torch and the command modules load: one line and exit 130, as later; a library import of
    thinkfast (not the `thinkfast` command) gets its KeyboardInterrupt as usual."""
    import subprocess
    import sys

    import thinkfast.cli as cli

    def slow_imports():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", slow_imports)
    assert main(["sample", "--help"]) == 130
    assert capsys.readouterr().err == "thinkfast: interrupted while starting; nothing was done\n"
    script = tmp_path / "interrupt_import.py"  # Ctrl-C inside `import thinkfast`, as the console script does it
    script.write_text(
        "import sys\n"
        "class Stop:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'thinkfast.models':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Stop())\n"
        "sys.argv = [sys.argv[1]]\n"
        "import thinkfast\n"
    )
    for argv0, code, last_line in (("/venv/bin/thinkfast", 130, "thinkfast: interrupted while starting; nothing was done"),
                                   ("my_script.py", 1, "KeyboardInterrupt")):
        done = subprocess.run([sys.executable, str(script), argv0], capture_output=True, text=True, timeout=120)
        assert done.stderr.strip().splitlines()[-1] == last_line, done.stderr
        assert done.returncode in ((code,) if code == 130 else (1, -2, 130)), done.returncode  # Python's own exit on Ctrl-C varies


def test_group_by_length_is_checked_where_the_rows_are_built():
    # every stage builds one-example rows of its own: a run-wide group_by_length with the default packing is fine
    plan = make_plan({"stages": ["hidden", "sft"], "tokens": 64, "group_by_length": True,
                      "hidden": {"pack": False}, "sft": {"pack": False}}, {})
    assert all(s.data.group_by_length and not s.data.pack for s in plan.stages)
    # a stage that falls back on the run's packed rows is refused, naming the fix
    with pytest.raises(ConfigError, match="group_by_length groups one-example rows"):
        make_plan({"stages": ["hidden", "sft"], "tokens": 64, "group_by_length": True, "sft": {"pack": False}}, {})


@pytest.mark.parametrize("rank,lines", [("0", 1), ("1", 0)])
def test_warnings_come_once_under_torchrun_from_rank_0(files, tmp_path, monkeypatch, caplog, rank, lines):
    # every torchrun rank runs the command: the cut-examples warning printed once per process
    import logging

    monkeypatch.setenv("RANK", rank)
    logger = logging.getLogger("thinkfast")
    try:
        with caplog.at_level(logging.WARNING):
            assert main(["sft", "--model", str(files / "teacher"), "--data", f"jsonl:{files}/chain.jsonl?solution=solution",
                         "--tokens", "200", "--seq-len", "48", "--batch-size", "2", "--instruction", "none", "--no-chat",
                         "--no-progress", "--out", str(tmp_path / "sft")]) == 0
    finally:
        logger.setLevel(logging.NOTSET)
    assert sum("are cut" in r.getMessage() for r in caplog.records) == lines


def test_chat_template_kwargs_from_a_recipe_table_or_the_flag_reach_the_prompts(tmp_path):
    """`chat_template_kwargs` (a TOML table, or `--chat-template-kwargs JSON`) renders every training prompt with
    those template variables: here Qwen3's switch, whose off state opens the answer with an empty thinking block."""
    from conftest import THINKING_TEMPLATE

    from thinkfast.data.packing import DataConfig, build_data
    from thinkfast.data.tokenizer import build_byte_tokenizer

    recipe = tmp_path / "r.toml"
    recipe.write_text('stages = ["sft"]\nchat_template_kwargs = { enable_thinking = false }\n[sft]\ntokens = 64\n')
    plan = make_plan(load_recipe(str(recipe)), {}, "sft")
    assert plan.data.template_kwargs == {"enable_thinking": False}
    flag = make_plan(load_recipe(str(recipe)), {"chat_template_kwargs": '{"enable_thinking": true}'}, "sft")
    assert flag.data.template_kwargs == {"enable_thinking": True}  # the flag overrides the recipe
    tok = build_byte_tokenizer()
    tok.chat_template = THINKING_TEMPLATE
    spec = "rg:basic_arithmetic?size=3&seed=1"
    on, off = (build_data(DataConfig(specs=[spec], pack=False, template_kwargs=kw), tok, 256).sources[0]
               for kw in (None, {"enable_thinking": False}))
    added = len("<think>\n\n</think>\n\n")
    assert (off.real.sum(1) - on.real.sum(1)).tolist() == [added] * 3  # the same solutions, longer prompts
    with pytest.raises(ConfigError, match="chat-template-kwargs .* not JSON"):
        make_plan(None, {"stages": "sft", "tokens": "64", "chat_template_kwargs": "enable_thinking=false"}, "sft")
    with pytest.raises(ConfigError, match="with chat off"):
        make_plan(None, {"stages": "sft", "tokens": "64", "chat": False, "chat_template_kwargs": '{"a": 1}'}, "sft")
    # settings given as flags are named as the flags, though a recipe is in use (it set neither)
    with pytest.raises(ConfigError, match="^--no-chat and --chat-template-kwargs: chat_template_kwargs with chat off"):
        make_plan({"_path": "r.toml", "tokens": 64}, {"stages": "sft", "chat": False, "chat_template_kwargs": '{"a": 1}'},
                  "sft")
    with pytest.raises(ConfigError, match="^recipe r.toml: chat_template_kwargs with chat off"):
        make_plan({"_path": "r.toml", "tokens": 64, "chat": False}, {"stages": "sft", "chat_template_kwargs": '{"a": 1}'},
                  "sft")
