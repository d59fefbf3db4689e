"""Parameter names between PixelLM's language model (Megatron GPTModel with MLA + MoE) and Hugging Face
``DeepseekV3ForCausalLM``. One table serves both directions (HF import for parity tests and HF export).

Megatron fuses SwiGLU's gate and up projections into one ``linear_fc1`` ([gate; up] along dim 0);
Hugging Face keeps ``gate_proj`` and ``up_proj``. With Transformer Engine, norms that precede a linear
are fused into it (``*.layer_norm_weight``): both spellings are listed and whichever exists is used.
"""

import re

import torch

from nemo_pixellm.hf.checkpoints import save_hf_checkpoint

# (Megatron names, HF name). {l} = layer, {e} = expert. The first Megatron name present is used.
_LAYER_TABLE = [
    (("input_layernorm.weight", "self_attention.linear_q_down_proj.layer_norm_weight"), "input_layernorm.weight"),
    (("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"), "post_attention_layernorm.weight"),
    (("self_attention.linear_q_down_proj.weight",), "self_attn.q_a_proj.weight"),
    (("self_attention.q_layernorm.weight", "self_attention.linear_q_up_proj.layer_norm_weight"), "self_attn.q_a_layernorm.weight"),
    (("self_attention.linear_q_up_proj.weight",), "self_attn.q_b_proj.weight"),
    (("self_attention.linear_q_proj.weight",), "self_attn.q_proj.weight"),
    (("self_attention.linear_kv_down_proj.weight",), "self_attn.kv_a_proj_with_mqa.weight"),
    (("self_attention.kv_layernorm.weight", "self_attention.linear_kv_up_proj.layer_norm_weight"), "self_attn.kv_a_layernorm.weight"),
    (("self_attention.linear_kv_up_proj.weight",), "self_attn.kv_b_proj.weight"),
    (("self_attention.linear_proj.weight",), "self_attn.o_proj.weight"),
    (("mlp.linear_fc2.weight",), "mlp.down_proj.weight"),
    (("mlp.router.weight",), "mlp.gate.weight"),
    (("mlp.router.expert_bias",), "mlp.gate.e_score_correction_bias"),
    (("mlp.shared_experts.linear_fc2.weight",), "mlp.shared_experts.down_proj.weight"),
    (("mlp.experts.local_experts.{e}.linear_fc2.weight", "mlp.experts.linear_fc2.weight{e}"), "mlp.experts.{e}.down_proj.weight"),
]
# Gated (SwiGLU) fc1: Megatron [gate; up] <-> HF gate_proj, up_proj.
_GATED_TABLE = [
    (("mlp.linear_fc1.weight",), "mlp.{}_proj.weight"),
    (("mlp.shared_experts.linear_fc1.weight",), "mlp.shared_experts.{}_proj.weight"),
    (("mlp.experts.local_experts.{e}.linear_fc1.weight", "mlp.experts.linear_fc1.weight{e}"), "mlp.experts.{e}.{}_proj.weight"),
]
_GLOBAL_TABLE = [
    ("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
    ("decoder.final_layernorm.weight", "model.norm.weight"),
    ("output_layer.weight", "lm_head.weight"),
]


def _layer_and_expert_indices(names) -> tuple[set[int], set[int]]:
    layers, experts = set(), set()
    for name in names:
        if m := re.match(r"decoder\.layers\.(\d+)\.", name):
            layers.add(int(m.group(1)))
        if m := re.search(r"local_experts\.(\d+)\.|linear_fc[12]\.weight(\d+)$", name):
            experts.add(int(m.group(1) or m.group(2)))
    return layers, experts


def _pick(candidates, layer: int, expert: int | None, present) -> str | None:
    for candidate in candidates:
        name = f"decoder.layers.{layer}." + candidate.replace("{e}", str(expert))
        if name in present:
            return name
    return None


def name_routes(megatron_names) -> dict[str, list[str]]:
    """Megatron name -> the HF names it holds: one, or two for a gated fc1 (gate, then up)."""
    present = {n for n in megatron_names if not n.endswith("._extra_state")}
    routes = {m: [hf] for m, hf in _GLOBAL_TABLE if m in present}
    layers, experts = _layer_and_expert_indices(present)
    for layer in sorted(layers):
        prefix = f"model.layers.{layer}."
        for table, gated in ((_LAYER_TABLE, False), (_GATED_TABLE, True)):
            for candidates, hf in table:
                for expert in (sorted(experts) if "{e}" in hf else [None]):
                    if name := _pick(candidates, layer, expert, present):
                        hf_name = prefix + hf.replace("{e}", str(expert))
                        routes[name] = [hf_name.format("gate"), hf_name.format("up")] if gated else [hf_name]
    unmapped = sorted(present - set(routes))
    if unmapped:
        raise KeyError(f"no Hugging Face name for {unmapped[:5]}{' ...' if len(unmapped) > 5 else ''}")
    return routes


def megatron_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Megatron language-model state dict (unsharded, TP=1 names) -> DeepseekV3ForCausalLM state dict."""
    out = {}
    for name, hf_names in name_routes(state_dict).items():
        out.update(zip(hf_names, torch.chunk(state_dict[name], len(hf_names), dim=0)))
    return out


def hf_to_megatron(hf_state_dict: dict[str, torch.Tensor], megatron_names) -> dict[str, torch.Tensor]:
    """DeepseekV3ForCausalLM state dict -> Megatron language-model state dict for the given parameter names."""
    return {
        name: torch.cat([hf_state_dict[n] for n in hf_names], dim=0)
        for name, hf_names in name_routes(megatron_names).items()
    }


def write_hf_checkpoint(language_model_state: dict[str, torch.Tensor], hf_config, directory) -> None:
    """Export the language model as a DeepseekV3ForCausalLM checkpoint (config.json + model.safetensors)."""
    save_hf_checkpoint(megatron_to_hf(language_model_state), hf_config, directory)


def moe_pattern(config) -> list[int]:
    """1 where a decoder layer is MoE (Megatron's moe_layer_freq: an int N means every N-th layer)."""
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [int(i % freq == 0) for i in range(config.num_layers)]
    return [int(x) for x in freq]


def deepseek_v3_config(config, vocab_size: int):
    """The DeepseekV3Config of a PixelLM language model (a PixelLMProvider / its TransformerConfig).

    M-RoPE is not representable there; with text positions (t = h = w) it is exactly the 1D RoPE written here.
    """
    from transformers import DeepseekV3Config

    pattern = moe_pattern(config)
    first_k_dense = pattern.index(1) if 1 in pattern else len(pattern)
    if any(x == 0 for x in pattern[first_k_dense:]):
        raise ValueError(f"moe_layer_freq={config.moe_layer_freq}: DeepseekV3 allows dense layers only at the start "
                         "(first_k_dense_replace)")
    if config.moe_shared_expert_intermediate_size % config.moe_ffn_hidden_size:
        raise ValueError(f"moe_shared_expert_intermediate_size={config.moe_shared_expert_intermediate_size} is not a "
                         f"multiple of moe_ffn_hidden_size={config.moe_ffn_hidden_size}: DeepseekV3 counts shared experts")
    if config.layernorm_epsilon != 1e-6:
        raise ValueError(f"layernorm_epsilon={config.layernorm_epsilon}: DeepseekV3's q/kv low-rank norms use 1e-6 "
                         "whatever rms_norm_eps says, so this model cannot be exported exactly")
    rope = {"rope_type": "default", "rope_theta": float(config.rotary_base)}
    if config.rope_type == "yarn" and config.seq_length > config.original_max_position_embeddings:
        rope = {"rope_type": "yarn", "rope_theta": float(config.rotary_base), "factor": float(config.rotary_scaling_factor),
                "original_max_position_embeddings": config.original_max_position_embeddings,
                "beta_fast": float(config.beta_fast), "beta_slow": float(config.beta_slow),
                "mscale": float(config.mscale), "mscale_all_dim": float(config.mscale_all_dim)}
    return DeepseekV3Config(
        vocab_size=vocab_size, hidden_size=config.hidden_size, intermediate_size=config.ffn_hidden_size,
        moe_intermediate_size=config.moe_ffn_hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_attention_heads,
        n_shared_experts=config.moe_shared_expert_intermediate_size // config.moe_ffn_hidden_size,
        n_routed_experts=config.num_moe_experts, num_experts_per_tok=config.moe_router_topk,
        routed_scaling_factor=float(config.moe_router_topk_scaling_factor or 1.0),
        n_group=config.moe_router_num_groups or 1, topk_group=config.moe_router_group_topk or 1,
        first_k_dense_replace=first_k_dense, norm_topk_prob=True, kv_lora_rank=config.kv_lora_rank,
        q_lora_rank=config.q_lora_rank, qk_rope_head_dim=config.qk_pos_emb_head_dim, qk_nope_head_dim=config.qk_head_dim,
        v_head_dim=config.v_head_dim, max_position_embeddings=config.seq_length, rms_norm_eps=config.layernorm_epsilon,
        rope_parameters=rope, tie_word_embeddings=config.share_embeddings_and_output_weights,
    )
