"""Grouped-query-attention language models (``model.multi_latent_attention=false``) <-> the Hugging Face layout of
LLaMA / Qwen2 / Qwen2-VL decoders (``model.`` prefix: ``embed_tokens``, ``layers.N.self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``, ``norm``; ``lm_head``).

Megatron keeps q, k and v in one projection, grouped per query group: for each group its heads' queries, then
its key, then its value ([groups * (heads / groups + 2) * head_dim, hidden]); a dense SwiGLU fc1 is [gate; up].
Exported as ``LlamaForCausalLM``, or ``Qwen2ForCausalLM`` where q / k / v carry biases (Qwen2's layout).
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


def name_routes(megatron_names) -> dict[str, list[str]]:
    """Megatron name -> the HF names it holds: q, k, v for the fused projection, gate, up for fc1, else one."""
    routes = {}
    for name in megatron_names:
        if name.endswith("_extra_state"):
            continue
        if name in _GLOBAL:
            routes[name] = [_GLOBAL[name]]
            continue
        layer, _, rest = name.removeprefix("decoder.layers.").partition(".")
        prefix = f"model.layers.{layer}."
        if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
            routes[name] = [f"{prefix}self_attn.{proj}_proj.{rest.rsplit('.', 1)[1]}" for proj in "qkv"]
        elif rest == "mlp.linear_fc1.weight":
            routes[name] = [f"{prefix}mlp.gate_proj.weight", f"{prefix}mlp.up_proj.weight"]
        elif rest in _LAYER:
            routes[name] = [prefix + _LAYER[rest]]
        else:
            raise KeyError(f"no Hugging Face name for {name} (grouped-query attention decoders are dense here)")
    return routes


def _grouped(config) -> tuple[int, int, int]:
    return config.num_attention_heads, config.num_query_groups or config.num_attention_heads, config.kv_channels


def split_qkv(fused: torch.Tensor, heads: int, groups: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """Megatron's grouped [q..., k, v] rows -> (q, k, v) rows in head order (weights or biases)."""
    per_group = fused.view(groups, heads // groups + 2, head_dim, *fused.shape[1:])
    q, k, v = per_group.split([heads // groups, 1, 1], dim=1)
    return tuple(t.reshape(-1, *fused.shape[1:]) for t in (q, k, v))


def join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    """(q, k, v) rows in head order -> Megatron's grouped [q..., k, v] rows (the inverse of split_qkv)."""
    rest = q.shape[1:]
    parts = [q.view(groups, heads // groups, head_dim, *rest), k.view(groups, 1, head_dim, *rest),
             v.view(groups, 1, head_dim, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def gqa_to_hf(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """The language model's state dict (TP=1 names) -> LLaMA / Qwen2 names; ``config``: its TransformerConfig."""
    out = {}
    for name, hf_names in name_routes(state).items():
        tensor = state[name]
        parts = split_qkv(tensor, *_grouped(config)) if len(hf_names) == 3 else tensor.chunk(len(hf_names))
        out.update(zip(hf_names, parts))
    return out


def hf_to_gqa(hf_state: dict[str, torch.Tensor], megatron_names, config) -> dict[str, torch.Tensor]:
    """LLaMA / Qwen2 tensors -> the language model's state dict for the given parameter names."""
    out = {}
    for name, hf_names in name_routes(megatron_names).items():
        parts = [hf_state[n] for n in hf_names]
        out[name] = join_qkv(*parts, *_grouped(config)) if len(parts) == 3 else torch.cat(parts)
    return out


def llama_config(config, vocab_size: int):
    """The LlamaConfig (Qwen2Config with q / k / v biases) of a dense grouped-query-attention PixelLM language
    model. M-RoPE is not representable there; with text positions it is exactly the 1D RoPE written here."""
    from transformers import LlamaConfig, Qwen2Config

    refused = {"model.num_moe_experts": "transformers has no class with this MoE (LLaMA 4 scales expert inputs by "
                                        "unnormalised sigmoid scores): export dense grouped-query models",
               "model.qk_layernorm": "LLaMA / Qwen2 have no query / key norms",
               "model.rotary_interleaved": "LLaMA / Qwen2 rotate half-split pairs",
               "model.add_bias_linear": "LLaMA / Qwen2 projections have no biases besides Qwen2's q / k / v"}
    for key, why in refused.items():
        if getattr(config, key.removeprefix("model.")):
            raise ValueError(f"{key}={getattr(config, key.removeprefix('model.'))} cannot be exported to Hugging Face: "
                             f"{why}")
    if getattr(config, "rope_type", None) == "yarn":
        raise ValueError("YaRN-scaled RoPE is exported for MLA models (DeepseekV3) only")
    common = dict(vocab_size=vocab_size, hidden_size=config.hidden_size, intermediate_size=config.ffn_hidden_size,
                  num_hidden_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
                  num_key_value_heads=_grouped(config)[1],
                  max_position_embeddings=config.seq_length, rms_norm_eps=config.layernorm_epsilon,
                  rope_parameters={"rope_type": "default", "rope_theta": float(config.rotary_base)},
                  tie_word_embeddings=config.share_embeddings_and_output_weights)
    if config.add_qkv_bias:
        if config.kv_channels * config.num_attention_heads != config.hidden_size:
            raise ValueError("Qwen2 derives head_dim from hidden_size / heads: model.kv_channels must equal it")
        return Qwen2Config(**common)
    return LlamaConfig(**common, head_dim=config.kv_channels, attention_bias=False, mlp_bias=False)
