"""Hugging Face ``SiglipVisionModel`` (or a full ``SiglipModel``'s vision half) -> PixelLM's vision tower.

Cluster runs start the tower from pretrained SigLIP (``model.vision_pretrained_path=<dir>``). The tower
has SigLIP's structure (patch conv, learned position table, pre-norm layers, GELU-tanh MLP, post norm);
what differs is naming and Megatron's fused QKV weight, whose rows are grouped per head: [q_h; k_h; v_h].
SigLIP's attention-pooling head is not used (DeepSeek-VL2 takes the patch features).
"""

from pathlib import Path

import torch
from megatron.core import parallel_state

from nemo_pixellm.hf.checkpoints import (module_tensors, read_hf_checkpoint, read_hf_config, refuse_misfit,
                                         save_hf_checkpoint)

_GLOBAL_TABLE = [
    ("patch_embedding.weight", "embeddings.patch_embedding.weight"),
    ("patch_embedding.bias", "embeddings.patch_embedding.bias"),
    ("position_embedding", "embeddings.position_embedding.weight"),
    ("encoder.final_layernorm.weight", "post_layernorm.weight"),
    ("encoder.final_layernorm.bias", "post_layernorm.bias"),
]
# What a SigLIP config.json must say for this tower (HF key -> the PixelLM key that sets it).
_CONFIG_KEYS = {"hidden_size": "model.vision_hidden_size", "num_hidden_layers": "model.vision_num_layers",
                "num_attention_heads": "model.vision_num_attention_heads",
                "intermediate_size": "model.vision_ffn_hidden_size", "patch_size": "dataset.patch_size",
                "image_size": "model.vision_image_size"}
_LAYER_TABLE = [
    ("input_layernorm", "layer_norm1"),
    ("self_attention.linear_proj", "self_attn.out_proj"),
    ("pre_mlp_layernorm", "layer_norm2"),
    ("mlp.linear_fc1", "mlp.fc1"),
    ("mlp.linear_fc2", "mlp.fc2"),
]


def _strip_prefix(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys relative to the vision transformer, whatever model it was saved in ('vision_model.', ...)."""
    anchor = "embeddings.patch_embedding.weight"
    prefixes = [k[: -len(anchor)] for k in hf_state if k.endswith(anchor)]
    if len(prefixes) != 1:
        raise KeyError(f"expected one SigLIP vision tower in the checkpoint, found {len(prefixes)} "
                       f"('{anchor}' keys: {prefixes})")
    return {k[len(prefixes[0]):]: v for k, v in hf_state.items() if k.startswith(prefixes[0])}


def siglip_to_tower(hf_state: dict[str, torch.Tensor], num_layers: int, num_heads: int) -> dict[str, torch.Tensor]:
    """SigLIP vision state dict -> VisionTower state dict (unsharded names, TP=1)."""
    hf = _strip_prefix(hf_state)
    out = {ours: hf[theirs] for ours, theirs in _GLOBAL_TABLE}
    for layer in range(num_layers):
        src, dst = f"encoder.layers.{layer}.", f"encoder.layers.{layer}."
        for ours, theirs in _LAYER_TABLE:
            for kind in ("weight", "bias"):
                out[f"{dst}{ours}.{kind}"] = hf[f"{src}{theirs}.{kind}"]
        for kind in ("weight", "bias"):
            q, k, v = (hf[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv")
            per_head = [t.reshape(num_heads, -1, *t.shape[1:]) for t in (q, k, v)]  # [heads, head_dim, ...]
            out[f"{dst}self_attention.linear_qkv.{kind}"] = torch.cat(per_head, dim=1).reshape(-1, *q.shape[1:])
    return out


def tower_to_siglip(state: dict[str, torch.Tensor], num_layers: int, num_heads: int) -> dict[str, torch.Tensor]:
    """VisionTower state dict (unsharded, TP=1) -> SiglipVisionModel state dict: the inverse of siglip_to_tower."""
    out = {f"vision_model.{theirs}": state[ours] for ours, theirs in _GLOBAL_TABLE}
    for layer in range(num_layers):
        src, dst = f"encoder.layers.{layer}.", f"vision_model.encoder.layers.{layer}."
        for ours, theirs in _LAYER_TABLE:
            for kind in ("weight", "bias"):
                out[f"{dst}{theirs}.{kind}"] = state[f"{src}{ours}.{kind}"]
        for kind in ("weight", "bias"):
            qkv = state[f"{src}self_attention.linear_qkv.{kind}"]
            per_head = qkv.reshape(num_heads, 3, -1, *qkv.shape[1:])  # rows grouped per head: [q_h; k_h; v_h]
            for i, p in enumerate("qkv"):
                out[f"{dst}self_attn.{p}_proj.{kind}"] = per_head[:, i].reshape(-1, *qkv.shape[1:])
    return out


def siglip_config(tower: torch.nn.Module):
    """The SiglipVisionConfig of a VisionTower (its position table's resolution is SigLIP's image_size)."""
    from transformers import SiglipVisionConfig

    config = tower.config
    return SiglipVisionConfig(
        hidden_size=config.hidden_size, intermediate_size=config.ffn_hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads, image_size=tower.base_grid * tower.patch_size,
        patch_size=tower.patch_size, layer_norm_eps=config.layernorm_epsilon, hidden_act="gelu_pytorch_tanh",
        vision_use_head=False,
    )


def save_siglip_tower(tower: torch.nn.Module, directory) -> None:
    """Write a VisionTower (one process, TP=1) as a SiglipVisionModel directory (config.json, model.safetensors)."""
    siglip = tower_to_siglip(module_tensors(tower), tower.config.num_layers, tower.config.num_attention_heads)
    save_hf_checkpoint(siglip, siglip_config(tower), directory)


def _tensor_parallel_shard(param: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return full
    size = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    return torch.chunk(full, size, dim=param.partition_dim)[rank]


def load_siglip_tower(tower: torch.nn.Module, directory) -> None:
    """Load a Hugging Face SigLIP vision checkpoint directory into ``tower`` (this rank's TP shard)."""
    hf_config = read_hf_config(directory, "model.vision_pretrained_path", "SiglipVisionModel")
    hf_config = hf_config.get("vision_config", hf_config)
    config = tower.config
    ours = {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_attention_heads, "intermediate_size": config.ffn_hidden_size,
            "patch_size": tower.patch_size, "image_size": tower.base_grid * tower.patch_size}
    refuse_misfit(directory, "tower", ours, hf_config, _CONFIG_KEYS)
    state = siglip_to_tower(read_hf_checkpoint(directory), config.num_layers, config.num_attention_heads)
    params = dict(tower.named_parameters())
    with torch.no_grad():
        for name, full in state.items():
            params[name].copy_(_tensor_parallel_shard(params[name], full.to(params[name].dtype)))
    missing = set(params) - set(state)
    if missing:
        raise KeyError(f"SigLIP import left tower parameters unset: {sorted(missing)}")
