"""`thinkfast sample` and `thinkfast bench`: glue over thinkfast.engine (grading comes from thinkfast.eval)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ..errors import ConfigError
from . import no_hf_progress_bars, positive_float, positive_int

STATE_DTYPES = ("float32", "bfloat16", "float16")  # engine.SSM_STATE_DTYPES, named here so --help imports no torch
SSM_STATE_HELP = ("the Mamba layers' SSM state in the engine (default float32; bfloat16/float16 halve its bytes, the "
                  "update still in fp32; on a CPU only the compiled step gains from it, and bf16 can cost accuracy)")


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="sample N completions per problem with the batched engine into a graded samples file (resumable)",
        description="Sample N chains of thought per problem (teacher or student, same engine), grade them and append them "
        "to a JSONL samples file. Re-running the same command completes exactly the missing samples. Under torchrun, "
        "each rank samples a slice of the problems and rank 0 merges the results into --out.",
    )
    p.add_argument("--model", dest="models", action=_InOrder, const="model", required=True, metavar="PATH",
                   help="thinkfast checkpoint folder (teacher, llamba or hybrid), published Llamba or MambaInLlama student, HF Llama-family folder (Llama, Mistral, Qwen2, Qwen3), .gguf file or hub id; "
                   "repeat it to sample several models taking turns (their seconds per sample then share the machine's "
                   "drifts) into --out DIR/<name>.jsonl")
    p.add_argument("--data", required=True, help="data spec, e.g. gsm8k:../shared/data/gsm8k_test.jsonl?limit=100")
    p.add_argument("--out", required=True, help="samples file (JSONL) to create or resume; with several --model a folder")
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=1,
                   help="samples per problem (default 1); under torchrun write --num-samples (torchrun takes --n as its own)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability (default 0 = off)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="generated tokens per sample at most (default 512)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); the completion ends before it")
    p.add_argument("--no-default-stop", dest="default_stop", action="store_false",
                   help="plain 'Question: ... Answer:' prompts (no chat template, or --no-chat) stop at the next "
                   "'Question:' by default, as lm-eval's gsm8k; this samples past it")
    p.add_argument("--batch-size", type=int, default=64, help="decode slots (default 64)")
    p.add_argument("--seed", type=int, default=0, help="base seed; each sample's seed derives from (seed, problem id, sample index)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available; LOCAL_RANK under torchrun)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--instruction", help="prompt instruction: auto, boxed, hash, none, or literal text (default: the one the "
                   "model's config.json declares, e.g. none for the embedded models; else auto)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="--no-chat: plain 'Question: ... Answer:' prompts even when the tokenizer has a chat template; "
                   "--chat: its chat template even where the model declares it was trained without (default: as "
                   "its config.json declares, else the template)")
    p.add_argument("--chat-template-kwargs", default=None, metavar="JSON",
                   help="extra variables for the chat template, a JSON object, e.g. '{\"enable_thinking\": false}' "
                   "(Qwen3 without its thinking); part of the samples file's configuration")
    p.add_argument("--few-shot", type=int, default=0, metavar="K",
                   help="show K worked examples before each question (chat turns, or Question/Answer blocks with "
                   "--no-chat), drawn from --few-shot-data (default 0)")
    p.add_argument("--few-shot-data", metavar="SPEC",
                   help="data spec the examples come from: problems with worked solutions, e.g. "
                   "gsm8k:../shared/data/gsm8k_train.jsonl; any problem that is also in --data is never drawn")
    p.add_argument("--few-shot-seed", type=int, default=0,
                   help="which K examples are drawn (default 0); every problem gets the same ones")
    p.add_argument("--name", dest="models", action=_InOrder, const="name", metavar="NAME",
                   help="model name in the samples file of the --model before it (default: the checkpoint folder's name)")
    p.add_argument("--turn-seconds", type=positive_float, default=1.0,
                   help="with several --model: engine seconds each model runs before the next takes its turn (default 1)")
    p.add_argument("--no-grade", action="store_true", help="do not grade (answer and correct stay null)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile the SSM update (GPU) or the whole decode step (CPU: pays off in long runs) (auto: GPU only)")
    p.add_argument("--ssm-state-dtype", choices=STATE_DTYPES, default="float32",
                   help=SSM_STATE_HELP)
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sample)

    b = sub.add_parser(
        "bench",
        help="decode throughput of teacher vs students in this engine and vs HF generate(); writes benchmarks/",
        description="Benchmark the engine on random-weight models of a preset's shapes, or on your checkpoints side by side "
        "(--model, repeatable): tokens/s, seconds per sample, peak memory and roofline per (model, batch size, prompt "
        "length, generated length), and HF generate() on the teacher.",
    )
    b.add_argument("--preset", default="tiny", help="tiny (CPU, the demo's sizes) or llama-1b (Llama-3.2-1B shape; GPU); "
                   "with --model it only supplies the default --configs")
    b.add_argument("--model", dest="checkpoints", action=_InOrder, const="model", default=None, metavar="PATH",
                   help="time this checkpoint instead of the preset's random models (repeatable): a thinkfast checkpoint "
                   "folder (teacher, llamba or hybrid), published Llamba or MambaInLlama student, HF Llama-family folder (Llama, Mistral, Qwen2, Qwen3), .gguf file or hub id, loaded as `thinkfast sample` does")
    b.add_argument("--name", dest="checkpoints", action=_InOrder, const="name", metavar="NAME",
                   help="row name of the --model just before it (default: the folder's name)")
    b.add_argument("--no-hf", action="store_true", help="no HF generate() rows (by default the preset's teacher and every teacher-role --model get one)")
    b.add_argument("--hf-students", action="store_true",
                   help="students get HF generate() rows too (NAME-hf; the preset's llamba-hf and hybrid-hf): their own "
                   "generate() with its cached recurrent step, against the teacher's HF row")
    b.add_argument("--configs", default=None, help="BATCHxPROMPTxGEN list, e.g. 64x80x1024,1x80x1024 (default: the preset's)")
    b.add_argument("--models", default=None, help="comma list of teacher, llamba, hybrid, teacher-hf, llamba-hf, hybrid-hf (default: the first four; not with --model)")
    b.add_argument("--out", default=None, help="markdown file (default benchmarks/<preset>.md; with --model benchmarks/models.md)")
    b.add_argument("--json", default=None, help="also write the rows as a JSON list to this file")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    b.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    b.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile the SSM update (GPU) or the whole decode step (CPU: pays off in long runs) (auto: GPU only)")
    b.add_argument("--ssm-state-dtype", default="float32",
                   help="comma list of SSM state dtypes (float32, bfloat16, float16): each model with Mamba layers gets a "
                   "row per dtype, side by side, e.g. float32,bfloat16 (default float32)")
    b.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads per row (default: torch's default)")
    b.add_argument("--repeats", type=int, default=1, help="timed runs per row; the fastest counts (default 1)")
    b.add_argument("--rounds", type=positive_int, default=1,
                   help="passes over all the rows, the models alternating; each row keeps its fastest pass, so a drift "
                   "in the machine's speed reaches every model (default 1)")
    b.add_argument("--no-isolate", action="store_true", help="run rows in this process (faster; peak memory less exact)")
    b.set_defaults(func=cmd_bench)


def _state_dtypes(value: str) -> list[str]:
    names = list(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    if not names or any(v not in STATE_DTYPES for v in names):
        raise ConfigError(f"--ssm-state-dtype {value!r}: use a comma list of {', '.join(STATE_DTYPES)}")
    return names


def _compile_flag(value: str):
    return {"auto": "auto", "on": True, "off": False}[value]


def _sample_specs(events) -> list[tuple[str, str | None]]:
    """[(model, name or None)] from the --model/--name sequence; with one --model, --name may come first."""
    if sum(kind == "model" for kind, _ in events) == 1 and sum(kind == "name" for kind, _ in events) == 1:
        events = sorted(events, key=lambda e: e[0] != "model")
    return _checkpoint_specs(events)


def cmd_sample(args) -> int:
    no_hf_progress_bars()
    from ..data.prompts import declared_style
    from ..engine.run import default_model_name, dist_env, sample_interleaved, sample_to_file
    from ..models.teacher import has_chat_template_files
    from ..engine.sampling import SamplingParams

    from ..utils import check_out_path

    specs = _sample_specs(args.models)
    several = len(specs) > 1
    # the device is checked by the sampling code, before it writes
    check_out_path(args.out, folder=several)
    if several:
        names = [name or default_model_name(spec) for spec, name in specs]
        clash = next((n for n in names if names.count(n) > 1), None)
        if clash is not None:
            raise ConfigError(f"two --model are named {clash!r}, and each writes --out/<name>.jsonl; "
                              "give one of them a --name after it")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            max_new_tokens=args.max_new_tokens, stop=args.stop)

    from ..data import load_problems

    template_kwargs = _template_kwargs(args)
    problems = load_problems(args.data)  # once, here: grading needs every gold answer before a model loads
    examples = _few_shot(args, problems)

    def style(spec):  # the prompts the checkpoint declares it was trained on, where no flag says otherwise
        if args.chat and not has_chat_template_files(spec):
            raise ConfigError(f"--chat with --model {spec}: its tokenizer has no chat template to prompt it through; "
                              "drop --chat (its prompts are plain Question/Answer blocks)")
        return declared_style(spec, instruction=args.instruction, system=args.system,
                              chat=args.chat, few_shot=examples, template_kwargs=template_kwargs)

    grade_fn = None
    if not args.no_grade:
        from ..eval.grading import grade_many

        _check_gold_answers(args.data, problems)
        grade_fn = grade_many
    common = dict(data_spec=args.data, n=args.n, params=params, seed=args.seed, batch_size=args.batch_size,
                  device=args.device, dtype=args.dtype, grade_fn=grade_fn, compile=_compile_flag(args.compile),
                  problems=problems, ssm_state_dtype=args.ssm_state_dtype, default_stop=args.default_stop)
    if several:
        jobs = [dict(model_spec=spec, out=Path(args.out) / f"{name}.jsonl", name=name, style=style(spec))
                for (spec, _), name in zip(specs, names)]
        summaries = sample_interleaved(jobs, common, turn_seconds=args.turn_seconds, progress=not args.quiet)
    else:
        (spec, name), = specs
        summaries = [sample_to_file(spec, out=args.out, name=name, style=style(spec), progress=not args.quiet, **common)]
    rank, world, _ = dist_env()
    if rank > 0:  # under torchrun the first process speaks for the run, once the parts are merged
        return 0
    share = f" by this process, one of {world} whose parts are merged into it" if world > 1 else ""
    for s in summaries:
        if s.stats is None:
            print(f"{s.out}: all {s.total} samples{share} already there (config {s.config}); nothing to do")
        else:
            st = s.stats
            # the same figure as the progress bar's: engine time counts prefill and decoding, not grading or writing
            print(f"{s.out}: wrote {s.written} samples{share} ({s.skipped} already there), {st.gen_tokens:,} tokens in "
                  f"{st.wall_seconds:.1f} s of engine time ({st.tokens_per_second:,.0f} tok/s engine), config {s.config}")
    return 0


def _template_kwargs(args) -> dict | None:
    """--chat-template-kwargs as a dict, and only where a chat template is used."""
    if args.chat_template_kwargs is None:
        return None
    from ..data.prompts import parse_template_kwargs

    value = parse_template_kwargs(args.chat_template_kwargs, "--chat-template-kwargs")
    if args.chat is False:
        raise ConfigError("--chat-template-kwargs with --no-chat: the variables are for the chat template, which "
                          "--no-chat turns off; drop one of them")
    return value


def _few_shot(args, problems) -> list | None:
    """The --few-shot examples, drawn once for every model (and every torchrun rank: the draw is seeded)."""
    if args.few_shot < 0:
        raise ConfigError(f"--few-shot {args.few_shot}: give a number of examples, 0 or more")
    if args.few_shot == 0:
        if args.few_shot_data:
            raise ConfigError("--few-shot-data without --few-shot K: say how many examples each prompt shows")
        return None
    if not args.few_shot_data:
        raise ConfigError(f"--few-shot {args.few_shot} needs --few-shot-data SPEC, problems with worked solutions "
                          "(e.g. gsm8k:../shared/data/gsm8k_train.jsonl)")
    from ..data import load_problems
    from ..data.prompts import few_shot_examples
    from ..errors import DataError

    pool = load_problems(args.few_shot_data)  # its errors name the spec
    try:
        return few_shot_examples(pool, args.few_shot, seed=args.few_shot_seed, exclude=problems)
    except DataError as e:
        raise DataError(f"--few-shot-data {args.few_shot_data!r}: {e}") from None


def _check_gold_answers(spec: str, problems) -> None:
    """Grading compares with each problem's gold answer; without one it would fail after the first batch."""
    from ..data import parse_spec

    missing = next((p for p in problems if not str(p.answer).strip()), None)
    if missing is None:
        return
    s = parse_spec(spec)
    if s.scheme == "text":
        raise ConfigError(f"data spec {spec!r}: plain text ({s.target}) has no answers to grade samples against; "
                          "pass --no-grade to sample it ungraded")
    raise ConfigError(f"data spec {spec!r}: problem {missing.id} has no gold answer to grade against; give every "
                      "problem one, or pass --no-grade to sample ungraded")


def _parse_configs(text: str | None):
    if text is None:
        return None
    if not text.strip(","):  # an empty --configs (an unset shell variable) would run the preset's long defaults
        raise ConfigError(f"--configs {text!r} names no configuration: write BATCHxPROMPTxGEN, e.g. 64x80x1024, or leave it out")
    out = []
    for part in text.split(","):
        try:
            b, p, g = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--configs {part!r}: write BATCHxPROMPTxGEN, e.g. 64x80x1024") from None
        if min(b, p, g) < 1:
            raise ConfigError(f"--configs {part!r}: batch, prompt and gen must be positive")
        out.append((b, p, g))
    return out


class _InOrder(argparse.Action):
    """--model and --name share one list in command-line order, so a --name names the --model before it."""

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, (getattr(namespace, self.dest) or []) + [(self.const, value)])


def _checkpoint_specs(events) -> list[tuple[str, str | None]]:
    """[(path, name or None)] from the --model/--name sequence."""
    specs: list[list] = []
    for kind, value in events or []:
        if kind == "model":
            specs.append([value, None])
        elif not value.strip():
            raise ConfigError("--name '': give the row a name, or leave --name out for the folder's name")
        elif not specs:
            raise ConfigError(f"--name {value}: put it after the --model it names")
        elif specs[-1][1] is not None:
            raise ConfigError(f"--name {value}: --model {specs[-1][0]} is already named {specs[-1][1]!r}; one --name per --model")
        else:
            specs[-1][1] = value
    return [(path, name) for path, name in specs]


def cmd_bench(args) -> int:
    no_hf_progress_bars()
    import torch

    from ..engine.bench import PRESETS, markdown, run_bench
    from ..engine.run import hardware_string

    if args.preset not in PRESETS:
        raise ConfigError(f"--preset {args.preset!r}: use one of {', '.join(PRESETS)}")
    from ..utils import check_device, check_out_path, parse_dtype

    models = [m.strip() for m in args.models.split(",")] if args.models else None
    checkpoints = _checkpoint_specs(args.checkpoints)
    device = check_device(args.device) or ("cuda" if torch.cuda.is_available() else "cpu")
    parse_dtype(args.dtype, device)  # a bad --dtype is one line here, not an error in every row
    if args.repeats < 1:
        raise ConfigError(f"--repeats {args.repeats}: time each row at least once")
    if args.hf_students and args.no_hf:
        raise ConfigError("--hf-students asks for HF generate() rows, --no-hf for none: pass one of them")
    # checkpoint rows never replace a preset's recorded results by default
    out = Path(args.out or ("benchmarks/models.md" if checkpoints else f"benchmarks/{args.preset}.md"))
    check_out_path(out, folder=False)
    if args.json:
        check_out_path(args.json, "--json", folder=False)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run_bench(args.preset, _parse_configs(args.configs), models, device, args.dtype, _compile_flag(args.compile),
                     isolate=not args.no_isolate, threads=args.threads, repeats=args.repeats, rounds=args.rounds,
                     checkpoints=checkpoints, hf=not args.no_hf, ssm_state_dtypes=_state_dtypes(args.ssm_state_dtype),
                     hf_students=args.hf_students)
    if rows and all(r.get("error") for r in rows):  # keep the previous results rather than a table of failures
        raise ConfigError(f"every row failed (first: {rows[0]['error']}); nothing written to {out}")
    unreadable = [r for r in rows if r.get("load_failed")]
    if unreadable:  # a checkpoint that does not load is bad input: the previous results stay
        raise ConfigError(f"{unreadable[0]['error']}; nothing written to {out}")
    from ..utils import atomic_write_json, atomic_write_text

    atomic_write_text(out, markdown(rows, args.preset, hardware_string(device), _bench_command(args)))
    print(f"wrote {out}")
    if args.json:
        atomic_write_json(args.json, rows)
        print(f"wrote {args.json}")
    return 0


def _bench_command(args) -> str:
    parts = ["thinkfast bench", f"--preset {args.preset}"]
    for kind, value in args.checkpoints or []:
        parts.append(f"--{kind} {shlex.quote(value)}")
    for flag in ("configs", "models", "device", "threads", "repeats", "rounds", "out", "json"):
        value = getattr(args, flag)
        if value:
            parts.append(f"--{flag} {shlex.quote(str(value))}")
    if args.dtype != "auto":
        parts.append(f"--dtype {args.dtype}")
    if args.compile != "auto":
        parts.append(f"--compile {args.compile}")
    if args.ssm_state_dtype != "float32":
        parts.append(f"--ssm-state-dtype {args.ssm_state_dtype}")
    if args.no_hf:
        parts.append("--no-hf")
    if args.hf_students:
        parts.append("--hf-students")
    if args.no_isolate:
        parts.append("--no-isolate")
    return " ".join(parts)
