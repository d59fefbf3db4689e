"""Megatron-Core layer specs for PixelLM: which module fills which slot, for both backends.

- The decoder: DeepSeek-V3 layers (MLA attention + MoE with a shared expert, optional dense first
  layers through ``moe_layer_freq``), from Megatron's GPT block spec with the backend's core attention
  (and, locally, the routed experts as grouped GEMMs: ``grouped_experts.py``).
- The vision tower: pre-norm ViT layers (LayerNorm, bidirectional attention, GELU MLP, biases).
"""

import functools

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from nemo_pixellm.models.backend import resolve_use_te, spec_provider
from nemo_pixellm.models.grouped_experts import GroupedLocalExperts
from nemo_pixellm.models.mla import PixelMLASelfAttention, use_local_mla_modules


def decoder_block_spec(config, vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """The language decoder: Megatron's GPT block spec (MLA + MoE) on the chosen backend."""
    use_te = resolve_use_te(getattr(config, "use_te", None))
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization="RMSNorm", vp_stage=vp_stage)
    for layer in block.layer_specs:
        if getattr(config, "multi_latent_attention", False):
            layer.submodules.self_attention.module = PixelMLASelfAttention  # explicit / M-RoPE positions
    if not use_te:
        backend = spec_provider(False)
        norm = backend.layer_norm()
        block.layer_norm = norm  # the block's final norm
        for layer in block.layer_specs:
            sub = layer.submodules
            sub.self_attention.submodules.core_attention = backend.core_attention()
            sub.input_layernorm = sub.pre_mlp_layernorm = norm
            attention = sub.self_attention.submodules
            if hasattr(attention, "linear_kv_down_proj"):
                use_local_mla_modules(attention)
            for slot in ("q_layernorm", "kv_layernorm", "k_layernorm"):
                if hasattr(attention, slot) and getattr(attention, slot) is not IdentityOp:
                    setattr(attention, slot, norm)
            layer.submodules.sharded_state_dict_keys_map = te_checkpoint_names(sub)
            moe = getattr(sub.mlp, "keywords", {}).get("submodules")  # partial(MoELayer, submodules=...)
            if getattr(getattr(moe, "experts", None), "func", None) is SequentialMLP:
                moe.experts = functools.partial(GroupedLocalExperts, *moe.experts.args, **moe.experts.keywords)
    return block


def te_checkpoint_names(layer: TransformerLayerSubmodules) -> dict[str, str]:
    """Where Transformer Engine's spec fuses a norm into the linear after it, the local layer's distributed
    checkpoint stores that norm under TE's name (``<linear>.layer_norm_weight``), so one checkpoint loads on
    either backend. Megatron's local GPT spec does this for its own fused norms, not for MLA's or the dense
    MLP's; the fusions mirrored are those of get_gpt_layer_with_transformer_engine_submodules."""
    names = {}
    attention = layer.self_attention.submodules
    if getattr(attention, "q_layernorm", IdentityOp) is not IdentityOp and hasattr(attention, "linear_q_up_proj"):
        names["self_attention.q_layernorm."] = "self_attention.linear_q_up_proj.layer_norm_"
    if getattr(attention, "kv_layernorm", IdentityOp) is not IdentityOp:
        names["self_attention.kv_layernorm."] = "self_attention.linear_kv_up_proj.layer_norm_"
    mlp = getattr(layer.mlp, "func", None) or getattr(layer.mlp, "module", layer.mlp)  # partial or ModuleSpec
    if not (isinstance(mlp, type) and issubclass(mlp, MoELayer)):  # dense: TE fuses pre_mlp_layernorm into fc1
        names["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    return names


def vision_layer_spec(use_te: bool | None = None) -> ModuleSpec:
    """One SigLIP-style ViT layer: pre-norm, bidirectional self-attention, GELU MLP."""
    backend = spec_provider(use_te)
    norm = backend.layer_norm(rms_norm=False, for_qk=False)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=backend.column_parallel_linear(),
                    core_attention=backend.core_attention(),
                    linear_proj=backend.row_parallel_linear(),
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=backend.column_parallel_linear(), linear_fc2=backend.row_parallel_linear()
                ),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def projector_mlp_submodules(use_te: bool | None = None) -> MLPSubmodules:
    backend = spec_provider(use_te)
    return MLPSubmodules(linear_fc1=backend.column_parallel_linear(), linear_fc2=backend.row_parallel_linear())
