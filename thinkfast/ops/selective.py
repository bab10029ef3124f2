"""Mamba-1's selective SSM in pure PyTorch: a sequential scan and one recurrent step.

Per channel c (of head h) and state dimension n, with a decay for each (c, n):
    h_t[c, n] = exp(dt_t[c] A[c, n]) h_{t-1}[c, n] + dt_t[c] x_t[c] B_t[h, n]
    y_t[c]    = sum_n h_t[c, n] C_t[h, n]                 (D skip and gating live in the mixer)
Shapes: x and dt (b, T, H, P), A (H, P, N), B and C (b, T, H, N), state (b, H, P, N). A decay per state
dimension is what Mamba-2 gave up for its chunked (SSD) form, so this scan runs step by step; it accumulates in
fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch

from .ssd import autocast_off


def selective_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor) -> torch.Tensor:
    """One token: x, dt (b, H, P), B, C (b, H, N). Updates `state` (b, H, P, N) in place (in its own dtype);
    returns y (b, H, P) fp32, read before the state is rounded to its dtype."""
    dt = dt.float()
    h = torch.exp(dt[..., None] * A) * state.float() + (dt * x.float())[..., None] * B.float()[:, :, None, :]
    y = (h * C.float()[:, :, None, :]).sum(-1)
    state.copy_(h)
    return y


def selective_scan(x, dt, A, B, C, initial_state=None):
    """Whole sequences -> (y (b, T, H, P) fp32, final state (b, H, P, N) fp32)."""
    b, T, H, P = x.shape
    state = x.new_zeros(b, H, P, B.shape[-1], dtype=torch.float32) if initial_state is None else initial_state.float()
    ys = []
    with autocast_off(x.device.type):
        for t in range(T):
            dt_t = dt[:, t].float()
            state = torch.exp(dt_t[..., None] * A) * state + (dt_t * x[:, t].float())[..., None] * B[:, t].float()[:, :, None, :]
            ys.append((state * C[:, t].float()[:, :, None, :]).sum(-1))
    return torch.stack(ys, dim=1), state
