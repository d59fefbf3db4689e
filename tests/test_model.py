"""PixelLM model behaviour on one process: images reach exactly their own sample, token counts follow
DeepSeek-VL2's layout, and the projector's pixel-unshuffle is a rearrangement of torch's."""

import pytest
import torch
import torch.nn.functional as F

import nemo_pixellm  # noqa: F401
from nemo_pixellm.data.dataset import image_grid_tokens
from nemo_pixellm.models.projector import pixel_unshuffle

from conftest import build_pixellm


@pytest.fixture(scope="module")
def tiny_model(megatron_single_process):
    return build_pixellm(
        megatron_single_process,
        num_layers=2, moe_layer_freq=[0, 1], hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
        q_lora_rank=32, kv_lora_rank=16, qk_head_dim=16, qk_pos_emb_head_dim=16, v_head_dim=16,
        num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=64,
        vocab_size=256, seq_length=96, vision_hidden_size=32, vision_num_layers=2, vision_num_attention_heads=2,
        vision_ffn_hidden_size=64, vision_image_size=224, image_token_id=5,
    )


def _batch(num_samples: int, image_at: list[int], tokens_per_image: int = 72, seq: int = 96):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 256, (num_samples, seq), generator=g)
    for row, start in enumerate(image_at):
        if start >= 0:
            ids[row, start:start + tokens_per_image] = 5
    return ids


def test_each_sample_sees_only_its_own_image(tiny_model):
    """The upstream bug gave every sample sample 0's image: swapping two samples' images must change
    exactly those two samples' logits, and a text-only sample in the batch is untouched."""
    ids = _batch(3, [2, -1, 20])  # sample 1 is text-only
    g = torch.Generator().manual_seed(1)
    img_a, img_b = torch.rand(1, 3, 224, 224, generator=g) * 2 - 1, torch.rand(1, 3, 224, 224, generator=g) * 2 - 1
    pos = torch.arange(96).expand(3, -1)
    with torch.no_grad():
        base = tiny_model(ids, pos, images=torch.cat([img_a, img_b]))
        swapped = tiny_model(ids, pos, images=torch.cat([img_b, img_a]))
    delta = (base - swapped).abs().amax(dim=(1, 2))  # logits [b, s, vocab]
    assert delta[0] > 1e-4 and delta[2] > 1e-4
    assert delta[1] == 0
    # Text before sample 0's image cannot see the image (causal): identical logits there.
    assert torch.equal(base[0, :2], swapped[0, :2])


def test_batched_equals_one_by_one(tiny_model):
    ids = _batch(2, [3, 10])
    g = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, 224, 224, generator=g) * 2 - 1
    pos = torch.arange(96).expand(2, -1)
    with torch.no_grad():
        both = tiny_model(ids, pos, images=images)
        first = tiny_model(ids[:1], pos[:1], images=images[:1])
        second = tiny_model(ids[1:], pos[:1], images=images[1:])
    torch.testing.assert_close(both[0], first[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1], second[0], rtol=1e-5, atol=1e-5)


def test_image_token_count_mismatch_is_an_error(tiny_model):
    ids = _batch(1, [3], tokens_per_image=71)
    with pytest.raises(ValueError, match="image-token positions"):
        tiny_model(ids, torch.arange(96)[None], images=torch.zeros(1, 3, 224, 224))


def test_view_token_counts_follow_deepseek_vl2():
    # reference.md section 3: a 384 view is 14 rows x (14 + 1 newline) = 210 positions (27x27 patches padded to 28).
    assert image_grid_tokens(384, 14, 2) == 14 * 15 == 210
    assert image_grid_tokens(224, 14, 2) == 8 * 9
    assert image_grid_tokens(512, 14, 2) == 18 * 19  # 36 patches -> 18


def test_pixel_unshuffle_matches_torch_up_to_channel_order():
    x = torch.randn(2, 6, 4, 3)  # [n, h, w, c]
    ours = pixel_unshuffle(x, 2)  # channels ordered (dy, dx, c)
    ref = F.pixel_unshuffle(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)  # channels ordered (c, dy, dx)
    ref = ref.reshape(2, 3, 2, 3, 2, 2).permute(0, 1, 2, 4, 5, 3).reshape(2, 3, 2, 12)
    assert torch.equal(ours, ref)
    odd = pixel_unshuffle(torch.randn(1, 27, 27, 3), 2)
    assert odd.shape == (1, 14, 14, 12)
