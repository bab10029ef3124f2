"""One decode step over the static per-slot state: the engine's fast path, tested against `ThinkfastLM.step`.

It reads the model's own modules and weights and computes the same function with less work per layer:
  - attention: one fused q|k|v projection, RoPE applied to q and k at once, the new key and value written with
    one `index_copy_`, and attention over only the positions in use with additive masks shared by every
    attention layer (SDPA, the query heads of a group read their KV head without copying it); with `row_group`
    the rows attend in blocks, each over its own longest row rather than the batch's (the engine keeps rows
    ordered by context, so a block of young samples skips the old ones' positions);
  - Mamba: the SSM state update and its readout in one function (`ssm_update_`) over grouped heads (x and B are
    broadcast to their query block, never copied), which `torch.compile` can fuse into a single pass over the
    state: C++ on CPU, Triton on GPU. The state is read and written once per step;
  - products: on a CPU in fp32, every weight of at least ONEDNN_MIN_WEIGHT elements goes through oneDNN's GEMM,
    which ran large weights with few rows much faster than MKL's sgemm on the (AMD) host measured.
Rows are the first `n` slots of the state (the engine keeps its live samples packed at the front).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from ..models.mixers import KVCache, Mamba1Mixer, SSMCache
from ..models.model import ModelState, ThinkfastLM
from ..ops.selective import selective_step

log = logging.getLogger(__name__)


def ssm_update_(hT: torch.Tensor, x: torch.Tensor, B: torch.Tensor, C: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """One SSD recurrence step over grouped heads, in place; returns y.

    hT (n, Hx, g, N, P): the state transposed, P innermost (see `engine_state`); x (n, Hx, 1 or g, P);
    B (n, Hx, N); C (n, Hx, g, N); a (n, Hx, g) the decay.  h <- a h + x B^T ; y = h C  -> (n, Hx, g, P) fp32.
    An fp32 state is updated in place (no state-sized temporary: at CPU sizes the state lives in cache and a
    temporary doubles its traffic); the readout is a row-vector product along P. A lower-precision state goes
    through `ssm_update_functional`: the update in fp32, rounded once when stored, y read before rounding.
    """
    if hT.dtype != torch.float32:
        return ssm_update_functional(hT, x, B, C, a)
    hT.mul_(a.float()[..., None, None])
    hT.addcmul_(B.float()[:, :, None, :, None], x.float()[..., None, :])
    return torch.matmul(C.float()[..., None, :], hT)[..., 0, :]


def ssm_update_functional(hT, x, B, C, a):
    """`ssm_update_` written for torch.compile (no out=): Inductor fuses it into one pass over the state.
    The new state is computed in fp32 whatever the state's dtype; storing it rounds it (as mamba_ssm's kernel)."""
    new = hT * a.float()[..., None, None] + B.float()[:, :, None, :, None] * x.float()[..., None, :]
    hT.copy_(new)
    return (new * C.float()[..., :, None]).sum(-2)


def compile_ssm_update():
    """torch.compile'd SSM update (dynamic batch), or None when compilation is unavailable here."""
    try:
        return torch.compile(ssm_update_functional, dynamic=True, fullgraph=True)
    except Exception as e:  # no compiler toolchain, unsupported platform
        log.warning("torch.compile unavailable (%s); using the eager SSM update", e)
        return None


def _room_for_another_compiled_step(entries: int = 8) -> None:
    """Every CompiledStep compiles the same method, DecodeStep.__call__, and torch.compile keeps one cache per code
    object (8 graphs by default): each engine's step is another entry, so without more room the ninth engine in a
    process (sooner with recompiles: several models taking turns, say) would silently decode eagerly."""
    config = torch._dynamo.config
    key = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # the name before torch 2.6
    setattr(config, key, getattr(config, key) + entries)


class CompiledStep:
    """The whole decode step through torch.compile (Inductor), for CPU: it fuses the norms, activations, conv and
    SSM update into a few C++ loops around the GEMMs (measured at the demo's shape, batch 64, context 600, two
    threads: Llamba 14.6 -> 10.0 ms per step, teacher 26.8 -> 22.4 ms). Compiled once with dynamic row count and
    context length (tens of seconds, cached on disk by Inductor), so it pays off in long runs, not short ones.
    If compilation fails here (no C++ compiler, say), it says so once and runs the eager step from then on."""

    def __init__(self, step: DecodeStep):
        self.step = step
        step.row_group = None  # row blocks depend on the positions' values: one graph attends over all rows
        step.onednn = False  # Inductor picks the GEMMs
        # only the row count and the context length vary: every tensor the step holds (state, fused weights,
        # tables) keeps its sizes, else equal sizes get unified with the row count and force recompiles
        held = [t for c in step.state.caches for t in vars(c).values()]
        for v in vars(step).values():
            held += list(v.values()) if isinstance(v, dict) else [v]
        for t in held:
            if torch.is_tensor(t):
                torch._dynamo.mark_static(t)
        # RoPE's table for this device, made now: made inside the first compiled call, it fails that graph's guard
        # and the step compiles a second time, in the first sampling step, on the samples' clock
        step.lm.rotary(torch.zeros(1, 1, dtype=torch.long, device=step.lm.embed.weight.device))
        _room_for_another_compiled_step()
        self.compiled = torch.compile(step.__call__, dynamic=True)
        self.failed: str | None = None

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        # one row would be specialised (and compiled) again by torch.compile: the eager step serves it
        if self.failed is None and tokens.shape[0] > 1:
            try:
                # copies, not views of the engine's row buffers: a view's base size would be guarded on and
                # every new row count would compile again
                tokens, positions = tokens.clone(), positions.clone()
                for t in (tokens, positions):  # else a full batch's row count is unified with the state's and specialised
                    torch._dynamo.maybe_mark_dynamic(t, 0)
                return self.compiled(tokens, positions, kv_len)
            except Exception as e:  # no toolchain, unsupported op: compilation fails before the state is touched
                self.failed = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                log.warning("torch.compile of the decode step failed (%s); decoding eagerly", self.failed)
        return self.step(tokens, positions, kv_len)


def engine_state(lm: ThinkfastLM, batch: int, max_len: int, device=None, dtype=None, ssm_dtype=None) -> ModelState:
    """`lm.allocate_state` with the Mamba states stored transposed in memory, SSM state as (B, H, N, P) and conv
    state as (B, d_conv - 1, conv_dim), and exposed as the usual (B, H, P, N) and (B, conv_dim, d_conv - 1)
    views: the model's code reads and writes them as before; the fast step gets the innermost dimension it
    reduces along rows (P for the state readout, channels for the conv), which vectorises on CPU."""
    state = lm.allocate_state(batch, max_len, device, dtype, ssm_dtype)
    for c in state.caches:
        if isinstance(c, SSMCache):
            c.ssm = torch.zeros_like(c.ssm.transpose(-1, -2).contiguous()).transpose(-1, -2)
            c.conv = torch.zeros_like(c.conv.transpose(1, 2).contiguous()).transpose(1, 2)
    return state


ONEDNN_MIN_WEIGHT = 1 << 18  # elements (1 MiB in fp32); the embedded models' largest is 98k, so they stay on MKL
_ONEDNN_OK: bool | None = None


def onednn_linear_works() -> bool:
    """Whether oneDNN's fp32 linear (`torch.ops.mkldnn._linear_pointwise`, the op Inductor emits for CPU linears)
    runs here and agrees with F.linear: checked once, on a small product. `THINKFAST_ONEDNN=0` turns it off."""
    global _ONEDNN_OK
    if _ONEDNN_OK is None:
        if os.environ.get("THINKFAST_ONEDNN", "1") == "0":
            _ONEDNN_OK = False
            return False
        try:
            x, w = torch.randn(4, 64), torch.randn(96, 64)
            _ONEDNN_OK = bool(torch.backends.mkldnn.is_available()) and torch.allclose(
                torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), F.linear(x, w), rtol=1e-4, atol=1e-4)
        except Exception:  # an older or newer torch without the op, or a build without oneDNN
            _ONEDNN_OK = False
    return _ONEDNN_OK


def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm in one fused op (the same numbers: fp32 statistics, weight applied in x's dtype)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)
    return norm.weight * F.rms_norm(x.float(), norm.weight.shape, None, norm.eps).to(x.dtype)


class DecodeStep:
    """`step(tokens (n,), positions (n,), kv_len) -> logits (n, V)` on rows [0, n) of `state`, updating it.

    Weights are read from the model when this is built (the fused q|k|v weight is a copy): rebuild it after
    changing the model's weights.
    """

    allocate = staticmethod(engine_state)  # the state layout this step reads fastest (as `ModelStep.allocate`)
    reads_weights = True  # not the modules: an adapter on one (PEFT's LoRA) would be skipped

    def __init__(self, lm: ThinkfastLM, state: ModelState, ssm_update=None, row_group: int | None = None):
        self.lm, self.state, self.cfg = lm, state, lm.cfg
        self.ssm_update = ssm_update or ssm_update_
        # attention per block of `row_group` rows, each over its own rows' longest context (eager steps only:
        # the blocks depend on the positions' values); pays when rows are ordered by context, as the engine keeps them
        self.row_group = row_group
        # large fp32 weights on a CPU go through oneDNN's GEMM: with few rows MKL's sgemm runs them far slower
        # (SmolLM2-135M decodes 1.16-1.64x faster, benchmarks/cpu_gemm.md); eager steps only (CompiledStep leaves
        # the choice to Inductor)
        self.onednn = (lm.embed.weight.device.type == "cpu" and lm.embed.weight.dtype == torch.float32
                       and onednn_linear_works())
        cfg = lm.cfg
        self.hd, self.n_heads, self.n_kv = cfg.hd, cfg.n_heads, cfg.n_kv_heads
        self.max_len = state.max_len
        self.attn_layers = [i for i, layer in enumerate(lm.layers) if layer.is_attention]
        self.qkv_weight, self.qkv_bias = {}, {}
        for i in self.attn_layers:
            m = lm.layers[i].mixer
            self.qkv_weight[i] = torch.cat([m.q_proj.weight, m.k_proj.weight, m.v_proj.weight]).detach()
            if m.q_proj.bias is not None:  # Qwen2's
                self.qkv_bias[i] = torch.cat([m.q_proj.bias, m.k_proj.bias, m.v_proj.bias]).detach()
        self.neg_A, self.conv_w, self.D = {}, {}, {}
        self.mamba1_layers = {i for i, layer in enumerate(lm.layers) if isinstance(layer.mixer, Mamba1Mixer)}
        for i in self.mamba1_layers:  # converted checkpoints' Mamba-1 layers
            m = lm.layers[i].mixer
            self.conv_w[i] = m.conv1d.weight.detach()[:, 0, :].t().contiguous()
            self.neg_A[i] = m._A().detach()
            self.D[i] = m.D.detach().float().view(m.H, m.P)
        for i, layer in enumerate(lm.layers):
            m = layer.mixer
            if not layer.is_attention and i not in self.mamba1_layers:
                self.conv_w[i] = m.conv1d.weight.detach()[:, 0, :].t().contiguous()  # (d_conv, conv_dim)
                self.D[i] = m.D.detach().to(lm.embed.weight.dtype).view(1, m.Hx, m.H // m.Hx, 1)
                if not m.discrete:
                    self.neg_A[i] = -torch.exp(m.A_log.detach().float())
        # RoPE sign pattern: rotate_half(x) == roll(x, hd/2) * sign
        half = self.hd // 2
        self.rope_sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(lm.embed.weight.device)
        dev = lm.embed.weight.device
        self.kv_heads = torch.arange(self.n_kv, device=dev)
        self.arange = torch.arange(self.max_len, device=dev)

        # the weights whose products go through oneDNN, decided once (the step is rebuilt when weights change)
        self.onednn_weights = {id(w) for w in self._product_weights()
                               if w.numel() >= ONEDNN_MIN_WEIGHT and w.is_contiguous()} if self.onednn else set()

    def _product_weights(self) -> list[torch.Tensor]:
        weights = [*self.qkv_weight.values(), self.lm.head_weight]
        for layer in self.lm.layers:
            m = layer.mixer
            weights += [m.o_proj.weight] if layer.is_attention else [m.in_proj.weight, m.out_proj.weight]
            weights += [layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight]
        return weights

    def onednn_products(self) -> int:
        """How many of a step's weight products run on oneDNN (0 with the path off, or every weight small)."""
        return len(self.onednn_weights) if self.onednn else 0

    # ------------------------------------------------------------------ the step

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        lm = self.lm
        n = tokens.shape[0]
        h = F.embedding(tokens, lm.embed.weight)  # (n, D)
        if self.attn_layers:
            cos, sin = lm.rotary(positions[:, None])  # (n, 1, hd) fp32
            sin = sin * self.rope_sign
            blocks = self._row_blocks(positions, kv_len)
            bias = []
            for a, b, length in blocks:
                valid = self.arange[:length] <= positions[a:b, None]  # (rows, S)
                bias.append(torch.zeros(b - a, 1, 1, length, dtype=h.dtype, device=h.device)
                            .masked_fill_(~valid[:, None, None, :], float("-inf")))
            # flat row of each (slot, kv head, position) in a (B*n_kv*S_max, hd) view of the cache
            write_idx = ((torch.arange(n, device=h.device)[:, None] * self.n_kv + self.kv_heads) * self.max_len + positions[:, None]).reshape(-1)
        for i, (layer, cache) in enumerate(zip(lm.layers, self.state.caches)):
            x = rms_norm(layer.input_norm, h)
            if layer.is_attention:
                y = self._attention(i, layer.mixer, x, cos, sin, blocks, bias, write_idx, cache)
            elif i in self.mamba1_layers:
                y = self._mamba1(i, layer.mixer, x, cache)
            else:
                y = self._mamba(i, layer.mixer, x, cache)
            h = h + y
            h = h + layer.mlp(rms_norm(layer.mlp_norm, h), self.linear)
        return self.linear(rms_norm(lm.norm, h), lm.head_weight)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ weight^T (+ bias: only q, k, v and a Mamba in_proj initialised from them have one)."""
        if self.onednn and id(weight) in self.onednn_weights:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
        return F.linear(x, weight, bias)

    def _row_blocks(self, positions: torch.Tensor, kv_len: int) -> list[tuple[int, int, int]]:
        """(first row, end row, positions to attend) per block of rows: one block over `kv_len` unless row
        blocks are on, then each block reads only up to its own longest row."""
        n, g = positions.shape[0], self.row_group
        if not g or n < 2 * g:
            return [(0, n, kv_len)]
        pos = positions.tolist()
        return [(a, min(a + g, n), max(pos[a:a + g]) + 1) for a in range(0, n, g)]

    def _attention(self, i, m, x, cos, sin, blocks, bias, write_idx, cache: KVCache):
        n, H, Hk, hd = x.shape[0], self.n_heads, self.n_kv, self.hd
        qkv = self.linear(x, self.qkv_weight[i], self.qkv_bias.get(i)).view(n, H + 2 * Hk, hd)
        qk = qkv[:, : H + Hk]
        if m.q_norm is not None:  # Qwen3's per-head norms, before RoPE
            qk = torch.cat([rms_norm(m.q_norm, qk[:, :H]), rms_norm(m.k_norm, qk[:, H:])], dim=1)
        qk = qk.float()
        qk = (qk * cos + torch.roll(qk, hd // 2, dims=-1) * sin).to(x.dtype)  # RoPE on q and k together
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hk:]
        Bmax = cache.k.shape[0]
        cache.k.view(Bmax * Hk * self.max_len, hd).index_copy_(0, write_idx, k.reshape(n * Hk, hd).to(cache.k.dtype))
        cache.v.view(Bmax * Hk * self.max_len, hd).index_copy_(0, write_idx, v.reshape(n * Hk, hd).to(cache.v.dtype))
        qg = q.reshape(n, Hk, H // Hk, hd)  # the G query heads of a group act as G queries against its KV head
        ys = []
        for (a, b, length), mask in zip(blocks, bias):
            K, V = cache.k[a:b, :, :length], cache.v[a:b, :, :length]  # (rows, Hk, S, hd) views
            ys.append(F.scaled_dot_product_attention(qg[a:b], K.to(qg.dtype), V.to(qg.dtype), attn_mask=mask, scale=m.scale))
        y = ys[0] if len(ys) == 1 else torch.cat(ys)
        return self.linear(y.reshape(n, H * hd), m.o_proj.weight)

    def _mamba(self, i, m, x, cache: SSMCache):
        n = x.shape[0]
        z, xBC, dt_raw = m._split(self.linear(x, m.in_proj.weight, m.in_proj.bias))
        convT = cache.conv[:n].transpose(1, 2)  # (n, d_conv - 1, conv_dim), contiguous with an `engine_state`
        window = torch.cat([convT, xBC.unsqueeze(1).to(convT.dtype)], dim=1)  # (n, d_conv, conv_dim)
        convT.copy_(window[:, 1:])
        xBC = ((window * self.conv_w[i]).sum(1) + m.conv1d.bias).to(x.dtype)
        if not m.discrete:
            xBC = F.silu(xBC)
        xs, Bs, Cs = torch.split(xBC, [m.d_x, m.d_b, m.d_c], dim=-1)
        Hx, g, P, N = m.Hx, m.H // m.Hx, m.P, m.N
        xs = xs.view(n, Hx, 1, P)
        Bs = Bs.view(n, Hx, N)
        Cs = Cs.view(n, Hx, g, N)
        if m.c_norm is not None:
            Bs, Cs = rms_norm(m.b_norm, Bs), rms_norm(m.c_norm, Cs)
        dt = dt_raw.float() + m.dt_bias
        if m.discrete:  # a = exp(-softplus(dt)) = sigmoid(-dt)
            a, x_in = torch.sigmoid(-dt), xs
        else:
            dt = F.softplus(dt)
            a = torch.exp(dt * self.neg_A[i])
            x_in = xs * dt.view(n, Hx, g, 1).to(xs.dtype)
        hT = cache.ssm[:n].transpose(-1, -2).view(n, Hx, g, N, P)  # P innermost with an `engine_state`
        y = self.ssm_update(hT, x_in, Bs, Cs, a.view(n, Hx, g)).to(x.dtype)  # (n, Hx, g, P)
        y = torch.addcmul(y, self.D[i], xs)  # + D x (unscaled x)
        return m._gate_out(y.reshape(n, m.d_inner), z, self.linear)

    def _mamba1(self, i, m, x, cache: SSMCache):
        """Mamba-1's step (`Mamba1Mixer.step`) on the first n slots, its products through `self.linear`."""
        n = x.shape[0]
        z, xs, B, C, dt_low = torch.split(self.linear(x, m.in_proj.weight), [m.d_inner, m.d_x, m.d_b, m.d_c, m.R], dim=-1)
        convT = cache.conv[:n].transpose(1, 2)  # (n, d_conv - 1, conv_dim)
        window = torch.cat([convT, xs.unsqueeze(1).to(convT.dtype)], dim=1)
        convT.copy_(window[:, 1:])
        xs = F.silu(((window * self.conv_w[i]).sum(1) + m.conv1d.bias).to(x.dtype))
        xh, dt, B, C = m._heads(xs, B, C, dt_low)
        y = selective_step(cache.ssm[:n], xh, dt, self.neg_A[i], B, C)
        y = (y + self.D[i] * xh.float()).to(x.dtype)
        return self.linear(y.reshape(n, m.d_inner) * F.silu(z), m.out_proj.weight)


class CudaGraphStep:
    """CUDA-graph replay of a DecodeStep over all B slots, one graph per kv_len bucket (GPU only).

    Capturing runs the step, which updates the state: so every bucket is captured up front, before any sample
    owns a slot (`capture_all`). The engine then steps all B rows every time (free rows are harmless).
    Untested on hardware in this repository's CI; `Engine(cuda_graphs=False)` turns it off.
    """

    def __init__(self, step: DecodeStep, batch: int, bucket: int = 256):
        self.step, self.batch, self.bucket = step, batch, bucket
        step.row_group = None  # a graph cannot choose its blocks from the positions' values
        dev = step.lm.embed.weight.device
        self.tokens = torch.zeros(batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(batch, dtype=torch.long, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def buckets(self) -> list[int]:
        if not self.step.attn_layers:  # no attention: the context length plays no part in the step
            return [self.step.max_len]
        return sorted({min(self.step.max_len, b) for b in range(self.bucket, self.step.max_len + self.bucket, self.bucket)})

    def _bucket(self, kv_len: int) -> int:
        if not self.step.attn_layers:
            return self.step.max_len
        return min(self.step.max_len, -(-kv_len // self.bucket) * self.bucket)

    def capture_all(self) -> None:
        dev = self.tokens.device
        # inference mode, as the sampling loop replays: with autograd on, a compiled SSM update fails to trace its
        # in-place state write and every step's activations stay alive. On the engine's own device, which need
        # not be the current one (cuda:1, a torchrun rank): streams made elsewhere would capture nothing
        with torch.inference_mode(), torch.cuda.device(dev):
            s = torch.cuda.Stream(device=dev)
            s.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(s):  # warm-up outside capture: lazy inits, cuBLAS handles, compiled kernels
                for _ in range(2):
                    self.step(self.tokens, self.positions, self.buckets()[0])
            torch.cuda.current_stream(dev).wait_stream(s)
            pool = None
            for S in reversed(self.buckets()):  # largest first, so smaller graphs reuse its memory pool
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=torch.cuda.Stream(device=dev)):
                    out = self.step(self.tokens, self.positions, S)
                pool = graph.pool()
                self.graphs[S] = (graph, out)
            torch.cuda.synchronize(dev)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        n = tokens.shape[0]
        if n != self.batch:
            raise RuntimeError(f"CudaGraphStep replays {self.batch} rows, got {n}")
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        graph, out = self.graphs[self._bucket(kv_len)]
        graph.replay()
        return out
