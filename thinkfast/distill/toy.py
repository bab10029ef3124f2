"""Small things for tests, benchmarks and demos: a character-level tokenizer, a tiny Llama config, and
chain-sum problems with worked solutions (reasoning-gym's `chain_sum` items carry none)."""

from __future__ import annotations

from ..data.sources import Problem
from ..models import ModelConfig, ThinkfastConfig, ThinkfastForCausalLM

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def char_tokenizer():
    """A Hugging Face fast tokenizer with one token per printable ASCII character and newline.

    <pad>=0, <bos>=1 (added in front by default), <eos>=2, <unk>=3. Saves and loads with save_pretrained.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for c in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_config(vocab_size: int, d_model: int = 128, n_layers: int = 4, n_heads: int = 4, n_kv_heads: int = 2,
                d_mlp: int = 384, **kw) -> ModelConfig:
    """An all-attention (teacher-shaped) config; a few hundred thousand to a few million parameters."""
    return ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=n_kv_heads, d_mlp=d_mlp, attn_layers=list(range(n_layers)), **kw)


def random_model(cfg: ModelConfig, seed: int = 0, tokenizer=None) -> ThinkfastForCausalLM:
    import torch

    torch.manual_seed(seed)
    extras = {}
    if tokenizer is not None:
        extras = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    model = ThinkfastForCausalLM(ThinkfastConfig.from_model_config(cfg, **extras))
    model.init_weights()
    return model


def chain_sum_problems(n: int, seed: int = 0, min_terms: int = 2, max_terms: int = 4, digits: int = 2) -> list[Problem]:
    """Sums of signed integers with a step-by-step worked solution ending in '#### answer'."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(min_terms, max_terms)
        terms = [rng.randint(1, 10**digits - 1) for _ in range(k)]
        signs = ["+"] + [rng.choice("+-") for _ in range(k - 1)]
        expr = " ".join([str(terms[0])] + [f"{s} {t}" for s, t in zip(signs[1:], terms[1:])])
        acc = terms[0]
        steps = []
        for s, t in zip(signs[1:], terms[1:]):
            new = acc + t if s == "+" else acc - t
            steps.append(f"{acc} {s} {t} = {new}")
            acc = new
        solution = "\n".join(steps) + f"\n#### {acc}"
        out.append(Problem(f"chain:{seed}:{i}", f"{expr} =", str(acc), "number", solution, {"terms": k}))
    return out


def _signed_terms(expression: str) -> list[tuple[str, int]]:
    """'20 - 99 + 38' -> [('+', 20), ('-', 99), ('+', 38)]; also handles '- -3'."""
    tokens = expression.split()
    out = [("+", int(tokens[0]))]
    for op, num in zip(tokens[1::2], tokens[2::2]):
        out.append((op, int(num)))
    return out


def with_chain_sum_solutions(problems: list[Problem]) -> list[Problem]:
    """reasoning-gym `chain_sum` problems (metadata `expression`) with a step-by-step worked solution added."""
    out = []
    for p in problems:
        terms = _signed_terms(p.meta["expression"])
        acc = terms[0][1]
        steps = []
        for op, t in terms[1:]:
            new = acc + t if op == "+" else acc - t
            steps.append(f"{acc} {op} {t} = {new}")
            acc = new
        if str(acc) != str(p.answer).strip():
            raise ValueError(f"{p.id}: worked solution gives {acc}, gold is {p.answer}")
        solution = "\n".join(steps + [f"#### {acc}"])
        out.append(Problem(p.id, p.question, p.answer, p.kind, solution, p.meta))
    return out
