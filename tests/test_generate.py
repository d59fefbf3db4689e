"""Generation: batched decoding equals decoding each prompt alone (and a plain argmax loop), sampling filters
follow their definitions, and prompts stop where the answer starts."""

import pytest
import torch

from nemo_pixellm import tiling
from nemo_pixellm.generate import Prompt, generate, sample_next
from nemo_pixellm.models.mla import LatentCache, PixelMLASelfAttention

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
    # The cache is the forward's inference_context (an argument): one entry per MLA layer, one slot per token.
    cache, prompt = LatentCache(), prompts[0]
    positions = tiling.mrope_positions(prompt.blocks)[:, None]
    with torch.no_grad():
        model(torch.tensor([prompt.tokens]), positions, images=prompt.views, image_grids=prompt.grids,
              inference_context=cache)
    attentions = [m for m in model.modules() if isinstance(m, PixelMLASelfAttention)]
    assert sorted(cache.layers) == sorted(m.layer_number for m in attentions) and attentions
    latent_and_rope_key = model.config.kv_lora_rank + model.config.qk_pos_emb_head_dim
    assert all(entry.shape == (len(prompt.tokens), 1, latent_and_rope_key) for entry, in cache.layers.values())


def test_absorbed_decoding_equals_re_expanding_the_cache(model, monkeypatch):
    """Decoding steps attend over the cached latents in DeepSeek's absorbed form (W_uk folded into the query,
    W_uv after attention); re-expanding every cached token's keys and values through linear_kv_up_proj (the
    form it replaces) gives the same tokens and each step's logits within 1e-5."""
    prompts = _prompts(torch.Generator().manual_seed(2))
    calls = []
    absorbed_decode = PixelMLASelfAttention._absorbed_decode
    monkeypatch.setattr(PixelMLASelfAttention, "_absorbed_decode",
                        lambda self, *args: calls.append(1) or absorbed_decode(self, *args))
    absorbed_scores, expanded_scores = [], []
    absorbed = generate(model, prompts, eos_id=1, pad_id=0, max_new_tokens=8, scores=absorbed_scores)
    assert len(calls) == 2 * (len(absorbed_scores) - 1)  # both MLA layers at every step after the prompt
    monkeypatch.setattr(PixelMLASelfAttention, "_absorbable", lambda self: False)
    expanded = generate(model, prompts, eos_id=1, pad_id=0, max_new_tokens=8, scores=expanded_scores)
    assert absorbed == expanded
    worst = max((a - b).abs().max().item() for a, b in zip(absorbed_scores, expanded_scores))
    print(f"absorbed vs expanded MLA decoding: max |logit diff| {worst:.2e} over {len(absorbed_scores)} steps")
    for a, b in zip(absorbed_scores, expanded_scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_lean_decoding_step_equals_megatrons_layers(model, monkeypatch):
    """Decoding steps run the layers' submodules in a plain loop (PixelGPTModel.decode_step), skipping
    Megatron's TransformerBlock / TransformerLayer / GPTModel glue; with that glue (the loop switched off) every
    step's logits are the same within 1e-6, and so are the tokens, greedy and sampled."""
    prompts = _prompts(torch.Generator().manual_seed(4))
    language_model = type(model.language_model)
    lean_steps = []
    decode_step = language_model.decode_step
    monkeypatch.setattr(language_model, "decode_step", lambda self, *a: lean_steps.append(1) or decode_step(self, *a))
    for sampling in ({}, {"temperature": 1.0, "seed": 5}):
        lean_scores, megatron_scores = [], []
        lean = generate(model, prompts, eos_id=1, pad_id=0, max_new_tokens=8, scores=lean_scores, **sampling)
        assert len(lean_steps) == len(lean_scores) - 1 >= 3  # every step after the prompt
        with monkeypatch.context() as off:
            off.setattr(language_model, "decodes_lean", lambda self, *a: False)
            megatron = generate(model, prompts, eos_id=1, pad_id=0, max_new_tokens=8, scores=megatron_scores,
                                **sampling)
        assert lean == megatron
        for a, b in zip(lean_scores, megatron_scores):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        lean_steps.clear()


def test_few_row_products_decode_the_same(model, monkeypatch):
    """In a decoding step at batch 1 and 3 the linears (MLA's projections, MLP, experts, output layer) have at
    most parallel_linear.FEW_ROWS rows and, for weights past FEW_ROWS_MIN_WEIGHT, are computed as
    (weight @ x^T)^T: with the limit at 0 (the tiny model's weights are below it) every step's logits equal
    BLAS's x @ weight^T within 1e-6, and so do the greedy tokens."""
    from nemo_pixellm.models import grouped_experts, parallel_linear

    monkeypatch.setattr(grouped_experts, "STACKED_DECODE_MAX_ELEMENTS", 0)  # the experts' loop, as larger models'
    few_rows_product = parallel_linear.few_rows_product
    rows = []
    monkeypatch.setattr(parallel_linear, "few_rows_product",
                        lambda x, weight: rows.append(x.numel() // x.shape[-1]) or few_rows_product(x, weight))
    for batch in (1, 3):
        prompts = _prompts(torch.Generator().manual_seed(6))[:batch]
        assert len(prompts) == batch
        results = []
        for limit in (parallel_linear.FEW_ROWS_MIN_WEIGHT, 0):
            monkeypatch.setattr(parallel_linear, "FEW_ROWS_MIN_WEIGHT", limit)
            scores = []
            results.append((generate(model, prompts, eos_id=1, pad_id=0, max_new_tokens=8, scores=scores), scores))
        assert results[0][0] == results[1][0]
        for a, b in zip(results[0][1], results[1][1]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert rows.count(1) > 7 * 15 and rows.count(3) > 7 * 15  # each step's products (2 layers, output layer)


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


@pytest.mark.slow
def test_generate_cli_answers_about_own_images(trained_checkpoint, cache_dir, tmp_path):
    """`python -m nemo_pixellm.generate` on a training checkpoint: a wide PNG with a prompt (streamed), and a JSONL
    of a text-only prompt, a tall JPEG and two images in one prompt (two that need more positions than the
    context are refused); each answer equals the checkpoint's own
    greedy decoding without the cache, in-process, on the prompt laid out as in training (tiled views)."""
    import json
    import os
    import subprocess

    from PIL import Image, ImageDraw

    from conftest import PYTHON, ROOT
    from nemo_pixellm.data import sources
    from nemo_pixellm.evaluate import load
    from nemo_pixellm.generate import RequestError, open_request_image, prompt_from_request

    ckpt = trained_checkpoint
    for name, size in (("wide.png", (300, 170)), ("tall.jpg", (90, 260)), ("small.png", (100, 100))):
        image = Image.new("RGB", size, (40, 90, 200))
        ImageDraw.Draw(image).ellipse((10, 10, 60, 60), fill=(220, 30, 30))
        image.save(tmp_path / name)
    wide, tall, small = (str(tmp_path / name) for name in ("wide.png", "tall.jpg", "small.png"))
    asks = [{"prompt": "What colour is the circle?", "images": [wide]},
            {"prompt": "How many circles are there?"},
            {"prompt": "What is in the picture?", "images": [tall]},
            {"prompt": "Left: <image> right: <image> which one is wider?", "images": [small, small]}]
    (tmp_path / "asks.jsonl").write_text("".join(json.dumps(a) + "\n" for a in asks[1:]))
    env = dict(os.environ, NEMO_PIXELLM_CACHE=str(cache_dir))

    def cli(*args, check=True):
        proc = subprocess.run([PYTHON, "-m", "nemo_pixellm.generate", f"checkpoint={ckpt}", "max_new_tokens=6", *args],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert not check or proc.returncode == 0, proc.stderr[-3000:]
        return proc

    streamed = cli(f"image={wide}", f"prompt={asks[0]['prompt']}", "greedy=true").stdout.strip()  # only the answer
    batched = [json.loads(line) for line in cli(f"requests={tmp_path / 'asks.jsonl'}", "batch_size=2").stdout.splitlines()]
    assert [r["prompt"] for r in batched] == [a["prompt"] for a in asks[1:]]

    model, data_config, _ = load(str(ckpt))
    tokenizer = sources.load_tokenizer(data_config)
    expected, views = [], []
    for ask in asks:
        pictures = [open_request_image(p) for p in ask.get("images", [])]
        prompt = prompt_from_request(tokenizer, ask["prompt"], pictures, data_config)
        views.append(prompt.views.shape[0])
        out = generate(model, [prompt], tokenizer.eos_id, tokenizer.pad_id, max_new_tokens=6, use_cache=False)[0]
        expected.append(tokenizer.decode(out).strip())
    assert [streamed] + [r["answer"] for r in batched] == expected
    layout = lambda w, h, n=1: tiling.image_layout(w, h, tile=data_config.image_size, max_tiles=data_config.max_tiles,  # noqa: E731
                                                   images_in_sample=n)
    assert views == [layout(300, 170).views, 0, layout(90, 260).views, 2 * layout(100, 100, 2).views]
    assert layout(300, 170).grid != layout(90, 260).grid  # the aspect ratio chose the tiles

    # chat=true: two turns about the wide picture, streamed; the same answers as a Chat on the loaded model.
    import io

    from nemo_pixellm.generate import Chat, GenerateArgs, run

    turns = ["What colour is the circle?", "How many circles are there?", ""]
    streamed_chat = io.StringIO()
    said = run(GenerateArgs(checkpoint=str(ckpt), chat=True, image=wide, max_new_tokens=6, greedy=True, ema=False),
               out=streamed_chat, turns=turns)
    chat = Chat(model, tokenizer, data_config, context=model.config.seq_length, max_new_tokens=6)
    expected_chat = [tokenizer.decode(chat.ask(turns[0], [open_request_image(wide)])).strip(),
                     tokenizer.decode(chat.ask(turns[1])).strip()]
    assert said == expected_chat and [line.strip() for line in streamed_chat.getvalue().splitlines()] == expected_chat

    too_long = cli(f"image=[{wide},{tall}]", "prompt=which is wider?", check=False)  # 93 + 81 image positions
    assert too_long.returncode == 2 and "need 174 positions, more than the model's context of 128" in too_long.stderr
    missing = cli(f"image={tmp_path / 'nope.png'}", "prompt=hi", check=False)
    assert missing.returncode == 2 and f"image {tmp_path / 'nope.png'}: no such file" in missing.stderr
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(RequestError, match="not an image the decoder can read"):
        open_request_image(str(tmp_path / "bad.jpg"))
    with pytest.raises(ValueError, match="2 <image> placeholder"):
        prompt_from_request(tokenizer, "<image> and <image>", [open_request_image(wide)], data_config)


def test_chat_keeps_the_conversation_and_its_cache(megatron_single_process):
    """Chat: each turn's answer equals decoding the whole conversation so far (laid out as training lays out a
    multi-turn chat: answer, <|end|>, next user turn; images in later turns too) without any cache, while only
    the new turn's tokens run through the model."""
    from test_export import randomize
    from test_hf_vlm import LAYOUT, picture, word_tokenizer

    from nemo_pixellm.generate import Chat, prompt_from_request

    tokenizer = word_tokenizer()
    model = build_pixellm(megatron_single_process, vocab_size=64, seq_length=256, image_token_id=tokenizer.image_id,
                          **TINY_LM, **TINY_VISION_56, seed=3)
    randomize(model, seed=2)
    chat = Chat(model, tokenizer, LAYOUT, context=256, max_new_tokens=6)
    fed = []
    hook = model.register_forward_pre_hook(lambda module, args: fed.append(args[0].shape[1]))
    tokens, blocks, views, grids = [], [], [], []
    for text, images in [("what colour is the square", [picture(90, 60, 1)]), ("how many circle", []),
                         ("what text say", [picture(40, 130, 2)])]:
        fed.clear()
        pending = len(tokens) - chat.cache.slots()
        answer = chat.ask(text, images)
        this_turn = list(fed)  # the sequence lengths the chat's forwards ran
        turn = prompt_from_request(tokenizer, text, images, LAYOUT)
        whole = Prompt(tokens + turn.tokens, blocks + turn.blocks, torch.cat(views + [turn.views]),
                       torch.cat(grids + [turn.grids]))
        assert answer == generate(model, [whole], tokenizer.eos_id, tokenizer.pad_id, max_new_tokens=6, use_cache=False)[0]
        assert this_turn[0] == pending + len(turn.tokens) and set(this_turn[1:]) <= {1}  # this turn, then 1 a step
        tokens += turn.tokens + answer + [tokenizer.eos_id]
        blocks += turn.blocks + [tiling.TextBlock(len(answer) + 1)]
        views, grids = views + [turn.views], grids + [turn.grids]
    hook.remove()
    assert chat.tokens == tokens and len(tokens) > 60
    with pytest.raises(ValueError, match="the conversation needs .* positions .* context of 30"):
        Chat(model, tokenizer, LAYOUT, context=30, max_new_tokens=6).ask("what colour", [picture(90, 60, 1)])


def follow_transformer_engines_mask_rules(monkeypatch) -> list[bool]:
    """Make the local core attention apply masks as Transformer Engine's does: an explicit attention_mask only under
    AttnMaskType.arbitrary; else its mask type alone (causal: top-left aligned when queries and keys differ in
    number, as torch's is_causal). Returns, per call given a mask, whether the mask was announced."""
    from megatron.core.transformer.enums import AttnMaskType

    from nemo_pixellm.models.core_attention import SDPACoreAttention

    sdpa, announced = SDPACoreAttention.forward, []

    def te_rules(self, query, key, value, attention_mask, attn_mask_type=None, **kwargs):
        arbitrary = (attn_mask_type or self.attn_mask_type) == AttnMaskType.arbitrary
        if attention_mask is not None:  # (the vision tower's calls have none)
            announced.append(arbitrary)
        return sdpa(self, query, key, value, attention_mask if arbitrary else None, attn_mask_type, **kwargs)

    monkeypatch.setattr(SDPACoreAttention, "forward", te_rules)
    return announced


def test_decoding_is_right_under_transformer_engines_mask_rules(model, monkeypatch):
    """With a core attention that applies masks as Transformer Engine does, and the cache re-expanded as on TE (no
    absorbed form: TE fuses kv_layernorm into linear_kv_up_proj), a right-padded batch decodes the tokens of
    uncached decoding: decoding announces every mask it relies on (before, TE's causal kernel would have let each
    decoding step see only the first cached token)."""
    prompts = _prompts(torch.Generator().manual_seed(4))
    want = generate(model, prompts, eos_id=1, pad_id=0, max_new_tokens=6, use_cache=False)
    announced = follow_transformer_engines_mask_rules(monkeypatch)
    monkeypatch.setattr(PixelMLASelfAttention, "_absorbable", lambda self: False)
    assert generate(model, prompts, eos_id=1, pad_id=0, max_new_tokens=6) == want and sum(map(len, want)) >= 12
    assert announced and all(announced)
