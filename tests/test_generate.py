"""Generation: batched decoding equals decoding each prompt alone (and a plain argmax loop), sampling filters
follow their definitions, and prompts stop where the answer starts."""

import pytest
import torch

from nemo_pixellm import tiling
from nemo_pixellm.generate import Prompt, generate, sample_next

from conftest import TINY_LM, TINY_VISION_56, build_pixellm


@pytest.fixture(scope="module")
def model(megatron_single_process):
    return build_pixellm(megatron_single_process, **TINY_LM, **TINY_VISION_56, vocab_size=256, seq_length=64,
                         image_token_id=5, seed=11)


def _prompts(generator) -> list[Prompt]:
    layout = tiling.ImageLayout(grid=(1, 1), side=2)
    prompts = []
    for text_before, text_after in [(3, 4), (1, 9), (6, 2)]:
        tokens = torch.randint(10, 256, (text_before,), generator=generator).tolist() + [5] * layout.tokens
        tokens += torch.randint(10, 256, (text_after,), generator=generator).tolist()
        blocks = [tiling.TextBlock(text_before)] + layout.blocks + [tiling.TextBlock(text_after)]
        views = torch.rand(layout.views, 3, 56, 56, generator=generator) * 2 - 1
        prompts.append(Prompt(tokens, blocks, views, torch.tensor([layout.grid])))
    return prompts


def test_batched_greedy_equals_one_by_one_and_argmax_loop(model):
    prompts = _prompts(torch.Generator().manual_seed(0))
    batched = generate(model, prompts, eos_id=1, pad_id=0, max_new_tokens=5, use_cache=False)
    for prompt, out in zip(prompts, batched):
        assert generate(model, [prompt], eos_id=1, pad_id=0, max_new_tokens=5, use_cache=False) == [out]
        tokens = list(prompt.tokens)
        with torch.no_grad():
            for _ in range(5):
                positions = tiling.mrope_positions(prompt.blocks + [tiling.TextBlock(len(tokens) - len(prompt.tokens))])
                logits = model(torch.tensor([tokens]), positions[:, None], images=prompt.views, image_grids=prompt.grids)
                tokens.append(int(logits[0, -1].argmax()))
        assert tokens[len(prompt.tokens):] == out
    assert len({tuple(o) for o in batched}) > 1  # the prompts lead to different continuations


def test_latent_cache_decoding_equals_full_recompute(model):
    """MLA's latent cache (c_kv + rotated rope key per token) gives the tokens of rerunning the sequence,
    greedy and sampled, for a right-padded batch whose rows have different prompt lengths."""
    prompts = _prompts(torch.Generator().manual_seed(1))
    for sampling in ({}, {"temperature": 1.0, "top_k": 20, "seed": 3}):
        cached_scores, full_scores = [], []
        cached = generate(model, prompts, eos_id=1, pad_id=0, max_new_tokens=6, scores=cached_scores, **sampling)
        full = generate(model, prompts, eos_id=1, pad_id=0, max_new_tokens=6, use_cache=False, scores=full_scores,
                        **sampling)
        assert cached == full and sum(map(len, full)) >= 12
        assert len(cached_scores) == len(full_scores) >= 2
        for step, (c, f) in enumerate(zip(cached_scores, full_scores)):
            active = [i for i, out in enumerate(full) if step <= len(out)]  # rows that had not ended yet
            torch.testing.assert_close(c[active], f[active], rtol=1e-5, atol=1e-5)
    layers = [m for m in model.modules() if hasattr(m, "latent_cache")]
    assert layers and all(m.latent_cache is None for m in layers)  # the cache lives only during generate()


def test_never_emits_the_image_placeholder(model):
    """A model that prefers the image token everywhere still decodes text: the placeholder has no image
    behind it (an untrained model used to emit it and crash the cached step). The tokens are the best others."""
    image_id = model.image_token_id

    def prefer_image_token(module, inputs, output):
        logits, bias = output
        logits = logits.clone()
        logits[..., image_id] += 1e4
        return logits, bias

    prompts = _prompts(torch.Generator().manual_seed(2))
    plain_scores = []
    generate(model, prompts, eos_id=1, pad_id=0, max_new_tokens=1, use_cache=False, scores=plain_scores)
    handle = model.language_model.output_layer.register_forward_hook(prefer_image_token)
    try:
        scores = []
        cached = generate(model, prompts, eos_id=1, pad_id=0, max_new_tokens=4, scores=scores)
        full = generate(model, prompts, eos_id=1, pad_id=0, max_new_tokens=4, use_cache=False)
    finally:
        handle.remove()
    assert bool((scores[0].argmax(-1) == image_id).all())  # the hook made the placeholder every row's first choice
    assert cached == full and all(image_id not in out for out in full) and sum(map(len, full)) >= 6
    best_other = plain_scores[0].clone()
    best_other[:, image_id] = float("-inf")
    assert [out[0] for out in full] == best_other.argmax(-1).tolist()


def test_sampling_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    assert all(int(sample_next(logits, 1.0, 1, 1.0, g)) == 0 for _ in range(20))  # top_k=1 is greedy
    assert int(sample_next(logits, 0.0, 0, 1.0, g)) == 0
    probs = logits.softmax(-1)[0]
    # top_p=0.8: the smallest prefix of the sorted distribution reaching 0.8 mass (computed here by hand).
    keep = 1
    while probs[:keep].sum() < 0.8:
        keep += 1
    expected = torch.zeros(5)
    expected[:keep] = probs[:keep] / probs[:keep].sum()
    draws = torch.stack([sample_next(logits.expand(4000, -1), 1.0, 0, 0.8, g) for _ in range(5)]).flatten()
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)
    # top_k=2 at temperature 2: the two largest logits, softmax of logits / 2.
    draws = torch.stack([sample_next(logits.expand(4000, -1), 2.0, 2, 1.0, g) for _ in range(5)]).flatten()
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    two = (logits[0, :2] / 2).softmax(-1)
    torch.testing.assert_close(freq, torch.cat([two, torch.zeros(3)]), atol=0.015, rtol=0)
