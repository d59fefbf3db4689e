"""Parameter counts and KV-cache sizes of a PixelLM variant, from the model itself built on the meta device.

    python -m nemo_pixellm.info variant=pixel      # prints one JSON object

Two conventions are reported:
- ``llm_total`` / ``llm_active``: the brief's (reference.md section 1): the embedding counted once (as if
  input and output embeddings were tied) and the router counted for the k chosen experts only.
- ``llm_total_untied`` / ``llm_active_untied``: the plugin's model as built (untied output layer, as in
  DeepSeek-V3 and Megatron), router counted for k experts in the active figure.
"""

import json
import sys

import torch
from hydra import compose, initialize_config_dir

from nemo_pixellm import compat

compat.enable(entry_point=True)  # version check and CPU layer, before Megatron loads

from nemo_pixellm.training.config import CONF_DIR, build_config

BF16_BYTES = 2


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def count_parameters(model, provider) -> dict:
    lm = model.language_model
    h, vocab = provider.hidden_size, lm.embedding.word_embeddings.weight.shape[0]
    output = lm.output_layer.weight.numel() if not provider.share_embeddings_and_output_weights else 0
    lm_params = _numel(lm)
    inactive = 0  # parameters of the routed experts a token does not use, and their router rows
    for layer in lm.decoder.layers:
        mlp = layer.mlp
        if not hasattr(mlp, "router"):
            continue
        experts, k = provider.num_moe_experts, provider.moe_router_topk
        per_expert = _numel(mlp.experts) // experts
        inactive += (experts - k) * (per_expert + h)
    return {
        "llm_total": lm_params - output,
        "llm_active": lm_params - output - inactive,
        "llm_total_untied": lm_params,
        "llm_active_untied": lm_params - inactive,
        "vocab_size": vocab,
        "vision": _numel(model.vision_model),
        "projector": _numel(model.projector),
    }


def kv_cache_bytes_per_token(provider) -> dict:
    """MLA caches the latent c_kv and the shared rope key; full multi-head attention would cache K and V;
    grouped-query attention caches K and V of its groups."""
    heads, layers = provider.num_attention_heads, provider.num_layers
    if not provider.multi_latent_attention:
        head_dim = provider.kv_channels or provider.hidden_size // heads
        gqa = 2 * (provider.num_query_groups or heads) * head_dim * BF16_BYTES
        mha = 2 * heads * head_dim * BF16_BYTES
        return {"gqa_per_layer": gqa, "gqa_total": gqa * layers, "mha_per_layer": mha, "mha_total": mha * layers,
                "gqa_vs_mha": round(mha / gqa, 2)}
    mla = (provider.kv_lora_rank + provider.qk_pos_emb_head_dim) * BF16_BYTES
    mha = heads * (provider.qk_head_dim + provider.qk_pos_emb_head_dim + provider.v_head_dim) * BF16_BYTES
    return {
        "mla_per_layer": mla, "mla_total": mla * layers,
        "mha_per_layer": mha, "mha_total": mha * layers,
        "mla_vs_mha": round(mha / mla, 2),
    }


def build_on_meta(overrides: list[str]):
    """The variant's model with no memory: meta tensors, no initialisation, one gloo process."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=["+stage=stage2", *overrides])
    provider = build_config(cfg, world_size=1).model
    return meta_model(provider), provider


def meta_model(provider):
    """``provider``'s model on the meta device, unsharded (the parallel sizes it is built with must be 1)."""
    from nemo_pixellm.distributed import single_process_groups

    compat.set_process_groups(provider, single_process_groups())
    provider.use_cpu_initialization = True  # allocate with the default device (meta), not current_device()
    provider.perform_initialization = False
    provider.finalize()
    with torch.device("meta"):
        return provider.provide()


def main(argv=None) -> None:
    overrides = list(sys.argv[1:] if argv is None else argv)
    model, provider = build_on_meta(overrides)
    report = {"variant": next((o.split("=", 1)[1] for o in overrides if o.startswith("variant=")), "tiny")}
    report.update(count_parameters(model, provider))
    report["kv_cache_bytes_per_token"] = kv_cache_bytes_per_token(provider)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
