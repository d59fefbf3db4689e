"""The language model against Hugging Face transformers' DeepseekV3ForCausalLM (code nobody here wrote):
same weights through the project's name mapping, fp32 logits within 1e-5, with plain RoPE and with YaRN
beyond the original context."""

import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from nemo_pixellm.hf.checkpoints import read_hf_checkpoint
from nemo_pixellm.hf.deepseek_v3 import hf_to_megatron, megatron_to_hf, write_hf_checkpoint
from nemo_pixellm.models.mla import LatentCache

from conftest import build_pixellm

SIZES = dict(hidden=64, layers=3, heads=4, q_lora=32, kv_lora=16, nope=16, rope=16, v=24, experts=8, k=2,
             expert_ffn=32, shared=2, dense_ffn=96, vocab=256)


def hf_model(yarn: dict | None) -> DeepseekV3ForCausalLM:
    s = SIZES
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if yarn:
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, **yarn}
    config = DeepseekV3Config(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["dense_ffn"],
        moe_intermediate_size=s["expert_ffn"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"], n_shared_experts=s["shared"], n_routed_experts=s["experts"],
        routed_scaling_factor=1.0, kv_lora_rank=s["kv_lora"], q_lora_rank=s["q_lora"], qk_rope_head_dim=s["rope"],
        v_head_dim=s["v"], qk_nope_head_dim=s["nope"], n_group=1, topk_group=1, num_experts_per_tok=s["k"],
        first_k_dense_replace=1, norm_topk_prob=True, max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters=rope, tie_word_embeddings=False, attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():  # random weights everywhere, a nonzero expert bias that changes the routing
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * (0.02 if param.dim() > 1 else 0.1) + (1.0 if "norm" in name else 0.0))
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(s["experts"]) * 0.05)
    return model


def pixellm_lm(pg, yarn: dict | None, seq_length: int = 256, **overrides):
    s = SIZES
    extra = {}
    if yarn:
        extra = dict(rope_type="yarn", rotary_scaling_factor=yarn["factor"],
                     original_max_position_embeddings=yarn["original_max_position_embeddings"],
                     beta_fast=yarn["beta_fast"], beta_slow=yarn["beta_slow"], mscale=yarn["mscale"],
                     mscale_all_dim=yarn["mscale_all_dim"])
    else:
        extra = dict(rope_type="rope")
    kwargs = dict(
        num_layers=s["layers"], moe_layer_freq=[0] + [1] * (s["layers"] - 1), hidden_size=s["hidden"],
        ffn_hidden_size=s["dense_ffn"], num_attention_heads=s["heads"], q_lora_rank=s["q_lora"],
        kv_lora_rank=s["kv_lora"], qk_head_dim=s["nope"], qk_pos_emb_head_dim=s["rope"], v_head_dim=s["v"],
        num_moe_experts=s["experts"], moe_router_topk=s["k"], moe_ffn_hidden_size=s["expert_ffn"],
        moe_shared_expert_intermediate_size=s["shared"] * s["expert_ffn"], moe_router_topk_scaling_factor=1.0,
        vocab_size=s["vocab"], seq_length=seq_length, layernorm_epsilon=1e-6, rotary_base=10000,
        vision_hidden_size=32, vision_num_layers=1, vision_num_attention_heads=2, vision_ffn_hidden_size=64,
        vision_image_size=224, image_token_id=s["vocab"] - 1, **extra,
    )
    return build_pixellm(pg, **{**kwargs, **overrides}).language_model


YARN = {"factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0,
        "mscale": 1.0, "mscale_all_dim": 1.0}


@pytest.mark.parametrize("yarn", [None, YARN], ids=["rope", "yarn"])
def test_logits_match_hf_deepseek_v3(megatron_single_process, yarn, tmp_path):
    hf = hf_model(yarn)
    hf.save_pretrained(tmp_path / "hf")  # the on-disk format real DeepSeek-V3 checkpoints use
    hf_sd = read_hf_checkpoint(tmp_path / "hf")
    lm = pixellm_lm(megatron_single_process, yarn)
    result = lm.load_state_dict(hf_to_megatron(hf_sd, lm.state_dict().keys()), strict=False)
    assert not [k for k in result.missing_keys if not k.endswith("_extra_state")]
    # The mapping is a bijection: back to HF names gives HF's tensors exactly.
    back = megatron_to_hf({k: v for k, v in lm.state_dict().items() if not k.endswith("_extra_state")})
    assert set(back) == set(hf_sd)
    assert all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)

    seq = 160 if yarn else 48  # YaRN: beyond the original 64-token context
    ids = torch.randint(0, SIZES["vocab"] - 1, (2, seq), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = lm(input_ids=ids, position_ids=torch.arange(seq).expand(2, -1), attention_mask=None)
    print(f"max |logit diff| {(got - expected).abs().max().item():.3e} of max |logit| {expected.abs().max().item():.3f}")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())

    # Decoding over MLA's latent cache (one prompt forward, then absorbed single-token steps with their own rope
    # path) gives transformers' logits at every step: with YaRN beyond the original context too.
    cache, prompt = LatentCache(), seq - 6
    assert all(layer.self_attention._absorbable() for layer in lm.decoder.layers)
    positions = torch.arange(seq).expand(2, -1)
    with torch.no_grad():
        steps = [lm(input_ids=ids[:, :prompt], position_ids=positions[:, :prompt], attention_mask=None,
                    inference_context=cache)[:, -1]]
        steps += [lm(input_ids=ids[:, k:k + 1], position_ids=positions[:, k:k + 1], attention_mask=None,
                     inference_context=cache)[:, -1] for k in range(prompt, seq)]
    torch.testing.assert_close(torch.stack(steps, 1), expected[:, prompt - 1:], rtol=1e-5,
                               atol=1e-5 * expected.abs().max().item())

    # Export: the written checkpoint loads in transformers with every weight found, into exactly the
    # tensors transformers' own save of the same model loads into.
    write_hf_checkpoint(lm.state_dict(), hf.config, tmp_path / "export")
    exported, info = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    reloaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    assert all(torch.equal(t, reloaded[k]) for k, t in exported.state_dict().items())


def test_yarn_only_beyond_the_original_context(megatron_single_process, tmp_path):
    """A YaRN-configured model built for at most its original context is plain RoPE (DeepSeek-V3's rule)."""
    hf = hf_model(None)  # plain RoPE reference
    hf.save_pretrained(tmp_path)
    lm = pixellm_lm(megatron_single_process, YARN, seq_length=64)  # = original_max_position_embeddings
    lm.load_state_dict(hf_to_megatron(read_hf_checkpoint(tmp_path), lm.state_dict().keys()), strict=False)
    ids = torch.randint(0, SIZES["vocab"] - 1, (1, 48), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = lm(input_ids=ids, position_ids=torch.arange(48)[None], attention_mask=None)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_language_model_starts_from_hf_weights(megatron_single_process, tmp_path):
    """model.language_pretrained_path: the provider loads a DeepseekV3ForCausalLM directory into the language
    model (its logits are transformers'); a config or tensor that does not fit is refused by name."""
    import json

    from safetensors.torch import load_file, save_file

    hf = hf_model(None)
    hf.save_pretrained(tmp_path / "hf")
    lm = pixellm_lm(megatron_single_process, None, language_pretrained_path=str(tmp_path / "hf"))
    ids = torch.randint(0, SIZES["vocab"] - 1, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = lm(input_ids=ids, position_ids=torch.arange(40).expand(2, -1), attention_mask=None)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())

    with pytest.raises(ValueError, match=r"model.kv_lora_rank=8 but .* has kv_lora_rank=16"):
        pixellm_lm(megatron_single_process, None, language_pretrained_path=str(tmp_path / "hf"), kv_lora_rank=8)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "config.json").write_text(json.dumps(config))
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    tensors["model.layers.1.self_attn.o_proj.weight"] = tensors["model.layers.1.self_attn.o_proj.weight"][:, :-8].clone()
    save_file(tensors, tmp_path / "cut" / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.o_proj.weight gives "
                                         r"decoder.layers.1.self_attention.linear_proj.weight the shape \(64, 88\)"):
        pixellm_lm(megatron_single_process, None, language_pretrained_path=str(tmp_path / "cut"))
