"""Teacher -> student weights: Llamba (every mixer Mamba-2) or hybrid (attention kept at `attn_layers`).

Mamba mixers start from their layer's attention (MambaInLlama): x <- W_V, B <- W_K, C <- W_Q, out_proj <- W_O
(and the q, k, v biases of a Qwen2 teacher likewise; a Qwen3 teacher's q and k norms become C's and B's), identity
conv, D = 0. Embeddings, norms, MLPs and head are copied.
"""

from __future__ import annotations

import contextlib
import functools
from numbers import Integral

import torch

from ..errors import ConfigError
from .config import ModelConfig
from .hf import ThinkfastConfig, ThinkfastForCausalLM
from .mixers import Mamba2Mixer
from .model import ThinkfastLM
from .teacher import load_teacher, model_config_from_hf, state_dict_from_hf

KINDS = ("llamba", "hybrid", "teacher")


TEACHERS = ("an HF Llama-family model (LlamaForCausalLM, Qwen2ForCausalLM, ...), an all-attention thinkfast model "
            "(ThinkfastForCausalLM), or a checkpoint folder, .gguf file or hub id")


def check_teacher_object(teacher) -> None:
    """A teacher is a model with an HF config (its weights are read through it): refuse anything else in one line,
    where it would fail on a missing `.config`."""
    if isinstance(teacher, ThinkfastLM):
        raise ConfigError("teacher: a ThinkfastLM (model.lm); pass the ThinkfastForCausalLM that holds it")
    if not isinstance(teacher, torch.nn.Module) or getattr(teacher, "config", None) is None:
        what = "None" if teacher is None else type(teacher).__name__
        hint = " (a state_dict: load it into its model first)" if isinstance(teacher, dict) else ""
        raise ConfigError(f"teacher: got {what}{hint}; a teacher is {TEACHERS}")


def teacher_parts(teacher) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """(all-attention ModelConfig, ThinkfastLM-named state dict, HF token/template attributes) of a teacher."""
    check_teacher_object(teacher)
    if isinstance(teacher, ThinkfastForCausalLM):
        cfg = teacher.model_config
        if len(cfg.attn_layers) != cfg.n_layers:
            raise ConfigError(f"teacher is a thinkfast {teacher.config.role}, not an all-attention model")
        sd = teacher.lm.state_dict()
    else:
        cfg = model_config_from_hf(teacher.config)
        sd = state_dict_from_hf(teacher)
    hf = teacher.config
    # token ids, and the prompt style a model was trained with (the embedded teacher's), carry over to students
    extras = {k: getattr(hf, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "prompt_style")}
    # and every stop token: HF checkpoints often list more in generation_config.json than in config.json
    # (Qwen2.5-Instruct: <|im_end|> in config.json, <|im_end|> and <|endoftext|> in generation_config.json)
    eos = _ids(extras["eos_token_id"])
    eos += [i for i in _ids(getattr(getattr(teacher, "generation_config", None), "eos_token_id", None)) if i not in eos]
    if len(eos) > 1:
        extras["eos_token_id"] = eos
    return cfg, sd, extras


def _ids(value) -> list[int]:
    return [value] if isinstance(value, int) else [i for i in value or [] if isinstance(i, int)]


def default_hybrid_layers(n_layers: int, fraction: float = 0.25) -> list[int]:
    """Attention kept in `fraction` of the layers, spread evenly (one in the middle of each group)."""
    n_attn = max(1, round(n_layers * fraction))
    step = n_layers / n_attn
    return sorted({min(n_layers - 1, int(step * i + step / 2)) for i in range(n_attn)})


def _own_random_stream(build):
    """Run `build` on a forked random stream: a student's seeded initialisation must not reset the caller's
    (`torch.manual_seed(s); from_teacher(...); sample` would draw the same for every s)."""
    @functools.wraps(build)
    def seeded(*args, **kwargs):
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):
            return build(*args, **kwargs)
    return seeded


@_own_random_stream
def from_teacher(
    teacher,
    kind: str = "llamba",
    attn_layers: list[int] | None = None,
    ssm_param: str | None = None,
    init_from_attention: bool = True,
    ssm_kv_heads: int | None = None,
    d_conv: int = 4,
    seed: int = 0,
    d_state: int | None = None,
    share_weights: bool = False,
    ssm_norm_group: int | None = None,
) -> ThinkfastForCausalLM:
    """Build a student from a teacher (HF Llama model, thinkfast all-attention model, or a path/hub id/GGUF).
    A teacher on the meta device (accelerate's `init_empty_weights`) gives a student on the meta device.

    kind: "llamba" (no attention; Llamba's discrete SSM by default), "hybrid" (attention at `attn_layers`, a list
    of layer indices that keeps some but not all layers, default a quarter of them; Mamba-2 parameterisation by
    default) or "teacher" (all attention: the teacher itself in thinkfast's model, for the engine; no
    `attn_layers`). `seed` seeds the parameters that do not come from the teacher. `ssm_kv_heads` defaults to the
    teacher's KV heads (x and B expanded per head block at run time); set it to n_heads to expand the weights once here.
    `d_state` defaults to the teacher's head size; a larger state takes K and Q in its first head-size dimensions
    (the extra dimensions of C start at zero, so the student starts as the attention-initialised one).
    `share_weights` (kind="teacher" only): the model takes the teacher's tensors as they are instead of copies, so
    a converted multi-GB checkpoint does not exist twice in memory; for a model that is only run (sampling, a
    frozen distillation teacher), since training it would change the original too.
    `ssm_norm_group`: the mamba2 mixers' gated RMSNorm normalises groups of that many features (default the whole
    width; the head size normalises each head, as MambaInLlama's checkpoints do).
    """
    if kind not in KINDS:
        raise ConfigError(f"student kind {kind!r}: use one of {', '.join(KINDS)}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed={seed!r}: give an integer")
    attn_layers = _layer_list(attn_layers)
    if isinstance(teacher, (str, bytes)) or hasattr(teacher, "__fspath__"):
        teacher, _ = load_teacher(teacher)
    tcfg, sd, extras = teacher_parts(teacher)
    n = tcfg.n_layers
    layers = _attention_layers(kind, attn_layers, n)
    if ssm_param is None:
        ssm_param = "discrete" if kind == "llamba" else "mamba2"
    if d_state is not None and d_state < tcfg.hd:
        raise ConfigError(f"d_state={d_state} is below the teacher's head size {tcfg.hd}; B and C could not hold K and Q")
    if d_state is not None and d_state != tcfg.hd and tcfg.qk_norm and kind != "teacher":
        raise ConfigError(f"d_state={d_state}: this teacher normalises q and k over its head size ({tcfg.hd}); a student "
                          "normalising B and C the same way needs d_state equal to it (drop --d-state)")
    if ssm_param == "mamba1" and kind != "teacher":  # its scan runs token by token: fine to run, slow to train
        raise ConfigError("ssm_param='mamba1' comes only with converted checkpoints (MambaInLlama's Mamba-1, M1); a new "
                          "student is discrete or mamba2")
    if ssm_norm_group is not None and ssm_param != "mamba2":
        raise ConfigError(f"ssm_norm_group={ssm_norm_group}: only ssm_param='mamba2' has a gated RMSNorm")
    scfg = tcfg.replace(attn_layers=layers, ssm_param=ssm_param, ssm_kv_heads=ssm_kv_heads, d_conv=d_conv, d_state=d_state,
                        ssm_norm_group=ssm_norm_group)

    on_meta = _on_meta(sd)
    torch.random.default_generator.manual_seed(seed)  # the caller's stream is restored after (_own_random_stream)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed(seed)
    hf_cfg = ThinkfastConfig.from_model_config(scfg, **{k: v for k, v in extras.items() if v is not None})
    if share_weights:
        if kind != "teacher":
            raise ConfigError("share_weights is for kind='teacher': a student trains its weights, which would change the teacher's")
        with torch.device("meta"):  # no weights of its own to initialise: every one is the teacher's
            model = ThinkfastForCausalLM(hf_cfg)
        missing, unexpected = model.lm.load_state_dict(sd, strict=False, assign=True)
        if missing or unexpected:
            raise ConfigError(f"teacher and thinkfast model differ: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return model.eval()
    # a teacher without weights (meta: accelerate's init_empty_weights, shape inference) gives a student without any
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        student = ThinkfastForCausalLM(hf_cfg)
    ref = next(iter(sd.values()))
    student.to(ref.dtype)
    own = student.lm.state_dict()
    with torch.no_grad():
        for name, tensor in sd.items():
            if ".mixer." in name and int(name.split(".")[1]) not in set(layers):
                continue  # attention weights of a layer that becomes Mamba: mapped below
            if name not in own:
                raise ConfigError(f"teacher parameter {name} has no place in the student; teacher/student configs differ")
            if own[name].shape != tensor.shape:
                raise ConfigError(f"teacher {name} has shape {tuple(tensor.shape)}, student expects {tuple(own[name].shape)}")
            own[name].copy_(tensor)
        if init_from_attention:
            for i in scfg.mamba_layers:
                p = f"layers.{i}.mixer."
                biases = [sd.get(p + f"{n}_proj.bias") for n in "qkv"] if tcfg.qkv_bias else None
                init_mamba_from_attention(
                    student.lm.layers[i].mixer, sd[p + "q_proj.weight"], sd[p + "k_proj.weight"], sd[p + "v_proj.weight"], sd[p + "o_proj.weight"], tcfg.n_kv_heads,
                    biases,
                )
                if tcfg.qk_norm:  # q's and k's norms become C's and B's
                    student.lm.layers[i].mixer.c_norm.weight.copy_(sd[p + "q_norm.weight"])
                    student.lm.layers[i].mixer.b_norm.weight.copy_(sd[p + "k_norm.weight"])
    return student.eval()


def _layer_list(attn_layers) -> list[int] | None:
    """`attn_layers` as a list of ints, or None; anything else refused naming what to give."""
    if attn_layers is None:
        return None
    if isinstance(attn_layers, (list, tuple, range)) and all(
            isinstance(i, Integral) and not isinstance(i, bool) for i in attn_layers):
        return [int(i) for i in attn_layers]
    example = f"[{attn_layers}]" if isinstance(attn_layers, Integral) and not isinstance(attn_layers, bool) else "[3, 8]"
    raise ConfigError(f"attn_layers={attn_layers!r}: give a list of layer indices, e.g. {example}")


def _attention_layers(kind: str, attn_layers: list[int] | None, n: int) -> list[int]:
    """The layers that keep attention for a student of `kind` from an `n`-layer teacher."""
    if kind == "llamba":
        if attn_layers:
            raise ConfigError(f"attn_layers={attn_layers}: a llamba student has no attention layers; drop attn_layers "
                              "(--attn-layers) or use kind='hybrid' (--student hybrid)")
        return []
    if kind == "teacher":
        if attn_layers is not None and sorted(attn_layers) != list(range(n)):
            raise ConfigError(f"attn_layers={attn_layers}: kind='teacher' keeps attention in every layer; drop "
                              "attn_layers, or use kind='hybrid' to keep it in some")
        return list(range(n))
    if attn_layers is None:
        if n < 2:  # the default would keep attention in the only layer: the teacher itself, not a hybrid
            raise ConfigError(f"a hybrid keeps attention in some layers and Mamba in the others, and this teacher has "
                              f"{n} layer; use kind='llamba' (--student llamba)")
        return default_hybrid_layers(n)
    twice = sorted({i for i in attn_layers if attn_layers.count(i) > 1})
    if twice:
        raise ConfigError(f"attn_layers={attn_layers} lists layer(s) {twice} more than once; give each layer once")
    if not attn_layers:
        raise ConfigError("attn_layers=[] keeps no attention layer, so this is no hybrid: use kind='llamba' "
                          "(ssm_param='mamba2' for the hybrid's Mamba-2 parameterisation)")
    if sorted(attn_layers) == list(range(n)):
        raise ConfigError(f"attn_layers={attn_layers} keeps attention in all {n} layers: that is the teacher itself; "
                          "use kind='teacher', or leave at least one layer to Mamba")
    return sorted(attn_layers)


def _on_meta(sd: dict[str, torch.Tensor]) -> bool:
    """Whether the teacher's weights are all on the meta device (none loaded); refuses a teacher with only some
    there (offloaded by accelerate), whose weights cannot be copied from here."""
    meta = [name for name, t in sd.items() if t.device.type == "meta"]
    if meta and len(meta) < len(sd):
        raise ConfigError(f"teacher: {len(meta)} of its {len(sd)} tensors are on the meta device ({meta[0]}, ...: "
                          "offloaded or not loaded); load the whole teacher onto one device (no device_map offloading)")
    return bool(meta)


def expand_kv_blocks(w: torch.Tensor, n_kv: int, n_heads: int) -> torch.Tensor:
    """(n_kv*hd, d) -> (n_heads*hd, d): each KV head's block of rows repeated for its query group."""
    hd = w.shape[0] // n_kv
    return w.view(n_kv, hd, -1).repeat_interleave(n_heads // n_kv, dim=0).reshape(n_heads * hd, -1)


@torch.no_grad()
def init_mamba_from_attention(mixer: Mamba2Mixer, wq, wk, wv, wo, n_kv: int, biases=None) -> None:
    """`biases`: the attention's (bq, bk, bv), mapped onto the in_proj bias as the weights' rows are."""
    H, P, Hx = mixer.H, mixer.P, mixer.Hx
    hd = wq.shape[0] // H
    if P != hd:
        raise ConfigError(f"Mamba head size {P} differs from the attention head size {hd}; cannot map weights")
    if Hx != n_kv and Hx != H:
        raise ConfigError(f"ssm_kv_heads={Hx} must equal the teacher's KV heads ({n_kv}) or query heads ({H})")
    _map_rows(mixer, mixer.in_proj.weight, wq, wk, wv, n_kv)
    if biases is not None:
        if mixer.in_proj.bias is None:
            raise ConfigError("the teacher's q, k, v projections have biases but the student's in_proj has none")
        mixer.in_proj.bias.zero_()
        _map_rows(mixer, mixer.in_proj.bias[:, None], *(b[:, None] for b in biases), n_kv)
    mixer.out_proj.weight.copy_(wo)
    # identity conv: each channel passes its current input through
    mixer.conv1d.weight.zero_()
    mixer.conv1d.weight[:, 0, -1] = 1.0
    mixer.conv1d.bias.zero_()
    mixer.D.zero_()  # attention has no skip connection inside the mixer


def _map_rows(mixer: Mamba2Mixer, W: torch.Tensor, wq, wk, wv, n_kv: int) -> None:
    """In place: the x, B and C rows of an in_proj weight (or bias as a column) take V, K and Q's rows."""
    H, N, Hx = mixer.H, mixer.N, mixer.Hx
    hd = wq.shape[0] // H
    if Hx != n_kv:  # x and B per query head: each KV head's rows repeated for its group
        wk, wv = expand_kv_blocks(wk, n_kv, H), expand_kv_blocks(wv, n_kv, H)
    o_x = mixer.d_inner  # rows: z | x | B | C | dt
    o_b = o_x + mixer.d_x
    o_c = o_b + mixer.d_b
    W[o_x:o_b].copy_(wv)
    if N == hd:  # d_state equal to the head size: B and C take K and Q exactly
        W[o_b:o_c].copy_(wk)
        W[o_c:o_c + mixer.d_c].copy_(wq)
    elif N > hd:  # a larger state: K and Q in each head's first hd dimensions; C's others zero, so C.B = Q.K
        b = W[o_b:o_c].view(Hx, N, -1)
        c = W[o_c:o_c + mixer.d_c].view(H, N, -1)
        b[:, :hd].copy_(wk.view(Hx, hd, -1))
        c[:, :hd].copy_(wq.view(H, hd, -1))
        c[:, hd:].zero_()
