"""Multi-head Latent Attention (DeepSeek-V3) on Megatron-Core, with explicit and multimodal positions.

Megatron's MLASelfAttention does the attention math (q/kv low-rank paths with their norms, rope on the
decoupled slice, YaRN). It always uses positions 0..s-1 and refuses M-RoPE. Here positions are arguments:

- ``PixelGPTModel`` (Megatron's GPTModel) turns the ``position_ids`` it is given, [b, s] (1D) or [3, b, s]
  (Qwen2-VL M-RoPE: temporal / height / width ids, each driving one section of the frequency pairs,
  ``config.mrope_section``), into one per-token rope table (``RopeTable``) per forward, and hands it to every
  layer as ``rotary_pos_emb``, as Megatron does for standard attention's M-RoPE.
- ``PixelMLASelfAttention`` takes that table, and a ``LatentCache`` given as the forward's
  ``inference_context`` (Megatron's channel for decoding caches), as arguments.

The frequencies still come from Megatron's rotary module (RoPE or YaRN, with its mscale), so text-only ids
(t = h = w = index) reduce exactly to 1D RoPE.

For the pure-PyTorch backend (``models/backend.py``: TorchSpecProvider):

- The down projections (hidden -> q_lora, hidden -> kv_lora + rope) are *replicated* across tensor-parallel
  ranks, as in TE's spec ("duplicated" TELinear). Megatron's local spec makes them column-parallel, and
  then the gather's backward drops the other ranks' contributions to the shared rope key: wrong grads at
  TP>1. Replicated weights see a sequence shard each under sequence parallelism, so their gradients are
  summed across TP ranks by finalize_model_grads (the ``sequence_parallel`` attribute), and the shared rope
  key's gradient by the sequence-parallel gather's reduce-scatter. Hence TP>1 requires sequence_parallel.
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import megatron.core.transformer.multi_latent_attention as mcore_mla
from megatron.core.inference.config import InferenceConfig
from megatron.core.inference.contexts.base_context import BaseInferenceContext
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding

from nemo_pixellm.models.core_attention import announced_mask
from nemo_pixellm.tiling import mrope_axis_per_column


def mla_rotary(config, cp_group=None) -> torch.nn.Module:
    """The rotary module MLASelfAttention builds for itself (RoPE or YaRN on the decoupled rope slice)."""
    if config.rope_type == "yarn":
        return YarnRotaryEmbedding(
            config.qk_pos_emb_head_dim, rotary_base=config.rotary_base, scaling_factor=config.rotary_scaling_factor,
            original_max_position_embeddings=config.original_max_position_embeddings, beta_fast=config.beta_fast,
            beta_slow=config.beta_slow, mscale=config.mscale, mscale_all_dim=config.mscale_all_dim, cp_group=cp_group,
            use_cpu_initialization=config.use_cpu_initialization)
    return RotaryEmbedding(config.qk_pos_emb_head_dim, rotary_percent=config.rotary_percent,
                           rotary_base=config.rotary_base, cp_group=cp_group,
                           use_cpu_initialization=config.use_cpu_initialization)


class RopeTable(torch.nn.Module):
    """Position ids [b, s] or [3, b, s] -> the per-token rope table [s, b, 1, rope_dim] of Megatron's rotary
    module ``base`` (M-RoPE: each column from the axis its frequency pair belongs to)."""

    def __init__(self, base: torch.nn.Module, mrope_section: list[int] | None, mrope_interleaved: bool = False):
        super().__init__()
        self.base = base
        self.mrope_section = tuple(mrope_section) if mrope_section else None
        self.mrope_interleaved = mrope_interleaved

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        positions = position_ids.unsqueeze(0) if position_ids.dim() == 2 else position_ids  # [axes, b, s]
        # One row per position value; rows rounded up to a power of two so that decoding, one position
        # further each step, hits Megatron's per-length cache of the table instead of rebuilding it.
        rows = max(64, 1 << int(positions.max()).bit_length())
        out = self.base(rows, packed_seq=True)  # the whole table: under CP the positions are this rank's already
        table = out[0] if isinstance(out, tuple) else out  # YaRN also returns its mscale
        # Megatron keeps the frequencies in a plain attribute that model.to() does not move: a model built on
        # one device and moved to another gets its table copied to where the positions are.
        emb = table[:, 0, 0, :].to(positions.device)[positions]  # [axes, b, s, dim]
        if positions.shape[0] == 3:
            if self.mrope_section is None:
                raise ValueError("position ids are [3, b, s] (M-RoPE) but model.mrope_section is not set")
            interleaved = getattr(self.base, "rotary_interleaved", False)
            axis = mrope_axis_per_column(self.mrope_section, emb.shape[-1], interleaved, self.mrope_interleaved)
            axis = axis.to(emb.device)
            emb = emb.gather(0, axis.view(1, 1, 1, -1).expand(1, *emb.shape[1:]))
        return emb[0].transpose(0, 1).unsqueeze(2).contiguous()  # [s, b, 1, dim]


class _GivenTable(torch.nn.Module):
    """MLASelfAttention's rotary module, answering with the table handed to this attention call.

    Megatron's MLA computes its table inside get_query_key_value_tensors from a length only; this is the one
    place the given table enters it (removed by docs/upstream/mla-position-ids.md)."""

    def __init__(self, base: torch.nn.Module):
        super().__init__()
        self.base = base
        self.table = None

    def get_rotary_seq_len(self, *args, **kwargs):
        return self.base.get_rotary_seq_len(*args, **kwargs)

    def forward(self, seq_len: int, *args, **kwargs):
        if self.table is None:
            return self.base(seq_len, *args, **kwargs)
        if not isinstance(self.base, YarnRotaryEmbedding):
            return self.table
        out = self.base(1, *args, **{**kwargs, "packed_seq": True})  # for YaRN's mscale only: no CP cut of it
        return (self.table, out[1]) if isinstance(out, tuple) else self.table  # YaRN: with its mscale

    @contextlib.contextmanager
    def given(self, table: torch.Tensor | None):
        self.table = table
        try:
            yield
        finally:
            self.table = None


class LatentCache(BaseInferenceContext):
    """The decoding cache, given to the model as its ``inference_context``. For MLA, per layer and token only
    the normalised KV latent c_kv [kv_lora_rank] and the rotated shared rope key [rope_dim], side by side in one
    tensor; decoding steps attend over it in the absorbed form (``PixelMLASelfAttention._absorbed_decode``;
    Megatron caches MLA latents only in its GPU dynamic engine). For grouped-query attention (``gqa.py``) each
    group's key and value and the key's rope rows. Static batching: every row holds the same number of slots
    (padding is masked). Each layer's tensors grow inside buffers with room to spare (doubled when full), so a
    step writes its own tokens instead of copying every held one."""

    def __init__(self):
        super().__init__(InferenceConfig(materialize_only_last_token_logits=False))
        self.sequence_len_offset = self.batch_size_offset = 0
        self.max_sequence_length = 0  # sizes GPTModel's own 0..s-1 table, which the given positions replace
        self.layers: dict[int, tuple[torch.Tensor, ...]] = {}  # what each layer holds: views of its buffers
        self._buffers: dict[int, tuple[torch.Tensor, ...]] = {}

    def is_static_batching(self) -> bool:
        return True

    def is_decode_only(self) -> bool:
        return bool(self.layers)

    def slots(self) -> int:
        """Tokens held (the same for every layer)."""
        return next(iter(self.layers.values()))[0].shape[0] if self.layers else 0

    def append(self, layer: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Add this step's tensors ([new, b, ...] each) to the layer's; returns all of the layer's."""
        held = self.layers[layer][0].shape[0] if layer in self.layers else 0
        total = held + tensors[0].shape[0]
        buffers = self._buffers.get(layer)
        if buffers is None or buffers[0].shape[0] < total:
            room = max(2 * total, 64)
            grown = tuple(t.new_empty(room, *t.shape[1:]) for t in tensors)
            for new, old in zip(grown, self.layers.get(layer, ())):
                new[:held] = old
            buffers = self._buffers[layer] = grown
        for buffer, new in zip(buffers, tensors):
            buffer[held:total] = new
        self.layers[layer] = tuple(buffer[:total] for buffer in buffers)
        return self.layers[layer]


@dataclass
class _CallInputs:
    """What PixelMLASelfAttention.forward hands its get_query_key_value_tensors (through MLA's own
    ``position_ids`` pass-through argument, unused by Megatron)."""
    rope_table: torch.Tensor | None
    cache: LatentCache | None


class PixelMLASelfAttention(mcore_mla.MLASelfAttention):
    """MLA whose decoupled rope slice uses the per-token rope table it is given (``rotary_pos_emb``, from
    PixelGPTModel), with MLA's latent KV cache when the ``inference_context`` is a LatentCache."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config.apply_rope_fusion:
            raise ValueError("model.apply_rope_fusion=true: Megatron's fused MLA rope reads no given positions "
                             "(explicit / M-RoPE ids would be ignored); set model.apply_rope_fusion=false")
        self.rotary_pos_emb = _GivenTable(self.rotary_pos_emb)

    def forward(self, hidden_states, attention_mask, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, *args, position_ids=None, **kwargs):
        if inference_context is not None and not isinstance(inference_context, LatentCache):
            raise NotImplementedError("PixelLM's MLA decodes with its LatentCache (nemo_pixellm.generate)")
        if inference_context is not None and self.layer_number in inference_context.layers and self._absorbable():
            return self._absorbed_decode(hidden_states, attention_mask, inference_context, rotary_pos_emb)
        inputs = _CallInputs(rotary_pos_emb, inference_context)
        with announced_mask(self, attention_mask):
            return super().forward(hidden_states, attention_mask, key_value_states, None, None, *args,
                                   position_ids=inputs, **kwargs)

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, position_ids=None, *args, **kwargs):
        inputs = position_ids if isinstance(position_ids, _CallInputs) else _CallInputs(None, None)
        with self.rotary_pos_emb.given(inputs.rope_table):
            query, key, value, q_compressed, kv_compressed = super().get_query_key_value_tensors(
                hidden_states, key_value_states, None, *args, **kwargs)
        if inputs.cache is None:
            return query, key, value, q_compressed, kv_compressed
        # Cache this step's latents, then expand keys / values of all cached tokens from them.
        qk_dim, heads = self.config.qk_head_dim, self.num_attention_heads_per_partition
        held, = inputs.cache.append(self.layer_number, torch.cat([kv_compressed, key[:, :, 0, qk_dim:]], dim=-1))
        latent, rope_key = held.split([self.config.kv_lora_rank, self.config.qk_pos_emb_head_dim], dim=-1)
        kv, _ = self.linear_kv_up_proj(latent)
        kv = kv.view(*latent.shape[:2], heads, qk_dim + self.config.v_head_dim)
        key_nope, value = torch.split(kv, [qk_dim, self.config.v_head_dim], dim=-1)
        key = torch.cat([key_nope, rope_key.unsqueeze(2).expand(-1, -1, heads, -1)], dim=-1)
        return query, key.contiguous(), value.contiguous(), q_compressed, kv_compressed

    def _absorbed_decode(self, hidden_states, attention_mask, cache: LatentCache, rope_table, cos_sin=None):
        """A decoding step over the latent cache in DeepSeek's absorbed form: the key up-projection is folded
        into the query (q_nope W_uk per head) and the value up-projection applied after attention, so scores
        and outputs are computed against the cached latents instead of re-expanding every cached token's keys
        and values through linear_kv_up_proj at each step. Same math as the expanded form (fp32: ~1e-7).
        The new tokens' query and latent are computed here from MLA's own projections and norms (1 process:
        no tensor-parallel gathers), without the new token's key / value expansion the expanded form needs.
        ``cos_sin``: ``rope_cos_sin(rope_table)`` when the caller has it (the same for every layer)."""
        qk, rope, v = self.config.qk_head_dim, self.config.qk_pos_emb_head_dim, self.config.v_head_dim
        heads, rank = self.num_attention_heads_per_partition, self.config.kv_lora_rank
        new, batch = hidden_states.shape[:2]
        if self.config.q_lora_rank is not None:
            q_compressed, _ = self.linear_q_down_proj(hidden_states)
            query, _ = self.linear_q_up_proj(self.q_layernorm(q_compressed))
        else:
            query, _ = self.linear_q_proj(hidden_states)
        latent, rope_key = self.linear_kv_down_proj(hidden_states)[0].split([rank, rope], dim=-1)
        q_nope, q_rope = query.view(new, batch, heads, qk + rope).split([qk, rope], dim=-1)
        # the query's and the key's rope slices rotated in one call: [s, b, heads + 1, rope]
        rotated = self._rotate(torch.cat([q_rope, rope_key.unsqueeze(2)], dim=2), rope_table, cos_sin)
        entry = torch.cat([self.kv_layernorm(latent), rotated[:, :, heads]], dim=-1)  # [s, b, rank + rope]
        held, = cache.append(self.layer_number, entry)  # [S, b, rank + rope]
        up_k, up_v = self.linear_kv_up_proj.weight.view(heads, qk + v, rank).split([qk, v], dim=1)
        # Every head attends to the one latent key: heads x new queries as one head (no per-head copies of the
        # cache). The value is the key itself; its rope columns are dropped from the output.
        # Per head, every (row, token) at once: [h, b x s, d] @ [h, d, c]; a [b, h, s, d] @ [h, d, c] broadcast
        # would copy the weights once per row.
        q_absorbed = (q_nope.permute(2, 1, 0, 3).reshape(heads, batch * new, qk) @ up_k).view(heads, batch, new, rank)
        q = torch.cat([q_absorbed.transpose(0, 1), rotated[:, :, :heads].permute(1, 2, 0, 3)],
                      dim=-1).reshape(batch, 1, heads * new, rank + rope)
        k = held.transpose(0, 1).unsqueeze(1)  # [b, 1, S, rank + rope]
        keys = k.shape[2]
        visible = (~attention_mask.bool() if attention_mask is not None else  # Megatron: True = masked out
                   torch.ones(new, keys, dtype=torch.bool, device=q.device).tril(keys - new))
        if new > 1:  # one new token's row broadcasts over the heads
            visible = visible.expand(batch, 1, new, keys).repeat(1, 1, heads, 1)  # [b, 1, heads x new, S]
        if q.device.type == "cpu":  # plain products: torch's CPU flash kernel costs ~80 us a call for these rows
            # masked scores at dtype min, not -inf: a row with nothing visible (padding) stays finite, as in SDPA
            scores = torch.matmul(q, k.transpose(-1, -2)).mul_(self.softmax_scale)
            scores = scores.masked_fill_(~visible, torch.finfo(scores.dtype).min)
            out = torch.matmul(scores.softmax(-1), k[..., :rank])
        else:
            out = F.scaled_dot_product_attention(q, k, k, attn_mask=visible, scale=self.softmax_scale)[..., :rank]
        out = out.view(batch, heads, new, rank).transpose(0, 1).reshape(heads, batch * new, rank) @ up_v.transpose(1, 2)
        out = out.view(heads, batch, new, v).permute(2, 1, 0, 3).reshape(new, batch, heads * v)
        return self.linear_proj(out)

    def rope_cos_sin(self, rope_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos and sin of the given table times YaRN's mscale, which ``_rotate`` multiplies in its plain case
        (None where it calls Megatron's apply_rotary_pos_emb). Every MLA layer of a model has the same rotary
        module: ``decode_step`` computes them once per step instead of once per layer."""
        return self._cos_sin(*self._table(rope_table))

    def _table(self, rope_table: torch.Tensor) -> tuple[torch.Tensor, float]:
        with self.rotary_pos_emb.given(rope_table):
            out = self.rotary_pos_emb(rope_table.shape[0])
        return out if isinstance(out, tuple) else (out, 1.0)

    def _cos_sin(self, table: torch.Tensor, mscale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.config.rotary_interleaved or self.config.context_parallel_size > 1 or (
                table.shape[-1] != self.config.qk_pos_emb_head_dim):
            return None
        return torch.cos(table) * mscale, torch.sin(table) * mscale

    def _rotate(self, x: torch.Tensor, rope_table: torch.Tensor, cos_sin=None) -> torch.Tensor:
        """MLA's rope on the decoupled slices x [s, b, n, rope], with YaRN's mscale: Megatron's unfused
        apply_rotary_pos_emb as its MLA calls it (pairs de-interleaved, then rotate-half), written out for the
        one case decoding meets, at half its per-call cost (same operations, same numbers)."""
        if cos_sin is None:
            table, mscale = self._table(rope_table)
            cos_sin = self._cos_sin(table, mscale)
            if cos_sin is None:
                return apply_rotary_pos_emb(x, table, config=self.config, mscale=mscale,
                                            cp_group=self.pg_collection.cp, mla_rotary_interleaved=True)
        x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        half = x.shape[-1] // 2
        cos, sin = cos_sin[0].to(x.dtype), cos_sin[1].to(x.dtype)
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def _absorbable(self) -> bool:
        """The latent cache holds what linear_kv_up_proj reads: a plain linear after kv_layernorm (the local
        backend; TE fuses the norm into the up projection, where decoding re-expands the cache)."""
        return not hasattr(self.linear_kv_up_proj, "layer_norm_weight") and not self.training
