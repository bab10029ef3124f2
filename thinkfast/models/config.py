"""The model configuration: one dataclass for teacher-shaped, pure Mamba (Llamba) and hybrid LMs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..utils import wrong_field_type

SSM_PARAMS = ("discrete", "mamba2", "mamba1")
# the rotary scalings thinkfast computes (`rope_inv_freq`) and the keys each needs: linear, Llama 3's, and YaRN
# (Qwen's and DeepSeek's long-context one)
ROPE_TYPES = {"default": (), "linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
              "yarn": ("factor", "original_max_position_embeddings")}


def rope_type(params: dict | None) -> str:
    """The rotation's kind: transformers 5 names it `rope_type`, configs from 4.x `type`."""
    params = params or {}
    return params.get("rope_type", params.get("type", "default"))


def split_rope_parameters(params: dict | None, rope_theta: float = 10000.0) -> tuple[float, dict | None]:
    """transformers 5's `rope_parameters` (rope_theta inside) or 4's `rope_scaling` -> (rope_theta, rope_params),
    rope_params None for the default rotation."""
    params = dict(params or {})
    theta = float(params.pop("rope_theta", rope_theta))
    return theta, (None if rope_type(params) == "default" else params)


def rope_problem(params: dict | None) -> str | None:
    """Why thinkfast cannot compute these rope_params, or None."""
    params = params or {}
    kind = rope_type(params)
    if kind not in ROPE_TYPES:
        return f"rope_type {kind!r} is not supported; thinkfast computes {', '.join(map(repr, ROPE_TYPES))} rotations"
    if params.get("partial_rotary_factor") not in (None, 1, 1.0):
        return (f"partial_rotary_factor={params['partial_rotary_factor']!r}: thinkfast rotates every dimension of a "
                "head, as Llama-family models do")
    missing = [key for key in ROPE_TYPES[kind]
               if isinstance(params.get(key), bool) or not isinstance(params.get(key), (int, float))]
    if missing:
        return f"rope_type {kind!r} needs numbers for {', '.join(missing)}"
    return None


@dataclass
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None  # default d_model // n_heads
    d_mlp: int = 384
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF rope_parameters without rope_theta, e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    rope_params: dict | None = None
    max_position_embeddings: int = 2048
    tie_embeddings: bool = True
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2); a Mamba mixer then has an in_proj bias
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE (Qwen3); a Mamba mixer then normalises C and B
    attn_layers: list[int] = field(default_factory=list)  # indices of layers that keep softmax attention
    # Mamba-2 mixer
    # "discrete" (Llamba) or "mamba2" (MambaInLlama): Mamba-2 mixers; "mamba1": Mamba-1's selective SSM (a decay per
    # channel and state dimension), as MambaInLlama's first students and M1 have it (converted checkpoints only)
    ssm_param: str = "mamba2"
    d_state: int | None = None  # default head_dim, so B and C can take W_K and W_Q
    ssm_kv_heads: int | None = None  # heads of x and B before per-block expansion; default n_kv_heads
    # the Mamba mixers' heads and head size, default the attention's (n_heads, head_dim); converted Mamba-1
    # checkpoints have other ones (MambaInLlama's: heads of d_state = 16 channels)
    ssm_heads: int | None = None
    ssm_head_dim: int | None = None
    d_conv: int = 4
    ssm_norm: bool | None = None  # gated RMSNorm; default on for mamba2, off for discrete
    # the gated RMSNorm's group size: default all of the mixer's width at once; MambaInLlama's checkpoints
    # normalise each head on its own (group = the head size)
    ssm_norm_group: int | None = None
    chunk_size: int = 64
    dt_rank: int | None = None  # mamba1: the low-rank dt projection's width (default ceil(d_model / 16))
    initializer_range: float = 0.02

    def __post_init__(self):
        self.check_types()
        self.attn_layers = sorted(int(i) for i in self.attn_layers)
        self.validate()

    def check_types(self) -> None:
        """Each field holds its declared type: a hand-edited config.json or recipe with `"n_layers": "4"` must fail
        naming the key, not deep inside a comparison."""
        wrong = wrong_field_type(self)
        if wrong:
            raise ConfigError(f"model config: {wrong}")

    # derived sizes
    @property
    def hd(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def n_state(self) -> int:
        return self.d_state if self.d_state is not None else self.hd

    @property
    def n_ssm_heads(self) -> int:
        return self.ssm_heads if self.ssm_heads is not None else self.n_heads

    @property
    def ssm_hd(self) -> int:
        return self.ssm_head_dim if self.ssm_head_dim is not None else self.hd

    @property
    def n_xb_heads(self) -> int:
        return self.ssm_kv_heads if self.ssm_kv_heads is not None else self.n_kv_heads

    @property
    def n_dt_rank(self) -> int:
        return self.dt_rank if self.dt_rank is not None else -(-self.d_model // 16)

    @property
    def ssm_conv_dim(self) -> int:
        """Channels of a Mamba layer's causal conv: x, B and C for Mamba-2; x alone for Mamba-1."""
        x = self.n_xb_heads * self.ssm_hd
        return x if self.ssm_param == "mamba1" else x + self.n_xb_heads * self.n_state + self.n_ssm_heads * self.n_state

    @property
    def use_ssm_norm(self) -> bool:
        return self.ssm_norm if self.ssm_norm is not None else self.ssm_param == "mamba2"

    @property
    def mamba_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if i not in set(self.attn_layers)]

    def is_attention(self, layer: int) -> bool:
        return layer in set(self.attn_layers)

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_mlp", "d_conv", "chunk_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model config: {name}={getattr(self, name)} must be positive")
        for name in ("ssm_heads", "ssm_head_dim", "dt_rank", "d_state", "ssm_kv_heads"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"model config: {name}={getattr(self, name)} must be positive (or left out)")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(
                f"model config: d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "pick sizes that divide or set head_dim"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model config: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; "
                "grouped-query attention needs whole groups"
            )
        if self.n_ssm_heads % self.n_xb_heads:
            raise ConfigError(
                f"model config: the Mamba mixers' {self.n_ssm_heads} heads are not a multiple of "
                f"ssm_kv_heads={self.n_xb_heads}"
            )
        twice = sorted({i for i in self.attn_layers if self.attn_layers.count(i) > 1})
        if twice:
            raise ConfigError(f"model config: attn_layers {self.attn_layers} lists layer(s) {twice} more than once; "
                              "give each layer once")
        bad = [i for i in self.attn_layers if not 0 <= i < self.n_layers]
        if bad:
            raise ConfigError(
                f"model config: attn_layers {bad} out of range for a {self.n_layers}-layer model; "
                f"use indices 0..{self.n_layers - 1}"
            )
        width = self.n_ssm_heads * self.ssm_hd
        if self.ssm_norm_group is not None and (self.ssm_norm_group <= 0 or width % self.ssm_norm_group):
            raise ConfigError(f"model config: ssm_norm_group={self.ssm_norm_group} must divide the Mamba mixer's "
                              f"width heads x head size = {width}")
        problem = rope_problem(self.rope_params)
        if problem:
            raise ConfigError(f"model config: {problem}")
        if self.ssm_param not in SSM_PARAMS:
            raise ConfigError(f"model config: ssm_param={self.ssm_param!r}; use one of {', '.join(SSM_PARAMS)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"model config: unknown keys {unknown}; known keys are {sorted(names)}")
        return cls(**d)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
