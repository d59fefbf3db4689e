"""PixelLMProvider: the Megatron-Bridge model provider for PixelLM.

An ``MLAModelProvider`` (so every DeepSeek-V3 field, parallel size and Bridge feature applies to the
language model unchanged) plus the vision tower and projector fields. ``provide()`` builds the language
model through Bridge with the plugin's decoder spec, then wraps it with the vision side.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.bridge.models.mla_provider import MLAModelProvider
from megatron.bridge.utils.instantiate_utils import register_allowed_target_prefix
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_pixellm import compat
from nemo_pixellm.hf.checkpoints import load_exported_projector
from nemo_pixellm.hf.language_model import load_hf_language_model
from nemo_pixellm.hf.siglip import load_siglip_tower
from nemo_pixellm.models.language_model import PixelGPTModel
from nemo_pixellm.models.pixellm import PixelLMModel
from nemo_pixellm.models.specs import decoder_block_spec

MODULE_NAMES = ("vision_model", "projector", "language_model")

# Checkpoints store this provider as their model config: let Bridge's loaders (load_megatron_model, ...)
# instantiate it back.
register_allowed_target_prefix("nemo_pixellm")


# What the vision tower and projector take from the language model's config: tensor parallelism (their linears
# are sharded like the LM's), precision, initialisation and the kernel switches; nothing else.
SHARED_WITH_VISION = (
    "tensor_model_parallel_size", "params_dtype", "bf16", "fp16", "pipeline_dtype", "autocast_dtype",
    "use_cpu_initialization", "perform_initialization", "init_method", "output_layer_init_method", "init_method_std",
    "gradient_accumulation_fusion", "bias_dropout_fusion", "masked_softmax_fusion", "persist_layer_norm",
    "apply_rope_fusion", "attention_softmax_in_fp32", "apply_query_key_layer_scaling", "deterministic_mode",
)
# FP8 (Transformer Engine): the language model's GEMMs; the tower and projector only with fp8_vision=true.
FP8_KEYS = ("fp8", "fp8_recipe", "fp8_margin", "fp8_interval", "fp8_amax_history_len", "fp8_amax_compute_algo",
            "fp8_wgrad", "fp8_param", "fp8_dot_product_attention", "fp8_multi_head_attention")


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")  # SigLIP's gelu_pytorch_tanh


@dataclass
class PixelLMProvider(MLAModelProvider):
    # DeepSeek-V3 language-model defaults (variants set sizes; see conf/variant/).
    multi_latent_attention: bool = True  # GPTModelProvider's False would otherwise win in the field order
    position_embedding_type: str = "rope"
    normalization: str = "RMSNorm"
    layernorm_epsilon: float = 1e-6  # DeepSeek-V3's RMSNorm eps (Megatron's default is 1e-5)
    gated_linear_unit: bool = True
    activation_func: object = torch.nn.functional.silu
    add_bias_linear: bool = False
    qk_layernorm: bool = True  # MLA's q / kv low-rank norms
    share_embeddings_and_output_weights: bool = False
    hidden_dropout: float = 0.0  # DeepSeek-V3 trains without dropout
    attention_dropout: float = 0.0
    moe_router_score_function: str = "sigmoid"
    moe_router_enable_expert_bias: bool = True
    moe_router_load_balancing_type: str = "none"  # aux-loss-free; "seq_aux_loss" adds the sequence-wise loss
    moe_router_pre_softmax: bool = True
    moe_token_dispatcher_type: str = "alltoall"
    moe_grouped_gemm: bool = False

    # Backend: None = Transformer Engine when importable, else pure PyTorch.
    use_te: bool | None = None
    transformer_layer_spec: object = decoder_block_spec

    # Vision tower (SigLIP-style ViT).
    vision_hidden_size: int = 1152
    vision_num_layers: int = 27
    vision_num_attention_heads: int = 16
    vision_ffn_hidden_size: int = 4304
    vision_patch_size: int = 14
    vision_image_size: int = 384  # resolution of the learned position table; other sizes interpolate
    vision_layernorm_epsilon: float = 1e-6
    vision_pretrained_path: str | None = None  # a Hugging Face SiglipVisionModel directory to start the tower from
    language_pretrained_path: str | None = None  # a Hugging Face directory to start the LM from (hf/language_model.py)
    pretrained_export_path: str | None = None  # a python -m nemo_pixellm.export directory: the whole VLM starts from it

    # Projector: pixel-unshuffle factor and MLP width (None = LM hidden size).
    projector_downsample: int = 2
    projector_ffn_hidden_size: int | None = None
    image_position_code: bool = False  # a fixed 2D code of each image token's place (models/projector.py)

    # M-RoPE frequency pairs alternate t h w t h w .. (Qwen3-VL) instead of mrope_section's chunks (Qwen2-VL)
    mrope_interleaved: bool = False

    # LLaMA 4's chunked local attention on the RoPE layers (NoPE layers: Megatron's no_rope_freq) attend only
    # within chunks of this many tokens; Megatron has no chunked attention (local backend, models/core_attention.py)
    attention_chunk_size: int | None = None

    image_token_id: int = -1  # set from the tokenizer
    trainable_modules: list[str] | None = None  # None = everything trains; else the named children that do
    freeze_moe_router: bool = False  # router weights and expert bias fixed (stage 4: NeMo-RL's RL practice)
    fp8_vision: bool = False  # model.fp8 reaches the ViT and projector GEMMs too (default: they stay in bf16)

    def _module_config(self, **fields) -> TransformerConfig:
        """A TransformerConfig for the vision tower or projector: its own sizes and layer choices (``fields``),
        and from this provider only the settings the whole model shares (SHARED_WITH_VISION; FP8_KEYS with
        fp8_vision)."""
        shared = SHARED_WITH_VISION + (FP8_KEYS if self.fp8_vision else ())
        config = TransformerConfig(
            hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=True, add_qkv_bias=True,
            gated_linear_unit=False, bias_activation_fusion=False,
            **{name: getattr(self, name) for name in shared}, **fields,
        )
        config.use_te = self.use_te
        return config

    def vision_config(self) -> TransformerConfig:
        return self._module_config(
            num_layers=self.vision_num_layers, hidden_size=self.vision_hidden_size,
            num_attention_heads=self.vision_num_attention_heads, ffn_hidden_size=self.vision_ffn_hidden_size,
            normalization="LayerNorm", layernorm_epsilon=self.vision_layernorm_epsilon, activation_func=gelu_tanh,
        )

    def projector_config(self) -> TransformerConfig:
        return self._module_config(
            num_layers=1, hidden_size=self.hidden_size, num_attention_heads=self.num_attention_heads,
            ffn_hidden_size=self.projector_ffn_hidden_size or self.hidden_size,
            normalization=self.normalization, layernorm_epsilon=self.layernorm_epsilon,
            activation_func=torch.nn.functional.gelu,
        )

    def disable_cuda_fusions(self) -> None:
        """Without CUDA: initialise on CPU (same weights at every TP size) and use unfused kernels."""
        self.use_cpu_initialization = True
        self.gradient_accumulation_fusion = self.bias_activation_fusion = self.bias_dropout_fusion = False
        self.masked_softmax_fusion = self.apply_rope_fusion = self.persist_layer_norm = False
        self.cross_entropy_loss_fusion = False

    def provide_distributed_model(self, *args, use_cpu_initialization: bool | None = None, **kwargs):
        # Bridge resets use_cpu_initialization to this argument (False); keep the configured value, so
        # that CPU-initialised weights are the same whatever the tensor-parallel size.
        if not use_cpu_initialization:
            use_cpu_initialization = self.use_cpu_initialization
        if use_cpu_initialization and torch.cuda.is_available():
            # Bridge leaves CPU-initialised modules on the CPU (Megatron-LM moves them to the GPU before
            # wrapping); move them after any other pre-wrap hook, so DDP's buffers and the data meet on the GPU.
            hook = kwargs.pop("pre_wrap_hook", None) or self.pre_wrap_hook

            def then_to_gpu(model):
                model = (hook(model) or model) if hook else model
                return [module.cuda(torch.cuda.current_device()) for module in model]

            kwargs["pre_wrap_hook"] = then_to_gpu
        return super().provide_distributed_model(*args, use_cpu_initialization=use_cpu_initialization, **kwargs)

    def yarn_active(self) -> bool:
        """DeepSeek-V3's rule (reference.md section 2): YaRN only when the model is built for positions
        beyond the original context; within it, plain RoPE."""
        return self.rope_type == "yarn" and self.seq_length > self.original_max_position_embeddings

    def _load_pretrained(self, model: PixelLMModel) -> None:
        if self.pretrained_export_path:  # the whole VLM: its three parts, each checked against the model
            export = Path(self.pretrained_export_path)
            self.vision_pretrained_path = self.vision_pretrained_path or str(export / "vision_tower")
            self.language_pretrained_path = self.language_pretrained_path or str(export / "language_model")
            if model.projector is not None:
                load_exported_projector(model.projector, export, self.image_token_id)
        if self.vision_pretrained_path and model.vision_model is not None:
            load_siglip_tower(model.vision_model, self.vision_pretrained_path)
        if self.language_pretrained_path:
            load_hf_language_model(model.language_model, self.language_pretrained_path, self)

    def provide(self, pre_process=None, post_process=None, vp_stage=None) -> PixelLMModel:
        if self.rope_type == "yarn" and not self.yarn_active():
            self.rope_type = "rope"
            self.mscale_all_dim = 0.0  # Megatron's MLA scales softmax by YaRN's mscale whatever the rope type
        if self.image_token_id < 0:
            raise ValueError("PixelLMProvider.image_token_id is not set (it comes from the tokenizer)")
        with compat.gpt_model_class(PixelGPTModel):  # Bridge's provide, building MLA's explicit-position GPTModel
            language_model = super().provide(pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)
        model = PixelLMModel(
            self,
            language_model,
            vision_config=self.vision_config(),
            projector_config=self.projector_config(),
            image_token_id=self.image_token_id,
            patch_size=self.vision_patch_size,
            base_image_size=self.vision_image_size,
            downsample=self.projector_downsample,
            image_position_code=self.image_position_code,
            pre_process=language_model.pre_process,
            post_process=language_model.post_process,
            pg_collection=compat.process_groups(self),
        )
        if self.perform_initialization:  # off when a checkpoint's weights follow (Bridge's loaders): the
            self._load_pretrained(model)  # pretrained parts were only where training started, and may have moved
        apply_trainable(model, self.trainable_modules)
        if self.freeze_moe_router:
            freeze_routers(model)
        return model


def apply_trainable(model: torch.nn.Module, trainable_modules: list[str] | None) -> None:
    """Freeze every top-level module not named in ``trainable_modules`` (None = all train)."""
    if trainable_modules is None:
        return
    unknown = set(trainable_modules) - set(MODULE_NAMES)
    if unknown:
        raise ValueError(f"unknown trainable module(s) {sorted(unknown)}; choose from {list(MODULE_NAMES)}")
    for name in MODULE_NAMES:
        module = getattr(model, name, None)
        if module is not None:
            module.requires_grad_(name in trainable_modules)
            # The router's expert bias is a buffer updated outside the optimizer: freeze it with its module.
            for sub in module.modules():
                if hasattr(sub, "expert_bias"):
                    sub.frozen_expert_bias = name not in trainable_modules


def freeze_routers(model: torch.nn.Module) -> None:
    """Fix every MoE router: its weight leaves the optimizer, its expert bias stops updating (bias updates and
    route changes make RL's log-probs drift between rollout and training)."""
    for module in model.modules():
        if hasattr(module, "expert_bias"):
            module.weight.requires_grad_(False)
            module.frozen_expert_bias = True
