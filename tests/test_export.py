"""Hugging Face export: what ``python -m nemo_pixellm.export`` writes loads in transformers' own classes and
computes what PixelLM computes: DeepseekV3ForCausalLM logits on text, SiglipVisionModel features on images."""

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from transformers import DeepseekV3ForCausalLM, SiglipVisionModel

from conftest import PYTHON, ROOT, TINY_LM, TINY_VISION_56, build_pixellm
from nemo_pixellm.export.__main__ import export_model


def randomize(model, seed: int = 0) -> None:
    """Random values everywhere (norm weights, biases and the expert bias too), so no tensor can hide."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator)
                tensor.copy_(1.0 + 0.1 * noise if "norm.weight" in name else 0.05 * noise)


def test_export_loads_in_transformers_and_computes_the_same(megatron_single_process, tmp_path):
    model = build_pixellm(megatron_single_process, vocab_size=256, seq_length=64, image_token_id=5,
                          **TINY_LM, **TINY_VISION_56)
    randomize(model)
    export_model(model, tmp_path)

    hf_lm, info = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "language_model", dtype=torch.float32,
                                                        attn_implementation="eager", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    ids = torch.randint(6, 256, (2, 40), generator=torch.Generator().manual_seed(1))  # text only
    text_positions = torch.arange(40).expand(3, 2, 40)  # M-RoPE ids of a text-only sequence
    with torch.no_grad():
        expected = hf_lm.eval()(input_ids=ids).logits
        got = model(ids, text_positions)
    print(f"language model: max |logit diff| {(got - expected).abs().max():.2e} of {expected.abs().max():.2f}")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())

    hf_tower = SiglipVisionModel.from_pretrained(tmp_path / "vision_tower", dtype=torch.float32).eval()
    images = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf_tower(pixel_values=images).last_hidden_state  # [n, patches, width]
        got = model.vision_model(images).flatten(1, 2)
    print(f"vision tower: max |diff| {(got - expected).abs().max():.2e} of {expected.abs().max():.2f}")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())

    projector = load_file(tmp_path / "projector.safetensors")
    state = model.projector.state_dict()
    assert set(projector) == {k for k in state if not k.endswith("_extra_state")}
    assert all(torch.equal(projector[k], state[k]) for k in projector)
    assert json.loads((tmp_path / "pixellm.json").read_text())["image_token_id"] == 5


@pytest.mark.slow
def test_export_cli_from_a_training_checkpoint(trained_checkpoint, cache_dir, tmp_path):
    """The CLI on a Bridge checkpoint: every language-model tensor lands in the HF checkpoint (the fused norms
    included, stored under Transformer Engine's names), and an existing export is never overwritten."""
    from test_training import checkpoint_tensors

    env = dict(os.environ, NEMO_PIXELLM_CACHE=str(cache_dir))
    command = [PYTHON, "-m", "nemo_pixellm.export", f"checkpoint={trained_checkpoint}", f"out={tmp_path / 'hf'}"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "language_model/tokenizer.json" in report["files"]

    hf = load_file(tmp_path / "hf" / "language_model" / "model.safetensors")
    stored = checkpoint_tensors(trained_checkpoint, tmp_path)
    pairs = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
             "decoder.layers.0.self_attention.linear_q_up_proj.layer_norm_weight": "model.layers.0.self_attn.q_a_layernorm.weight",
             "decoder.layers.0.mlp.linear_fc1.layer_norm_weight": "model.layers.0.post_attention_layernorm.weight",
             "decoder.layers.1.mlp.router.expert_bias": "model.layers.1.mlp.gate.e_score_correction_bias"}
    for ours, theirs in pairs.items():
        assert torch.equal(stored[f"language_model.{ours}"], hf[theirs]), ours
    model, info = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf" / "language_model", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))

    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "hf").rglob("*")}
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "is not empty" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "hf").rglob("*")} == before


def test_tied_embeddings_export_tied_and_load_back(megatron_single_process, tmp_path):
    """model.share_embeddings_and_output_weights=true (PaliGemma-style tied embeddings): one matrix in the
    model, exported with tie_word_embeddings, transformers' logits equal the plugin's, and the export imports
    back into a tied model tensor for tensor."""
    sizes = dict(vocab_size=256, seq_length=64, image_token_id=5, share_embeddings_and_output_weights=True,
                 **TINY_LM, **TINY_VISION_56)
    model = build_pixellm(megatron_single_process, **sizes)
    randomize(model)
    state = model.language_model.state_dict()
    assert "output_layer.weight" not in state and "embedding.word_embeddings.weight" in state
    export_model(model, tmp_path / "export")
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "export" / "language_model", dtype=torch.float32,
                                               attn_implementation="eager").eval()
    assert hf.config.tie_word_embeddings and hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(6, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = hf(input_ids=ids).logits, model(ids, torch.arange(40).expand(3, 2, 40))
    print(f"tied: max |logit diff| {(got - expected).abs().max():.2e} of {expected.abs().max():.2f}")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    back = build_pixellm(megatron_single_process, seed=3, language_pretrained_path=str(tmp_path / "export" / "language_model"),
                         **sizes)
    assert all(torch.equal(t, back.language_model.state_dict()[k]) for k, t in state.items() if "_extra_state" not in k)
