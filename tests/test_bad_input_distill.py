"""Bad input to `thinkfast distill`, `sft` and `train-teacher`: one line naming what was wrong and where it came from
(the flag or the recipe key), exit 2, nothing already written lost; and settings that used to be dropped silently
(a saved student's shape, fractional counts, extra recipe stages) refused."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import folder_bytes_by_file, tiny_thinkfast_teacher, write_distill_files

from thinkfast.cli import main
from thinkfast.distill.toy import char_tokenizer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_distill_files(tmp_path_factory.mktemp("bad"), char_tokenizer())


def _data(root):
    return f"jsonl:{root}/chain.jsonl?solution=solution"


def _distill(root, out, *extra):
    return ["distill", "--teacher", str(root / "teacher"), "--data", _data(root), "--seq-len", "64", "--batch-size", "2",
            "--instruction", "none", "--no-progress", "--out", str(out), *extra]


def _sft(root, out, *extra):
    return ["sft", "--model", str(root / "teacher"), "--data", _data(root), "--seq-len", "64", "--batch-size", "2",
            "--instruction", "none", "--no-progress", "--out", str(out), *extra]


def _fails(capsys, argv, *needles) -> str:
    """Exit 2 with exactly one line on stderr, holding every needle; returns the line."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def saved_llamba(files):
    out = files / "llamba"
    assert main(_distill(files, out, "--stages", "kd", "--tokens", "128")) == 0
    return out


@pytest.fixture(scope="module")
def sft_run(files):
    out = files / "sft-run"
    assert main(_sft(files, out, "--tokens", "128", "--tokens-per-chunk", "32")) == 0
    return out


# 1. a saved student keeps its shape: --ssm-param / --attn-layers (flag or recipe key) are refused, not ignored


def test_a_saved_student_refuses_another_ssm_param_or_attention_layers(files, saved_llamba, tmp_path, capsys):
    before = folder_bytes_by_file(saved_llamba)
    base = ["--student", str(saved_llamba), "--stages", "kd", "--tokens", "128"]
    _fails(capsys, _distill(files, tmp_path / "a", *base, "--ssm-param", "mamba2"),
           f"--student {saved_llamba}: a saved student keeps its shape; drop --ssm-param mamba2 (it has ssm_param discrete)")
    _fails(capsys, _distill(files, tmp_path / "b", *base, "--attn-layers", "1"),
           "a saved student keeps its shape; drop --attn-layers 1 (it has attn_layers none)")
    recipe = tmp_path / "r.toml"
    recipe.write_text('ssm_param = "mamba2"\nd_conv = 6\n')
    _fails(capsys, _distill(files, tmp_path / "c", *base, "--recipe", str(recipe)),
           f"ssm_param = 'mamba2' from recipe {recipe} (it has 'discrete')", f"d_conv = 6 from recipe {recipe} (it has 4)")
    assert not any((tmp_path / d).exists() for d in "abc")
    # the student's own values are no change: a recipe written for it still runs
    recipe.write_text('ssm_param = "discrete"\nd_conv = 4\n')
    assert main(_distill(files, tmp_path / "d", *base, "--recipe", str(recipe))) == 0
    assert folder_bytes_by_file(saved_llamba) == before


def test_sft_refuses_the_distill_settings_of_its_recipe(files, tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    for text, key in (('stages = ["sft"]\nd_conv = 8\n', "d_conv is a setting"), ('ssm_param = "mamba2"\n', "ssm_param is"),
                      ('student = "hybrid"\nattn_layers = [1]\n', "student, attn_layers are settings"),
                      ('teacher = "x"\n', "teacher is"), ('[sft]\ntemperature = 2.0\n', "temperature is")):
        recipe.write_text(text)
        _fails(capsys, _sft(files, tmp_path / "o", "--tokens", "128", "--recipe", str(recipe)),
               f"recipe {recipe}: {key}", "sft and train-teacher train one model as it is")
        assert not (tmp_path / "o").exists()
    recipe.write_text('stages = ["sft"]\n[kd]\nlr = 1.0\n')  # another stage's table was ignored without a word
    _fails(capsys, _sft(files, tmp_path / "o", "--tokens", "128", "--recipe", str(recipe)),
           f"recipe {recipe}: [kd] sets a stage that sft and train-teacher do not run; remove it")
    # what sft does use: training, data and stage settings it applies (freeze, chunk_tokens)
    recipe.write_text('stages = ["sft"]\nseq_len = 64\n[sft]\nfreeze = ["embed"]\nchunk_tokens = 16\n')
    assert main(_sft(files, tmp_path / "ok", "--tokens", "128", "--recipe", str(recipe))) == 0


# 2. integer settings in a recipe refuse fractions instead of truncating them


@pytest.mark.parametrize("key", ["batch_size", "micro_batch_size", "seq_len", "log_every", "ckpt_every", "eval_every",
                                 "eval_rows", "seed", "chunk_tokens"])
def test_integer_recipe_keys_refuse_fractions(tmp_path, capsys, key):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'stages = ["sft"]\n{key} = 1.5\n')
    # "m" is no model: reaching the loader would fail with another message
    _fails(capsys, ["sft", "--model", "m", "--tokens", "8", "--recipe", str(recipe), "--out", str(tmp_path / "o")],
           f"recipe {recipe}: {key}=1.5 must be a whole number")
    assert not (tmp_path / "o").exists()


def test_whole_floats_pass_and_booleans_are_no_numbers():
    from thinkfast.distill.recipes import make_plan
    from thinkfast.errors import ConfigError

    assert make_plan({"stages": ["sft"], "tokens": 64, "batch_size": 2.0}, {}, "sft").stages[0].train.batch_size == 2
    with pytest.raises(ConfigError, match="batch_size=True must be a whole number"):
        make_plan({"stages": ["sft"], "tokens": 64, "batch_size": True}, {}, "sft")
    with pytest.raises(ConfigError, match="lr=True is not a number"):
        make_plan({"stages": ["sft"], "tokens": 64, "lr": True}, {}, "sft")


# 3, 4. recipe stages: train-teacher and sft refuse the ones they would drop; an unknown one names the recipe


@pytest.fixture()
def no_data(monkeypatch):
    """Building training data fails the test: these commands must stop before it (and before training)."""
    import thinkfast.distill.stages as stages

    def never(*a, **k):
        raise AssertionError("the data was built before the bad input was refused")

    monkeypatch.setattr(stages, "build_data", never)


def _teacher_recipe(tmp_path, stages: str) -> Path:
    from thinkfast.distill.recipes import RECIPE_DIR

    text = (RECIPE_DIR / "tiny-teacher.toml").read_text().replace('stages = ["sft"]', f"stages = {stages}")
    path = tmp_path / "teacher.toml"
    path.write_text(text)
    return path


def test_train_teacher_and_sft_refuse_recipe_stages_they_would_drop(tmp_path, capsys, no_data):
    recipe = _teacher_recipe(tmp_path, '["sft", "kd"]')
    _fails(capsys, ["train-teacher", "--recipe", str(recipe), "--out", str(tmp_path / "t"), "--no-progress"],
           f"recipe {recipe}: stages = ['sft', 'kd']: sft and train-teacher run the sft stage alone")
    assert not (tmp_path / "t").exists()
    _fails(capsys, ["sft", "--model", "m", "--recipe", "tiny-llamba", "--out", str(tmp_path / "s")],
           "tiny-llamba.toml: stages = ['matrix', 'hidden', 'kd', 'sft']: sft and train-teacher run the sft stage alone")


def test_an_unknown_stage_names_where_it_came_from(files, tmp_path, capsys, no_data):
    recipe = _teacher_recipe(tmp_path, '["sfft"]')
    _fails(capsys, ["train-teacher", "--recipe", str(recipe), "--out", str(tmp_path / "t"), "--no-progress"],
           f"recipe {recipe}: stages: unknown stage 'sfft'; use matrix, hidden, kd, sft")
    plain = tmp_path / "plain.toml"
    plain.write_text('stages = ["kd", "sfft"]\n')
    line = _fails(capsys, _distill(files, tmp_path / "d", "--recipe", str(plain), "--tokens", "128"),
                  f"recipe {plain}: stages: unknown stage 'sfft'")
    assert "--stages" not in line
    _fails(capsys, _distill(files, tmp_path / "d", "--stages", "kd,sfft", "--tokens", "128"), "--stages: unknown stage 'sfft'")


# 5, 6. resume: name the settings that differ; a damaged checkpoint is not a settings mismatch


def test_resume_with_other_settings_names_them_and_both_values(files, sft_run, capsys):
    before = folder_bytes_by_file(sft_run)
    assert json.loads((sft_run / "run.json").read_text())["stages"][0]["chunk_tokens"] == 32  # --tokens-per-chunk reached sft
    _fails(capsys, _sft(files, sft_run, "--tokens", "128", "--tokens-per-chunk", "32", "--seq-len", "48", "--resume"),
           "holds a run with other settings (sft seq_len was 64, now 48)", "resume with the same settings, or choose a new --out")
    line = _fails(capsys, _sft(files, sft_run, "--tokens", "256", "--seq-len", "48", "--resume"), "other settings")
    for part in ("sft chunk_tokens was 32, now null", "sft seq_len was 64, now 48", "sft tokens was 128, now 256"):
        assert part in line, line
    assert folder_bytes_by_file(sft_run) == before


def test_a_truncated_checkpoint_is_called_damaged_not_a_mismatch(files, sft_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(sft_run, run)
    weights = run / "stages" / "01-sft" / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    line = _fails(capsys, _sft(files, run, "--tokens", "128", "--tokens-per-chunk", "32", "--resume"),
                  f"{weights}: damaged or incomplete", f"delete {weights.parent} and resume to run this stage again", "or choose a new --out")
    assert "does not fit" not in line
    # a whole file of another shape is still a mismatch
    from thinkfast.distill.trainer import load_model_weights
    from thinkfast.errors import CheckpointError

    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_model_weights(tiny_thinkfast_teacher(char_tokenizer()).lm, sft_run / "stages" / "01-sft" / "ckpt")


# 7, 8, 10. the student and teacher flags: a typo of a kind, the flag named in errors, ssm_kv_heads against the teacher


@pytest.fixture()
def offline(tmp_path, monkeypatch):
    """No hub, and a Hugging Face cache with nothing in it."""
    import huggingface_hub.constants

    import thinkfast.models.teacher as teacher

    monkeypatch.setattr(teacher, "hub_reachable", lambda: False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def test_a_student_kind_typo_names_the_kinds(files, tmp_path, capsys, offline):
    _fails(capsys, _distill(files, tmp_path / "a", "--student", "mamba", "--stages", "kd", "--tokens", "128"),
           "--student mamba: use llamba, hybrid, or a saved student (a thinkfast folder, or a published Llamba or "
           "MambaInLlama one)")
    recipe = tmp_path / "r.toml"
    recipe.write_text('student = "lamba"\n')
    _fails(capsys, _distill(files, tmp_path / "b", "--recipe", str(recipe), "--stages", "kd", "--tokens", "128"),
           f"recipe {recipe}: student lamba: use llamba, hybrid, or a saved student (a thinkfast folder, or a published "
           "Llamba or MambaInLlama one) (did you mean llamba?)")
    # a teacher's folder as the student: said so, not "use a saved student" (it is one, of the teacher role)
    _fails(capsys, _distill(files, tmp_path / "c", "--student", str(files / "teacher"), "--stages", "kd", "--tokens", "128"),
           f"--student {files / 'teacher'}: an all-attention model (a teacher), not a student; pass it as --teacher")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    # --freeze on a run whose stages never read it (accepted without a word before)
    _fails(capsys, _distill(files, tmp_path / "d", "--stages", "matrix", "--tokens", "128", "--freeze", "mlp"),
           "--freeze: frozen groups apply to kd and sft stages, and this run has neither")


def test_load_errors_name_the_flag_or_recipe_key(files, tmp_path, capsys, offline):
    missing = "no such folder or file, and no hub model of that name in the local cache"
    _fails(capsys, _distill(files, tmp_path / "a", "--teacher", "nope", "--stages", "kd", "--tokens", "128"),
           f"error: --teacher nope: {missing}")
    _fails(capsys, _distill(files, tmp_path / "b", "--student", "org/nope", "--stages", "kd", "--tokens", "128"),
           f"error: --student org/nope: {missing}")
    _fails(capsys, ["sft", "--model", "nope", "--data", _data(files), "--tokens", "128", "--out", str(tmp_path / "c")],
           f"error: --model nope: {missing}")
    recipe = tmp_path / "r.toml"
    recipe.write_text('teacher = "nope"\n')
    _fails(capsys, ["distill", "--recipe", str(recipe), "--data", _data(files), "--stages", "kd", "--tokens", "128",
                    "--out", str(tmp_path / "d")], f"error: recipe {recipe}: teacher nope: {missing}")


def test_ssm_kv_heads_is_checked_against_the_teacher_naming_the_flag(files, tmp_path, capsys):
    # the test teacher: 4 query heads, 2 KV heads
    _fails(capsys, _distill(files, tmp_path / "a", "--stages", "kd", "--tokens", "128", "--ssm-kv-heads", "3"),
           "--ssm-kv-heads 3: a new student's ssm_kv_heads is the teacher's KV heads (2) or its query heads (4)")
    recipe = tmp_path / "r.toml"
    recipe.write_text("ssm_kv_heads = 1\n")
    _fails(capsys, _distill(files, tmp_path / "b", "--stages", "kd", "--tokens", "128", "--recipe", str(recipe)),
           f"recipe {recipe}: ssm_kv_heads 1: a new student's ssm_kv_heads is the teacher's KV heads (2)")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# 9. the progress bar's last held-out value is the last evaluation


def test_the_progress_bar_ends_on_the_last_evaluation(tok, monkeypatch, capsys):
    import thinkfast.distill.trainer as trainer
    from thinkfast.data.packing import DataConfig, build_data
    from thinkfast.distill.stages import SFTTask
    from thinkfast.distill.toy import chain_sum_problems

    shown = []

    class Bar:
        def __init__(self, *a, **k):
            pass

        def set_postfix(self, refresh=True, **values):
            shown.append(dict(values))

        def write(self, *a, **k):
            pass

        update = close = lambda self, *a: None

    monkeypatch.setattr(trainer, "progress_bar", Bar)
    data = build_data(DataConfig(specs=[chain_sum_problems(40, seed=1)], instruction="none", chat=False), tok, 64)
    held = build_data(DataConfig(specs=[chain_sum_problems(10, seed=7)], instruction="none", chat=False), tok, 64)
    cfg = trainer.TrainConfig(tokens=2 * 4 * 64, batch_size=4, seq_len=64, log_every=1, lr=3e-3, eval_every=1, eval_rows=4)
    res = trainer.train(SFTTask(tiny_thinkfast_teacher(tok)), data, cfg, progress=True, eval_data=held)
    first, last = (f"{e['eval_loss']:.4g}" for e in res.evals)
    assert first != last
    assert shown[-1]["eval"] == last, shown  # was step 1's value: the bar was set before step 2's evaluation


# 11. train-teacher checks --out before it generates its data


def test_train_teacher_refuses_a_foreign_out_before_generating_data(tmp_path, capsys, no_data):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    _fails(capsys, ["train-teacher", "--out", str(out), "--no-progress"], f"{out} is not empty and holds no thinkfast run")
    assert (out / "notes.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


def test_flags_no_stage_of_the_run_reads_are_refused(files, tmp_path, capsys):
    """Accepted without a word before, like --freeze was: they changed nothing."""
    for stages, flag, says in [("hidden", ["--kd-loss", "reverse_kl"], "--kd-loss: only the kd stage read"),
                               ("hidden", ["--temperature", "2"], "--temperature: only the kd stage read"),
                               ("hidden", ["--ce-weight", "1"], "--ce-weight: only the kd stage read"),
                               ("hidden", ["--positions", "completion"], "--positions: only the kd stage read"),
                               ("kd", ["--layers", "1"], "--layers: only the matrix and hidden stages read"),
                               ("matrix,kd", ["--train-mlp"], "--train-mlp: only the hidden stage read"),
                               ("kd", ["--decay", "0.5"], "--decay: only the wsd schedule")]:
        _fails(capsys, _distill(files, tmp_path / "a", "--stages", stages, "--tokens", "128", *flag), says,
               f"this run's stages are {stages}" if "decay" not in says else "pass --schedule wsd")
    _fails(capsys, _sft(files, tmp_path / "a", "--tokens", "128", "--decay", "0.5"), "--decay: only the wsd schedule")
    assert not (tmp_path / "a").exists()
    # where a stage reads them, they go through
    assert main(_distill(files, tmp_path / "b", "--stages", "kd", "--tokens", "128", "--kd-loss", "reverse_kl",
                         "--schedule", "wsd", "--decay", "0.5")) == 0


def test_settings_a_later_stage_refuses_are_refused_before_anything_is_written(files, tmp_path, capsys):
    """A stage that cannot train was refused only when it started: after the earlier stages trained and run.json
    was written, so that the corrected command no longer resumed the run."""
    every = "embed,norm,mlp,attn,mamba"
    _fails(capsys, _distill(files, tmp_path / "a", "--stages", "hidden,kd", "--tokens", "128", "--freeze", every),
           "stage kd: nothing to train (every parameter is frozen: --freeze embed,norm,mlp,attn,mamba)")
    _fails(capsys, _sft(files, tmp_path / "a", "--tokens", "128", "--freeze", every), "stage sft: nothing to train")
    if not torch.cuda.is_available():
        _fails(capsys, _distill(files, tmp_path / "a", "--stages", "hidden,kd", "--tokens", "128", "--precision", "bf16"),
               "hidden: precision bf16 needs a GPU")
    assert not (tmp_path / "a").exists()


def test_a_batch_the_processes_cannot_share_is_refused_before_anything_is_written(files, tmp_path, capsys, monkeypatch):
    """Checked only when its stage started, after earlier stages trained and run.json was written."""
    import thinkfast.distill.stages as stages
    from thinkfast.distill.trainer import DistInfo

    monkeypatch.setattr(stages, "dist_info", lambda: DistInfo(0, 2, 0))
    _fails(capsys, _distill(files, tmp_path / "a", "--stages", "hidden,kd", "--tokens", "128", "--batch-size", "3"),
           "stage hidden: batch_size=3 must be divisible by the 2 processes; give --batch-size a multiple of 2")
    assert not (tmp_path / "a").exists()


def test_held_out_data_that_is_the_training_spec_is_refused(files, tmp_path, capsys, caplog):
    _fails(capsys, _distill(files, tmp_path / "a", "--stages", "kd", "--tokens", "128", "--eval-data", _data(files)),
           f"--eval-data {_data(files)}: the training data names the same spec")
    # another spelling of training examples (a slice, another path) is found by its questions: refused when all
    # of them were trained on, a note naming how many when some were
    sliced = f"jsonl:{files}/./chain.jsonl?solution=solution&limit=3"
    _fails(capsys, _distill(files, tmp_path / "a", "--stages", "kd", "--tokens", "128", "--eval-data", sliced),
           f"--eval-data {sliced}: all 3 of its questions are training questions")
    assert not (tmp_path / "a").exists()
    rows = (files / "chain.jsonl").read_text().splitlines()
    (tmp_path / "mixed.jsonl").write_text("\n".join(rows[:2] + [json.dumps({**json.loads(rows[0]), "question": "new?"})]) + "\n")
    mixed = f"jsonl:{tmp_path}/mixed.jsonl?solution=solution"
    with caplog.at_level("WARNING"):
        assert main(_distill(files, tmp_path / "b", "--stages", "kd", "--tokens", "128", "--eval-data", mixed)) == 0
    assert f"note: 2 of the 3 held-out questions of {mixed} are also training questions" in caplog.text
