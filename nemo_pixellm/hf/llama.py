"""Grouped-query-attention language models (``model.multi_latent_attention=false``) <-> the Hugging Face layout of
LLaMA / Qwen2 / Qwen2-VL decoders (``model.`` prefix: ``embed_tokens``, ``layers.N.self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``, ``norm``; ``lm_head``).

Megatron keeps q, k and v in one projection, grouped per query group: for each group its heads' queries, then
its key, then its value ([groups * (heads / groups + 2) * head_dim, hidden]); a dense SwiGLU fc1 is [gate; up].
"""

import torch

_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",  # fused into qkv (TE)
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",  # fused into fc1 (TE)
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_GLOBAL = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
           "decoder.final_layernorm.weight": "model.norm.weight", "output_layer.weight": "lm_head.weight"}


def split_qkv(fused: torch.Tensor, heads: int, groups: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """Megatron's grouped [q..., k, v] rows -> (q, k, v) rows in head order (weights or biases)."""
    per_group = fused.view(groups, heads // groups + 2, head_dim, *fused.shape[1:])
    q, k, v = per_group.split([heads // groups, 1, 1], dim=1)
    return tuple(t.reshape(-1, *fused.shape[1:]) for t in (q, k, v))


def gqa_to_hf(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """The language model's state dict (TP=1 names) -> LLaMA / Qwen2 names; ``config``: its TransformerConfig."""
    heads, groups = config.num_attention_heads, config.num_query_groups or config.num_attention_heads
    out = {}
    for name, tensor in state.items():
        if name.endswith("_extra_state"):
            continue
        if name in _GLOBAL:
            out[_GLOBAL[name]] = tensor
            continue
        layer, _, rest = name.removeprefix("decoder.layers.").partition(".")
        prefix = f"model.layers.{layer}."
        if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
            kind = rest.rsplit(".", 1)[1]
            for proj, part in zip("qkv", split_qkv(tensor, heads, groups, config.kv_channels)):
                out[f"{prefix}self_attn.{proj}_proj.{kind}"] = part
        elif rest == "mlp.linear_fc1.weight":
            out[f"{prefix}mlp.gate_proj.weight"], out[f"{prefix}mlp.up_proj.weight"] = tensor.chunk(2)
        elif rest in _LAYER:
            out[prefix + _LAYER[rest]] = tensor
        else:
            raise KeyError(f"no Hugging Face name for {name} (grouped-query attention decoders are dense here)")
    return out
