"""TOML recipes for `thinkfast distill` and `thinkfast sft`: every setting in a file, a flag overrides it.

A recipe has top-level settings and one optional table per stage kind ([matrix], [hidden], [kd], [sft]).
A stage's value comes from, in order: the command-line flag, the stage's table, the top level, the default.

    teacher = "meta-llama/Llama-3.2-1B-Instruct"    # distill: teacher (path, GGUF, hub id)
    model = "runs/llamba"                            # sft: the model to fine-tune
    student = "llamba"                               # llamba | hybrid
    attn_layers = [3, 8]                             # hybrid: attention kept here
    d_conv = 4                                       # the student's Mamba mixers: conv width, state size per
    d_state = 64                                     # head (default the teacher's head size), heads of x and B
    ssm_kv_heads = 8                                 # (default the teacher's KV heads), gated-norm group
    ssm_norm_group = 64                              # (mamba2; default the whole width, MambaInLlama's: head size)
    stages = ["matrix", "hidden", "kd"]
    data = ["gsm8k:../shared/data/gsm8k_train.jsonl"]
    data_weights = [1.0]
    eval_data = ["gsm8k:../shared/data/gsm8k_test.jsonl"]  # held-out loss per stage (eval_every, eval_rows)
    seq_len = 1024                                   # any TrainConfig field: tokens, lr, batch_size, ...
    [kd]
    tokens = 1_000_000
    loss = "forward_kl"                              # any StageConfig field: loss, temperature, freeze, ...

`--recipe NAME` reads thinkfast/recipes/NAME.toml (shipped with the package); anything else is a path.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

from ..data.packing import DataConfig
from ..errors import ConfigError
from .stages import STAGE_KINDS, StageConfig
from .trainer import TrainConfig

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"

TRAIN_KEYS = {f.name for f in fields(TrainConfig)}
STAGE_KEYS = {"layers", "train_mlp", "loss", "ce_weight", "temperature", "positions", "freeze", "chunk_tokens"}
DATA_KEYS = {"data", "data_weights", "instruction", "chat", "chat_template_kwargs", "pack", "train_prompt", "group_by_length"}
VALUE_TABLES = ("chat_template_kwargs",)  # keys whose value is a TOML table, not a stage
SHAPE_KEYS = ("d_state", "d_conv", "ssm_kv_heads", "ssm_norm_group")  # a new student's Mamba mixers (`from_teacher`)
RUN_KEYS = {"teacher", "model", "student", "attn_layers", "ssm_param", "stages", "tokenizer", "fsdp_teacher",
            "teacher_dtype", "description", "eval_data", *SHAPE_KEYS}
TOP_KEYS = RUN_KEYS | TRAIN_KEYS | STAGE_KEYS | DATA_KEYS
PER_STAGE_KEYS = TRAIN_KEYS | STAGE_KEYS | DATA_KEYS
# distill's own settings: sft and train-teacher train one model as it is, so a recipe that sets them asked for
# something those commands would silently not do
DISTILL_ONLY_KEYS = ("teacher", "teacher_dtype", "fsdp_teacher", "student", "attn_layers", "ssm_param", *SHAPE_KEYS,
                     "layers", "train_mlp", "loss", "ce_weight", "temperature", "positions")
INT_KEYS = {"batch_size", "micro_batch_size", "seq_len", "log_every", "ckpt_every", "seed", "chunk_tokens",
            "eval_every", "eval_rows"}
FLOAT_KEYS = {"lr", "min_lr_ratio", "warmup", "decay", "weight_decay", "beta1", "beta2", "grad_clip", "ce_weight",
              "temperature"}


def resolve_recipe(name: str) -> Path:
    """NAME -> thinkfast/recipes/NAME.toml; a path (with / or .toml) as it is."""
    p = Path(name)
    if p.suffix == ".toml" or "/" in name or p.exists():
        path = p
    else:
        path = RECIPE_DIR / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(x.stem for x in RECIPE_DIR.glob("*.toml"))) or "none"
        raise ConfigError(f"recipe {name!r}: no such file ({path}); shipped recipes: {known}")
    return path


def load_recipe(name: str, extra_tables: tuple[str, ...] = ()) -> dict:
    """Read and check a recipe: unknown keys are refused with the list of known ones.

    `extra_tables` are tables a caller reads itself (train-teacher's [architecture]); they are returned unchecked."""
    path = resolve_recipe(name)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"recipe {path}: not valid TOML ({e})") from None
    for key, value in data.items():
        if isinstance(value, dict) and key not in VALUE_TABLES:
            if key in extra_tables:
                continue
            if key not in STAGE_KINDS:
                raise ConfigError(f"recipe {path}: unknown table [{key}]; stage tables are {', '.join(STAGE_KINDS)}")
            for k in value:
                if k not in PER_STAGE_KEYS:
                    raise ConfigError(f"recipe {path}: unknown key {k!r} in [{key}]; known keys: {', '.join(sorted(PER_STAGE_KEYS))}")
        elif key not in TOP_KEYS:
            raise ConfigError(f"recipe {path}: unknown key {key!r}; known keys: {', '.join(sorted(TOP_KEYS))}")
    data["_path"] = str(path)
    return data


_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(value, what: str = "--tokens") -> int:
    """2M, 1.5B, 300e6, 300_000_000 -> int."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: {value!r} is not a number")
    if isinstance(value, (int, float)):
        n = value
    else:
        s = str(value).strip().lower().replace("_", "")
        m = re.fullmatch(r"([0-9.]+(?:e[0-9]+)?)([kmbgt]?)", s)
        if not m:
            raise ConfigError(f"{what}: {value!r} is not a count (examples: 500000, 2M, 1.5B)")
        n = float(m.group(1)) * _SUFFIX.get(m.group(2), 1)
    if not math.isfinite(n):
        raise ConfigError(f"{what}: {value!r} is not finite")
    return int(round(n))


def parse_int_list(value, what: str) -> list[int]:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        items = value
    else:
        items = [x for x in str(value).replace(" ", "").split(",") if x]
    try:
        return [int(x) for x in items]
    except ValueError:
        raise ConfigError(f"{what}: {value!r} is not a list of integers (e.g. 3,8,13)") from None


def parse_list(value) -> list[str]:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [str(x) for x in value]
    return [x for x in str(value).replace(" ", "").split(",") if x]


@dataclass
class Plan:
    """Everything `distill` / `sft` need, resolved from recipe + flags."""

    stages: list[StageConfig]
    data: DataConfig
    teacher: str | None = None
    model: str | None = None
    student: str = "llamba"
    attn_layers: list[int] | None = None
    ssm_param: str | None = None
    d_state: int | None = None
    d_conv: int | None = None
    ssm_kv_heads: int | None = None
    ssm_norm_group: int | None = None
    tokenizer: str | None = None
    fsdp_teacher: bool = False
    teacher_dtype: str = "float32"
    eval_data: DataConfig | None = None  # held-out examples: each stage logs its loss on them
    recipe: str | None = None  # the recipe file, so errors can name where a setting came from

    def data_configs(self) -> list[DataConfig]:
        """Every data config of the plan: the run's, the stages' own, the held-out one."""
        return [self.data] + [s.data for s in self.stages if s.data is not None] + \
            ([self.eval_data] if self.eval_data is not None else [])


def _whole(value) -> int:
    """An integer setting: 3, 3.0 or "3"; 1.5 or true are refused, not truncated."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError
        return int(value)
    return int(value)  # an int, or a flag's text ("1.5" raises)


def _coerce(key: str, value, where: str):
    """Check and convert one setting from a recipe or a flag."""
    if value is None:
        return None
    try:
        if key == "tokens":
            return parse_count(value, f"{where}: tokens")
        if key == "micro_batch_size":
            return None if value in (0, "0") else _whole(value)
        if key in SHAPE_KEYS:
            if _whole(value) < 1:
                raise ValueError
            return _whole(value)
        if key in INT_KEYS:
            return _whole(value)
        if key in FLOAT_KEYS:
            if isinstance(value, bool):  # float(True) is 1.0: a typo, not a rate
                raise ValueError
            return float(value)
    except (TypeError, ValueError):
        if key in SHAPE_KEYS:
            raise ConfigError(f"{where}: {key}={value!r} must be a whole number of at least 1") from None
        if key in INT_KEYS:
            raise ConfigError(f"{where}: {key}={value!r} must be a whole number") from None
        raise ConfigError(f"{where}: {key}={value!r} is not a number") from None
    if key in ("layers", "attn_layers"):
        return parse_int_list(value, f"{where}: {key}")
    if key in ("freeze", "data", "eval_data"):
        return value if isinstance(value, list) else parse_list(value) if key == "freeze" else [value]
    if key == "data_weights":
        try:
            return [float(x) for x in (value if isinstance(value, list) else str(value).split(","))]
        except ValueError:
            raise ConfigError(f"{where}: data_weights {value!r} are not numbers (e.g. 0.7,0.3)") from None
    if key == "chat_template_kwargs":
        from ..data.prompts import parse_template_kwargs

        return parse_template_kwargs(value, where if where.startswith("flag") else f"{where}: chat_template_kwargs")
    if key in ("train_mlp", "chat", "pack", "train_prompt", "fsdp_teacher", "group_by_length") and not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def use_declared_style(plan: "Plan", model) -> None:
    """Fill the prompt settings of every data config that neither a flag nor the recipe set with those `model` (the
    teacher, or the model `sft` trains) declares in its config (`prompt_style`: the instruction, else "auto"; chat
    off, or template variables): a student learns on the prompts its teacher was trained on, and inherits that
    declaration for `thinkfast sample`."""
    declared = getattr(getattr(model, "config", None), "prompt_style", None) or {}
    for cfg in plan.data_configs():
        if isinstance(cfg, DataConfig):
            resolved = cfg.with_declared(declared, check=True)
            cfg.instruction, cfg.chat, cfg.template_kwargs = resolved.instruction, resolved.chat, resolved.template_kwargs


def make_plan(recipe: dict | None, flags: dict, command: str = "distill") -> Plan:
    """Merge a recipe (or None) with flag values (None = not given). `flags['tokens']` may be a per-stage list."""
    recipe = dict(recipe or {})
    path = recipe.pop("_path", None)
    where = f"recipe {path}" if path else "settings"
    tables = {k: recipe.pop(k) for k in list(recipe) if isinstance(recipe[k], dict) and k not in VALUE_TABLES}
    tables = {k: dict(v) for k, v in tables.items() if k in STAGE_KINDS}  # a caller's extra tables are its own
    flags = {k: v for k, v in flags.items() if v is not None}
    if "data" in flags and "data_weights" not in flags:  # the recipe's weights were for the recipe's sources
        recipe.pop("data_weights", None)
        for t in tables.values():
            t.pop("data_weights", None)

    def top(key, default=None):
        if key in flags:
            return _coerce(key, flags[key], "flag --" + key.replace("_", "-"))
        v = _coerce(key, recipe.get(key), where)
        return default if v is None else v

    # errors name where the stages came from: the flag, or the recipe (train-teacher has no --stages flag)
    from_flag = bool(flags.get("stages"))
    stages = parse_list(flags.get("stages") if from_flag else recipe.get("stages")) or (["sft"] if command == "sft" else None)
    src = "--stages" if from_flag else f"{where}: stages"
    if not stages:
        raise ConfigError("no stages: pass --stages (e.g. matrix,hidden,kd) or set stages in the recipe")
    for s in stages:
        if s not in STAGE_KINDS:
            raise ConfigError(f"{src}: unknown stage {s!r}; use {', '.join(STAGE_KINDS)}")
    if len(set(stages)) != len(stages):
        raise ConfigError(f"{src} {','.join(stages)}: each stage kind can appear once")
    if command == "sft":
        _check_sft_recipe(stages, src, recipe, tables, where)

    token_flag = flags.get("tokens")
    if isinstance(token_flag, str):
        token_flag = [x for x in token_flag.split(",") if x]
    if isinstance(token_flag, list) and len(token_flag) not in (1, len(stages)):
        raise ConfigError(f"--tokens has {len(token_flag)} values for {len(stages)} stages; give one, or one per stage")

    out = []
    for k, kind in enumerate(stages):
        table = tables.get(kind, {})

        def get(key, default=None):
            if key == "tokens" and token_flag is not None:
                v = token_flag[k] if isinstance(token_flag, list) and len(token_flag) > 1 else (token_flag[0] if isinstance(token_flag, list) else token_flag)
                return _coerce("tokens", v, "flag --tokens")
            if key in flags:
                return _coerce(key, flags[key], "flag --" + key.replace("_", "-"))
            if key in table:
                return _coerce(key, table[key], f"{where} [{kind}]")
            return top(key, default)

        train_kw = {f: get(f) for f in TRAIN_KEYS}
        train_kw = {f: v for f, v in train_kw.items() if v is not None}
        if "tokens" not in train_kw:
            raise ConfigError(f"stage {kind}: no token budget; pass --tokens or set tokens in the recipe")
        stage_kw = {f: get(f) for f in STAGE_KEYS}
        stage_kw = {f: v for f, v in stage_kw.items() if v is not None}
        data = None
        if any(k in table for k in DATA_KEYS):
            if "data" not in flags:  # a flag's data applies to every stage
                data = _data_config(get, where, flags)
        out.append(StageConfig(kind, TrainConfig(**train_kw), **stage_kw, data=data))
    plan = Plan(
        stages=out,
        # the run's own data config only binds the stages without one of their own
        data=_data_config(top, where, flags, check=any(s.data is None for s in out)),
        teacher=top("teacher"),
        model=top("model"),
        student=top("student", "llamba"),
        attn_layers=top("attn_layers"),
        ssm_param=top("ssm_param"),
        **{k: top(k) for k in SHAPE_KEYS},
        tokenizer=top("tokenizer"),
        fsdp_teacher=bool(top("fsdp_teacher", False)),
        teacher_dtype=top("teacher_dtype", "float32"),
        recipe=path,
    )
    eval_specs = top("eval_data")
    if eval_specs:  # read as the training data is read (prompt style, packing), without its mixing weights
        plan.eval_data = replace(plan.data, specs=list(eval_specs), weights=None)
    for s in plan.stages:
        s.validate()
    return plan


def _check_sft_recipe(stages, src, recipe: dict, tables: dict, where: str) -> None:
    """sft and train-teacher (make_plan's "sft" command) run one sft stage on one model: refuse a recipe that asks
    for more, rather than train part of it."""
    if stages != ["sft"]:
        raise ConfigError(f"{src} = {stages}: sft and train-teacher run the sft stage alone; set stages = [\"sft\"] "
                          "(thinkfast distill runs the other stages)")
    other_tables = [k for k in tables if k != "sft"]
    if other_tables:  # its settings would be silently ignored
        raise ConfigError(f"{where}: [{other_tables[0]}] sets a stage that sft and train-teacher do not run; remove it "
                          "(thinkfast distill runs the other stages)")
    unused = [k for k in DISTILL_ONLY_KEYS if k in recipe or k in tables.get("sft", {})]
    if unused:
        raise ConfigError(f"{where}: {', '.join(unused)} {'is a setting' if len(unused) == 1 else 'are settings'} of "
                          "thinkfast distill (a teacher, a new student, the other stages); sft and train-teacher train "
                          f"one model as it is: remove {'it' if len(unused) == 1 else 'them'}")


FLAG_NAMES = {"chat": "--no-chat", "pack": "--no-pack", "group_by_length": "--group-by-length",
              "chat_template_kwargs": "--chat-template-kwargs"}


def _data_config(get, where, flags: dict, check: bool = True) -> DataConfig:
    def origin(*keys) -> str:  # flags the user gave name themselves; otherwise the recipe did it
        return " and ".join(FLAG_NAMES[k] for k in keys) if all(k in flags for k in keys) else where

    specs = get("data") or []
    if check and get("group_by_length", False) and get("pack", True):
        raise ConfigError(f"{origin('group_by_length')}: group_by_length groups one-example rows; packed rows are all "
                          "one length (add --no-pack or pack = false)")
    template_kwargs = get("chat_template_kwargs")
    if check and template_kwargs and get("chat") is False:
        raise ConfigError(f"{origin('chat', 'chat_template_kwargs')}: chat_template_kwargs with chat off (--no-chat): "
                          "the variables are for the chat template; drop one of them")
    return DataConfig(
        specs=list(specs),
        weights=get("data_weights"),
        pack=get("pack", True),
        instruction=get("instruction"),  # None: the style the teacher declares (use_declared_style)
        chat=get("chat"),  # None: as the teacher declares (use_declared_style), else the template
        template_kwargs=template_kwargs,
        train_prompt=get("train_prompt", False),
        seed=get("seed", 0),
        group_by_length=get("group_by_length", False),
    )
