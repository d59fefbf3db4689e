"""The language model: Megatron's GPTModel, whose attention layers are given the rope table of explicit positions.

Megatron's GPTModel builds the rotary table from ``position_ids`` only for M-RoPE with standard attention
(plain RoPE rotates 0..s-1, whatever the ids); with MLA it builds none and each layer rotates positions
0..s-1. ``PixelGPTModel`` builds the per-token table, once per forward, from the ``position_ids`` it is given:
[b, s] or [3, b, s] (M-RoPE t / h / w ids), for MLA's rope slice (``mla.py``) or grouped-query attention's
heads (``gqa.py``); None keeps Megatron's 0..s-1.
"""

from megatron.core.models.gpt import GPTModel

from nemo_pixellm.models.mla import RopeTable, mla_rotary


class PixelGPTModel(GPTModel):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        base = mla_rotary(config, self.pg_collection.cp) if config.multi_latent_attention else self.rotary_pos_emb
        self.rope_table = RopeTable(base, config.mrope_section, getattr(config, "mrope_interleaved", False))

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        # Megatron's step that turns positions into the layers' rotary input (listed in nemo_pixellm.compat).
        outputs = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        if position_ids is None:
            return outputs
        decoder_input, _, *rest = outputs
        return (decoder_input, self.rope_table(position_ids), *rest)
