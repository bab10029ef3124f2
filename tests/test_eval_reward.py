"""Reward models: the trainable ORM (learns, saves, loads, scores files) and the RLHFlow-style PRM mechanics."""

import json
import os
import random

import numpy as np
import pytest
import torch

from conftest import tiny_llama
from thinkfast.cli import main as cli
from thinkfast.data.tokenizer import build_byte_tokenizer
from thinkfast.errors import ConfigError, DataError
from thinkfast.eval.reward import (
    RESYNC_TOKENS, ORMConfig, ORMTraining, OutcomeRewardModel, ProcessRewardModel, aggregate, auc, load_backbone, question_text,
    split_steps, train_orm,
)
from thinkfast.models import ModelConfig, ThinkfastConfig, ThinkfastForCausalLM

GOOD, BAD = "so it checks out.", "so I am unsure?!"




@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    tok = build_byte_tokenizer()
    cfg = ModelConfig(vocab_size=len(tok), d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=128, attn_layers=[0])
    torch.manual_seed(0)
    model = ThinkfastForCausalLM(ThinkfastConfig.from_model_config(cfg))
    path = tmp_path_factory.mktemp("backbone") / "student"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def toy_samples(n_problems=24, per=5, seed=0):
    """Completions whose correctness shows in their last words: learnable by a head on a frozen random LM."""
    rng = random.Random(seed)
    rows = []
    for p in range(n_problems):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        for i in range(per):
            ok = rng.random() < 0.4
            ans = a + b if ok else a + b + rng.choice([1, 2, 3])
            rows.append(dict(problem_id=f"toy:{p}", sample_idx=i, model="student", role="hybrid",
                             completion=f"{a} plus {b} is {ans}.\n#### {ans}\n{GOOD if ok else BAD}",
                             answer=str(ans), gold=str(a + b), kind="gsm8k", correct=ok, grade_error=None, reward=None,
                             gen_tokens=30, prompt_tokens=20, seconds=0.05, seed=i, finish_reason="stop", hardware="cpu",
                             config="c", question=f"What is {a} plus {b}?"))
    return rows


def test_orm_learns_a_visible_signal(backbone_dir):
    model, tok = load_backbone(backbone_dir)
    rows = toy_samples()
    rm = train_orm([r["question"] for r in rows], [r["completion"] for r in rows], [r["correct"] for r in rows],
                   [r["problem_id"] for r in rows], model, tok, ORMConfig(features="pooled"), ORMTraining(), log=lambda *_: None)
    assert rm.cfg.stats["history"][-1]["val_auc"] > 0.9
    fresh = toy_samples(8, 5, seed=1)
    s = rm.score([r["question"] for r in fresh], [r["completion"] for r in fresh])
    assert auc(s, np.array([r["correct"] for r in fresh])) > 0.9
    assert np.all((s > 0) & (s < 1))


def test_orm_fine_tuning_top_block_reduces_loss(backbone_dir):
    model, tok = load_backbone(backbone_dir)
    rows = toy_samples(8, 4)
    rm = train_orm([r["question"] for r in rows], [r["completion"] for r in rows], [r["correct"] for r in rows],
                   [r["problem_id"] for r in rows], model, tok, ORMConfig(train_layers=1, max_len=96, features="both"),
                   ORMTraining(epochs=3, lr=1e-2, val_fraction=0),
                   log=lambda *_: None)
    h = rm.cfg.stats["history"]
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert not any(p.requires_grad for p in rm.parameters())


def likely_and_slipped(model, tok, n_problems, seed):
    """Per problem: the backbone's own greedy continuation (labelled correct, twice) and three copies with one
    character swapped for a random one (labelled wrong): a signal only the backbone's likelihood can see."""
    rng = random.Random(seed)
    letters = [tok(ch, add_special_tokens=False)["input_ids"][0] for ch in "abcdefghijklmnopqrstuvwxyz"]
    rows = []
    for p in range(n_problems):
        question = f"Problem {p}: {rng.randint(0, 999)}"
        ids = tok(question_text(question, tok), add_special_tokens=False)["input_ids"]
        out = []
        with torch.no_grad():
            for _ in range(24):
                logits = model(torch.tensor([ids + out])).logits[0, -1, letters]
                out.append(letters[int(logits.argmax())])
        greedy = tok.decode(out)
        for i in range(5):
            text = list(greedy)
            if i >= 2:
                j = rng.randrange(len(text) - 1)
                text[j] = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != text[j]])
            rows.append(dict(question=question, completion="".join(text), correct=i < 2, problem_id=f"p{p}"))
    return rows


def test_orm_likelihood_features_learn_what_the_backbone_finds_unlikely(backbone_dir):
    model, tok = load_backbone(backbone_dir)
    rows = likely_and_slipped(model, tok, 20, seed=0)
    rm = train_orm([r["question"] for r in rows], [r["completion"] for r in rows], [r["correct"] for r in rows],
                   [r["problem_id"] for r in rows], model, tok, ORMConfig(), ORMTraining(), log=lambda *_: None)
    assert rm.cfg.features == "likelihood" and rm.head.in_features == 2
    fresh = likely_and_slipped(model, tok, 8, seed=1)
    s = rm.score([r["question"] for r in fresh], [r["completion"] for r in fresh])
    assert auc(s, np.array([r["correct"] for r in fresh])) > 0.9


def test_orm_refuses_one_class(backbone_dir):
    model, tok = load_backbone(backbone_dir)
    with pytest.raises(DataError, match="both kinds"):
        train_orm([None, None], ["a", "b"], [True, True], ["p", "q"], model, tok)
    with pytest.raises(ConfigError, match="train_layers"):
        OutcomeRewardModel(model, tok, ORMConfig(train_layers=5, features="both"))
    with pytest.raises(ConfigError, match="does not read"):
        OutcomeRewardModel(model, tok, ORMConfig(train_layers=1))
    with pytest.raises(ConfigError, match="use one of"):
        OutcomeRewardModel(model, tok, ORMConfig(features="hidden"))


def test_orm_python_api_refuses_what_it_would_get_wrong(backbone_dir, tmp_path):
    """Strings scored one character at a time, lists of other lengths truncated, None labels taken as wrong, a
    model folder replaced by the reward model: each refused in one line."""
    model, tok = load_backbone(backbone_dir)
    with pytest.raises(DataError, match="label None"):
        train_orm([None] * 3, ["a", "b", "c"], [True, False, None], ["p", "q", "r"], model, tok)
    with pytest.raises(ConfigError, match="2 labels"):
        train_orm([None] * 3, ["a", "b", "c"], [True, False], ["p", "q", "r"], model, tok)
    rm = OutcomeRewardModel(model, tok, ORMConfig(features="pooled"))
    with pytest.raises(ConfigError, match="takes lists"):
        rm.score("What is 1 + 2?", "#### 3")
    with pytest.raises(ConfigError, match="2 questions for 1 completions"):
        rm.score(["a", "b"], ["#### 3"])
    assert rm.score([None, "q"], ["#### 3", "#### 4"]).shape == (2,)
    target = tmp_path / "a_model"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(ConfigError, match="holds other files"):
        rm.save(target)
    from thinkfast.eval.scoring import train_reward_model
    with pytest.raises(ConfigError, match="holds other files"):
        train_reward_model([tmp_path / "none.jsonl"], str(backbone_dir), target)  # refused before the samples are read
    assert (target / "model.safetensors").read_bytes() == b"weights"
    rm.save(tmp_path / "rm")
    rm.save(tmp_path / "rm")  # a reward model's own folder is replaced


def test_orm_encoding_keeps_question_head_and_completion_tail(backbone_dir):
    model, tok = load_backbone(backbone_dir)
    rm = OutcomeRewardModel(model, tok, ORMConfig(max_len=64, question_tokens=20, features="pooled"))
    enc = rm.encode("Q" * 100, "x" * 200 + "THE END")
    assert len(enc.ids) == 64 and enc.start == 20
    assert tok.decode(enc.ids[-7:]) == "THE END"
    # with the likelihood features the end of the turn is scored too, and a cut leaves its first tokens unscored
    rm = OutcomeRewardModel(model, tok, ORMConfig(max_len=64, question_tokens=20))
    enc = rm.encode("Q" * 100, "x" * 200 + "THE END")
    assert len(enc.ids) == 64 and enc.ids[-1] == tok.eos_token_id and tok.decode(enc.ids[-8:-1]) == "THE END"
    assert enc.scored_from == 20 + RESYNC_TOKENS
    assert rm.encode("Q", "short").scored_from == rm.encode("Q", "short").start
    # a completion that fits is kept whole, however close to the limit
    for n in (10, 30, 42):
        enc = rm.encode("Q" * 100, "y" * n)
        assert enc.ids[enc.start:] == tok("y" * n, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_orm_encoding_without_a_question_and_with_a_long_one(backbone_dir):
    """A model trained on completions alone ignores questions when scoring (they changed every feature); without
    a question BOS leads, so the first token is scored (an empty completion scored as perfectly likely); a long
    question loses the end of its text, not the template's turn markers the completion follows."""
    model, tok = load_backbone(backbone_dir)
    alone = OutcomeRewardModel(model, tok, ORMConfig(max_len=64, uses_question=False))
    assert alone.encode("What is 2 + 3?", "so 5").ids == alone.encode(None, "so 5").ids
    lead = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    empty = alone.encode(None, "")
    assert empty.ids == [lead, tok.eos_token_id] and empty.start == empty.scored_from == 1
    features = alone.pooled([empty, alone.encode(None, "x")])
    assert (features[:, -2:] < 0).all()  # log-probs of real predictions, not the (0, 0) of nothing scored
    older = OutcomeRewardModel(model, tok, ORMConfig(max_len=64, uses_question=False, lead_token=False))
    assert older.encode(None, "x").ids[0] != lead or older.encode(None, "x").start == 0

    rm = OutcomeRewardModel(model, tok, ORMConfig(max_len=200, question_tokens=40))
    enc = rm.encode("Add " + " + ".join(["12"] * 60) + ".", "#### 720")
    head = tok.decode(enc.ids[: enc.start])
    assert enc.start <= 40 and head.startswith("<|im_start|>user\nAdd 12") and head.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(enc.ids[enc.start:], skip_special_tokens=True) == "#### 720"


def test_orm_likelihood_features_are_the_backbone_log_probs(backbone_dir):
    """Mean and min log-prob of the completion (and its end of turn), equal to a plain forward pass, in any batch."""
    model, tok = load_backbone(backbone_dir)
    rm = OutcomeRewardModel(model, tok, ORMConfig(max_len=400, features="both"))
    pairs = [("What is 2 plus 3?", "2 plus 3 is 5.\n#### 5"), ("Q?", "a much longer completion " * 6), ("Hi", "x")]
    encs = [rm.encode(q, c) for q, c in pairs]
    batched = rm.pooled(encs, batch_size=3)
    assert batched.shape == (3, 2 * 64 + 2)
    for enc, row in zip(encs, batched):
        ids = torch.tensor([enc.ids])
        with torch.no_grad():
            logp = model(ids).logits[0].log_softmax(-1)
        lp = logp[enc.start - 1:-1].gather(1, ids[0, enc.start:, None])[:, 0]
        torch.testing.assert_close(row[-2:], torch.stack([lp.mean(), lp.min()]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([rm.pooled([e]) for e in encs]), batched, atol=1e-5, rtol=1e-5)


def _small_pooled_orm(backbone_dir, out):
    """A pooled-states reward model trained on 8 toy problems and saved to `out`; with its rows."""
    model, tok = load_backbone(backbone_dir)
    rows = toy_samples(8, 4)
    rm = train_orm([r["question"] for r in rows], [r["completion"] for r in rows], [r["correct"] for r in rows],
                   [r["problem_id"] for r in rows], model, tok, ORMConfig(features="pooled"), ORMTraining(val_fraction=0),
                   log=lambda *_: None)
    rm.save(out)
    return rm, rows


def test_orm_without_likelihood_loads_from_an_older_folder(backbone_dir, tmp_path):
    """A folder written before the likelihood features (no `features` key) loads as the pooled-states head it is."""
    rm, rows = _small_pooled_orm(backbone_dir, tmp_path / "rm")
    cfg_path = tmp_path / "rm" / "reward_config.json"
    raw = json.loads(cfg_path.read_text())
    del raw["features"]
    cfg_path.write_text(json.dumps(raw))
    again = OutcomeRewardModel.load(tmp_path / "rm")
    assert again.cfg.features == "pooled" and again.head.in_features == 2 * 64
    qs, cs = [r["question"] for r in rows], [r["completion"] for r in rows]
    np.testing.assert_allclose(again.score(qs, cs), rm.score(qs, cs), rtol=1e-5)


def test_cli_train_score_report(backbone_dir, tmp_path, capsys):
    rows = toy_samples()
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli(["train-rm", "--samples", str(train), "--backbone", str(backbone_dir), "--out", str(tmp_path / "bad"),
                "--train-layers", "1"]) == 2  # the likelihood features have no blocks to fine-tune under
    assert "add --features both" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    (tmp_path / ".rm.tmp-k1ll3d").mkdir()  # what a save killed mid-copy leaves: cleared by the next run
    (tmp_path / ".rm.tmp-k1ll3d" / "head.safetensors").write_bytes(b"half")
    assert cli(["train-rm", "--samples", str(train), "--backbone", str(backbone_dir), "--out", str(tmp_path / "rm"),
                "--features", "both"]) == 0
    assert not list(tmp_path.glob(".rm.tmp-*")) and not (tmp_path / "rm.lock").exists()
    assert "validation AUC" in capsys.readouterr().out
    for name in ("reward_config.json", "head.safetensors", "backbone/config.json", "backbone/model.safetensors", "backbone/tokenizer.json"):
        assert (tmp_path / "rm" / name).is_file(), name

    test_rows = toy_samples(6, 4, seed=2)
    test_rows[3]["correct"] = None  # ungraded: `score` grades it
    test = tmp_path / "test.jsonl"
    lines = [json.dumps(r) for r in test_rows]
    lines.insert(5, "{broken line")
    test.write_text("\n".join(lines) + "\n")
    os.chmod(test, 0o640)
    assert cli(["score", str(test), "--reward-model", str(tmp_path / "rm")]) == 2  # malformed line: refuse
    assert test.read_text().splitlines() == lines  # untouched
    assert cli(["score", str(test), "--reward-model", str(tmp_path / "rm"), "--skip-bad-lines"]) == 0
    out = test.read_text().splitlines()
    assert out[5] == "{broken line" and len(out) == len(lines)  # bad line kept verbatim, in place
    scored = [json.loads(x) for i, x in enumerate(out) if i != 5]
    assert all(0 < r["reward"] < 1 for r in scored)
    assert scored[3]["correct"] is True or scored[3]["correct"] is False
    assert [r["completion"] for r in scored] == [r["completion"] for r in test_rows]
    assert oct(os.stat(test).st_mode & 0o777) == oct(0o640)

    # the rewards are the loaded model's own scores
    rm = OutcomeRewardModel.load(tmp_path / "rm")
    again = rm.score([r["question"] for r in test_rows], [r["completion"] for r in test_rows])
    assert np.allclose(again, [r["reward"] for r in scored], atol=1e-6)

    assert cli(["report", str(test), "--out", str(tmp_path / "rep"), "--no-plots", "--skip-bad-lines"]) == 0
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert metrics["models"]["student"]["bon_at_k"]["4"] >= metrics["models"]["student"]["pass_at_k"]["1"] - 1e-9

    # each reward names its reward model: another model's never fills the gaps or stands beside them
    assert {r["reward_model"] for r in scored} == {rm.identity} and rm.identity.startswith("orm:")
    assert cli(["train-rm", "--samples", str(train), "--backbone", str(backbone_dir), "--out", str(tmp_path / "rm2"),
                "--features", "pooled"]) == 0
    capsys.readouterr()
    before = test.read_bytes()
    assert cli(["score", str(test), "--reward-model", str(tmp_path / "rm2"), "--skip-bad-lines"]) == 2
    err = capsys.readouterr().err
    assert f"its rewards come from another reward model ({rm.identity}; this one is orm:" in err and "--rescore" in err
    assert test.read_bytes() == before
    mixed = tmp_path / "mixed.jsonl"
    rows = [json.loads(x) for i, x in enumerate(out) if i != 5]
    for r in rows[:4]:
        r["reward_model"] = "other:0123456789abcdef"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli(["report", str(mixed), "--out", str(tmp_path / "rep2"), "--no-plots"]) == 2
    assert "its rewards come from 2 reward models" in capsys.readouterr().err
    assert cli(["score", str(mixed), "--reward-model", str(tmp_path / "rm2"), "--rescore"]) == 0
    assert {json.loads(x)["reward_model"] for x in mixed.read_text().splitlines()} == {
        OutcomeRewardModel.load(tmp_path / "rm2").identity}
    # a model without rewards beside one with them: named in the notes, not silently left out of Best-of-N
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({**r, "model": "other", "reward": None}) + "\n" for r in rows))
    assert cli(["report", str(mixed), str(other), "--out", str(tmp_path / "rep3"), "--no-plots"]) == 0
    notes = json.loads((tmp_path / "rep3" / "metrics.json").read_text())["notes"]
    assert any(n.startswith("other: no rewards") and "left out of the Best-of-N tables" in n for n in notes)


# ------------------------------------------------------------------------------------------ PRM


@pytest.fixture(scope="module")
def prm():
    tok = build_byte_tokenizer()
    model = tiny_llama(vocab=len(tok), hidden=32, layers=2, heads=4, kv_heads=2, rope_scaling=False)
    return ProcessRewardModel(model, tok, aggregation="min")


def test_split_steps():
    assert split_steps("a\n\nb\n \n\nc") == ["a", "b", "c"]
    assert split_steps("one step only") == ["one step only"]
    assert split_steps("") == [""]


def test_aggregations():
    s = [0.9, 0.5, 0.8]
    assert aggregate(s, "last") == 0.8 and aggregate(s, "min") == 0.5
    assert aggregate(s, "mean") == pytest.approx(2.2 / 3) and aggregate(s, "product") == pytest.approx(0.36)
    with pytest.raises(ConfigError):
        aggregate(s, "max")


def test_prm_step_scores_equal_prefix_by_prefix(prm):
    """One batched forward (right-padded, several completions) == P(+) after each prefix, computed alone."""
    questions = ["What is 2+3?", "Name a prime.", "Sum 1..4?"]
    completions = ["2+3 = 5.\n\nSo the answer is 5.", "7 is prime.", "1+2 = 3\n\n3+3 = 6\n\n6+4 = 10\n\n#### 10"]
    batched = prm.step_scores_many(questions, completions, batch_size=3)
    tok, model = prm.tokenizer, prm.model
    for q, c, got in zip(questions, completions, batched):
        steps = split_steps(c)
        assert len(got) == len(steps)
        for i in range(len(steps)):
            msgs = prm.conversation(q, steps)[: 2 * i + 1]
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, -1]
            plus, minus = tok.convert_tokens_to_ids("+"), tok.convert_tokens_to_ids("-")
            expected = torch.softmax(logits[[plus, minus]].float(), -1)[0].item()
            assert got[i] == pytest.approx(expected, abs=1e-5)
    scores = prm.score(questions, completions)
    assert scores == pytest.approx([min(s) for s in batched])


def test_prm_needs_chat_template():
    tok = build_byte_tokenizer()
    tok.chat_template = None
    with pytest.raises(ConfigError, match="chat template"):
        ProcessRewardModel(tiny_llama(vocab=len(tok), hidden=32, layers=1, heads=4, kv_heads=2, rope_scaling=False), tok)


def test_cli_score_with_a_prm_folder(tmp_path, capsys):
    tok = build_byte_tokenizer()
    prm_dir = tmp_path / "prm"
    tiny_llama(vocab=len(tok), hidden=32, layers=1, heads=4, kv_heads=2, rope_scaling=False).save_pretrained(prm_dir)
    tok.save_pretrained(prm_dir)
    rows = toy_samples(3, 2)
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli(["score", str(path), "--prm", str(prm_dir), "--prm-aggregation", "product", "--device", "cpu"]) == 0
    scored = [json.loads(x) for x in path.read_text().splitlines()]
    prm = ProcessRewardModel.from_pretrained(str(prm_dir), "product", device="cpu")
    expected = prm.score([r["question"] for r in rows], [r["completion"] for r in rows])
    assert np.allclose([r["reward"] for r in scored], expected, atol=1e-6)
    assert cli(["score", str(path), "--prm", str(prm_dir), "--reward-model", str(tmp_path)]) == 2
    assert "either" in capsys.readouterr().err
    # a folder that holds no model (a train-rm folder given to the wrong flag) is one line, the file untouched
    before = path.read_bytes()
    (tmp_path / "orm").mkdir()
    (tmp_path / "orm" / "reward_config.json").write_text("{}")
    for folder, says in [(tmp_path / "orm", "it is a `thinkfast train-rm` folder: pass it as --reward-model"),
                         (tmp_path, "point it at a PRM checkpoint folder")]:
        assert cli(["score", str(path), "--prm", str(folder), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert says in err and "not a model folder" in err and len(err.strip().splitlines()) == 1, err
    assert path.read_bytes() == before


@pytest.mark.parametrize("problems,extra,why", [
    (8, ["--val-fraction", "0.25"], "no validation AUC: 8 problems; holding some out needs at least 10"),
    (12, ["--val-fraction", "0.05"], "no validation AUC: val_fraction 0.05 of 12 problems is less than one problem"),
    (12, ["--val-fraction", "0"], "no validation AUC: val_fraction is 0"),
])
def test_train_rm_says_why_it_has_no_validation_auc(backbone_dir, tmp_path, capsys, problems, extra, why):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in toy_samples(problems, 4)))
    assert cli(["train-rm", "--samples", str(train), "--backbone", str(backbone_dir), "--out", str(tmp_path / "rm")] + extra) == 0
    assert why in capsys.readouterr().out
    stats = json.loads((tmp_path / "rm" / "reward_config.json").read_text())["stats"]
    assert stats["val_examples"] == 0 and stats["no_validation"] in why


def test_a_reward_model_moved_aside_by_a_killed_save_loads_again(backbone_dir, tmp_path):
    """train-rm killed between its save's two renames leaves the model whole in `.NAME.old-PID`: `score` said it
    was no reward model folder until the next train-rm put it back."""
    from thinkfast.eval.scoring import load_reward_model

    rm, rows = _small_pooled_orm(backbone_dir, tmp_path / "rm")
    (tmp_path / "rm").rename(tmp_path / ".rm.old-12345")
    again = load_reward_model(tmp_path / "rm")
    assert (tmp_path / "rm" / "reward_config.json").is_file() and not list(tmp_path.glob(".rm.old-*"))
    assert again.identity == OutcomeRewardModel.load(tmp_path / "rm").identity == rm.identity  # in memory, loaded, moved


def test_a_killed_score_keeps_the_rewards_it_computed(backbone_dir, tmp_path, monkeypatch):
    """The file is rewritten once every sample is scored: a killed score started again from zero (hours with a
    1B backbone on MATH x 64). Rewards computed so far now go to a journal the next run reads back."""
    from thinkfast.eval import scoring

    rm, rows = _small_pooled_orm(backbone_dir, tmp_path / "rm")
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps({**r, "reward": None}) + "\n" for r in toy_samples(6, 4, seed=3)))
    before = path.read_bytes()
    monkeypatch.setattr(scoring, "JOURNAL_EVERY", 5)
    real, seen = OutcomeRewardModel.score, []

    def dies_on_the_third_part(self, questions, completions, **kw):
        seen.append(len(completions))
        if len(seen) == 3:
            raise KeyboardInterrupt
        return real(self, questions, completions, **kw)

    monkeypatch.setattr(OutcomeRewardModel, "score", dies_on_the_third_part)
    with pytest.raises(KeyboardInterrupt):
        scoring.score_files([path], reward_model=tmp_path / "rm", regrade=False, log=lambda *_: None)
    journal = tmp_path / "s.jsonl.rewards.partial"
    assert path.read_bytes() == before and len(journal.read_text().splitlines()) == 10
    with open(journal, "a") as f:
        f.write('{"problem_id": "torn')  # a kill mid-append
    seen.clear()
    monkeypatch.setattr(OutcomeRewardModel, "score", lambda self, q, c, **kw: (seen.append(len(c)), real(self, q, c, **kw))[1])
    scoring.score_files([path], reward_model=tmp_path / "rm", regrade=False, log=lambda *_: None)
    assert sum(seen) == 24 - 10 and not journal.exists()
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    expected = real(rm, [r["question"] for r in rows], [r["completion"] for r in rows])
    assert np.allclose([r["reward"] for r in rows], expected, atol=1e-6)
