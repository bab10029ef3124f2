"""Hugging Face wrappers: `ThinkfastConfig` / `ThinkfastForCausalLM`, registered with the Auto classes.

`save_pretrained` writes config.json + model.safetensors; `AutoModelForCausalLM.from_pretrained(dir)` loads it.
`generate()` keeps each layer's decode state between steps (`ThinkfastCache`: KV caches for attention layers, conv +
SSM states for Mamba layers), so a student's step costs the same at any length. Its step is the model's own
(`ModelStep`) until `import thinkfast` installs the engine's fused one (`thinkfast.engine.decode.DecodeStep`, which
this package cannot import); `thinkfast sample` stays faster (static slots, refill, compiled or graph steps).
`generate(use_cache=False)` re-runs the prefix.
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from ..errors import ConfigError, ThinkfastError
from .config import ModelConfig, rope_problem, split_rope_parameters
from .mixers import MLP, Attention, KVCache, Mamba1Mixer, Mamba2Mixer, RMSNorm, Rotary
from .model import Block, ModelState, ThinkfastLM

MODEL_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]

# transformers' standard names for thinkfast's own fields: tools that read `config.hidden_size` or
# `config.num_hidden_layers` get them, and config.json keeps thinkfast's names only
HF_NAMES = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
            "num_key_value_heads": "n_kv_heads", "intermediate_size": "d_mlp", "tie_word_embeddings": "tie_embeddings"}


class ModelInputError(ThinkfastError, ValueError):
    """A bad argument to the model's forward() or generate(): a ValueError, as transformers' models raise, and a
    ThinkfastError, so the CLI shows it as one line."""


def _own_names(kwargs: dict) -> dict:
    """Config kwargs with transformers' names (hidden_size=...) turned into thinkfast's (d_model=...)."""
    for hf_name, own in HF_NAMES.items():
        if hf_name not in kwargs:
            continue
        value = kwargs.pop(hf_name)
        if own not in kwargs:
            kwargs[own] = value
        # thinkfast before HF_NAMES wrote `"tie_word_embeddings": false` beside its own `tie_embeddings`: that one wins
        elif kwargs[own] != value and hf_name != "tie_word_embeddings":
            raise ConfigError(f"model config: {hf_name}={value!r} and {own}={kwargs[own]!r} name the same setting "
                              f"with different values; give only {own}")
    # transformers' rotary settings: 5.x's rope_parameters (rope_theta inside), 4.x's rope_scaling
    for hf_name in ("rope_parameters", "rope_scaling"):
        value = kwargs.pop(hf_name, None)
        if value is None:
            continue
        if "rope_params" in kwargs:
            raise ConfigError(f"model config: {hf_name} and rope_params name the same setting; give only rope_params")
        problem = rope_problem(value)
        if problem:
            raise ConfigError(f"model config: {hf_name}: {problem}")
        theta, kwargs["rope_params"] = split_rope_parameters(value, kwargs.get("rope_theta", 10000.0))
        if kwargs.setdefault("rope_theta", theta) != theta:
            raise ConfigError(f"model config: {hf_name} has rope_theta={theta!r} and rope_theta={kwargs['rope_theta']!r} "
                              "is given too; give it once")
    return kwargs


def _warn_near_misses(kwargs: dict) -> None:
    """A config takes any key, as transformers' do, so `n_layer=2` would build the default 4 layers in silence:
    a key that is nearly one of thinkfast's settings (none of transformers' standard keys is) gets a warning."""
    names = [*MODEL_FIELDS, *HF_NAMES, "rope_parameters", "rope_scaling"]
    for key in kwargs:
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.8)
        if close and key not in names:
            warnings.warn(f"ThinkfastConfig: {key}={kwargs[key]!r} is not a thinkfast setting and changes nothing; "
                          f"did you mean {close[0]}?", stacklevel=3)


class ThinkfastConfig(PretrainedConfig):
    model_type = "thinkfast"
    attribute_map = HF_NAMES  # read and written through; tying is ThinkfastLM's own (one shared parameter)
    keys_to_ignore_at_inference = ["past_key_values", "cache"]  # a Trainer's evaluation collects logits, not states

    def __init__(self, **kwargs):
        kwargs = _own_names(kwargs)
        _warn_near_misses(kwargs)
        defaults = ModelConfig()
        values = {name: kwargs.pop(name, getattr(defaults, name)) for name in MODEL_FIELDS}
        super().__init__(**kwargs)
        # set after: some transformers versions set tie_word_embeddings (tie_embeddings, through the map) in __init__
        for name, value in values.items():
            setattr(self, name, value)

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs) -> "ThinkfastConfig":
        return cls(**cfg.to_dict(), **kwargs)

    def to_model_config(self) -> ModelConfig:
        return ModelConfig.from_dict({name: getattr(self, name) for name in MODEL_FIELDS})

    @property
    def role(self) -> str:
        """teacher (all attention) | llamba (no attention) | hybrid."""
        n_attn = len(self.attn_layers)
        return "teacher" if n_attn == self.n_layers else "llamba" if n_attn == 0 else "hybrid"


class ModelStep:
    """A decode step over a `ModelState`: `step(tokens (B,), positions (B,), kv_len) -> logits (B, V)`.
    This one is `ThinkfastLM.step`, which calls the model's modules; the engine's `DecodeStep` has the same
    interface, faster, but reads their weights directly (`reads_weights = True`)."""

    reads_weights = False

    @staticmethod
    def allocate(lm: ThinkfastLM, batch: int, max_len: int) -> ModelState:
        return lm.allocate_state(batch, max_len)

    def __init__(self, lm: ThinkfastLM, state: ModelState):
        self.lm, self.state = lm, state

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        return self.lm.step(tokens, positions, self.state, kv_len)


# the modules a thinkfast model is built of: a step that reads their weights directly computes what they would
PLAIN_MODULES = (ThinkfastLM, Block, Attention, Mamba1Mixer, Mamba2Mixer, MLP, RMSNorm, Rotary, nn.Embedding, nn.Linear, nn.Conv1d,
                 nn.ModuleList)


def _has_hook(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook"))


def plain_modules(model: nn.Module) -> bool:
    """No adapter (PEFT's LoRA), quantised or parametrised layer, and no hook (accelerate's offloading) anywhere."""
    return all(type(m) in PLAIN_MODULES and not _has_hook(m) for m in model.modules())


def _kept_positions(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """transformers' `logits_to_keep`: an int keeps the last N positions (0: all); a 1-D tensor, those indices."""
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() > 0:
        return hidden[:, logits_to_keep.to(hidden.device)]
    keep = int(logits_to_keep)
    return hidden[:, -keep:] if keep else hidden


def hooked(model: nn.Module) -> bool:
    """A hook anywhere: accelerate's offloading or device placement, or a user's forward hook. A recurrent step
    calls the blocks' and mixers' `step`, not their forward, and reads some weights directly, so it would skip them.
    The embedding's own hooks do not count: the model's step calls it as a module, so they run (transformers'
    `gradient_checkpointing_enable()` leaves one there for good)."""
    embed = getattr(model, "embed", None)
    return any(_has_hook(m) for m in model.modules() if m is not embed)


class ThinkfastCache:
    """`generate()`'s decode state: every layer's cache (`ModelState`) and each row's length.

    Rows keep their real tokens from slot 0 (a left-padded prompt's pads are dropped at prefill), so a row's length is
    both its next token's position and its KV slot, as in the engine. The KV caches grow by doubling; Mamba layers'
    states never grow. A model with hooks keeps no state (`state` None): it keeps the columns seen so far
    (`prefix`: ids and attention mask) and re-runs them through its forward, where the hooks run. Duck-typed for transformers 5.x's generation loop (`get_seq_length`, `reorder_cache` for
    beam search, `is_compileable`), which has renamed its cache classes and arguments across minor versions.
    """

    is_compileable = False  # generate() asks before compiling the forward; the engine has its own compiled step

    def __init__(self, state: ModelState | None, lengths: torch.Tensor, seen: int, make_step=None,
                 prefix: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.state = state
        self.lengths = lengths  # (B,) long
        self.seen = seen  # input columns consumed, pads included: generate() feeds the ones after these
        self.make_step = make_step  # state -> step; rebuilt when the KV caches grow
        self.step = None if state is None else make_step(state)
        self.prefix = prefix  # (ids, mask) (B, seen) when state is None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    @property
    def capacity(self) -> int:
        return self.seen if self.state is None else self.state.max_len

    def reorder_cache(self, beam_idx: torch.Tensor):
        """Rows take the rows `beam_idx` names (beam search keeps the beams it extends)."""
        beam_idx = beam_idx.to(self.lengths.device)
        self.lengths = self.lengths.index_select(0, beam_idx)
        if self.state is None:
            self.prefix = tuple(t.index_select(0, beam_idx.to(t.device)) for t in self.prefix)
            return
        for c in self.state.caches:
            for t in (c.k, c.v) if isinstance(c, KVCache) else (c.conv, c.ssm):
                t.copy_(t.index_select(0, beam_idx))  # in place: the step may rely on the state's memory layout

    def reserve(self, needed: int):
        """Room for `needed` KV slots per row: attention layers' caches double until it fits."""
        if self.state is None or needed <= self.capacity:
            return
        capacity = self.capacity
        while capacity < needed:
            capacity *= 2
        for c in self.state.caches:
            if isinstance(c, KVCache):
                for name in ("k", "v"):
                    old = getattr(c, name)
                    grown = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
                    grown[:, :, : old.shape[2]] = old
                    setattr(c, name, grown)
        self.state.max_len = capacity
        self.step = self.make_step(self.state)


@dataclasses.dataclass
class ThinkfastCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    # the same state under both names: transformers' generate() reads `past_key_values` before 5.24, `cache` since
    past_key_values: ThinkfastCache | None = None
    cache: ThinkfastCache | None = None
    # with output_hidden_states: the embeddings, then each block's output, the last one after the final norm (as
    # transformers' Llama gives them)
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: None = None  # never any: see ThinkfastForCausalLM.forward's output_attentions


def _check_2d(ids: torch.Tensor, name: str) -> None:
    if ids.dim() != 2:
        raise ModelInputError(f"thinkfast: {name} has shape {tuple(ids.shape)}; give a (batch, length) tensor "
                              f"({name}[None] for one sequence)")


def _compiling() -> bool:
    """Inside torch.compile's tracing: no reading tensors back to check them."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and getattr(compiler, "is_compiling", lambda: False)())


def _describe(value) -> str:
    if isinstance(value, nn.Embedding):
        return f"nn.Embedding({value.num_embeddings}, {value.embedding_dim})"
    if isinstance(value, nn.Linear):
        return f"nn.Linear({value.in_features}, {value.out_features}, bias={value.bias is not None})"
    return type(value).__name__


def _left_padding_only(attention_mask: torch.Tensor) -> bool:
    m = attention_mask.long()
    return bool((m[:, 1:] >= m[:, :-1]).all()) and bool(m[:, -1].all())


class ThinkfastForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = ThinkfastConfig
    base_model_prefix = "lm"
    _no_split_modules = ["Block"]
    main_input_name = "input_ids"
    _is_stateful = True  # its state cannot be cropped: transformers then refuses assisted decoding
    supports_gradient_checkpointing = True  # per block: `Block` is transformers' GradientCheckpointingLayer
    generation_step = ModelStep  # generate()'s step (allocate + call); `import thinkfast` installs the engine's
    GENERATION_MIN_CAPACITY = 256  # KV slots a generation cache starts with (at least twice the prompt)

    def __init__(self, config: ThinkfastConfig):
        super().__init__(config)
        self.lm = ThinkfastLM(config.to_model_config())
        self.post_init()

    @property
    def model_config(self) -> ModelConfig:
        return self.lm.cfg

    def _init_weights(self, module):
        """transformers' per-module init, run after loading on modules it did not wholly load: a module's own
        parameters that were loaded keep their values (the SSM parameters' init is a plain copy_, which transformers'
        init guards would not stop), missing ones get `ThinkfastLM.init_weights`'s scheme."""
        own = list(module.parameters(recurse=False))
        kept = [(p, p.detach().clone()) for p in own if getattr(p, "_is_hf_initialized", False)]
        if len(kept) == len(own):
            return
        std = self.config.initializer_range
        with torch.no_grad():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, nn.Conv1d):
                module.reset_parameters()
            elif isinstance(module, (Mamba1Mixer, Mamba2Mixer)):
                if isinstance(module, Mamba1Mixer) and getattr(module.dt_proj.bias, "_is_hf_initialized", False):
                    kept.append((module.dt_proj.bias, module.dt_proj.bias.detach().clone()))  # set by the reset too
                module.reset_ssm_parameters()
            for p, value in kept:
                p.copy_(value)

    def init_weights(self):
        self.lm.init_weights(self.config.initializer_range)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.lm.embed

    def set_input_embeddings(self, value: nn.Embedding):
        """A tied head is this embedding's weight, so it follows; both configs take its vocabulary size
        (`resize_token_embeddings` sets the input embeddings, then the untied head)."""
        weight = getattr(value, "weight", None)  # an adapter's wrapper (PEFT) has its embedding's weight too
        if not (isinstance(value, nn.Module) and isinstance(weight, torch.Tensor) and weight.dim() == 2
                and weight.shape[1] == self.lm.cfg.d_model):
            raise ConfigError(f"input embeddings: expected an nn.Embedding of width {self.lm.cfg.d_model} (d_model), "
                              f"got {_describe(value)}")
        self.lm.embed = value
        self._sync_vocab_size()

    def get_output_embeddings(self) -> nn.Linear | None:
        """The head; None when it is tied (`tie_embeddings`): then the input embedding's weight is the head, one
        shared parameter, and resizing or replacing the input embeddings changes both."""
        return self.lm.lm_head

    def set_output_embeddings(self, value: nn.Linear):
        """A new head, as many rows as the input embeddings (resize those first); on a tied model it unties the
        head (both configs say so, and save/load keeps it), unless it is the input embedding's own weight."""
        d, vocab = self.lm.cfg.d_model, self.lm.embed.weight.shape[0]
        if not isinstance(value, nn.Linear) or value.bias is not None or value.in_features != d:
            raise ConfigError(f"output embeddings: expected an nn.Linear({d}, vocab, bias=False), got {_describe(value)}")
        if value.out_features != vocab:
            raise ConfigError(f"output embeddings: {value.out_features} rows, but the input embeddings have {vocab}; "
                              "resize both with resize_token_embeddings()")
        if self.lm.lm_head is None:
            if value.weight is self.lm.embed.weight:
                return  # already the head
            self.lm.update_config(tie_embeddings=False)
            self.config.tie_embeddings = False
        self.lm.lm_head = value

    def _sync_vocab_size(self):
        vocab = self.lm.embed.weight.shape[0]
        if self.lm.cfg.vocab_size != vocab:
            self.lm.update_config(vocab_size=vocab)  # the engine and the cache read it
        self.config.vocab_size = vocab

    def generate(self, inputs=None, *args, **kwargs):
        """transformers' generate(), after the checks that would otherwise fail inside it with an IndexError."""
        if kwargs.get("inputs_embeds") is not None:
            raise ModelInputError("thinkfast: generate() takes input_ids, not inputs_embeds (its cache counts token "
                                  "columns); pass the prompt's token ids")
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor):
            _check_2d(ids, "input_ids")
        return super().generate(inputs, *args, **kwargs)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # it brings its own cache (`ThinkfastCache`), made at prefill

    def prepare_inputs_for_generation(
        self, input_ids, attention_mask=None, use_cache=None, cache=None, past_key_values=None, **kwargs
    ):
        state = cache if isinstance(cache, ThinkfastCache) else past_key_values
        if isinstance(state, ThinkfastCache):
            input_ids = input_ids[:, state.seen :]
        else:
            state = None
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache, "cache": state}
        # generate(output_attentions=True / output_hidden_states=True) reaches forward(), which answers for them
        inputs.update({k: kwargs[k] for k in ("output_attentions", "output_hidden_states") if kwargs.get(k)})
        return inputs

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        labels=None,
        position_ids=None,
        use_cache=None,
        cache=None,
        past_key_values=None,
        logits_to_keep: int = 0,
        inputs_embeds=None,
        output_hidden_states=None,
        output_attentions=None,
        return_dict=None,
        **kwargs,
    ):
        """As transformers' causal LMs: `input_ids` (B, T) or `inputs_embeds` (B, T, D); `labels` give the loss;
        `use_cache` / `cache` (or `past_key_values`) prefill and continue a `ThinkfastCache`; `output_hidden_states`
        adds `hidden_states` (while continuing a cache, those of the new tokens); `return_dict=False` gives a tuple.
        `output_attentions=True` is refused: Mamba layers have no attention weights, and attention runs fused."""
        config = self.config
        if output_attentions if output_attentions is not None else getattr(config, "output_attentions", False):
            raise ModelInputError("thinkfast: output_attentions=True: there are no attention weights to return (Mamba "
                                  "layers have none, and attention runs fused); a layer's token-mixing matrix is "
                                  "model.lm.layers[i].mixer.matrix(hidden, rope)")
        if output_hidden_states is None:
            output_hidden_states = getattr(config, "output_hidden_states", False)
        if return_dict is None:
            return_dict = getattr(config, "return_dict", True)
        self._check_inputs(input_ids, inputs_embeds)
        state = cache if isinstance(cache, ThinkfastCache) else past_key_values
        hidden_states = None
        if isinstance(state, ThinkfastCache):
            if inputs_embeds is not None:
                raise ModelInputError("thinkfast: a cache is continued from token ids; pass input_ids, not inputs_embeds")
            if position_ids is not None:
                self._check_cache_positions(position_ids, state.lengths[:, None] + torch.arange(
                    input_ids.shape[1], device=state.lengths.device))
            logits, hidden_states = self._decode_with_cache(input_ids, state, attention_mask, bool(output_hidden_states))
        else:
            if use_cache and labels is None:
                if position_ids is not None:
                    x = input_ids if inputs_embeds is None else inputs_embeds[..., 0]
                    self._check_cache_positions(position_ids, self.lm.positions_for(x, attention_mask), attention_mask)
                out, state = self._prefill_with_cache(input_ids, inputs_embeds, attention_mask, bool(output_hidden_states))
            else:
                state = None
                out = self.lm(input_ids, attention_mask=attention_mask, position_ids=position_ids, compute_logits=False,
                              output_hidden_states=bool(output_hidden_states), inputs_embeds=inputs_embeds)
            hidden = _kept_positions(out.last_hidden, logits_to_keep)
            logits = self.lm.logits(hidden)
            if out.hidden_states is not None:  # transformers' convention: the last one after the final norm
                hidden_states = (*out.hidden_states[:-1], out.last_hidden)
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].float()
            # transformers' Trainer with gradient accumulation passes the whole step's label count, and then leaves
            # the division to the model (so that every token weighs the same, however the micro-batches split)
            num_items = kwargs.get("num_items_in_batch")
            loss = torch.nn.functional.cross_entropy(
                shifted.reshape(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100,
                reduction="mean" if num_items is None else "sum",
            )
            if num_items is not None:
                loss = loss / (num_items.to(loss.device) if isinstance(num_items, torch.Tensor) else num_items)
        if not return_dict:  # transformers' tuple: the fields that are set, in order (the cache once)
            return tuple(v for v in (loss, logits, state, hidden_states) if v is not None)
        return ThinkfastCausalLMOutput(loss=loss, logits=logits, past_key_values=state, cache=state,
                                       hidden_states=hidden_states)

    def _check_inputs(self, input_ids, inputs_embeds):
        """One clear line where torch would fail deep inside (IndexError) or give a device-side assert (ids out of
        the vocabulary: checked on CPU only, where reading them back costs nothing; on GPU it would sync every step)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ModelInputError("thinkfast: give exactly one of input_ids (B, T) and inputs_embeds (B, T, D)")
        if inputs_embeds is not None:
            d = self.lm.cfg.d_model
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != d:
                raise ModelInputError(f"thinkfast: inputs_embeds has shape {tuple(inputs_embeds.shape)}; give a (batch, "
                                      f"length, {d}) tensor")
            return
        _check_2d(input_ids, "input_ids")
        if input_ids.device.type == "cpu" and input_ids.numel() and not _compiling():
            vocab = self.lm.embed.weight.shape[0]
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= vocab:
                raise ModelInputError(f"thinkfast: token id {low if low < 0 else high} is outside the model's vocabulary "
                                      f"of {vocab}; tokenizer and model do not match (after adding tokens to the "
                                      "tokenizer, call model.resize_token_embeddings(len(tokenizer)))")

    @staticmethod
    def _check_cache_positions(position_ids, expected, attention_mask=None):
        """A cache numbers each row's tokens itself (its length is the next position and KV slot), so other
        position_ids are refused rather than dropped; where the mask pads a column, any position goes."""
        position_ids = position_ids.to(expected.device).expand_as(expected)
        differ = position_ids != expected
        if attention_mask is not None:
            differ &= attention_mask.to(expected.device).bool()
        if bool(differ.any()):
            raise ModelInputError("thinkfast: position_ids with a cache must count each row's tokens from 0, as the "
                                  "attention mask implies (the cache numbers them itself); pass position_ids=None, or "
                                  "use_cache=False for other positions")

    def _prefill_with_cache(self, input_ids, inputs_embeds, attention_mask, output_hidden_states):
        """The prompts' forward (LMOutput) and a new `ThinkfastCache` holding their state."""
        x = input_ids if inputs_embeds is None else inputs_embeds
        Bsz, T = x.shape[:2]
        if attention_mask is not None and not bool(attention_mask.all()) and not _left_padding_only(attention_mask):
            raise ModelInputError(
                "thinkfast: generating with a cache needs left-padded prompts (tokenizer.padding_side = 'left'); "
                "this attention_mask has pads after a prompt's tokens"
            )
        if hooked(self.lm):
            return self._prefill_for_recompute(input_ids, inputs_embeds, attention_mask, output_hidden_states)
        capacity = max(self.GENERATION_MIN_CAPACITY, 2 * T)
        step = type(self).generation_step
        if getattr(step, "reads_weights", False) and not plain_modules(self.lm):
            step = ModelStep  # an adapter or hook would be skipped by a step that reads the weights itself
        state = step.allocate(self.lm, Bsz, capacity)
        out = self.lm(input_ids, attention_mask=attention_mask, state=state, compute_logits=False,
                      output_hidden_states=output_hidden_states, inputs_embeds=inputs_embeds)
        if attention_mask is None:
            lengths = torch.full((Bsz,), T, dtype=torch.long, device=x.device)
        else:
            lengths = attention_mask.long().sum(-1)
            pads = T - lengths
            if bool(pads.any()):  # each row's real tokens move to slots [0, length): their positions
                slots = (torch.arange(T, device=x.device)[None, :] + pads[:, None]).clamp(max=T - 1)
                for c in state.caches:
                    if isinstance(c, KVCache):
                        idx = slots[:, None, :, None].expand(-1, c.k.shape[1], -1, c.k.shape[3])
                        c.k[:, :, :T] = c.k[:, :, :T].gather(2, idx)
                        c.v[:, :, :T] = c.v[:, :, :T].gather(2, idx)
        return out, ThinkfastCache(state, lengths, T, lambda st: step(self.lm, st))

    def _prefill_for_recompute(self, input_ids, inputs_embeds, attention_mask, output_hidden_states):
        """A hooked model's prefill: its forward, and a cache that keeps the columns to re-run (see `hooked`)."""
        if inputs_embeds is not None:
            raise ModelInputError("thinkfast: this model has hooks (accelerate's offloading or device map, or forward "
                                  "hooks), so its cache re-runs the token ids each step; pass input_ids, not "
                                  "inputs_embeds")
        where = next((name or "the model" for name, m in self.lm.named_modules()
                      if m is not self.lm.embed and _has_hook(m)), "the model")
        warnings.warn(f"thinkfast: the model has hooks (on {where}: accelerate's offloading or device map, or forward "
                      "hooks), which its recurrent step would skip, so generate() re-runs the whole sequence every "
                      "step (slow at length; the model on one device without hooks takes the cached step)", stacklevel=2)
        out = self.lm(input_ids, attention_mask=attention_mask, compute_logits=False,
                      output_hidden_states=output_hidden_states)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
        return out, ThinkfastCache(None, mask.long().sum(-1), input_ids.shape[1], prefix=(input_ids, mask))

    def _decode_with_cache(self, input_ids, state: ThinkfastCache, attention_mask=None, output_hidden_states=False):
        """The new columns one at a time, through the model's recurrent step: logits (B, new, V) and, when asked,
        the hidden states (transformers' tuple, each (B, new, D)) from the model's own step, which keeps them."""
        new = input_ids.shape[1]
        if new == 0:
            raise ModelInputError("thinkfast: no new tokens to feed a cache that has seen them all; pass the cache "
                                  "with a longer sequence, or none")
        if input_ids.shape[0] != state.lengths.shape[0]:  # a Llamba would continue another row's state in silence
            raise ModelInputError(f"thinkfast: the cache holds {state.lengths.shape[0]} rows (after beam search or "
                                  f"num_return_sequences, one per beam / sequence) and input_ids has "
                                  f"{input_ids.shape[0]}; continue with every row the cache was built on, or no cache")
        if attention_mask is not None and not bool(attention_mask[:, -new:].all()):
            raise ModelInputError("thinkfast: tokens after a cache cannot be padded (each row's state has moved on); "
                                  "continue rows whose new text differs in length one at a time")
        if state.state is None:
            return self._decode_by_recompute(input_ids, state, output_hidden_states)
        longest = int(state.lengths.max())  # one host sync per call, not per token
        state.reserve(longest + new)
        logits, columns = [], []
        for j in range(new):  # nothing past the longest row is ever attended
            if output_hidden_states:  # the fast step keeps none; the model's own reads and writes the same state
                columns.append([])
                logits.append(self.lm.step(input_ids[:, j], state.lengths, state.state, longest + j + 1, columns[-1]))
            else:
                logits.append(state.step(input_ids[:, j], state.lengths, longest + j + 1))
            state.lengths = state.lengths + 1
        state.seen += new
        hidden_states = tuple(torch.stack(layer, 1) for layer in zip(*columns)) if output_hidden_states else None
        return torch.stack(logits, 1), hidden_states

    def _decode_by_recompute(self, input_ids, state: ThinkfastCache, output_hidden_states):
        """A hooked model's new columns: the whole sequence through its forward again, the new columns' outputs."""
        new = input_ids.shape[1]
        ids, mask = state.prefix
        ids = torch.cat([ids, input_ids.to(ids.device)], 1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], new)], 1)
        out = self.lm(ids, attention_mask=mask, compute_logits=False, output_hidden_states=output_hidden_states)
        state.prefix, state.seen, state.lengths = (ids, mask), state.seen + new, state.lengths + new
        hidden_states = None
        if output_hidden_states:
            hidden_states = tuple(h[:, -new:] for h in (*out.hidden_states[:-1], out.last_hidden))
        return self.lm.logits(out.last_hidden[:, -new:]), hidden_states


AutoConfig.register("thinkfast", ThinkfastConfig, exist_ok=True)
AutoModelForCausalLM.register(ThinkfastConfig, ThinkfastForCausalLM, exist_ok=True)
