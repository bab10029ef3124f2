"""`thinkfast bench`: decode throughput of the teacher and its students in this engine, and of HF `generate()`.

By default the models are random-weight stand-ins of a preset's shapes (speed does not depend on the weights):
the teacher (all attention), its Llamba student (no attention) and its hybrid (attention in a quarter of the
layers), built from the teacher with `from_teacher`. With checkpoints (`--model`, repeatable) the rows time those
instead, loaded as `thinkfast sample` loads them; the preset then only supplies the default configs. For each
(batch size, prompt length, generated length): tokens/s, seconds per sample, peak memory, and the roofline: the
bytes one decode step must move (weights + the decode state it reads and writes) over the measured copy
bandwidth. Every row runs in a fresh subprocess by default, so peak memory is that row's own. Engine rows are
greedy with EOS ignored (exactly gen_len tokens per sample, whatever the weights would stop at); prompts are
random token ids of the model's vocabulary (the same for every model of a vocabulary: the cost of a step does not
depend on which tokens it sees). The HF rows use `generate()` with its own KV cache on the same teacher weights,
also greedy, also gen_len tokens.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

from ..errors import CheckpointError, ConfigError, ThinkfastError
from .engine import parse_ssm_state_dtype

ROLES = {"teacher": "teacher", "llamba": "llamba", "hybrid": "hybrid", "teacher-hf": "teacher", "llamba-hf": "llamba",
         "hybrid-hf": "hybrid"}
STUDENT_HF_MODELS = ["llamba-hf", "hybrid-hf"]  # the preset's students through HF generate() (`--hf-students`)


@dataclass
class Preset:
    teacher: dict  # ModelConfig fields of the all-attention teacher
    configs: list[tuple[int, int, int]]  # (batch size, prompt length, generated length)
    models: list[str] = field(default_factory=lambda: ["teacher", "llamba", "hybrid", "teacher-hf"])
    note: str = ""
    hf_max_batch: int | None = None  # HF generate() rows above this batch size are skipped (too slow or too big)


PRESETS = {
    # the demo's embedded teacher: byte-level vocabulary (256 bytes + 4 specials), prompts ~80 tokens
    "tiny": Preset(
        teacher=dict(vocab_size=260, d_model=192, n_layers=4, n_heads=6, n_kv_heads=3, d_mlp=512, max_position_embeddings=4096),
        configs=[(64, 80, 1024), (64, 80, 256), (1, 80, 1024)],
        note="CPU target: at batch 64 and 1024 generated tokens, llamba >= 2x teacher tokens/s and teacher >= 3x HF generate",
    ),
    # Llama-3.2-1B's shape with random weights
    "llama-1b": Preset(
        teacher=dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_mlp=8192, head_dim=64,
                     rope_theta=500000.0, tie_embeddings=True, max_position_embeddings=131072,
                     rope_params={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192}),
        configs=[(64, 128, 2048), (256, 128, 2048), (1024, 128, 2048), (2048, 128, 2048)],
        note="GPU target: 128-token prompts, 2048 generated, each model at its best batch size: llamba >= 3x teacher, >= 15x HF",
        hf_max_batch=256,
    ),
}


# ---------------------------------------------------------------------------------------------- models


def build_models(preset: Preset, which: str, device, dtype, seed: int = 0):
    """The thinkfast model of one bench row (teacher, llamba or hybrid), random weights; an HF row converts the
    teacher itself (`to_hf_llama`) or runs a student's own generate()."""
    from ..models import ModelConfig, ThinkfastConfig, ThinkfastForCausalLM, from_teacher

    torch.manual_seed(seed)
    cfg = ModelConfig(**dict(preset.teacher, attn_layers=list(range(preset.teacher["n_layers"]))))
    with torch.device(device):
        teacher = ThinkfastForCausalLM(ThinkfastConfig.from_model_config(cfg)).to(dtype).eval()
    if which == "teacher":
        return teacher
    student = from_teacher(teacher, kind=which)
    del teacher
    return student.to(device=device, dtype=dtype).eval()


def to_hf_llama(model):
    """transformers LlamaForCausalLM with the weights of an all-attention thinkfast model (Qwen2ForCausalLM when
    its q, k, v have biases, Qwen3ForCausalLM when q and k are normalised: their only differences from Llama)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    c = model.lm.cfg
    rope = dict(c.rope_params or {"rope_type": "default"}, rope_theta=c.rope_theta)
    config_class, model_class = ((Qwen3Config, Qwen3ForCausalLM) if c.qk_norm else (Qwen2Config, Qwen2ForCausalLM)
                                 if c.qkv_bias else (LlamaConfig, LlamaForCausalLM))
    hf_cfg = config_class(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_mlp, num_hidden_layers=c.n_layers,
                          num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.hd, rms_norm_eps=c.rms_norm_eps,
                          max_position_embeddings=c.max_position_embeddings, rope_parameters=rope, tie_word_embeddings=c.tie_embeddings,
                          bos_token_id=None, eos_token_id=None, pad_token_id=None)
    p = model.lm.embed.weight
    with torch.device(p.device):
        hf = model_class(hf_cfg).to(p.dtype).eval()
    rename = {"input_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "mixer": "self_attn"}
    sd = {}
    for name, t in model.lm.state_dict().items():
        if name == "lm_head.weight":
            sd[name] = t
            continue
        parts = [rename.get(x, x) for x in name.split(".")]
        if parts[0] == "embed":
            parts[0] = "embed_tokens"
        sd["model." + ".".join(parts)] = t
    if c.tie_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise RuntimeError(f"to_hf_llama: missing {missing}, unexpected {unexpected}")
    return hf


@dataclass
class Checkpoint:
    """A `--model` of the bench, as its config describes it (read before any row loads the weights)."""
    path: str
    name: str
    role: str  # teacher | llamba | hybrid
    max_positions: int


def probe_checkpoint(spec: str, name: str | None = None) -> Checkpoint:
    """Role and positions of anything `load_thinkfast` reads (thinkfast folder of any role, published student,
    HF Llama-family folder, .gguf file, hub id) from its config alone, refusing in one line what that loader would refuse."""
    from transformers import AutoConfig

    from ..models.published import published_shape
    from ..models.teacher import checkpoint_source, model_config_from_hf, published_source
    from .run import default_model_name

    spec = str(spec)
    where = f"--model {spec}"
    published = published_source(spec, "--model")
    if published is not None:  # Cartesia's Llamba, MambaInLlama: configs of their own
        role, positions = published_shape(*published, where)
        return Checkpoint(path=spec, name=name or default_model_name(spec), role=role, max_positions=positions)
    source, kwargs = checkpoint_source(spec, "--model")
    try:
        cfg = AutoConfig.from_pretrained(source, **kwargs)
    except Exception as e:  # unreadable config, gguf parse errors, a hub id without network
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{where}: could not read its config ({first}); check the path or hub id") from None
    if cfg.model_type == "thinkfast":
        role, positions = cfg.role, cfg.max_position_embeddings
    else:
        role, positions = "teacher", model_config_from_hf(cfg, where=where).max_position_embeddings
    return Checkpoint(path=spec, name=name or default_model_name(spec), role=role, max_positions=int(positions))


# ---------------------------------------------------------------------------------------------- measuring


def copy_bandwidth(device, nbytes: int = 256 * 2**20) -> float:
    """Bytes/s of a large device-memory copy (read + write counted)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def step_bytes(lm, batch: int, avg_context: float, ssm_dtype: torch.dtype = torch.float32) -> float:
    """Bytes one decode step must move: every weight once, plus each row's decode state (KV read over the
    context and the new entry written; SSM and conv state read and written)."""
    cfg = lm.cfg
    weights = sum(p.numel() * p.element_size() for p in lm.parameters())
    if not cfg.tie_embeddings:  # embedding rows are gathered, not streamed
        weights -= lm.embed.weight.numel() * lm.embed.weight.element_size()
    es = lm.embed.weight.element_size()
    ssm_es = torch.empty((), dtype=ssm_dtype).element_size()
    per_row = 0.0
    for i in range(cfg.n_layers):
        if cfg.is_attention(i):
            per_row += 2 * cfg.n_kv_heads * cfg.hd * es * (avg_context + 1)
        else:
            m = lm.layers[i].mixer
            per_row += 2 * (m.H * m.P * m.N * ssm_es + m.conv_dim * (cfg.d_conv - 1) * es)
    return weights + batch * per_row


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int | None:
    """This process's resident memory now: from /proc on Linux, psutil elsewhere (macOS; it comes with
    accelerate); None where neither can say."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        pass
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except Exception:  # noqa: BLE001  no psutil, or it cannot read this process either: not measured
        return None


def _reset_peak_rss() -> bool:
    """Start the high-water mark again (Linux), so loading or building the model is not in the row's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes(since_reset: bool) -> int | None:
    """The resident high-water mark: since `_reset_peak_rss` (Linux), else the whole process's (getrusage);
    None where neither exists (Windows)."""
    if since_reset:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes; Linux and the BSDs KiB


def _cpu_row_peak(base: int | None, since_reset: bool, peak_before: int | None) -> tuple[int | None, str | None]:
    """(the row's peak growth over `base`, None) or (None, why it was not measured). Where the high-water mark
    cannot be restarted (macOS), it is the row's own only if the row raised it above `peak_before`: else loading
    set it, and subtracting would report loading's memory as the row's."""
    peak = _peak_rss_bytes(since_reset)
    if base is None or peak is None:
        return None, "resident memory cannot be read on this platform"
    if not since_reset and (peak_before is None or peak <= peak_before):
        return None, "the row stayed under the peak set while loading, which this platform cannot restart"
    return max(peak - base, 0), None


def _mib(n: int | None) -> str:
    return "n/m" if n is None else f"{n / 2**20:,.1f}"


def _make_resident(model) -> None:
    """Read every weight once. A checkpoint's tensors can be pages of its memory-mapped safetensors file that load
    only when first read (a 135M-parameter student: 542 MiB), which would then count as the row's own memory."""
    with torch.no_grad():
        for t in itertools.chain(model.parameters(), model.buffers()):
            t.sum()


def state_row_name(which: str, ssm_dtype: torch.dtype) -> str:
    return which if ssm_dtype == torch.float32 else f"{which} ({str(ssm_dtype).removeprefix('torch.')} state)"


def _row_head(which: str, role: str | None, engine: str, path: str | None, batch: int, prompt_len: int, gen_len: int) -> dict:
    return {"model": which, "role": role, "engine": engine, "path": path, "batch_size": batch, "prompt_len": prompt_len,
            "gen_len": gen_len}


def _failed(row: dict, error: str) -> dict:
    row.update(tokens_per_s=None, seconds_per_sample=None, peak_mem_bytes=None, error=error[:200])
    return row


def _thinkfast_model(preset_name: str, which: str, path: str | None, device, dtype, seed: int):
    """The row's thinkfast model: a checkpoint loaded as `thinkfast sample` loads it, or a preset's random one."""
    if path is not None:
        from ..models.teacher import load_thinkfast

        model, _ = load_thinkfast(path, dtype=dtype, device=device, where="--model")
        return model.eval()
    return build_models(PRESETS[preset_name], which.removesuffix("-hf"), device, dtype, seed)


def run_row(preset_name: str, which: str, batch: int, prompt_len: int, gen_len: int, device="cpu", dtype="float32",
            compile="auto", seed: int = 0, repeats: int = 1, path: str | None = None, engine: str | None = None,
            ssm_state_dtype: str = "float32") -> dict:
    """Measure one row in this process (the fastest of `repeats` runs). Peak memory is the growth over the
    loaded model (CPU: peak RSS); state_bytes is the engine's static decode state (KV cache / SSM state).

    Without `path`, `which` is a preset model (teacher, llamba, hybrid, teacher-hf) with random weights. With
    `path` (a checkpoint), `which` is the row's name and `engine` says what runs it: thinkfast or hf (generate()).
    A row whose SSM state is not fp32 is named "WHICH (DTYPE state)"."""
    from ..utils import parse_dtype
    from .engine import DecodeStateTooLarge, Engine, model_role
    from .sampling import SamplingParams

    engine = engine or ("hf" if which.endswith("-hf") else "thinkfast")
    device = torch.device(device)
    dt = parse_dtype(dtype, device)
    ssm_dt = parse_ssm_state_dtype(ssm_state_dtype)
    row = _row_head(state_row_name(which, ssm_dt), ROLES.get(which) if path is None else None, engine, path, batch,
                    prompt_len, gen_len)
    row["ssm_state_dtype"] = str(ssm_dt).removeprefix("torch.")
    try:
        model = _thinkfast_model(preset_name, which, path, device, dt, seed)
    except ThinkfastError as e:  # e.g. weights the config promised but that do not load: bad input, not a measurement
        return dict(_failed(row, str(e)), load_failed=True)
    except (torch.OutOfMemoryError, MemoryError) as e:
        return _failed(row, f"out of memory loading the model ({str(e).splitlines()[0][:80]})")
    lm = model.lm
    row["role"] = model_role(lm)
    bytes_per_step = step_bytes(lm, batch, prompt_len + gen_len / 2, ssm_dt)
    vocab = lm.cfg.vocab_size
    del lm
    if engine == "hf" and row["role"] == "teacher":
        model = to_hf_llama(model)  # the thinkfast copy is freed here, before the memory baseline
    # a student's HF row runs its own generate(): transformers' loop over the model's cached recurrent step
    g = torch.Generator().manual_seed(seed + 1)
    prompts = torch.randint(0, vocab, (batch, prompt_len), generator=g)
    cuda = device.type == "cuda"
    reset = False
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        _make_resident(model)
        reset = _reset_peak_rss()
        base = _rss_bytes()
        peak_before = None if reset else _peak_rss_bytes(False)
    try:
        if engine == "hf":
            from transformers import GenerationConfig

            gc = GenerationConfig(max_new_tokens=gen_len, do_sample=False, eos_token_id=None, pad_token_id=None)
            model.generation_config.eos_token_id = None  # else generate() takes the checkpoint's EOS back
            x = prompts.to(device)
            mask = torch.ones_like(x)

            def run(n_tokens):
                with torch.inference_mode():
                    gc.max_new_tokens = n_tokens
                    out = model.generate(input_ids=x, attention_mask=mask, generation_config=gc)
                return out[:, prompt_len:].numel()
        else:
            eng = Engine(model, None, max_len=prompt_len + gen_len, batch_size=batch, device=device, dtype=dt, stop_ids=[],
                         compile=compile, ssm_state_dtype=ssm_dt)
            items = [(str(i), prompts[i].tolist()) for i in range(batch)]

            def run(n_tokens):
                params = SamplingParams(temperature=0.0, max_new_tokens=n_tokens, ignore_eos=True)
                return sum(c.gen_tokens for c in eng.generate(items, n=1, params=params))

        run(min(16, gen_len))  # warm-up: lazy inits, compilation, graphs
        wall, cpu = float("inf"), float("inf")
        for _ in range(max(1, repeats)):
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            generated = run(gen_len)
            _sync(device)
            wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    except (torch.OutOfMemoryError, MemoryError) as e:
        return _failed(row, f"out of memory ({str(e).splitlines()[0][:80]})")
    except DecodeStateTooLarge as e:  # a row of the table, not the end of the bench; its advice in bench's terms
        return _failed(row, f"{e.problem}; use a BATCH of {e.fit} or a shorter GEN in --configs")
    except ThinkfastError as e:
        return _failed(row, str(e))
    if generated != batch * gen_len:  # tokens/s counts batch x gen: a row that stopped early would be flattered
        return _failed(row, f"generated {generated} tokens, not batch x gen = {batch * gen_len}")
    if cuda:
        peak, unmeasured = max(torch.cuda.max_memory_allocated(device) - base, 0), None
    else:
        peak, unmeasured = _cpu_row_peak(base, reset, peak_before)
    bw = copy_bandwidth(device)
    roof = batch / (bytes_per_step / bw)
    tps = batch * gen_len / wall
    state_bytes = eng.state.nbytes() if engine == "thinkfast" else None
    if engine == "thinkfast":  # what the step really ran with: a failed graph capture falls back to eager steps
        step = getattr(eng._step, "step", eng._step)  # a compiled or graph step wraps the DecodeStep
        row.update(cuda_graphs=eng.use_graphs, compiled=eng.use_compile, onednn_products=step.onednn_products())
    row.update(tokens_per_s=round(tps, 1), seconds_per_sample=round(wall / batch, 6), generated_tokens=generated, peak_mem_bytes=peak,
               state_bytes=state_bytes, roofline_tokens_per_s=round(roof, 1), roofline_fraction=round(tps / roof, 3),
               cpu_seconds=round(cpu, 3), wall_seconds=round(wall, 3))
    if unmeasured:
        row["peak_mem_unmeasured"] = unmeasured
    return row


# ---------------------------------------------------------------------------------------------- the table


def resolve_checkpoints(checkpoints, hf: bool = True, hf_students: bool = False) -> list[Checkpoint]:
    """Probe every (path, name or None) and refuse two rows under one name (an HF row is NAME-hf)."""
    probed = [probe_checkpoint(path, name) for path, name in checkpoints]
    seen: dict[str, str] = {}
    for c in probed:
        names = [c.name] + ([f"{c.name}-hf"] if hf and (c.role == "teacher" or hf_students) else [])
        for n in names:
            if n in seen:
                raise ConfigError(f"--model {c.path} and --model {seen[n]} both give rows named {n!r}; name one of them "
                                  f"with --name after its --model")
            seen[n] = c.path
    return probed


def run_bench(preset_name: str = "tiny", configs=None, models=None, device=None, dtype="auto", compile="auto",
              isolate: bool = True, threads: int | None = None, repeats: int = 1, log=print, checkpoints=None,
              hf: bool = True, rounds: int = 1, ssm_state_dtypes=("float32",), hf_students: bool = False) -> list[dict]:
    """Time every (config, model) row. `checkpoints`: [(path, name or None), ...] to time instead of the preset's
    random-weight models (the preset then only supplies the default configs); each teacher-role checkpoint also
    gets an HF generate() row named NAME-hf unless `hf` is False; with `hf_students`, each student too (the preset's
    llamba-hf and hybrid-hf rows). Every input is checked before the first row.
    `rounds`: passes over all the rows, each row keeping its fastest: the models alternate, so a drift in the
    machine's speed reaches each of them (`repeats` times a row again and again within its own pass).
    `ssm_state_dtypes`: each model with Mamba layers gets a row per SSM state dtype (all-attention ones, one row)."""
    if not ssm_state_dtypes:
        raise ConfigError("--ssm-state-dtype: name at least one dtype")
    for d in ssm_state_dtypes:
        parse_ssm_state_dtype(d)
    if rounds < 1:
        raise ConfigError(f"--rounds {rounds}: pass over the rows at least once")
    if preset_name not in PRESETS:
        raise ConfigError(f"--preset {preset_name!r}: use one of {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if preset_name == "llama-1b" and torch.device(device).type == "cpu" and not configs:
        raise ConfigError("--preset llama-1b is sized for a GPU (hours on a CPU); run it on a GPU, or pass small --configs")
    configs = configs or preset.configs
    # (row name, role, path, engine, positions the model holds)
    if checkpoints:
        if models:
            raise ConfigError("--models picks among the preset's random-weight models; with --model, the checkpoints are the rows")
        jobs = []
        for c in resolve_checkpoints(checkpoints, hf, hf_students):
            jobs.append((c.name, c.role, c.path, "thinkfast", c.max_positions))
            if hf and (c.role == "teacher" or hf_students):
                jobs.append((f"{c.name}-hf", "teacher", c.path, "hf", c.max_positions))
    else:
        models = models or preset.models + (STUDENT_HF_MODELS if hf_students and hf else [])
        bad = [m for m in models if m not in ROLES]
        if bad:
            raise ConfigError(f"--models {bad[0]!r}: use some of {', '.join(ROLES)}")
        twice = next((m for m in models if models.count(m) > 1), None)
        if twice is not None:  # two rows of one name, and a ratio of a model to itself
            raise ConfigError(f"--models names {twice} twice; name each model once (--rounds or --repeats time it again)")
        if not hf and any(m.endswith("-hf") for m in models):
            raise ConfigError(f"--models {next(m for m in models if m.endswith('-hf'))} is an HF generate() row, and "
                              "--no-hf drops those; drop one of them")
        positions = preset.teacher["max_position_embeddings"]
        jobs = [(m, ROLES[m], None, "hf" if m.endswith("-hf") else "thinkfast", positions) for m in models
                if hf or not m.endswith("-hf")]
    for batch, prompt_len, gen_len in configs:  # the engine would silently stop short of gen_len
        for which, _, path, _, positions in jobs:
            if prompt_len + gen_len > positions:
                model = f"--model {path}" if path else f"--preset {preset_name}"
                raise ConfigError(f"--configs {batch}x{prompt_len}x{gen_len}: {prompt_len + gen_len} positions, but {model} "
                                  f"holds {positions} (max_position_embeddings); use a shorter prompt or gen")
    planned, over_hf_batch = [], []
    for batch, prompt_len, gen_len in configs:
        for which, role, path, engine, _ in jobs:
            if engine == "hf" and preset.hf_max_batch and batch > preset.hf_max_batch:
                over_hf_batch.append(f"{which} at batch {batch}")
                continue
            # a teacher has no SSM state; an HF generate() row runs the model's own fp32 state
            for state in ssm_state_dtypes if role != "teacher" and engine != "hf" else ["float32"]:
                args = dict(preset_name=preset_name, which=which, batch=batch, prompt_len=prompt_len, gen_len=gen_len,
                            device=str(device), dtype=dtype, compile=compile, repeats=repeats, ssm_state_dtype=state)
                if path is not None:
                    args.update(path=path, engine=engine)
                planned.append((args, role))
    if over_hf_batch:
        log(f"bench: skipped {', '.join(over_hf_batch)}: the {preset_name} preset times HF generate() up to batch "
            f"{preset.hf_max_batch}")
    if not planned:  # an empty table would replace the previous results
        why = (f"{', '.join(over_hf_batch)} is above the {preset_name} preset's HF batch limit ({preset.hf_max_batch})"
               if over_hf_batch else "no model and config make a row")
        raise ConfigError(f"no row to time: {why}; use a smaller BATCH in --configs, or other --models")
    rows: list[dict] = []
    for rnd in range(rounds):
        for i, (args, role) in enumerate(planned):
            which = state_row_name(args["which"], parse_ssm_state_dtype(args["ssm_state_dtype"]))
            log(f"bench: {which} batch {args['batch']} prompt {args['prompt_len']} gen {args['gen_len']}"
                + (f" (round {rnd + 1} of {rounds})" if rounds > 1 else "") + " ...")
            row = _run_isolated(args, threads, role) if isolate else run_row(**args)
            row["role"] = row.get("role") or role  # a checkpoint whose weights failed to load: its config's role
            if row.get("tokens_per_s") is not None:
                peak = (f"peak {_mib(row['peak_mem_bytes'])} MiB" if row["peak_mem_bytes"] is not None
                        else f"peak memory not measured: {row.get('peak_mem_unmeasured')}")
                log(f"  {row['tokens_per_s']:,.0f} tok/s, {row['seconds_per_sample']:.3f} s/sample, {peak}")
            else:
                log(f"  {row.get('error')}")
            if rounds > 1:
                row["rounds"] = rounds
            if rnd == 0:
                rows.append(row)
                row["round_tokens_per_s"] = [row.get("tokens_per_s")]
            else:
                every = rows[i]["round_tokens_per_s"] + [row.get("tokens_per_s")]  # the spread between rounds is the drift
                if rows[i].get("tokens_per_s") is not None and (
                        row.get("tokens_per_s") is None or row["wall_seconds"] < rows[i]["wall_seconds"]):
                    rows[i] = row  # the fastest round counts; a round that failed fails the row
                rows[i]["round_tokens_per_s"] = every
    return rows


def _run_isolated(args: dict, threads: int | None, role: str) -> dict:
    env = dict(os.environ)
    if threads:
        env["THINKFAST_BENCH_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "thinkfast.engine.bench", "--row", json.dumps(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    which = args["which"]
    engine = args.get("engine") or ("hf" if which.endswith("-hf") else "thinkfast")
    which = state_row_name(which, parse_ssm_state_dtype(args.get("ssm_state_dtype")))
    row = _row_head(which, role, engine, args.get("path"), args["batch"], args["prompt_len"], args["gen_len"])
    return _failed(row, err)


def ratios(rows: list[dict]) -> list[str]:
    """Plain-language comparisons measured in this run (same machine, same settings): each model against the
    first teacher-role row in this engine (else the first row), each HF row against its twin here, each student's
    HF row against the teacher's HF row, and each row with a lower-precision SSM state against the same model's
    fp32-state row."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("tokens_per_s"):
            groups.setdefault((r["batch_size"], r["prompt_len"], r["gen_len"]), []).append(r)
    for (b, p, g), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
        ours = [r for r in group if r["engine"] != "hf"]
        ref = next((r for r in ours if r["role"] == "teacher"), ours[0] if ours else None)
        hf_ref = next((r for r in group if r["engine"] == "hf" and r["role"] == "teacher"), None)
        by_name = {r["model"]: r for r in ours}
        pairs = []
        for r in sorted(group, key=lambda r: r["model"]):
            hf = r["engine"] == "hf"
            t = by_name.get(r["model"].removesuffix("-hf")) if hf else ref
            if t is not None and t is not r:
                pairs.append((r, t, hf))
            if hf and hf_ref is not None and r["role"] != "teacher":  # what a transformers user gains by the student
                pairs.append((r, hf_ref, False))
        for r in ours:
            state = r.get("ssm_state_dtype", "float32")
            base = by_name.get(r["model"].removesuffix(f" ({state} state)")) if state != "float32" else None
            if base is not None and base is not ref:  # against the reference row it is already there
                pairs.append((r, base, False))
        for r, t, hf in pairs:
            name = f"{t['model']} in thinkfast / HF generate" if hf else f"{r['model']} / {t['model']}"
            x = t["tokens_per_s"] / r["tokens_per_s"] if hf else r["tokens_per_s"] / t["tokens_per_s"]
            line = f"batch {b}, prompt {p}, gen {g}: {name} tokens/s = {x:.2f}x"
            if t.get("cpu_seconds") and r.get("cpu_seconds"):  # same work: the ratio of CPU seconds, robust to a busy machine
                y = r["cpu_seconds"] / t["cpu_seconds"] if hf else t["cpu_seconds"] / r["cpu_seconds"]
                line += f" (by process CPU time {y:.2f}x)"
            out.append(line)
    return out


def markdown(rows: list[dict], preset_name: str, hardware: str, command: str) -> str:
    checkpoints = {}  # name -> (path, role), each path once (a model's rows per SSM state dtype share it)
    for r in rows:
        if r.get("path") and r["engine"] != "hf" and r["path"] not in {p for p, _ in checkpoints.values()}:
            checkpoints[r["model"]] = (r["path"], r["role"])
    lines = [
        "# `thinkfast bench --model ...`: checkpoints side by side" if checkpoints else f"# `thinkfast bench --preset {preset_name}`",
        "",
        f"- hardware: {hardware}",
        f"- date: {datetime.date.today().isoformat()}, torch {torch.__version__}",
        f"- command: `{command}`",
    ]
    if checkpoints:
        lines += ["- models: " + "; ".join(f"{n} = `{p}` ({role})" for n, (p, role) in checkpoints.items()),
                  "- each checkpoint's own weights, loaded as `thinkfast sample` loads them; prompts: random token ids of its "
                  "vocabulary, the same for every model; greedy, EOS ignored, exactly `gen` tokens per sample; "
                  "tokens/s = batch x gen / wall (prefill included)"]
    else:
        lines += [f"- {PRESETS[preset_name].note}",
                  "- random weights; greedy, EOS ignored, exactly `gen` tokens per sample; tokens/s = batch x gen / wall (prefill included)"]
    rounds = max((r.get("rounds", 1) for r in rows), default=1)
    if rounds > 1:
        lines.append(f"- each row: its fastest of {rounds} rounds (passes over all the rows, the models alternating)")
    lines += [
        "- decode state: the engine's static per-slot state (KV cache, SSM + conv state) for the batch",
        "- peak mem: growth over the loaded model, prefill transients included (GPU: allocated; CPU: peak RSS of the row's own process)",
        "- roofline: batch / (bytes one decode step must move at the mean context / measured copy bandwidth)",
    ]
    unmeasured = sorted({r["peak_mem_unmeasured"] for r in rows if r.get("peak_mem_unmeasured")})
    if unmeasured:
        lines.append(f"- peak mem n/m: not measured ({'; '.join(unmeasured)})")
    lines += [
        "",
        "| model | role | engine | batch | prompt | gen | tokens/s | s/sample | decode state (MiB) | peak mem (MiB) | roofline tok/s | of roofline |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r.get("tokens_per_s") is None:
            lines.append(f"| {r['model']} | {r['role']} | {r['engine']} | {r['batch_size']} | {r['prompt_len']} | {r['gen_len']} | "
                         f"{r.get('error', 'failed')} | | | | | |")
            continue
        roof = r.get("roofline_tokens_per_s")
        roof_cells = f"{roof:,.0f} | {r['roofline_fraction']:.0%}" if roof else " | "
        state = f"{r['state_bytes'] / 2**20:,.1f}" if r.get("state_bytes") is not None else "(HF cache)"
        lines.append(
            f"| {r['model']} | {r['role']} | {r['engine']} | {r['batch_size']} | {r['prompt_len']} | {r['gen_len']} | "
            f"{r['tokens_per_s']:,.0f} | {r['seconds_per_sample']:.3f} | {state} | {_mib(r['peak_mem_bytes'])} | {roof_cells} |"
        )
    if rounds > 1:
        lines += ["", "Every round (tokens/s, in order):", ""] + [
            f"- {r['model']} batch {r['batch_size']} prompt {r['prompt_len']} gen {r['gen_len']}: "
            + ", ".join("failed" if t is None else f"{t:,.0f}" for t in r.get("round_tokens_per_s", []))
            for r in rows]
    rs = ratios(rows)
    if rs:
        lines += ["", "Ratios (this run):", ""] + [f"- {x}" for x in rs]
    return "\n".join(lines) + "\n"


def _main_row(argv=None) -> int:
    """Subprocess entry: measure one row, print it as one JSON line."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--row", required=True)
    a = ap.parse_args(argv)
    threads = os.environ.get("THINKFAST_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    row = run_row(**json.loads(a.row))
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main_row())
