"""Core attention over torch's scaled_dot_product_attention: the local (non-TE) backend.

Megatron-Core's local DotProductAttention has no k_channels / v_channels, so MLA (q/k head dim 192 vs
v head dim 128 in PixelLM) cannot use it; this module fills the same spec slot with the same interface, and
serves grouped-query attention too (fewer key / value heads than query heads).

Packed sequences arrive as TE takes them: THD ([tokens, heads, dim], ``packed_seq_params.cu_seqlens_q``).
The segments are attended as batches of segments of similar length (lengths up to each power of two, padded
at the end to the batch's longest: causal attention keeps the padding from the real tokens), one SDPA call per
batch: memory and work grow with the segments' lengths, not as the square of the packed length, and a
micro-batch of ~100 short samples costs a handful of calls instead of one per sample (torch's nested-tensor
SDPA, which would take the segments as they are, dispatches to CUDA on a CPU build).
"""

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from nemo_pixellm.models.context_parallel import attend_across_ranks


class SDPACoreAttention(MegatronModule):
    """softmax(q k^T * scale + mask) v per head; inputs [s, b, heads, dim], output [s, b, heads * v_dim]."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        # context parallelism: the keys and values of the whole sequence are gathered (models/context_parallel.py)
        self.cp_group = None
        if config.context_parallel_size > 1:
            self.cp_group = pg_collection.cp if pg_collection is not None else parallel_state.get_context_parallel_group()
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.hidden_size_per_attention_head_v = v_channels or config.kv_channels
        no_rope = config.no_rope_freq[layer_number - 1] if getattr(config, "no_rope_freq", None) else False
        # LLaMA 4's iRoPE: the RoPE layers attend within chunks, the NoPE layers to everything before them
        self.chunk = None if no_rope else getattr(config, "attention_chunk_size", None)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        if self.cp_group is not None:
            if attention_mask is not None:
                raise NotImplementedError("an explicit attention mask with context parallelism")
            return attend_across_ranks(lambda q, k, v, mask: self._attend(q, k, v, mask, None),
                                       query, key, value, self.cp_group)
        return self._attend(query, key, value, attention_mask, attn_mask_type or self.attn_mask_type)

    def _packed(self, query, key, value, packed_seq_params) -> torch.Tensor:
        """THD [t, heads, dim] -> [t, heads * v_dim]: causal attention within each cu_seqlens segment."""
        if packed_seq_params.qkv_format != "thd" or not torch.equal(packed_seq_params.cu_seqlens_q,
                                                                    packed_seq_params.cu_seqlens_kv):
            raise NotImplementedError("the local backend packs self-attention as THD with cu_seqlens_q == _kv")
        bounds = packed_seq_params.cu_seqlens_q.to(query.device, torch.long)
        if int(bounds[-1]) != query.shape[0]:
            raise ValueError(f"cu_seqlens_q ends at {int(bounds[-1])} but the packed sequence has {query.shape[0]} tokens")
        starts, lengths = bounds[:-1], bounds[1:] - bounds[:-1]
        groups = torch.frexp((lengths - 1).clamp(min=1).double())[1]  # segments of length in (2^(g-1), 2^g]
        shapes, indices, reals = [], [], []
        for group in groups.unique().tolist():
            chosen = (groups == group).nonzero().squeeze(1)
            width = int(lengths[chosen].max())
            offsets = torch.arange(width, device=query.device)[:, None]
            real = (offsets < lengths[chosen]).flatten()  # [width * segments], the group's batch as SBHD
            shapes.append((width, len(chosen)))
            indices.append(torch.where(real, (starts[chosen] + offsets).flatten(), 0))  # padding reads token 0
            reals.append(real)
        # One gather per input and one for the output, as index_select: its backward adds rows once (index_add_),
        # where per-group advanced indexing (accumulating index_put_) took 12% of a packed tiny VLM step.
        index, real = torch.cat(indices), torch.cat(reals)
        sizes = [w * n for w, n in shapes]
        gathered = [t.index_select(0, index).split(sizes) for t in (query, key, value)]
        outputs = []
        for (width, count), *group_inputs in zip(shapes, *gathered):
            inputs = (t.view(width, count, *t.shape[1:]) for t in group_inputs)
            # The padding follows each sample's tokens, so causal attention keeps it from them; its rows are dropped.
            outputs.append(self._attend(*inputs, None, AttnMaskType.causal).flatten(0, 1))
        kept = real.nonzero().squeeze(1)
        slot_of_token = torch.empty_like(kept).index_copy_(0, index[kept], kept)
        return torch.cat(outputs).index_select(0, slot_of_token)

    def _attend(self, query, key, value, attention_mask, mask_type) -> torch.Tensor:
        """[s, b, heads, dim] -> [s, b, heads * v_dim]."""
        seq_q, batch, heads, _ = query.shape
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        sdpa_mask, is_causal = None, False
        if attention_mask is not None:
            sdpa_mask = ~attention_mask.bool()  # Megatron: True = masked out; SDPA: True = attend
        elif mask_type == AttnMaskType.causal:
            is_causal = True
        if self.chunk:
            sdpa_mask, is_causal = chunked(sdpa_mask, q.shape[2], k.shape[2], self.chunk, q.device), False
        v_dim = v.shape[-1]
        same_heads, seq_k = q.shape[1] == k.shape[1], k.shape[2]
        if is_causal and q.device.type == "cpu" and same_heads and seq_q == seq_k <= SHORT_CAUSAL:
            out = self._short_causal(q, k, v)
            return out.view(batch, heads, seq_q, v_dim).permute(2, 0, 1, 3).reshape(seq_q, batch, heads * v_dim)
        if v_dim < q.shape[-1]:  # MLA: SDPA's fused kernels need v as wide as q/k; zero columns add nothing
            v = F.pad(v, (0, q.shape[-1] - v_dim))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=sdpa_mask, is_causal=is_causal,
            dropout_p=self.dropout_p if self.training else 0.0, scale=self.softmax_scale,
            enable_gqa=k.shape[1] != q.shape[1],  # grouped-query attention: each k/v head serves heads / groups
        )
        return out[..., :v_dim].permute(2, 0, 1, 3).reshape(seq_q, batch, heads * v_dim)

    def _short_causal(self, q, k, v) -> torch.Tensor:
        """Causal attention of a short sequence on a CPU as batched products over the score matrix, in blocks of
        QUERY_BLOCK queries (each reads the keys up to its last query): [b, n, s, d] -> [b * n, s, v_dim]. At 2
        threads and up to SHORT_CAUSAL tokens this costs 0.6-0.7x torch's CPU flash kernel forward + backward
        (its blocks are built for long rows; 8-32 heads x batch, q/k width 32 or 96), and needs no zero-padded v."""
        batch, heads, seq, dim = q.shape
        q, k, v = (t.reshape(batch * heads, seq, t.shape[-1]) for t in (q, k, v))
        future = torch.full((seq, seq), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
        # the scale on q rather than as baddbmm's alpha: the training step measured 2-5% faster (tiny, h512)
        q = q * (self.softmax_scale if self.softmax_scale is not None else dim ** -0.5)
        outputs = []
        for first in range(0, seq, QUERY_BLOCK):
            last = min(first + QUERY_BLOCK, seq)
            keys = k[:, :last].transpose(1, 2)
            probs = torch.baddbmm(future[first:last, :last], q[:, first:last], keys).softmax(-1)
            if self.training and self.dropout_p:
                probs = F.dropout(probs, self.dropout_p)
            outputs.append(torch.bmm(probs, v[:, :last]))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


# Longest self-attention (tokens) that _short_causal computes on a CPU, and its query block. Forward + backward
# against torch's flash kernel (2 threads): 0.6-0.7x at 128-512 tokens; 0.9x at 768; 1.0x at 1024.
SHORT_CAUSAL, QUERY_BLOCK = 512, 128


@contextlib.contextmanager
def announced_mask(attention, attention_mask: torch.Tensor | None):
    """An attention layer's call whose explicit ``attention_mask`` (padded rows, cache slots while decoding) is
    announced as AttnMaskType.arbitrary: Transformer Engine applies a given mask only under that type (its causal
    kernels ignore it); this backend applies any mask it is given."""
    if attention_mask is None:
        yield
        return
    kept, attention.attn_mask_type = attention.attn_mask_type, AttnMaskType.arbitrary
    try:
        yield
    finally:
        attention.attn_mask_type = kept


def chunked(visible: torch.Tensor | None, queries: int, keys: int, chunk: int, device) -> torch.Tensor:
    """The causal (or given) visibility, True = attend, limited to keys in the query's chunk of ``chunk`` tokens.
    Tokens are counted as each query sees them: a key's index is the number of keys the query sees before it, the
    query's is the number it sees minus one. So padding and cache slots of shorter rows do not count, and packed
    samples (a block-diagonal mask) count from their own first token."""
    if visible is None:  # causal; queries are the last ones (a decoding step follows the cached keys)
        visible = torch.ones(queries, keys, dtype=torch.bool, device=device).tril(diagonal=keys - queries)[None, None]
    key_index = visible.cumsum(-1, dtype=torch.int32) - 1
    query_index = key_index[..., -1:]  # the last key index = the number of keys seen - 1
    return visible & (key_index // chunk == query_index // chunk)
