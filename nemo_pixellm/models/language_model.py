"""The language model: Megatron's GPTModel, whose attention layers are given the rope table of explicit positions.

Megatron's GPTModel builds the rotary table from ``position_ids`` only for M-RoPE with standard attention
(plain RoPE rotates 0..s-1, whatever the ids); with MLA it builds none and each layer rotates positions
0..s-1. ``PixelGPTModel`` builds the per-token table, once per forward, from the ``position_ids`` it is given:
[b, s] or [3, b, s] (M-RoPE t / h / w ids), for MLA's rope slice (``mla.py``) or grouped-query attention's
heads (``gqa.py``); None keeps Megatron's 0..s-1.

Decoding steps over MLA's latent cache run ``decode_step``: the same submodules (norms, MLA's absorbed decode,
MLP / MoE, output layer) called in a plain loop. Megatron's TransformerBlock / TransformerLayer / GPTModel glue
(recompute and offload hooks, bias-dropout-add, viewless tensors, MTP and loss branches) was ~30% of a
one-token step on a CPU (issue 22's profile), and none of it does anything there.
"""

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.identity_op import IdentityOp

from nemo_pixellm.models.mla import LatentCache, PixelMLASelfAttention, RopeTable, mla_rotary
from nemo_pixellm.models.parallel_linear import LocalColumnParallelLinear


class PixelGPTModel(GPTModel):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if self.post_process:  # GPTModel builds Megatron's own linear here, whatever the spec: same parameters
            self.output_layer.__class__ = LocalColumnParallelLinear
        base = mla_rotary(config, self.pg_collection.cp) if config.multi_latent_attention else self.rotary_pos_emb
        self.rope_table = RopeTable(base, config.mrope_section, getattr(config, "mrope_interleaved", False))

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        # Megatron's step that turns positions into the layers' rotary input (listed in nemo_pixellm.compat).
        outputs = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        if position_ids is None:
            return outputs
        decoder_input, _, *rest = outputs
        return (decoder_input, self.rope_table(position_ids), *rest)

    def forward(self, *args, loss_mask: torch.Tensor | None = None, **kwargs):
        """GPTModel's forward; given a ``loss_mask`` with the labels, the output layer and the cross-entropy run
        only at the tokens it selects (``loss_at_selected_tokens``)."""
        if loss_mask is not None and kwargs.get("labels") is not None and self.selects_loss_tokens():
            kwargs["output_processor"] = self.loss_at_selected_tokens
        return super().forward(*args, loss_mask=loss_mask, **kwargs)

    def selects_loss_tokens(self) -> bool:
        """The output layer can take any subset of this rank's tokens: the whole vocabulary and sequence here, no
        multi-token prediction (whose heads need every position)."""
        c = self.config
        return c.tensor_model_parallel_size == 1 and not c.sequence_parallel and not c.mtp_num_layers

    def loss_at_selected_tokens(self, *, hidden_states, output_layer, output_weight, labels, loss_mask,
                                runtime_gather_output, scale_logits, **unused) -> torch.Tensor:
        """Megatron's ``output_processor`` hook: per-token losses [b, s] from hidden states [s, b, h], with the
        output layer and cross-entropy computed only where ``loss_mask`` is non-zero (elsewhere 0, which the masked
        mean ignores). SFT trains on answers, a fraction of each sequence: on the tiny chain's stage 3 the
        logits and their log-softmax over every token were ~8% of the step."""
        seq, batch, hidden = hidden_states.shape
        rows = loss_mask.t().reshape(-1).nonzero().squeeze(1)  # s-major, as hidden_states' rows
        picked = hidden_states.reshape(seq * batch, hidden).index_select(0, rows).unsqueeze(1)  # [n, 1, h]
        logits, _ = output_layer(picked, weight=output_weight, runtime_gather_output=runtime_gather_output)
        targets = labels.t().reshape(-1).index_select(0, rows).unsqueeze(0)  # [1, n]
        losses = self.compute_language_model_loss(targets, scale_logits(logits)).reshape(-1)
        return losses.new_zeros(seq * batch).index_copy(0, rows, losses).view(seq, batch).t().contiguous()

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy [b, s] of logits [s, b, vocab]. With the whole vocabulary on this rank, torch's
        fused kernel in fp32: Megatron's vocab-parallel form runs ~10 ops and three all-reduces over a group of
        one (1.68 ms forward + backward on the tiny step's logits against 0.65 ms); the values agree to rounding."""
        if self.config.tensor_model_parallel_size > 1 or self.config.cross_entropy_loss_fusion:
            return super().compute_language_model_loss(labels, logits)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.t().reshape(-1), reduction="none")
        return loss.view(logits.shape[:2]).t().contiguous()

    def decodes_lean(self, inference_context, position_ids) -> bool:
        """Whether this call is a decoding step ``decode_step`` computes exactly as Megatron's forward would:
        no autograd, eval mode, one tensor, context and pipeline rank (experts may be parallel: the MoE layer
        dispatches as in any forward), the latent cache in decode mode, and plain pre-norm layers with MLA in its
        absorbed form."""
        c = self.config
        return (isinstance(inference_context, LatentCache) and inference_context.is_decode_only()
                and position_ids is not None and not c.add_bias_linear
                and not torch.is_grad_enabled() and not self.training and self.pre_process and self.post_process
                and c.tensor_model_parallel_size == 1 and c.context_parallel_size == 1 and not c.sequence_parallel
                and not c.fp32_residual_connection and not c.apply_residual_connection_post_layernorm
                and not c.mtp_num_layers and self.decoder.final_layernorm is not None
                and all(isinstance(layer.self_attention, PixelMLASelfAttention) and layer.self_attention._absorbable()
                        and isinstance(layer.cross_attention, IdentityOp) for layer in self.decoder.layers))

    def decode_step(self, decoder_input: torch.Tensor, position_ids: torch.Tensor, attention_mask,
                    cache: LatentCache) -> torch.Tensor:
        """Embeddings [s, b, h] of the new tokens -> logits [b, s, vocab], appending to ``cache``."""
        hidden, rope_table = decoder_input, self.rope_table(position_ids)
        cos_sin = self.decoder.layers[0].self_attention.rope_cos_sin(rope_table)  # every layer's
        for layer in self.decoder.layers:  # eval: bias-dropout-add is a residual add (no biases here)
            attention, _ = layer.self_attention._absorbed_decode(layer.input_layernorm(hidden), attention_mask,
                                                                 cache, rope_table, cos_sin)
            hidden = hidden + attention
            mlp, _ = layer.mlp(layer.pre_mlp_layernorm(hidden))
            hidden = hidden + mlp
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(self.decoder.final_layernorm(hidden), weight=weight)
        return logits.transpose(0, 1).contiguous()
