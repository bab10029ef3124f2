"""Tokenisation and packing for distillation: prompt masks, whole examples per row, weighted mixing, resumable order."""

import json

import pytest
import torch

from thinkfast.data.packing import IGNORE, DataConfig, DataMix, build_data, encode_problems, pack_examples
from thinkfast.data.prompts import PromptStyle
from thinkfast.data.sources import Problem
from thinkfast.distill.toy import chain_sum_problems, char_tokenizer
from thinkfast.errors import DataError





@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def test_prompt_tokens_are_masked_and_completion_is_the_solution(tok):
    probs = chain_sum_problems(3, seed=1)
    exs = encode_problems(probs, tok, PromptStyle(instruction="none", chat=False))
    rows = pack_examples(exs, 256, pad_id=0, pack=False)
    for r, ex in enumerate(exs):
        # which example sits in row r: match by content
        ids = rows.input_ids[r][rows.real[r]].tolist()
        ex = next(e for e in exs if e.ids == ids)
        tg = rows.targets[r]
        trained = tg[tg != IGNORE].tolist()
        assert tok.decode(trained) == tok.decode(ex.ids[ex.n_prompt:])
        # the first trained position is the last prompt token, predicting the first completion token
        first = int((tg != IGNORE).nonzero()[0])
        assert first == ex.n_prompt - 1
        assert int(tg[first]) == ex.ids[ex.n_prompt]
    text = tok.decode(exs[0].ids[exs[0].n_prompt:])
    assert text.endswith("<eos>") and "####" in text


def test_chat_template_is_used_when_present(tok):
    chat = char_tokenizer()
    chat.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    p = chain_sum_problems(1, seed=2)[0]
    ex = encode_problems([p], chat, PromptStyle(instruction="none"))[0]
    prompt = chat.decode(ex.ids[:ex.n_prompt])
    assert prompt.startswith("<user>") and prompt.endswith("<assistant>")
    assert chat.decode(ex.ids[ex.n_prompt:]).startswith(p.solution[:5])


def test_packing_keeps_examples_whole_and_masks_boundaries(tok):
    exs = encode_problems(chain_sum_problems(40, seed=3), tok, PromptStyle(instruction="none", chat=False))
    rows = pack_examples(exs, 200, pad_id=0, pack=True)
    assert len(rows) < len(exs)  # several examples share a row
    n_real = int(rows.real.sum())
    assert n_real == sum(len(e.ids) for e in exs)  # nothing lost, nothing split
    assert rows.n_truncated == 0
    # right padding only: real tokens form a prefix of every row
    for r in range(len(rows)):
        k = int(rows.real[r].sum())
        assert rows.real[r, :k].all() and not rows.real[r, k:].any()
    # a position whose next token starts another example (BOS) is never trained
    bos = tok.bos_token_id
    for r in range(len(rows)):
        ids, tg = rows.input_ids[r], rows.targets[r]
        starts = (ids == bos).nonzero().flatten().tolist()
        for s in starts[1:]:
            assert int(tg[s - 1]) == IGNORE
    # and every trained target is the actual next token
    tg = rows.targets[:, :-1]
    ok = tg != IGNORE
    assert torch.equal(tg[ok], rows.input_ids[:, 1:][ok])


def test_text_source_trains_every_token(tmp_path, tok):
    path = tmp_path / "doc.txt"
    path.write_text("first document here\n\nsecond one\n")
    mix = build_data(DataConfig(specs=[f"text:{path}"], pack=False), tok, 64)
    b = mix.next_batch(2)
    assert int((b["targets"] != IGNORE).sum()) == int(b["real"].sum()) - 2  # all but each row's last token


def test_mixing_follows_weights_and_resumes_exactly(tok):
    a = pack_examples(encode_problems(chain_sum_problems(30, seed=4), tok), 64, name="a")
    b = pack_examples(encode_problems(chain_sum_problems(30, seed=5, digits=3), tok), 64, name="b")
    mix = DataMix([a, b], [0.75, 0.25], seed=7)
    for _ in range(40):
        mix.next_batch(8)
    share_a = mix.state["cursor"][0] / mix.state["rows"]
    assert 0.68 < share_a < 0.82
    saved = json.loads(json.dumps(mix.state_dict()))
    expect = [mix.next_batch(8) for _ in range(3)]
    again = DataMix([a, b], [0.75, 0.25], seed=7)
    again.load_state_dict(saved)
    for e in expect:
        got = again.next_batch(8)
        assert all(torch.equal(got[k], e[k]) for k in e)


def test_bad_data_inputs_raise_one_line_errors(tmp_path, tok):
    with pytest.raises(DataError, match="one weight per spec"):
        build_data(DataConfig(specs=[[Problem("1", "q", "1", solution="s")]], weights=[0.5, 0.5]), tok, 32)
    with pytest.raises(DataError, match="does not exist"):
        build_data(DataConfig(specs=[f"gsm8k:{tmp_path}/missing.jsonl"]), tok, 32)
    with pytest.raises(DataError, match="tokenizer"):
        build_data(DataConfig(specs=[[Problem("1", "q", "1", solution="s")]]), None, 32)


def test_one_example_rows_start_at_a_prompt_and_count_their_real_tokens(tok):
    exs = encode_problems(chain_sum_problems(40, seed=6), tok, PromptStyle(instruction="none", chat=False))
    longest = max(len(e.ids) for e in exs)
    rows = pack_examples(exs, longest, pad_id=0, pack=False)
    assert len(rows) == len(exs) and rows.n_truncated == 0
    assert (rows.input_ids[:, 0] == tok.bos_token_id).all()  # every row begins an example, as sampling does
    mean_len = sum(len(e.ids) for e in exs) / len(exs)
    assert rows.row_tokens == pytest.approx(mean_len) and rows.row_tokens < longest
    packed = pack_examples(exs, longest, pad_id=0, pack=True)
    assert packed.row_tokens == longest  # packed rows count their full length, as before
    mix = DataMix([rows, packed], [0.5, 0.5])
    assert mix.row_tokens == pytest.approx((mean_len + longest) / 2)


def test_a_short_row_cuts_examples_and_counts_them(tok):
    exs = encode_problems(chain_sum_problems(10, seed=7, digits=3), tok, PromptStyle(instruction="none", chat=False))
    short = min(len(e.ids) for e in exs) + 1
    rows = pack_examples(exs, short, pad_id=0, pack=False)
    assert rows.n_truncated == sum(len(e.ids) > short for e in exs) > 0


def test_cut_examples_are_reported(tok, caplog):
    problems = chain_sum_problems(10, seed=8, digits=3)
    with caplog.at_level("WARNING"):
        build_data(DataConfig(specs=[problems], instruction="none", chat=False, pack=False), tok, 24)
    assert "are cut" in caplog.text and "raise --seq-len" in caplog.text


def test_length_grouped_batches_pad_less_and_still_draw_every_example_once(tok):
    # chain sums of 2-8 terms: one-example rows of many lengths
    exs = [e for seed in range(6) for e in encode_problems(
        chain_sum_problems(100, seed=seed, min_terms=2, max_terms=8), tok, PromptStyle(instruction="none", chat=False))]
    rows = pack_examples(exs, max(len(e.ids) for e in exs), pad_id=0, pack=False)
    n, B = len(rows), 8
    assert n % B == 0

    def epoch(mix):
        batches = [mix.next_batch(B) for _ in range(n // B)]
        padded = sum(b["input_ids"].numel() for b in batches)
        real = sum(int(b["real"].sum()) for b in batches)
        return batches, real / padded

    plain_batches, plain_fill = epoch(DataMix([rows], seed=3))
    grouped = DataMix([rows], seed=3, group=B)
    grouped_batches, grouped_fill = epoch(grouped)
    assert grouped_fill > 0.9 and grouped_fill > plain_fill + 0.15, (plain_fill, grouped_fill)
    # the same rows, each once per epoch: grouping reorders, it does not resample
    def drawn(batches):
        return sorted(tuple(r[m].tolist()) for b in batches for r, m in zip(b["input_ids"], b["real"]))
    assert drawn(grouped_batches) == drawn(plain_batches)
    # batches are not served short to long: lengths within the first window come in shuffled order
    widths = [b["input_ids"].shape[1] for b in grouped_batches[:64]]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)
    # resumable, and a saved position is refused by a mix that groups otherwise
    saved = json.loads(json.dumps(grouped.state_dict()))
    expect = [grouped.next_batch(B) for _ in range(2)]
    again = DataMix([rows], seed=3, group=B)
    again.load_state_dict(saved)
    for e in expect:
        got = again.next_batch(B)
        assert all(torch.equal(got[k], e[k]) for k in e)
    from thinkfast.errors import CheckpointError

    with pytest.raises(CheckpointError, match="other data"):
        DataMix([rows], seed=3).load_state_dict(saved)
    # when an epoch is no whole number of batches, later epochs' batches still line up with the groups
    odd = pack_examples(exs[:-3], rows.seq_len, pad_id=0, pack=False)
    mix = DataMix([odd], seed=3, group=B)
    batches = [mix.next_batch(B) for _ in range(3 * len(odd) // B)]
    third = batches[2 * len(odd) // B + 1:]
    fill = sum(int(b["real"].sum()) for b in third) / sum(b["input_ids"].numel() for b in third)
    assert fill > 0.9, fill


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("train_prompt", [False, True])
def test_rows_hold_each_example_where_a_token_by_token_fill_puts_it(pack, train_prompt):
    from thinkfast.data.packing import Example

    g = torch.Generator().manual_seed(3)
    exs = []
    for _ in range(60):  # lengths 1..40 in rows of 32: some examples are cut, some prompts fill the row
        n = int(torch.randint(1, 41, (1,), generator=g))
        exs.append(Example(torch.randint(1, 500, (n,), generator=g).tolist(), int(torch.randint(0, n + 2, (1,), generator=g))))
    rows = pack_examples(exs, 32, pad_id=7, pack=pack, train_prompt=train_prompt, seed=5)
    # the reference: walk the rows' examples in their packed order, one token at a time
    order = torch.randperm(len(exs), generator=torch.Generator().manual_seed(5)).tolist()
    ids = torch.full_like(rows.input_ids, 7)
    targets = torch.full_like(rows.targets, IGNORE)
    real = torch.zeros_like(rows.real)
    r, pos = -1, 32
    for i in order:
        tokens = exs[i].ids[:32]
        if r < 0 or not pack or pos + len(tokens) > 32:
            r, pos = r + 1, 0
        first = 1 if train_prompt else max(1, exs[i].n_prompt)
        for j, t in enumerate(tokens):
            ids[r, pos + j], real[r, pos + j] = t, True
            if j >= first:
                targets[r, pos + j - 1] = t
        pos += len(tokens)
    assert rows.input_ids.shape[0] == r + 1
    assert torch.equal(rows.input_ids, ids) and torch.equal(rows.targets, targets) and torch.equal(rows.real, real)
    assert rows.n_truncated == sum(len(e.ids) > 32 for e in exs)


def test_runs_sharing_an_examples_cache_read_the_data_once_and_train_alike(tmp_path, tok, monkeypatch):
    from conftest import tiny_thinkfast_teacher

    from thinkfast.data import packing
    from thinkfast.distill.stages import StageConfig, distill
    from thinkfast.distill.trainer import TrainConfig

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": p.question, "answer": p.answer, "solution": p.solution}) + "\n"
                            for p in chain_sum_problems(30, seed=2)))
    cfg = DataConfig(specs=[f"jsonl:{data}?solution=solution"], instruction="none", chat=False)
    reads = []
    load = packing.load_examples
    monkeypatch.setattr(packing, "load_examples", lambda *a, **k: reads.append(a[0]) or load(*a, **k))
    stages = [StageConfig("hidden", TrainConfig(tokens=4 * 64, batch_size=2, seq_len=64, log_every=1)),
              StageConfig("sft", TrainConfig(tokens=4 * 96, batch_size=2, seq_len=96, log_every=1))]
    cache: dict = {}
    runs = [distill(tiny_thinkfast_teacher(tok), "llamba", cfg, stages, tokenizer=tok, progress=False, examples_cache=c)
            for c in (cache, cache, None)]
    assert len(reads) == 2  # once for the shared cache, once for the run without one
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0].state_dict().values(), run.state_dict().values()))
    assert any(key[-1] == id(tok) for key in cache)  # keyed by the tokenizer object too
