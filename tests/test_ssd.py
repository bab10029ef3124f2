"""The three SSD paths (chunked scan, recurrent step, materialised matrix) equal a plain sequential loop."""

import pytest
import torch

from thinkfast.ops.ssd import ssd_chunked, ssd_matrix, ssd_sequential, ssd_step


def random_inputs(b, T, H, P, N, dtype=torch.float32, requires_grad=False):
    x = torch.randn(b, T, H, P, dtype=dtype)
    log_a = -torch.rand(b, T, H).mul(0.5).to(dtype)  # a in (0.6, 1]
    B = torch.randn(b, T, H, N, dtype=dtype) / N**0.5
    C = torch.randn(b, T, H, N, dtype=dtype) / N**0.5
    ts = [x, log_a, B, C]
    if requires_grad:
        for t in ts:
            t.requires_grad_(True)
    return ts


@pytest.mark.parametrize("T", [0, 1, 2, 5, 16, 63, 64, 65, 100, 129, 300])
@pytest.mark.parametrize("chunk", [8, 64])
def test_chunked_equals_sequential_with_states(T, chunk):
    x, log_a, B, C = random_inputs(2, T, 3, 4, 5)
    h0 = torch.randn(2, 3, 4, 5)
    y_ref, h_ref = ssd_sequential(x, log_a, B, C, initial_state=h0)
    y, h = ssd_chunked(x, log_a, B, C, chunk_size=chunk, initial_state=h0, return_final_state=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [1, 17, 80])
def test_step_equals_sequential(T):
    x, log_a, B, C = random_inputs(2, T, 3, 4, 5)
    y_ref, h_ref = ssd_sequential(x, log_a, B, C)
    state = torch.zeros(2, 3, 4, 5)
    ys = [ssd_step(state, x[:, t], log_a[:, t], B[:, t], C[:, t])[0] for t in range(T)]
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, h_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [1, 9, 70])
def test_matrix_times_x_equals_sequential(T):
    x, log_a, B, C = random_inputs(2, T, 3, 4, 5)
    y_ref, _ = ssd_sequential(x, log_a, B, C)
    M = ssd_matrix(log_a, B, C)  # (b, H, T, T)
    assert torch.all(M.triu(1) == 0), "the mixer matrix must be causal"
    y = torch.einsum("bhts,bshp->bthp", M, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,chunk", [(37, 16), (130, 64)])
def test_chunked_gradients_match_sequential(T, chunk):
    ins = random_inputs(2, T, 2, 3, 4, requires_grad=True)
    h0 = torch.randn(2, 2, 3, 4, requires_grad=True)
    w = torch.randn(2, T, 2, 3)
    wh = torch.randn(2, 2, 3, 4)
    y, h = ssd_chunked(*ins, chunk_size=chunk, initial_state=h0, return_final_state=True)
    g = torch.autograd.grad((y * w).sum() + (h * wh).sum(), ins + [h0])
    y2, h2 = ssd_sequential(*ins, initial_state=h0)
    g2 = torch.autograd.grad((y2 * w).sum() + (h2 * wh).sum(), ins + [h0])
    for a, b in zip(g, g2):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_low_precision_inputs_accumulate_in_fp32():
    x, log_a, B, C = random_inputs(1, 200, 2, 8, 8)
    lo = [t.bfloat16() for t in (x, log_a, B, C)]
    y_lo, h_lo = ssd_chunked(*lo, chunk_size=32, return_final_state=True)
    assert y_lo.dtype == torch.bfloat16 and h_lo.dtype == torch.float32
    # reference: the same bf16 inputs, computed entirely in fp32; only the final cast to bf16 differs
    y_ref, h_ref = ssd_sequential(*[t.float() for t in lo])
    torch.testing.assert_close(h_lo, h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_lo.float(), y_ref, rtol=1e-2, atol=1e-2)


def _simple_gla_reference(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False, **kwargs):
    """flash-linear-attention's documented simple-GLA contract, as a loop: tensors (b, T, H, *), g the per-head
    log forget gate, S_t = exp(g_t) S_{t-1} + k_t^T v_t with S (K, V), o_t = scale * q_t S_t."""
    b, T, H, K = q.shape
    S = torch.zeros(b, H, K, v.shape[-1]) if initial_state is None else initial_state.clone()
    out = []
    for t in range(T):
        S = S * torch.exp(g[:, t])[..., None, None] + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(out, 1), (S if output_final_state else None)


def test_fla_adapter_maps_ssd_onto_simple_gla():
    """q = C, k = B, v = x, g = log a, scale 1, and the state transposed: checked against fla's contract."""
    from thinkfast.ops.ssd import ssd_fla

    x, log_a, B, C = random_inputs(2, 37, 3, 4, 5)
    h0 = torch.randn(2, 3, 4, 5)
    y_ref, h_ref = ssd_sequential(x, log_a, B, C, initial_state=h0)
    y, h = ssd_fla(_simple_gla_reference, x, log_a, B, C, initial_state=h0, return_final_state=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    y0_ref, _ = ssd_sequential(x, log_a, B, C)
    torch.testing.assert_close(ssd_fla(_simple_gla_reference, x, log_a, B, C), y0_ref, rtol=1e-5, atol=1e-5)


def test_scan_keeps_pytorch_path_for_cpu_and_for_training(monkeypatch):
    import thinkfast.ops.ssd as ssd

    calls = []
    monkeypatch.setattr(ssd, "fla_kernel", lambda: (lambda *a, **k: calls.append(1) or _simple_gla_reference(*a, **k)))
    x, log_a, B, C = random_inputs(1, 9, 2, 4, 3, requires_grad=True)
    y = ssd.ssd_scan(x, log_a, B, C, chunk_size=4)
    y.sum().backward()  # the PyTorch path: differentiable
    assert not calls and x.grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_fla_kernel_equals_chunked_scan_on_gpu(dtype):
    from thinkfast.ops.ssd import fla_kernel, ssd_fla

    kernel = fla_kernel()
    if kernel is None:
        pytest.skip("flash-linear-attention (fla-core) is not installed")
    x, log_a, B, C = (t.cuda() for t in random_inputs(4, 300, 8, 64, 64))
    h0 = torch.randn(4, 8, 64, 64, device="cuda")
    x, B, C = x.to(dtype), B.to(dtype), C.to(dtype)
    y_ref, h_ref = ssd_chunked(x, log_a, B, C, initial_state=h0, return_final_state=True)
    y, h = ssd_fla(kernel, x, log_a, B, C, initial_state=h0, return_final_state=True)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(h, h_ref, rtol=tol, atol=tol)


def test_scan_and_matrices_stay_fp32_under_a_bf16_autocast():
    """Training on a GPU runs under a bf16 autocast, which would round the einsums' fp32 inputs (decays, carried
    states, MOHAWK's matrices) to bf16; CPU autocast shows the same rule."""
    from thinkfast.models.mixers import Attention
    from thinkfast.models.config import ModelConfig
    from thinkfast.models.mixers import Rotary

    x, log_a, B, C = random_inputs(1, 200, 2, 8, 8)
    plain = ssd_chunked(x, log_a, B, C, chunk_size=32, return_final_state=True)
    matrix = ssd_matrix(log_a, B, C)
    cfg = ModelConfig(vocab_size=11, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_mlp=64)
    attn, rope = Attention(cfg), Rotary(cfg)
    h = torch.randn(1, 40, 32)
    probs = attn.matrix(h, rope(torch.arange(40)[None]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = ssd_chunked(x, log_a, B, C, chunk_size=32, return_final_state=True)
        auto_matrix = ssd_matrix(log_a, B, C)
        auto_probs = attn.matrix(h, rope(torch.arange(40)[None]))
    for a, b in zip(auto, plain):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(auto_matrix, matrix, rtol=0, atol=0)
    assert auto_probs.dtype == torch.float32
    # the q/k projections run in bf16 under the autocast, as in training; only the scores' product stays fp32
    torch.testing.assert_close(auto_probs, probs, rtol=0, atol=0.05)
