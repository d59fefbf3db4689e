"""The PixelLM language model <-> its Hugging Face class, chosen by attention kind: ``DeepseekV3ForCausalLM`` for
MLA (``hf/deepseek_v3.py``), ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` for dense grouped-query attention
(``hf/llama.py``). Export writes one; ``model.language_pretrained_path`` starts a model from one."""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from nemo_pixellm.hf import deepseek_v3, llama
from nemo_pixellm.hf.checkpoints import (module_state, read_hf_checkpoint, read_hf_config, refuse_misfit,
                                         save_hf_checkpoint)


@dataclass(frozen=True)
class Family:
    model_types: tuple[str, ...]  # config.json's model_type of the transformers classes this family reads
    hf_config: Callable  # (TransformerConfig, vocab size) -> the transformers config
    name_routes: Callable  # Megatron names -> {name: the HF names it holds}
    to_hf: Callable  # (Megatron state, config) -> HF state
    from_hf: Callable  # (HF state, Megatron names, config) -> Megatron state
    config_keys: dict[str, str]  # what the HF config.json must say (HF key -> the PixelLM key that sets it)


_SHARED_KEYS = {"hidden_size": "model.hidden_size", "num_hidden_layers": "model.num_layers",
                "num_attention_heads": "model.num_attention_heads", "intermediate_size": "model.ffn_hidden_size",
                "vocab_size": "the tokenizer's vocabulary (dataset.tokenizer_path)"}
MLA = Family(
    ("deepseek_v3",), deepseek_v3.deepseek_v3_config, deepseek_v3.name_routes,
    lambda state, config: deepseek_v3.megatron_to_hf(state),
    lambda hf_state, names, config: deepseek_v3.hf_to_megatron(hf_state, names),
    _SHARED_KEYS | {"q_lora_rank": "model.q_lora_rank", "kv_lora_rank": "model.kv_lora_rank",
                    "qk_nope_head_dim": "model.qk_head_dim", "qk_rope_head_dim": "model.qk_pos_emb_head_dim",
                    "v_head_dim": "model.v_head_dim", "n_routed_experts": "model.num_moe_experts",
                    "num_experts_per_tok": "model.moe_router_topk", "moe_intermediate_size": "model.moe_ffn_hidden_size"})
GQA = Family(("llama", "qwen2"), llama.llama_config, llama.name_routes, llama.gqa_to_hf, llama.hf_to_gqa,
             _SHARED_KEYS | {"num_key_value_heads": "model.num_query_groups"})


def family(config) -> Family:
    return MLA if config.multi_latent_attention else GQA


def write_hf_language_model(state: dict[str, torch.Tensor], config, vocab_size: int, directory) -> None:
    """The language model's state dict (one process) as its transformers class's checkpoint under ``directory``."""
    kind = family(config)
    hf_config = kind.hf_config(config, vocab_size)
    hf_config.architectures = [{"deepseek_v3": "DeepseekV3", "llama": "Llama", "qwen2": "Qwen2"}[hf_config.model_type]
                               + "ForCausalLM"]  # what AutoModelForCausalLM and serving engines read
    save_hf_checkpoint(kind.to_hf(state, config), hf_config, directory)


def load_hf_language_model(language_model: torch.nn.Module, directory, config) -> None:
    """Start ``language_model`` (a 1-process PixelLM language model) from a Hugging Face directory of its family
    (``model.language_pretrained_path``). A class, config or tensor that does not fit is refused by name."""
    directory, kind = Path(directory), family(config)
    theirs = read_hf_config(directory, "model.language_pretrained_path", "DeepseekV3 / Llama / Qwen2 ForCausalLM")
    if theirs.get("model_type") not in kind.model_types:
        attention = "multi-latent" if config.multi_latent_attention else "grouped-query"
        raise ValueError(f"model.language_pretrained_path={directory} holds a {theirs.get('model_type')} model; the "
                         f"configured model has {attention} attention, which starts from {' / '.join(kind.model_types)} "
                         "(choose the variant matching the checkpoint, or set model.multi_latent_attention)")
    for size in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"):
        if getattr(config, size) != 1:
            raise ValueError(f"model.language_pretrained_path imports in one process (model.{size}="
                             f"{getattr(config, size)}): import once with the parallel sizes at 1, save, then start "
                             "the parallel run from that checkpoint (stage.init_from), which Megatron reshards")
    refuse_misfit(directory, "language model", kind.hf_config(config, config.vocab_size).to_dict(), theirs,
                  kind.config_keys)
    params = module_state(language_model)
    hf_state = read_hf_checkpoint(directory)
    if config.share_embeddings_and_output_weights:
        hf_state.pop("lm_head.weight", None)  # tied: transformers may write the embedding twice
    routes = kind.name_routes(params)
    absent = sorted({n for names in routes.values() for n in names} - set(hf_state))
    if absent:
        raise KeyError(f"{directory} lacks {absent[:5]}{' ...' if len(absent) > 5 else ''}")
    state = kind.from_hf(hf_state, params, config)
    for name, tensor in state.items():
        if tensor.shape != params[name].shape:
            raise ValueError(f"{directory}: {' + '.join(routes[name])} gives {name} the shape "
                             f"{tuple(tensor.shape)}, the model's is {tuple(params[name].shape)}")
    language_model.load_state_dict({k: v.to(params[k].dtype) for k, v in state.items()}, strict=False)
