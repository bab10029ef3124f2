"""Grading: pull the final answer out of a completion and decide whether it equals the gold answer.

Kinds:
  gsm8k, number  the final answer is the last `\\boxed{}`, else the last `####` marker that states a number (its
                 text up to the next run of four or more `#`: a `#####` rule is not a marker; `#### 9 + 2 = 11`
                 answers 11; a leading "Final answer:" is dropped); markdown headings (`#### Step 2: Money`, `####
                 Final Answer`) are no markers: under one, the last number below it; else the number stated after
                 the last "the (final) answer is" / "Final answer:"; else the last number.
                 Thousands separators, currency signs, `%`, units and a leading `x =` are stripped; `18.00 == 18 == 36/2`;
                 strict equality, no partial credit. A gold answer that is not a number (reasoning-gym tasks with
                 word answers) is compared as text, ignoring case and surrounding spaces.
  math           the last `\\boxed{}`, else the text after the last `####` that is no heading, else what follows the
                 last "the (final) answer is" / "Final answer:" to the end of its sentence (also lm-eval minerva's
                 "Final Answer: The final answer is 7. I hope it is correct."; markdown bold dropped; a `$$ ... $$`
                 or `\\[ ... \\]` block when one opens right after it), else the last number; equivalence is
                 decided by math-verify with the gold
                 wrapped in `$...$`, in a pool of worker processes with a hard timeout per item. A hung or crashed
                 worker is killed and replaced and its item is *ungraded* (correct=None, with the reason), never
                 silently marked wrong.

A completion with no extractable answer is graded wrong (the model did not answer), not ungraded.

`GradeResult.answer` is the extracted answer in a canonical form (`"1,000.00"` -> `"1000"`, `\\dfrac12` and
`\\frac{1}{2}` -> `"1/2"` ... ) so that majority voting counts equal answers together.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from ..errors import ThinkfastError

KINDS = ("gsm8k", "math", "number")
DEFAULT_TIMEOUT = 10.0  # seconds per math item; math-verify's own default is 5 s parse + 5 s verify
WORKER_SCRIPT = Path(__file__).with_name("_mathverify_worker.py")
WORKER_MEMORY_MB = 4096  # address-space cap per worker (an idle one uses under 100 MiB)


@dataclass
class GradeResult:
    correct: bool | None  # None: ungraded (see `error`)
    answer: str | None  # canonical extracted answer; None when the completion has none
    error: str | None = None  # why it is ungraded


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ThinkfastError(f"grader kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
    return kind


# --------------------------------------------------------------------------------------------- extraction

BOX_COMMANDS = ("\\boxed", "\\fbox")
SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>|</s>|<eos>|<end_of_turn>")  # <|im_end|>, <|eot_id|>, ...
# GSM8K's marker, not part of a longer run of #; its answer runs to the line's end or the next run of four or more
# `#` (`x #### 17 y #### 18` answers 18, `#### 42 #####` answers 42)
HASH_ANSWER = re.compile(r"(?<!#)####(?!#)[ \t]*((?:(?!####)[^\n])*)")
# `#### Final answer: 42`; also a bare `#### Final Answer` heading (nothing left)
ANSWER_LABEL = re.compile(r"^[*_]*(?:the\s+)?(?:final\s+)?answer[*_]*\s*(?:is\b|:|$)[*_]*\s*:?[*_]*\s*", re.IGNORECASE)
# markdown headings that are not answers: `#### Step 2: Money`, `#### Solution`
HEADING = re.compile(r"^[*_]*(?:step|part|case|solution|problem|explanation|conclusion|summary|verification|check|"
                     r"calculation|analysis|approach|method|setup|given|reasoning)\b", re.IGNORECASE)
# "the (final) answer is", "Final Answer:", markdown emphasis allowed around it; a lookahead, so that Minerva's
# "Final Answer: The final answer is 7. I hope it is correct." also matches at the inner phrase (the last one wins)
FINAL_PHRASE = re.compile(r"(?=(?:final answer|the answer)[*_]*\s*(?:is|:)[*_]*\s*:?[*_]*\s*([^\n]+))", re.IGNORECASE)
DISPLAY_MATH = re.compile(r"\$\$(.+?)\$\$|\\\[(.+?)\\\]", re.DOTALL)  # $$ ... $$ or \[ ... \], across lines
# a number as people write it: sign, thousands separators, decimals, an optional /denominator
NUMBER = re.compile(r"[-−+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|[-−+]?\.\d+")
LEADING_NUMBER = re.compile(r"^[-−+]?[$€£¥₹]?\s*(?:\d|\.\d)")  # `#### 18`, `#### $1,200`, `#### -3`
EQUATION = re.compile(r"^[^\s=]+\s*(?:[-+*/×x÷·]|\\times|\\cdot|\\div)\s*[^\s=]")  # `3 + 4 = 7` shows its sum


def _brace_pairs(text: str) -> dict[int, int]:
    """Index of each `{` -> index of its matching `}`, in one pass (unbalanced ones are left out)."""
    pairs, stack = {}, []
    for j, c in enumerate(text):
        if c == "{":
            stack.append(j)
        elif c == "}" and stack:
            pairs[stack.pop()] = j
    return pairs


def _braced(text: str, start: int, pairs: dict[int, int] | None = None) -> tuple[str, int] | None:
    """Content of the {...} group opening at text[start] and the index after it; None if unbalanced."""
    end = (pairs if pairs is not None else _brace_pairs(text)).get(start)
    if end is None:
        return None
    return text[start + 1: end], end + 1


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` (or `\\fbox{...}`, `\\boxed 5`); a cut-off one is skipped."""
    found = _last_box(text, len(text))
    return None if found is None else found[0]


def _last_box(text: str, end: int, pairs: dict[int, int] | None = None) -> tuple[str, int, int] | None:
    """(content, start, end) of the last complete box that starts before `end`."""
    while True:
        idx = max(text.rfind(cmd, 0, end) for cmd in BOX_COMMANDS)
        if idx < 0:
            return None
        cmd = next(c for c in BOX_COMMANDS if text.startswith(c, idx))
        i = idx + len(cmd)
        if i < len(text) and text[i] == "{":
            pairs = _brace_pairs(text) if pairs is None else pairs  # matched once, lazily: linear however many are open
            got = _braced(text, i, pairs)
            if got is not None and got[0].strip():
                return got[0].strip(), idx, got[1]
        elif i < len(text) and text[i] == " ":  # \boxed 5
            m = re.match(r" +([^\s$]+)", text[i:])
            if m:
                return m.group(1), idx, i + m.end()
        end = idx


# what lists boxes: `$\boxed{-2}$ and $\boxed{1}$`, `\boxed{-2}, \boxed{1}`, `$x = \boxed{-2}$ or $x = \boxed{1}$`
BOX_JOINER = re.compile(r"\$?\s*(?:,|,?\s*\b(?:and|or)\b)\s*\$?\s*(?:[A-Za-z]\w*\s*=\s*)?")


def boxed_answers(text: str, most: int = 6) -> str | None:
    """The last box, or the last run of boxes listed with `,` / `and` / `or` joined as one list (`-2, 1`), as
    math-verify reads several boxed answers; None when there is no complete box."""
    pairs = _brace_pairs(text)
    found = _last_box(text, len(text), pairs)
    if found is None:
        return None
    answers = [found]
    while len(answers) < most:
        before = _last_box(text, answers[-1][1], pairs)
        if before is None or not BOX_JOINER.fullmatch(text, before[2], answers[-1][1]):
            break
        answers.append(before)
    return ", ".join(a[0] for a in reversed(answers))


def _unmarked(text: str) -> str:
    """Without markdown emphasis (`**7**`, `__7__`) and surrounding `$`, spaces and a full stop."""
    text = re.sub(r"\*\*|__", "", text).strip()
    return text.rstrip(".").strip("$ ").rstrip(".").strip()


def _number_answer(answer: str) -> str:
    """The number a number-kind answer states: `9 + 2 = 11` -> 11, `18 (eighteen)` -> 18, `{18}` -> 18."""
    answer = answer.strip()
    while answer.startswith("{") and answer.endswith("}") and _braced(answer, 0) == (answer[1:-1], len(answer)):
        answer = answer[1:-1].strip()
    if parse_number(answer) is not None:
        return answer
    if "=" in answer and EQUATION.match(answer):  # the result, not the sum
        return answer.rsplit("=", 1)[1].strip() or answer
    first = NUMBER.search(answer) if LEADING_NUMBER.match(answer) else None
    if first is not None and re.match(r"\s*\(", answer[first.end():]):
        return first.group(0)  # a remark in brackets after it: `18 (eighteen)`, `600 (= 6*100)`
    return answer  # `4 or 5` stays unreadable


def _from_marks(text: str, kind: str) -> str | None:
    """The answer the GSM8K `####` markers give, telling markdown headings (`#### Step 2: Money`) apart."""
    marks = list(HASH_ANSWER.finditer(text))
    if not marks:
        return None
    answers = [(ANSWER_LABEL.sub("", m.group(1).strip()).strip(), m) for m in marks]
    if kind != "math":
        numeric = [(a, m) for a, m in answers if LEADING_NUMBER.match(a)]
        if numeric:  # the marker that states a number, as lm-eval's `#### (-?[0-9.,]+)` reads it
            return _number_answer(numeric[-1][0])
    answer, mark = answers[-1]
    after = text[mark.end():]
    if answer and not HEADING.match(answer) and not answer.endswith(":"):
        if kind == "math":
            return answer
        if NUMBER.search(answer):
            return _number_answer(answer)
        if not NUMBER.search(after):
            return answer  # a word answer
    if kind == "math":  # under a `#### Final Answer` heading: its next line; other headings answer nothing
        if not answer:
            line = next((ln for ln in after.splitlines() if ln.strip()), "")
            return _unmarked(line) or None
        return None
    numbers = NUMBER.findall(after)  # a heading: the last number below it
    return numbers[-1] if numbers else None


def _from_phrase(text: str, kind: str) -> str | None:
    """What follows the last "the (final) answer is" / "Final answer:", to the end of its sentence."""
    phrases = list(FINAL_PHRASE.finditer(text))
    if not phrases:
        return None
    start = phrases[-1].start(1)
    block = DISPLAY_MATH.match(text, start)  # "The final answer is:" then a display block
    said = (block.group(1) or block.group(2)) if block else phrases[-1].group(1)
    if not block:  # "the answer is 3. Then ..." : the sentence the phrase opens, not what comes after it
        said = re.split(r"\.\s", said, maxsplit=1)[0]
    said = _unmarked(said)
    if kind != "math" and said:
        if not NUMBER.search(said):  # a word answer, unless numbers follow ("the answer is not obvious ... 18")
            return None if NUMBER.search(text, start) else said
        boxed = last_boxed(said)
        said = _number_answer(boxed if boxed is not None else said)
    return said or None


def extract_answer(text: str, kind: str) -> str | None:
    """The raw final-answer text of a completion (not yet canonical), or None when it has none."""
    check_kind(kind)
    if not text:
        return None
    text = SPECIAL_TOKEN.sub("\n", text)  # an end-of-turn marker left in the text is not part of the answer
    if kind == "math":
        boxed = boxed_answers(text)
        if boxed is not None:
            return boxed
    else:
        boxed = last_boxed(text)
        if boxed is not None:
            return _number_answer(boxed)
    for rule in (_from_marks, _from_phrase):
        answer = rule(text, kind)
        if answer:
            return answer
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


# --------------------------------------------------------------------------------------------- numbers

UNIT_WORD = re.compile(r"[A-Za-z]+\.?(?:\^\{?[23]\}?)?")  # cm, ft., m^2, m^{3}
LATEX_FRAC = re.compile(r"^([-+]?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")
LATEX_FRAC_SHORT = re.compile(r"^([-+]?)\\[dt]?frac(\d)(\d)$")  # \frac12
MAX_DIGITS = 64  # longer "numbers" are not answers; refusing them keeps Fraction arithmetic cheap


def _strip_decorations(s: str) -> str:
    s = s.replace("−", "-").replace("\\$", "").replace("\\%", "")
    s = re.sub(r"[$%€£¥₹]|\\(?:euro|pounds|yen)\b", "", s)
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r" \1 ", s)
    s = re.sub(r"\^\{?\\circ\}?|°|\\circ", "", s)
    s = re.sub(r"\\[!,;: ]|~|\\left|\\right|\\displaystyle", "", s)
    s = s.replace("{,}", ",")
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)  # thousands separators only: "1,2" stays a list
    s = s.strip().rstrip(".").strip()
    s = re.sub(r"^[A-Za-z]\w*\s*=\s*", "", s)  # x = 5
    return s.strip()


def parse_number(text: str | None) -> Fraction | None:
    """An exact number from an answer string, or None if it is not a single number (units allowed)."""
    if text is None:
        return None
    s = _strip_decorations(text)
    m = LATEX_FRAC.match(s) or LATEX_FRAC_SHORT.match(s)
    if m:
        num, den = parse_number(m.group(2)), parse_number(m.group(3))
        if num is None or den is None or den == 0:
            return None
        return (-1 if m.group(1) == "-" else 1) * num / den
    m = re.match(r"^([-+]?(?:\d+(?:\.\d*)?|\.\d+))(?:\s*/\s*(\d+))?", s)
    if not m or len(m.group(0)) > MAX_DIGITS:
        return None
    rest = re.sub(r"\s*\^\s*", "^", s[m.end():]).strip()
    if rest and not all(UNIT_WORD.fullmatch(w) for w in re.split(r"\s*/\s*|\s+", rest)):  # "18 dollars", "3 m/s"
        return None
    value = Fraction(m.group(1))
    if m.group(2) is not None:
        if int(m.group(2)) == 0:
            return None
        value /= int(m.group(2))
    return value


def canonical_number(x: Fraction) -> str:
    """18 -> "18", 1/2 -> "0.5", 1/3 -> "1/3": one spelling per value."""
    if x.denominator == 1:
        return str(x.numerator)
    d, twos, fives = x.denominator, 0, 0
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    if d != 1:
        return f"{x.numerator}/{x.denominator}"
    places = max(twos, fives)  # a terminating decimal: exact digits, no float rounding
    scaled = abs(x.numerator) * 10**places // x.denominator
    digits = str(scaled).rjust(places + 1, "0")
    return ("-" if x < 0 else "") + (digits[:-places] + "." + digits[-places:]).rstrip("0")


def _text_key(s: str) -> str:
    return " ".join(_strip_decorations(s).split()).lower()


def _letter_after_number(raw: str) -> bool:
    bare = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{[^{}]*\}|\\[A-Za-z]+", " ", raw)  # units in \text{}, commands
    return re.search(r"\d\s*[A-Za-z]", bare) is not None


def canonical_answer(raw: str | None, kind: str) -> str | None:
    """The voting key of an extracted answer: equal answers spelled differently get one key."""
    if raw is None:
        return None
    # in math a letter after a number is part of the answer (2k, 3R^2, y = -2x), not a unit: only \text{} is
    value = None if kind == "math" and _letter_after_number(raw) else parse_number(raw)
    if value is not None:
        return canonical_number(value)
    if kind != "math":
        return _text_key(raw) or None
    s = raw.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])|\\displaystyle|\\[!,;: ]|~|\$", "", s)
    s = re.sub(r"\^\{?\\circ\}?|\\%", "", s)
    s = re.sub(r"^\\text\{([^{}]*)\}$", r"\1", s.strip())
    s = re.sub(r"\s+", "", s).rstrip(".")
    return s or None


# --------------------------------------------------------------------------------------------- grading


def _missing_gold(gold) -> bool:
    return gold is None or not str(gold).strip()


def grade_number(prediction: str, gold: str, kind: str = "number") -> GradeResult:
    """gsm8k / number grading: exact, in this process (bounded work, no pool needed)."""
    raw = extract_answer(prediction, kind)
    answer = canonical_answer(raw, kind)
    if answer is None:
        return GradeResult(False, None)
    gold_value = parse_number(gold)
    if gold_value is None:  # a word answer
        return GradeResult(answer == _text_key(gold), answer)
    pred_value = parse_number(raw)
    return GradeResult(pred_value is not None and pred_value == gold_value, answer)


def grade_many(predictions: list[str], golds: list[str], kinds: list[str], timeout: float = DEFAULT_TIMEOUT,
               pool: "MathGraderPool | None" = None) -> list[GradeResult]:
    """Grade a batch. math items go to the worker pool (started on first use, reused after); the rest run here."""
    if isinstance(predictions, str) or isinstance(golds, str):
        raise ThinkfastError("grade_many takes lists (one prediction, gold and kind per item); grade() takes one of each")
    predictions, golds, kinds = list(predictions), list(golds), list(kinds)
    if not len(predictions) == len(golds) == len(kinds):
        raise ThinkfastError(f"grade_many: {len(predictions)} predictions, {len(golds)} golds, {len(kinds)} kinds; pass one of each per item")
    _check_timeout(timeout)
    for i, (pred, gold, kind) in enumerate(zip(predictions, golds, kinds)):
        check_kind(kind)
        if _missing_gold(gold):
            raise ThinkfastError(f"item {i}: missing gold answer; every problem needs one to be graded")
        if pred is not None and not isinstance(pred, (str, int, float)):
            raise ThinkfastError(f"item {i}: prediction of type {type(pred).__name__}; give the completion's text")
        if not isinstance(gold, (str, int, float)):
            raise ThinkfastError(f"item {i}: gold answer of type {type(gold).__name__}; give the answer's text or number")
    predictions = [None if p is None else str(p) for p in predictions]
    golds = [gold_answer(str(g), k) for g, k in zip(golds, kinds)]
    results: list[GradeResult | None] = [None] * len(predictions)
    math_items: dict[int, str] = {}  # item -> its extracted answer
    for i, (pred, gold, kind) in enumerate(zip(predictions, golds, kinds)):
        if kind == "math":
            raw = extract_answer(pred or "", kind)
            if raw is None:
                results[i] = GradeResult(False, None)
            else:
                results[i] = GradeResult(None, canonical_answer(raw, kind))
                math_items[i] = raw
        else:
            results[i] = grade_number(pred or "", str(gold), kind)
    if math_items:
        pool = pool or default_pool()
        # math-verify sees the extracted answer boxed, so the verdict depends on the answer alone
        pairs = [(f"\\boxed{{{raw.strip().strip('$').strip()}}}", f"${str(golds[i]).strip().strip('$')}$")
                 for i, raw in math_items.items()]
        for i, (correct, error) in zip(math_items, pool.verify_many(pairs, timeout)):
            results[i].correct, results[i].error = correct, error
    return results  # type: ignore[return-value]


def grade(prediction: str, gold: str, kind: str, timeout: float = DEFAULT_TIMEOUT) -> bool | None:
    """True / False; None when the math grader could not decide in time (falsy, but not a verdict)."""
    if _missing_gold(gold):
        raise ThinkfastError("missing gold answer; a prediction is graded against one")
    try:
        return grade_many([prediction], [gold], [kind], timeout)[0].correct
    except ThinkfastError as e:
        raise ThinkfastError(str(e).removeprefix("item 0: ")) from None


def gold_answer(gold: str, kind: str) -> str:
    """A gold answer given as a dataset keeps it (GSM8K's whole solution ending `#### 72`, `\\boxed{18}`): its final
    answer, as a completion's would be read. A plain answer is returned as it is."""
    if kind != "math" and ("####" in gold or "\\boxed" in gold):
        return extract_answer(gold, kind) or gold
    return gold


def _check_timeout(timeout) -> None:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (math.isfinite(timeout) and timeout > 0):
        raise ThinkfastError(f"timeout={timeout!r}: give a positive number of seconds")


# --------------------------------------------------------------------------------------------- worker pool


class _Worker:
    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-u", str(WORKER_SCRIPT), str(WORKER_MEMORY_MB)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0,
        )
        self.fd = self.proc.stdout.fileno()
        self.buffer = b""
        self.ready = False
        self.started = time.monotonic()
        self.job: int | None = None  # index of the item it is working on
        self.deadline = 0.0

    def send(self, obj) -> None:
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())

    def read_messages(self) -> list[dict] | None:
        """Messages that arrived; None at end of file (the worker died)."""
        data = os.read(self.fd, 1 << 16)
        if not data:
            return None
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class MathGraderPool:
    """Worker processes running math-verify. Each item gets a hard deadline; a worker past it is killed and
    replaced (lazily, when there is more work), and the item is reported ungraded. Safe to share between
    threads (one batch at a time). Workers live until `close()` or interpreter exit."""

    def __init__(self, workers: int | None = None, startup_timeout: float = 60.0, cache_size: int = 200_000):
        if sys.platform == "win32":  # select() there takes sockets only, not the workers' pipes
            raise ThinkfastError("math grading runs on Linux and macOS, not on native Windows; use WSL2")
        self.size = max(1, workers or min(4, os.cpu_count() or 1))
        self.startup_timeout = startup_timeout
        self.workers: list[_Worker] = []
        self.cache: OrderedDict[tuple[str, str], bool] = OrderedDict()  # definitive verdicts only
        self.cache_size = cache_size
        self.restarts = 0  # workers killed for a timeout or found dead
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            for w in self.workers:
                w.kill()
            self.workers = []

    def _retire(self, w: _Worker) -> None:
        w.kill()
        self.workers.remove(w)

    def verify_many(self, pairs: list[tuple[str, str]], timeout: float = DEFAULT_TIMEOUT) -> list[tuple[bool | None, str | None]]:
        """[(prediction, gold_in_dollars)] -> [(correct or None, error or None)]."""
        with self._lock:
            out: list[tuple[bool | None, str | None] | None] = [None] * len(pairs)
            first: dict[tuple[str, str], int] = {}
            todo: deque[int] = deque()
            for i, pair in enumerate(pairs):
                if pair in self.cache:
                    self.cache.move_to_end(pair)
                    out[i] = (self.cache[pair], None)
                elif pair not in first:  # grade each distinct pair once
                    first[pair] = i
                    todo.append(i)
            if todo:
                self._run(pairs, list(todo), out, timeout)
            for i, pair in enumerate(pairs):
                if out[i] is None:
                    out[i] = out[first[pair]]
            return out  # type: ignore[return-value]

    def _run(self, pairs, todo_list: list[int], out, timeout: float) -> None:
        todo = deque(todo_list)
        failed_starts = 0
        while todo or any(w.job is not None for w in self.workers):
            busy = sum(w.job is not None for w in self.workers)
            while len(self.workers) < min(self.size, busy + len(todo)):
                self.workers.append(_Worker())
            for w in self.workers:
                if w.ready and w.job is None and todo:
                    i = todo.popleft()
                    try:
                        w.send({"id": i, "pred": pairs[i][0], "gold": pairs[i][1]})
                    except OSError:  # died while idle: put the item back, replace the worker
                        todo.appendleft(i)
                        self._retire(w)
                        self.restarts += 1
                        break
                    w.job, w.deadline = i, time.monotonic() + timeout
            now = time.monotonic()
            deadlines = [w.deadline if w.ready else w.started + self.startup_timeout for w in self.workers if w.job is not None or not w.ready]
            wait = max(0.0, min(deadlines) - now) if deadlines else 0.0
            readable, _, _ = select.select([w.fd for w in self.workers], [], [], wait)
            for w in [w for w in self.workers if w.fd in readable]:
                msgs = w.read_messages()
                if msgs is None:  # end of file: the worker died (crash, out of memory, killed from outside)
                    if w.job is not None:
                        out[w.job] = (None, f"math grader worker crashed (exit status {w.proc.wait()})")
                    elif not w.ready:
                        failed_starts += 1
                    self._retire(w)
                    self.restarts += 1
                    continue
                for msg in msgs:
                    if "fatal" in msg:
                        self.close_quietly()
                        raise ThinkfastError(f"math grading workers cannot start: {msg['fatal']}; is math-verify installed in this environment?")
                    if msg.get("ready"):
                        w.ready, failed_starts = True, 0
                    elif msg.get("id") == w.job:
                        out[w.job] = (msg["correct"], msg["error"])
                        if msg["correct"] is not None:
                            self._remember(pairs[w.job], msg["correct"])
                        w.job = None
            if failed_starts >= 3:
                self.close_quietly()
                raise ThinkfastError(f"math grading workers die on start-up (3 in a row); run `{sys.executable} -I {WORKER_SCRIPT} "
                                     f"{WORKER_MEMORY_MB} < /dev/null` to see why")
            now = time.monotonic()
            for w in list(self.workers):
                if w.job is not None and now > w.deadline:
                    out[w.job] = (None, f"math-verify timed out after {timeout:g}s")
                    self._retire(w)
                    self.restarts += 1
                elif not w.ready and now > w.started + self.startup_timeout:
                    self.close_quietly()
                    raise ThinkfastError(f"math grading worker did not start within {self.startup_timeout:g}s; the machine may be overloaded")

    def close_quietly(self) -> None:
        for w in self.workers:
            w.kill()
        self.workers = []

    def _remember(self, pair, verdict: bool) -> None:
        self.cache[pair] = verdict
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)


_default_pool: MathGraderPool | None = None
_default_lock = threading.Lock()


def default_pool() -> MathGraderPool:
    """The process-wide pool `grade_many` uses; started on first math item, closed at exit."""
    global _default_pool
    with _default_lock:
        if _default_pool is None:
            _default_pool = MathGraderPool()
            atexit.register(_default_pool.close)
        return _default_pool
