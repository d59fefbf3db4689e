"""Megatron-Core layer specs for PixelLM: which module fills which slot, for both backends.

- The decoder: DeepSeek-V3 layers (MLA attention + MoE with a shared expert, optional dense first layers
  through ``moe_layer_freq``), built from the backend's spec provider (``models/backend.py``) the way
  Megatron's GPT layer builders do, with PixelLM's MLA (explicit / M-RoPE positions, ``mla.py``).
- The vision tower: pre-norm ViT layers (LayerNorm, bidirectional attention, GELU MLP, biases).
"""

from dataclasses import replace
from functools import partial

from megatron.core.models.backends import BackendSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType, LayerType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.multi_latent_attention import MLASelfAttentionSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from nemo_pixellm.models.backend import spec_provider
from nemo_pixellm.models.gqa import PixelSelfAttention
from nemo_pixellm.models.mla import PixelMLASelfAttention
from nemo_pixellm.models.moe_layer import PixelMoELayer
from nemo_pixellm.models.router import PixelTopKRouter


def decoder_layer_submodules(backend: BackendSpecProvider, config, moe: bool) -> TransformerLayerSubmodules:
    """One decoder layer: MLA (or grouped-query attention with ``multi_latent_attention=false``), then the MoE
    layer (``moe``) or a dense MLP.

    Where the backend fuses a norm into the linear after it (TE: q/kv up projections, a dense fc1), that linear
    carries the norm; where it does not, the norm is its own module and its checkpoint key is the fused
    one's (``<linear>.layer_norm_weight``), so one distributed checkpoint loads on either backend."""
    fused = backend.fuse_layernorm_and_linear()
    qk_norm = config.qk_layernorm and not fused
    up_proj = backend.column_parallel_layer_norm_linear() if config.qk_layernorm and fused else backend.column_parallel_linear()
    keys_map = {}
    if qk_norm:
        keys_map["self_attention.q_layernorm."] = "self_attention.linear_q_up_proj.layer_norm_"
        keys_map["self_attention.kv_layernorm."] = "self_attention.linear_kv_up_proj.layer_norm_"
    if not moe and not fused:  # the fused dense fc1 carries pre_mlp_layernorm
        keys_map["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    mlp = dict(
        self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=backend.layer_norm(rms_norm=True, has_residual=True) if moe or not fused else IdentityOp,
        mlp=moe_spec(backend, config) if moe and config.num_moe_experts else get_mlp_module_spec_for_backend(
            backend, use_te_activation_func=config.use_te_activation_func),
        mlp_bda=get_bias_dropout_add,
    )
    if not config.multi_latent_attention:
        return gqa_layer_submodules(backend, config, fused, keys_map, mlp)
    return TransformerLayerSubmodules(
        input_layernorm=backend.layer_norm(rms_norm=True, has_residual=True),
        self_attention=ModuleSpec(
            module=PixelMLASelfAttention,
            params={"attn_mask_type": AttnMaskType.causal},
            submodules=MLASelfAttentionSubmodules(
                linear_q_proj=backend.column_parallel_linear(),
                linear_q_down_proj=backend.linear(),  # replicated over TP (mla.py)
                linear_q_up_proj=up_proj,
                linear_kv_down_proj=backend.linear(),
                linear_kv_up_proj=up_proj,
                core_attention=backend.core_attention(),
                linear_proj=backend.row_parallel_linear(),
                q_layernorm=backend.layer_norm(rms_norm=True) if qk_norm else IdentityOp,
                kv_layernorm=backend.layer_norm(rms_norm=True) if qk_norm else IdentityOp,
            ),
        ),
        sharded_state_dict_keys_map=keys_map,
        **mlp,
    )


def moe_spec(backend: BackendSpecProvider, config):
    """Megatron's MoE layer spec for the backend, with the router that jitters in training only (``router.py``)
    and the layer's dispatcher-free inference path (``moe_layer.py``)."""
    megatron = get_mlp_module_spec_for_backend(backend, num_experts=config.num_moe_experts,
                                               moe_grouped_gemm=config.moe_grouped_gemm,
                                               use_te_activation_func=config.use_te_activation_func)
    submodules = replace(megatron.keywords["submodules"], router=PixelTopKRouter)
    return partial(PixelMoELayer, *megatron.args, **{**megatron.keywords, "submodules": submodules})


def gqa_layer_submodules(backend: BackendSpecProvider, config, fused: bool, keys_map: dict,
                         mlp: dict) -> TransformerLayerSubmodules:
    """Grouped-query attention (``gqa.py``) in Megatron's GPT layer layout: one qkv projection, which carries the
    input norm where the backend fuses it (TE), per-head q/k norms with ``qk_layernorm``."""
    qk_norm = backend.layer_norm(for_qk=True) if config.qk_layernorm else IdentityOp  # as Megatron's GPT spec
    if not fused:
        keys_map["input_layernorm."] = "self_attention.linear_qkv.layer_norm_"
    return TransformerLayerSubmodules(
        input_layernorm=IdentityOp if fused else backend.layer_norm(rms_norm=True, has_residual=True),
        self_attention=ModuleSpec(
            module=PixelSelfAttention,
            params={"attn_mask_type": AttnMaskType.causal},
            submodules=SelfAttentionSubmodules(
                linear_qkv=backend.column_parallel_layer_norm_linear() if fused else backend.column_parallel_linear(),
                core_attention=backend.core_attention(),
                linear_proj=backend.row_parallel_linear(),
                q_layernorm=qk_norm,
                k_layernorm=qk_norm,
            ),
        ),
        sharded_state_dict_keys_map=keys_map,
        **mlp,
    )


def moe_layer_pattern(config) -> list[bool]:
    """Which layers are MoE layers: ``moe_layer_freq`` as Megatron reads it (every N-th layer, or a 0/1 list)."""
    freq = config.moe_layer_freq if config.num_moe_experts else [0] * config.num_layers
    pattern = [i % freq == 0 for i in range(config.num_layers)] if isinstance(freq, int) else [bool(f) for f in freq]
    if len(pattern) != config.num_layers:
        raise ValueError(f"model.moe_layer_freq has {len(pattern)} entries for {config.num_layers} layers")
    return pattern


def decoder_block_spec(config, vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """This pipeline stage's decoder layers (Megatron's offset / layout rules) and the final norm."""
    backend = spec_provider(getattr(config, "use_te", None))
    layers = {moe: ModuleSpec(module=TransformerLayer, submodules=decoder_layer_submodules(backend, config, moe))
              for moe in (False, True)}
    specs = [layers[moe] for moe in moe_layer_pattern(config)]
    if config.pipeline_model_parallel_layout is not None:
        ids = config.pipeline_model_parallel_layout.get_layer_id_list(layer_type=LayerType.decoder, vp_stage=vp_stage)
        specs = [specs[i] for i in ids]
    else:
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
        specs = specs[offset: offset + get_num_layers_to_build(config, vp_stage=vp_stage)]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=backend.layer_norm(rms_norm=True))


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
