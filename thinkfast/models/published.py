"""Published Mamba students in their own checkpoint formats, converted to thinkfast models.

- Cartesia's Llamba (cartesia-ai/Llamba-1B, -3B, -8B: Llama-3.x distilled by MOHAWK): a config.json with `ssm_cfg`
  and `mlp_cfg`, weights under `backbone.`, every mixer a DiscreteMamba2 (in_proj rows x | B | C | z | A_log, a
  conv without activation, a = exp(-softplus(A_log)), input not scaled, y * silu(z + z_bias)).
- MambaInLlama's Mamba-2 students and hybrids (Wang et al., 2024): the teacher's Llama config.json plus a
  mamba_config.json, Mamba layers under `model.layers.N.mamba.` (in_proj rows z | x | B | C | dt, as thinkfast's),
  attention layers as in Llama, a gated RMSNorm over each head.
- MambaInLlama's Mamba-1 students and hybrids (in_proj_x, in_proj_z, B_proj, C_proj, dt_proj_down, dt_proj, A_log
  per channel and state dimension) and M1's (those five fused into one in_proj; attention as mamba_ssm MHA modules
  with plain RoPE): thinkfast's Mamba-1 mixer (`ssm_param="mamba1"`).

Each maps onto a thinkfast mixer without approximation: rows are reordered, B and C given per group of heads are
repeated for each head of the group (the conv is depthwise, so repeated channels stay equal), Llamba's z bias
becomes the z rows' part of an in_proj bias, and the Mamba-1 dt bias that MambaInLlama adds twice is doubled.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from .config import ModelConfig
from .teacher import _first_line, model_config_from_hf

log = logging.getLogger("thinkfast")

LLAMBA = "llamba"
MAMBA_IN_LLAMA = "mambainllama"
# a pure Mamba model has no positions of its own: this only bounds what the engine allocates for
NO_POSITION_LIMIT = 131072


# ---------------------------------------------------------------------------------------------- finding them


def published_format(folder: Path) -> str | None:
    """LLAMBA, MAMBA_IN_LLAMA or None for a checkpoint folder, from its config files alone."""
    if (folder / "mamba_config.json").is_file():
        return MAMBA_IN_LLAMA
    raw = _json(folder / "config.json") if (folder / "config.json").is_file() else {}
    return LLAMBA if _is_llamba_config(raw) else None


def _is_llamba_config(raw: dict) -> bool:
    return isinstance(raw.get("ssm_cfg"), dict) and "d_model" in raw and "n_layer" in raw


def _json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e}); re-download the checkpoint") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: a JSON object was expected; re-download the checkpoint")
    return raw


def fetch_published(spec: str, where: str, extra: dict) -> Path | None:
    """The local snapshot of a hub id when it names a published student (its weights downloaded, or read from the
    local cache offline: `extra` is `hub_kwargs`'s); None for anything else, which then loads as a teacher would."""
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        raw = _json(Path(hf_hub_download(spec, "config.json", **extra)))
    except CheckpointError:
        raise
    except Exception:  # no such repo or file: the teacher loader says so in its own words
        return None
    if not _is_llamba_config(raw):
        try:
            hf_hub_download(spec, "mamba_config.json", **extra)
        except Exception:
            return None
    try:
        folder = Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"], **extra))
        if not list(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(spec, allow_patterns=["*.json", "pytorch_model*.bin"], **extra))
    except Exception as e:
        raise CheckpointError(f"{where} {spec}: could not download its weights ({_first_line(e)}); check the "
                              "connection, or download the model while online") from None
    return folder


def read_weights(folder: Path, where: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder: safetensors (all shards), else PyTorch .bin files read with
    weights_only=True (tensors only: no code runs)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not files and not bins:
        raise CheckpointError(f"{where} {folder}: no *.safetensors or pytorch_model*.bin weights; re-download the checkpoint")
    out: dict[str, torch.Tensor] = {}
    for f in files or bins:
        try:
            part = load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{where} {f}: weights could not be read ({_first_line(e)}); re-download them") from None
        if not isinstance(part, dict):
            raise CheckpointError(f"{where} {f}: not a state dict of tensors; re-download the checkpoint")
        out.update(part)
    return out


# ---------------------------------------------------------------------------------------------- converting


class _Weights:
    """A checkpoint's tensors, taken by name; a missing one or a wrong shape is one line naming it."""

    def __init__(self, tensors: dict[str, torch.Tensor], where: str):
        self.tensors, self.where, self.used = tensors, where, set()

    def __call__(self, name: str, shape: tuple | None = None) -> torch.Tensor:
        if name not in self.tensors:
            raise CheckpointError(f"{self.where}: weight {name} is missing; the checkpoint is incomplete or of another "
                                  "format (re-download it)")
        t = self.tensors[name]
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{self.where}: weight {name} has shape {tuple(t.shape)} where its config implies "
                                  f"{tuple(shape)}; config and weights do not belong together")
        self.used.add(name)
        return t

    def has(self, name: str) -> bool:
        return name in self.tensors

    def left_over(self) -> list[str]:
        return sorted(set(self.tensors) - self.used)


def _per_head(t: torch.Tensor, groups: int, heads: int) -> torch.Tensor:
    """Rows (or conv channels) given per group of heads -> per head: each group's block repeated for its heads."""
    return t.unflatten(0, (groups, -1)).repeat_interleave(heads // groups, dim=0).flatten(0, 1)


def _setting(cfg: dict, key: str, default, where: str, allowed) -> object:
    value = cfg.get(key, default)
    if value not in allowed:
        raise ConfigError(f"{where}: {key}={value!r} is not supported (thinkfast computes only {allowed[0]!r})")
    return value


def _size(cfg: dict, key: str, default, where: str) -> int:
    """A positive whole-number setting of a published config, or one line naming it."""
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: {key}={value!r} must be a whole number of at least 1; the config is damaged "
                          "(re-download it)")
    return value


def convert_llamba(folder: Path, tensors: dict[str, torch.Tensor], where: str):
    """A Cartesia Llamba checkpoint -> ThinkfastForCausalLM (role llamba, discrete SSM)."""
    from .hf import ThinkfastConfig

    raw = _json(folder / "config.json")
    ssm, mlp = dict(raw.get("ssm_cfg") or {}), dict(raw.get("mlp_cfg") or {})
    _setting(ssm, "activation", "identity", where, ("identity",))
    _setting(ssm, "bias", False, where, (False,))
    _setting(ssm, "conv_bias", True, where, (True,))
    _setting(mlp, "bias", False, where, (False,))
    _setting(mlp, "act_fn", "silu", where, ("silu",))
    _setting(raw, "lm_head_bias", False, where, (False,))
    d, n_layers = _size(raw, "d_model", None, where), _size(raw, "n_layer", None, where)
    n_v, n_qk = _size(ssm, "n_v_heads", 32, where), _size(ssm, "n_qk_heads", 32, where)
    N, d_conv = _size(ssm, "d_state", 64, where), _size(ssm, "d_conv", 4, where)
    d_inner = _size(ssm, "expand", 1, where) * d
    if d_inner % n_v or n_v % n_qk:
        raise ConfigError(f"{where}: n_v_heads={n_v} must divide the inner width {d_inner} and be a multiple of "
                          f"n_qk_heads={n_qk}")
    P = d_inner // n_v
    w = _Weights(tensors, where)
    vocab = w("backbone.embedding.weight").shape[0]
    eps = float(raw.get("norm_epsilon", 1e-5))
    if eps != 1e-5:  # Llamba's blocks hard-code 1e-5; thinkfast has one epsilon for every norm
        log.warning("%s: norm_epsilon=%s for the final norm, 1e-5 in the blocks: thinkfast uses %s for both", where, eps, eps)
    tied = bool(raw.get("tie_embeddings", False))
    cfg = ModelConfig(
        vocab_size=vocab, d_model=d, n_layers=n_layers, n_heads=n_v, n_kv_heads=n_v, head_dim=P,
        d_mlp=_size(mlp, "intermediate_size", 14336, where), rms_norm_eps=eps, max_position_embeddings=NO_POSITION_LIMIT,
        tie_embeddings=tied, attn_layers=[], ssm_param="discrete", d_state=N, ssm_kv_heads=n_v, d_conv=d_conv,
        ssm_norm=False, qkv_bias=True,  # the in_proj bias carries z_bias
    )
    model = _empty_model(ThinkfastConfig.from_model_config(cfg, **_token_ids(raw, folder)))
    sd = {"embed.weight": w("backbone.embedding.weight", (vocab, d)), "norm.weight": w("backbone.final_layernorm.weight", (d,))}
    if not tied:
        sd["lm_head.weight"] = w("lm_head.weight", (vocab, d))
    conv_dim = d_inner + 2 * n_qk * N
    for i in range(n_layers):
        src, dst = f"backbone.layers.{i}.", f"layers.{i}."
        W = w(src + "mixer.in_proj.weight", (2 * d_inner + 2 * n_qk * N + n_v, d))
        x, B, C, z, A_log = torch.split(W, [d_inner, n_qk * N, n_qk * N, d_inner, n_v])
        conv_w = w(src + "mixer.conv1d.weight", (conv_dim, 1, d_conv))
        conv_b = w(src + "mixer.conv1d.bias", (conv_dim,))
        per_head = [lambda t: t, lambda t: _per_head(t, n_qk, n_v), lambda t: _per_head(t, n_qk, n_v)]
        conv_parts = [f(t) for f, t in zip(per_head, torch.split(conv_w, [d_inner, n_qk * N, n_qk * N]))]
        bias_parts = [f(t) for f, t in zip(per_head, torch.split(conv_b, [d_inner, n_qk * N, n_qk * N]))]
        zb = w(src + "mixer.z_bias", (d_inner,))
        sd |= {
            dst + "mixer.in_proj.weight": torch.cat([z, x, _per_head(B, n_qk, n_v), _per_head(C, n_qk, n_v), A_log]),
            # only z has a bias; the SSM's decay is exp(-softplus(A_log)): dt_bias stays 0
            dst + "mixer.in_proj.bias": torch.cat([zb, zb.new_zeros(d_inner + 2 * n_v * N + n_v)]),
            dst + "mixer.conv1d.weight": torch.cat(conv_parts),
            dst + "mixer.conv1d.bias": torch.cat(bias_parts),
            dst + "mixer.dt_bias": torch.zeros(n_v, dtype=W.dtype),
            dst + "mixer.D": w(src + "mixer.D", (n_v,)),
            dst + "mixer.out_proj.weight": w(src + "mixer.out_proj.weight", (d, d_inner)),
            dst + "input_norm.weight": w(src + "input_layernorm.weight", (d,)),
            dst + "mlp_norm.weight": w(src + "post_attention_layernorm.weight", (d,)),
        }
        for proj in ("gate_proj", "up_proj", "down_proj"):
            sd[dst + f"mlp.{proj}.weight"] = w(src + f"mlp.{proj}.weight")
    return _filled(model, sd, w, where)


def convert_mambainllama(folder: Path, tensors: dict[str, torch.Tensor], where: str):
    """A MambaInLlama checkpoint (pure or hybrid) -> ThinkfastForCausalLM: Mamba-2 layers (`mamba2/`: the mamba2
    SSM with a per-head norm) or Mamba-1 layers (`mamba/`, as M1 has them: the mamba1 SSM)."""
    from transformers import AutoConfig

    from .hf import ThinkfastConfig

    mcfg = _json(folder / "mamba_config.json")
    try:
        hf_cfg = AutoConfig.from_pretrained(str(folder))
    except Exception as e:
        raise CheckpointError(f"{where} {folder}/config.json: not a readable Llama config ({_first_line(e)})") from None
    base = model_config_from_hf(hf_cfg, where=where)
    w = _Weights(tensors, where)
    mamba_layers = sorted({int(k.split(".")[2]) for k in tensors
                           if k.startswith("model.layers.") and ".mamba." in k and k.split(".")[2].isdigit()})
    if not mamba_layers:
        raise CheckpointError(f"{where}: mamba_config.json but no model.layers.N.mamba.* weights; re-download the checkpoint")
    first = f"model.layers.{mamba_layers[0]}.mamba."
    if w.has(first + "x_proj.weight"):
        raise ConfigError(f"{where}: Mamba layers with x_proj (mamba_ssm's own Mamba-1 layout), which thinkfast does not "
                          "read; MambaInLlama's Mamba-1 (in_proj_x, B_proj, C_proj) and Mamba-2 layers it does")
    # Mamba-1 layers: MambaInLlama's own (in_proj_x, in_proj_z, B_proj, C_proj, dt_proj_down) or M1's, with those
    # five fused into one in_proj; both have a dt_proj and an A_log per channel and state dimension
    mamba1 = w.has(first + "dt_proj.weight")
    ssm = dict(mcfg.get("ssm_cfg") or {})
    _setting(mcfg, "hidden_act", "silu", where, ("silu",))
    _setting(ssm, "conv_bias", True, where, (True,))
    d = base.d_model
    N, d_conv = _size(ssm, "d_state", 16 if mamba1 else 128, where), _size(ssm, "d_conv", 4, where)
    d_inner = _size(mcfg, "d_inner", None, where) if mcfg.get("d_inner") is not None else _size(ssm, "expand", 2, where) * d
    d_xb = _size(mcfg, "d_xb", d, where)
    H = d_inner // N if mamba1 else _size(ssm, "ngroups", 1, where)
    if d_inner != H * N or d_xb % N or H % (d_xb // N):
        raise ConfigError(f"{where}: d_inner={d_inner}, d_xb={d_xb}, d_state={N}" + ("" if mamba1 else f", ngroups={H}")
                          + " do not make whole heads of d_state channels in whole groups")
    Hx = d_xb // N
    # x (and B) repeated per head before the conv: their rows are repeated here instead, and the conv is as saved
    repeat_first = bool(ssm.get("repeat_kv_before_conv", mamba1))  # MambaInLlama's defaults: True for Mamba-1
    n_layers = base.n_layers
    attn = [i for i in range(n_layers) if i not in set(mamba_layers)]
    listed = mcfg.get("attn_layers")
    if listed is not None and (not isinstance(listed, list) or not all(isinstance(i, int) for i in listed)
                               or sorted(listed) != attn):
        shown = sorted(listed) if isinstance(listed, list) and all(isinstance(i, int) for i in listed) else listed
        raise ConfigError(f"{where}: mamba_config.json lists attention at {shown!r}, the weights have it at "
                          f"{attn}; config and weights do not belong together")
    # MambaInLlama's Mamba heads are d_state channels each (its Mamba-1 default d_state is 16, whatever the attention's
    # head size)
    shape = dict(attn_layers=attn, d_state=N, ssm_heads=H, ssm_head_dim=N, ssm_kv_heads=H if repeat_first else Hx,
                 d_conv=d_conv, d_mlp=_size(mcfg, "intermediate_size", base.d_mlp, where))
    # M1's attention layers are mamba_ssm MHA modules (fused qkv in_proj) whose rotary embedding has no Llama-3
    # scaling: the model was trained with plain RoPE at the config's theta, so that is what it gets here
    fused_attn = any(w.has(f"model.layers.{i}.mha.in_proj.weight") for i in attn)
    if fused_attn and base.rope_params is not None:
        log.warning("%s: attention layers in M1's layout (mha.in_proj) use plain RoPE; the config's %s scaling is "
                    "left out, as M1 computes it", where, base.rope_params.get("rope_type", "rope"))
        base = base.replace(rope_params=None)
    if mamba1:
        for key in ("proj_x_bias", "proj_z_bias", "out_proj_bias"):
            _setting(ssm, key, False, where, (False,))
        rank = w(first + "dt_proj.weight").shape[1]
        cfg = base.replace(ssm_param="mamba1", dt_rank=rank, **shape)
        layer = _mil_mamba1_layer
    else:
        for key, default in (("bias", False), ("rmsnorm", True), ("norm_before_gate", False), ("D_has_hdim", False)):
            _setting(ssm, key, default, where, (default,))
        _setting(ssm, "dt_limit", [0.0, float("inf")], where, ([0.0, float("inf")], (0.0, float("inf"))))
        if base.rms_norm_eps != 1e-5:  # MambaInLlama's gated norm hard-codes 1e-5; thinkfast has one epsilon
            log.warning("%s: rms_norm_eps=%s; the Mamba layers' gated norm used 1e-5 and now uses %s", where,
                        base.rms_norm_eps, base.rms_norm_eps)
        cfg = base.replace(ssm_param="mamba2", ssm_norm=True, ssm_norm_group=N, **shape)
        layer = _mil_mamba2_layer
    model = _empty_model(ThinkfastConfig.from_model_config(cfg, **_token_ids(_json(folder / "config.json"), folder)))
    sd = {"embed.weight": w("model.embed_tokens.weight"), "norm.weight": w("model.norm.weight", (d,))}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = w("lm_head.weight")
    elif w.has("lm_head.weight"):  # a tied head saved anyway: transformers ties it to the embedding, so do we
        w("lm_head.weight")
    sizes = dict(d=d, d_inner=d_inner, d_xb=d_xb, H=H, Hx=Hx, N=N, d_conv=d_conv, repeat_first=repeat_first)
    for i in range(n_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        sd[dst + "input_norm.weight"] = w(src + "input_layernorm.weight", (d,))
        sd[dst + "mlp_norm.weight"] = w(src + "post_attention_layernorm.weight", (d,))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            sd[dst + f"mlp.{proj}.weight"] = w(src + f"mlp.{proj}.weight")
        if i in attn and w.has(src + "mha.in_proj.weight"):  # M1's MHA: q | k | v rows in one in_proj
            q, k, v = torch.split(w(src + "mha.in_proj.weight", ((cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.hd, d)),
                                  [cfg.n_heads * cfg.hd, cfg.n_kv_heads * cfg.hd, cfg.n_kv_heads * cfg.hd])
            sd |= {dst + "mixer.q_proj.weight": q, dst + "mixer.k_proj.weight": k, dst + "mixer.v_proj.weight": v,
                   dst + "mixer.o_proj.weight": w(src + "mha.out_proj.weight", (d, cfg.n_heads * cfg.hd))}
            continue
        if i in attn:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                sd[dst + f"mixer.{name}.weight"] = w(src + f"self_attn.{name}.weight")
                if cfg.qkv_bias and name != "o_proj":
                    sd[dst + f"mixer.{name}.bias"] = w(src + f"self_attn.{name}.bias")
            for name in ("q_norm", "k_norm") if cfg.qk_norm else ():
                sd[dst + f"mixer.{name}.weight"] = w(src + f"self_attn.{name}.weight")
            continue
        sd |= {dst + "mixer." + k: t for k, t in layer(w, src + "mamba.", **sizes).items()}
        if cfg.qkv_bias and cfg.ssm_param == "mamba2":  # a Qwen2 teacher's Mamba-2 layers: no in_proj bias here
            sd[dst + "mixer.in_proj.bias"] = torch.zeros_like(sd[dst + "mixer.in_proj.weight"][:, 0])
    return _filled(model, sd, w, where)


def _mil_mamba2_layer(w: _Weights, m: str, d, d_inner, d_xb, H, Hx, N, d_conv, repeat_first) -> dict:
    W = w(m + "in_proj.weight", (2 * d_inner + 2 * d_xb + H, d))
    if repeat_first:
        z, x, B, C, dt = torch.split(W, [d_inner, d_xb, d_xb, d_inner, H])
        W = torch.cat([z, _per_head(x, Hx, H), _per_head(B, Hx, H), C, dt])
    conv_dim = (3 * d_inner) if repeat_first else (d_inner + 2 * d_xb)
    return {
        "in_proj.weight": W,
        "conv1d.weight": w(m + "conv1d.weight", (conv_dim, 1, d_conv)),
        "conv1d.bias": w(m + "conv1d.bias", (conv_dim,)),
        "dt_bias": w(m + "dt_bias", (H,)),
        "A_log": w(m + "A_log", (H,)),
        "D": w(m + "D", (H,)),
        "norm.weight": w(m + "norm.weight", (d_inner,)),
        "out_proj.weight": w(m + "out_proj.weight", (d, d_inner)),
    }


def _mil_mamba1_layer(w: _Weights, m: str, d, d_inner, d_xb, H, Hx, N, d_conv, repeat_first) -> dict:
    R = w(m + "dt_proj.weight").shape[1]
    if w.has(m + "in_proj.weight"):  # M1: z | x | B | C | dt_low in one projection
        z, x, B, C, down = torch.split(w(m + "in_proj.weight", (2 * d_inner + 2 * d_xb + R, d)), [d_inner, d_xb, d_xb, d_inner, R])
    else:
        z, x, B = w(m + "in_proj_z.weight", (d_inner, d)), w(m + "in_proj_x.weight", (d_xb, d)), w(m + "B_proj.weight", (d_xb, d))
        C, down = w(m + "C_proj.weight", (d_inner, d)), w(m + "dt_proj_down.weight", (R, d))
    if repeat_first:
        x, B = _per_head(x, Hx, H), _per_head(B, Hx, H)
    conv_dim = d_inner if repeat_first else d_xb
    return {
        "in_proj.weight": torch.cat([z, x, B, C, down]),
        "dt_proj.weight": w(m + "dt_proj.weight", (d_inner, R)),
        # MambaInLlama's Mamba-1 adds dt_proj's bias twice: once in dt_proj, again as the scan's delta_bias (in its
        # training forward and in its decode step alike), so the function it learned has twice the bias
        "dt_proj.bias": 2 * w(m + "dt_proj.bias", (d_inner,)),
        "conv1d.weight": w(m + "conv1d.weight", (conv_dim, 1, d_conv)),
        "conv1d.bias": w(m + "conv1d.bias", (conv_dim,)),
        "A_log": w(m + "A_log", (d_inner, N)),
        "D": w(m + "D", (d_inner,)),
        "out_proj.weight": w(m + "out_proj.weight", (d, d_inner)),
    }


def _token_ids(raw: dict, folder: Path) -> dict:
    """Token ids of config.json, with every stop token its generation_config.json adds (as for teachers)."""
    ids = {k: raw[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if raw.get(k) is not None}
    gen = folder / "generation_config.json"
    if gen.is_file():
        listed = _json(gen).get("eos_token_id")
        eos = [ids["eos_token_id"]] if isinstance(ids.get("eos_token_id"), int) else list(ids.get("eos_token_id") or [])
        eos += [i for i in ([listed] if isinstance(listed, int) else listed or []) if isinstance(i, int) and i not in eos]
        if eos:
            ids["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return ids


def _empty_model(config):
    """The model on the meta device: no weights of its own to initialise, each one is the checkpoint's (an 8B
    student would otherwise be built, initialised and copied into, beside the checkpoint)."""
    from .hf import ThinkfastForCausalLM

    with torch.device("meta"):
        return ThinkfastForCausalLM(config)


def _filled(model, sd: dict[str, torch.Tensor], w: _Weights, where: str):
    own = model.lm.state_dict()
    missing = sorted(set(own) - set(sd))
    if missing:  # a converter bug rather than a bad checkpoint, but say which
        raise CheckpointError(f"{where}: no weight for {missing[:3]} after conversion")
    for name, t in sd.items():
        if tuple(own[name].shape) != tuple(t.shape):
            raise CheckpointError(f"{where}: {name} converts to shape {tuple(t.shape)}, the model expects "
                                  f"{tuple(own[name].shape)}; config and weights do not belong together")
    dtype = sd["embed.weight"].dtype
    # the checkpoint's tensors become the parameters (Mamba checkpoints often keep A_log, D, dt_bias in fp32 beside
    # bf16 weights: one dtype for all, the embedding's)
    model.lm.load_state_dict({k: t.to(dtype) for k, t in sd.items()}, strict=True, assign=True)
    ignored = [k for k in w.left_over() if "rotary_emb" not in k]
    if ignored:
        log.warning("%s: %d checkpoint tensors have no place in the model and were ignored (%s ...)", where,
                    len(ignored), ", ".join(ignored[:3]))
    return model.eval()


def published_shape(folder: Path, kind: str, where: str) -> tuple[str, int]:
    """(role, positions it holds) of a published student, from its configs alone (no weights read)."""
    if kind == LLAMBA:
        return "llamba", NO_POSITION_LIMIT
    from transformers import AutoConfig

    attn = _json(folder / "mamba_config.json").get("attn_layers") or []
    if not isinstance(attn, list):
        raise ConfigError(f"{where} {folder}/mamba_config.json: attn_layers={attn!r} must be a list of layer indices")
    try:
        base = model_config_from_hf(AutoConfig.from_pretrained(str(folder)), where=where)
    except ConfigError:
        raise
    except Exception as e:
        raise CheckpointError(f"{where} {folder}/config.json: not a readable Llama config ({_first_line(e)})") from None
    role = "llamba" if not attn else "teacher" if len(attn) >= base.n_layers else "hybrid"
    return role, base.max_position_embeddings


def load_published(folder: Path, kind: str, where: str, dtype: torch.dtype | None = None):
    """(ThinkfastForCausalLM, tokenizer or None) from a published student's folder."""
    tensors = read_weights(folder, where)
    convert = convert_llamba if kind == LLAMBA else convert_mambainllama
    model = convert(folder, tensors, f"{where} {folder}" if where else str(folder))
    if dtype is not None:
        model.to(dtype)
    return model, _tokenizer_beside(folder)


def _tokenizer_beside(folder: Path):
    from transformers import AutoTokenizer

    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception:
        return None
