"""Token mixers: Llama softmax attention (RoPE, GQA, static KV cache) and the Mamba-2 (SSD) mixer.

Both expose the same three entry points:
  forward(x, positions, attention_mask, cache)  whole sequence (training, prefill; fills `cache` when given)
  step(x, positions, cache)                     one token per row (decode), rows may sit at different positions
  matrix(x, positions)                          the (B, H, T, T) token-mixing matrix (MOHAWK stage 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..ops.selective import selective_scan, selective_step
from ..ops.ssd import autocast_off, ssd_matrix, ssd_scan, ssd_step
from .config import ROPE_TYPES, ModelConfig, rope_type


class RMSNorm(nn.Module):
    """`group`: normalise each run of that many features on its own (one weight over all of them)."""

    def __init__(self, dim: int, eps: float = 1e-5, group: int | None = None):
        super().__init__()
        self.eps = eps
        self.group = group if group and group != dim else None
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        if self.group is not None:
            h = h.unflatten(-1, (-1, self.group))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.group is not None:
            h = h.flatten(-2)
        return self.weight * h.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward, as in Llama."""

    def __init__(self, d_model: int, d_mlp: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_mlp, bias=False)
        self.up_proj = nn.Linear(d_model, d_mlp, bias=False)
        self.down_proj = nn.Linear(d_mlp, d_model, bias=False)

    def forward(self, x, linear=None):
        """`linear(x, weight)`: the engine's decode step passes its own GEMM (oneDNN for large CPU weights); the
        model calls the modules, so wrappers of them (LoRA, sharding hooks) still apply in training."""
        if linear is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return linear(F.silu(linear(x, self.gate_proj.weight)) * linear(x, self.up_proj.weight), self.down_proj.weight)


# ---------------------------------------------------------------- rotary embeddings


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (hd/2,) with the rope types Llama-family checkpoints use: default, linear, llama3, yarn."""
    hd = cfg.hd
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    rs = cfg.rope_params or {}
    kind = rope_type(rs)
    if kind == "default":
        pass
    elif kind == "linear":
        inv_freq = inv_freq / rs["factor"]
    elif kind == "llama3":
        factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_len = rs["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind == "yarn":  # YaRN (Peng et al., 2023): interpolate the slow dimensions, keep the fast ones
        factor, old_len = rs["factor"], rs["original_max_position_embeddings"]

        def dimension(rotations):  # the dimension that turns `rotations` times over the original context
            return hd * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

        low, high = dimension(rs.get("beta_fast") or 32), dimension(rs.get("beta_slow") or 1)
        if rs.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, hd - 1)
        ramp = ((torch.arange(hd // 2, dtype=torch.float64) - low) / (high - low if high != low else 1e-3)).clamp(0, 1)
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    else:
        raise ValueError(f"rope_type {kind!r} is not supported ({', '.join(ROPE_TYPES)})")  # configs refuse it first
    return inv_freq.float()


def rope_attention_factor(cfg: ModelConfig) -> float:
    """What cos and sin are scaled by: YaRN's temperature (1 for the other rope types)."""
    rs = cfg.rope_params or {}
    if rope_type(rs) != "yarn":
        return 1.0
    if rs.get("attention_factor") is not None:
        return float(rs["attention_factor"])

    def mscale(scale, weight=1.0):
        return 1.0 if scale <= 1 else 0.1 * weight * math.log(scale) + 1.0

    factor = rs["factor"]
    if rs.get("mscale") and rs.get("mscale_all_dim"):  # DeepSeek's form
        return mscale(factor, rs["mscale"]) / mscale(factor, rs["mscale_all_dim"])
    return mscale(factor)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, hd); cos/sin (B, T, hd)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)


class Rotary(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # recomputed from the config rather than saved: no buffer to lose on meta-device loading
        self.cfg = cfg
        self._inv_freq: dict[torch.device, torch.Tensor] = {}
        self.scale = rope_attention_factor(cfg)

    def forward(self, positions: torch.Tensor):
        """positions (B, T) int -> cos, sin (B, T, hd) fp32."""
        dev = positions.device
        if dev not in self._inv_freq:
            self._inv_freq[dev] = rope_inv_freq(self.cfg).to(dev)
        freqs = positions.float().unsqueeze(-1) * self._inv_freq[dev]
        emb = torch.cat((freqs, freqs), dim=-1)
        if self.scale != 1.0:
            return emb.cos() * self.scale, emb.sin() * self.scale
        return emb.cos(), emb.sin()


# ---------------------------------------------------------------- decode caches


@dataclass
class KVCache:
    k: torch.Tensor  # (B, n_kv, S, hd)
    v: torch.Tensor

    def copy_rows_(self, dst: torch.Tensor, src: "KVCache", src_rows: torch.Tensor, length: int | None = None,
                   offset: int = 0):
        """Positions [:length] of rows `dst` take positions [offset:offset + length] of `src_rows` (offset: a
        left-padded prefill's pads)."""
        n = self.k.shape[2] if length is None else length
        self.k[dst, :, :n] = src.k[src_rows, :, offset:offset + n]
        self.v[dst, :, :n] = src.v[src_rows, :, offset:offset + n]


@dataclass
class SSMCache:
    conv: torch.Tensor  # (B, conv_dim, d_conv - 1): the last inputs of the causal conv
    ssm: torch.Tensor  # (B, H, P, N), fp32 unless allocated otherwise

    def copy_rows_(self, dst: torch.Tensor, src: "SSMCache", src_rows: torch.Tensor, length: int | None = None,
                   offset: int = 0):
        self.conv[dst] = src.conv[src_rows]
        self.ssm[dst] = src.ssm[src_rows].to(self.ssm.dtype)  # a prefill's fp32 state into a bf16 engine state


# ---------------------------------------------------------------- attention


def padding_aware_causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 -> (B, 1, T, T) bool: causal, pads never attended; a pad row sees itself so softmax stays finite."""
    T = attention_mask.shape[1]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=attention_mask.device))
    keys = attention_mask.bool()[:, None, None, :]
    eye = torch.eye(T, dtype=torch.bool, device=attention_mask.device)
    return (causal & keys) | eye


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.hd
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = self.hd**-0.5

    def _qkv(self, x, cos, sin):
        Bsz, T, _ = x.shape
        q = self.q_proj(x).view(Bsz, T, self.n_heads, self.hd)
        k = self.k_proj(x).view(Bsz, T, self.n_kv, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(Bsz, T, self.n_kv, self.hd).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v  # (B, heads, T, hd)

    def _expand(self, t):
        # per head block: query head h reads kv head h // group
        return t.repeat_interleave(self.n_heads // self.n_kv, dim=1)

    def forward(self, x, rope, attention_mask=None, cache: KVCache | None = None):
        Bsz, T, _ = x.shape
        q, k, v = self._qkv(x, *rope)
        if cache is not None:  # prefill from position 0
            cache.k[:, :, :T] = k.to(cache.k.dtype)
            cache.v[:, :, :T] = v.to(cache.v.dtype)
        k, v = self._expand(k), self._expand(v)
        if attention_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=padding_aware_causal_mask(attention_mask), scale=self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(Bsz, T, -1))

    def step(self, x, rope, positions, cache: KVCache, kv_len: int | None = None):
        """x (B, D); positions (B,); attends to cache[:, :, :kv_len] (default: the whole static cache)."""
        Bsz = x.shape[0]
        q, k, v = self._qkv(x.unsqueeze(1), *rope)  # (B, heads, 1, hd)
        rows = torch.arange(Bsz, device=x.device)
        cache.k[rows, :, positions] = k[:, :, 0].to(cache.k.dtype)
        cache.v[rows, :, positions] = v[:, :, 0].to(cache.v.dtype)
        S = cache.k.shape[2] if kv_len is None else kv_len
        K, V = cache.k[:, :, :S], cache.v[:, :, :S]  # (B, n_kv, S, hd)
        G = self.n_heads // self.n_kv
        qg = q.view(Bsz, self.n_kv, G, self.hd)
        scores = torch.matmul(qg, K.transpose(-1, -2).to(qg.dtype)) * self.scale  # (B, n_kv, G, S)
        valid = torch.arange(S, device=x.device)[None, :] <= positions[:, None]  # (B, S)
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        p = torch.softmax(scores.float(), dim=-1).to(qg.dtype)
        y = torch.matmul(p, V.to(qg.dtype)).reshape(Bsz, self.n_heads * self.hd)
        return self.o_proj(y)

    def matrix(self, x, rope, attention_mask=None):
        """Softmax attention probabilities (B, H, T, T), computed eagerly."""
        q, k, _ = self._qkv(x, *rope)
        k = self._expand(k)
        with autocast_off(x.device.type):  # fp32 scores under a bf16 autocast too
            scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.scale
        T = x.shape[1]
        if attention_mask is None:
            mask = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))
        else:
            mask = padding_aware_causal_mask(attention_mask)
        return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)

    def allocate_cache(self, batch, max_len, device, dtype, ssm_dtype=None) -> KVCache:
        shape = (batch, self.n_kv, max_len, self.hd)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))


# ---------------------------------------------------------------- Mamba-2 (SSD) mixer


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


class Mamba2Mixer(nn.Module):
    """Mamba-2 mixer with grouped-query-shaped x and B, so attention weights map onto it one to one.

    in_proj -> [z (H*P) | x (Hx*P) | B (Hx*N) | C (H*N) | dt (H)]; causal depthwise conv over [x | B | C];
    x and B expanded per head block to H heads; SSD recurrence; + D x; gate with silu(z); out_proj.
    `ssm_param="discrete"` (Llamba): log a_t = -softplus(dt_t + dt_bias), input not scaled, conv without activation.
    `ssm_param="mamba2"` (MambaInLlama): dt = softplus(dt_t + dt_bias), log a_t = -dt exp(A_log), input scaled by dt,
    SiLU after the conv, gated RMSNorm when `use_ssm_norm`.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.H, self.P, self.N, self.Hx = cfg.n_ssm_heads, cfg.ssm_hd, cfg.n_state, cfg.n_xb_heads
        self.d_inner = self.H * self.P
        self.d_x = self.Hx * self.P
        self.d_b = self.Hx * self.N
        self.d_c = self.H * self.N
        self.conv_dim = self.d_x + self.d_b + self.d_c
        self.discrete = cfg.ssm_param == "discrete"
        # a bias where the teacher's q, k, v had one, so that x, B and C can take theirs (z and dt start at zero)
        self.in_proj = nn.Linear(cfg.d_model, self.d_inner + self.conv_dim + self.H, bias=cfg.qkv_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim, padding=cfg.d_conv - 1)
        self.dt_bias = nn.Parameter(torch.zeros(self.H))
        if not self.discrete:
            self.A_log = nn.Parameter(torch.zeros(self.H))
        self.D = nn.Parameter(torch.ones(self.H))
        self.norm = RMSNorm(self.d_inner, cfg.rms_norm_eps, cfg.ssm_norm_group) if cfg.use_ssm_norm else None
        # from a teacher with q/k norms (Qwen3): C and B normalised per head as q and k were, with their weights
        self.c_norm = RMSNorm(self.N, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.b_norm = RMSNorm(self.N, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self):
        """Decay and step-size parameters as Mamba-2 initialises them (log-uniform dt in [1e-3, 0.1], A in [1, 16])."""
        H = self.H
        dt = torch.exp(torch.rand(H) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        if self.discrete:
            # a = exp(-softplus(dt_bias)) spread over [0.9, 0.999]: from short to long memory across heads
            a = torch.exp(torch.rand(H) * (math.log(0.999) - math.log(0.9)) + math.log(0.9))
            self.dt_bias.copy_(inverse_softplus(-torch.log(a)))
        else:
            self.dt_bias.copy_(inverse_softplus(dt))
            self.A_log.copy_(torch.log(torch.empty(H).uniform_(1, 16)))
        self.D.fill_(1.0)

    def _split(self, zxbcdt):
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.H], dim=-1)

    def _heads(self, xBC, dt_raw):
        """Post-conv activations -> per-head x (unscaled), x fed to the scan, B, C (all H heads), log a."""
        lead = xBC.shape[:-1]
        x, B, C = torch.split(xBC, [self.d_x, self.d_b, self.d_c], dim=-1)
        g = self.H // self.Hx
        x = x.reshape(*lead, self.Hx, self.P).repeat_interleave(g, dim=-2)
        B = B.reshape(*lead, self.Hx, self.N)
        C = C.reshape(*lead, self.H, self.N)
        if self.c_norm is not None:
            B, C = self.b_norm(B), self.c_norm(C)
        B = B.repeat_interleave(g, dim=-2)
        if self.discrete:
            log_a = -F.softplus(dt_raw.float() + self.dt_bias)
            x_in = x
        else:
            dt = F.softplus(dt_raw.float() + self.dt_bias)
            log_a = -dt * torch.exp(self.A_log.float())
            x_in = x * dt.unsqueeze(-1).to(x.dtype)
        return x, x_in, B, C, log_a

    def _gate_out(self, y, z, linear=None):
        if self.norm is not None:
            y = self.norm(y * F.silu(z))
        else:
            y = y * F.silu(z)
        return self.out_proj(y) if linear is None else linear(y, self.out_proj.weight)

    def _conv_seq(self, xBC, T):
        """xBC (B, T, conv_dim) -> causal depthwise conv output (B, T, conv_dim)."""
        out = self.conv1d(xBC.transpose(1, 2))[..., :T].transpose(1, 2)
        return out if self.discrete else F.silu(out)

    def forward(self, x, rope=None, attention_mask=None, cache: SSMCache | None = None):
        Bsz, T, _ = x.shape
        z, xBC, dt_raw = self._split(self.in_proj(x))
        if attention_mask is not None:
            xBC = xBC * attention_mask[..., None].to(xBC.dtype)
        if cache is not None and self.cfg.d_conv > 1:  # a width-1 conv keeps no past inputs
            k = self.cfg.d_conv - 1
            tail = xBC[:, -k:].transpose(1, 2)
            cache.conv.zero_()
            cache.conv[..., k - tail.shape[-1]:] = tail.to(cache.conv.dtype)
        xBC = self._conv_seq(xBC, T)
        xh, x_in, B, C, log_a = self._heads(xBC, dt_raw)
        if attention_mask is not None:  # pads: a = 1 and no input, so the state skips them
            m = attention_mask.to(log_a.dtype)
            log_a = log_a * m[..., None]
            x_in = x_in * m[..., None, None].to(x_in.dtype)
        y, final = ssd_scan(x_in, log_a, B, C, self.cfg.chunk_size, return_final_state=True)
        if cache is not None:
            cache.ssm.copy_(final)
        y = y + self.D.to(y.dtype)[:, None] * xh
        return self._gate_out(y.reshape(Bsz, T, self.d_inner), z)

    def step(self, x, rope, positions, cache: SSMCache, kv_len=None):
        """x (B, D) -> (B, D); updates the conv and SSM state in place."""
        z, xBC, dt_raw = self._split(self.in_proj(x))
        window = torch.cat([cache.conv, xBC.unsqueeze(-1).to(cache.conv.dtype)], dim=-1)  # (B, conv_dim, d_conv)
        cache.conv.copy_(window[..., 1:])
        xBC = (window * self.conv1d.weight[:, 0, :]).sum(-1) + self.conv1d.bias
        xBC = xBC.to(x.dtype)
        if not self.discrete:
            xBC = F.silu(xBC)
        xh, x_in, B, C, log_a = self._heads(xBC, dt_raw)
        y, _ = ssd_step(cache.ssm, x_in, log_a, B, C)
        y = y + self.D.to(y.dtype)[:, None] * xh
        return self._gate_out(y.reshape(x.shape[0], self.d_inner), z)

    def matrix(self, x, rope=None, attention_mask=None):
        """Materialised mixer matrix (B, H, T, T) mapping the per-head value x_s to y_t, D on the diagonal."""
        T = x.shape[1]
        _, xBC, dt_raw = self._split(self.in_proj(x))
        xBC = self._conv_seq(xBC, T)
        _, _, B, C, log_a = self._heads(xBC, dt_raw)
        M = ssd_matrix(log_a, B, C)
        if not self.discrete:
            M = M * F.softplus(dt_raw.float() + self.dt_bias).transpose(1, 2)[:, :, None, :]  # column s scaled by dt_s
        return M + torch.diag_embed(self.D.float()[None, :, None].expand(M.shape[0], -1, T))

    def allocate_cache(self, batch, max_len, device, dtype, ssm_dtype=None) -> SSMCache:
        """The SSM state is fp32 unless `ssm_dtype` says otherwise (a bf16 state halves the bytes each decode step
        reads and writes; the update still runs in fp32 and rounds once per step)."""
        return SSMCache(
            torch.zeros(batch, self.conv_dim, self.cfg.d_conv - 1, device=device, dtype=dtype),
            torch.zeros(batch, self.H, self.P, self.N, device=device, dtype=ssm_dtype or torch.float32),
        )


# ---------------------------------------------------------------- Mamba-1 (selective SSM) mixer


class Mamba1Mixer(nn.Module):
    """Mamba-1's selective SSM in the grouped-query shape MambaInLlama gave it (its first students, and M1).

    in_proj -> [z (H*P) | x (Hx*P) | B (Hx*N) | C (H*N) | dt_low (R)]; causal depthwise conv + SiLU over x alone;
    x and B expanded per head block to H heads of P = N channels; dt = softplus(dt_proj(dt_low)) per channel;
    h[c, n] = exp(dt[c] A[c, n]) h[c, n] + dt[c] x[c] B[n] (A = -exp(A_log), one per channel and state dimension);
    y = h C + D x, gated by silu(z); out_proj. The same (B, H, P, N) state and (B, conv_dim, d_conv - 1) conv state
    as the Mamba-2 mixer, so caches, engine slots and `generate()` treat both alike.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.H, self.P, self.N, self.Hx = cfg.n_ssm_heads, cfg.ssm_hd, cfg.n_state, cfg.n_xb_heads
        self.R = cfg.n_dt_rank
        self.d_inner = self.H * self.P
        self.d_x, self.d_b, self.d_c = self.Hx * self.P, self.Hx * self.N, self.H * self.N
        self.conv_dim = self.d_x
        self.in_proj = nn.Linear(cfg.d_model, self.d_inner + self.d_x + self.d_b + self.d_c + self.R, bias=False)
        self.dt_proj = nn.Linear(self.R, self.d_inner)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim, padding=cfg.d_conv - 1)
        self.A_log = nn.Parameter(torch.zeros(self.d_inner, self.N))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=False)
        self.norm = None
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self):
        """Mamba-1's init: A = 1..N per channel (S4D-real), dt = softplus(bias) log-uniform in [1e-3, 0.1]."""
        self.A_log.copy_(torch.log(torch.arange(1, self.N + 1, dtype=torch.float32)).expand(self.d_inner, -1))
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_proj.bias.copy_(inverse_softplus(dt))
        self.D.fill_(1.0)

    def _split(self, u):
        return torch.split(self.in_proj(u), [self.d_inner, self.d_x, self.d_b, self.d_c, self.R], dim=-1)

    def _heads(self, xs, B, C, dt_low):
        """Post-conv x and the projections -> x, dt (…, H, P), B, C (…, H, N)."""
        lead = xs.shape[:-1]
        g = self.H // self.Hx
        x = xs.reshape(*lead, self.Hx, self.P).repeat_interleave(g, dim=-2)
        B = B.reshape(*lead, self.Hx, self.N).repeat_interleave(g, dim=-2)
        C = C.reshape(*lead, self.H, self.N)
        dt = F.softplus(self.dt_proj(dt_low).float()).reshape(*lead, self.H, self.P)
        return x, dt, B, C

    def _A(self):
        return -torch.exp(self.A_log.float()).view(self.H, self.P, self.N)

    def forward(self, x, rope=None, attention_mask=None, cache: SSMCache | None = None):
        Bsz, T, _ = x.shape
        z, xs, B, C, dt_low = self._split(x)
        if attention_mask is not None:
            xs = xs * attention_mask[..., None].to(xs.dtype)
        if cache is not None and self.cfg.d_conv > 1:
            k = self.cfg.d_conv - 1
            tail = xs[:, -k:].transpose(1, 2)
            cache.conv.zero_()
            cache.conv[..., k - tail.shape[-1]:] = tail.to(cache.conv.dtype)
        xs = F.silu(self.conv1d(xs.transpose(1, 2))[..., :T].transpose(1, 2))
        xh, dt, B, C = self._heads(xs, B, C, dt_low)
        if attention_mask is not None:  # pads: dt = 0, so no decay and no input: the state skips them
            dt = dt * attention_mask[..., None, None].to(dt.dtype)
        y, final = selective_scan(xh, dt, self._A(), B, C)
        if cache is not None:
            cache.ssm.copy_(final)
        y = (y + self.D.float().view(self.H, self.P) * xh.float()).to(x.dtype)
        return self.out_proj(y.reshape(Bsz, T, self.d_inner) * F.silu(z))

    def step(self, x, rope, positions, cache: SSMCache, kv_len=None):
        """x (B, D) -> (B, D); updates the conv and SSM state in place."""
        z, xs, B, C, dt_low = self._split(x)
        window = torch.cat([cache.conv, xs.unsqueeze(-1).to(cache.conv.dtype)], dim=-1)  # (B, conv_dim, d_conv)
        cache.conv.copy_(window[..., 1:])
        xs = F.silu(((window * self.conv1d.weight[:, 0, :]).sum(-1) + self.conv1d.bias).to(x.dtype))
        xh, dt, B, C = self._heads(xs, B, C, dt_low)
        y = selective_step(cache.ssm, xh, dt, self._A(), B, C)
        y = (y + self.D.float().view(self.H, self.P) * xh.float()).to(x.dtype)
        return self.out_proj(y.reshape(x.shape[0], self.d_inner) * F.silu(z))

    def matrix(self, x, rope=None, attention_mask=None):
        raise ConfigError("MOHAWK's matrix stage compares one mixing matrix per head; a Mamba-1 layer has a decay per "
                          "channel and state dimension: train it with the hidden, kd or sft stages")

    def allocate_cache(self, batch, max_len, device, dtype, ssm_dtype=None) -> SSMCache:
        return SSMCache(
            torch.zeros(batch, self.conv_dim, self.cfg.d_conv - 1, device=device, dtype=dtype),
            torch.zeros(batch, self.H, self.P, self.N, device=device, dtype=ssm_dtype or torch.float32),
        )
