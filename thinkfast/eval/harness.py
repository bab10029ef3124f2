"""lm-evaluation-harness with thinkfast models: `thinkfast lm-eval --model thinkfast --model_args pretrained=DIR ...`.

`ThinkfastHarnessLM` (registered with lm-eval as `thinkfast`) is lm-eval's own `hf` model, so loglikelihood,
rolling loglikelihood, tokenisation, few-shot and chat templates behave exactly as with `--model hf`, except that
the model comes from `load_thinkfast` (a thinkfast folder of any role, a published Llamba / MambaInLlama / M1
student, or a Llama-family teacher, .gguf or hub id run as a thinkfast model) and `generate_until` runs on the
batched engine: every request of one generation setting in fixed slots, refilled as answers finish, prompts
prefilled many at a time, rather than `generate()` batch by batch, each waiting for its longest answer.

Importing this module needs lm-eval (`pip install 'thinkfast[lm-eval]'`).
"""

from __future__ import annotations

import json
import logging
import sys

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from ..engine.engine import Engine
from ..engine.sampling import SamplingParams
from ..errors import ConfigError, ThinkfastError
from ..models.teacher import load_thinkfast

log = logging.getLogger(__name__)

# gen_kwargs the engine honours; a task asking for anything else (beams, penalties) is refused, not half-run
GEN_KEYS = {"until", "do_sample", "temperature", "top_p", "top_k", "min_p", "max_gen_toks", "max_new_tokens", "max_tokens"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": None}


SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p")


def sampling_params(gen_kwargs: dict, default_max_gen_toks: int, model_defaults: dict | None = None) -> SamplingParams:
    """An lm-eval task's generation_kwargs as the engine's SamplingParams, as HFLM's `generate()` reads them: greedy
    unless do_sample is true or a positive temperature is given (do_sample unset); when sampling, a setting the
    task leaves out is the model's generation_config's (`model_defaults`), as `generate()` merges it."""
    unknown = sorted(set(gen_kwargs) - GEN_KEYS)
    if unknown:
        raise ConfigError(f"generation setting {unknown[0]!r} of this task: the thinkfast engine samples with temperature, "
                          "top_p, top_k and min_p only; run this task with --model hf")
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = next((gen_kwargs[k] for k in ("max_gen_toks", "max_new_tokens", "max_tokens") if k in gen_kwargs),
                   default_max_gen_toks)
    given = {k: gen_kwargs[k] for k in SAMPLING_KEYS if gen_kwargs.get(k) is not None}
    sample = gen_kwargs.get("do_sample")
    if sample is None:  # lm-eval: temperature 0 unless given, and do_sample follows it
        sample = float(given.get("temperature", 0.0)) > 0
    if not sample:
        return SamplingParams(temperature=0.0, max_new_tokens=int(max_new), stop=[s for s in until if s])
    if not float(given.get("temperature", 0.0)) > 0:  # do_sample without a temperature: the model's
        given.pop("temperature", None)
    settings = {**{k: v for k, v in (model_defaults or {}).items() if v is not None}, **given}
    return SamplingParams(temperature=float(settings.get("temperature", 1.0)), top_p=float(settings.get("top_p", 1.0)),
                          top_k=int(settings.get("top_k", 0)), min_p=float(settings.get("min_p", 0.0)),
                          max_new_tokens=int(max_new), stop=[s for s in until if s])


OWN_ARGS = ("pretrained", "dtype", "device", "slots", "seed", "ssm_state_dtype", "trust_remote_code")


def _refuse_unknown_args(kwargs: dict) -> None:
    """model_args neither thinkfast nor HFLM takes: HFLM would pass them on to a model thinkfast has already
    loaded, so a typo (slot=8) would run silently with the default."""
    import difflib
    import inspect

    known = set(OWN_ARGS) | {n for n in inspect.signature(HFLM.__init__).parameters if n not in ("self", "kwargs")}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1, cutoff=0.7)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"model_args {unknown[0]}={kwargs[unknown[0]]}: not an argument of --model thinkfast{hint}; it takes "
                          f"{', '.join(OWN_ARGS)} and lm-eval's hf model arguments (batch_size, max_length, think_end_token ...)")


def _int_arg(name: str, value, minimum: int) -> int:
    # lm-eval hands over 8 as an int, anything it could not read as one (abc, 8.5) as it is
    whole = isinstance(value, int) and not isinstance(value, bool) or isinstance(value, str) and value.strip().lstrip("-").isdigit()
    if not whole:
        raise ConfigError(f"model_args {name}={value}: expected a whole number")
    number = int(value)
    if number < minimum:
        raise ConfigError(f"model_args {name}={value}: use at least {minimum}")
    return number


@register_model("thinkfast")
class ThinkfastHarnessLM(HFLM):
    """lm-eval's HFLM over a thinkfast model, with generate_until on the engine.

    model_args: pretrained (path, hub id or .gguf), dtype (float32 | bfloat16 | float16 | auto: the checkpoint's),
    device, slots (the engine's rows, default 64), seed (sample i of request r draws from seed, r, i: greedy tasks
    do not depend on it), ssm_state_dtype, trust_remote_code; the rest (batch_size, max_length, think_end_token ...)
    go to HFLM, whose batch_size is for the loglikelihood passes.
    """

    def __init__(self, pretrained=None, dtype: str = "float32", device: str | None = None, slots: int = 64, seed: int = 0,
                 ssm_state_dtype: str | None = None, trust_remote_code: bool = False, **kwargs):
        if pretrained is None:
            raise ConfigError("--model thinkfast needs --model_args pretrained=PATH (a thinkfast folder, published student, "
                              "Llama-family folder, .gguf file or hub id)")
        _refuse_unknown_args(kwargs)
        slots, seed = _int_arg("slots", slots, 1), _int_arg("seed", seed, 0)
        if isinstance(pretrained, str):
            if str(dtype) not in DTYPES:
                raise ConfigError(f"dtype={dtype}: use one of {', '.join(DTYPES)}")
            dev = device or "cuda"
            if str(dev).startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's command line passes device=cuda:0 unless told otherwise; its hf model then runs on the
                # CPU, and so does this one
                if device:
                    log.warning("thinkfast lm-eval: device=%s, but there is no CUDA device here; running on the CPU", device)
                dev = "cpu"
            model, tok = load_thinkfast(pretrained, dtype=DTYPES[str(dtype)], device=dev, where="pretrained",
                                        trust_remote_code=bool(trust_remote_code))
            if tok is None:
                raise ConfigError(f"pretrained={pretrained}: no tokenizer beside the weights; save one there "
                                  "(thinkfast convert SOURCE --out DIR --tokenizer TEACHER)")
            kwargs.setdefault("tokenizer", tok)
        else:  # a model object, as lm-eval's Python API allows
            model = pretrained
        kwargs.setdefault("backend", "causal")  # thinkfast's config is not in transformers' causal-LM name list
        super().__init__(pretrained=model, **kwargs)
        self.engine = Engine(model, self.tokenizer, batch_size=slots, ssm_state_dtype=ssm_state_dtype)
        self.seed = seed

    def _sampling_defaults(self) -> dict:
        """The sampling settings of the model's generation_config, which `generate()` applies when a task samples."""
        config = getattr(self.model, "generation_config", None)
        return {k: getattr(config, k, None) for k in SAMPLING_KEYS}

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, tuple[dict, list[int]]] = {}  # one engine run per generation setting
        for i, req in enumerate(requests):
            gen_kwargs = req.args[1]
            key = json.dumps(gen_kwargs, sort_keys=True, default=str)
            groups.setdefault(key, (gen_kwargs, []))[1].append(i)
        runs = []  # every setting checked before any answer is generated
        for gen_kwargs, members in groups.values():
            params = sampling_params(gen_kwargs, self.max_gen_toks, self._sampling_defaults())
            if self.max_length - params.max_new_tokens < 1:
                raise ConfigError(f"max_gen_toks={params.max_new_tokens} leaves no room for a prompt in the model's "
                                  f"{self.max_length} positions; lower it or raise max_length")
            runs.append((params, members))
        texts: list[str | None] = [None] * len(requests)
        think_end = getattr(self, "think_end_token", None)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                   desc="Running generate_until requests (thinkfast engine)")
        for params, members in runs:
            room = self.max_length - params.max_new_tokens
            prompts = [(str(i), self.tok_encode(requests[i].args[0])[-room:]) for i in members]
            for c in self.engine.generate(prompts, n=1, params=params, seed=self.seed):
                i = int(c.problem_id)
                tokens = c.tokens[:-1] if c.finish_reason == "eos" else c.tokens
                if isinstance(think_end, int) and think_end in tokens:
                    tokens = tokens[len(tokens) - tokens[::-1].index(think_end):]
                text = self.tok_decode(tokens)
                if isinstance(think_end, str):
                    text = text.split(think_end)[-1]
                if think_end is not None:  # as HFLM: the answer after the thinking, without its leading space
                    text = text.lstrip()
                for s in params.stop:  # the engine stops at the first stop string; the answer ends before it
                    text = text.split(s)[0]
                texts[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(1)
        bar.close()
        return texts


def run_cli(argv: list[str]) -> int:
    """lm-eval's own command line, with thinkfast imported (so `--model hf` reads thinkfast folders too) and the
    `thinkfast` model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except ThinkfastError as e:
        print(f"thinkfast lm-eval: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # lm-eval's own word for bad input (an unknown task, no --tasks): one line too
        if not _raised_in_lm_eval(e):
            raise
        print(f"thinkfast lm-eval: error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}",
              file=sys.stderr)
        return 2
    return 0


def _raised_in_lm_eval(e: BaseException) -> bool:
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith("lm_eval")
