"""Grouped-query attention (LLaMA / Qwen2-VL / PaliGemma-style decoders: ``model.multi_latent_attention=false``,
``model.num_query_groups``) with explicit and multimodal positions and a decoding cache.

Megatron's SelfAttention does the math (fused qkv projection per query group, rotary, core attention,
output projection). As for MLA (``mla.py``) positions are arguments: ``PixelGPTModel`` turns the ids it is
given ([b, s], or [3, b, s] M-RoPE ids) into a per-token rope table and hands it to every layer as
``rotary_pos_emb``. With a ``LatentCache`` as the ``inference_context`` this layer keeps every token's key
and value (before rotary) and their rope rows, and attends over all of them: each step runs only its new
tokens (Megatron's own static-batching cache rotates positions 0..s-1 only).
"""

import torch
from megatron.core.transformer.attention import SelfAttention

from nemo_pixellm.models.core_attention import announced_mask
from nemo_pixellm.models.mla import LatentCache


class PixelSelfAttention(SelfAttention):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config.apply_rope_fusion:
            raise ValueError("model.apply_rope_fusion=true: the fused rope reads no per-token table (explicit / "
                             "M-RoPE positions would be ignored); set model.apply_rope_fusion=false")
        self._cache_call = None  # (cache, new rope rows) during one cached forward

    def forward(self, hidden_states, attention_mask, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, *args, **kwargs):
        if inference_context is None:
            with announced_mask(self, attention_mask):
                return super().forward(hidden_states, attention_mask, key_value_states, None, rotary_pos_emb,
                                       *args, **kwargs)
        if not isinstance(inference_context, LatentCache):
            raise NotImplementedError("PixelLM's attention decodes with its LatentCache (nemo_pixellm.generate)")
        if rotary_pos_emb is None:
            raise ValueError("cached decoding needs explicit positions (position_ids)")
        # Megatron rotates keys with the second table of a pair: every cached key's rows, then the new ones.
        cached = inference_context.layers.get(self.layer_number)
        key_table = rotary_pos_emb if cached is None else torch.cat([cached[2], rotary_pos_emb])
        self._cache_call = (inference_context, rotary_pos_emb)
        try:
            with announced_mask(self, attention_mask):
                return super().forward(hidden_states, attention_mask, key_value_states, None,
                                       (rotary_pos_emb, key_table), *args, **kwargs)
        finally:
            self._cache_call = None

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, *args, **kwargs):
        query, key, value = super().get_query_key_value_tensors(hidden_states, key_value_states, *args, **kwargs)
        if self._cache_call is None:
            return query, key, value
        cache, rope_rows = self._cache_call
        key, value, _ = cache.append(self.layer_number, key, value, rope_rows)
        return query, key, value
