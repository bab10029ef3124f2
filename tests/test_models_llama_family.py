"""Llama-family teachers other than Llama: Qwen2 (q, k, v biases), Qwen3 (per-head q and k norms) and Mistral
(sliding window, explicit head size). HF's own forward is the reference; students take the biases and norms; the
engine's step and the CLI run them."""

import json

import pytest
import torch
from conftest import tiny_llama, tiny_mistral, tiny_qwen2, tiny_qwen3, write_distill_files

import thinkfast  # noqa: F401  (registers the Auto classes)
from thinkfast.cli import main
from thinkfast.distill.toy import char_tokenizer
from thinkfast.engine.decode import DecodeStep, engine_state
from thinkfast.errors import ThinkfastError
from thinkfast.models import ThinkfastForCausalLM, from_teacher
from thinkfast.models.teacher import load_teacher, model_config_from_hf


@pytest.mark.parametrize("make", [tiny_qwen2, lambda: tiny_qwen2(tie=False), tiny_qwen3, lambda: tiny_mistral(sliding_window=None)],
                         ids=["qwen2", "qwen2-untied", "qwen3", "mistral"])
def test_all_attention_model_reproduces_hf(make):
    teacher = make()
    model = from_teacher(teacher, kind="teacher")
    ids = torch.randint(0, 101, (2, 150))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, teacher(ids).logits, rtol=0, atol=1e-4)


def test_qwen2_biases_and_qwen3_norms_are_read():
    # guards the test above: without Qwen2's biases, or with Qwen3's norm weights at 1, the logits move
    qwen2, qwen3 = from_teacher(tiny_qwen2(), kind="teacher"), from_teacher(tiny_qwen3(), kind="teacher")
    assert qwen2.lm.cfg.qkv_bias and not qwen2.lm.cfg.qk_norm and qwen2.lm.layers[0].mixer.q_norm is None
    assert qwen3.lm.cfg.qk_norm and not qwen3.lm.cfg.qkv_bias and qwen3.lm.layers[0].mixer.k_proj.bias is None
    ids = torch.randint(0, 101, (1, 40))
    with torch.no_grad():
        for model, neutral in ((qwen2, lambda m: m.k_proj.bias.zero_()), (qwen3, lambda m: m.q_norm.weight.fill_(1.0))):
            ref = model(ids).logits
            for layer in model.lm.layers:
                neutral(layer.mixer)
            assert (model(ids).logits - ref).abs().max() > 1e-2


def _x_b_c_at_init(mixer, x):
    """A fresh mixer's per-head x, B and C for input x, its (identity) conv's output taken before any activation."""
    with torch.no_grad():
        _, xBC, dt_raw = mixer._split(mixer.in_proj(x))
        pre_activation = mixer.conv1d(xBC.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)
        xh, _, B, C, _ = mixer._heads(pre_activation, dt_raw)
    return xh, B, C


def test_every_stop_token_of_the_generation_config_carries_over(tmp_path):
    """Qwen2.5-Instruct names one end token in config.json and two in generation_config.json: a converted model
    and its students stop on both, also once saved and loaded again."""
    from transformers import GenerationConfig

    from thinkfast.engine import stop_token_ids

    teacher = tiny_qwen2()  # config.json: eos 2
    teacher.generation_config = GenerationConfig(eos_token_id=[2, 7], bos_token_id=1)
    teacher.save_pretrained(tmp_path / "qwen")
    loaded, _ = load_teacher(tmp_path / "qwen")
    for kind in ("teacher", "hybrid"):
        model = from_teacher(loaded, kind=kind)
        assert model.config.eos_token_id == [2, 7] and stop_token_ids(None, model) == {2, 7}
        model.save_pretrained(tmp_path / kind)
        assert stop_token_ids(None, ThinkfastForCausalLM.from_pretrained(tmp_path / kind)) == {2, 7}
    assert from_teacher(tiny_qwen2(), kind="teacher").config.eos_token_id == 2  # one stop token stays an int


@pytest.mark.parametrize("changes", [{}, {"ssm_kv_heads": 8}, {"d_state": 16}])
def test_mamba_mixers_take_q_k_v_with_their_biases(changes):
    """At init a Mamba mixer's C, B and x are its attention's q, k and v, biases included, per head block."""
    teacher = tiny_qwen2()
    student = from_teacher(teacher, kind="llamba", ssm_param="mamba2", **changes).lm
    x = torch.randn(1, 6, 64)
    for i, layer in enumerate(student.layers):
        att, mixer = teacher.model.layers[i].self_attn, layer.mixer
        xh, B, C = _x_b_c_at_init(mixer, x)
        with torch.no_grad():
            q, k, v = att.q_proj(x).view(1, 6, 8, 8), att.k_proj(x).view(1, 6, 2, 8), att.v_proj(x).view(1, 6, 2, 8)
        for h in range(8):
            torch.testing.assert_close(C[:, :, h, :8], q[:, :, h])
            torch.testing.assert_close(B[:, :, h, :8], k[:, :, h // 4])
            torch.testing.assert_close(xh[:, :, h], v[:, :, h // 4])
        z_and_dt = torch.cat([mixer.in_proj.bias[: mixer.d_inner], mixer.in_proj.bias[-mixer.H:]])
        assert z_and_dt.abs().max() == 0  # only the parts that came from attention carry a bias
    llama_student = from_teacher(tiny_llama(), kind="llamba").lm  # from Llama: no bias anywhere
    assert not llama_student.cfg.qkv_bias and llama_student.layers[0].mixer.in_proj.bias is None


@pytest.mark.parametrize("changes", [{"ssm_kv_heads": None}, {"ssm_kv_heads": 8}])
def test_mamba_mixers_take_q_and_k_norms_as_c_and_b_norms(changes):
    """From a Qwen3 teacher, C and B are normalised per head with q's and k's norm weights: at init (identity conv,
    before the activation Mamba-2's parameterisation adds) they equal the teacher's normalised q and k."""
    teacher = tiny_qwen3()
    student = from_teacher(teacher, kind="llamba", ssm_param="mamba2", **changes).lm
    x = torch.randn(1, 6, 64)
    for i, layer in enumerate(student.layers):
        att, mixer = teacher.model.layers[i].self_attn, layer.mixer
        _, B, C = _x_b_c_at_init(mixer, x)
        with torch.no_grad():
            q = att.q_norm(att.q_proj(x).view(1, 6, 8, 16))
            k = att.k_norm(att.k_proj(x).view(1, 6, 2, 16))
        torch.testing.assert_close(C, q)
        torch.testing.assert_close(B, k.repeat_interleave(4, dim=2))
    with pytest.raises(ThinkfastError, match="d_state=32: this teacher normalises q and k"):
        from_teacher(teacher, kind="llamba", d_state=32)


@pytest.mark.parametrize("kind,ssm_param", [("teacher", None), ("llamba", "mamba2"), ("llamba", "discrete"), ("hybrid", "mamba2")])
@pytest.mark.parametrize("onednn", [False, True])
@pytest.mark.parametrize("make", [tiny_qwen2, tiny_qwen3])
@torch.no_grad()
def test_engine_step_equals_model_step(make, kind, ssm_param, onednn, monkeypatch):
    import thinkfast.engine.decode as decode

    if onednn:  # every product through oneDNN's GEMM, with its bias
        monkeypatch.setattr(decode, "ONEDNN_MIN_WEIGHT", 0)
    lm = from_teacher(make(), kind=kind, ssm_param=ssm_param).lm
    for layer in lm.layers:
        if getattr(layer.mixer, "in_proj", None) is not None and layer.mixer.in_proj.bias is not None:
            layer.mixer.in_proj.bias.normal_(0, 0.3)  # z and dt too, once trained
    prompts = [torch.randint(0, 101, (n,)).tolist() for n in (5, 17, 9)]
    ref_state, fast_state = lm.allocate_state(3, 48), engine_state(lm, 3, 48)
    for r, ids in enumerate(prompts):
        one = lm.allocate_state(1, len(ids))
        lm(torch.tensor([ids]), state=one)
        for st in (ref_state, fast_state):
            st.copy_rows_(torch.tensor([r]), one, torch.tensor([0]), len(ids))
    fast = DecodeStep(lm, fast_state)
    assert fast.onednn_products() == (5 * len(lm.layers) + 1 if onednn and fast.onednn else 0)
    pos, tok = torch.tensor([len(p) for p in prompts]), torch.randint(0, 101, (3,))
    for _ in range(5):
        ref = lm.step(tok, pos, ref_state)
        torch.testing.assert_close(fast(tok, pos, int(pos.max()) + 1), ref, rtol=0, atol=2e-5)
        tok, pos = ref.argmax(-1), pos + 1


def test_a_sliding_window_caps_the_context():
    """thinkfast attends to every position: equal to a sliding window only up to its length, so the context stops
    there. Mistral's window below its positions, Qwen2's when switched on; a window past them changes nothing."""
    assert model_config_from_hf(tiny_mistral(sliding_window=64).config).max_position_embeddings == 64
    assert model_config_from_hf(tiny_mistral(sliding_window=4096).config).max_position_embeddings == 512
    qwen = tiny_qwen2(use_sliding_window=True, sliding_window=100, max_window_layers=1)
    assert model_config_from_hf(qwen.config).max_position_embeddings == 100
    assert model_config_from_hf(tiny_qwen2().config).max_position_embeddings == 512
    teacher = tiny_mistral(sliding_window=64)  # within the window the two agree
    ids = torch.randint(0, 101, (1, 64))
    with torch.no_grad():
        torch.testing.assert_close(from_teacher(teacher, kind="teacher")(ids).logits, teacher(ids).logits, rtol=0, atol=1e-4)


def test_architectures_it_cannot_reproduce_are_refused_in_one_line(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

    small = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    biased = tmp_path / "llama-o-bias"
    LlamaForCausalLM(LlamaConfig(attention_bias=True, **small)).save_pretrained(biased)
    qwen3_biased = tmp_path / "qwen3-o-bias"
    tiny_qwen3(attention_bias=True).save_pretrained(qwen3_biased)
    phi3 = tmp_path / "phi3"
    Phi3ForCausalLM(Phi3Config(pad_token_id=0, **small)).save_pretrained(phi3)
    for path, needle in [(biased, "attention_bias=True is not supported"), (qwen3_biased, "attention_bias=True is not supported"),
                         (phi3, "model_type 'phi3' is not Llama-family")]:
        with pytest.raises(ThinkfastError) as e:
            load_teacher(path)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert "'qwen2'" in str(e.value) and "'qwen3'" in str(e.value)  # the message lists what is supported


@pytest.mark.parametrize("make,student_kind,stages", [(tiny_qwen2, "hybrid", "kd"), (tiny_qwen3, "llamba", "matrix,hidden,kd")])
def test_a_qwen_teacher_through_distill_save_load_sample_and_bench(make, student_kind, stages, tmp_path):
    """A Qwen2 / Qwen3 checkpoint folder as `--teacher` (a hybrid by KD; a Llamba by MOHAWK's three stages): the
    student keeps the biases or norms through save_pretrained and loading, and `thinkfast sample` and `thinkfast
    bench` (with an HF generate() row, in transformers' own Qwen class) run the teacher and the student."""
    tok = char_tokenizer()
    root = write_distill_files(tmp_path, tok, teachers=())
    make(vocab=len(tok), layers=2, heads=4, kv_heads=2).save_pretrained(root / "qwen")
    tok.save_pretrained(root / "qwen")
    out = tmp_path / student_kind
    n_stages = len(stages.split(","))
    assert main(["distill", "--teacher", str(root / "qwen"), "--student", student_kind, "--stages", stages,
                 "--tokens", ",".join(["256"] * n_stages), "--data", f"jsonl:{root}/chain.jsonl?solution=solution",
                 "--seq-len", "64", "--batch-size", "2", "--instruction", "none", "--no-progress", "--out", str(out)]) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log} == set(stages.split(",")) and all(r["loss"] == r["loss"] for r in log)  # no nan
    student = ThinkfastForCausalLM.from_pretrained(out)
    assert student.config.role == student_kind
    mamba = student.lm.layers[student.lm.cfg.mamba_layers[0]].mixer
    if make is tiny_qwen2:
        assert student.config.qkv_bias and mamba.in_proj.bias.abs().max() > 0
    else:
        assert student.config.qk_norm and (mamba.c_norm.weight - 1).abs().max() > 0.1  # q's norm, not a fresh one
    for model in (root / "qwen", out):
        samples = tmp_path / f"{model.name}.jsonl"
        assert main(["sample", "--model", str(model), "--data", f"jsonl:{root}/chain.jsonl?limit=2", "--n", "2",
                     "--max-new-tokens", "8", "--no-chat", "--out", str(samples), "--quiet"]) == 0
        rows = [json.loads(line) for line in samples.read_text().splitlines()]
        assert sum(1 for r in rows if "completion" in r) == 4
    results = tmp_path / "bench.json"
    assert main(["bench", "--model", str(root / "qwen"), "--model", str(out), "--no-isolate", "--configs", "2x4x3",
                 "--out", str(tmp_path / "bench.md"), "--json", str(results)]) == 0
    rows = json.loads(results.read_text())
    assert [(r["model"], r["engine"]) for r in rows] == [("qwen", "thinkfast"), ("qwen-hf", "hf"), (student_kind, "thinkfast")]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("make", [tiny_qwen2, tiny_qwen3])
@pytest.mark.parametrize("kind", ["teacher", "hybrid", "llamba"])
@torch.no_grad()
def test_cuda_graph_step_with_biases_and_norms_equals_model_step(make, kind):
    from thinkfast.engine.decode import CudaGraphStep, compile_ssm_update

    lm = from_teacher(make(), kind=kind, ssm_param="mamba2").lm.cuda()
    prompts = [torch.randint(0, 101, (n,)).tolist() for n in (5, 17, 9)]
    ref_state, fast_state = lm.allocate_state(3, 256), engine_state(lm, 3, 256)
    for r, ids in enumerate(prompts):
        one = lm.allocate_state(1, len(ids))
        lm(torch.tensor([ids], device="cuda"), state=one)
        for st in (ref_state, fast_state):
            st.copy_rows_(torch.tensor([r], device="cuda"), one, torch.tensor([0], device="cuda"), len(ids))
    graphs = CudaGraphStep(DecodeStep(lm, fast_state, compile_ssm_update()), 3, bucket=128)
    snapshot = [[t.clone() for t in vars(c).values()] for c in fast_state.caches]
    graphs.capture_all()  # capturing runs the step: put the state back
    for c, old in zip(fast_state.caches, snapshot):
        for t, o in zip(vars(c).values(), old):
            t.copy_(o)
    pos, tok = torch.tensor([len(p) for p in prompts], device="cuda"), torch.randint(0, 101, (3,), device="cuda")
    for _ in range(4):
        ref = lm.step(tok, pos, ref_state)
        torch.testing.assert_close(graphs(tok, pos, int(pos.max()) + 1), ref, rtol=1e-4, atol=1e-4)
        tok, pos = ref.argmax(-1), pos + 1
