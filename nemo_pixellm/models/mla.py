"""Multi-head Latent Attention (DeepSeek-V3) on Megatron-Core, with explicit and multimodal positions.

Megatron's MLASelfAttention does the attention math (q/kv low-rank paths with their norms, rope on the
decoupled slice, YaRN). It always uses positions 0..s-1 and refuses M-RoPE; ``PixelMLASelfAttention``
gives its rope slice per-token position ids instead: [b, s] (1D) or [3, b, s] (Qwen2-VL M-RoPE:
temporal / height / width ids, each driving one section of the frequency pairs, ``config.mrope_section``).
The frequencies themselves still come from Megatron's rotary module (RoPE or YaRN, with its mscale), so
text-only ids (t = h = w = index) reduce exactly to 1D RoPE.

For the pure-PyTorch backend its spec slots are filled as follows:

- The down projections (hidden -> q_lora, hidden -> kv_lora + rope) are *replicated* across tensor-parallel
  ranks, as in TE's spec ("duplicated" TELinear). Megatron's local spec makes them column-parallel, and
  then the gather's backward drops the other ranks' contributions to the shared rope key: wrong grads at
  TP>1. Replicated weights see a sequence shard each under sequence parallelism, so their gradients are
  summed across TP ranks by finalize_model_grads (the ``sequence_parallel`` attribute), and the shared rope
  key's gradient by the sequence-parallel gather's reduce-scatter. Hence TP>1 requires sequence_parallel.
"""

import contextlib
import functools

import torch
import megatron.core.transformer.multi_latent_attention as mcore_mla

from nemo_pixellm.models.replicated_linear import ReplicatedLinear


def use_local_mla_modules(attention_submodules) -> None:
    """Fill an MLASelfAttentionSubmodules for the local backend (replicated down projections; MLASelfAttention
    takes them once nemo_pixellm.compat has bound its ``Linear`` name, which Megatron binds only with TE)."""
    attention_submodules.linear_q_down_proj = ReplicatedLinear
    attention_submodules.linear_kv_down_proj = ReplicatedLinear


@functools.lru_cache(maxsize=8)
def mrope_axis_per_column(sections: tuple[int, ...], rope_dim: int) -> torch.Tensor:
    """Which position axis (0 t, 1 h, 2 w) drives each column of Megatron's rope embedding
    (cat(freqs, freqs): column c rotates frequency pair c mod rope_dim/2). Cached: read, never written."""
    half = rope_dim // 2
    if sum(sections) != half:
        raise ValueError(f"mrope_section {sections} must sum to the rope half-dimension {half}")
    axis = torch.repeat_interleave(torch.arange(len(sections)), torch.tensor(sections))
    return torch.cat([axis, axis])


class PositionalRotary(torch.nn.Module):
    """Megatron's rotary module, evaluated at explicit position ids when they are set."""

    def __init__(self, base: torch.nn.Module, mrope_section: list[int] | None):
        super().__init__()
        self.base = base
        self.mrope_section = tuple(mrope_section) if mrope_section else None
        self.position_ids = None  # set by PixelMLASelfAttention for the duration of one forward

    def get_rotary_seq_len(self, *args, **kwargs):
        return self.base.get_rotary_seq_len(*args, **kwargs)

    def forward(self, seq_len: int, *args, **kwargs):
        if self.position_ids is None:
            return self.base(seq_len, *args, **kwargs)
        positions = self.position_ids
        if positions.dim() == 2:
            positions = positions.unsqueeze(0)  # [1, b, s]
        # One row per position value; rows rounded up to a power of two so that decoding, one position
        # further each step, hits Megatron's per-length cache of the table instead of rebuilding it.
        rows = max(64, 1 << int(positions.max()).bit_length())
        out = self.base(rows, *args, **kwargs)
        table, mscale = out if isinstance(out, tuple) else (out, None)
        emb = table[:, 0, 0, :][positions]  # [axes, b, s, dim]
        if positions.shape[0] == 3:
            if self.mrope_section is None:
                raise ValueError("position ids are [3, b, s] (M-RoPE) but model.mrope_section is not set")
            axis = mrope_axis_per_column(self.mrope_section, emb.shape[-1]).to(emb.device)
            emb = emb.gather(0, axis.view(1, 1, 1, -1).expand(1, *emb.shape[1:]))
        emb = emb[0].transpose(0, 1).unsqueeze(2).contiguous()  # [s, b, 1, dim]
        return (emb, mscale) if mscale is not None else emb


class LatentCache:
    """MLA's decoding cache: per token only the normalised KV latent c_kv [kv_lora_rank] and the rotated
    shared rope key [rope_dim]; keys and values of every head are re-expanded from it at each step."""

    def __init__(self):
        self.latent = self.rope_key = None  # [slots, b, kv_lora_rank], [slots, b, rope_dim]

    def append(self, latent: torch.Tensor, rope_key: torch.Tensor):
        if self.latent is None:
            self.latent, self.rope_key = latent, rope_key
        else:
            self.latent = torch.cat([self.latent, latent])
            self.rope_key = torch.cat([self.rope_key, rope_key])
        return self.latent, self.rope_key


class PixelMLASelfAttention(mcore_mla.MLASelfAttention):
    """MLA whose decoupled rope slice uses the position ids given to the model (see module docstring), with
    an optional latent KV cache for decoding (Megatron caches MLA latents only in its GPU dynamic engine)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rotary_pos_emb = PositionalRotary(self.rotary_pos_emb, self.config.mrope_section)
        self.latent_cache: LatentCache | None = None

    def get_query_key_value_tensors(self, *args, **kwargs):
        query, key, value, q_compressed, kv_compressed = super().get_query_key_value_tensors(*args, **kwargs)
        if self.latent_cache is None:
            return query, key, value, q_compressed, kv_compressed
        # Cache this step's latents, then expand keys / values of all cached tokens from them.
        qk_dim, heads = self.config.qk_head_dim, self.num_attention_heads_per_partition
        latent, rope_key = self.latent_cache.append(kv_compressed, key[:, :, 0, qk_dim:])
        kv, _ = self.linear_kv_up_proj(latent)
        kv = kv.view(*latent.shape[:2], heads, qk_dim + self.config.v_head_dim)
        key_nope, value = torch.split(kv, [qk_dim, self.config.v_head_dim], dim=-1)
        key = torch.cat([key_nope, rope_key.unsqueeze(2).expand(-1, -1, heads, -1)], dim=-1)
        return query, key.contiguous(), value.contiguous(), q_compressed, kv_compressed

    @contextlib.contextmanager
    def positions(self, position_ids: torch.Tensor | None):
        self.rotary_pos_emb.position_ids = position_ids
        try:
            yield
        finally:
            self.rotary_pos_emb.position_ids = None
