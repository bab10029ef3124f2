"""Mamba-2 (SSD) recurrence in pure PyTorch: chunked scan, one recurrent step, materialised mixer matrix.

Per head, with scalar decay a_t = exp(log_a_t) in (0, 1):
    h_t = a_t * h_{t-1} + x_t B_t^T          h: (P, N)
    y_t = h_t C_t                             (D skip and gating live in the mixer)
Shapes: x (b, T, H, P), log_a (b, T, H), B and C (b, T, H, N), state (b, H, P, N).
All three paths accumulate in fp32 whatever the input dtype; tests hold them equal.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def autocast_off(device_type: str):
    """A block where autocast is off on `device_type`: these paths keep fp32 under a bf16 autocast. A device type
    autocast does not know (meta: shape inference, accelerate's empty-weight init) has none to turn off."""
    available = getattr(torch.amp, "is_autocast_available", lambda t: t in ("cpu", "cuda"))
    return torch.autocast(device_type, enabled=False) if available(device_type) else contextlib.nullcontext()


def segsum(log_a: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T) with out[t, s] = sum_{r=s+1..t} log_a[r] for s <= t, -inf above the diagonal.

    Built from a masked cumulative sum rather than a difference of prefix sums, which loses precision.
    """
    T = log_a.shape[-1]
    x = log_a.unsqueeze(-1).expand(*log_a.shape, T)  # (..., T, T): x[t, s] = log_a[t]
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=log_a.device), diagonal=-1)
    x = x.masked_fill(~strict, 0.0)
    out = torch.cumsum(x, dim=-2)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=log_a.device))
    return out.masked_fill(~causal, float("-inf"))


def ssd_chunked(
    x: torch.Tensor,
    log_a: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """Chunked SSD scan over any length. Returns y (b, T, H, P) in x's dtype [, final state (b, H, P, N) fp32]."""
    with autocast_off(x.device.type):  # bf16 autocast would round the decays and carried states
        return _ssd_chunked(x, log_a, B, C, chunk_size, initial_state, return_final_state)


def _ssd_chunked(x, log_a, B, C, chunk_size, initial_state, return_final_state):
    b, T, H, P = x.shape
    N = B.shape[-1]
    out_dtype = x.dtype
    if T == 0:  # nothing to scan: the state passes through
        state = torch.zeros(b, H, P, N, device=x.device) if initial_state is None else initial_state.float()
        y = x.new_zeros(b, 0, H, P)
        return (y, state) if return_final_state else y
    x, log_a, B, C = (t.float() for t in (x, log_a, B, C))
    # a short sequence is one chunk: no padding to a chunk multiple (prefill of short prompts)
    L = T if T <= 2 * chunk_size else chunk_size
    pad = (-T) % L
    if pad:
        # a = 1 and zero input on padded steps: the state passes through unchanged.
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
        log_a = F.pad(log_a, (0, 0, 0, pad))
    c = x.shape[1] // L
    x = x.view(b, c, L, H, P)
    B = B.view(b, c, L, H, N)
    C = C.view(b, c, L, H, N)
    A = log_a.view(b, c, L, H).permute(0, 3, 1, 2)  # (b, H, c, L)
    A_cum = torch.cumsum(A, dim=-1)  # (b, H, c, L)

    # 1. within each chunk: the masked mixer matrix applied directly
    decay = torch.exp(segsum(A))  # (b, H, c, L, L)
    scores = torch.einsum("bclhn,bcshn->bhcls", C, B) * decay
    y = torch.einsum("bhcls,bcshp->bclhp", scores, x)

    # 2. state contributed by each chunk at its own end
    decay_to_end = torch.exp(A_cum[..., -1:] - A_cum)  # (b, H, c, L)
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_to_end, x)

    # 3. carry states across chunks (c is small: a (c+1) x (c+1) decay matrix)
    if initial_state is None:
        initial_state = torch.zeros(b, H, P, N, device=x.device, dtype=torch.float32)
    states = torch.cat([initial_state.float().unsqueeze(1), chunk_states], dim=1)  # (b, c+1, H, P, N)
    chunk_decay = torch.exp(segsum(F.pad(A_cum[..., -1], (1, 0))))  # (b, H, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    start_states, final_state = states[:, :-1], states[:, -1]

    # 4. each position reads the state at its chunk's start, decayed to itself
    decay_from_start = torch.exp(A_cum)  # (b, H, c, L)
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", C, start_states, decay_from_start)

    y = y.reshape(b, c * L, H, P)[:, :T].to(out_dtype)
    return (y, final_state) if return_final_state else y


def fla_kernel():
    """flash-linear-attention's chunked simple-GLA function when `fla` is installed (and THINKFAST_FLA is not
    0), else None. Simple GLA is SSD under other names: q = C, k = B, v = x, g = log a, scale 1."""
    if os.environ.get("THINKFAST_FLA", "1") == "0":
        return None
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception:  # not installed, or no usable Triton here
        return None
    return chunk_simple_gla


_fla_failed = False


def ssd_fla(kernel, x, log_a, B, C, initial_state=None, return_final_state=False):
    """`ssd_chunked` computed by fla's kernel (`kernel(q, k, v, g, scale, initial_state, output_final_state)`,
    tensors (b, T, H, *), state (b, H, K=N, V=P)). Same returns as `ssd_chunked`."""
    dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    q, k, v = (t.to(dtype).contiguous() for t in (C, B, x))
    h0 = None if initial_state is None else initial_state.float().transpose(-1, -2).contiguous()
    extra = {"head_first": False} if "head_first" in inspect.signature(kernel).parameters else {}
    y, final = kernel(q, k, v, g=log_a.float().contiguous(), scale=1.0, initial_state=h0,
                      output_final_state=return_final_state, **extra)
    y = y.to(x.dtype)
    if not return_final_state:
        return y
    return y, final.float().transpose(-1, -2)


def ssd_scan(x, log_a, B, C, chunk_size: int = 64, initial_state=None, return_final_state: bool = False):
    """The chunked scan through the fastest path available: fla's Triton kernel for CUDA inputs outside
    autograd (prefill; its backward needs a newer Triton than some GPUs ship), else `ssd_chunked`.
    If the kernel fails once (unsupported GPU or Triton), it is not tried again in this process."""
    global _fla_failed
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, log_a, B, C))
    if x.is_cuda and not grad and not _fla_failed:
        kernel = fla_kernel()
        if kernel is not None:
            try:
                return ssd_fla(kernel, x, log_a, B, C, initial_state, return_final_state)
            except Exception as e:
                _fla_failed = True
                log.warning("flash-linear-attention kernel failed (%s); using the PyTorch chunked scan", e)
    return ssd_chunked(x, log_a, B, C, chunk_size, initial_state, return_final_state)


def ssd_step(state: torch.Tensor, x: torch.Tensor, log_a: torch.Tensor, B: torch.Tensor, C: torch.Tensor):
    """One recurrent step. state (b, H, P, N), x (b, H, P), log_a (b, H), B and C (b, H, N).

    Returns (y (b, H, P) in x's dtype, new state). The state is updated in place; a state kept in less than fp32
    is updated in fp32 and rounded once when stored, y read before that rounding (as the engine's step does).
    """
    a = torch.exp(log_a.float())[..., None, None]
    if state.dtype == torch.float32:
        new = state.mul_(a).add_(x.float().unsqueeze(-1) * B.float().unsqueeze(-2))
    else:
        new = state.float() * a + x.float().unsqueeze(-1) * B.float().unsqueeze(-2)
        state.copy_(new)
    y = torch.einsum("bhpn,bhn->bhp", new, C.float())
    return y.to(x.dtype), state


def ssd_matrix(log_a: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Materialised mixer matrix M (b, H, T, T): M[t, s] = (C_t . B_s) * prod_{r=s+1..t} a_r, zero above the diagonal.

    y = M @ x reproduces ssd_chunked (before the D skip). Used by MOHAWK stage 1.
    """
    with autocast_off(log_a.device.type):  # fp32 under a bf16 autocast too (MOHAWK stage 1)
        A = log_a.float().permute(0, 2, 1)  # (b, H, T)
        scores = torch.einsum("bthn,bshn->bhts", C.float(), B.float())
        return scores * torch.exp(segsum(A))


def ssd_sequential(x, log_a, B, C, initial_state=None):
    """Plain loop over time: the reference every other path is tested against."""
    b, T, H, P = x.shape
    N = B.shape[-1]
    state = torch.zeros(b, H, P, N, dtype=torch.float32, device=x.device) if initial_state is None else initial_state.float().clone()
    ys = []
    for t in range(T):
        a = torch.exp(log_a[:, t].float())[..., None, None]
        state = state * a + x[:, t].float().unsqueeze(-1) * B[:, t].float().unsqueeze(-2)
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t].float()))
    y = torch.stack(ys, dim=1) if ys else x.float().new_zeros(b, 0, H, P)
    return y.to(x.dtype), state
