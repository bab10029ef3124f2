"""The engine: greedy == full-forward argmax, continuous batching, forks, HF equality, sampling, time accounting,
stop conditions, bad input."""

import re

import pytest
import torch
from conftest import tiny_llama

from thinkfast.engine import Engine, SamplingParams, sample_seed, sample_tokens
from thinkfast.engine import engine as engine_mod
from thinkfast.engine.sampling import filtered_probs
from thinkfast.errors import ThinkfastError, command_line
from thinkfast.models import from_teacher

KINDS = [("teacher", None), ("llamba", "discrete"), ("hybrid", "mamba2")]




def _lm(kind, ssm_param=None):
    return from_teacher(tiny_llama(), kind=kind, ssm_param=ssm_param).lm


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(f"p{i}", torch.randint(3, 101, (n,), generator=g).tolist()) for i, n in enumerate(lengths)]


@torch.no_grad()
def _greedy_reference(lm, ids, steps):
    """Step-by-step argmax of the full forward (no cache). Also the smallest top-2 logit gap met on the way."""
    seq, gap = list(ids), float("inf")
    for _ in range(steps):
        logits = lm(torch.tensor([seq])).logits[0, -1]
        top = logits.topk(2).values
        gap = min(gap, float(top[0] - top[1]))
        seq.append(int(logits.argmax()))
    return seq[len(ids):], gap


def _assert_greedy_matches(lm, completions, prompts, steps):
    refs = {pid: _greedy_reference(lm, ids, steps) for pid, ids in prompts}
    for c in completions:
        ref, gap = refs[c.problem_id]
        if c.tokens != ref:  # only a near-tie in the reference may flip under float reassociation
            first = next(i for i, (a, b) in enumerate(zip(c.tokens, ref)) if a != b)
            assert gap < 1e-4, f"{c.problem_id}/{c.sample_idx} diverges at token {first}"


@pytest.mark.parametrize("kind,ssm_param", KINDS)
def test_greedy_engine_equals_full_forward_argmax(kind, ssm_param):
    lm = _lm(kind, ssm_param)
    prompts = _prompts([13, 13, 4, 7, 21, 9, 13])
    # 5 slots for 14 samples of mixed prompt lengths: refills, packing, rows at different positions, and
    # neighbouring prompts (4 and 7 tokens, 9 and 13) prefilled in one left-padded batch
    eng = Engine(lm, batch_size=5)
    out = list(eng.generate(prompts, n=2, params=SamplingParams(temperature=0, max_new_tokens=16)))
    assert sorted((c.problem_id, c.sample_idx) for c in out) == sorted((p, j) for p, _ in prompts for j in range(2))
    assert all(c.gen_tokens == 16 and c.finish_reason == "length" for c in out)
    assert eng.stats.prompts == 7 and eng.stats.prefill_batches < 7  # the first two prompts shared a prefill
    _assert_greedy_matches(lm, out, prompts, 16)


@pytest.mark.parametrize("row_group", [None, 2])
def test_continuous_batching_gives_each_sequence_its_tokens_alone(row_group):
    lm = _lm("hybrid", "mamba2")
    prompts = _prompts([3, 25, 8, 14, 5, 11])
    stop = {17, 42}  # an EOS set that ends some samples early and at different times: slots refill mid-flight
    params = SamplingParams(temperature=0.9, top_k=20, max_new_tokens=20)
    # row_group 2: rows attend in blocks and move (finished rows sink to the end) as samples end
    engine = Engine(lm, batch_size=4, stop_ids=stop, row_group=row_group)
    batched = {(c.problem_id, c.sample_idx): c.tokens for c in engine.generate(prompts, 3, params, seed=5)}
    alone = {}
    for pid, ids in prompts:
        for c in Engine(lm, batch_size=1, stop_ids=stop).generate([(pid, ids)], 3, params, seed=5):
            alone[(c.problem_id, c.sample_idx)] = c.tokens
    assert batched == alone
    assert len({len(t) for t in batched.values()}) > 1, "the test needs samples of different lengths"


def test_rows_stay_ordered_by_context_block_by_block(monkeypatch):
    """With row blocks, after every step the live rows are the leading ones and every row of a block is at least
    as long as any row of the next block, though samples end at random lengths and refills enter."""
    lm = _lm("teacher")
    prompts = _prompts([9] * 12)  # one prompt length: a refill is the shortest row
    checked = []
    advance = engine_mod._Run.advance

    def checked_advance(run):
        done = advance(run)
        ctx = [len(s.req.prompt) + len(s.tokens) if s is not None else None for s in run.slots[:run.rows]]
        live = [c for c in ctx if c is not None]
        assert ctx[:len(live)] == live, f"a hole among the live rows: {ctx}"
        blocks = [live[a:a + 3] for a in range(0, len(live), 3)]
        assert all(min(a) >= max(b) for a, b in zip(blocks, blocks[1:])), f"rows out of order: {blocks}"
        checked.append(len(live))
        return done

    monkeypatch.setattr(engine_mod._Run, "advance", checked_advance)
    params = SamplingParams(temperature=1.0, max_new_tokens=24)
    out = list(Engine(lm, batch_size=9, stop_ids={5, 17, 42, 60}, row_group=3).generate(prompts, 3, params, seed=2))
    assert len(out) == 36 and len({c.gen_tokens for c in out}) > 5, "the test needs samples ending at many lengths"
    assert max(checked) == 9 and min(checked) < 9  # full rows while refilling, fewer at the end


def test_forked_samples_equal_separately_prefilled_ones():
    lm = _lm("llamba", "discrete")
    (pid, ids), = _prompts([12])
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    forked = {c.sample_idx: c.tokens for c in Engine(lm, batch_size=4).generate([(pid, ids)], 4, params, seed=1)}
    for j in range(4):  # each sample from its own prefill, alone in the engine
        (c,) = Engine(lm, batch_size=1).generate([(pid, ids)], 4, params, seed=1, only={pid: [j]})
        assert c.tokens == forked[j]
    assert len({tuple(t) for t in forked.values()}) > 1, "different seeds must give different samples"


@torch.no_grad()
def test_fork_copies_the_prefilled_state_exactly():
    lm = _lm("hybrid", "mamba2")
    ids = torch.randint(0, 101, (1, 10))
    one = lm.allocate_state(1, 10)
    lm(ids, state=one)
    state = lm.allocate_state(3, 32)
    state.copy_rows_(torch.tensor([0, 2]), one, torch.tensor([0, 0]), 10)
    separate = lm.allocate_state(1, 32)
    lm(ids, state=separate)
    for mine, ref in zip(state.caches, separate.caches):
        for t, r in zip(vars(mine).values(), vars(ref).values()):
            if t.dim() == 4 and t.shape[2] == 32:  # KV cache: the prompt's positions
                t, r = t[:, :, :10], r[:, :, :10]
            assert torch.equal(t[0], r[0]) and torch.equal(t[2], r[0])


def _mamba1_hybrid():
    from thinkfast.models.config import ModelConfig
    from thinkfast.models.model import ThinkfastLM

    torch.manual_seed(0)
    lm = ThinkfastLM(ModelConfig(vocab_size=101, d_model=64, n_layers=3, n_heads=8, n_kv_heads=2, attn_layers=[1],
                                 ssm_param="mamba1", ssm_heads=16, ssm_head_dim=4, d_state=4, d_mlp=128))
    lm.init_weights()
    return lm.eval()


@pytest.mark.parametrize("kind", ["teacher", "llamba", "hybrid", "mamba1"])
@torch.no_grad()
def test_a_left_padded_prefill_row_equals_the_prompt_prefilled_alone(kind):
    """Prompts of different lengths share a prefill: each row's logits, Mamba states and (past its pads) KV
    entries are the prompt's own, so the forks decode as if it had been prefilled alone."""
    lm = _mamba1_hybrid() if kind == "mamba1" else _lm(kind, dict(KINDS).get(kind))
    eng = Engine(lm, batch_size=2, max_len=64)
    prompts = [ids for _, ids in _prompts([11, 3, 8], seed=4)]
    state, logits = eng._prefill(prompts)
    for g, ids in enumerate(prompts):
        alone, ref = eng._prefill([ids])
        torch.testing.assert_close(logits[g], ref[0], rtol=0, atol=2e-5)
        mine = lm.allocate_state(1, len(ids))
        mine.copy_rows_(torch.tensor([0]), state, torch.tensor([g]), len(ids), offset=11 - len(ids))
        for a, b in zip(mine.caches, alone.caches):
            for t, r in zip(vars(a).values(), vars(b).values()):
                torch.testing.assert_close(t, r, rtol=0, atol=2e-5)


@pytest.mark.parametrize("kind,ssm_param", [("teacher", None), ("hybrid", "mamba2")])
def test_one_sample_prompts_are_prefilled_many_at_a_time_and_sample_as_alone(kind, ssm_param, monkeypatch):
    """n = 1 over many prompts (an evaluation run): prompts queue shortest first and are prefilled in left-padded
    batches ahead of the free rows (not one per finished sample), and every sample equals its own run alone."""
    lm = _lm(kind, ssm_param)
    prompts = _prompts([17, 5, 9, 16, 6, 12, 18, 8, 15, 5, 10, 19], seed=7)
    batches = []
    prefill = Engine._prefill

    def recorded(self, group):
        batches.append(sorted(len(p) for p in group))
        return prefill(self, group)

    monkeypatch.setattr(Engine, "_prefill", recorded)
    params = SamplingParams(temperature=1.0, top_k=30, max_new_tokens=14)
    engine = Engine(lm, batch_size=3, stop_ids={7, 19, 33})
    together = {c.problem_id: c.tokens for c in engine.generate(prompts, 1, params, seed=3)}
    assert engine.stats.prompts == 12 and engine.stats.prefill_batches == len(batches) < 12
    assert [b[0] for b in batches] == sorted(b[0] for b in batches), "prompts run shortest first"
    assert any(len(set(b)) > 1 for b in batches), "the test needs a batch of prompts of different lengths"
    assert all(sum(b) >= 0.75 * len(b) * b[-1] for b in batches), "pads stay under a quarter of a batch"
    batches.clear()
    alone = {}
    for pid, ids in prompts:
        (c,) = Engine(lm, batch_size=1, stop_ids={7, 19, 33}).generate([(pid, ids)], 1, params, seed=3)
        alone[pid] = c.tokens
    assert together == alone
    assert len({len(t) for t in together.values()}) > 1, "the test needs samples ending at different lengths"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind,ssm_param", KINDS)
def test_left_padded_prefills_under_cuda_graphs_decode_as_each_prompt_alone(kind, ssm_param):
    lm = _lm(kind, ssm_param).cuda()
    prompts = _prompts([17, 5, 9, 16, 6, 12, 18, 8, 15, 5, 10, 19], seed=7)
    params = SamplingParams(temperature=0, max_new_tokens=14)
    engine = Engine(lm, batch_size=4, device="cuda", stop_ids=[])
    assert engine.use_graphs
    out = list(engine.generate(prompts, 1, params))
    assert engine.stats.prefill_batches < len(prompts)
    _assert_greedy_matches(lm.cpu(), out, prompts, 14)


def test_teacher_kv_path_reproduces_hf_greedy_generate():
    hf = tiny_llama()
    prompts = _prompts([6, 15, 9], seed=3)
    eng = Engine(hf, batch_size=2, stop_ids=[])  # an HF Llama runs as an all-attention thinkfast model
    out = {c.problem_id: c.tokens for c in eng.generate(prompts, 1, SamplingParams(temperature=0, max_new_tokens=24))}
    for pid, ids in prompts:
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out[pid] == ref[0, len(ids):].tolist()


def test_sample_tokens_follows_the_filtered_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]]))
    n = 20000
    u = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for params, expect in [
        (SamplingParams(), [0.5, 0.25, 0.15, 0.07, 0.03]),
        (SamplingParams(top_k=2), [2 / 3, 1 / 3, 0, 0, 0]),
        (SamplingParams(top_p=0.8), [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0, 0]),  # mass before token 3 is 0.9 >= 0.8
        (SamplingParams(min_p=0.2), [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0, 0]),
    ]:
        toks = sample_tokens(logits.expand(n, -1), u, params)
        freq = torch.bincount(toks, minlength=5).double() / n
        torch.testing.assert_close(freq, torch.tensor(expect, dtype=torch.float64), rtol=0, atol=0.015)
    p = filtered_probs(logits, SamplingParams(temperature=0.5))
    assert p[0, 0] / p[0, 1] == pytest.approx(4.0, rel=1e-4)  # temperature 0.5 squares the odds
    assert sample_tokens(logits, torch.tensor([0.9999999999]), SamplingParams(top_k=1)).item() == 0
    assert sample_tokens(logits, torch.tensor([0.3]), SamplingParams(temperature=0)).item() == 0


def test_sample_seeds_are_stable_and_distinct():
    assert sample_seed(0, "gsm8k_test:3", 1) == sample_seed(0, "gsm8k_test:3", 1)
    seeds = {sample_seed(s, p, j) for s in (0, 1) for p in ("a", "b") for j in range(4)}
    assert len(seeds) == 16 and all(0 <= x < 2**48 for x in seeds)


def test_seconds_add_up_to_the_engine_wall_time():
    lm = _lm("hybrid", "mamba2")
    eng = Engine(lm, batch_size=3, stop_ids={5, 9})
    out = list(eng.generate(_prompts([4, 12, 7]), 3, SamplingParams(temperature=1.0, max_new_tokens=10), seed=2))
    assert all(c.seconds > 0 for c in out)
    assert sum(c.seconds for c in out) == pytest.approx(eng.stats.wall_seconds, rel=1e-9)
    assert eng.stats.gen_tokens == sum(c.gen_tokens for c in out)
    assert eng.stats.samples == 9 and eng.stats.prompts == 3


class _TinyTok:
    """The smallest tokenizer the engine needs: id i < 256 is the letter "abcd"[i % 4], 256 is EOS."""

    eos_token_id = 256
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join("abcd"[i % 4] for i in ids if i < 256)


def test_one_stop_string_is_one_string_not_its_characters():
    assert SamplingParams(stop="\n\n").stop == ["\n\n"] and SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(max_new_tokens=12.0).max_new_tokens == 12  # whole floats (from JSON) are whole numbers
    assert type(SamplingParams(temperature=1).temperature) is float


def test_stop_strings_eos_and_length():
    lm = from_teacher(tiny_llama(vocab=257), kind="teacher").lm
    eng = Engine(lm, _TinyTok(), batch_size=3)
    params = SamplingParams(temperature=5.0, max_new_tokens=30, stop=["abc"])  # hot: close to uniform
    out = list(eng.generate([("p", [1, 2, 3, 4, 5])], 12, params, seed=0))
    reasons = [c.finish_reason for c in out]
    for c in out:
        full = _TinyTok().decode(c.tokens)
        if c.finish_reason == "stop":
            assert full.endswith("abc") and "abc" not in full[:-1] and c.text == full[:-3]
        elif c.finish_reason == "eos":
            assert c.tokens[-1] == 256 and 256 not in c.tokens[:-1] and "abc" not in full
        else:
            assert c.finish_reason == "length" and c.gen_tokens == 30 and "abc" not in full
    assert "stop" in reasons and "length" in reasons


def test_bad_input_is_one_clear_error(monkeypatch):
    lm = _lm("llamba", "discrete")
    eng = Engine(lm, batch_size=2)
    params = SamplingParams(temperature=0, max_new_tokens=4)
    with pytest.raises(ThinkfastError, match="at least 1 sample"):
        list(eng.generate(_prompts([3]), 0, params))
    with pytest.raises(ThinkfastError, match="empty prompt"):
        list(eng.generate([("e", [])], 1, params))
    with pytest.raises(ThinkfastError, match="limit is 512 positions"):
        list(eng.generate([("long", [1] * 600)], 1, params))
    with pytest.raises(ThinkfastError, match="outside the model's vocabulary"):
        list(eng.generate([("v", [1, 5000])], 1, params))
    with pytest.raises(ThinkfastError, match="occurs twice"):
        list(eng.generate([("a", [1, 2]), ("a", [3])], 1, params))
    with pytest.raises(ThinkfastError, match="need a tokenizer"):
        list(eng.generate([("a", [1, 2])], 1, SamplingParams(stop=["\n\n"])))
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(min_p=1.0), dict(max_new_tokens=0), dict(stop=[""]),
                dict(max_new_tokens=10.5), dict(top_k=2.5), dict(temperature="1.0"), dict(stop=[1]), dict(max_new_tokens=float("inf"))):
        with pytest.raises(ThinkfastError):
            SamplingParams(**bad)
    for text in (["Calculate 9 + 3."], [("a", "text")]):  # text, not token ids
        with pytest.raises(ThinkfastError, match=r"give \(problem_id, token_ids\) pairs"):
            list(eng.generate(text, 1, params))
    # a batch that does not fit: the message says so and suggests one that does
    monkeypatch.setattr(engine_mod, "available_memory", lambda device: 10 * 2**20)
    with pytest.raises(ThinkfastError, match=r"batch size 100000 needs .* use batch_size=\d+") as e:
        Engine(lm, batch_size=100000, max_len=64)
    assert "\n" not in str(e.value)
    with command_line(), pytest.raises(ThinkfastError, match=r"use --batch-size \d+ or fewer --max-new-tokens"):
        Engine(lm, batch_size=100000, max_len=64)  # under the command: its flags


def test_a_growing_state_is_measured_after_the_old_one_and_its_step_are_given_back(monkeypatch):
    """Growing the state (a longer request) frees the old state and its step before measuring free memory: on a
    GPU the step's CUDA graphs hold memory pools that a figure taken before would count as taken. On a CPU the
    old state's bytes count as free, as they will be."""
    lm = _lm("hybrid", "mamba2")
    eng = Engine(lm, batch_size=2, max_len=16)
    old = eng.state.nbytes()
    seen = []

    def free_memory(device):
        seen.append((eng.state, eng._step))
        return int(1.5 * old)  # with the old state's bytes: room for the new one (~2x the old) under 0.9 x free

    monkeypatch.setattr(engine_mod, "available_memory", free_memory)
    list(eng.generate(_prompts([20]), 1, SamplingParams(temperature=0, max_new_tokens=8)))
    assert seen == [(None, None)] and eng.max_len == 28 and eng.state.nbytes() > old


class _ByteTok(_TinyTok):
    """Each id < 256 is one UTF-8 byte (a byte-level vocabulary, as the embedded teacher's)."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _cycling_model(cycle: list[int], start: int, vocab: int = 260):
    """A 1-layer Llama whose greedy continuation of `start` repeats `cycle` forever."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=vocab, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                                         tie_word_embeddings=False)).eval()
    nxt = {i: cycle[0] for i in range(vocab)} | {a: b for a, b in zip(cycle, cycle[1:] + cycle[:1])}
    with torch.no_grad():  # the residual stream is the token's one-hot embedding; the head maps it to its successor
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(vocab))
        model.lm_head.weight.zero_()
        for i, j in nxt.items():
            model.lm_head.weight[j, i] = 1.0
    return model


def test_a_stop_string_longer_in_bytes_than_in_characters_is_found():
    """The text searched for a stop is decoded from the last tokens: a byte-level token holds one byte of it."""
    emoji = "\N{GRINNING FACE}"
    eng = Engine(_cycling_model(list(emoji.encode()), 97), _ByteTok(), batch_size=2)
    for stop in (emoji, emoji * 3, emoji * 4):  # 4, 12 and 16 bytes: the window was 2 x characters + 4 tokens
        c = next(eng.generate([("p", [97])], params=SamplingParams(temperature=0, max_new_tokens=40, stop=stop)))
        assert c.finish_reason == "stop" and c.text == "", (stop, c.finish_reason, c.text)


def test_max_new_tokens_beyond_the_context_costs_only_the_context():
    """Each sample stops at the model's positions; a huge max_new_tokens must not size anything by itself."""
    eng = Engine(_cycling_model([97, 98], 97), _ByteTok(), batch_size=4)
    (c,) = eng.generate([("p", [97, 98])], params=SamplingParams(temperature=1.0, max_new_tokens=10**9))
    assert c.finish_reason == "length" and c.gen_tokens == 256 - 2
    short = next(eng.generate([("p", [97, 98])], params=SamplingParams(temperature=1.0, max_new_tokens=300)))
    assert short.tokens == c.tokens  # the same seed's draws: a prefix of one stream


def test_python_arguments_of_the_wrong_kind_are_one_line_errors():
    lm = _lm("llamba", "discrete")
    eng = Engine(lm, batch_size=2)
    params = SamplingParams(temperature=0, max_new_tokens=4)
    prompts = _prompts([3])
    for make, says in [(lambda: Engine(lm, batch_size=2.5), "batch size 2.5: use a whole number"),
                       (lambda: Engine(lm, batch_size="4"), "batch size '4'"),
                       (lambda: list(eng.generate(prompts, 2.5, params)), "n=2.5"),
                       (lambda: list(eng.generate(prompts, "2", params)), "n='2'"),
                       (lambda: list(eng.generate(prompts, 1, params, seed=None)), "seed=None"),
                       (lambda: list(eng.generate(prompts, 1, params, seed=1.7)), "seed=1.7"),
                       (lambda: list(eng.generate(prompts, 1, {"temperature": 0})), "give a SamplingParams"),
                       (lambda: list(eng.generate([("a", {"input_ids": [1, 2]})], 1, params)), "give its input_ids"),
                       (lambda: list(eng.generate([("a", [[1, 2]])], 1, params)), "not a list of token ids"),
                       (lambda: SamplingParams(ignore_eos="no"), "ignore_eos='no': give True or False"),
                       (lambda: SamplingParams(stop=b"x"), "not bytes")]:
        with pytest.raises(ThinkfastError, match=re.escape(says)) as e:
            make()
        assert "\n" not in str(e.value)


def test_a_vanishing_temperature_is_greedy():
    logits = torch.tensor([[5.0, 1.0, 0.0, -3.0]])
    for t in (1e-40, 1e-6):  # logits / 1e-40 overflow: the softmax would be NaN
        assert sample_tokens(logits, torch.tensor([0.5], dtype=torch.float64), SamplingParams(temperature=t)).tolist() == [0]


def test_a_stop_string_that_is_a_special_token_ends_the_sample_at_it():
    """Decoding leaves special tokens out of the text, where `<|im_start|>` (an lm-eval `until` string) never
    showed: such a stop ends the sample at the token itself, and the text ends before it."""
    from thinkfast.data.tokenizer import build_byte_tokenizer

    tok = build_byte_tokenizer()
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert start not in Engine(_cycling_model([97, 98], 97), tok).stop_ids  # not an end of turn of its own
    eng = Engine(_cycling_model([97, 98, start, 99], 97), tok, batch_size=2)
    params = SamplingParams(temperature=0, max_new_tokens=20, stop=["<|im_start|>"])
    c = next(eng.generate([("p", [97])], params=params))
    assert (c.finish_reason, c.tokens, c.text) == ("stop", [98, start], "b")
    c = next(eng.generate([("p", [97])], params=SamplingParams(temperature=0, max_new_tokens=6)))
    assert c.finish_reason == "length" and c.tokens.count(start) == 2


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logits_that_overflow_stop_the_run_in_one_line(temperature):
    """NaN or inf logits (a model overflowing in float16) were sampled as the vocabulary's last token (argmax: the
    first), filling a samples file with wrong answers and no error."""
    lm = _lm("hybrid", "mamba2")
    with torch.no_grad():
        lm.norm.weight[3] = float("inf")
    eng = Engine(lm, batch_size=2)
    with pytest.raises(ThinkfastError, match=r"logits hold NaN or inf \(problem p0, sample 0, after 0 generated "
                                             r"tokens\): it overflows in float32; sample in float32"):
        list(eng.generate(_prompts([5]), 1, SamplingParams(temperature=temperature, max_new_tokens=4)))


def test_sampling_params_changed_after_they_were_made_are_checked_again():
    eng = Engine(_lm("llamba", "discrete"), _TinyTok(), batch_size=2)
    for field, value, says in [("top_p", 0.0, "top-p=0.0"), ("temperature", -1.0, "temperature=-1.0"),
                               ("max_new_tokens", 0, "max-new-tokens=0")]:
        params = SamplingParams(max_new_tokens=4)
        setattr(params, field, value)
        with pytest.raises(ThinkfastError, match=re.escape(says)):
            list(eng.generate(_prompts([5]), 1, params))
    params = SamplingParams(temperature=0, max_new_tokens=6)
    params.stop = "abc"  # one string, as the constructor reads it: not three one-letter stops
    c = next(Engine(_cycling_model([97, 98], 97), _ByteTok(), batch_size=2).generate([("p", [97])], params=params))
    assert (c.finish_reason, c.text) == ("length", "bababa")
