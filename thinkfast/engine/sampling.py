"""Token sampling: temperature, top-k, top-p, min-p, greedy at temperature 0, one random stream per sample.

Every sample owns a seed derived from (base seed, problem id, sample index). Its uniforms are drawn up front
from a CPU generator with that seed, one per generated token, and each token is chosen by inverse-CDF sampling
with the uniform of its step. So a sample's tokens depend on its own seed and its own logits only: not on which
slot it ran in, what else was in the batch, or whether the run was resumed.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field

import torch

from ..errors import ConfigError


GREEDY_BELOW = 1e-5  # temperatures under this sample greedily (vLLM's threshold)


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy (so is anything under GREEDY_BELOW, as in vLLM)
    top_p: float = 1.0  # nucleus: smallest set of tokens whose mass reaches top_p, ties at its edge kept (1 = off)
    top_k: int = 0  # keep the k most likely tokens (0 = off)
    min_p: float = 0.0  # drop tokens below min_p x the most likely token's probability (0 = off)
    max_new_tokens: int = 512
    stop: list[str] = field(default_factory=list)  # stop strings: the completion ends before the first one
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens

    def __post_init__(self):
        if isinstance(self.stop, (bytes, bytearray)):  # list() would make its byte values the stops
            raise ConfigError(f"stop={self.stop!r}: give a string (or a list of strings), not bytes")
        if not isinstance(self.ignore_eos, bool):  # "no" would be true
            raise ConfigError(f"ignore_eos={self.ignore_eos!r}: give True or False")
        if isinstance(self.stop, str):  # one stop string, not its characters
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if not all(isinstance(s, str) for s in self.stop):
            raise ConfigError(f"stop={self.stop!r}: give a string or a list of strings")
        for name in ("temperature", "top_p", "min_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name}={value!r}: give a number")
            setattr(self, name, float(value))
        for name in ("top_k", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
                raise ConfigError(f"{name}={value!r}: give a whole number")
            setattr(self, name, int(value))
        self.validate()

    @property
    def greedy(self) -> bool:
        # logits / 1e-40 overflow to inf and the softmax to NaN: a temperature this small is argmax anyway
        return self.temperature < GREEDY_BELOW

    def validate(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"temperature={self.temperature}: use 0 (greedy) or a positive number")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top-p={self.top_p}: use a value in (0, 1]; 1 turns it off")
        if self.top_k < 0:
            raise ConfigError(f"top-k={self.top_k}: use 0 (off) or a positive number of tokens")
        if not 0 <= self.min_p < 1:
            raise ConfigError(f"min-p={self.min_p}: use a value in [0, 1); 0 turns it off")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max-new-tokens={self.max_new_tokens}: generate at least 1 token")
        if any(not s for s in self.stop):
            raise ConfigError("an empty stop string would end every completion at once; drop it")

    def to_dict(self) -> dict:
        return asdict(self)


def sample_seed(base_seed: int, problem_id: str, sample_idx: int) -> int:
    """A 48-bit seed for one sample (fits JSON numbers exactly), stable across runs, machines and Python versions."""
    digest = hashlib.blake2b(f"{int(base_seed)}\x00{problem_id}\x00{int(sample_idx)}".encode(), digest_size=6).digest()
    return int.from_bytes(digest, "little")


def sample_uniforms(seed: int, count: int) -> torch.Tensor:
    """The `count` uniforms in [0, 1) that one sample consumes, one per generated token (CPU, fp64)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return torch.rand(count, generator=g, dtype=torch.float64)


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(n, V) logits -> (n, V) fp32 probabilities after temperature, top-k, top-p and min-p (not renormalised)."""
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    V = probs.shape[-1]
    if 0 < params.top_k < V:
        kth = torch.topk(probs, params.top_k, dim=-1).values[:, -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if params.top_p < 1.0:
        sorted_p, _ = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly above each token
        # the smallest probability still inside the nucleus (the top token is always inside)
        keep = before < params.top_p * sorted_p.sum(-1, keepdim=True)
        threshold = torch.where(keep, sorted_p, torch.full_like(sorted_p, float("inf"))).amin(-1, keepdim=True)
        probs = probs.masked_fill(probs < threshold, 0.0)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), 0.0)
    return probs


NOT_FINITE = -1  # the token id sample_tokens gives a row whose logits hold NaN or inf


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(n, V) logits and (n,) uniforms in [0, 1) -> (n,) token ids. Greedy (argmax) when temperature is 0.
    A row with NaN or inf logits (an overflow) gets NOT_FINITE, never a token it would then go on from."""
    if params.greedy:
        top, idx = logits.max(dim=-1)  # a NaN anywhere in the row is its max
        return torch.where(torch.isfinite(top), idx, NOT_FINITE)
    probs = filtered_probs(logits, params)
    cdf = torch.cumsum(probs, dim=-1)  # (n, V), fp32
    target = uniforms.to(cdf.dtype).unsqueeze(-1) * cdf[:, -1:]  # inverse CDF over the unnormalised mass
    # first index whose cumulative mass exceeds the target: never a token of probability 0
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    # fp32 rounding can put the target at the very end of the CDF: fall back to the last token still allowed
    V = probs.shape[-1]
    last_allowed = V - 1 - (probs > 0).flip(-1).to(torch.uint8).argmax(-1)
    return torch.where(cdf[:, -1] > 0, torch.minimum(idx, last_allowed), NOT_FINITE)  # NaN mass compares false
