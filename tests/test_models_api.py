"""The student's Hugging Face surface as HF users drive it: resizing the vocabulary, forward() kwargs, gradient
checkpointing, HF config names, the meta device, and the arguments of from_teacher and the loaders."""

import json
import warnings

import pytest
import torch
import torch.nn as nn
from conftest import tiny_llama
from transformers import AutoConfig, AutoModelForCausalLM

import thinkfast  # noqa: F401  (registers the Auto classes)
from thinkfast.engine.engine import Engine
from thinkfast.engine.sampling import SamplingParams
from thinkfast.errors import CheckpointError, ConfigError, ThinkfastError
from thinkfast.models import ModelConfig, ThinkfastConfig, ThinkfastForCausalLM, from_teacher
from thinkfast.models.teacher import load_teacher, load_thinkfast

ROLES = ["teacher", "llamba", "hybrid"]


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


# ---------------------------------------------------------------- resize_token_embeddings (B5)


@pytest.mark.parametrize("tie", [True, False])
def test_resized_vocabulary_reaches_head_configs_engine_and_checkpoint(tie, tmp_path):
    student = from_teacher(tiny_llama(tie=tie), kind="hybrid")
    old = torch.randint(3, 101, (2, 12))
    with torch.no_grad():
        before = student(old).logits
    student.resize_token_embeddings(130)

    assert student.config.vocab_size == student.model_config.vocab_size == 130
    assert {m.cfg.vocab_size for m in student.lm.modules() if hasattr(m, "cfg")} == {130}  # no stale config anywhere
    head = student.get_output_embeddings()
    if tie:  # one shared parameter: the input embedding is the head
        assert head is None and student.lm.head_weight is student.get_input_embeddings().weight
    else:
        assert head.weight.shape == (130, 64) and head.weight is not student.get_input_embeddings().weight
    new = torch.tensor([[5, 129, 7, 128]])
    with torch.no_grad():
        after = student(old).logits
        logits = student(new).logits
    assert after.shape[-1] == 130 and logits.shape == (1, 4, 130)
    assert torch.equal(after[..., :101], before)  # the old tokens' rows are kept as they were

    first = next(iter(Engine(student, None, stop_ids=[]).generate([("p", new[0].tolist())],
                                                                    params=SamplingParams(temperature=0, max_new_tokens=2))))
    assert first.tokens[0] == int(logits[0, -1].argmax())
    assert student.generate(new, max_new_tokens=2, do_sample=False).shape == (1, 6)

    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (loaded.get_output_embeddings() is None) == tie and loaded.model_config.vocab_size == 130
    with torch.no_grad():
        assert torch.equal(loaded(new).logits, logits)  # the trained head came back, not a re-initialised one


def test_a_new_head_on_a_tied_model_unties_it_and_is_checked(tmp_path):
    student = from_teacher(tiny_llama(tie=True), kind="llamba")
    with pytest.raises(ConfigError, match="resize both with resize_token_embeddings"):
        student.set_output_embeddings(nn.Linear(64, 90, bias=False))
    with pytest.raises(ConfigError, match=r"expected an nn.Linear\(64, vocab, bias=False\)"):
        student.set_output_embeddings(nn.Linear(64, 101, bias=True))
    head = nn.Linear(64, 101, bias=False)
    student.set_output_embeddings(head)
    assert student.get_output_embeddings() is head
    assert not student.config.tie_embeddings and not student.model_config.tie_embeddings
    ids = torch.randint(3, 101, (1, 9))
    with torch.no_grad():
        logits = student(ids).logits
        torch.testing.assert_close(logits, head(student.lm(ids).last_hidden), rtol=0, atol=0)
    student.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits, logits)


# ---------------------------------------------------------------- from_teacher's arguments (R4)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(kind="hybrid", attn_layers=[1, 1]), "lists layer(s) [1] more than once"),
    (dict(kind="hybrid", attn_layers=[]), "use kind='llamba'"),
    (dict(kind="hybrid", attn_layers=[0, 1, 2]), "use kind='teacher'"),
    (dict(kind="teacher", attn_layers=[1]), "kind='teacher' keeps attention in every layer; drop attn_layers"),
    (dict(kind="llamba", attn_layers=[1]), "use kind='hybrid'"),
    (dict(kind="hybrid", attn_layers=1), "give a list of layer indices, e.g. [1]"),
    (dict(kind="hybrid", attn_layers="1,2"), "give a list of layer indices"),
    (dict(kind="hybrid", seed="x"), "seed='x': give an integer"),
])
def test_from_teacher_refuses_arguments_it_would_ignore_or_misread(kwargs, needle):
    with pytest.raises(ConfigError) as e:
        from_teacher(tiny_llama(), **kwargs)
    assert needle in _one_line(e)


def test_a_one_layer_teacher_has_no_default_hybrid():
    """The default (attention in a quarter of the layers, at least one) kept a 1-layer teacher's only layer: a
    "hybrid" that was the teacher itself, built without a word."""
    with pytest.raises(ConfigError) as e:
        from_teacher(tiny_llama(layers=1), "hybrid")
    assert "this teacher has 1 layer; use kind='llamba'" in _one_line(e)
    assert from_teacher(tiny_llama(layers=2), "hybrid").config.role == "hybrid"


def test_from_teacher_says_what_a_teacher_can_be():
    teacher = from_teacher(tiny_llama(), kind="teacher")
    for bad, needle in [(None, "got None"), (teacher.state_dict(), "load it into its model first"),
                        (object(), "got object"), (teacher.lm, "pass the ThinkfastForCausalLM that holds it")]:
        with pytest.raises(ConfigError) as e:
            from_teacher(bad, kind="hybrid")
        assert needle in _one_line(e)
    assert from_teacher(teacher, kind="hybrid", attn_layers=(1,)).config.attn_layers == [1]  # a tuple is a list too


def test_a_teacher_without_weights_gives_a_student_without_weights():
    """accelerate's init_empty_weights flow: a meta teacher gives a meta student of the right shapes."""
    teacher = tiny_llama()
    with torch.device("meta"):
        empty = type(teacher)(teacher.config)
    for kind in ROLES:
        student = from_teacher(empty, kind=kind)
        assert {p.device.type for p in student.parameters()} == {"meta"}
        assert student(torch.zeros(2, 7, dtype=torch.long, device="meta")).logits.shape == (2, 7, 101)
    teacher.lm_head.to("meta")  # offloaded in part: nothing to copy some weights from
    with pytest.raises(ConfigError, match="on the meta device"):
        from_teacher(teacher, kind="hybrid")


# ---------------------------------------------------------------- loaders' dtype and device (R5)


def test_loaders_name_a_bad_dtype_or_device_not_the_checkpoint(tmp_path):
    hf_dir, tf_dir = tmp_path / "llama", tmp_path / "student"
    tiny_llama().save_pretrained(hf_dir)
    from_teacher(tiny_llama(), kind="hybrid").save_pretrained(tf_dir)
    cases = [(dict(dtype="bf17"), "dtype 'bf17': use one of auto"), (dict(dtype=torch.int8), "floating-point dtype"),
             (dict(dtype=3), "give a torch dtype"), (dict(device="gpu"), "device='gpu' is not a device"),
             (dict(device="mps"), "thinkfast runs on cpu or cuda")]
    if not torch.cuda.is_available():
        cases.append((dict(device="cuda"), "device='cuda': no CUDA device here; use device='cpu'"))
    for load, path in ((load_teacher, hf_dir), (load_thinkfast, tf_dir)):
        for kwargs, needle in cases:
            with pytest.raises(ConfigError) as e:  # not a CheckpointError saying "re-download"
                load(path, **kwargs)
            assert needle in _one_line(e) and not isinstance(e.value, CheckpointError)
        model, _ = load(path, dtype="bf16", device="meta")
        assert {(p.dtype, p.device.type) for p in model.parameters()} == {(torch.bfloat16, "meta")}


# ---------------------------------------------------------------- forward() kwargs (R6)


def test_hidden_states_are_hf_llamas():
    """Embeddings, then each layer's output, the last after the final norm: equal to the HF teacher's own."""
    teacher = tiny_llama()
    model = from_teacher(teacher, kind="teacher")
    ids = torch.randint(3, 101, (2, 20))
    with torch.no_grad():
        ours = model(ids, output_hidden_states=True).hidden_states
        ref = teacher(ids, output_hidden_states=True).hidden_states
    assert len(ours) == len(ref) == 4
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert model(ids).hidden_states is None


@pytest.mark.parametrize("kind", ROLES)
def test_forward_takes_hf_kwargs(kind):
    model = from_teacher(tiny_llama(), kind=kind)
    ids = torch.randint(3, 101, (2, 15))
    with torch.no_grad():
        out = model(ids, labels=ids, output_hidden_states=True)
        loss, logits, hidden = model(ids, labels=ids, output_hidden_states=True, return_dict=False)
        assert torch.equal(loss, out.loss) and torch.equal(logits, out.logits) and len(hidden) == 4
        embeds = model.get_input_embeddings()(ids)
        assert torch.equal(model(inputs_embeds=embeds).logits, out.logits)
        prefill = model(inputs_embeds=embeds[:, :-1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=prefill.past_key_values)  # continued from token ids
        torch.testing.assert_close(step.logits[:, -1], out.logits[:, -1], rtol=0, atol=1e-4)
        logits, cache = model(ids, use_cache=True, return_dict=False)  # the cache once, not under both names
        assert cache.seen == 15


@pytest.mark.parametrize("call,needle", [
    (lambda m, ids: m(ids, output_attentions=True), "no attention weights"),
    (lambda m, ids: m.generate(ids, max_new_tokens=2, output_attentions=True, return_dict_in_generate=True),
     "no attention weights"),
    (lambda m, ids: m(ids[0]), "input_ids has shape (6,); give a (batch, length) tensor"),
    (lambda m, ids: m.generate(ids[0], max_new_tokens=2), "input_ids has shape (6,)"),
    (lambda m, ids: m(torch.tensor([[5, 101]])), "token id 101 is outside the model's vocabulary of 101"),
    (lambda m, ids: m(torch.tensor([[-1, 5]])), "token id -1 is outside"),
    (lambda m, ids: m(ids, inputs_embeds=m.get_input_embeddings()(ids)), "exactly one of input_ids"),
    (lambda m, ids: m(inputs_embeds=torch.zeros(1, 3, 5)), "inputs_embeds has shape (1, 3, 5)"),
    (lambda m, ids: m.generate(inputs_embeds=m.get_input_embeddings()(ids), max_new_tokens=2), "not inputs_embeds"),
])
def test_forward_and_generate_refuse_in_one_line(call, needle):
    model = from_teacher(tiny_llama(), kind="hybrid")
    with pytest.raises(ValueError) as e:  # what HF code catches, and a ThinkfastError for the CLI
        with torch.no_grad():
            call(model, torch.randint(3, 101, (1, 6)))
    assert isinstance(e.value, ThinkfastError) and needle in _one_line(e)


@pytest.mark.parametrize("kind", ROLES)
def test_generate_returns_hidden_states_with_and_without_the_cache(kind):
    """With the cache, each new token's hidden states come from the model's own step (the fast one keeps none; this
    was refused): equal to those of the whole sequence's forward, which generate(use_cache=False) runs."""
    model = from_teacher(tiny_llama(), kind=kind)
    ids = torch.randint(3, 101, (2, 6))
    outs = [model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=cached, output_hidden_states=True,
                           return_dict_in_generate=True) for cached in (True, False)]
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert len(outs[0].hidden_states) == len(outs[1].hidden_states) == 3  # one tuple per generated token
    for step, (cached, whole) in enumerate(zip(outs[0].hidden_states, outs[1].hidden_states)):
        assert len(cached) == len(whole) == 4  # embeddings, three blocks (the last after the final norm)
        for a, b in zip(cached, whole):
            assert a.shape == ((2, 6, 64) if step == 0 else (2, 1, 64))
            torch.testing.assert_close(a, b[:, -a.shape[1]:], rtol=0, atol=1e-4)
    # and forward() on a cache with several new tokens gives each of theirs
    prefill = model(ids, use_cache=True)
    more = torch.randint(3, 101, (2, 4))
    with torch.no_grad():
        cached = model(more, past_key_values=prefill.past_key_values, output_hidden_states=True).hidden_states
        whole = model(torch.cat([ids, more], 1), output_hidden_states=True).hidden_states
    for a, b in zip(cached, whole):
        torch.testing.assert_close(a, b[:, -4:], rtol=0, atol=1e-4)


# ---------------------------------------------------------------- gradient checkpointing (R7)


@pytest.mark.parametrize("kind", ["hybrid", "llamba"])
def test_gradient_checkpointing_recomputes_blocks_and_keeps_gradients(kind):
    ids = torch.randint(3, 101, (2, 40))
    grads, runs = [], []
    for checkpointed in (False, True):
        model = from_teacher(tiny_llama(), kind=kind, seed=1).train()
        assert model.supports_gradient_checkpointing
        if checkpointed:
            with warnings.catch_warnings():  # transformers 5.x: the old name warns it is deprecated
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable()
        count = [0]
        model.lm.layers[1].mixer.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        runs.append(count[0])
    assert runs == [1, 2]  # checkpointed: the block runs again in the backward pass
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    with torch.no_grad():  # and it still generates
        assert model.eval().generate(ids[:1, :5], max_new_tokens=3, do_sample=False).shape == (1, 8)


def test_generate_after_gradient_checkpointing_keeps_the_cached_step():
    """transformers' gradient_checkpointing_enable() leaves a hook on the embedding for good; the step calls the
    embedding as a module, so that hook runs there and must not send generate() to re-run the whole sequence."""
    model = from_teacher(tiny_llama(), kind="llamba", seed=1)
    ids = torch.randint(3, 101, (1, 5))
    with torch.no_grad():
        before = model.generate(ids, max_new_tokens=6, do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()
        model.gradient_checkpointing_disable()
    assert model.lm.embed._forward_hooks  # transformers' input-grad hook is still there
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "re-runs the whole sequence" warning
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, before) and out.past_key_values.state is not None


@pytest.mark.parametrize("kind", ROLES)
def test_continuing_a_cache_with_other_rows_is_refused_in_one_line(kind):
    """A Llamba continued row 1 from row 0's state in silence (rows after beam search, or a subset of rows)."""
    model = from_teacher(tiny_llama(), kind=kind)
    ids = torch.randint(3, 101, (2, 6))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        with pytest.raises(ValueError) as e:
            model(ids[1:, -1:], past_key_values=cache)
    assert "the cache holds 2 rows" in _one_line(e) and "input_ids has 1" in str(e.value)


def test_logits_to_keep_takes_an_int_or_the_indices_to_keep():
    llama = tiny_llama()
    model = from_teacher(llama, kind="teacher")
    ids = torch.randint(3, 101, (1, 9))
    keep = torch.tensor([2, 7])
    with torch.no_grad():
        ours, theirs = model(ids, logits_to_keep=keep).logits, llama(ids, logits_to_keep=keep).logits
        assert ours.shape == theirs.shape == (1, 2, 101)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
        assert model(ids, logits_to_keep=3).logits.shape == (1, 3, 101)


def test_from_teacher_leaves_the_callers_random_stream_alone():
    llama = tiny_llama()
    draws = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        expected = torch.rand(3)
        torch.manual_seed(seed)
        student = from_teacher(llama, kind="llamba", seed=0)
        draws.append((torch.rand(3), expected, student.lm.layers[0].mixer.conv1d.weight.detach().clone()))
    for after, expected, _ in draws:
        assert torch.equal(after, expected)  # it was reset to the student's seed: every caller drew the same
    assert torch.equal(draws[0][2], draws[1][2])  # the student's own initialisation is still seeded


# ---------------------------------------------------------------- HF config names (R8)


def test_hf_config_names_read_and_write_thinkfast_fields(tmp_path):
    cfg = ThinkfastConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=96, tie_word_embeddings=False, vocab_size=50)
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_mlp, cfg.tie_embeddings) == (64, 3, 4, 2, 96, False)
    cfg.num_hidden_layers = 2
    assert cfg.n_layers == 2 and cfg.to_model_config().n_layers == 2
    assert (cfg.hidden_size, cfg.max_position_embeddings, cfg.tie_word_embeddings) == (64, 2048, False)

    model = ThinkfastForCausalLM(cfg)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                "tie_word_embeddings"} & set(saved)  # thinkfast's names only, each once
    assert AutoConfig.from_pretrained(tmp_path).to_model_config() == model.model_config

    # config.json from before the map held "tie_word_embeddings": false beside thinkfast's own key, which wins
    saved.update(tie_embeddings=True, tie_word_embeddings=False)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert AutoConfig.from_pretrained(tmp_path).tie_embeddings is True
    with pytest.raises(ConfigError, match="hidden_size=32 and d_model=64 name the same setting"):
        ThinkfastConfig(d_model=64, hidden_size=32)


def test_config_warns_about_a_near_miss_of_its_settings_and_nothing_else(tmp_path):
    with pytest.warns(UserWarning, match=r"n_layer=2 is not a thinkfast setting and changes nothing; did you mean n_layers\?"):
        cfg = ThinkfastConfig(n_layer=2)
    assert cfg.n_layers == 4  # stored as transformers stores any key, unread
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers' own keys, a saved config and a converted teacher: no warning
        ThinkfastConfig(use_cache=False, pad_token_id=0, num_labels=3, chunk_size_feed_forward=0, hidden_act="silu")
        from_teacher(tiny_llama(), kind="hybrid").save_pretrained(tmp_path)
        AutoConfig.from_pretrained(tmp_path)


def test_hf_rope_parameters_become_thinkfast_fields_and_match_the_teacher(tmp_path):
    """transformers 5's rope_parameters (and 4's rope_scaling) were stored unread: the model rotated by the default."""
    teacher = tiny_llama(rope_scaling=True)
    own = from_teacher(teacher, kind="teacher")
    fields = {name: value for name, value in own.model_config.to_dict().items() if not name.startswith("rope_")}
    rope = teacher.config.rope_parameters
    for given in ({"rope_parameters": dict(rope)},
                  {"rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"}, "rope_theta": rope["rope_theta"]}):
        cfg = ThinkfastConfig(**fields, **given)
        assert cfg.to_model_config() == own.model_config
        model = ThinkfastForCausalLM(cfg)
        model.load_state_dict(own.state_dict())
        ids = torch.randint(0, 101, (1, 150))  # past original_max_position_embeddings=64: the scaling shows
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, teacher(ids).logits, rtol=0, atol=1e-4)
    assert ThinkfastConfig(rope_parameters={"rope_type": "default", "rope_theta": 5e5}).to_model_config().rope_params is None
    with pytest.raises(ConfigError, match="rope_theta=5.0 and rope_theta=6.0 is given too"):
        ThinkfastConfig(rope_parameters={"rope_type": "default", "rope_theta": 5.0}, rope_theta=6.0)
    with pytest.raises(ConfigError, match="give only rope_params"):
        ThinkfastConfig(rope_parameters=dict(rope), rope_params={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ConfigError, match="^model config: rope_parameters: partial_rotary_factor=0.5"):
        ThinkfastConfig(rope_parameters={"rope_type": "default", "rope_theta": 5e5, "partial_rotary_factor": 0.5})


@pytest.mark.parametrize("rope,message", [
    ({"rope_type": "dynamic", "factor": 4.0}, "rope_type 'dynamic' is not supported; thinkfast computes 'default', "
     "'linear', 'llama3', 'yarn' rotations"),
    ({"rope_type": "yarn", "factor": 4.0}, "rope_type 'yarn' needs numbers for original_max_position_embeddings"),
    ({"rope_type": "default", "partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5: thinkfast rotates every"),
    ({"rope_type": "llama3", "factor": 8.0}, "rope_type 'llama3' needs numbers for low_freq_factor, high_freq_factor"),
    ({"rope_type": "linear", "factor": "2"}, "rope_type 'linear' needs numbers for factor"),
])
def test_rotations_thinkfast_cannot_compute_are_refused_when_configured(rope, message):
    """Before, such a config built a model whose first forward raised a KeyError or ValueError."""
    with pytest.raises(ConfigError, match=f"^model config: {message}"):
        ModelConfig(rope_params=rope)
    teacher = tiny_llama(rope_scaling=False)
    teacher.config.rope_parameters = dict(rope, rope_theta=10000.0)
    with pytest.raises(ConfigError, match=f"^teacher: {message}"):
        from_teacher(teacher, kind="llamba")


# ---------------------------------------------------------------- meta device (R9)


@pytest.mark.parametrize("kind", ROLES)
def test_every_role_runs_on_the_meta_device(kind):
    """Shape inference and accelerate's empty-weight flows: no autocast guard may fail on meta."""
    model = from_teacher(tiny_llama(), kind=kind).to("meta")
    ids = torch.zeros(2, 150, dtype=torch.long, device="meta")  # more than one chunk of the scan
    mask = torch.ones(2, 150, dtype=torch.long, device="meta")
    out = model(ids, attention_mask=mask, labels=ids)
    assert out.logits.shape == (2, 150, 101) and out.logits.device.type == "meta" and out.loss.shape == ()


# ---------------------------------------------------------------- transformers' Trainer


def test_the_loss_divides_by_the_label_count_it_is_given():
    """What Trainer's gradient accumulation relies on (`num_items_in_batch`): a sum over this micro-batch's labels
    divided by the whole step's count, as transformers' Llama computes it."""
    llama = tiny_llama(layers=2)
    model = from_teacher(tiny_llama(layers=2), kind="teacher")
    ids = torch.randint(3, 101, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :5] = -100
    count = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        mean = model(ids, labels=labels).loss
        for items in (count, torch.tensor(3 * count)):
            ours = model(ids, labels=labels, num_items_in_batch=items).loss
            theirs = llama(ids, labels=labels, num_items_in_batch=items).loss
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ours, mean * count / items, rtol=1e-5, atol=1e-6)


def test_trainer_gradient_accumulation_matches_the_teacher_it_copies(tmp_path):
    """Trainer passes `num_items_in_batch` to a forward that takes **kwargs and then leaves the division to the
    model: the loss and gradients must not grow with the accumulation steps (as transformers' Llama's do not)."""
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Rows(Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.ids = torch.randint(3, 101, (8, 16), generator=g)
            self.labels = self.ids.clone()
            self.labels[::2, :5] = -100  # rows with fewer labels: a plain mean of micro-batch means would differ

        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.labels[i]}

    def first_step(model, accumulation):
        args = TrainingArguments(output_dir=str(tmp_path / f"run{accumulation}"), per_device_train_batch_size=8 // accumulation,
                                 gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.0, logging_steps=1,
                                 report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, max_grad_norm=1e9)
        trainer = Trainer(model=model, args=args, train_dataset=Rows())
        trainer.train()
        log = trainer.state.log_history[0]
        return log["loss"], float(log["grad_norm"])

    try:
        reference = first_step(tiny_llama(layers=2), 1)
    except TypeError as e:  # transformers 5.0's Trainer with accelerate 1.2 (our floor): unwrap_model(keep_torch_compile)
        pytest.skip(f"transformers' Trainer does not run with the installed accelerate ({e})")
    for accumulation in (1, 4):
        loss, grad_norm = first_step(from_teacher(tiny_llama(layers=2), kind="teacher"), accumulation)
        assert loss == pytest.approx(reference[0], rel=1e-4) and grad_norm == pytest.approx(reference[1], rel=1e-3)
