"""The language model: embeddings -> blocks (pre-norm mixer + SwiGLU MLP) -> final norm -> head.

Any layer can be softmax attention or a Mamba-2 mixer (`ModelConfig.attn_layers`); all attention is a Llama,
none is a pure Llamba student, some is a hybrid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .mixers import MLP, Attention, KVCache, Mamba1Mixer, Mamba2Mixer, RMSNorm, Rotary, SSMCache

try:  # transformers' per-layer activation checkpointing: `gradient_checkpointing_enable()` switches it on per block
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # a transformers without it: blocks are plain modules, never checkpointed
    GradientCheckpointingLayer = nn.Module


class Block(GradientCheckpointingLayer):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.is_attention = cfg.is_attention(layer)
        self.input_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        if self.is_attention:
            self.mixer = Attention(cfg)
        else:
            self.mixer = Mamba1Mixer(cfg) if cfg.ssm_param == "mamba1" else Mamba2Mixer(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.d_mlp)

    def forward(self, h, rope, attention_mask=None, cache=None):
        # called with positional arguments: with gradient checkpointing the block is recomputed from them in backward
        h = h + self.mixer(self.input_norm(h), rope, attention_mask, cache)
        return h + self.mlp(self.mlp_norm(h))

    def step(self, h, rope, positions, cache, kv_len=None):
        h = h + self.mixer.step(self.input_norm(h), rope, positions, cache, kv_len)
        return h + self.mlp(self.mlp_norm(h))


class ModelState:
    """Per-slot decode state for every layer: a static KV cache or a conv + SSM state. Allocated once."""

    def __init__(self, caches: list[KVCache | SSMCache], max_len: int):
        self.caches = caches
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        c = self.caches[0]
        return (c.k if isinstance(c, KVCache) else c.ssm).shape[0]

    def copy_rows_(self, dst_rows, src: "ModelState", src_rows, length: int | None = None, offset: int = 0):
        """Fork: rows `dst_rows` of this state take rows `src_rows` of `src` (KV positions [:length] only, read
        from `offset` on: a left-padded prefill's row starts after its pads)."""
        for mine, theirs in zip(self.caches, src.caches):
            mine.copy_rows_(dst_rows, theirs, src_rows, length, offset)

    def nbytes(self) -> int:
        total = 0
        for c in self.caches:
            for t in (c.k, c.v) if isinstance(c, KVCache) else (c.conv, c.ssm):
                total += t.numel() * t.element_size()
        return total


@dataclass
class LMOutput:
    logits: torch.Tensor | None  # (B, T, V)
    last_hidden: torch.Tensor  # (B, T, D), after the final norm
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings, then each block's output


class ThinkfastLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rotary = Rotary(cfg)
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def update_config(self, **changes) -> None:
        """A new config with `changes` for this model and every module that holds its config (the vocabulary size
        after the embeddings are resized, untying the head), so no part of the model reads a stale one."""
        old, new = self.cfg, self.cfg.replace(**changes)
        for m in self.modules():
            if getattr(m, "cfg", None) is old:
                m.cfg = new

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(last_hidden, self.head_weight)

    def positions_for(self, input_ids, attention_mask=None):
        if attention_mask is None:
            T = input_ids.shape[1]
            return torch.arange(T, device=input_ids.device).expand(input_ids.shape[0], T)
        # left padding: real tokens count from 0 as if alone (HF convention)
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        state: ModelState | None = None,
        output_hidden_states: bool = False,
        compute_logits: bool = True,
        inputs_embeds: torch.Tensor | None = None,
    ) -> LMOutput:
        """Whole sequences from position 0. With `state`, also fills it (prefill) for `step` to continue.
        `inputs_embeds` (B, T, D) instead of `input_ids` (B, T): the embeddings are given, not looked up."""
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        # nothing padded: take the fast causal path (on meta, shapes only, the mask's values cannot be read)
        if attention_mask is not None and attention_mask.device.type != "meta" and bool(attention_mask.all()):
            attention_mask = None
        if position_ids is None:
            position_ids = self.positions_for(h[..., 0], attention_mask)  # (B, T): only its shape and device are read
        rope = self.rotary(position_ids)
        hidden = [h] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, attention_mask, None if state is None else state.caches[i])
            if hidden is not None:
                hidden.append(h)
        last = self.norm(h)
        return LMOutput(self.logits(last) if compute_logits else None, last, tuple(hidden) if hidden else None)

    def step(self, input_ids: torch.Tensor, positions: torch.Tensor, state: ModelState, kv_len: int | None = None,
             hidden_states: list | None = None):
        """Decode one token per row. input_ids (B,), positions (B,) -> logits (B, V). Updates `state` in place.
        `hidden_states`, a list, receives what a forward's would hold at this position: the embeddings, then each
        block's output, the last one after the final norm."""
        rope = self.rotary(positions.unsqueeze(1))
        rope = (rope[0][:, 0:1], rope[1][:, 0:1])
        h = self.embed(input_ids)
        for layer, cache in zip(self.layers, state.caches):
            if hidden_states is not None:
                hidden_states.append(h)
            h = layer.step(h, rope, positions, cache, kv_len)
        h = self.norm(h)
        if hidden_states is not None:
            hidden_states.append(h)
        return self.logits(h)

    def allocate_state(self, batch: int, max_len: int, device=None, dtype=None, ssm_dtype=None) -> ModelState:
        """KV caches and conv states in `dtype` (default: the weights'), SSM states in `ssm_dtype` (default fp32)."""
        p = self.embed.weight
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        caches = [layer.mixer.allocate_cache(batch, max_len, device, dtype, ssm_dtype) for layer in self.layers]
        return ModelState(caches, max_len)

    @torch.no_grad()
    def init_weights(self, std: float | None = None):
        std = self.cfg.initializer_range if std is None else std
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
            elif isinstance(m, (Mamba1Mixer, Mamba2Mixer)):
                nn.init.normal_(m.in_proj.weight, std=std)
                m.conv1d.reset_parameters()
                m.reset_ssm_parameters()
        for m in self.modules():  # again: the loop reached each Mamba-1 mixer's dt_proj (a Linear) after it, zeroing its bias
            if isinstance(m, Mamba1Mixer):
                m.reset_ssm_parameters()
