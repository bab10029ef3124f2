"""Hugging Face wrappers: `ThinkfastConfig` / `ThinkfastForCausalLM`, registered with the Auto classes.

`save_pretrained` writes config.json + model.safetensors; `AutoModelForCausalLM.from_pretrained(dir)` loads it.
`generate()` works by re-running the whole prefix each step (no HF cache): correct and simple, but slow;
the fast path is `thinkfast.engine`.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import ModelConfig
from .model import ThinkfastLM

MODEL_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]


class ThinkfastConfig(PretrainedConfig):
    model_type = "thinkfast"

    def __init__(self, tie_word_embeddings: bool = False, **kwargs):
        defaults = ModelConfig()
        for name in MODEL_FIELDS:
            setattr(self, name, kwargs.pop(name, getattr(defaults, name)))
        # tying is done by ThinkfastLM itself (one shared parameter); keep HF's own tying out of it
        super().__init__(tie_word_embeddings=False, **kwargs)

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


class ThinkfastForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = ThinkfastConfig
    base_model_prefix = "lm"
    _no_split_modules = ["Block"]
    main_input_name = "input_ids"

    def __init__(self, config: ThinkfastConfig):
        super().__init__(config)
        self.lm = ThinkfastLM(config.to_model_config())
        self.post_init()

    @property
    def model_config(self) -> ModelConfig:
        return self.lm.cfg

    def _init_weights(self, module):
        if module is self:
            self.lm.init_weights(self.config.initializer_range)

    def init_weights(self):
        self.lm.init_weights(self.config.initializer_range)

    def get_input_embeddings(self):
        return self.lm.embed

    def set_input_embeddings(self, value):
        self.lm.embed = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, input_ids=None, attention_mask=None, labels=None, position_ids=None, **kwargs):
        out = self.lm(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        loss = None
        if labels is not None:
            logits = out.logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=out.logits)


AutoConfig.register("thinkfast", ThinkfastConfig, exist_ok=True)
AutoModelForCausalLM.register(ThinkfastConfig, ThinkfastForCausalLM, exist_ok=True)
