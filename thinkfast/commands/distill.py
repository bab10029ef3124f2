"""`thinkfast distill` and `thinkfast sft`: argument parsing and glue over thinkfast.distill."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ConfigError, ThinkfastError
from . import no_hf_progress_bars

TRAIN_FLAGS = [
    # flag, key, type, help
    ("--batch-size", "batch_size", int, "rows per optimizer step, across all processes"),
    ("--micro-batch-size", "micro_batch_size", int, "rows per forward/backward on one process (gradient accumulation)"),
    ("--seq-len", "seq_len", int, "tokens per row"),
    ("--lr", "lr", float, "peak learning rate"),
    ("--min-lr-ratio", "min_lr_ratio", float, "final learning rate as a fraction of --lr"),
    ("--schedule", "schedule", str, "cosine | wsd | constant (all after a linear warmup)"),
    ("--warmup", "warmup", float, "warmup: fraction of steps (<1) or steps (>=1)"),
    ("--decay", "decay", float, "wsd: fraction of steps spent decaying"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (matrices only)"),
    ("--grad-clip", "grad_clip", float, "gradient norm clip (0: off)"),
    ("--log-every", "log_every", int, "steps between log records"),
    ("--ckpt-every", "ckpt_every", int, "steps between checkpoints (0: only at the end of a stage)"),
    ("--eval-every", "eval_every", int, "steps between held-out evaluations (0: only at the end of a stage; needs --eval-data)"),
    ("--eval-rows", "eval_rows", int, "held-out rows each evaluation reads (default 64; the same rows every time)"),
    ("--seed", "seed", int, "seed for data order"),
    ("--precision", "precision", str, "auto (bf16 autocast on GPU) | fp32 | bf16"),
    ("--device", "device", str, "cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK if present, else cpu)"),
]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="TOML recipe: a name under thinkfast/recipes (e.g. tiny-llamba) or a path; flags override it")
    p.add_argument("--data", action="append", metavar="SPEC",
                   help="data spec (repeatable): gsm8k:PATH, math:PATH, jsonl:PATH?..., rg:NAME?size=N, text:PATH, hf:...")
    p.add_argument("--data-weights", metavar="W,W", help="mixing weights, one per --data (e.g. 0.7,0.3)")
    p.add_argument("--eval-data", dest="eval_data", action="append", metavar="SPEC",
                   help="held-out data spec (repeatable): each stage logs its loss on it (eval_loss in train_log.jsonl)")
    p.add_argument("--tokens", metavar="N[,N...]", help="token budget: one value for every stage, or one per stage (2M, 1.5B, 300000)")
    p.add_argument("--out", required=True, help="output folder: checkpoints, train_log.jsonl, then the save_pretrained model")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (model, optimizer, schedule, RNG, data position)")
    p.add_argument("--tokenizer", help="tokenizer folder when the model has none")
    p.add_argument("--instruction", help="prompt instruction: auto | boxed | hash | none | literal text (default: the "
                   "recipe's, else the one the teacher (sft: the model) declares in its config.json, else auto)")
    p.add_argument("--chat", dest="chat", action=argparse.BooleanOptionalAction, default=None,
                   help="--no-chat: plain 'Question:/Answer:' prompts, no chat template; --chat: the template even where "
                   "the teacher (sft: the model) declares it trained without (default: as it declares, else the template)")
    p.add_argument("--chat-template-kwargs", dest="chat_template_kwargs", metavar="JSON",
                   help="extra variables for the chat template, a JSON object (e.g. '{\"enable_thinking\": false}')")
    p.add_argument("--no-pack", dest="pack", action="store_const", const=False, help="one example per row instead of packing several (the token budget then counts the examples' real tokens)")
    p.add_argument("--group-by-length", dest="group_by_length", action="store_const", const=True,
                   help="with --no-pack and --batch-size > 1: batches of examples of similar length (less padding)")
    p.add_argument("--train-prompt", dest="train_prompt", action="store_const", const=True, help="CE also on prompt tokens")
    p.add_argument("--freeze", metavar="GROUPS", help="kd/sft: parameter groups kept frozen: embed,norm,mlp,attn,mamba")
    p.add_argument("--tokens-per-chunk", dest="chunk_tokens", type=int, help="positions per vocabulary chunk in KL/CE")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for flag, key, typ, help_ in TRAIN_FLAGS:
        p.add_argument(flag, dest=key, type=typ, help=help_)


def add_parsers(sub) -> None:
    d = sub.add_parser(
        "distill",
        help="distil a Llama-family teacher (Llama, Mistral, Qwen2, Qwen3) into a Llamba (MOHAWK) or hybrid (reverse KL) student",
        description="Distil a Llama-family teacher into a Mamba-2 student. Stages: matrix (MOHAWK 1), hidden "
        "(MOHAWK 2), kd (end-to-end KL; forward for llamba, reverse for hybrid), sft. Writes checkpoints per "
        "stage, train_log.jsonl, and finally a save_pretrained folder in --out.",
    )
    d.add_argument("--teacher", help="teacher: HF Llama-family checkpoint folder (Llama, Mistral, Qwen2, Qwen3), .gguf file, hub id, or thinkfast all-attention folder")
    d.add_argument("--student", help="llamba | hybrid, or a saved student to keep training: a thinkfast folder, or a published "
                   "Llamba or MambaInLlama one (folder or hub id) (default llamba)")
    d.add_argument("--attn-layers", dest="attn_layers", metavar="I,J", help="hybrid: layers that keep attention (default: a quarter, spread)")
    d.add_argument("--ssm-param", dest="ssm_param", choices=["discrete", "mamba2"], help="SSM parameterisation (default: discrete for llamba, mamba2 for hybrid)")
    d.add_argument("--d-conv", dest="d_conv", metavar="N", help="a new student's causal conv width (default 4)")
    d.add_argument("--d-state", dest="d_state", metavar="N",
                   help="a new student's SSM state size per head (default: the teacher's head size; larger keeps K and Q in the first dimensions)")
    d.add_argument("--ssm-kv-heads", dest="ssm_kv_heads", metavar="N",
                   help="a new student's heads of x and B: the teacher's KV heads (default) or its query heads")
    d.add_argument("--ssm-norm-group", dest="ssm_norm_group", metavar="N",
                   help="a new mamba2 student's gated RMSNorm normalises groups of N features (default: the whole width; "
                   "the head size normalises each head, as MambaInLlama's checkpoints do)")
    d.add_argument("--stages", metavar="S,S", help="comma list from matrix,hidden,kd,sft (e.g. matrix,hidden,kd)")
    d.add_argument("--layers", metavar="I,J", help="matrix/hidden: train only these Mamba layers")
    d.add_argument("--train-mlp", dest="train_mlp", action="store_const", const=True, help="hidden: MLPs train too")
    d.add_argument("--kd-loss", dest="loss", choices=["forward_kl", "reverse_kl", "soft_ce"], help="kd divergence")
    d.add_argument("--ce-weight", dest="ce_weight", type=float, help="kd: add this x CE on the worked solutions (KL+CE)")
    d.add_argument("--temperature", type=float, help="kd temperature")
    d.add_argument("--positions", choices=["all", "completion"], help="kd: distil on all tokens or on completions only")
    d.add_argument("--teacher-dtype", dest="teacher_dtype", help="dtype to load the teacher in (float32, bfloat16)")
    d.add_argument("--fsdp-teacher", dest="fsdp_teacher", action="store_const", const=True,
                   help="shard the teacher across torchrun processes (FSDP) when it does not fit one device (on a CPU: torch >= 2.7)")
    _add_common(d)
    d.set_defaults(func=run_distill)

    s = sub.add_parser(
        "sft",
        help="supervised fine-tuning on worked solutions (students and teachers)",
        description="Cross entropy on worked solutions, prompt tokens masked. Writes checkpoints, "
        "train_log.jsonl and a save_pretrained folder in --out.",
    )
    s.add_argument("--model", help="model to fine-tune: a thinkfast folder (student or teacher), a published Llamba or MambaInLlama student, or an HF Llama-family folder (Llama, Mistral, Qwen2, Qwen3) / .gguf / hub id")
    _add_common(s)
    s.set_defaults(func=run_sft)


FLAG_KEYS = ["data", "data_weights", "eval_data", "group_by_length", "tokens", "tokenizer", "instruction", "chat",
             "chat_template_kwargs", "pack", "train_prompt", "freeze",
             "chunk_tokens", "teacher", "student", "attn_layers", "ssm_param", "d_conv", "d_state", "ssm_kv_heads", "ssm_norm_group", "stages", "layers", "train_mlp", "loss",
             "ce_weight", "temperature", "positions", "teacher_dtype", "fsdp_teacher", "model"] + [k for _, k, _, _ in TRAIN_FLAGS]


def _flags(args) -> dict:
    return {k: getattr(args, k, None) for k in FLAG_KEYS}


def _plan(args, command):
    from ..distill.recipes import load_recipe, make_plan

    from ..utils import check_device

    check_device(getattr(args, "device", None))  # before the run folder is made: a typo must not leave a run behind
    recipe = load_recipe(args.recipe) if args.recipe else None
    plan = make_plan(recipe, _flags(args), command)
    given = [f for f, k in (("--eval-every", "eval_every"), ("--eval-rows", "eval_rows")) if getattr(args, k, None) is not None]
    if given and plan.eval_data is None:
        raise ConfigError(f"{' and '.join(given)} without held-out data: add --eval-data SPEC (examples kept out of training)")
    _check_specs(plan)
    _check_held_out_is_not_trained_on(args, plan)
    return plan


def _check_held_out_is_not_trained_on(args, plan) -> None:
    """A held-out spec that is also a training spec would log a training loss as held-out (the library can only
    tell when it is given the very same data object)."""
    if plan.eval_data is None:
        return
    trained = {spec for cfg in plan.data_configs()[:-1] for spec in cfg.specs if isinstance(spec, str)}
    same = next((spec for spec in plan.eval_data.specs if isinstance(spec, str) and spec in trained), None)
    if same is not None:
        raise ConfigError(f"{_source(args, plan, 'eval_data')} {same}: the training data names the same spec, so its "
                          "loss would be a training loss; give examples kept out of training (another split, or another "
                          "seed= for an rg: spec)")
    # another spelling of the same examples (a slice of the training file, another path to it): by their questions
    import logging

    from ..data.sources import load_questions

    trained_questions = {q for spec in trained for q in load_questions(spec)}
    for spec in plan.eval_data.specs:
        if not isinstance(spec, str):
            continue
        questions = load_questions(spec)
        shared = sum(q in trained_questions for q in questions)
        if questions and shared == len(questions):
            raise ConfigError(f"{_source(args, plan, 'eval_data')} {spec}: all {shared} of its questions are training "
                              "questions, so its loss would be a training loss; give examples kept out of training "
                              "(another split, or another seed= for an rg: spec)")
        if shared:
            logging.getLogger(__name__).warning(
                "note: %s of the %s held-out questions of %s are also training questions; their loss is a training "
                "loss (give examples kept out of training for a held-out one)", shared, len(questions), spec)


def _check_specs(plan) -> None:
    """Every data spec's options, before a model loads (the data itself is read later, with the tokenizer)."""
    from ..data.sources import check_spec

    for cfg in plan.data_configs():
        for spec in cfg.specs:
            if isinstance(spec, str):
                check_spec(spec)


def _load_tokenizer(spec: str | None, fallback):
    if not spec:
        return fallback
    from transformers import AutoTokenizer

    from ..models.teacher import hub_kwargs

    hub = {} if Path(spec).exists() else hub_kwargs(spec, "--tokenizer")  # a missing hub id fails at once, offline
    try:
        return AutoTokenizer.from_pretrained(spec, **hub)
    except Exception as e:
        raise ConfigError(f"--tokenizer {spec}: could not load a tokenizer ({str(e).splitlines()[0][:200]})") from None


def _dtype(name):
    from ..utils import parse_dtype

    return parse_dtype(name)


def _load_thinkfast_or_teacher(spec: str, dtype, label: str):
    """A thinkfast folder (any role) as it is; an HF Llama / GGUF / hub id as an all-attention thinkfast model.
    `label` (`_source`: --teacher, --student, --model, or the recipe key) names it in errors."""
    from ..models.teacher import load_thinkfast

    return load_thinkfast(spec, dtype=dtype, where=label)


def _source(args, plan, key: str) -> str:
    """Where a setting came from, for errors: its flag when one was given, else the recipe key."""
    if getattr(args, key, None) is not None:
        return "--" + key.replace("_", "-")
    return f"recipe {plan.recipe}: {key}" if plan.recipe else key


def _not_a_student(label: str, spec: str) -> ConfigError:
    import difflib

    near = difflib.get_close_matches(spec.lower(), ["llamba", "hybrid"], n=1)
    hint = f" (did you mean {near[0]}?)" if near else ""
    return ConfigError(f"{label} {spec}: use llamba, hybrid, or a saved student (a thinkfast folder, or a published Llamba "
                       f"or MambaInLlama one){hint}")


def _check_new_student(args, plan, teacher) -> None:
    """A new student's shape against its teacher, naming the flag or recipe key (the model code would name neither)."""
    tc = teacher.model_config
    kv = plan.ssm_kv_heads
    if kv is not None and kv not in (tc.n_kv_heads, tc.n_heads):
        raise ConfigError(f"{_source(args, plan, 'ssm_kv_heads')} {kv}: a new student's ssm_kv_heads is the teacher's "
                          f"KV heads ({tc.n_kv_heads}) or its query heads ({tc.n_heads}); pass one of them")
    group = plan.ssm_norm_group
    if group is not None:
        label = _source(args, plan, "ssm_norm_group")
        if (plan.ssm_param or ("discrete" if plan.student == "llamba" else "mamba2")) != "mamba2":
            raise ConfigError(f"{label} {group}: only the mamba2 parameterisation has a gated RMSNorm; drop it or pass "
                              "--ssm-param mamba2")
        if (tc.n_heads * tc.hd) % group:
            raise ConfigError(f"{label} {group}: must divide the Mamba mixer's width {tc.n_heads * tc.hd} "
                              f"(the head size {tc.hd} normalises each head)")
    if plan.d_state is not None and plan.d_state < tc.hd:
        raise ConfigError(f"{_source(args, plan, 'd_state')} {plan.d_state}: d_state is below the teacher's head size "
                          f"{tc.hd}; B and C could not hold K and Q (use {tc.hd} or more)")


def _check_saved_student(args, plan, label: str, cfg) -> None:
    """A saved student keeps its shape: a new-student setting (flag or recipe key) that differs from it would be
    silently ignored, so it is refused; one that matches (a recipe written for that student) is not."""
    from ..distill.recipes import SHAPE_KEYS

    have = {"ssm_param": cfg.ssm_param, "attn_layers": list(cfg.attn_layers), "d_conv": cfg.d_conv,
            "d_state": cfg.n_state, "ssm_kv_heads": cfg.n_xb_heads,
            "ssm_norm_group": cfg.ssm_norm_group or cfg.n_ssm_heads * cfg.ssm_hd}
    drop = []
    for key in ("ssm_param", "attn_layers", *SHAPE_KEYS):
        asked = getattr(plan, key)
        if asked is None or (sorted(asked) if key == "attn_layers" else asked) == have[key]:
            continue
        saved = (",".join(map(str, have[key])) or "none") if key == "attn_layers" else have[key]
        if getattr(args, key, None) is not None:
            shown = ",".join(map(str, asked)) if key == "attn_layers" else asked
            drop.append(f"--{key.replace('_', '-')} {shown} (it has {key} {saved})")
        else:
            drop.append(f"{key} = {asked!r} from recipe {plan.recipe} (it has {saved!r})")
    if drop:
        raise ConfigError(f"{label} {plan.student}: a saved student keeps its shape; drop " + "; ".join(drop))


def _progress(args):
    from ..distill.trainer import no_bar

    no_hf_progress_bars()
    return no_bar if args.no_progress else True  # --no-progress drops the bar, not the budget line


# flags that only some stages read: given for a run without such a stage they would change nothing
STAGE_FLAGS = {"loss": ("--kd-loss", ("kd",)), "ce_weight": ("--ce-weight", ("kd",)),
               "temperature": ("--temperature", ("kd",)), "positions": ("--positions", ("kd",)),
               "layers": ("--layers", ("matrix", "hidden")), "train_mlp": ("--train-mlp", ("hidden",))}


def _refuse_flags_no_stage_reads(args, plan) -> None:
    kinds = {s.kind for s in plan.stages}
    stages = ",".join(s.kind for s in plan.stages)
    for key, (flag, readers) in STAGE_FLAGS.items():
        if getattr(args, key, None) is not None and not kinds & set(readers):
            raise ConfigError(f"{flag}: only the {' and '.join(readers)} stage{'s' if len(readers) > 1 else ''} read it, "
                              f"and this run's stages are {stages}; drop it")
    if getattr(args, "decay", None) is not None and not any(s.train.schedule == "wsd" for s in plan.stages):
        raise ConfigError("--decay: only the wsd schedule decays in a final fraction of its steps, and this run's "
                          "stages use another; drop it, or pass --schedule wsd")


def run_distill(args) -> int:
    from ..distill.recipes import SHAPE_KEYS, use_declared_style
    from ..distill.stages import distill
    from ..models import ThinkfastForCausalLM, from_teacher

    progress = _progress(args)
    plan = _plan(args, "distill")
    if not plan.teacher:
        raise ConfigError("no teacher: pass --teacher (an HF folder, .gguf file or hub id) or set teacher in the recipe")
    if any(s.freeze for s in plan.stages) and not any(s.kind in ("kd", "sft") for s in plan.stages):
        raise ConfigError(f"{_source(args, plan, 'freeze')}: frozen groups apply to kd and sft stages, and this run has "
                          "neither (matrix and hidden stages train the Mamba mixers they align); drop it")
    _refuse_flags_no_stage_reads(args, plan)
    out = Path(args.out)
    _check_out(out, args.resume, "distill")
    t_label = _source(args, plan, "teacher")
    teacher, tokenizer = _load_thinkfast_or_teacher(plan.teacher, _dtype(plan.teacher_dtype), t_label)
    if isinstance(teacher, ThinkfastForCausalLM) and teacher.config.role != "teacher":
        raise ConfigError(f"{t_label} {plan.teacher}: a thinkfast {teacher.config.role} model; the teacher needs attention in every layer")
    use_declared_style(plan, teacher)
    tokenizer = _load_tokenizer(plan.tokenizer, tokenizer)
    if tokenizer is None:
        raise ConfigError(f"{t_label} {plan.teacher} has no tokenizer; pass --tokenizer DIR")
    s_label = _source(args, plan, "student")
    if plan.student in ("llamba", "hybrid"):
        if plan.student == "llamba" and plan.attn_layers:
            raise ConfigError("--attn-layers is for --student hybrid; a llamba student has no attention")
        _check_new_student(args, plan, teacher)
        shape = {k: getattr(plan, k) for k in SHAPE_KEYS if getattr(plan, k) is not None}
        student = from_teacher(teacher, kind=plan.student, attn_layers=plan.attn_layers, ssm_param=plan.ssm_param, **shape)
    else:
        if not Path(plan.student).exists() and "/" not in plan.student:  # a typo of a kind, not a hub id (owner/name)
            raise _not_a_student(s_label, plan.student)
        student, _ = _load_thinkfast_or_teacher(plan.student, _dtype(plan.teacher_dtype), s_label)
        if not isinstance(student, ThinkfastForCausalLM) or student.config.role == "teacher":
            raise ConfigError(f"{s_label} {plan.student}: an all-attention model (a teacher), not a student; pass it as "
                              "--teacher with --student llamba or hybrid, or give a saved Llamba or hybrid folder")
        _check_saved_student(args, plan, s_label, student.model_config)
        if student.model_config.ssm_param == "mamba1" and any(st.kind == "matrix" for st in plan.stages):
            raise ConfigError(f"{s_label} {plan.student}: Mamba-1 layers, and MOHAWK's matrix stage compares one mixing "
                              "matrix per head (Mamba-1 decays per channel and state dimension); use the hidden, kd or "
                              "sft stages")
    student.float()
    distill(teacher, student, plan.data, plan.stages, tokenizer=tokenizer, out_dir=out, resume=args.resume,
            progress=progress, fsdp_teacher=plan.fsdp_teacher, eval_data=plan.eval_data)
    _report(out)
    return 0


def run_sft(args) -> int:
    from ..distill.recipes import use_declared_style
    from ..distill.stages import sft

    progress = _progress(args)
    plan = _plan(args, "sft")
    if not plan.model:
        raise ConfigError("no model: pass --model (a thinkfast folder or an HF Llama) or set model in the recipe")
    if len(plan.stages) != 1 or plan.stages[0].kind != "sft":
        raise ConfigError("thinkfast sft runs the sft stage only; use thinkfast distill --stages ... for others")
    _refuse_flags_no_stage_reads(args, plan)
    out = Path(args.out)
    _check_out(out, args.resume, "sft")
    m_label = _source(args, plan, "model")
    model, tokenizer = _load_thinkfast_or_teacher(plan.model, _dtype("float32"), m_label)
    use_declared_style(plan, model)
    tokenizer = _load_tokenizer(plan.tokenizer, tokenizer)
    if tokenizer is None:
        raise ConfigError(f"{m_label} {plan.model} has no tokenizer; pass --tokenizer DIR")
    stage = plan.stages[0]
    sft(model.float(), stage.data or plan.data, stage.train, tokenizer=tokenizer, out_dir=out, resume=args.resume,
        progress=progress, freeze=stage.freeze, eval_data=plan.eval_data, chunk_tokens=stage.chunk_tokens)
    _report(out)
    return 0


def _check_out(out: Path, resume: bool, command: str) -> None:
    """Cheap checks before any model is loaded (the library checks again, with the run's settings)."""
    from ..utils import check_run_out

    check_run_out(out, resume, command)


def _report(out: Path) -> None:
    import json

    from ..distill.trainer import dist_info

    if not dist_info().main:
        return
    last, held = {}, {}
    log = out / "train_log.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            (held if "eval_loss" in rec else last)[rec["stage"]] = rec
    for stage, rec in last.items():
        line = f"{stage}: step {rec['step']}, {rec['tokens']:,} tokens, loss {rec['loss']:.4g}"
        if stage in held:
            line += f", held-out loss {held[stage]['eval_loss']:.4g} (step {held[stage]['step']})"
        print(line, file=sys.stderr)
    print(f"saved {out}")


__all__ = ["add_parsers", "run_distill", "run_sft", "ThinkfastError"]
