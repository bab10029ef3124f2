"""`thinkfast convert`: any model thinkfast reads (a published Llamba or MambaInLlama student, a Llama-family
teacher, a thinkfast folder) into a thinkfast save_pretrained folder with its tokenizer."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import CheckpointError, ConfigError
from . import no_hf_progress_bars


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="write a published student (Cartesia Llamba, MambaInLlama, M1) or a Llama-family model as a "
        "thinkfast folder",
        description="Convert a model into a thinkfast save_pretrained folder (config.json, model.safetensors, "
        "tokenizer) that sample, bench, sft and transformers' Auto classes read: Cartesia's Llamba checkpoints "
        "(cartesia-ai/Llamba-1B, -3B, -8B), MambaInLlama's Mamba-2 and Mamba-1 students and hybrids, M1, Llama / Mistral / Qwen2 / "
        "Qwen3 checkpoints (as all-attention teachers) and .gguf files; a local folder or a hub id.",
    )
    p.add_argument("source", help="checkpoint folder, .gguf file or hub id")
    p.add_argument("--out", required=True, help="folder to write (a new or empty one, or a thinkfast model folder to replace)")
    p.add_argument("--tokenizer", help="where the tokenizer comes from when the checkpoint has none beside its weights "
                   "(Llamba's hub repos do not: give its teacher's, e.g. meta-llama/Llama-3.2-1B-Instruct)")
    p.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16", "float16"],
                   help="keep (the checkpoint's, the default), float32, bfloat16, float16")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    import torch

    from ..models.teacher import load_thinkfast
    from ..utils import atomic_dir, check_out_path, parse_dtype
    from .distill import _load_tokenizer

    out = Path(args.out)
    check_out_path(out)
    if out.is_dir() and any(out.iterdir()) and _model_type(out) != "thinkfast":
        raise ConfigError(f"--out {out} holds other files (not a thinkfast model folder), which writing here would "
                          "replace; choose a new --out or empty it")
    extra = sorted(p.name for p in out.iterdir() if not MODEL_FILE.fullmatch(p.name)) if out.is_dir() else []
    if extra:  # a distill / sft run's folder holds its model beside checkpoints and logs, which the swap would delete
        raise ConfigError(f"--out {out} holds {extra[0]!r} beside its model (a training run's folder?), which replacing "
                          "the folder would delete; choose a new --out")
    dtype = None if args.dtype == "keep" else parse_dtype(args.dtype)
    no_hf_progress_bars()
    model, tok = load_thinkfast(args.source, dtype=dtype, where="convert")
    tok = _load_tokenizer(args.tokenizer, tok)  # --tokenizer wins over one beside the weights
    if tok is None:
        raise CheckpointError(f"convert {args.source}: no tokenizer beside the weights; pass --tokenizer with its "
                              f"teacher's (a folder or hub id){_teacher_hint(args.source)}")
    vocab = model.model_config.vocab_size
    if len(tok) > vocab:  # its ids past the embedding would fail at the first such token, long after converting
        raise ConfigError(f"convert {args.source}: the tokenizer has {len(tok):,} tokens but the model's vocabulary "
                          f"{vocab:,}; pass the tokenizer it was trained with{_teacher_hint(args.source)}")
    # a stop token for checkpoints whose config names none (Llamba's): the tokenizer's
    # (and in generation_config.json, which is all transformers 5's generate() reads)
    gen = getattr(model, "generation_config", None)
    for key, value in (("eos_token_id", tok.eos_token_id if isinstance(tok.eos_token_id, int) else None),
                       ("pad_token_id", tok.pad_token_id)):
        if getattr(model.config, key, None) is None and value is not None:
            setattr(model.config, key, value)
        if gen is not None and getattr(gen, key, None) is None and getattr(model.config, key, None) is not None:
            setattr(gen, key, getattr(model.config, key))
    with torch.no_grad(), atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    cfg = model.model_config
    params = sum(p.numel() for p in model.parameters())
    print(f"{out}: thinkfast {model.config.role}, {params / 1e6:.1f}M parameters, {cfg.n_layers} layers "
          f"(attention at {cfg.attn_layers or 'none'}), {next(model.parameters()).dtype}")
    return 0


# what save_pretrained writes for a model and its tokenizer: a folder of only these is a model folder to replace
MODEL_FILE = re.compile(r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens|vocab)\.json"
                        r"|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|chat_template\.(jinja|json)"
                        r"|merges\.txt|tokenizer\.model")


def _model_type(folder: Path):
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _teacher_hint(source: str) -> str:
    """MambaInLlama's config.json names the teacher it was distilled from."""
    name = _name_or_path(Path(source))
    return f" (its config.json names {name})" if name else ""


def _name_or_path(folder: Path):
    try:
        value = json.loads((folder / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None
