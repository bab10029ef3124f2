"""Distillation losses: zero at equality, gradients match the written-out formulas, padding and chunking change nothing."""

import pytest
import torch
import torch.nn.functional as F

from thinkfast.distill.losses import (
    IGNORE,
    cross_entropy,
    forward_kl,
    hidden_loss,
    kl_per_token,
    matrix_loss,
    reverse_kl,
    soft_ce,
    vocab_loss,
)





def _logits(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


@pytest.mark.parametrize("fn", [forward_kl, reverse_kl])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_zero_at_equality_positive_otherwise(fn, temperature):
    t = _logits(2, 5, 11)
    assert fn(t.clone(), t, temperature=temperature).abs().item() < 1e-6
    s = _logits(2, 5, 11, seed=1)
    assert fn(s, t, temperature=temperature).item() > 1e-3
    # per token too: every token of a perturbed row is positive
    assert (kl_per_token(s, t, "forward_kl" if fn is forward_kl else "reverse_kl", temperature) > 0).all()


def test_kl_values_match_written_out_formulas():
    s, t = _logits(3, 7, 13, seed=2), _logits(3, 7, 13, seed=3)
    T = 1.7
    ps, pt = torch.softmax(s / T, -1), torch.softmax(t / T, -1)
    fwd = (pt * (pt.log() - ps.log())).sum(-1).mean() * T * T
    rev = (ps * (ps.log() - pt.log())).sum(-1).mean() * T * T
    sce = -(pt * ps.log()).sum(-1).mean() * T * T
    torch.testing.assert_close(forward_kl(s, t, temperature=T).double(), fwd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reverse_kl(s, t, temperature=T).double(), rev, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(soft_ce(s, t, temperature=T).double(), sce, rtol=1e-5, atol=1e-6)


def test_reverse_kl_gradient_matches_autograd_of_the_formula_and_the_closed_form():
    T = 1.5
    s0, t = _logits(4, 6, 9, seed=4), _logits(4, 6, 9, seed=5)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, 3:] = False
    n = mask.sum()

    s = s0.clone().requires_grad_(True)
    reverse_kl(s, t, mask, temperature=T).backward()

    # written out in float64 with softmax and log, no log_softmax
    s_ref = s0.clone().requires_grad_(True)
    ps, pt = torch.softmax(s_ref / T, -1), torch.softmax(t / T, -1)
    per = (ps * (torch.log(ps) - torch.log(pt))).sum(-1) * T * T
    ((per * mask).sum() / n).backward()
    torch.testing.assert_close(s.grad.double(), s_ref.grad, rtol=1e-4, atol=1e-7)

    # closed form: d/dz KL(p_s || p_t) = T * p_s * (r - E_ps[r]), r = log p_s - log p_t, per token / n
    with torch.no_grad():
        ps = torch.softmax(s0 / T, -1)
        r = torch.log_softmax(s0 / T, -1) - torch.log_softmax(t / T, -1)
        g = T * ps * (r - (ps * r).sum(-1, keepdim=True)) * mask[..., None] / n
    torch.testing.assert_close(s.grad.double(), g, rtol=1e-4, atol=1e-7)


def test_padded_batch_gives_the_unpadded_loss():
    s, t = _logits(1, 5, 8, seed=6), _logits(1, 5, 8, seed=7)
    pad_s = torch.cat([s, _logits(1, 3, 8, seed=8)], 1)  # three pad positions with junk logits
    pad_t = torch.cat([t, _logits(1, 3, 8, seed=9)], 1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    for fn in (forward_kl, reverse_kl, soft_ce):
        torch.testing.assert_close(fn(pad_s, pad_t, mask), fn(s, t))
    # a batch of two rows, one padded: the mean is over real tokens, not rows
    s2, t2 = _logits(1, 8, 8, seed=10), _logits(1, 8, 8, seed=11)
    both = forward_kl(torch.cat([pad_s, s2]), torch.cat([pad_t, t2]), torch.cat([mask, torch.ones(1, 8, dtype=torch.bool)]))
    expect = (forward_kl(s, t, reduction="sum") + forward_kl(s2, t2, reduction="sum")) / 13
    torch.testing.assert_close(both, expect)


def test_cross_entropy_masks_prompt_and_padding():
    logits = _logits(2, 6, 10, seed=12)
    targets = torch.randint(0, 10, (2, 6), generator=torch.Generator().manual_seed(0))
    targets[0, :2] = IGNORE  # prompt
    targets[1, 4:] = IGNORE  # padding
    keep = targets != IGNORE
    ref = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(cross_entropy(logits, targets).double(), ref)


def test_matrix_and_hidden_losses_zero_at_equality_and_ignore_padding():
    A = torch.softmax(_logits(2, 3, 6, 6, seed=13), -1).tril()
    M = A + 0.1 * _logits(2, 3, 6, 6, seed=14).tril()
    assert matrix_loss(A, A.clone()).item() == 0
    assert matrix_loss(A, M).item() > 0
    # squared Frobenius over (heads mean, real rows, real keys) / real rows
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    keys = mask[:, None, None, :]
    ref = (((M - A) * keys) ** 2).sum(-1).mean(1)[mask].sum() / mask.sum()
    torch.testing.assert_close(matrix_loss(A, M, mask).double(), ref)
    # junk in the padded rows/columns changes nothing
    M2 = M.clone()
    M2[1, :, 4:, :] += 5.0
    M2[1, :, :, 4:] += 5.0
    torch.testing.assert_close(matrix_loss(A, M2, mask), matrix_loss(A, M, mask))

    h = _logits(2, 6, 4, seed=15)
    assert hidden_loss(h, h.clone()).item() < 1e-5
    h2 = h + 1.0
    torch.testing.assert_close(hidden_loss(h, h2).double(), torch.tensor(2.0, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    h3 = h2.clone()
    h3[1, 4:] += 100
    torch.testing.assert_close(hidden_loss(h, h3, mask), hidden_loss(h, h2, mask))


@pytest.mark.parametrize("kind,ce_weight", [("forward_kl", 0.0), ("reverse_kl", 0.5), (None, 1.0)])
def test_chunked_vocab_loss_equals_unchunked(kind, ce_weight):
    torch.manual_seed(0)
    B, T, D, V = 2, 9, 6, 17
    hs = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    ht, wt = torch.randn(B, T, D, dtype=torch.float64), torch.randn(V, D, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T))
    targets[0, :3] = IGNORE
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 7:] = False
    results = []
    for chunk in (None, 1, 4):
        hs.grad = ws.grad = None
        loss, parts = vocab_loss(hs, ws, mask, ht, wt, targets, kind, 1.3, ce_weight, chunk_tokens=chunk)
        loss.backward()
        results.append((loss.detach(), hs.grad.clone(), ws.grad.clone(), parts))
    for loss, gh, gw, parts in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        torch.testing.assert_close(gh, results[0][1])
        torch.testing.assert_close(gw, results[0][2])
    # and equal to the plain logits-based losses
    logits_s, logits_t = hs.detach() @ ws.detach().T, ht @ wt.T
    expect = 0.0
    if kind is not None:
        expect = {"forward_kl": forward_kl, "reverse_kl": reverse_kl}[kind](logits_s, logits_t, mask, 1.3, "sum")
    if ce_weight:
        from thinkfast.distill.losses import ce_per_token

        expect = expect + ce_weight * (ce_per_token(logits_s, targets) * mask).sum()
    torch.testing.assert_close(results[0][0].double(), (expect / mask.sum()).double())
