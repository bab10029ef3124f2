"""`thinkfast bench`: decode throughput of the teacher and its students in this engine, and of HF `generate()`.

Models are random-weight stand-ins of a preset's shapes (speed does not depend on the weights): the teacher
(all attention), its Llamba student (no attention) and its hybrid (attention in a quarter of the layers), built
from the teacher with `from_teacher`. For each (batch size, prompt length, generated length): tokens/s, seconds
per sample, peak memory, and the roofline: the bytes one decode step must move (weights + the decode state it
reads and writes) over the measured copy bandwidth. Every row runs in a fresh subprocess by default, so peak
memory is that row's own. Engine rows are greedy with EOS ignored (exactly gen_len tokens per sample); the HF
rows use `generate()` with its own KV cache on the same teacher weights, also greedy, also gen_len tokens.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError, ThinkfastError

ROLES = {"teacher": "teacher", "llamba": "llamba", "hybrid": "hybrid", "teacher-hf": "teacher"}


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
    """The thinkfast model (or, for teacher-hf, the transformers Llama) of one bench row, random weights."""
    from ..models import ModelConfig, ThinkfastConfig, ThinkfastForCausalLM, from_teacher

    torch.manual_seed(seed)
    cfg = ModelConfig(**dict(preset.teacher, attn_layers=list(range(preset.teacher["n_layers"]))))
    with torch.device(device):
        teacher = ThinkfastForCausalLM(ThinkfastConfig.from_model_config(cfg)).to(dtype).eval()
    if which == "teacher":
        return teacher
    if which == "teacher-hf":
        return to_hf_llama(teacher)
    student = from_teacher(teacher, kind=which)
    del teacher
    return student.to(device=device, dtype=dtype).eval()


def to_hf_llama(model):
    """transformers LlamaForCausalLM with the weights of an all-attention thinkfast model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.lm.cfg
    rope = dict(c.rope_params or {"rope_type": "default"}, rope_theta=c.rope_theta)
    hf_cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_mlp, num_hidden_layers=c.n_layers,
                         num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.hd, rms_norm_eps=c.rms_norm_eps,
                         max_position_embeddings=c.max_position_embeddings, rope_parameters=rope, tie_word_embeddings=c.tie_embeddings,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    p = model.lm.embed.weight
    with torch.device(p.device):
        hf = LlamaForCausalLM(hf_cfg).to(p.dtype).eval()
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


def step_bytes(lm, batch: int, avg_context: float) -> float:
    """Bytes one decode step must move: every weight once, plus each row's decode state (KV read over the
    context and the new entry written; SSM and conv state read and written)."""
    cfg = lm.cfg
    weights = sum(p.numel() * p.element_size() for p in lm.parameters())
    if not cfg.tie_embeddings:  # embedding rows are gathered, not streamed
        weights -= lm.embed.weight.numel() * lm.embed.weight.element_size()
    es = lm.embed.weight.element_size()
    per_row = 0.0
    for i in range(cfg.n_layers):
        if cfg.is_attention(i):
            per_row += 2 * cfg.n_kv_heads * cfg.hd * es * (avg_context + 1)
        else:
            m = lm.layers[i].mixer
            per_row += 2 * (m.H * m.P * m.N * 4 + m.conv_dim * (cfg.d_conv - 1) * es)
    return weights + batch * per_row


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_row(preset_name: str, which: str, batch: int, prompt_len: int, gen_len: int, device="cpu", dtype="float32",
            compile="auto", seed: int = 0, repeats: int = 1) -> dict:
    """Measure one row in this process (the fastest of `repeats` runs). Peak memory is the growth over the
    loaded model (CPU: peak RSS); state_bytes is the engine's static decode state (KV cache / SSM state)."""
    from ..utils import parse_dtype
    from .engine import Engine
    from .sampling import SamplingParams

    preset = PRESETS[preset_name]
    device = torch.device(device)
    dt = parse_dtype(dtype, device)
    model = build_models(preset, which, device, dt, seed)
    g = torch.Generator().manual_seed(seed + 1)
    vocab = preset.teacher["vocab_size"]
    prompts = torch.randint(0, vocab, (batch, prompt_len), generator=g)
    row = {"model": which, "role": ROLES[which], "engine": "hf" if which == "teacher-hf" else "thinkfast", "batch_size": batch,
           "prompt_len": prompt_len, "gen_len": gen_len}
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _rss_bytes()
    try:
        if which == "teacher-hf":
            from transformers import GenerationConfig

            gc = GenerationConfig(max_new_tokens=gen_len, do_sample=False, eos_token_id=None, pad_token_id=None)
            x = prompts.to(device)
            mask = torch.ones_like(x)

            def run(n_tokens):
                with torch.inference_mode():
                    gc.max_new_tokens = n_tokens
                    out = model.generate(input_ids=x, attention_mask=mask, generation_config=gc)
                assert out.shape[1] == prompt_len + n_tokens
        else:
            engine = Engine(model, None, max_len=prompt_len + gen_len, batch_size=batch, device=device, dtype=dt, stop_ids=[], compile=compile)
            items = [(str(i), prompts[i].tolist()) for i in range(batch)]

            def run(n_tokens):
                params = SamplingParams(temperature=0.0, max_new_tokens=n_tokens, ignore_eos=True)
                done = list(engine.generate(items, n=1, params=params))
                assert all(c.gen_tokens == n_tokens for c in done) and len(done) == batch

        run(min(16, gen_len))  # warm-up: lazy inits, compilation, graphs
        wall, cpu = float("inf"), float("inf")
        for _ in range(max(1, repeats)):
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            run(gen_len)
            _sync(device)
            wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    except (torch.OutOfMemoryError, MemoryError) as e:
        row.update(tokens_per_s=None, seconds_per_sample=None, peak_mem_bytes=None, error=f"out of memory ({str(e).splitlines()[0][:80]})")
        return row
    except ThinkfastError as e:  # e.g. the decode state does not fit: a row of the table, not the end of the bench
        row.update(tokens_per_s=None, seconds_per_sample=None, peak_mem_bytes=None, error=str(e)[:200])
        return row
    peak = (torch.cuda.max_memory_allocated(device) if cuda else _peak_rss_bytes()) - base
    lm = model.lm if hasattr(model, "lm") else build_models(preset, "teacher", "meta", dt).lm
    bw = copy_bandwidth(device)
    roof = batch / (step_bytes(lm, batch, prompt_len + gen_len / 2) / bw)
    tps = batch * gen_len / wall
    state_bytes = engine.state.nbytes() if which != "teacher-hf" else None
    row.update(tokens_per_s=round(tps, 1), seconds_per_sample=round(wall / batch, 6), peak_mem_bytes=int(max(peak, 0)),
               state_bytes=state_bytes, roofline_tokens_per_s=round(roof, 1), roofline_fraction=round(tps / roof, 3),
               cpu_seconds=round(cpu, 3), wall_seconds=round(wall, 3))
    return row


# ---------------------------------------------------------------------------------------------- the table


def run_bench(preset_name: str = "tiny", configs=None, models=None, device=None, dtype="auto", compile="auto",
              isolate: bool = True, threads: int | None = None, repeats: int = 1, log=print) -> list[dict]:
    if preset_name not in PRESETS:
        raise ConfigError(f"--preset {preset_name!r}: use one of {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if preset_name == "llama-1b" and torch.device(device).type == "cpu" and not configs:
        raise ConfigError("--preset llama-1b is sized for a GPU (hours on a CPU); run it on a GPU, or pass small --configs")
    configs = configs or preset.configs
    models = models or preset.models
    bad = [m for m in models if m not in ROLES]
    if bad:
        raise ConfigError(f"--models {bad[0]!r}: use some of {', '.join(ROLES)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for batch, prompt_len, gen_len in configs:
        for which in models:
            if which == "teacher-hf" and preset.hf_max_batch and batch > preset.hf_max_batch:
                continue
            args = dict(preset_name=preset_name, which=which, batch=batch, prompt_len=prompt_len, gen_len=gen_len,
                        device=str(device), dtype=dtype, compile=compile, repeats=repeats)
            log(f"bench: {which} batch {batch} prompt {prompt_len} gen {gen_len} ...")
            row = _run_isolated(args, threads) if isolate else run_row(**args)
            rows.append(row)
            if row.get("tokens_per_s") is not None:
                log(f"  {row['tokens_per_s']:,.0f} tok/s, {row['seconds_per_sample']:.3f} s/sample, peak {row['peak_mem_bytes'] / 2**20:.1f} MiB")
            else:
                log(f"  {row.get('error')}")
    return rows


def _run_isolated(args: dict, threads: int | None) -> dict:
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
    return {"model": which, "role": ROLES[which], "engine": "hf" if which == "teacher-hf" else "thinkfast",
            "batch_size": args["batch"], "prompt_len": args["prompt_len"], "gen_len": args["gen_len"],
            "tokens_per_s": None, "seconds_per_sample": None, "peak_mem_bytes": None, "error": err[:200]}


def ratios(rows: list[dict]) -> list[str]:
    """Plain-language comparisons measured in this run (same machine, same settings)."""
    out = []
    by = {(r["model"], r["batch_size"], r["prompt_len"], r["gen_len"]): r for r in rows if r.get("tokens_per_s")}
    for (model, b, p, g), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][3], kv[0][0])):
        t = by.get(("teacher", b, p, g))
        if t is None or model == "teacher":
            continue
        hf = model == "teacher-hf"
        name = "teacher in thinkfast / HF generate" if hf else f"{model} / teacher"
        x = t["tokens_per_s"] / r["tokens_per_s"] if hf else r["tokens_per_s"] / t["tokens_per_s"]
        line = f"batch {b}, prompt {p}, gen {g}: {name} tokens/s = {x:.2f}x"
        if t.get("cpu_seconds") and r.get("cpu_seconds"):  # same work: the ratio of CPU seconds, robust to a busy machine
            y = r["cpu_seconds"] / t["cpu_seconds"] if hf else t["cpu_seconds"] / r["cpu_seconds"]
            line += f" (by process CPU time {y:.2f}x)"
        out.append(line)
    return out


def markdown(rows: list[dict], preset_name: str, hardware: str, command: str) -> str:
    lines = [
        f"# `thinkfast bench --preset {preset_name}`",
        "",
        f"- hardware: {hardware}",
        f"- date: {datetime.date.today().isoformat()}, torch {torch.__version__}",
        f"- command: `{command}`",
        f"- {PRESETS[preset_name].note}",
        "- random weights; greedy, EOS ignored, exactly `gen` tokens per sample; tokens/s = batch x gen / wall (prefill included)",
        "- decode state: the engine's static per-slot state (KV cache, SSM + conv state) for the batch",
        "- peak mem: growth over the loaded model, prefill transients included (GPU: allocated; CPU: peak RSS of the row's own process)",
        "- roofline: batch / (bytes one decode step must move at the mean context / measured copy bandwidth)",
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
            f"{r['tokens_per_s']:,.0f} | {r['seconds_per_sample']:.3f} | {state} | {r['peak_mem_bytes'] / 2**20:,.1f} | {roof_cells} |"
        )
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
