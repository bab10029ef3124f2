"""lm-evaluation-harness with thinkfast models: `--model thinkfast` (generate_until on the engine) against lm-eval's
own `hf` model on the same weights, loglikelihood through HFLM's padded batches for a hybrid, the `thinkfast lm-eval`
command end to end on a local task, and bad input."""

import json
import sys

import pytest
import torch
# lm-eval is in the test extra (pip install -e '.[test]'): its absence fails here rather than skipping the feature
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from thinkfast.cli import main
from thinkfast.data.sources import load_problems
from thinkfast.embedded import embedded_teacher_dir, sums_spec
from thinkfast.eval.harness import ThinkfastHarnessLM, sampling_params


def _contexts(tok, n=6, seed=950000):
    """Sums of 2-8 terms (prompts of different lengths) in the embedded teacher's chat template."""
    problems = load_problems(sums_spec(n, seed))
    return [tok.apply_chat_template([{"role": "user", "content": p.question}], add_generation_prompt=True, tokenize=False)
            for p in problems], problems


def _requests(contexts, gen_kwargs):
    return [Instance(request_type="generate_until", doc={}, arguments=(c, dict(gen_kwargs)), idx=i)
            for i, c in enumerate(contexts)]


@pytest.fixture(scope="module")
def teacher_lm():
    return ThinkfastHarnessLM(pretrained=str(embedded_teacher_dir()), slots=4, batch_size=4, device="cpu")


def test_generate_until_on_the_engine_equals_lm_evals_hf_model(teacher_lm):
    tok = teacher_lm.tokenizer
    contexts, problems = _contexts(tok)
    assert len({len(tok(c)["input_ids"]) for c in contexts}) > 2, "the test needs prompts of different lengths"
    hf = HFLM(pretrained=teacher_lm.model, tokenizer=tok, batch_size=4, device="cpu")
    for gen_kwargs in ({"until": ["<|im_end|>"], "do_sample": False, "max_gen_toks": 400},
                       {"until": ["="], "do_sample": False, "max_gen_toks": 40}):  # a stop string mid-answer
        ours = teacher_lm.generate_until(_requests(contexts, gen_kwargs))
        theirs = hf.generate_until(_requests(contexts, gen_kwargs))
        assert ours == theirs
    assert all("=" not in t for t in ours) and any(t for t in ours)
    # the trained teacher answers: the engine's texts hold its final answers (as the demo's graded samples do)
    full = teacher_lm.generate_until(_requests(contexts, {"do_sample": False, "max_gen_toks": 400}))
    assert sum(p.answer in t.split("####")[-1] for t, p in zip(full, problems)) >= 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generate_until_on_the_gpu_engine_equals_lm_evals_hf_model_there():
    """On a GPU the engine replays CUDA graphs; HFLM runs generate() eagerly: the same answers (fp32)."""
    lm = ThinkfastHarnessLM(pretrained=str(embedded_teacher_dir()), slots=4, batch_size=4, device="cuda")
    assert lm.engine.use_graphs
    contexts, _ = _contexts(lm.tokenizer)
    hf = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=4)
    gen = {"until": ["<|im_end|>"], "do_sample": False, "max_gen_toks": 400}
    assert lm.generate_until(_requests(contexts, gen)) == hf.generate_until(_requests(contexts, gen))


def test_sampled_generate_until_is_reproducible_and_follows_the_seed(teacher_lm):
    contexts, _ = _contexts(teacher_lm.tokenizer, n=5, seed=951000)
    gen = {"do_sample": True, "temperature": 2.5, "max_gen_toks": 60}  # hot: the teacher is sure of its sums
    first = teacher_lm.generate_until(_requests(contexts, gen))
    assert first == teacher_lm.generate_until(_requests(contexts, gen))  # per-request seeds: reproducible
    teacher_lm.seed = 1
    try:
        other = teacher_lm.generate_until(_requests(contexts, gen))
    finally:
        teacher_lm.seed = 0
    assert other != first


@torch.no_grad()
def test_loglikelihood_of_a_hybrid_through_hflms_padded_batches_equals_its_own_forward(tmp_path):
    from thinkfast.models.teacher import load_thinkfast
    from thinkfast.models.transfer import from_teacher

    teacher, tok = load_thinkfast(embedded_teacher_dir())
    student = from_teacher(teacher, kind="hybrid", attn_layers=[1], seed=0)
    student.save_pretrained(tmp_path / "hybrid")
    tok.save_pretrained(tmp_path / "hybrid")
    lm = ThinkfastHarnessLM(pretrained=str(tmp_path / "hybrid"), batch_size=3, device="cpu")
    contexts, problems = _contexts(tok, n=5, seed=952000)
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=(c, f"{p.answer}<|im_end|>"), idx=i)
            for i, (c, p) in enumerate(zip(contexts, problems))]
    got = lm.loglikelihood(reqs)
    for (ll, _), c, p in zip(got, contexts, problems):
        ctx = tok(c.rstrip())["input_ids"]  # lm-eval scores the context's trailing newline with the continuation
        whole = tok(c + f"{p.answer}<|im_end|>")["input_ids"]
        logp = torch.log_softmax(lm.model(torch.tensor([whole])).logits[0].double(), -1)
        ref = sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole)))
        assert ll == pytest.approx(ref, abs=1e-3)


def _task(tmp_path, n=6):
    """A local generate_until task over procedural sums (no download), exact match on the `####` answer."""
    data = tmp_path / "sums.jsonl"
    with data.open("w") as f:
        for p in load_problems(sums_spec(n, 953000)):
            f.write(json.dumps({"question": p.question, "answer": p.answer}) + "\n")
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "tf_sums.yaml").write_text(f"""task: tf_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "<|im_start|>user\\n{{{{question}}}}<|im_end|>\\n<|im_start|>assistant\\n"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["<|im_end|>"]
  do_sample: false
  max_gen_toks: 400
filter_list:
  - name: final
    filter:
      - function: regex
        regex_pattern: "#### (\\\\-?[0-9]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    return task_dir


def _run(task_dir, out, model, model_args, monkeypatch, device=("--device", "cpu")):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # run_cli rewrites it for lm-eval's parser
    rc = main(["lm-eval", "--model", model, "--model_args", model_args, "--tasks", "tf_sums", "--include_path",
               str(task_dir), "--output_path", str(out), *device, "--batch_size", "4", "--log_samples"])
    assert rc == 0
    results = next(out.rglob("results_*.json"))
    return json.loads(results.read_text())["results"]["tf_sums"]


def test_the_lm_eval_command_runs_a_task_with_the_engine_as_with_hf(tmp_path, monkeypatch):
    task_dir = _task(tmp_path)
    # no --device, as the README's command: lm-eval's default (cuda:0) runs on the CPU where there is no GPU, as hf does
    ours = _run(task_dir, tmp_path / "ours", "thinkfast", f"pretrained={embedded_teacher_dir()},slots=4", monkeypatch,
                device=())
    # lm-eval's own `hf` model reads the same thinkfast folder, since the command has imported thinkfast
    theirs = _run(task_dir, tmp_path / "hf", "hf", f"pretrained={embedded_teacher_dir()}", monkeypatch)
    assert ours["exact_match,final"] == theirs["exact_match,final"] >= 0.5


def test_bad_input_is_one_clear_line(tmp_path, monkeypatch, capsys):
    with pytest.raises(Exception, match="'num_beams' of this task.*--model hf"):
        sampling_params({"num_beams": 4, "do_sample": False}, 256)
    assert sampling_params({"until": "\n", "do_sample": False, "temperature": 0.7}, 256).temperature == 0
    assert sampling_params({"do_sample": True}, 32).temperature == 1.0
    # as HFLM (lm-eval's normalize_gen_kwargs): greedy unless do_sample or a positive temperature says otherwise,
    # whatever the model's generation_config says; a sampled task takes the settings it leaves out from it
    sampling = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": None}
    assert sampling_params({"until": ["\n"]}, 32, sampling).temperature == 0
    assert sampling_params({"temperature": 0.0}, 32, sampling).temperature == 0
    got = sampling_params({"temperature": 0.7}, 32, sampling)
    assert (got.temperature, got.top_p, got.top_k, got.min_p) == (0.7, 0.9, 20, 0.0)
    got = sampling_params({"do_sample": True, "top_p": 0.5}, 32, sampling)
    assert (got.temperature, got.top_p, got.top_k) == (0.6, 0.5, 20)
    assert sampling_params({"temperature": 0.7}, 32).top_p == 1.0
    assert sampling_params({"max_new_tokens": 9}, 32).max_new_tokens == 9
    task_dir = _task(tmp_path, n=2)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    rc = main(["lm-eval", "--model", "thinkfast", "--model_args", f"pretrained={tmp_path / 'nowhere'}", "--tasks",
               "tf_sums", "--include_path", str(task_dir), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("thinkfast lm-eval: error: pretrained") and "nowhere" in err[-1]
    # model_args checked before the model loads (a typo used to run with the default; a bad number, a traceback),
    # and lm-eval's own refusals (an unknown task) in one line too
    teacher = str(embedded_teacher_dir())
    for model_args, says in [(f"pretrained={teacher},slots=abc", "model_args slots=abc: expected a whole number"),
                             (f"pretrained={teacher},slots=0", "model_args slots=0: use at least 1"),
                             (f"pretrained={teacher},slot=8", "model_args slot=8: not an argument of --model thinkfast (did you mean 'slots'?)"),
                             ("dtype=float32", "--model thinkfast needs --model_args pretrained=PATH")]:
        rc = main(["lm-eval", "--model", "thinkfast", "--model_args", model_args, "--tasks", "tf_sums", "--include_path",
                   str(task_dir), "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2 and f"thinkfast lm-eval: error: {says}" in err and "Traceback" not in err, err
    rc = main(["lm-eval", "--model", "thinkfast", "--model_args", f"pretrained={teacher}", "--tasks", "no_such_task",
               "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "thinkfast lm-eval: error: Tasks not found: no_such_task" in err and "Traceback" not in err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    assert main(["lm-eval", "--tasks", "x"]) == 2
    assert "pip install 'thinkfast[lm-eval]'" in capsys.readouterr().err
