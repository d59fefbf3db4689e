"""M-RoPE on MLA's decoupled rope slice: rotations equal Hugging Face Qwen2-VL's on the same ids, text-only
ids reduce exactly to 1D RoPE, explicit positions are honoured (HF DeepseekV3 parity at shifted ids), and
image-like ids change the model's output."""

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from transformers import Qwen2VLTextConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding, apply_multimodal_rotary_pos_emb
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb as qwen3_vl_rotary

from nemo_pixellm.models.mla import RopeTable
from nemo_pixellm.tiling import interleaved_mrope_section

from conftest import TINY_LM, build_pixellm
from test_hf_parity import SIZES, hf_model, pixellm_lm
from nemo_pixellm.hf.checkpoints import read_hf_checkpoint
from nemo_pixellm.hf.deepseek_v3 import hf_to_megatron

ROPE_DIM, SECTIONS = 64, [8, 12, 12]  # PixelLM's rope slice: 32 frequency pairs split t / h / w


def image_ids(batch: int, seq: int, generator) -> torch.Tensor:
    """[3, b, s] ids like a text-image-text sequence: a 4x6 grid after 5 text tokens, then text again."""
    t = torch.arange(seq).expand(3, batch, seq).clone()
    rows, cols, start = 4, 6, 5
    grid = torch.arange(rows * cols)
    t[0, :, start:start + 24] = start
    t[1, :, start:start + 24] = start + grid // cols
    t[2, :, start:start + 24] = start + grid % cols
    after = start + max(rows, cols)
    t[:, :, start + 24:] = after + torch.arange(seq - start - 24)
    return t + torch.randint(0, 3, (1, batch, 1), generator=generator)  # per-sample offsets


def test_rotation_matches_qwen2_vl():
    g = torch.Generator().manual_seed(0)
    ids = image_ids(2, 40, g)
    table = RopeTable(RotaryEmbedding(kv_channels=ROPE_DIM, rotary_percent=1.0, rotary_base=10000), SECTIONS)
    emb = table(ids)  # [s, b, 1, dim]
    q = torch.randn(2, 3, 40, ROPE_DIM, generator=g)  # HF layout [b, heads, s, d]
    config = Qwen2VLTextConfig(hidden_size=ROPE_DIM * 3, num_attention_heads=3, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": SECTIONS})
    cos, sin = Qwen2VLRotaryEmbedding(config)(q, ids)
    expected, _ = apply_multimodal_rotary_pos_emb(q, q, cos, sin, SECTIONS)
    ours = _apply_rotary_pos_emb_bshd(q.permute(2, 0, 1, 3), emb)  # Megatron layout [s, b, heads, d]
    torch.testing.assert_close(ours.permute(1, 2, 0, 3), expected, rtol=1e-6, atol=1e-6)


def test_interleaved_rotation_matches_qwen3_vl():
    """``mrope_interleaved``: frequency pairs alternate t h w (Qwen3-VL's layout), at an image grid's ids."""
    g = torch.Generator().manual_seed(3)
    ids, sections = image_ids(2, 40, g), interleaved_mrope_section(ROPE_DIM // 2)  # [11, 11, 10]
    table = RopeTable(RotaryEmbedding(kv_channels=ROPE_DIM, rotary_percent=1.0, rotary_base=10000), sections, True)
    q = torch.randn(2, 3, 40, ROPE_DIM, generator=g)
    config = Qwen3VLTextConfig(hidden_size=ROPE_DIM * 3, num_attention_heads=3, head_dim=ROPE_DIM, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections, "mrope_interleaved": True})
    cos, sin = Qwen3VLTextRotaryEmbedding(config)(q, ids)
    expected, _ = qwen3_vl_rotary(q, q, cos, sin)
    ours = _apply_rotary_pos_emb_bshd(q.permute(2, 0, 1, 3), table(ids))
    torch.testing.assert_close(ours.permute(1, 2, 0, 3), expected, rtol=1e-6, atol=1e-6)
    chunked = _apply_rotary_pos_emb_bshd(q.permute(2, 0, 1, 3), RopeTable(table.base, sections)(ids))
    assert (chunked.permute(1, 2, 0, 3) - expected).abs().max() > 1e-2  # the two layouts differ at image ids


@pytest.fixture(scope="module")
def mrope_model(megatron_single_process):
    return build_pixellm(megatron_single_process, **TINY_LM, vocab_size=256, seq_length=64, vision_hidden_size=32,
                         vision_num_layers=1, vision_num_attention_heads=2, vision_ffn_hidden_size=64,
                         vision_image_size=224, image_token_id=5)


def test_text_only_ids_are_1d_rope(mrope_model):
    ids = torch.randint(10, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    one_d = torch.arange(64).expand(2, -1)
    with torch.no_grad():
        default = mrope_model(ids, None)
        flat = mrope_model(ids, one_d)
        three = mrope_model(ids, one_d.expand(3, 2, 64))
        image = mrope_model(ids, image_ids(2, 64, torch.Generator().manual_seed(2)))
    assert torch.equal(flat, default)
    assert torch.equal(three, default)
    assert (image - default).abs().max() > 1e-4  # image-grid ids do change attention


def test_positions_reach_mla_as_arguments(mrope_model):
    """Bridge built the explicit-position GPTModel (compat's scoped class swap, released after provide), whose
    MLA layers get the rope table of the given ids: [3, b, s] image ids through the model equal the same
    ids' table handed to every attention by hand."""
    from megatron.bridge.models import gpt_provider
    from megatron.core.models.gpt import GPTModel

    from nemo_pixellm.models.language_model import PixelGPTModel

    lm = mrope_model.language_model
    assert type(lm) is PixelGPTModel and gpt_provider.MCoreGPTModel is GPTModel
    ids = image_ids(2, 64, torch.Generator().manual_seed(5))
    captured = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, kwargs: captured.append(kwargs["rotary_pos_emb"]),
                                         with_kwargs=True)
             for m in lm.modules() if type(m).__name__ == "PixelMLASelfAttention"]
    with torch.no_grad():
        mrope_model(torch.randint(10, 256, (2, 64)), ids)
    for hook in hooks:
        hook.remove()
    assert len(captured) == 2 and all(t is captured[0] for t in captured)  # one table per forward, every layer
    torch.testing.assert_close(captured[0], lm.rope_table(ids), rtol=0, atol=0)
    assert captured[0].shape == (64, 2, 1, 16)


def test_explicit_positions_match_hf(megatron_single_process, tmp_path):
    """Non-contiguous 1D ids through the plugin's positions path equal HF DeepseekV3 given the same ids."""
    hf = hf_model(None)
    hf.save_pretrained(tmp_path)
    lm = pixellm_lm(megatron_single_process, None)
    lm.load_state_dict(hf_to_megatron(read_hf_checkpoint(tmp_path), lm.state_dict().keys()), strict=False)
    ids = torch.randint(0, SIZES["vocab"] - 1, (2, 32), generator=torch.Generator().manual_seed(4))
    positions = torch.arange(32).expand(2, -1) + torch.tensor([[7], [40]])
    positions = positions + (torch.arange(32) >= 16) * torch.tensor([[9], [30]])  # a gap: relative positions change
    with torch.no_grad():
        expected = hf(input_ids=ids, position_ids=positions).logits
        got = lm(input_ids=ids, position_ids=positions, attention_mask=None)
        unshifted = lm(input_ids=ids, position_ids=None, attention_mask=None)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert (unshifted - expected).abs().max() > 1e-4  # the gap matters, so the ids were used
