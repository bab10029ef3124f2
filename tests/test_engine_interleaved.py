"""Models sampled taking turns (`sample_interleaved`): the same samples as one after another, engine clocks that
run only in their own turns, turns that alternate, resume after a crash, and one-line refusals."""

import json
import time

import pytest
import torch

from thinkfast.cli import main
from thinkfast.data.tokenizer import build_byte_tokenizer
from thinkfast.engine import run as run_mod
from thinkfast.engine.engine import Engine
from thinkfast.engine.run import sample_interleaved, sample_to_file
from thinkfast.engine.sampling import SamplingParams
from thinkfast.errors import ConfigError
from thinkfast.models import ModelConfig, ThinkfastConfig, ThinkfastForCausalLM

PARAMS = SamplingParams(temperature=1.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two tiny random checkpoints (all-attention and hybrid) with the byte tokenizer, and 5 problems."""
    root = tmp_path_factory.mktemp("interleaved")
    tok = build_byte_tokenizer()
    for name, attn in (("teacher", [0, 1]), ("hybrid", [1])):
        torch.manual_seed(len(attn))
        cfg = ModelConfig(vocab_size=len(tok), d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=64,
                          attn_layers=attn, chunk_size=16)
        model = ThinkfastForCausalLM(ThinkfastConfig.from_model_config(cfg, eos_token_id=tok.eos_token_id))
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    data = root / "problems.jsonl"
    data.write_text("".join(json.dumps({"q": f"What is {i} + {i}?", "a": str(2 * i)}) + "\n" for i in range(5)))
    return root, f"jsonl:{data}?question=q&answer=a"


def _jobs(root, folder, names=("teacher", "hybrid")):
    return [dict(model_spec=str(root / n), out=folder / f"{n}.jsonl", name=n) for n in names]


def _common(spec, **kw):
    return dict(data_spec=spec, n=3, params=PARAMS, seed=7, batch_size=4) | kw


def _content(path):
    """Each sample as written, minus its timing."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return sorted(json.dumps({k: v for k, v in r.items() if k not in ("seconds", "sampling")}, sort_keys=True) for r in rows)


def test_turns_draw_the_samples_one_model_after_another_draws(pair, tmp_path):
    root, spec = pair
    (tmp_path / "seq").mkdir()
    for job in _jobs(root, tmp_path / "seq"):
        sample_to_file(job["model_spec"], spec, job["out"], 3, PARAMS, seed=7, batch_size=4, name=job["name"], progress=False)
    summaries = sample_interleaved(_jobs(root, tmp_path / "turns"), _common(spec), turn_seconds=1e-6, progress=False)
    assert [s.written for s in summaries] == [15, 15]
    for name in ("teacher", "hybrid"):
        assert _content(tmp_path / "turns" / f"{name}.jsonl") == _content(tmp_path / "seq" / f"{name}.jsonl")


def test_each_engine_is_charged_only_its_own_turns_and_turns_alternate(pair, tmp_path, monkeypatch):
    root, spec = pair
    order = []
    append = run_mod.SamplesWriter.append

    def logged(self, records):
        order.append(records[0]["model"])
        return append(self, records)

    monkeypatch.setattr(run_mod.SamplesWriter, "append", logged)
    started = time.perf_counter()
    summaries = sample_interleaved(_jobs(root, tmp_path), _common(spec), turn_seconds=1e-6, progress=False)
    elapsed = time.perf_counter() - started
    # clocks that also ran during the other model's turns would add up to more than the time that passed
    assert sum(s.stats.wall_seconds for s in summaries) < elapsed
    for s in summaries:
        rows = [json.loads(line) for line in s.out.read_text().splitlines()]
        assert sum(r["seconds"] for r in rows) == pytest.approx(s.stats.wall_seconds, abs=1e-5)  # records round to 1 us
    # both models write before either is done: the first model's last write comes after the second's first
    assert order.index("hybrid") < max(i for i, m in enumerate(order) if m == "teacher")
    # a turn lasts its time, not one batch: with turns longer than the run, one model after the other
    order.clear()
    sample_interleaved(_jobs(root, tmp_path / "long"), _common(spec), turn_seconds=1e9, progress=False)
    assert order == sorted(order, key=lambda m: m != "teacher") and len(set(order)) == 2


def test_the_engine_yields_empty_turns_only_when_asked():
    tok = build_byte_tokenizer()
    cfg = ModelConfig(vocab_size=len(tok), d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_mlp=32, attn_layers=[0])
    lm = ThinkfastForCausalLM(ThinkfastConfig.from_model_config(cfg)).lm
    prompts = [("a", [1, 2, 3]), ("b", [4, 5])]
    params = SamplingParams(temperature=1.0, max_new_tokens=8, ignore_eos=True)
    plain = list(Engine(lm, batch_size=4).generate_batches(prompts, 2, params, seed=1))
    turns = list(Engine(lm, batch_size=4).generate_batches(prompts, 2, params, seed=1, yield_every=1e-9))
    assert all(plain) and [] in turns and len(turns) > len(plain)
    flat = sorted((c.problem_id, c.sample_idx, tuple(c.tokens)) for b in turns for c in b)
    assert flat == sorted((c.problem_id, c.sample_idx, tuple(c.tokens)) for b in plain for c in b)
    with pytest.raises(ConfigError, match="yield_every"):
        next(Engine(lm, batch_size=4).generate_batches(prompts, 2, params, yield_every=0))


def test_a_crash_in_one_turn_resumes_to_the_same_files(pair, tmp_path):
    root, spec = pair
    whole = tmp_path / "whole"
    sample_interleaved(_jobs(root, whole), _common(spec), turn_seconds=1e-6, progress=False)
    calls = []

    def grade_then_crash(preds, golds, kinds):
        calls.append(len(preds))
        if len(calls) == 5:
            raise KeyboardInterrupt
        return [None] * len(preds)

    crashed = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        sample_interleaved(_jobs(root, crashed), _common(spec, grade_fn=grade_then_crash), turn_seconds=1e-6, progress=False)
    partial = sum(len((crashed / f"{n}.jsonl").read_text().splitlines()) for n in ("teacher", "hybrid"))
    assert 0 < partial < 30
    summaries = sample_interleaved(_jobs(root, crashed), _common(spec), turn_seconds=1e-6, progress=False)
    assert sum(s.skipped for s in summaries) == partial and sum(s.written for s in summaries) == 30 - partial
    for n in ("teacher", "hybrid"):
        assert _content(crashed / f"{n}.jsonl") == _content(whole / f"{n}.jsonl")


def test_refusals_come_before_any_model_loads(pair, tmp_path, monkeypatch):
    root, spec = pair
    loaded = []
    monkeypatch.setattr(run_mod, "load_for_sampling", lambda *a, **k: loaded.append(a) or pytest.fail("loaded a model"))
    jobs = _jobs(root, tmp_path)
    with pytest.raises(ConfigError, match="same samples file"):
        sample_interleaved([jobs[0], {**jobs[1], "out": jobs[0]["out"]}], _common(spec), progress=False)
    with pytest.raises(ConfigError, match="turn_seconds"):
        sample_interleaved(jobs, _common(spec), turn_seconds=0, progress=False)
    with pytest.raises(ConfigError, match="n=0"):
        sample_interleaved(jobs, _common(spec, n=0), progress=False)
    with pytest.raises(ConfigError, match="one setting for all the models"):
        sample_interleaved([{**jobs[0], "progress": False}, jobs[1]], _common(spec), progress=False)
    assert not loaded and not list(tmp_path.iterdir())


def test_progress_among_the_common_arguments_is_taken(pair, tmp_path):
    """The docstring says common takes sample_to_file's arguments: progress is one of them."""
    root, spec = pair
    summaries = sample_interleaved(_jobs(root, tmp_path), _common(spec, progress=False), turn_seconds=1e-6)
    assert [s.written for s in summaries] == [15, 15]


def test_sample_to_file_prompts_as_the_checkpoint_declares(pair, tmp_path, monkeypatch):
    """As `thinkfast sample`: without a style, the instruction in the checkpoint's prompt_style (else auto)."""
    import shutil

    root, spec = pair
    declared = tmp_path / "declared"
    shutil.copytree(root / "hybrid", declared)
    cfg = json.loads((declared / "config.json").read_text())
    (declared / "config.json").write_text(json.dumps({**cfg, "prompt_style": {"instruction": "none"}}))
    rendered = []
    real = run_mod.render_prompt
    monkeypatch.setattr(run_mod, "render_prompt", lambda p, tok, style: rendered.append(style.instruction) or real(p, tok, style))
    sample_to_file(str(declared), spec, tmp_path / "a.jsonl", 1, PARAMS, progress=False)
    sample_to_file(str(root / "hybrid"), spec, tmp_path / "b.jsonl", 1, PARAMS, progress=False)
    assert rendered == ["none"] * 5 + ["auto"] * 5


def _cli(root, spec, out, *models):
    return ["sample", *models, "--data", spec, "--out", str(out), "--n", "3", "--temperature", "1.0",
            "--max-new-tokens", "12", "--batch-size", "4", "--seed", "7", "--quiet", "--no-grade"]


def test_sample_command_takes_turns_between_several_models(pair, tmp_path, capsys):
    root, spec = pair
    teacher, hybrid = str(root / "teacher"), str(root / "hybrid")
    assert main(_cli(root, spec, tmp_path / "a.jsonl", "--name", "h2", "--model", hybrid)) == 0  # one model: --name anywhere
    assert main(_cli(root, spec, tmp_path / "both", "--model", teacher, "--model", hybrid, "--name", "h2")) == 0
    assert sorted(p.name for p in (tmp_path / "both").iterdir()) == ["h2.jsonl", "teacher.jsonl"]
    assert _content(tmp_path / "both" / "h2.jsonl") == _content(tmp_path / "a.jsonl")
    assert {json.loads(line)["model"] for line in (tmp_path / "both" / "teacher.jsonl").read_text().splitlines()} == {"teacher"}
    capsys.readouterr()
    assert main(_cli(root, spec, tmp_path / "both", "--model", teacher, "--model", hybrid, "--name", "h2")) == 0
    assert capsys.readouterr().out.count("nothing to do") == 2


@pytest.mark.parametrize("models, out, needle", [
    (["--model", "{t}", "--model", "{t}"], "dir", "two --model are named 'teacher'"),
    (["--model", "{t}", "--model", "{h}"], "file", "a file is there"),
    (["--model", "{t}", "--name", "a", "--name", "b"], "dir", "already named 'a'"),
])
def test_bad_multi_model_sampling_is_one_line(pair, tmp_path, capsys, models, out, needle):
    root, spec = pair
    target = tmp_path / "out"
    if out == "file":
        target.write_text("keep")
    models = [m.format(t=root / "teacher", h=root / "hybrid") for m in models]
    assert main(_cli(root, spec, target, *models)) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2
    assert (target.read_text() == "keep") if out == "file" else not target.exists()



def test_turn_seconds_must_be_positive(pair, tmp_path, capsys):
    root, spec = pair
    with pytest.raises(SystemExit) as e:
        main(_cli(root, spec, tmp_path / "o", "--model", str(root / "teacher"), "--turn-seconds", "0"))
    assert e.value.code == 2 and "--turn-seconds: 0 must be a number above 0" in capsys.readouterr().err.splitlines()[-1]


def test_sharded_turns_merge_into_the_single_process_files(pair, tmp_path, monkeypatch):
    root, spec = pair
    sample_interleaved(_jobs(root, tmp_path / "single"), _common(spec), progress=False)
    monkeypatch.setattr(run_mod, "_barrier", lambda: None)  # ranks run one after the other here
    monkeypatch.setattr(run_mod, "_join_process_group", lambda: None)
    for rank in (1, 0):  # rank 0 last: it merges every model's parts once everyone is done
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        sample_interleaved(_jobs(root, tmp_path / "sharded"), _common(spec), progress=False)
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == ["hybrid.jsonl", "teacher.jsonl"]  # no parts left
    for name in ("teacher", "hybrid"):
        assert _content(tmp_path / "sharded" / f"{name}.jsonl") == _content(tmp_path / "single" / f"{name}.jsonl")
