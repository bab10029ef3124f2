"""The engine's fast decode step against the model's reference step; the fused SSM update; GPU fast paths."""

import pytest
import torch
from conftest import tiny_llama

from thinkfast.engine.decode import CudaGraphStep, DecodeStep, compile_ssm_update, engine_state, ssm_update_
from thinkfast.models import from_teacher
from thinkfast.ops.ssd import ssd_step

TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])

CASES = [("teacher", None), ("llamba", "discrete"), ("llamba", "mamba2"), ("hybrid", "mamba2")]




def _student(kind, ssm_param, d_conv=4):
    lm = from_teacher(tiny_llama(), kind=kind, ssm_param=ssm_param, d_conv=d_conv).lm
    with torch.no_grad():  # non-trivial conv, D and gate so every term of the Mamba step matters
        for layer in lm.layers:
            m = layer.mixer
            if hasattr(m, "conv1d"):
                m.conv1d.weight.normal_(0, 0.5)
                m.conv1d.bias.normal_(0, 0.1)
                m.D.normal_()
    return lm


def _prefilled_pair(lm, prompts, max_len, ssm_dtype=None):
    """Two identical states with each row prefilled with its own prompt (rows at different positions)."""
    # the reference in the model's own layout, the fast path in the engine's (SSM state stored P innermost)
    states = [lm.allocate_state(len(prompts), max_len, ssm_dtype=ssm_dtype),
              engine_state(lm, len(prompts), max_len, ssm_dtype=ssm_dtype)]
    for r, ids in enumerate(prompts):
        one = lm.allocate_state(1, len(ids))
        lm(torch.tensor([ids], device=lm.embed.weight.device), state=one)
        for st in states:
            st.copy_rows_(torch.tensor([r]), one, torch.tensor([0]), len(ids))
    return states


@pytest.mark.parametrize("row_group", [None, 2])
@pytest.mark.parametrize("kind,ssm_param,d_conv", [(k, p, 4) for k, p in CASES] + [("llamba", "mamba2", 9), ("llamba", "discrete", 1)])
@torch.no_grad()
def test_fast_step_equals_reference_step(kind, ssm_param, d_conv, row_group):
    lm = _student(kind, ssm_param, d_conv)
    prompts = [torch.randint(0, 101, (n,)).tolist() for n in (5, 17, 9, 30)]
    ref_state, fast_state = _prefilled_pair(lm, prompts, 64)
    fast = DecodeStep(lm, fast_state, row_group=row_group)  # 2: rows attend in two blocks, each to its own length
    pos = torch.tensor([len(p) for p in prompts])
    tok = torch.randint(0, 101, (4,))
    for _ in range(6):
        kv_len = int(pos.max()) + 1
        ref = lm.step(tok, pos, ref_state)  # attends over the whole static cache
        got = fast(tok, pos, kv_len)  # attends over the positions in use only
        torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)
        tok, pos = ref.argmax(-1), pos + 1
    for a, b in zip(ref_state.caches, fast_state.caches):  # both left the same state behind
        for x, y in zip(vars(a).values(), vars(b).values()):
            torch.testing.assert_close(x, y, rtol=0, atol=2e-5)


def _onednn_op_exists() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@pytest.mark.parametrize("kind,ssm_param", CASES)
@torch.no_grad()
def test_fast_step_with_onednn_gemms_equals_reference_step(kind, ssm_param, monkeypatch):
    """Large fp32 weights on a CPU go through oneDNN's GEMM in the eager step. With the size threshold at 0, every
    product of the step (q|k|v, o, MLP, Mamba in/out, head) takes that path; the step still matches the model's."""
    import thinkfast.engine.decode as decode

    monkeypatch.setattr(decode, "ONEDNN_MIN_WEIGHT", 0)
    lm = _student(kind, ssm_param)
    prompts = [torch.randint(0, 101, (n,)).tolist() for n in (5, 17, 9, 30)]
    ref_state, fast_state = _prefilled_pair(lm, prompts, 64)
    fast = DecodeStep(lm, fast_state)
    assert fast.onednn == _onednn_op_exists()  # on the CPU wheel this project installs, the op is there
    calls = []
    real = torch.ops.mkldnn._linear_pointwise if fast.onednn else None
    if fast.onednn:
        monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a[1].shape) or real(*a))
    pos, tok = torch.tensor([len(p) for p in prompts]), torch.randint(0, 101, (4,))
    for _ in range(4):
        ref = lm.step(tok, pos, ref_state)
        torch.testing.assert_close(fast(tok, pos, int(pos.max()) + 1), ref, rtol=0, atol=2e-5)
        tok, pos = ref.argmax(-1), pos + 1
    linears_per_step = 5 * len(lm.layers) + 1  # per layer the mixer's two (q|k|v and o, or in and out) and the MLP's three; the head
    assert len(calls) == (4 * linears_per_step if fast.onednn else 0)
    assert fast.onednn_products() == (linears_per_step if fast.onednn else 0)  # what `bench` rows record


def test_the_embedded_models_stay_on_the_default_gemm():
    """The oneDNN path starts at weights of ONEDNN_MIN_WEIGHT elements: the demo's teacher and both its students
    are smaller in every product, so their samples do not depend on it."""
    from thinkfast.embedded import embedded_teacher_dir
    from thinkfast.engine.decode import ONEDNN_MIN_WEIGHT
    from thinkfast.models import ThinkfastForCausalLM

    teacher = ThinkfastForCausalLM.from_pretrained(embedded_teacher_dir())
    for model in (teacher, from_teacher(teacher, kind="llamba", ssm_param="mamba2"),
                  from_teacher(teacher, kind="hybrid", attn_layers=[3])):
        biggest = max(p.numel() for p in model.parameters())
        assert 0 < biggest < ONEDNN_MIN_WEIGHT // 2
        assert DecodeStep(model.lm, engine_state(model.lm, 2, 16)).onednn_products() == 0


def test_row_blocks_read_only_their_own_rows_positions():
    lm = _student("teacher", None)
    step = DecodeStep(lm, engine_state(lm, 5, 64), row_group=2)
    assert step._row_blocks(torch.tensor([40, 33, 9, 12, 3]), 41) == [(0, 2, 41), (2, 4, 13), (4, 5, 4)]
    assert step._row_blocks(torch.tensor([40, 33, 9]), 41) == [(0, 3, 41)]  # under two blocks' rows: one call
    assert DecodeStep(lm, engine_state(lm, 5, 64))._row_blocks(torch.tensor([40, 33, 9, 12, 3]), 41) == [(0, 5, 41)]


@torch.no_grad()
def test_fast_step_on_leading_rows_leaves_other_rows_alone():
    lm = _student("hybrid", "mamba2")
    prompts = [torch.randint(0, 101, (n,)).tolist() for n in (6, 11, 8)]
    _, state = _prefilled_pair(lm, prompts, 32)
    before = [[t.clone() for t in vars(c).values()] for c in state.caches]
    DecodeStep(lm, state)(torch.tensor([3, 4]), torch.tensor([6, 11]), 12)  # rows 0 and 1 only
    for c, old in zip(state.caches, before):
        for t, o in zip(vars(c).values(), old):
            assert torch.equal(t[2], o[2])
            assert not torch.equal(t[:2], o[:2])


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_grouped_ssm_update_equals_reference_recurrence(fused):
    update = ssm_update_
    if fused:
        update = compile_ssm_update()
        if update is None:
            pytest.skip("torch.compile is not available here")
    for n, xg in ((3, 1), (2, 3)):  # x shared by a group (Llamba) or per head (dt-scaled); batch changes (dynamic)
        Hx, g, P, N = 2, 3, 4, 5
        state = torch.randn(n, Hx, g, P, N)
        x, B, C = torch.randn(n, Hx, xg, P), torch.randn(n, Hx, N), torch.randn(n, Hx, g, N)
        log_a = -torch.rand(n, Hx, g)
        ref_state = state.reshape(n, Hx * g, P, N).clone()
        y_ref, _ = ssd_step(ref_state, x.expand(n, Hx, g, P).reshape(n, -1, P), log_a.reshape(n, -1),
                            B[:, :, None].expand(n, Hx, g, N).reshape(n, -1, N), C.reshape(n, -1, N))
        hT = state.transpose(-1, -2).contiguous()  # the engine's layout: P innermost
        y = update(hT, x, B, C, torch.exp(log_a))
        torch.testing.assert_close(y.reshape(n, -1, P), y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hT.transpose(-1, -2).reshape(n, -1, P, N), ref_state, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_a_low_precision_ssm_state_is_rounded_once_per_step(dtype):
    """A bf16/fp16 state: the update runs in fp32 from the stored state and is rounded once when stored; y is read
    before that rounding (as mamba_ssm's kernel does)."""
    n, Hx, g, P, N = 3, 2, 3, 4, 5
    stored = torch.randn(n, Hx, g, N, P).to(dtype)
    x, B, C = torch.randn(n, Hx, 1, P), torch.randn(n, Hx, N), torch.randn(n, Hx, g, N)
    a = torch.rand(n, Hx, g)
    full = stored.float()
    y_ref = ssm_update_(full, x, B, C, a)
    y = ssm_update_(stored, x, B, C, a)
    assert stored.dtype == dtype
    torch.testing.assert_close(stored, full.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 0.01), (torch.float16, 0.001)])
@torch.no_grad()
def test_a_low_precision_ssm_state_tracks_the_fp32_one(dtype, atol):
    """The engine's step with a bf16/fp16 SSM state (KV and conv state unchanged) stays close to the fp32 one
    over many steps, but is not the same (the state really is rounded); it takes half the state's bytes."""
    from thinkfast.engine.engine import slot_bytes

    lm = _student("hybrid", "mamba2")
    prompts = [torch.randint(0, 101, (n,)).tolist() for n in (5, 17, 9, 30)]
    _, full = _prefilled_pair(lm, prompts, 96)
    ref_low, low = _prefilled_pair(lm, prompts, 96, dtype)  # each prefilled fp32 state rounded once into it
    kinds = {type(c).__name__: c for c in low.caches}
    assert kinds["SSMCache"].ssm.dtype == dtype and kinds["SSMCache"].conv.dtype == torch.float32
    assert kinds["KVCache"].k.dtype == torch.float32
    assert low.nbytes() == len(prompts) * slot_bytes(lm.cfg, 96, torch.float32, dtype) < full.nbytes()
    steps = [DecodeStep(lm, s) for s in (full, low)]
    pos = torch.tensor([len(p) for p in prompts])
    tok = torch.randint(0, 101, (4,))
    worst = 0.0
    for _ in range(40):
        ref, got = (step(tok, pos, int(pos.max()) + 1) for step in steps)
        worst = max(worst, (ref - got).abs().max().item())
        # the model's own step with the same low-precision state agrees with the engine's (one rounding each)
        torch.testing.assert_close(lm.step(tok, pos, ref_low), got, rtol=0, atol=2e-5)
        tok, pos = ref.argmax(-1), pos + 1
    assert 0 < worst < atol


def test_the_engine_refuses_an_ssm_state_dtype_it_does_not_keep():
    from thinkfast.engine import Engine
    from thinkfast.errors import ConfigError

    lm = _student("llamba", "mamba2")
    for bad in ("int8", torch.float64):
        with pytest.raises(ConfigError, match="SSM state dtype"):
            Engine(lm, None, ssm_state_dtype=bad)
    assert Engine(lm, None, ssm_state_dtype="bf16", max_len=8).state.caches[0].ssm.dtype == torch.bfloat16


@pytest.mark.parametrize("slots", [4, 2])
@torch.no_grad()
def test_compiled_cpu_step_gives_the_same_samples(slots):
    """Engine(compile=True) on CPU compiles the whole step once (rows and context dynamic): under continuous
    batching with mixed prompt lengths, sampled tokens equal the eager engine's. Two slots once failed to
    compile (the row count, marked dynamic, met a static size 2 and was specialised) and fell back to eager."""
    from thinkfast.engine.engine import Engine
    from thinkfast.engine.sampling import SamplingParams

    lm = _student("hybrid", "mamba2")
    prompts = [(f"p{i}", torch.randint(3, 101, (4 + 5 * i,)).tolist()) for i in range(6)]
    params = SamplingParams(temperature=0.9, max_new_tokens=24)
    runs = {}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for compiled in (False, True):
        lm.rotary._inv_freq.clear()  # as loaded: RoPE's table once filled inside the compiled step, which compiled again
        engine = Engine(lm, None, batch_size=slots, compile=compiled, stop_ids=[1, 2], max_len=64)
        if compiled and not engine._step.failed:  # compiled with the engine, before any sample's clock runs
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
        runs[compiled] = {(c.problem_id, c.sample_idx): c.tokens for c in engine.generate(prompts, n=2, params=params, seed=3)}
        if compiled:
            if engine._step.failed:
                assert "dynamic" not in engine._step.failed  # our marking, not a missing toolchain
                pytest.skip(f"torch.compile cannot build here: {engine._step.failed}")
            assert type(engine._step).__name__ == "CompiledStep" and not engine._step.step.onednn  # Inductor's GEMMs
            # one graph for every row count and context (a full batch, rows == the state's slots, once compiled a
            # second: its row count was unified with the state's size and specialised). torch 2.4.1 still compiles
            # that second graph (measured; same samples): one is checked on the torch the README installs
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            assert graphs == 1 or (graphs == 2 and TORCH_VERSION < (2, 13))
    assert len(runs[True]) == 12 and runs[True] == runs[False]
    assert len({len(t) for t in runs[True].values()}) > 1  # samples ended at different steps: rows were refilled


@torch.no_grad()
def test_every_compiled_engine_in_a_process_gets_its_own_graph(monkeypatch):
    """The compiled steps of several engines (models taking turns, a bf16 state beside an fp32 one) share one
    torch.compile cache; once it was full (8 entries), further engines silently decoded eagerly. Here the cache
    starts with room for one entry, and each of three engines (three SSM state dtypes) still compiles its graph."""
    from thinkfast.engine.engine import Engine

    key = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    monkeypatch.setattr(torch._dynamo.config, key, 1)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    lm = _student("llamba", "mamba2")
    engines = [Engine(lm, None, batch_size=3, compile=True, stop_ids=[], max_len=16, ssm_state_dtype=d)
               for d in (None, torch.bfloat16, torch.float16)]
    if any(e._step.failed for e in engines):
        pytest.skip(f"torch.compile cannot build here: {engines[0]._step.failed}")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind,ssm_param,ssm_dtype", [("teacher", None, None), ("hybrid", "mamba2", None),
                                                     ("hybrid", "mamba2", torch.bfloat16)])
@torch.no_grad()
def test_cuda_graph_step_equals_eager_step(kind, ssm_param, ssm_dtype):
    lm = _student(kind, ssm_param).cuda()
    prompts = [torch.randint(0, 101, (n,)).tolist() for n in (5, 17, 9, 30)]
    a, b = _prefilled_pair(lm, prompts, 512, ssm_dtype)
    eager = DecodeStep(lm, a, compile_ssm_update())
    graphs = CudaGraphStep(DecodeStep(lm, b, compile_ssm_update()), 4, bucket=256)
    snapshot = [[t.clone() for t in vars(c).values()] for c in b.caches]
    graphs.capture_all()  # capturing runs the step: put the state back as the engine would find it
    for c, old in zip(b.caches, snapshot):
        for t, o in zip(vars(c).values(), old):
            t.copy_(o)
    pos = torch.tensor([len(p) for p in prompts], device="cuda")
    tok = torch.randint(0, 101, (4,), device="cuda")
    for _ in range(4):
        ref = eager(tok, pos, int(pos.max()) + 1)
        got = graphs(tok, pos, int(pos.max()) + 1)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        tok, pos = ref.argmax(-1), pos + 1


@pytest.mark.parametrize("kind,ssm_param,buckets", [("llamba", "mamba2", [512]), ("hybrid", "mamba2", [256, 512])])
def test_cuda_graph_buckets_only_where_context_matters(kind, ssm_param, buckets):
    """One graph per context bucket for a model with attention; a pure Mamba step ignores the context, so one
    graph in all (each graph holds its own logits buffer). Constructing the replayer touches no GPU."""
    lm = _student(kind, ssm_param)
    graphs = CudaGraphStep(DecodeStep(lm, engine_state(lm, 2, 512)), 2, bucket=256)
    assert graphs.buckets() == buckets
    assert [graphs._bucket(n) for n in (1, 300, 512)] == ([512] * 3 if kind == "llamba" else [256, 512, 512])


def test_a_failing_compiled_ssm_update_falls_back_to_the_eager_one(caplog):
    """torch.compile is lazy: a broken toolchain fails at the first compiled step, which the engine takes when
    it allocates its state. It then decodes with the eager update, and the samples are the eager engine's."""
    from thinkfast.engine import Engine
    from thinkfast.engine.sampling import SamplingParams

    lm = _student("hybrid", "mamba2")
    params = SamplingParams(temperature=0, max_new_tokens=6)
    prompts = [("a", [3, 4, 5])]
    eager = [c.tokens for c in Engine(lm, None, batch_size=2, max_len=16, stop_ids=[0]).generate(prompts, 2, params)]

    def broken(*args):
        raise RuntimeError("no C++ compiler found")

    engine = Engine(lm, None, batch_size=2, max_len=16, stop_ids=[0])
    engine._step.ssm_update = broken  # as a GPU engine holds a compiled update
    with caplog.at_level("WARNING"):
        engine._compile_now()
    assert "the compiled SSM update failed (no C++ compiler found); using the eager one" in caplog.text
    assert engine._step.ssm_update is ssm_update_
    assert [c.tokens for c in engine.generate(prompts, 2, params)] == eager


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind,ssm_param", [("llamba", "mamba2"), ("hybrid", "mamba2")])
def test_engine_captures_graphs_outside_no_grad(kind, ssm_param):
    """Models load with requires_grad weights and the engine is built in the caller's grad mode: capture must
    still succeed (with autograd on, the compiled SSM update failed to trace and graphs were silently dropped)."""
    from thinkfast.engine import Engine

    lm = _student(kind, ssm_param).cuda()
    engine = Engine(lm, None, batch_size=4, max_len=300, device="cuda", dtype=torch.bfloat16, stop_ids=[0])
    assert engine.use_graphs and isinstance(engine._step, CudaGraphStep)
    assert engine._step.buckets() == ([300] if kind == "llamba" else [256, 300])
