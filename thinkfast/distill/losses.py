"""Distillation losses: matrix orientation, hidden-state alignment, forward / reverse KL, soft-target CE, CE.

Every loss is token-level and masked: a per-token value is computed, multiplied by the mask, summed, and divided
by the number of real tokens (`reduction="mean"`), so a padded batch gives the same loss as the unpadded one and
the value does not grow with sequence length. `reduction="sum"` returns the masked sum instead: the trainer
divides by the token count of the whole global batch so accumulation and data parallelism average correctly.

The vocabulary-sized losses (`vocab_loss`) take hidden states and head weights rather than logits: they keep only
the masked positions and build logits one chunk of positions at a time, each chunk under activation checkpointing
when there is more than one, so a full (B, T, V) logits tensor never exists, not even once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

KL_KINDS = ("forward_kl", "reverse_kl", "soft_ce")
IGNORE = -100


def _reduce(per_token: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """per_token (...,) with mask (...,) -> masked mean over real tokens, or masked sum."""
    if mask is not None:
        per_token = per_token * mask.to(per_token.dtype)
    total = per_token.sum()
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction {reduction!r}: use mean or sum")
    n = per_token.numel() if mask is None else mask.sum()
    return total / (n.clamp(min=1) if torch.is_tensor(n) else max(n, 1))


# ---------------------------------------------------------------- MOHAWK stages 1 and 2


def matrix_loss(teacher_matrix, student_matrix, mask=None, reduction: str = "mean") -> torch.Tensor:
    """Matrix orientation: squared Frobenius distance between mixing matrices, token by token.

    teacher_matrix, student_matrix (B, H, T, T): row t mixes the values at positions s <= t.
    Per query token t: mean over heads of sum_s (A[h, t, s] - M[h, t, s])^2, with pad keys s ignored.
    Summed over the real tokens this is the squared Frobenius norm of the difference (over heads' mean), so
    mean-over-tokens is the Frobenius distance per token, independent of padding and sequence length.
    """
    diff = student_matrix.float() - teacher_matrix.float()  # (B, H, T, T)
    if mask is not None:
        diff = diff * mask[:, None, None, :].to(diff.dtype)  # pad keys contribute nothing
    per_token = diff.pow(2).sum(-1).mean(1)  # (B, T)
    return _reduce(per_token, mask, reduction)


def hidden_loss(teacher_hidden, student_hidden, mask=None, reduction: str = "mean") -> torch.Tensor:
    """Hidden-state alignment: L2 distance between block outputs per token (as MOHAWK), masked mean over tokens.

    teacher_hidden, student_hidden (B, T, D). sqrt(x + tiny) keeps the gradient finite where they are equal.
    """
    diff = student_hidden.float() - teacher_hidden.float()
    per_token = torch.sqrt(diff.pow(2).sum(-1) + 1e-12)  # (B, T)
    return _reduce(per_token, mask, reduction)


# ---------------------------------------------------------------- token distributions


def _f32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are upcast; fp32 / fp64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def kl_per_token(student_logits, teacher_logits, kind: str = "forward_kl", temperature: float = 1.0) -> torch.Tensor:
    """(..., V) logits -> (...,) per-token divergence in fp32, scaled by T^2 (Hinton) so gradients keep their size.

    forward_kl: KL(p_teacher || p_student) = sum p_t (log p_t - log p_s)   (mode covering, MOHAWK stage 3)
    reverse_kl: KL(p_student || p_teacher) = sum p_s (log p_s - log p_t)   (mode seeking, MambaInLlama)
    soft_ce:    -sum p_t log p_s  (forward KL plus the teacher's entropy: same gradient, not zero at equality)
    """
    if kind not in KL_KINDS:
        raise ValueError(f"KL kind {kind!r}: use one of {', '.join(KL_KINDS)}")
    t = float(temperature)
    log_ps = F.log_softmax(_f32(student_logits) / t, dim=-1)
    log_pt = F.log_softmax(_f32(teacher_logits).to(log_ps.dtype) / t, dim=-1)
    if kind == "forward_kl":
        out = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    elif kind == "reverse_kl":
        out = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    else:
        out = -(log_pt.exp() * log_ps).sum(-1)
    return out * (t * t)


def ce_per_token(student_logits, targets) -> torch.Tensor:
    """(..., V) logits, (...,) next-token ids (IGNORE = -100 where untrained) -> (...,) cross entropy, 0 where ignored."""
    V = student_logits.shape[-1]
    return F.cross_entropy(
        _f32(student_logits).reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(targets.shape)


def forward_kl(student_logits, teacher_logits, mask=None, temperature: float = 1.0, reduction: str = "mean"):
    return _reduce(kl_per_token(student_logits, teacher_logits, "forward_kl", temperature), mask, reduction)


def reverse_kl(student_logits, teacher_logits, mask=None, temperature: float = 1.0, reduction: str = "mean"):
    return _reduce(kl_per_token(student_logits, teacher_logits, "reverse_kl", temperature), mask, reduction)


def soft_ce(student_logits, teacher_logits, mask=None, temperature: float = 1.0, reduction: str = "mean"):
    return _reduce(kl_per_token(student_logits, teacher_logits, "soft_ce", temperature), mask, reduction)


def cross_entropy(student_logits, targets, mask=None, reduction: str = "mean"):
    """Plain CE with prompt masking: positions whose target is IGNORE (prompt, padding) are not counted."""
    valid = targets != IGNORE
    mask = valid if mask is None else (mask.bool() & valid)
    return _reduce(ce_per_token(student_logits, targets), mask, reduction)


# ---------------------------------------------------------------- chunked vocabulary losses from hidden states


def default_chunk_tokens(vocab_size: int, budget_elements: int = 1 << 26) -> int:
    """Positions per chunk so one chunk's fp32 logits stay near `budget_elements` (256 MiB by default)."""
    return max(1, budget_elements // max(1, vocab_size))


def _chunk_terms(h_s, w_s, h_t, w_t, targets, kind, temperature, ce_weight):
    """One chunk: (n, D) student hidden, (V, D) student head, optional teacher pair -> (n,) kl, (n,) ce."""
    logits = F.linear(h_s, w_s)  # (n, V)
    zero = logits.new_zeros(logits.shape[0], dtype=torch.float32)
    kl = zero
    if kind is not None:
        with torch.no_grad():
            t_logits = F.linear(h_t, w_t)
        kl = kl_per_token(logits, t_logits, kind, temperature)
    ce = ce_per_token(logits, targets) if ce_weight else zero
    return kl, ce


def vocab_loss(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    mask: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    kind: str | None = "forward_kl",
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    chunk_tokens: int | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL to the teacher (kind), plus ce_weight x CE on `targets`, over the masked positions, chunk by chunk.

    student_hidden (B, T, D) final-normed hidden states and student_head (V, D); teacher_hidden / teacher_head
    likewise (no gradient); targets (B, T) next-token ids with IGNORE where no CE; mask (B, T) positions counted.
    kind=None with ce_weight=1 is SFT's cross entropy. Returns (loss, parts) where parts holds the detached
    `kl` and `ce` sums or means (same reduction), for logging.
    """
    if kind is None and not ce_weight:
        raise ValueError("vocab_loss: nothing to compute (kind=None and ce_weight=0)")
    if kind is not None and (teacher_hidden is None or teacher_head is None):
        raise ValueError("vocab_loss: a KL needs teacher_hidden and teacher_head")
    if ce_weight and targets is None:
        raise ValueError("vocab_loss: CE needs targets")
    sel = mask.reshape(-1).bool()
    n_real = sel.sum()
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])[sel]  # (n, D): masked positions only
    h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[sel].detach() if kind is not None else None
    w_t = teacher_head.detach().to(h_t.dtype) if kind is not None else None
    tg = targets.reshape(-1)[sel] if targets is not None else None
    if tg is None:
        tg = torch.full((h_s.shape[0],), IGNORE, dtype=torch.long, device=h_s.device)
    n = h_s.shape[0]
    chunk = chunk_tokens or default_chunk_tokens(student_head.shape[0])
    kl_sum = h_s.new_zeros((), dtype=torch.float32)
    ce_sum = h_s.new_zeros((), dtype=torch.float32)
    n_chunks = max(1, math.ceil(n / chunk))
    for i in range(n_chunks):
        sl = slice(i * chunk, (i + 1) * chunk)
        args = (h_s[sl], student_head, None if h_t is None else h_t[sl], w_t, tg[sl], kind, temperature, ce_weight)
        if n_chunks > 1 and torch.is_grad_enabled():
            # recompute this chunk's logits in backward instead of keeping them: memory stays one chunk
            kl, ce = checkpoint(_chunk_terms, *args, use_reentrant=False)
        else:
            kl, ce = _chunk_terms(*args)
        kl_sum = kl_sum + kl.sum()
        ce_sum = ce_sum + ce.sum()
    total = kl_sum + ce_weight * ce_sum if ce_weight else kl_sum
    if reduction == "mean":
        denom = n_real.clamp(min=1).to(total.dtype)
        total, kl_sum, ce_sum = total / denom, kl_sum / denom, ce_sum / denom
    elif reduction != "sum":
        raise ValueError(f"reduction {reduction!r}: use mean or sum")
    return total, {"kl": kl_sum.detach(), "ce": ce_sum.detach()}
