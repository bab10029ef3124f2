"""Data specs on the real benchmark files, field mapping, reasoning-gym, slicing and bad specs."""

import json
import re

import pytest

from conftest import SHARED_DATA
from thinkfast.data import load_problems, parse_spec
from thinkfast.data.sources import empty_spec_hint
from thinkfast.errors import DataError
from thinkfast.eval.grading import grade, parse_number

GSM8K_TEST = SHARED_DATA / "gsm8k_test.jsonl"
MATH500 = SHARED_DATA / "math500_test.jsonl"


def _need(path):
    if not path.is_file():
        pytest.skip(f"{path} not present")


def test_gsm8k_spec_on_the_real_file():
    _need(GSM8K_TEST)
    probs = load_problems(f"gsm8k:{GSM8K_TEST}")
    assert len(probs) == 1319
    assert len({p.id for p in probs}) == 1319 and probs[0].id == "gsm8k_test:0"
    assert all(p.kind == "gsm8k" and p.question and p.solution for p in probs)
    assert all("<<" not in p.solution for p in probs)  # calculator marks removed
    assert all(parse_number(p.answer) is not None and "," not in p.answer for p in probs)  # "2,125" -> "2125"
    assert probs[0].answer == "18"
    # every worked solution grades as correct against its own gold
    assert all(grade(p.solution, p.answer, p.kind) for p in probs)


def test_math_spec_on_the_real_file():
    _need(MATH500)
    probs = load_problems(f"math:{MATH500}")
    assert len(probs) == 500
    assert len({p.id for p in probs}) == 500 and probs[0].id.startswith("test/")
    assert all(p.kind == "math" and p.answer and "\\boxed" in p.solution for p in probs)
    assert {"subject", "level"} <= set(probs[0].meta)


def test_offset_and_limit_slice_in_order():
    _need(GSM8K_TEST)
    full = load_problems(f"gsm8k:{GSM8K_TEST}")
    part = load_problems(f"gsm8k:{GSM8K_TEST}?offset=10&limit=5")
    assert [p.id for p in part] == [p.id for p in full[10:15]]


def test_jsonl_field_mapping(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"uid": "a1", "q": "What is 2+2?", "a": 4, "work": "2+2=4"}, {"uid": "b2", "q": "1+1?", "a": "2", "work": "1+1=2"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")  # a blank line is fine
    probs = load_problems(f"jsonl:{path}?question=q&answer=a&solution=work&id=uid&kind=number")
    assert [(p.id, p.question, p.answer, p.kind, p.solution) for p in probs] == [
        ("a1", "What is 2+2?", "4", "number", "2+2=4"), ("b2", "1+1?", "2", "number", "1+1=2")]
    assert all(p.meta == {} for p in probs)  # every field was mapped


R1_ROWS = [  # the shape of reasoning-trace datasets: chains kept in a list of generations, or in chat turns
    {"problem": "What is 2+3?", "answer": "5", "generations": ["<think>2+3=5</think> \\boxed{5}", "other"],
     "messages": [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "2+3 = 5"}], "level": 1},
    {"problem": "What is 4+4?", "answer": "8", "generations": ["<think>4+4=8</think> \\boxed{8}"],
     "messages": [{"role": "user", "content": "What is 4+4?"}, {"role": "assistant", "content": "4+4 = 8"}], "level": 2},
]


def test_dotted_fields_read_into_lists_and_records(tmp_path):
    path = tmp_path / "r1.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in R1_ROWS))
    probs = load_problems(f"jsonl:{path}?question=problem&answer=answer&solution=generations.0")
    assert [p.solution for p in probs] == ["<think>2+3=5</think> \\boxed{5}", "<think>4+4=8</think> \\boxed{8}"]
    assert [p.meta for p in probs] == [{"level": 1}, {"level": 2}]
    probs = load_problems(f"jsonl:{path}?question=messages.0.content&answer=answer&solution=messages.-1.content")
    assert [(p.question, p.solution) for p in probs] == [("What is 2+3?", "2+3 = 5"), ("What is 4+4?", "4+4 = 8")]
    # a path that runs off a row is that row's error, naming it (generations.1 exists in the first row only)
    with pytest.raises(DataError, match=r"r1.jsonl:2: no field 'generations.1'") as e:
        load_problems(f"jsonl:{path}?question=problem&answer=answer&solution=generations.1")
    assert "\n" not in str(e.value)
    dotted = tmp_path / "dotted.jsonl"  # a field whose own name has a dot is read as that field
    dotted.write_text(json.dumps({"q.text": "1+1?", "a": "2"}) + "\n")
    (p,) = load_problems(f"jsonl:{dotted}?question=q.text&answer=a")
    assert (p.question, p.meta) == ("1+1?", {})
    with pytest.raises(DataError, match="no field 'solutoin'"):  # a named solution field is checked like the others
        load_problems(f"jsonl:{path}?question=problem&answer=answer&solution=solutoin")


class _FakeDataset(list):
    """What `hf:` reads of a `datasets.Dataset`: rows as dicts, and `column_names`."""

    @property
    def column_names(self):
        return list(self[0])


def test_hf_spec_maps_fields_and_names_missing_columns(monkeypatch):
    import sys
    import types

    import thinkfast.models.teacher as teacher

    calls = []
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda ds_id, config, split: calls.append((ds_id, config, split)) or _FakeDataset(R1_ROWS)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(teacher, "hub_reachable", lambda: True)
    probs = load_problems("hf:open-r1/OpenR1-Math-220k:default:train?solution=generations.0&limit=1")
    assert calls == [("open-r1/OpenR1-Math-220k", "default", "train")]
    assert [(p.id, p.question, p.answer, p.kind, p.solution) for p in probs] == [
        ("open-r1/OpenR1-Math-220k:train:0", "What is 2+3?", "5", "math", "<think>2+3=5</think> \\boxed{5}")]
    assert load_problems("hf:some/data:train")[1].solution is None  # no solution column, none named: no solution
    (second,) = load_problems("hf:some/data:train?offset=1&limit=5")  # sliced as a file is: ids keep their index
    assert (second.id, second.question) == ("some/data:train:1", "What is 4+4?")
    load_problems("hf:some/data:default:train[:1000]")  # datasets' own slice syntax reaches it whole
    assert calls[-1] == ("some/data", "default", "train[:1000]")
    for spec, column in [("hf:some/data:train?question=prompt", "prompt"), ("hf:some/data:train?solution=trace.0", "trace")]:
        with pytest.raises(DataError, match=f"the dataset has no column '{column}' \\(columns: problem, answer, "
                                            "generations, messages, level\\)") as e:
            load_problems(spec)
        assert "\n" not in str(e.value)


def test_hf_spec_offline_reads_the_cache_or_fails_at_once(monkeypatch, tmp_path):
    # offline, load_dataset retried a dead connection for ~30 s before failing on a dataset it did not have
    import sys
    import types

    import datasets.naming

    import thinkfast.models.teacher as teacher

    calls = []
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda ds_id, config, split: calls.append(ds_id) or _FakeDataset(R1_ROWS)
    fake.config = types.SimpleNamespace(HF_DATASETS_CACHE=str(tmp_path / "cache"))
    fake.naming = datasets.naming  # the real cache-folder naming
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setitem(sys.modules, "datasets.naming", datasets.naming)
    monkeypatch.setattr(teacher, "hub_reachable", lambda: False)
    with pytest.raises(DataError, match=r"the Hugging Face hub cannot be reached and open-r1/OpenR1-Math-220k is not in the "
                                        r"local datasets cache"):
        load_problems("hf:open-r1/OpenR1-Math-220k:default:train")
    assert calls == []
    (tmp_path / "cache" / "open-r1___open_r1-math-220k").mkdir(parents=True)  # as datasets names its cache folder
    assert len(load_problems("hf:open-r1/OpenR1-Math-220k:default:train")) == 2 and calls == ["open-r1/OpenR1-Math-220k"]


def test_jsonl_keeps_its_other_plain_fields_for_reports(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "2", "level": 3, "topic": "sums", "steps": [1, 2]}) + "\n")
    (p,) = load_problems(f"jsonl:{path}")
    assert p.meta == {"level": 3, "topic": "sums"}  # a list is no group label


def test_reasoning_gym_spec_is_deterministic():
    a = load_problems("rg:chain_sum?size=6&seed=3")
    b = load_problems("rg:chain_sum?size=6&seed=3")
    assert [p.question for p in a] == [p.question for p in b] and len(a) == 6
    assert a[0].id == "chain_sum:3:0" and all(parse_number(p.answer) is not None for p in a)
    assert [p.question for p in load_problems("rg:chain_sum?size=6&seed=4")] != [p.question for p in a]


@pytest.mark.parametrize("spec,match", [
    ("gsm8k_test.jsonl", "SCHEME:TARGET"),
    ("csv:/tmp/x.csv", "unknown scheme"),
    ("gsm8k:/nonexistent/file.jsonl", "does not exist"),
    ("gsm8k:", "nothing after"),
    ("rg:chain_sum?size=many", "size="),
    ("rg:no_such_generator_xyz", "reasoning-gym"),
])
def test_bad_specs_are_one_line_errors(spec, match):
    with pytest.raises(DataError, match=match) as e:
        load_problems(spec)
    assert "\n" not in str(e.value)


def test_bad_rows_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "x", "answer": "1"}\n{"question": "y"\n')
    with pytest.raises(DataError, match=f"{path}:2"):
        load_problems(f"jsonl:{path}")
    path.write_text('{"question": "x", "answer": "1"}\n{"prompt": "y", "answer": "2"}\n')
    with pytest.raises(DataError, match="no field 'question'"):
        load_problems(f"jsonl:{path}")
    with pytest.raises(DataError, match="kind="):
        load_problems(f"jsonl:{path}?kind=algebra")
    # a question that is a whole chat (a list) or an id that is null: refused, not written as a Python repr / 'None'
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "1+1?"}], "answer": "2", "id": None}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'messages' is a list, not text.*messages.0.content"):
        load_problems(f"jsonl:{path}?question=messages")
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'id' is null, not text"):
        load_problems(f"jsonl:{path}?question=messages.0.content&id=id")
    (p,) = load_problems(f"jsonl:{path}?question=messages.0.content")
    assert (p.id, p.question) == ("bad:0", "1+1?")
    path.write_text(json.dumps({"question": " ", "answer": "2"}) + "\n")
    with pytest.raises(DataError, match=r"field 'question' is empty, not text"):
        load_problems(f"jsonl:{path}")
    # a GSM8K file read as MATH: the hint names the scheme that reads it, not keys math: does not take
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "1+1?", "answer": "so\n#### 2"}) + "\n")
    with pytest.raises(DataError, match=r"no field 'problem'.*is this a math file\? Read others as jsonl:"):
        load_problems(f"math:{gsm}")
    with pytest.raises(DataError, match=r"limit= is given twice"):
        load_problems(f"gsm8k:{gsm}?limit=2&limit=3")
    assert empty_spec_hint(f"gsm8k:{gsm}?offset=5") == "check offset=" and empty_spec_hint(f"gsm8k:{gsm}") == "is its file empty?"
    # options after '&' instead of '?': the missing file's line says where they go
    with pytest.raises(DataError, match=r"does not exist; options follow a '\?' \(bad.jsonl\?limit=1\)"):
        load_problems(f"jsonl:{path}&limit=1")


def test_rows_of_every_scheme_are_text_objects_in_utf8(tmp_path):
    """Non-UTF-8 files and lines that are JSON but no object were tracebacks; gsm8k: and math: files took null or
    list fields as the text `None` / `['1', '2']` into prompts and gold answers."""
    path = tmp_path / "f.jsonl"
    path.write_bytes(b'{"question": "ok", "answer": "#### 1", "problem": "ok"}\n{"question": "caf\xe9", "answer": "#### 1"}\n')
    for scheme in ("jsonl", "gsm8k", "math"):
        with pytest.raises(DataError, match=r"f.jsonl:2: not UTF-8 text \(byte 0xe9 at column 18\); re-save"):
            load_problems(f"{scheme}:{path}")
    for line, what in [('"str"', "string"), ("[1, 2]", "list"), ("7", "number"), ("null", "null")]:
        path.write_text(line + "\n")
        for scheme in ("jsonl", "gsm8k", "math"):
            with pytest.raises(DataError, match=rf"f.jsonl:1: a JSON {what}, not an object"):
                load_problems(f"{scheme}:{path}")
    for scheme, row, says in [
            ("math", {"problem": "p", "answer": None}, "field 'answer' is null"),
            ("math", {"problem": ["a", "b"], "answer": "1"}, "field 'problem' is a list"),
            ("math", {"problem": "p", "answer": ["1", "2"]}, "field 'answer' is a list"),
            ("math", {"problem": "", "answer": "1"}, "field 'problem' is empty"),
            ("math", {"problem": "p", "answer": "1", "solution": ["a"]}, "field 'solution' is a list"),
            ("math", {"problem": "p", "answer": "1", "unique_id": ["a"]}, "field 'unique_id' is a list"),
            ("gsm8k", {"question": None, "answer": "#### 1"}, "field 'question' is null"),
            ("gsm8k", {"question": "q", "answer": 5}, "GSM8K answer has no '#### <number>' line")]:
        path.write_text(json.dumps(row) + "\n")
        with pytest.raises(DataError, match=re.escape(says)):
            load_problems(f"{scheme}:{path}")
    path.write_text(json.dumps({"problem": "p", "answer": 3, "solution": None}) + "\n")
    (p,) = load_problems(f"math:{path}")
    assert (p.question, p.answer, p.solution) == ("p", "3", None)


def test_parse_spec_keeps_plus_signs():
    assert parse_spec("rg:basic_arithmetic?operators=+,-&size=3").params["operators"] == "+,-"


@pytest.mark.parametrize("spec,says", [
    ("rg:chain_sum?size=abc", "size='abc' is not an integer"),
    ("rg:chain_sum?size=2.5", "size='2.5' is not an integer"),
    ("rg:chain_sum?size=0", "size=0 must be at least 1"),
    ("rg:chain_sum?seed=x", "seed='x' is not an integer"),  # was a traceback from inside the generator
    ("rg:chain_sum?min_terms=two", "min_terms='two' is not an integer"),  # a generator's own option, by its type
    ("rg:chain_sum?allow_negation=maybe", "allow_negation='maybe' is not true or false"),
    ("rg:chain_sum?limit=x", "limit='x' is not an integer"),
    ("rg:chain_sum?limit=-1", "limit=-1 must be at least 1"),  # was: silently all but the last problem
    ("rg:chain_sum?offset=-2", "offset=-2 must be at least 0"),
])
def test_bad_numeric_spec_options_name_the_option_value_and_spec(spec, says):
    from thinkfast.data.sources import check_spec

    for check in (load_problems, check_spec):  # check_spec: the same line, without generating anything
        with pytest.raises(DataError) as e:
            check(spec)
        assert str(e.value) == f"data spec {spec!r}: {says}"


def test_limit_minus_one_on_a_file_is_refused_not_a_short_slice():
    _need(GSM8K_TEST)
    with pytest.raises(DataError, match="limit=-1 must be at least 1"):
        load_problems(f"gsm8k:{GSM8K_TEST}?limit=-1")
    assert len(load_problems("rg:chain_sum?size=3&allow_negation=true&min_terms=2")) == 3  # good options still pass


def test_ids_count_rows_and_messages_name_lines_past_blank_lines(tmp_path):
    data = tmp_path / "blank.jsonl"
    data.write_text('{"q": "a", "a": "1"}\n\n{"q": "b", "a": "2"}\n{"a": "3"}\n')
    with pytest.raises(DataError, match=r"blank\.jsonl:4: no field 'q'"):  # the fourth line, the third row
        load_problems(f"jsonl:{data}?question=q&answer=a")
    data.write_text('{"q": "a", "a": "1"}\n\n{"q": "b", "a": "2"}\n')
    assert [p.id for p in load_problems(f"jsonl:{data}?question=q&answer=a")] == ["blank:0", "blank:1"]  # as before
