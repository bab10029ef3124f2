"""transformers' `generate()` on thinkfast models keeps a decode state between steps (`ThinkfastCache`), stepped by
the engine's fused `DecodeStep` (installed by `import thinkfast`) or the model's own `step` (`ModelStep`)."""

import pytest
import torch

from conftest import tiny_llama
from thinkfast.engine.decode import DecodeStep
from thinkfast.models import from_teacher
from thinkfast.models.hf import ModelStep, ThinkfastCache, ThinkfastForCausalLM

ROLES = ("teacher", "llamba", "hybrid")
GREEDY = dict(do_sample=False, pad_token_id=0, eos_token_id=None)


@pytest.fixture(params=[DecodeStep, ModelStep], ids=["engine-step", "model-step"])
def step_kind(request, monkeypatch):
    monkeypatch.setattr(ThinkfastForCausalLM, "generation_step", request.param)
    return request.param


def test_import_thinkfast_installs_the_engine_step():
    assert ThinkfastForCausalLM.generation_step is DecodeStep


@pytest.fixture(scope="module")
def models():
    teacher = tiny_llama(layers=4)
    return {kind: from_teacher(teacher, kind=kind).eval() for kind in ROLES}


def _left_padded(seed=0):
    """Three prompts of 7, 10 and 12 tokens, left-padded with 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 101, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, :2] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("kind", ROLES)
def test_cached_generate_equals_recomputing_and_unpadded(models, kind, step_kind):
    model = models[kind]
    ids, mask = _left_padded()
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, max_new_tokens=24, **GREEDY)
        recomputed = model.generate(ids, attention_mask=mask, max_new_tokens=24, use_cache=False, **GREEDY)
        alone = model.generate(ids[:1, 5:], max_new_tokens=24, **GREEDY)
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached[0, 5:], alone[0])  # pads change nothing


@pytest.mark.parametrize("kind", ROLES)
def test_beam_search_reorders_the_state(models, kind, step_kind):
    model = models[kind]
    ids, mask = _left_padded(seed=1)
    kw = dict(attention_mask=mask, max_new_tokens=10, num_beams=3, **GREEDY)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))


def test_one_prefill_then_one_step_per_token(models, monkeypatch):
    model = models["hybrid"]
    calls = []
    forward = model.lm.forward

    def spy_forward(ids, *a, **k):
        calls.append(("forward", tuple(ids.shape)))
        return forward(ids, *a, **k)

    class SpyStep(DecodeStep):
        def __call__(self, tokens, positions, kv_len):
            calls.append(("step", tuple(tokens.shape)))
            return super().__call__(tokens, positions, kv_len)

    monkeypatch.setattr(ThinkfastForCausalLM, "generation_step", SpyStep)
    model.lm.forward = spy_forward
    try:
        with torch.no_grad():
            model.generate(torch.randint(3, 101, (2, 9)), max_new_tokens=6, num_return_sequences=2, do_sample=True,
                           pad_token_id=0, eos_token_id=None)
    finally:
        del model.lm.forward
    assert calls == [("forward", (4, 9))] + [("step", (4,))] * 5


def test_kv_cache_grows_past_its_first_size(models, monkeypatch, step_kind):
    model = models["hybrid"]
    monkeypatch.setattr(ThinkfastForCausalLM, "GENERATION_MIN_CAPACITY", 4)  # 12-token prompts start at 24 slots
    ids, mask = _left_padded(seed=2)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        assert out.cache.capacity == 24
        grown = model.generate(ids, attention_mask=mask, max_new_tokens=60, **GREEDY)
        monkeypatch.setattr(ThinkfastForCausalLM, "GENERATION_MIN_CAPACITY", 256)
        assert torch.equal(grown, model.generate(ids, attention_mask=mask, max_new_tokens=60, **GREEDY))


@pytest.mark.parametrize("kind", ROLES)
def test_forward_with_cache_continues_the_sequence(models, kind, step_kind):
    """Prefill then several new tokens at once: the logits of a forward over the whole sequence (1e-5)."""
    model = models[kind]
    ids = torch.randint(3, 101, (2, 15))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :9], use_cache=True)
        assert isinstance(first.cache, ThinkfastCache) and first.cache is first.past_key_values
        rest = model(ids[:, 9:], cache=first.cache)
        assert rest.cache.get_seq_length() == 15
    torch.testing.assert_close(first.logits, full[:, :9], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rest.logits, full[:, 9:], rtol=1e-4, atol=1e-5)


def test_llamba_state_does_not_grow(models):
    model = models["llamba"]
    with torch.no_grad():
        cache = model(torch.randint(3, 101, (2, 300)), use_cache=True).cache
        before = cache.state.nbytes()
        for _ in range(3):
            cache = model(torch.randint(3, 101, (2, 200)), cache=cache).cache
    assert cache.state.nbytes() == before and cache.get_seq_length() == 900


def test_right_padding_with_a_cache_is_refused_in_one_line(models):
    ids, mask = _left_padded()
    right = mask.flip(1)
    with pytest.raises(ValueError) as e, torch.no_grad():
        models["hybrid"].generate(ids, attention_mask=right, max_new_tokens=4, **GREEDY)
    assert "left" in str(e.value) and "\n" not in str(e.value)
    with torch.no_grad():  # without a cache (scoring, training) any mask still works
        assert models["hybrid"](ids, attention_mask=right).logits.shape == (3, 12, 101)


def test_training_forward_allocates_no_state(models):
    ids = torch.randint(3, 101, (2, 10))
    out = models["hybrid"](ids, labels=ids, use_cache=True)
    assert out.cache is None and out.loss is not None and torch.isfinite(out.loss)


def test_a_returned_cache_continues_the_conversation(models):
    """generate() again from its own returned state (a second turn): the same tokens as recomputing everything."""
    model = models["hybrid"]
    ids = torch.randint(3, 101, (2, 9))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, return_dict_in_generate=True, **GREEDY)
        key = "cache" if getattr(out, "cache", None) is not None else "past_key_values"  # renamed within 5.x
        state = getattr(out, key)
        assert isinstance(state, ThinkfastCache) and state.get_seq_length() == 14  # the last token is not fed yet
        turn = torch.cat([out.sequences, torch.randint(3, 101, (2, 4))], 1)
        continued = model.generate(turn, max_new_tokens=5, **{key: state}, **GREEDY)
        assert torch.equal(continued, model.generate(turn, max_new_tokens=5, use_cache=False, **GREEDY))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ROLES)
def test_cached_decoding_on_a_gpu_in_bf16(kind):
    """The engine's step on a GPU in bf16 continues a prefill as a forward over the whole sequence does (within bf16
    rounding, as the engine's own bf16 tests), and generate() runs there with a left-padded batch."""
    model = from_teacher(tiny_llama(layers=4), kind=kind).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(3, 101, (2, 15), device="cuda")
    with torch.no_grad():
        full = model(ids).logits.float()
        first = model(ids[:, :9], use_cache=True)
        rest = model(ids[:, 9:], cache=first.cache).logits.float()
        padded, mask = (t.cuda() for t in _left_padded())
        out = model.generate(padded, attention_mask=mask, max_new_tokens=12, **GREEDY)
    torch.testing.assert_close(rest, full[:, 9:], rtol=0.05, atol=0.1)
    assert out.shape == (3, 24) and out.device.type == "cuda"


class LowRankAdapter(torch.nn.Module):
    """A LoRA-shaped wrapper: the base layer plus a low-rank update, as PEFT inserts around a Linear."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.base_layer = base
        self.down = torch.nn.Linear(base.in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.normal_(self.up.weight, std=0.5)

    @property
    def weight(self):  # as PEFT's layers expose the base weight, without the update
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def forward(self, x):
        return self.base_layer(x) + self.up(self.down(x))


@pytest.mark.parametrize("kind", ["hybrid", "llamba"])
def test_adapters_are_decoded_through_the_modules(kind):
    """A step that reads weights directly would skip an adapter: generate() then steps through the modules."""
    model = from_teacher(tiny_llama(layers=4), kind=kind).eval()
    ids, mask = _left_padded(seed=3)
    with torch.no_grad():
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=16, **GREEDY)
        for layer in model.lm.layers:
            mixer = layer.mixer
            if layer.is_attention:
                mixer.q_proj = LowRankAdapter(mixer.q_proj)
            else:
                mixer.in_proj = LowRankAdapter(mixer.in_proj)
        adapted = model.generate(ids, attention_mask=mask, max_new_tokens=16, **GREEDY)
        recomputed = model.generate(ids, attention_mask=mask, max_new_tokens=16, use_cache=False, **GREEDY)
    assert not torch.equal(adapted, plain)  # the adapters matter
    assert torch.equal(adapted, recomputed)


def test_padding_in_the_tokens_after_a_cache_is_refused(models):
    model = models["llamba"]
    ids = torch.randint(3, 101, (2, 9))
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
        more = torch.randint(3, 101, (2, 3))
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, -1] = 0  # the second row's new text is one token shorter
        with pytest.raises(ValueError) as e:
            model(more, attention_mask=mask, cache=cache)
        assert "padded" in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(ValueError):
            model(more[:, :0], cache=cache)


@pytest.mark.parametrize("kind", ["hybrid", "llamba"])
def test_a_forward_hook_is_run_by_cached_generate(kind):
    """The recurrent step calls blocks' `step`, not their forward: a hooked model re-runs its forward instead."""
    model = from_teacher(tiny_llama(layers=4), kind=kind).eval()
    ids, mask = _left_padded(seed=4)
    kw = dict(attention_mask=mask, max_new_tokens=12, **GREEDY)
    with torch.no_grad():
        plain = model.generate(ids, **kw)
        model.lm.layers[2].register_forward_hook(lambda module, args, out: out * 0.5)
        with pytest.warns(UserWarning, match="hooks"):
            hooked = model.generate(ids, **kw)
        recomputed = model.generate(ids, use_cache=False, **kw)
        beams = model.generate(ids, num_beams=3, **kw)
        beams_recomputed = model.generate(ids, num_beams=3, use_cache=False, **kw)
    assert not torch.equal(hooked, plain)  # the hook matters
    assert torch.equal(hooked, recomputed)
    assert torch.equal(beams, beams_recomputed)


def test_an_offloaded_model_generates_with_its_cache(tmp_path):
    """accelerate's disk offload loads a layer's weights in its forward's hook; cached generate() must run it."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    model = from_teacher(tiny_llama(layers=4), kind="hybrid", attn_layers=[1]).eval()
    model.save_pretrained(tmp_path / "m")
    device_map = {"lm.embed": "cpu", "lm.rotary": "cpu", "lm.layers.0": "cpu", "lm.layers.1": "disk",
                  "lm.layers.2": "disk", "lm.layers.3": "cpu", "lm.norm": "cpu", "lm.lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map=device_map,
                                                     offload_folder=tmp_path / "offload")
    assert offloaded.lm.layers[1].mixer.q_proj.weight.device.type == "meta"  # really offloaded
    ids, mask = _left_padded(seed=5)
    kw = dict(attention_mask=mask, max_new_tokens=10, **GREEDY)
    with torch.no_grad(), pytest.warns(UserWarning, match="hooks"):
        out = offloaded.generate(ids, output_hidden_states=True, return_dict_in_generate=True, **kw)
    with torch.no_grad():
        expected = model.generate(ids, output_hidden_states=True, return_dict_in_generate=True, **kw)
    assert torch.equal(out.sequences, expected.sequences)
    for got, want in zip(out.hidden_states[-1], expected.hidden_states[-1]):  # the last step's, every layer
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_position_ids_with_a_cache_are_checked_not_dropped(models):
    model = models["teacher"]
    ids, mask = _left_padded(seed=6)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=model.lm.positions_for(ids, mask), use_cache=True)
        more = torch.randint(3, 101, (3, 2))
        full = torch.cat([mask, torch.ones(3, 2, dtype=torch.long)], 1)
        after = out.cache.lengths[:, None] + torch.arange(2)
        model(more, attention_mask=full, position_ids=after, cache=out.cache)  # the cache's own numbering: fine
        shifted = model.lm.positions_for(ids, mask) + 3
        for call in (lambda: model(ids, attention_mask=mask, position_ids=shifted, use_cache=True),
                     lambda: model(more, attention_mask=torch.cat([full, torch.ones(3, 2, dtype=torch.long)], 1),
                                   position_ids=after, cache=out.cache)):  # the cache has moved on by 2 since
            with pytest.raises(ValueError) as e:
                call()
            assert "position_ids" in str(e.value) and "\n" not in str(e.value)
        # without a cache, any positions go, as transformers' models take them
        assert model(ids, attention_mask=mask, position_ids=shifted).logits.shape == (3, 12, model.config.vocab_size)
