"""Load a Llama-family teacher (Llama, Mistral, Qwen2, Qwen3): an HF checkpoint folder (config.json +
safetensors), a GGUF file, a hub id, or a thinkfast checkpoint whose layers are all attention (the embedded
teacher)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from .config import ModelConfig, rope_problem, split_rope_parameters

# model types whose layers thinkfast reproduces exactly: Llama's, and those that differ from it only in q, k, v
# biases (Qwen2), per-head q and k norms (Qwen3) or a sliding window (Mistral)
LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED = ("model_type 'llama', 'mistral', 'qwen2' or 'qwen3', e.g. Llama-3.2-1B-Instruct, SmolLM2, "
             "Qwen2.5-Math-1.5B-Instruct, Qwen3-1.7B")


def _rope_from_hf(hf_cfg, where: str) -> tuple[float, dict | None]:
    params = getattr(hf_cfg, "rope_parameters", None)  # transformers 5
    if params is None:  # transformers 4 style
        params = getattr(hf_cfg, "rope_scaling", None)
    problem = rope_problem(params)
    if problem:
        raise ConfigError(f"{where}: {problem}")
    return split_rope_parameters(params, getattr(hf_cfg, "rope_theta", 10000.0))


def model_config_from_hf(hf_cfg, where: str = "teacher") -> ModelConfig:
    """ModelConfig of an all-attention model equal to an HF Llama config; refuses what it cannot reproduce."""
    mt = getattr(hf_cfg, "model_type", None)
    if mt not in LLAMA_TYPES:
        raise ConfigError(
            f"{where}: model_type {mt!r} is not Llama-family; thinkfast distils Llama-architecture teachers ({SUPPORTED})"
        )
    for flag, what in (("attention_bias", "o_proj bias"), ("mlp_bias", "MLP biases")):
        if getattr(hf_cfg, flag, False):
            raise ConfigError(f"{where}: {flag}=True is not supported; thinkfast's layers have no {what} "
                              "(only Qwen2's q, k, v biases)")
    act = getattr(hf_cfg, "hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{where}: hidden_act={act!r}; Llama-family MLPs use 'silu'")
    theta, scaling = _rope_from_hf(hf_cfg, where)
    n_layers = hf_cfg.num_hidden_layers
    positions = hf_cfg.max_position_embeddings
    window = getattr(hf_cfg, "sliding_window", None)  # Mistral's, or Qwen2's / Qwen3's when use_sliding_window is on
    if window and window < positions:
        # thinkfast attends to every position, which equals a sliding window up to the window's length: so the
        # model's context stops there (the engine then refuses longer prompts and ends samples at it)
        positions = window
    return ModelConfig(
        vocab_size=hf_cfg.vocab_size,
        d_model=hf_cfg.hidden_size,
        n_layers=n_layers,
        n_heads=hf_cfg.num_attention_heads,
        n_kv_heads=getattr(hf_cfg, "num_key_value_heads", None) or hf_cfg.num_attention_heads,
        head_dim=getattr(hf_cfg, "head_dim", None),
        d_mlp=hf_cfg.intermediate_size,
        rms_norm_eps=hf_cfg.rms_norm_eps,
        rope_theta=theta,
        rope_params=scaling,
        max_position_embeddings=positions,
        tie_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", False)),
        qkv_bias=mt == "qwen2",
        qk_norm=mt == "qwen3",
        attn_layers=list(range(n_layers)),
    )


def state_dict_from_hf(hf_model) -> dict[str, torch.Tensor]:
    """HF Llama parameter names -> ThinkfastLM names (an all-attention model)."""
    rename = {
        "input_layernorm": "input_norm",
        "post_attention_layernorm": "mlp_norm",
        "self_attn": "mixer",
    }
    out = {}
    for name, tensor in hf_model.state_dict().items():
        if "rotary_emb" in name:
            continue
        if name == "lm_head.weight":
            if getattr(hf_model.config, "tie_word_embeddings", False):
                continue
            out["lm_head.weight"] = tensor
            continue
        parts = name.split(".")
        if parts[0] == "model":
            parts = parts[1:]
        parts = [rename.get(p, p) for p in parts]
        if parts[0] == "embed_tokens":
            parts[0] = "embed"
        out[".".join(parts)] = tensor
    return out


def _is_gguf(spec: str) -> bool:
    return spec.lower().endswith(".gguf")


def _read_config_json(folder: Path, role: str = "teacher") -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{role} {folder}: no config.json; point it at an HF checkpoint folder, a .gguf file or a hub id")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); re-download or re-save the checkpoint") from None


# where transformers' tokenizers find a chat template besides tokenizer_config.json's key (chat_template.json is
# a processor's, which a tokenizer does not read)
_TEMPLATE_FILE, _TEMPLATE_DIR = "chat_template.jinja", "additional_chat_templates"


def has_chat_template_files(spec: str | os.PathLike) -> bool:
    """Whether the tokenizer a model spec loads has a chat template, read from its files without loading it: the
    template decides a run's prompts, and so its samples file's configuration, before the model loads. A hub id
    whose tokenizer files are not cached counts as templated (the loader reads them later)."""
    spec = str(spec)
    path = Path(spec)
    if _is_gguf(spec):
        return path.is_file() and _gguf_has_key(path, "tokenizer.chat_template")
    if path.is_dir():
        def cached(name):
            return path / name if (path / name).is_file() else None
        if (path / _TEMPLATE_DIR).is_dir() and any((path / _TEMPLATE_DIR).glob("*.jinja")):
            return True
    else:
        from huggingface_hub import try_to_load_from_cache

        def cached(name):
            try:
                found = try_to_load_from_cache(spec, name)
            except ValueError:  # not a hub id: the loader says so in one line
                return None
            return Path(found) if isinstance(found, str) else None
        if cached("tokenizer_config.json") is None and cached(_TEMPLATE_FILE) is None:
            return True
    if cached(_TEMPLATE_FILE) is not None:
        return True
    config = cached("tokenizer_config.json")
    try:
        return bool(config and json.loads(config.read_text()).get("chat_template"))
    except (OSError, ValueError, AttributeError):  # a damaged file: loading the tokenizer reports it
        return False


_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # fixed-size value types
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _gguf_has_key(path: Path, key: str) -> bool:
    """Whether a GGUF file's metadata holds `key`, reading its header only (gguf's reader maps every tensor first:
    seconds for a large file)."""
    import struct

    def skip(f, kind: int, count: int = 1) -> None:
        if kind in _GGUF_SIZES:
            f.seek(_GGUF_SIZES[kind] * count, 1)
        elif kind == _GGUF_STRING:
            for _ in range(count):
                f.seek(struct.unpack("<Q", f.read(8))[0], 1)
        elif kind == _GGUF_ARRAY:
            for _ in range(count):
                inner, n = struct.unpack("<IQ", f.read(12))
                skip(f, inner, n)
        else:
            raise ValueError(f"unknown GGUF value type {kind}")

    wanted = key.encode()
    try:
        with open(path, "rb") as f:
            magic, version = struct.unpack("<4sI", f.read(8))
            if magic != b"GGUF" or version < 2:
                return False
            _tensors, entries = struct.unpack("<QQ", f.read(16))
            for _ in range(entries):
                name = f.read(struct.unpack("<Q", f.read(8))[0])
                kind = struct.unpack("<I", f.read(4))[0]
                if name == wanted:
                    return True
                skip(f, kind)
    except (OSError, ValueError, struct.error):  # damaged: loading the file reports it in one line
        return False
    return False


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick request to the hub, no retries (asked once per process)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # no DNS, refused, timed out, a proxy that says no: all mean "offline" here
        return False
    return True


def hub_kwargs(spec: str, role: str = "teacher") -> dict:
    """from_pretrained kwargs for a name that is not a local path, read as a hub id.

    {} when the hub answers; {"local_files_only": True} when it does not but the id is in the local Hugging Face
    cache; otherwise CheckpointError at once, where from_pretrained would retry a dead connection for ~30 s."""
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(spec, "config.json"), str)
    except ValueError:  # HFValidationError: e.g. spaces, or more than owner/name
        raise CheckpointError(f"{role} {spec}: no such folder or file, and not a hub id (owner/name); check the path") from None
    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set"
    elif hub_reachable():
        return {}
    else:
        why = f"{constants.ENDPOINT} cannot be reached"
    if cached:
        return {"local_files_only": True}
    raise CheckpointError(f"{role} {spec}: no such folder or file, and no hub model of that name in the local cache "
                          f"({why}); give a checkpoint folder or .gguf file, or download the model while online")


def checkpoint_source(spec: str, role: str = "teacher") -> tuple[str, dict]:
    """Where `from_pretrained` reads a teacher-like spec (HF or thinkfast folder, .gguf file, hub id), and the
    extra kwargs it needs there (`gguf_file`, or the offline hub's `local_files_only`). Checks everything that
    needs no weights read, so a typo is one line before anything loads."""
    path = Path(spec)
    if _is_gguf(spec):
        if not path.is_file():
            raise CheckpointError(f"{role} {spec}: no such GGUF file; check the path")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        raw = _read_config_json(path, role)
        if raw.get("model_type") not in LLAMA_TYPES + ("thinkfast",):
            raise ConfigError(
                f"{path}/config.json: model_type {raw.get('model_type')!r} is not Llama-family; thinkfast distils "
                f"Llama-architecture teachers ({SUPPORTED})"
            )
        if not list(path.glob("*.safetensors")):
            raise CheckpointError(
                f"{path}: no *.safetensors weights; thinkfast loads safetensors only (re-save the model with "
                "save_pretrained(safe_serialization=True))"
            )
        return str(path), {}
    if path.exists():
        raise CheckpointError(f"{role} {spec}: not a checkpoint folder or a .gguf file")
    # a hub id is NAME or OWNER/NAME, and OWNER is no folder here: anything else is a local path that is missing
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or (str(path.parent) != "." and path.parent.is_dir()):
        raise CheckpointError(f"{role} {spec}: no such folder or file; check the path")
    return spec, hub_kwargs(spec, role)


def check_load_dtype(dtype) -> torch.dtype | str | None:
    """A loader's `dtype` checked before anything is read: None or 'auto' (the checkpoint's own), a floating-point
    torch dtype, or a name (float32, bf16, ...: `parse_dtype`'s), returned as a torch dtype."""
    from ..utils import parse_dtype

    if dtype is None or dtype == "auto":
        return dtype
    if isinstance(dtype, str):
        return parse_dtype(dtype)  # a name it does not know: one line listing the ones it does
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"dtype={dtype!r}: give a torch dtype (torch.bfloat16) or a name (auto, float32, bf16, ...)")
    if not dtype.is_floating_point:
        raise ConfigError(f"dtype={dtype}: weights load in a floating-point dtype; use torch.float32, torch.bfloat16 or "
                          "torch.float16 ('auto': the checkpoint's own)")
    return dtype


def check_load_device(device) -> torch.device | None:
    """A loader's `device` checked before anything is read: cpu, an existing CUDA device, or meta (shapes only)."""
    from ..utils import check_device

    checked = check_device(device, "device", allow_meta=True)
    return None if checked is None else torch.device(checked)


def load_teacher(spec: str | os.PathLike, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, device=None,
                 role: str = "teacher"):
    """Returns (model, tokenizer or None). The model is an HF Llama / Mistral / Qwen2 / Qwen3 model, or a
    ThinkfastForCausalLM for a thinkfast all-attention checkpoint. Weights load from safetensors; remote code
    only when asked. `role` names the model in error messages as the user gave it (teacher, --model, --student,
    backbone ...). `dtype`: a floating-point torch dtype, a name (bf16, ...) or 'auto' (the checkpoint's)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .hf import ThinkfastForCausalLM

    dtype, device = check_load_dtype(dtype), check_load_device(device)  # bad arguments: not a damaged checkpoint
    spec = str(spec)
    folder, extra = checkpoint_source(spec, role)
    gguf = "gguf_file" in extra
    hub = {} if gguf else extra  # offline: read the hub id from the local cache
    load_kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    if not gguf:
        load_kwargs["use_safetensors"] = True

    try:
        if not gguf:
            hf_cfg = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code, **hub)
            if hf_cfg.model_type == "thinkfast":
                model = ThinkfastForCausalLM.from_pretrained(folder, dtype=dtype, **hub)
                if model.config.role != "teacher":
                    raise ConfigError(f"{role} {spec}: a thinkfast {model.config.role} student, not an all-attention teacher")
                return _placed(model, device), _load_tokenizer(folder, hub)
            model_config_from_hf(hf_cfg, where=str(spec))
        with _gguf_bar_as_hf_bars() if gguf else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_pretrained(folder, **load_kwargs)
    except (ConfigError, CheckpointError):
        raise
    except OSError as e:
        raise CheckpointError(f"{role} {spec}: could not load ({_first_line(e)}); check the path or hub id") from None
    except Exception as e:  # truncated safetensors, shape mismatches, GGUF parse errors
        raise CheckpointError(f"{role} {spec}: weights could not be read ({_first_line(e)}); re-download or re-save them") from None
    model_config_from_hf(model.config, where=str(spec))
    return _placed(model.eval(), device), _load_tokenizer(folder, extra)


def _gguf_bar_as_hf_bars():
    """transformers' GGUF reader draws a tqdm bar of its own, which `disable_progress_bar()` (the CLI's --quiet and
    thinkfast's own bars) does not reach: off while transformers' bars are off."""
    from unittest import mock

    from transformers.utils import logging as hf_logging

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # another transformers layout: its bar stays
        return contextlib.nullcontext()
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None or hf_logging.is_progress_bar_enabled():
        return contextlib.nullcontext()
    return mock.patch.object(gguf_utils, "tqdm", functools.partial(bar, disable=True))


def load_thinkfast(spec: str | os.PathLike, dtype: torch.dtype | None = torch.float32, device=None, where: str = "--model",
                   trust_remote_code: bool = False):
    """(ThinkfastForCausalLM, tokenizer or None) from a thinkfast folder of any role, a published Mamba-2 student
    (Cartesia's Llamba, MambaInLlama; `published.py`), or anything `load_teacher` reads (HF Llama-family folder,
    .gguf, hub id), converted to an all-attention thinkfast model. `dtype=None` keeps the checkpoint's."""
    from transformers import AutoTokenizer

    from .hf import ThinkfastForCausalLM
    from .published import load_published
    from .transfer import from_teacher

    dtype, device = check_load_dtype(dtype), check_load_device(device)  # bad arguments: not a damaged checkpoint
    if dtype == "auto":
        dtype = None  # the same here: the checkpoint's own
    path = Path(spec)
    cfg_file = path / "config.json"
    published = published_source(str(spec), where)
    if published is not None:
        model, tok = load_published(*published, where=where, dtype=dtype)
        return _placed(model, device), tok
    if path.is_dir() and cfg_file.is_file() and _read_config_json(path, where).get("model_type") == "thinkfast":
        if not list(path.glob("*.safetensors")):
            raise CheckpointError(f"{where} {spec}: no *.safetensors weights; save the model with save_pretrained()")
        try:
            model = ThinkfastForCausalLM.from_pretrained(str(path), dtype="auto" if dtype is None else dtype)
        except ConfigError as e:  # a hand-edited config.json: name the file, not the checkpoint as a whole
            raise ConfigError(f"{where} {spec}: {cfg_file}: {e}; fix that value or re-save the model") from None
        except Exception as e:
            if _damaged_weights(e):
                raise CheckpointError(f"{where} {spec}: a weight file is damaged or incomplete ({_first_line(e)}); "
                                      "re-download, re-copy or re-save the model") from None
            raise CheckpointError(f"{where} {spec}: could not load the thinkfast checkpoint ({_first_line(e)}); "
                                  "re-save it with save_pretrained()") from None
        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except Exception:
            tok = None
        return _placed(model.eval(), device), tok
    teacher, tok = load_teacher(spec, dtype="auto" if dtype is None else dtype, trust_remote_code=trust_remote_code, role=where)
    # the loaded checkpoint is dropped on return: the converted model takes its tensors rather than copies
    model = teacher if isinstance(teacher, ThinkfastForCausalLM) else from_teacher(teacher, kind="teacher", share_weights=True)
    return _placed(model.eval(), device), tok


def published_source(spec: str, where: str):
    """(folder, format) when `spec` is a published Mamba-2 student (Cartesia's Llamba, MambaInLlama): a local folder,
    or a hub id (its files fetched); None otherwise."""
    from .published import fetch_published, published_format

    path = Path(spec)
    if path.is_dir():
        kind = published_format(path)
        return None if kind is None else (path, kind)
    if path.exists() or _is_gguf(spec):
        return None
    source, extra = checkpoint_source(spec, where)  # a bad local path is one line here; else a hub id
    folder = fetch_published(source, where, extra)
    return None if folder is None else (folder, published_format(folder))


def _placed(model, device):
    return model if device is None else model.to(device)


def _load_tokenizer(folder: str, kwargs: dict):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, **kwargs)
    except Exception:
        return None


def _damaged_weights(e: Exception) -> bool:
    """A safetensors file cut short or overwritten (a broken copy or download), as opposed to a wrong config."""
    text = str(e)
    return type(e).__name__ == "SafetensorError" or any(
        k in text for k in ("deserializing header", "header too small", "incomplete metadata", "invalid header"))


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
