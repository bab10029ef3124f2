"""The embedded default: a small Llama teacher trained on procedural arithmetic with worked solutions,
shipped inside the package, and the data specs the demo uses around it.

Seed ranges: reasoning-gym's `basic_arithmetic` seeds item i with `seed + i`, so each split below owns a
disjoint range of seeds; held-out questions that also occur in a training split are dropped all the same
(short sums repeat by chance).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import CheckpointError, ConfigError

ASSET_DIR = Path(__file__).resolve().parent / "assets"
TINY_TEACHER = ASSET_DIR / "tiny-teacher"
PROMPT_STYLE = {"instruction": "none"}  # the embedded models see the bare question as the user turn

SUMS = "rg:basic_arithmetic?operators=+&allow_parentheses=false&allow_negation=false&min_terms=2&max_terms=8&min_digits=1&max_digits=3"
# seed ranges: teacher training [1000, 151000), distillation [200000, ...), reward model [600000, ...), held-out 900000+
TEACHER_SPEC = f"{SUMS}&size=150000&seed=1000"


def sums_spec(size: int, seed: int) -> str:
    return f"{SUMS}&size={size}&seed={seed}"


def embedded_teacher_dir() -> Path:
    if not (TINY_TEACHER / "model.safetensors").is_file():
        raise CheckpointError(
            f"the embedded teacher is missing from {TINY_TEACHER}; reinstall thinkfast, or train one with "
            "`thinkfast train-teacher --recipe tiny-teacher --out DIR` and pass it with --teacher DIR"
        )
    return TINY_TEACHER


def build_teacher_model(architecture: dict, tokenizer, seed: int = 0, instruction: str = PROMPT_STYLE["instruction"]):
    """A randomly initialised all-attention ThinkfastForCausalLM of the recipe's [architecture], declaring the prompt
    instruction it will be trained with (students and `thinkfast sample` default to it)."""
    from .models import ModelConfig, ThinkfastConfig, ThinkfastForCausalLM

    arch = dict(architecture)
    if "vocab_size" in arch:
        raise ConfigError("recipe [architecture]: vocab_size comes from the tokenizer; remove it")
    try:
        n_layers = int(arch["n_layers"])
        cfg = ModelConfig.from_dict({**arch, "vocab_size": len(tokenizer), "attn_layers": list(range(n_layers))})
    except KeyError as e:
        raise ConfigError(f"recipe [architecture]: missing {e.args[0]}") from None
    torch.manual_seed(seed)
    hf_cfg = ThinkfastConfig.from_model_config(
        cfg, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, prompt_style={**PROMPT_STYLE, "instruction": instruction},
    )
    return ThinkfastForCausalLM(hf_cfg)


def train_teacher(recipe: str = "tiny-teacher", out: str | os.PathLike = "tiny-teacher", tokens: int | None = None,
                  resume: bool = False, progress=True, flags: dict | None = None):
    """Train the embedded teacher from scratch with a recipe; writes a save_pretrained folder with its tokenizer."""
    from .data.tokenizer import build_byte_tokenizer
    from .distill.recipes import load_recipe, make_plan
    from .distill.stages import sft

    data = load_recipe(recipe, extra_tables=("architecture",))
    arch = data.pop("architecture", None)
    if not arch:
        raise ConfigError(f"recipe {recipe}: no [architecture] table; train-teacher needs the model's shape")
    flags = dict(flags or {})
    if tokens is not None:
        flags["tokens"] = tokens
    plan = make_plan(data, flags, command="sft")
    stage = plan.stages[0]
    for cfg in plan.data_configs():  # a recipe that sets none trains on the embedded models' bare question
        if cfg.instruction is None:
            cfg.instruction = PROMPT_STYLE["instruction"]
    tokenizer = build_byte_tokenizer()
    model = build_teacher_model(arch, tokenizer, seed=stage.train.seed, instruction=plan.data.instruction)
    return sft(model, plan.data, stage.train, tokenizer=tokenizer, out_dir=out, resume=resume, progress=progress,
               name="teacher", eval_data=plan.eval_data)
