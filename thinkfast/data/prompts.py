"""Prompts: the question as a chat turn (the model's own chat template when it has one), an instruction saying
where the final answer goes, optional few-shot examples; and the matching SFT target for a worked solution."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ..errors import ConfigError, option
from .sources import Problem

INSTRUCTIONS = {
    "boxed": "Solve the problem step by step. Put the final answer in \\boxed{}.",
    "hash": "Solve the problem step by step. Write the final answer on its own line after '#### '.",
    "none": "",
}
BOXED = re.compile(r"\\boxed\{")


def _near_key(text: str) -> str | None:
    import difflib

    if text in INSTRUCTIONS or text == "auto" or not re.fullmatch(r"[A-Za-z_]+", text):
        return None
    close = difflib.get_close_matches(text.lower(), [*INSTRUCTIONS, "auto"], n=1, cutoff=0.7)
    return close[0] if close else None


@dataclass
class PromptStyle:
    instruction: str = "auto"  # auto (boxed for math, hash otherwise) | boxed | hash | none | any literal text
    system: str | None = None
    few_shot: list[Problem] | None = None
    chat: bool = True  # use the tokenizer's chat template when it has one
    # extra variables for the chat template, as vLLM's `chat_template_kwargs` (Qwen3: {"enable_thinking": false})
    template_kwargs: dict | None = None

    def __post_init__(self):
        if not isinstance(self.instruction, str):
            raise ConfigError(f"instruction {self.instruction!r}: give auto, boxed, hash, none or the instruction's text")
        if self.template_kwargs is not None and not isinstance(self.template_kwargs, dict):
            raise ConfigError(f"template_kwargs {self.template_kwargs!r}: give a dict of chat-template variables, e.g. "
                              "{'enable_thinking': False}")
        near = _near_key(self.instruction)
        if near:  # a one-word literal text one letter from a key is a typo, not an instruction
            raise ConfigError(f"instruction {self.instruction!r}: did you mean {near!r}? (the keys are auto, boxed, "
                              "hash and none; any other text is written into the prompt as it is)")

    def instruction_for(self, problem: Problem) -> str:
        key = self.instruction
        if key == "auto":
            key = "boxed" if problem.kind == "math" else "hash"
        return INSTRUCTIONS.get(key, key)


def parse_template_kwargs(value, where: str) -> dict | None:
    """Chat template variables from a JSON object's text (a flag) or a mapping (a recipe's TOML table); None when
    empty. `where` names the flag or recipe in the one-line error."""
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where} {value!r}: not JSON ({e.msg}); give an object, e.g. "
                              "'{\"enable_thinking\": false}'") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{where} {value!r}: a JSON object / TOML table is needed, e.g. '{{\"enable_thinking\": false}}'")
    return value or None


def declared_prompt_style(model_dir) -> dict:
    """How a checkpoint says it was trained to be prompted (`prompt_style` in its config.json): `instruction`,
    and `chat: false` / `template_kwargs` where it was trained so; {} when it says nothing."""
    import json
    from pathlib import Path

    cfg = Path(model_dir) / "config.json"
    try:
        style = json.loads(cfg.read_text()).get("prompt_style") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}
    return style if isinstance(style, dict) else {}


def declared_style(model_dir, **given) -> "PromptStyle":
    """The PromptStyle a checkpoint declares (instruction, else "auto"; chat; template kwargs), with `given`
    settings (those a caller set) taking precedence."""
    declared = declared_prompt_style(model_dir)
    style = {"instruction": declared.get("instruction") or "auto", "chat": declared.get("chat", True) is not False,
             "template_kwargs": declared.get("template_kwargs") or None}
    given = {k: v for k, v in given.items() if v is not None}
    if given.get("template_kwargs") and "chat" not in given and not style["chat"]:
        # the variables would be dropped in silence: the model says it was trained without its template
        raise ConfigError(f"{model_dir}: its config.json declares it was trained without its chat template "
                          f"(prompt_style chat: false), so {option('--chat-template-kwargs', 'template_kwargs')} "
                          f"would go unused; add {option('--chat', 'chat=True')} to prompt it through the template")
    return PromptStyle(**{**style, **given})


def user_message(problem: Problem, style: PromptStyle) -> str:
    instruction = style.instruction_for(problem)
    return f"{problem.question}\n\n{instruction}" if instruction else problem.question


def solution_text(problem: Problem, style: PromptStyle | None = None) -> str:
    """The worked solution as a completion, ending in the final-answer format the instruction asks for."""
    if problem.solution is None:
        raise ValueError(f"problem {problem.id} has no worked solution")
    sol = problem.solution.strip()
    # a gold answer kept in GSM8K's dataset form (a jsonl ?kind=gsm8k answer field) states its number after ####
    answer = str(problem.answer)
    answer = answer.rsplit("####", 1)[1].strip() if problem.kind != "math" and "####" in answer else answer
    key = (style or PromptStyle()).instruction
    if key == "auto":
        key = "boxed" if problem.kind == "math" else "hash"
    if key == "boxed" and not BOXED.search(sol):
        body = re.sub(r"\n?#### .*$", "", sol).rstrip()
        sol = "\n".join(filter(None, [body, f"The final answer is $\\boxed{{{answer}}}$."]))
    elif key == "hash" and "#### " not in sol:
        sol = "\n".join(filter(None, [sol, f"#### {answer}"]))
    elif not sol:  # answer only, in the kind's own format (no instruction names one)
        sol = answer if problem.kind == "math" else f"#### {answer}"
    return sol


# what a plain prompt's next block would open with; sampling stops there by default, as lm-eval's gsm8k does
PLAIN_STOP = "Question:"


def has_chat_template(tokenizer) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def examples_style(problem: Problem, style: PromptStyle) -> PromptStyle:
    """The style worked examples are shown in: the question's answer format, so that examples of another kind
    (GSM8K ones before a MATH question) show the format the question asks for, as lm-eval's share one."""
    if style.instruction != "auto":
        return style
    return replace(style, instruction="boxed" if problem.kind == "math" else "hash")


def messages_for(problem: Problem, style: PromptStyle) -> list[dict]:
    msgs = [{"role": "system", "content": style.system}] if style.system else []
    shown = examples_style(problem, style)
    for ex in style.few_shot or []:
        msgs.append({"role": "user", "content": user_message(ex, shown)})
        msgs.append({"role": "assistant", "content": solution_text(ex, shown)})
    msgs.append({"role": "user", "content": user_message(problem, style)})
    return msgs


def _apply_template(tokenizer, messages: list[dict], style: PromptStyle, **kwargs) -> str:
    """The chat template's text; a template that raises (Gemma's takes no system turn, Mistral's wants turns
    to alternate) is a one-line error naming what to change."""
    from jinja2 import TemplateError  # what chat templates raise (transformers renders them with jinja2)

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs, **(style.template_kwargs or {}))
    except TemplateError as e:
        hint = (f"drop {option('--system', 'system')} (this template takes no system turn)" if style.system
                else f"pass {option('--no-chat', 'chat=False')} for plain Question/Answer prompts")
        raise ConfigError(f"the model's chat template refused the prompt ({str(e).splitlines()[0][:120]}); {hint}") from None


def render_prompt(problem: Problem, tokenizer=None, style: PromptStyle | None = None) -> str:
    """Text that precedes the model's answer (the assistant turn is opened, not closed)."""
    style = style or PromptStyle()
    if style.chat and has_chat_template(tokenizer):
        return _apply_template(tokenizer, messages_for(problem, style), style, add_generation_prompt=True)
    parts = [style.system] if style.system else []
    shown = examples_style(problem, style)
    for ex in style.few_shot or []:
        parts.append(f"Question: {user_message(ex, shown)}\nAnswer: {solution_text(ex, shown)}")
    parts.append(f"Question: {user_message(problem, style)}\nAnswer:")
    return "\n\n".join(parts)


def render_example(problem: Problem, tokenizer=None, style: PromptStyle | None = None) -> tuple[str, str]:
    """(prompt, completion) for SFT and distillation: completion is the worked solution plus end of turn."""
    style = style or PromptStyle()
    prompt = render_prompt(problem, tokenizer, style)
    completion = solution_text(problem, style)
    if style.chat and has_chat_template(tokenizer):
        messages = messages_for(problem, style)
        full = _apply_template(tokenizer, messages + [{"role": "assistant", "content": completion}], style)
        if full.startswith(prompt):  # the template's own end-of-turn marker follows the answer
            return prompt, full[len(prompt):]
        # a template that rewrites an assistant turn (R1-style ones drop its <think> part from the history) and
        # opens the turn with `<think>` itself: the solution continues the prompt as sampling would see it, without
        # a second <think>, then the template's end of turn
        return prompt, _after_opened_think(prompt, completion) + _end_of_turn(tokenizer, messages, style.template_kwargs)
    eos = getattr(tokenizer, "eos_token", None) or ""
    return prompt, " " + completion + eos


_TURN_MARK = "\u2063thinkfast-end-of-turn\u2063"  # text no template rewrites: what follows it ends a turn


def _end_of_turn(tokenizer, messages: list[dict], template_kwargs: dict | None = None) -> str:
    """What the chat template writes after an assistant message's content (its end-of-turn token and spacing)."""
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": _TURN_MARK}], tokenize=False,
                                         **(template_kwargs or {}))
    at = full.rfind(_TURN_MARK)
    return full[at + len(_TURN_MARK):] if at >= 0 else getattr(tokenizer, "eos_token", None) or ""


def _after_opened_think(prompt: str, completion: str) -> str:
    """The completion without its opening `<think>` when the prompt already ends with one."""
    if re.search(r"<think>\s*$", prompt) and completion.lstrip().startswith("<think>"):
        return completion.lstrip()[len("<think>"):].lstrip()
    return completion


def few_shot_examples(source, k: int, seed: int = 0, exclude=()) -> list[Problem]:
    """`k` worked examples for `PromptStyle.few_shot`, drawn with a fixed seed from a data spec (e.g. the
    training split, `gsm8k:../shared/data/gsm8k_train.jsonl`) or a list of problems. Problems without a worked
    solution are never drawn, nor any whose id or question is in `exclude` (pass the evaluated problems so
    that none is shown its own solution)."""
    import random

    from ..errors import DataError
    from .sources import load_problems

    if k <= 0:
        return []
    problems = load_problems(source) if isinstance(source, str) else list(source)
    banned = {x.id if isinstance(x, Problem) else x for x in exclude} | {x.question for x in exclude if isinstance(x, Problem)}
    # a text document has a "solution" (its text) but no question or answer: no worked example
    pool = [p for p in problems if p.solution and p.question.strip() and str(p.answer).strip()
            and p.id not in banned and p.question not in banned]
    if len(pool) < k:
        raise DataError(f"few-shot: asked for {k} examples but only {len(pool)} problems with a question, a worked "
                        "solution and an answer are available (problems also being evaluated are left out; text: "
                        "documents have neither question nor answer)")
    return random.Random(seed).sample(pool, k)
