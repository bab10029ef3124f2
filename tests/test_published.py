"""Published students in their own formats (Cartesia's Llamba; MambaInLlama's Mamba-2 and Mamba-1 hybrids; M1's
layout) load as thinkfast models.

No published checkpoint can be downloaded here: each test writes a small random checkpoint in the published layout
(key names, row order, configs) and holds the converted model to a reference forward written here from the
published models' math, independently of thinkfast's mixer."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from thinkfast.cli import main
from thinkfast.errors import ThinkfastError
from thinkfast.models.teacher import load_thinkfast

ASSET = Path(__file__).resolve().parent.parent / "thinkfast" / "assets" / "tiny-teacher"


def _rms(x, w, eps=1e-5):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _causal_conv(xs, weight, bias):
    """Depthwise causal conv over time: xs (B, T, C), weight (C, 1, K)."""
    K = weight.shape[-1]
    padded = F.pad(xs.transpose(1, 2), (K - 1, 0))
    return (F.conv1d(padded, weight, bias, groups=xs.shape[-1])).transpose(1, 2)


def _scan(x, B, C, log_a, dt_scale):
    """Sequential SSM: h_t = a_t h + (dt_t x_t) B_t^T; y_t = h_t C_t. x (b,T,H,P), B/C (b,T,H,N), log_a/dt (b,T,H)."""
    b, T, H, P = x.shape
    h = x.new_zeros(b, H, P, B.shape[-1])
    ys = []
    for t in range(T):
        h = torch.exp(log_a[:, t])[..., None, None] * h + (dt_scale[:, t][..., None] * x[:, t])[..., None] * B[:, t][:, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    return torch.stack(ys, dim=1)


# ---------------------------------------------------------------------------------------------- Llamba


LLAMBA_CFG = {
    "d_model": 48, "n_layer": 2, "vocab_size": 264, "tie_embeddings": False, "pad_vocab_size_multiple": 8,
    "lm_head_bias": False, "norm_epsilon": 1e-5,
    "mlp_cfg": {"intermediate_size": 96, "bias": False, "act_fn": "silu"},
    "ssm_cfg": {"d_state": 8, "n_v_heads": 4, "n_qk_heads": 2, "expand": 1, "chunk_size": 16, "activation": "identity",
                "bias": False},
}


def llamba_weights(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, s, m = cfg["d_model"], cfg["ssm_cfg"], cfg["mlp_cfg"]["intermediate_size"]
    di, nv, nqk, N = d * s["expand"], s["n_v_heads"], s["n_qk_heads"], s["d_state"]
    V = cfg["vocab_size"]

    def r(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    w = {"backbone.embedding.weight": r(V, d, scale=1.0), "backbone.final_layernorm.weight": 1 + r(d), "lm_head.weight": r(V, d)}
    conv = di + 2 * nqk * N
    for i in range(cfg["n_layer"]):
        p = f"backbone.layers.{i}."
        in_proj = r(2 * di + 2 * nqk * N + nv, d, scale=0.2)
        in_proj[-nv:] *= 10  # A_log rows: decays spread well away from 0 and 1
        w |= {
            p + "mixer.in_proj.weight": in_proj, p + "mixer.z_bias": r(di, scale=0.5),
            p + "mixer.conv1d.weight": r(conv, 1, 4, scale=0.5), p + "mixer.conv1d.bias": r(conv),
            p + "mixer.D": r(nv, scale=1.0), p + "mixer.out_proj.weight": r(d, di, scale=0.2),
            p + "input_layernorm.weight": 1 + r(d), p + "post_attention_layernorm.weight": 1 + r(d),
            p + "mlp.gate_proj.weight": r(m, d), p + "mlp.up_proj.weight": r(m, d), p + "mlp.down_proj.weight": r(d, m),
        }
    return w


def llamba_reference(cfg: dict, w: dict, ids: torch.Tensor) -> torch.Tensor:
    """Cartesia's LlambaLMHeadModel forward, from its DiscreteMamba2: in_proj -> x|B|C|z|A_log, conv (no activation),
    a = exp(-softplus(A_log)), x not scaled (x / dt * dt), B and C shared by each group of n_v / n_qk heads,
    y + D x, y * silu(z + z_bias)."""
    d, s = cfg["d_model"], cfg["ssm_cfg"]
    di, nv, nqk, N = d * s["expand"], s["n_v_heads"], s["n_qk_heads"], s["d_state"]
    P = di // nv
    h = w["backbone.embedding.weight"][ids]
    b, T = ids.shape
    for i in range(cfg["n_layer"]):
        p = f"backbone.layers.{i}."
        u = _rms(h, w[p + "input_layernorm.weight"])
        xBC, z, A_log = torch.split(u @ w[p + "mixer.in_proj.weight"].T, [di + 2 * nqk * N, di, nv], dim=-1)
        xBC = _causal_conv(xBC, w[p + "mixer.conv1d.weight"], w[p + "mixer.conv1d.bias"])
        x, B, C = torch.split(xBC, [di, nqk * N, nqk * N], dim=-1)
        x = x.view(b, T, nv, P)
        group = torch.arange(nv) // (nv // nqk)  # head h reads group h // (heads per group)
        B, C = B.view(b, T, nqk, N)[:, :, group], C.view(b, T, nqk, N)[:, :, group]
        y = _scan(x, B, C, -F.softplus(A_log), torch.ones_like(A_log))
        y = y + w[p + "mixer.D"][:, None] * x
        y = y.reshape(b, T, di) * F.silu(z + w[p + "mixer.z_bias"])
        h = h + y @ w[p + "mixer.out_proj.weight"].T
        u = _rms(h, w[p + "post_attention_layernorm.weight"])
        h = h + (F.silu(u @ w[p + "mlp.gate_proj.weight"].T) * (u @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    return _rms(h, w["backbone.final_layernorm.weight"]) @ w["lm_head.weight"].T


def write_llamba(folder: Path, cfg: dict = LLAMBA_CFG, seed: int = 0, bin_file: bool = False) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    w = llamba_weights(cfg, seed)
    (folder / "config.json").write_text(json.dumps(cfg))
    if bin_file:
        torch.save(w, folder / "pytorch_model.bin")
    else:
        save_file(w, str(folder / "model.safetensors"))
    return w


def test_a_llamba_checkpoint_converts_to_the_same_logits(tmp_path):
    w = write_llamba(tmp_path / "llamba")
    model, tok = load_thinkfast(tmp_path / "llamba")
    assert tok is None and model.config.role == "llamba" and model.model_config.ssm_param == "discrete"
    ids = torch.randint(0, 264, (2, 23))
    with torch.no_grad():
        ours = model(ids).logits
    ref = llamba_reference(LLAMBA_CFG, w, ids)
    assert ref.abs().max() > 1  # not all near zero
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


def test_a_llamba_pytorch_bin_loads_with_tensors_only(tmp_path):
    w = write_llamba(tmp_path / "llamba", bin_file=True, seed=3)
    model, _ = load_thinkfast(tmp_path / "llamba")
    ids = torch.randint(0, 264, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, llamba_reference(LLAMBA_CFG, w, ids), atol=2e-4, rtol=1e-4)


def test_a_converted_llamba_decodes_step_by_step_as_its_forward(tmp_path):
    import thinkfast  # noqa: F401  (the engine's decode step for generate())

    write_llamba(tmp_path / "llamba", seed=1)
    model, _ = load_thinkfast(tmp_path / "llamba")
    ids = torch.randint(0, 264, (2, 7))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    recomputed = model.generate(ids, attention_mask=torch.ones_like(ids), use_cache=False, **kw)
    assert torch.equal(cached, recomputed)
    assert len(set(cached[0, 7:].tolist())) > 1  # not one token repeated: the state carries something


@pytest.mark.parametrize("change, needle", [
    ({"ssm_cfg": {**LLAMBA_CFG["ssm_cfg"], "activation": "silu"}}, "activation='silu' is not supported"),
    ({"ssm_cfg": {**LLAMBA_CFG["ssm_cfg"], "bias": True}}, "bias=True is not supported"),
    ({"ssm_cfg": {**LLAMBA_CFG["ssm_cfg"], "n_qk_heads": 3}}, "n_v_heads=4 must divide"),
    ({"lm_head_bias": True}, "lm_head_bias=True is not supported"),
    ({"n_layer": "2"}, "n_layer='2' must be a whole number of at least 1"),
    ({"mlp_cfg": {"intermediate_size": 0}}, "intermediate_size=0 must be a whole number of at least 1"),
])
def test_llamba_settings_thinkfast_cannot_reproduce_are_refused_in_one_line(tmp_path, capsys, change, needle):
    write_llamba(tmp_path / "llamba")
    (tmp_path / "llamba" / "config.json").write_text(json.dumps({**LLAMBA_CFG, **change}))
    assert main(["convert", str(tmp_path / "llamba"), "--out", str(tmp_path / "out"), "--tokenizer", str(ASSET)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "out").exists()


def test_a_missing_or_misshapen_weight_is_named_and_a_stray_one_warned_about(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="thinkfast")
    w = write_llamba(tmp_path / "llamba")
    save_file({**w, "backbone.extra.weight": torch.zeros(3)}, str(tmp_path / "llamba" / "model.safetensors"))
    load_thinkfast(tmp_path / "llamba")
    assert "1 checkpoint tensors have no place in the model and were ignored (backbone.extra.weight" in caplog.text
    del w["backbone.layers.1.mixer.D"]
    save_file(w, str(tmp_path / "llamba" / "model.safetensors"))
    with pytest.raises(ThinkfastError, match=r"weight backbone\.layers\.1\.mixer\.D is missing"):
        load_thinkfast(tmp_path / "llamba")
    w["backbone.layers.1.mixer.D"] = torch.ones(5)
    save_file(w, str(tmp_path / "llamba" / "model.safetensors"))
    with pytest.raises(ThinkfastError, match=r"mixer\.D has shape \(5,\) where its config implies \(4,\)"):
        load_thinkfast(tmp_path / "llamba")


# ---------------------------------------------------------------------------------------------- MambaInLlama


class ReferenceMamba2(nn.Module):
    """MambaInLlama's Mamba2 layer from its published math: in_proj -> z|x|B|C|dt, x and B in the teacher's KV-head
    shape (repeated per head, before or after the conv), SiLU conv, dt = softplus(dt + dt_bias), a = exp(-dt
    exp(A_log)), input scaled by dt, y + D x, RMSNorm of y * silu(z) over each head (group size d_state)."""

    def __init__(self, d_model, d_xb, d_inner, d_state, repeat_kv_before_conv=False):
        super().__init__()
        self.d_xb, self.d_inner, self.N, self.repeat_first = d_xb, d_inner, d_state, repeat_kv_before_conv
        self.H = d_inner // d_state
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * d_xb + self.H, bias=False)
        conv = 3 * d_inner if repeat_kv_before_conv else d_inner + 2 * d_xb
        self.conv1d = nn.Conv1d(conv, conv, 4, groups=conv, padding=3)
        self.dt_bias = nn.Parameter(torch.randn(self.H) * 0.5)
        self.A_log = nn.Parameter(torch.log(torch.empty(self.H).uniform_(1, 4)))
        self.D = nn.Parameter(torch.randn(self.H))
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(1 + 0.1 * torch.randn(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def _repeat(self, t, b, T):  # (b, T, d_xb) -> (b, T, H, N), each KV head's block repeated for its heads
        return t.view(b, T, self.d_xb // self.N, self.N).repeat_interleave(self.d_inner // self.d_xb, dim=2)

    def forward(self, u):
        b, T, _ = u.shape
        z, xBC, dt = torch.split(self.in_proj(u), [self.d_inner, 2 * self.d_xb + self.d_inner, self.H], dim=-1)
        if self.repeat_first:
            x, B, C = torch.split(xBC, [self.d_xb, self.d_xb, self.d_inner], dim=-1)
            xBC = torch.cat([self._repeat(x, b, T).flatten(2), self._repeat(B, b, T).flatten(2), C], dim=-1)
        xBC = F.silu(_causal_conv(xBC, self.conv1d.weight, self.conv1d.bias))
        if self.repeat_first:
            x, B, C = (t.view(b, T, self.H, self.N) for t in torch.split(xBC, self.d_inner, dim=-1))
        else:
            x, B, C = torch.split(xBC, [self.d_xb, self.d_xb, self.d_inner], dim=-1)
            x, B, C = self._repeat(x, b, T), self._repeat(B, b, T), C.view(b, T, self.H, self.N)
        dt = F.softplus(dt + self.dt_bias)
        y = _scan(x, B, C, -dt * torch.exp(self.A_log), dt) + self.D[:, None] * x
        g = y * F.silu(z.view(b, T, self.H, self.N))
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + 1e-5)
        return self.out_proj(g.reshape(b, T, self.d_inner) * self.norm.weight)


class ReferenceMamba1(nn.Module):
    """MambaInLlama's Mamba-1 layer (`mamba/`, as M1 has it) from its published math: x = in_proj_x (KV-head shape),
    z, B = B_proj (KV-head shape), C = C_proj, dt = dt_proj(dt_proj_down(u)) with dt_proj's bias added again by
    the scan (delta = softplus(dt + bias)); x repeated per head before or after a SiLU conv over x alone;
    per channel c: h = exp(delta_c A_c) h + delta_c x_c B; y = h C + D x; y * silu(z); out_proj."""

    def __init__(self, d_model, d_xb, d_inner, d_state, dt_rank, repeat_kv_before_conv=True):
        super().__init__()
        self.d_xb, self.d_inner, self.N, self.repeat_first = d_xb, d_inner, d_state, repeat_kv_before_conv
        self.in_proj_x = nn.Linear(d_model, d_xb, bias=False)
        self.in_proj_z = nn.Linear(d_model, d_inner, bias=False)
        self.B_proj = nn.Linear(d_model, d_xb, bias=False)
        self.C_proj = nn.Linear(d_model, d_inner, bias=False)
        self.dt_proj_down = nn.Linear(d_model, dt_rank, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        conv = d_inner if repeat_kv_before_conv else d_xb
        self.conv1d = nn.Conv1d(conv, conv, 4, groups=conv, padding=3)
        self.A_log = nn.Parameter(torch.log(torch.empty(d_inner, d_state).uniform_(0.5, 4)))
        self.D = nn.Parameter(torch.randn(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        with torch.no_grad():
            self.dt_proj.bias.normal_(-2, 0.5)

    def _repeat(self, t):  # (b, T, d_xb) -> (b, T, d_inner): each block of d_state repeated for its heads
        b, T, _ = t.shape
        return t.view(b, T, -1, self.N).repeat_interleave(self.d_inner // self.d_xb, dim=2).reshape(b, T, self.d_inner)

    def forward(self, u):
        b, T, _ = u.shape
        x, z = self.in_proj_x(u), self.in_proj_z(u)
        B = self._repeat(self.B_proj(u)).view(b, T, -1, self.N)
        C = self.C_proj(u).view(b, T, -1, self.N)
        delta = F.softplus(self.dt_proj(self.dt_proj_down(u)) + self.dt_proj.bias)
        if self.repeat_first:
            x = F.silu(_causal_conv(self._repeat(x), self.conv1d.weight, self.conv1d.bias))
        else:
            x = self._repeat(F.silu(_causal_conv(x, self.conv1d.weight, self.conv1d.bias)))
        A = -torch.exp(self.A_log)  # (d_inner, N)
        head = torch.arange(self.d_inner) // self.N
        h = u.new_zeros(b, self.d_inner, self.N)
        ys = []
        for t in range(T):
            h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * x[:, t])[..., None] * B[:, t, head]
            ys.append((h * C[:, t, head]).sum(-1))
        y = (torch.stack(ys, 1) + self.D * x) * F.silu(z)
        return self.out_proj(y)


class ReferenceMambaLayer(nn.Module):
    """MambaDecoderLayer: pre-norm Mamba2 and MLP, in place of a LlamaDecoderLayer."""

    def __init__(self, llama_layer, mamba):
        super().__init__()
        self.mamba, self.mlp = mamba, llama_layer.mlp
        self.input_layernorm, self.post_attention_layernorm = llama_layer.input_layernorm, llama_layer.post_attention_layernorm

    def forward(self, hidden_states, *args, **kwargs):
        h = hidden_states + self.mamba(self.input_layernorm(hidden_states))
        return h + self.mlp(self.post_attention_layernorm(h))


def write_mambainllama(folder: Path, mamba_layers=(0, 2), repeat_first=False, seed=0, tie=False, mamba1=False,
                       m1=False, d_state=16):
    """A LlamaForCausalLM with Mamba layers in place of some decoder layers, saved as MambaInLlama saves it (the
    Llama config.json, mamba_config.json, one state dict); returns the reference model. `m1`: M1's layout, the
    Mamba-1 projections fused into one in_proj and attention as mamba_ssm MHA modules (q | k | v in one in_proj),
    whose rotary embedding has no Llama-3 scaling: the reference runs plain RoPE, the saved config keeps the scaling."""
    from conftest import tiny_llama

    torch.manual_seed(seed)
    model = tiny_llama(vocab=264, hidden=64, layers=3, heads=4, kv_heads=2, tie=tie, seed=seed, rope_scaling=not m1)
    model.config.rms_norm_eps = 1e-5  # Llama-3's; MambaInLlama's gated norm has 1e-5 whatever the config says
    for layer in model.model.layers:
        layer.input_layernorm.variance_epsilon = layer.post_attention_layernorm.variance_epsilon = 1e-5
    model.model.norm.variance_epsilon = 1e-5
    hd, n_kv = 16, 2
    for i in mamba_layers:
        if mamba1:
            mamba = ReferenceMamba1(64, n_kv * hd, 64, d_state, dt_rank=4, repeat_kv_before_conv=repeat_first)
        else:
            mamba = ReferenceMamba2(64, n_kv * hd, 64, d_state, repeat_kv_before_conv=repeat_first)
        with torch.no_grad():
            for name, p in mamba.named_parameters():
                if name.endswith("proj.weight") or name.endswith("_proj_x.weight") or name.endswith("_proj_z.weight"):
                    p.normal_(0, 0.15)
        model.model.layers[i] = ReferenceMambaLayer(model.model.layers[i], mamba)
    folder.mkdir(parents=True, exist_ok=True)
    if m1:
        saved = tiny_llama(vocab=264, hidden=64, layers=3, heads=4, kv_heads=2, tie=tie).config
        saved.rms_norm_eps = 1e-5
        saved.save_pretrained(folder)
    else:
        model.config.save_pretrained(folder)
    attn = [i for i in range(3) if i not in mamba_layers]
    if mamba1:  # MambaInLlama's Mamba-1 repeats x before its conv unless told otherwise
        ssm_cfg = {"expand": 1, "d_state": d_state, "dt_rank": 4,
                   **({} if repeat_first else {"repeat_kv_before_conv": False})}
    else:
        ssm_cfg = {"expand": 1, "ngroups": 64 // d_state, "d_state": d_state,
                   **({"repeat_kv_before_conv": True} if repeat_first else {})}
    (folder / "mamba_config.json").write_text(json.dumps({
        "d_model": 64, "ssm_cfg": ssm_cfg, "rms_norm_eps": 1e-5, "vocab_size": 264, "d_inner": 64, "d_xb": n_kv * hd,
        "intermediate_size": model.config.intermediate_size, "hidden_act": "silu", "n_layer": 3, "attn_layers": attn}))
    # a tied head saved as its own tensor, as a training script's plain state_dict holds it
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if m1:
        for i in range(3):
            p = f"model.layers.{i}."
            if i in attn:
                sd[p + "mha.in_proj.weight"] = torch.cat([sd.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
                sd[p + "mha.out_proj.weight"] = sd.pop(p + "self_attn.o_proj.weight")
            else:
                parts = ["in_proj_z", "in_proj_x", "B_proj", "C_proj", "dt_proj_down"]
                sd[p + "mamba.in_proj.weight"] = torch.cat([sd.pop(p + f"mamba.{n}.weight") for n in parts])
    save_file(sd, str(folder / "model.safetensors"))
    return model.eval()


@pytest.mark.parametrize("mamba_layers, repeat_first, tie, d_state", [
    ((0, 2), False, False, 16), ((0, 1, 2), False, True, 16), ((1,), True, False, 16),
    ((0, 2), False, False, 8),  # 8 Mamba heads of 8 beside 4 attention heads of 16
])
def test_a_mambainllama_checkpoint_converts_to_the_same_logits(tmp_path, caplog, mamba_layers, repeat_first, tie, d_state):
    caplog.set_level(logging.WARNING, logger="thinkfast")
    ref = write_mambainllama(tmp_path / "mil", mamba_layers, repeat_first, tie=tie, d_state=d_state)
    model, _ = load_thinkfast(tmp_path / "mil")
    cfg = model.model_config
    assert cfg.attn_layers == [i for i in range(3) if i not in mamba_layers] and cfg.ssm_norm_group == d_state
    assert (cfg.n_ssm_heads, cfg.ssm_hd, cfg.n_heads, cfg.hd) == (64 // d_state, d_state, 4, 16)
    assert cfg.tie_embeddings == tie and "were ignored" not in caplog.text
    ids = torch.randint(0, 264, (2, 19))
    with torch.no_grad():
        expected = ref(ids, use_cache=False).logits
        torch.testing.assert_close(model(ids).logits, expected, atol=2e-4, rtol=1e-4)
    # the per-head norm matters: normalising all 64 features at once gives other logits
    model.lm.layers[mamba_layers[0]].mixer.norm.group = None
    with torch.no_grad():
        assert (model(ids).logits - expected).abs().max() > 1e-2


@pytest.mark.parametrize("mamba_layers, repeat_first, d_state", [((0, 2), True, 16), ((0, 1, 2), False, 16),
                                                                 ((0, 2), True, 4)])
def test_a_mamba1_mambainllama_checkpoint_converts_to_the_same_logits(tmp_path, mamba_layers, repeat_first, d_state):
    # MambaInLlama's own Mamba-1 students keep d_state 16 whatever the attention's head size: heads of 16 channels
    ref = write_mambainllama(tmp_path / "mil", mamba_layers, repeat_first, mamba1=True, d_state=d_state)
    model, _ = load_thinkfast(tmp_path / "mil")
    cfg = model.model_config
    heads, kv_heads = 64 // d_state, 32 // d_state
    assert (cfg.ssm_param, cfg.dt_rank, cfg.n_ssm_heads, cfg.ssm_hd) == ("mamba1", 4, heads, d_state)
    assert cfg.ssm_kv_heads == (heads if repeat_first else kv_heads)
    ids = torch.randint(0, 264, (2, 17))
    with torch.no_grad():
        expected = ref(ids, use_cache=False).logits
        torch.testing.assert_close(model(ids).logits, expected, atol=2e-4, rtol=1e-4)
        # MambaInLlama's doubled dt bias matters: with it once, other logits
        for i in mamba_layers:
            model.lm.layers[i].mixer.dt_proj.bias /= 2
        assert (model(ids).logits - expected).abs().max() > 1e-2


def test_an_m1_checkpoint_converts_to_the_same_logits(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="thinkfast")
    ref = write_mambainllama(tmp_path / "m1", (0, 2), repeat_first=True, mamba1=True, m1=True)
    assert json.loads((tmp_path / "m1" / "config.json").read_text())["rope_parameters"]["rope_type"] == "llama3"
    model, _ = load_thinkfast(tmp_path / "m1")
    assert model.model_config.rope_params is None and "use plain RoPE" in caplog.text
    ids = torch.randint(0, 264, (2, 40))
    with torch.no_grad():
        expected = ref(ids, use_cache=False).logits
        torch.testing.assert_close(model(ids).logits, expected, atol=2e-4, rtol=1e-4)
        # the config's Llama-3 scaling would be another model
        scaled = model.model_config.replace(rope_params=json.loads((tmp_path / "m1" / "config.json").read_text())
                                            ["rope_parameters"])
        from thinkfast.models.mixers import Rotary

        scaled.rope_params.pop("rope_theta")
        model.lm.rotary = Rotary(scaled)
        assert (model(ids).logits - expected).abs().max() > 1e-3


def test_a_converted_mamba1_hybrid_decodes_as_its_forward_in_generate_and_the_engine(tmp_path):
    from thinkfast.engine.engine import Engine
    from thinkfast.engine.sampling import SamplingParams

    write_mambainllama(tmp_path / "mil", (0, 2), mamba1=True, d_state=4)  # 16 Mamba heads of 4 channels
    model, _ = load_thinkfast(tmp_path / "mil")
    ids = torch.randint(0, 264, (2, 6))
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(ids))
    recomputed = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(model.generate(ids, **kw), recomputed)
    # a left-padded row decodes as the same prompt alone
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids[:1]], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], dim=1)
    out = model.generate(padded, **{**kw, "attention_mask": mask})
    assert torch.equal(out[:, 3:], recomputed[:1])
    # the engine (3 slots for 4 samples: rows refilled) greedy = generate()
    eng = Engine(model, None, max_len=32, batch_size=3, stop_ids=[])
    done = list(eng.generate([(str(i), ids[i].tolist()) for i in range(2)], n=2,
                             params=SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)))
    assert len(done) == 4
    for c in done:
        assert list(c.tokens) == recomputed[int(c.problem_id), 6:].tolist()


def test_the_matrix_stage_refuses_mamba1_layers_in_one_line(tmp_path):
    write_mambainllama(tmp_path / "mil", (0, 2), mamba1=True)
    model, _ = load_thinkfast(tmp_path / "mil")
    with pytest.raises(ThinkfastError, match="a Mamba-1 layer has a decay per channel and state dimension"):
        model.lm.layers[0].mixer.matrix(torch.zeros(1, 3, 64))


def test_a_converted_mambainllama_hybrid_decodes_step_by_step_as_its_forward(tmp_path):
    import thinkfast  # noqa: F401

    write_mambainllama(tmp_path / "mil", (0, 2), d_state=8)  # 8 Mamba-2 heads of 8 beside 4 attention heads of 16
    model, _ = load_thinkfast(tmp_path / "mil")
    ids = torch.randint(0, 264, (2, 6))
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(ids))
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))


@pytest.mark.parametrize("change, needle", [
    ({"attn_layers": [2]}, "mamba_config.json lists attention at [2], the weights have it at [1]"),
    ({"ssm_cfg": {"expand": 1, "ngroups": 3, "d_state": 32}}, "ngroups=3 do not make whole heads"),
    ({"ssm_cfg": {"expand": 1, "ngroups": 2, "d_state": 32}}, "config and weights do not belong together"),
    ({"ssm_cfg": {"expand": 1, "ngroups": 4, "d_state": 16, "D_has_hdim": True}}, "D_has_hdim=True is not supported"),
    ({"ssm_cfg": {"expand": 1, "ngroups": 4, "d_state": 16, "norm_before_gate": True}}, "norm_before_gate=True"),
    ({"attn_layers": 5}, "lists attention at 5,"),  # damaged values: one line, not a TypeError from sorting them
    ({"attn_layers": [1, "x"]}, "lists attention at [1, 'x']"),
])
def test_mambainllama_settings_thinkfast_cannot_reproduce_are_refused_in_one_line(tmp_path, capsys, change, needle):
    write_mambainllama(tmp_path / "mil", (0, 2))
    cfg = json.loads((tmp_path / "mil" / "mamba_config.json").read_text())
    (tmp_path / "mil" / "mamba_config.json").write_text(json.dumps({**cfg, **change}))
    assert main(["convert", str(tmp_path / "mil"), "--out", str(tmp_path / "out"), "--tokenizer", str(ASSET)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


def test_a_converted_mambainllama_keeps_the_stop_tokens_of_its_generation_config(tmp_path):
    write_mambainllama(tmp_path / "mil", (0, 2))
    cfg = json.loads((tmp_path / "mil" / "config.json").read_text())
    (tmp_path / "mil" / "generation_config.json").write_text(json.dumps({"eos_token_id": [cfg.get("eos_token_id", 2), 7, 9]}))
    model, _ = load_thinkfast(tmp_path / "mil")
    assert model.config.eos_token_id == model.generation_config.eos_token_id == [cfg.get("eos_token_id", 2), 7, 9]


def test_mamba_ssm_style_mamba1_layers_are_refused_in_one_line(tmp_path):
    write_mambainllama(tmp_path / "mil", (0,))
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "mil" / "model.safetensors"))
    w["model.layers.0.mamba.x_proj.weight"] = torch.zeros(4, 4)
    save_file(w, str(tmp_path / "mil" / "model.safetensors"))
    with pytest.raises(ThinkfastError, match=r"Mamba layers with x_proj \(mamba_ssm's own Mamba-1 layout\)"):
        load_thinkfast(tmp_path / "mil")


# ---------------------------------------------------------------------------------------------- convert, hub


def test_convert_writes_a_folder_that_sample_and_the_auto_classes_read(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    w = write_llamba(tmp_path / "llamba", seed=2)
    out = tmp_path / "converted"
    assert main(["convert", str(tmp_path / "llamba"), "--out", str(out), "--tokenizer", str(ASSET)]) == 0
    assert "thinkfast llamba" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 260, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, llamba_reference(LLAMBA_CFG, w, ids), atol=2e-4, rtol=1e-4)
    assert model.config.eos_token_id == 258  # the tokenizer's, as nothing in Llamba's config names one
    assert model.generation_config.eos_token_id == 258  # which is what transformers 5's generate() reads
    torch.manual_seed(0)
    prompt = torch.randint(0, 258, (1, 4))
    with torch.no_grad():
        first = model(prompt).logits[0, -1].argmax()
        model.generation_config.eos_token_id = int(first)  # a stop on the first token ends the generation there
        assert model.generate(prompt, max_new_tokens=5, do_sample=False).shape[1] == 5
    samples = tmp_path / "s.jsonl"
    assert main(["sample", "--model", str(out), "--data", "rg:chain_sum?size=2", "--n", "2", "--max-new-tokens", "8",
                 "--out", str(samples), "--quiet"]) == 0
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 4 and {r["role"] for r in rows} == {"llamba"} and len({r["problem_id"] for r in rows}) == 2


def test_convert_keeps_or_changes_the_dtype(tmp_path):
    from transformers import AutoModelForCausalLM

    # bf16 weights with fp32 D, as Mamba checkpoints often keep their SSM parameters
    w = {k: v.to(torch.float32 if k.endswith(".D") else torch.bfloat16) for k, v in llamba_weights(LLAMBA_CFG).items()}
    (tmp_path / "llamba").mkdir()
    (tmp_path / "llamba" / "config.json").write_text(json.dumps(LLAMBA_CFG))
    save_file(w, str(tmp_path / "llamba" / "model.safetensors"))
    assert main(["convert", str(tmp_path / "llamba"), "--out", str(tmp_path / "a"), "--tokenizer", str(ASSET)]) == 0
    kept = AutoModelForCausalLM.from_pretrained(tmp_path / "a", dtype="auto")
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    assert main(["convert", str(tmp_path / "llamba"), "--out", str(tmp_path / "b"), "--tokenizer", str(ASSET),
                 "--dtype", "float32"]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "b", dtype="auto").dtype == torch.float32


def test_convert_refuses_without_a_tokenizer_and_never_overwrites_other_files(tmp_path, capsys):
    write_llamba(tmp_path / "llamba")
    assert main(["sample", "--model", str(tmp_path / "llamba"), "--data", "rg:chain_sum?size=2",
                 "--out", str(tmp_path / "s.jsonl"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"thinkfast convert {tmp_path / 'llamba'} --tokenizer TEACHER --out DIR" in err, err
    assert main(["convert", str(tmp_path / "llamba"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no tokenizer beside the weights; pass --tokenizer" in err, err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(["convert", str(tmp_path / "llamba"), "--out", str(other), "--tokenizer", str(ASSET)]) == 2
    assert "holds other files" in capsys.readouterr().err and (other / "notes.txt").read_text() == "keep me"
    # a thinkfast model folder that is also a training run's (checkpoints, logs): the swap would delete them
    run = tmp_path / "run"
    assert main(["convert", str(tmp_path / "llamba"), "--out", str(run), "--tokenizer", str(ASSET)]) == 0
    (run / "run.json").write_text("{}")
    before = sorted(p.name for p in run.iterdir())
    assert main(["convert", str(tmp_path / "llamba"), "--out", str(run), "--tokenizer", str(ASSET), "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds 'run.json' beside its model" in err and sorted(p.name for p in run.iterdir()) == before
    (run / "run.json").unlink()  # a plain model folder is replaced
    assert main(["convert", str(tmp_path / "llamba"), "--out", str(run), "--tokenizer", str(ASSET), "--dtype", "bfloat16"]) == 0
    # a tokenizer with ids past the model's vocabulary (another model's) fails at convert time, not mid-sampling
    from transformers import AutoTokenizer

    big = AutoTokenizer.from_pretrained(ASSET)
    big.add_tokens([f"<extra_{i}>" for i in range(400)])
    big.save_pretrained(tmp_path / "big-tok")
    assert main(["convert", str(tmp_path / "llamba"), "--out", str(tmp_path / "c2"), "--tokenizer", str(tmp_path / "big-tok")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "but the model's vocabulary" in err and not (tmp_path / "c2").exists()


def test_cached_hub_students_load_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    import thinkfast.models.teacher as teacher

    monkeypatch.setattr(teacher, "hub_reachable", lambda: False)
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    def snapshot(name):
        (cache / f"models--org--{name}" / "refs").mkdir(parents=True)
        (cache / f"models--org--{name}" / "refs" / "main").write_text("abc")
        return cache / f"models--org--{name}" / "snapshots" / "abc"

    w = write_llamba(snapshot("llamba"))
    ref = write_mambainllama(snapshot("mil"), (0, 2))
    ids = torch.randint(0, 264, (1, 8))
    with torch.no_grad():
        llamba, _ = load_thinkfast("org/llamba")
        torch.testing.assert_close(llamba(ids).logits, llamba_reference(LLAMBA_CFG, w, ids), atol=2e-4, rtol=1e-4)
        hybrid, _ = load_thinkfast("org/mil")  # its config.json is a Llama one: mamba_config.json tells them apart
        assert hybrid.config.role == "hybrid"
        torch.testing.assert_close(hybrid(ids).logits, ref(ids, use_cache=False).logits, atol=2e-4, rtol=1e-4)
    shutil.rmtree(cache)


def test_bench_times_published_students_with_their_roles(tmp_path):
    write_llamba(tmp_path / "llamba")
    write_mambainllama(tmp_path / "mil", (0, 2))
    js = tmp_path / "rows.json"
    assert main(["bench", "--model", str(tmp_path / "llamba"), "--model", str(tmp_path / "mil"), "--hf-students",
                 "--configs", "2x6x4", "--no-isolate", "--out", str(tmp_path / "m.md"), "--json", str(js)]) == 0
    rows = json.loads(js.read_text())
    assert [(r["model"], r["role"], r["engine"], r["generated_tokens"]) for r in rows] == [
        ("llamba", "llamba", "thinkfast", 8), ("llamba-hf", "llamba", "hf", 8),
        ("mil", "hybrid", "thinkfast", 8), ("mil-hf", "hybrid", "hf", 8)]


@pytest.mark.parametrize("mamba1", [False, True])
def test_distill_keeps_training_a_published_hybrid_from_its_teacher(tmp_path, capsys, mamba1):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import tiny_llama

    ref = write_mambainllama(tmp_path / "mil", (0, 2), seed=4, mamba1=mamba1)
    teacher = tiny_llama(vocab=264, hidden=64, layers=3, heads=4, kv_heads=2, tie=False, seed=4)  # the same start
    teacher.save_pretrained(tmp_path / "teacher")
    AutoTokenizer.from_pretrained(ASSET).save_pretrained(tmp_path / "teacher")
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "mil"), "--stages", "kd",
                 "--tokens", "256", "--seq-len", "64", "--batch-size", "2", "--data", "rg:chain_sum?size=8",
                 "--instruction", "none", "--no-progress", "--out", str(out)]) == 0
    trained = AutoModelForCausalLM.from_pretrained(out)
    cfg = trained.model_config
    assert (cfg.attn_layers, cfg.ssm_param) == ([1], "mamba1" if mamba1 else "mamba2")
    assert cfg.ssm_norm_group == (None if mamba1 else 16)
    ids = torch.randint(0, 260, (1, 12))
    with torch.no_grad():  # trained: no longer the published weights
        assert (trained(ids).logits - ref(ids, use_cache=False).logits).abs().max() > 1e-3
    if mamba1:  # MOHAWK's matrix stage has no per-head matrix to compare for a Mamba-1 layer: one line
        capsys.readouterr()
        assert main(["distill", "--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "mil"), "--stages",
                     "matrix", "--tokens", "128", "--seq-len", "64", "--batch-size", "2", "--data", "rg:chain_sum?size=8",
                     "--instruction", "none", "--no-progress", "--out", str(tmp_path / "run2")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Mamba-1 layers, and MOHAWK's matrix stage compares one mixing matrix" in err, err
        assert not (tmp_path / "run2").exists()


def test_new_students_are_not_mamba1():
    from conftest import tiny_llama
    from thinkfast.models import from_teacher

    with pytest.raises(ThinkfastError, match="ssm_param='mamba1' comes only with converted checkpoints"):
        from_teacher(tiny_llama(), kind="hybrid", ssm_param="mamba1")


def test_convert_rewrites_a_thinkfast_folder_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    assert main(["convert", str(ASSET), "--out", str(tmp_path / "copy")]) == 0
    ids = torch.randint(0, 260, (1, 12))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(ASSET)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "copy")(ids).logits
    assert torch.equal(a, b)
    assert (tmp_path / "copy" / "tokenizer.json").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mamba1", [False, True])
def test_converted_hybrids_decode_on_a_gpu_with_cuda_graphs(tmp_path, mamba1):
    """The engine's CUDA-graph step over converted Mamba-2 and Mamba-1 hybrids (fp32, Mamba heads unlike the
    attention's) gives the greedy tokens of recomputing the whole sequence."""
    from thinkfast.engine.engine import Engine
    from thinkfast.engine.sampling import SamplingParams

    write_mambainllama(tmp_path / "mil", (0, 2), mamba1=mamba1, d_state=4 if mamba1 else 8)
    model, _ = load_thinkfast(tmp_path / "mil", device="cuda")
    ids = torch.randint(0, 264, (2, 6), device="cuda")
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(ids))
    recomputed = model.generate(ids, use_cache=False, **kw)
    eng = Engine(model, None, max_len=32, batch_size=4, stop_ids=[], cuda_graphs=True)
    done = list(eng.generate([(str(i), ids[i].tolist()) for i in range(2)], n=1,
                             params=SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)))
    assert len(done) == 2
    for c in done:
        assert list(c.tokens) == recomputed[int(c.problem_id), 6:].tolist()
