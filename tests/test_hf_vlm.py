"""The whole exported VLM in transformers (nemo_pixellm.hf.PixelLMForConditionalGeneration + PixelLMProcessor,
built from transformers' SiglipVisionModel and DeepseekV3ForCausalLM, or LlamaForCausalLM for a PaliGemma-style
grouped-query decoder with tied embeddings): for either, on requests with images of other sizes and
aspect ratios, several images and none, its logits equal the Megatron model's on the same weights, and its
generate() gives the tokens of the plugin's own decoding."""

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

from conftest import TINY_LM, TINY_VISION_56, build_pixellm
from nemo_pixellm import tiling
from nemo_pixellm.data.tokenizer import PixelTokenizer
from nemo_pixellm.export.__main__ import export_model
from nemo_pixellm.generate import generate, prompt_from_request
from nemo_pixellm.hf import PixelLMForConditionalGeneration, PixelLMProcessor
from nemo_pixellm.hf.pixellm import answer_tokens

from test_export import randomize

WORDS = "what colour is the shape left of circle square red green blue how many text say".split()
LAYOUT = SimpleNamespace(image_size=56, patch_size=14, downsample=2, max_tiles=4)


def word_tokenizer() -> PixelTokenizer:
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PixelTokenizer(tokenizer)


def picture(width: int, height: int, seed: int) -> Image.Image:
    pixels = torch.randint(0, 256, (height, width, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


REQUESTS = [("what colour is the square", [picture(90, 60, 1)]),  # 2 x 1 tiles
            ("how many circle", [picture(40, 130, 2), picture(56, 56, 3)]),  # two images, other grids
            ("what text say", []),  # text only
            ("what is the shape left", [picture(90, 60, 4), picture(40, 40, 5), picture(70, 30, 6)])]  # 3: untiled


# PaliGemma-style: grouped-query attention with one key / value head, dense, tied embeddings, M-RoPE with its
# frequency pairs interleaved t h w t h w .. (Qwen3-VL's; the MLA model keeps Qwen2-VL's chunks)
GQA_LM = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, multi_latent_attention=False,
              num_query_groups=1, kv_channels=16, qk_layernorm=False, num_moe_experts=None, moe_layer_freq=1,
              share_embeddings_and_output_weights=True, mrope_section=[3, 3, 2], mrope_interleaved=True)
LANGUAGE_MODELS = {"mla": TINY_LM, "gqa": GQA_LM}


def model_sizes(kind: str, tokenizer) -> dict:
    # the MLA model also carries the image position code (its own channels of each image token) through the export
    return dict(vocab_size=64, seq_length=256, image_token_id=tokenizer.image_id, **LANGUAGE_MODELS[kind],
                **TINY_VISION_56, image_position_code=kind == "mla")


@pytest.fixture(scope="module", params=list(LANGUAGE_MODELS))
def exported(request, megatron_single_process, tmp_path_factory):
    tokenizer = word_tokenizer()
    model = build_pixellm(megatron_single_process, **model_sizes(request.param, tokenizer))
    randomize(model, seed=5)
    out = tmp_path_factory.mktemp("export")
    export_model(model, out, tokenizer, LAYOUT)
    return model, tokenizer, out


def test_logits_equal_the_megatron_model(exported):
    model, tokenizer, out = exported
    hf = PixelLMForConditionalGeneration.from_pretrained(out)
    processor = PixelLMProcessor.from_pretrained(out)
    for text, images in REQUESTS:
        inputs = processor(text, images=images)
        prompt = prompt_from_request(tokenizer, text, images, LAYOUT)
        assert inputs["input_ids"][0].tolist() == prompt.tokens  # the processor lays it out as training did
        with torch.no_grad():
            expected = model(torch.tensor([prompt.tokens]), tiling.mrope_positions(prompt.blocks)[:, None],
                             images=prompt.views if len(images) else None, image_grids=prompt.grids)
            got = hf(**inputs).logits
        print(f"{text!r} ({len(images)} images, {len(prompt.tokens)} tokens): "
              f"max |logit diff| {(got - expected).abs().max():.2e} of {expected.abs().max():.2f}")
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_generate_gives_the_plugin_s_greedy_tokens(exported):
    """A left-padded batch through transformers' generate (its KV cache, the M-RoPE ids it extends per token)
    against the plugin's generate (MLA latent cache, right-padded): the same tokens, and each step's logits."""
    model, tokenizer, out = exported
    hf = PixelLMForConditionalGeneration.from_pretrained(out)
    processor = PixelLMProcessor.from_pretrained(out)
    prompts = [prompt_from_request(tokenizer, text, images, LAYOUT) for text, images in REQUESTS]
    scores = []
    expected = generate(model, prompts, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, max_new_tokens=8, scores=scores)
    inputs = processor([t for t, _ in REQUESTS], images=[ims for _, ims in REQUESTS])
    with torch.no_grad():
        output = hf.generate(**inputs, max_new_tokens=8, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    new = output.sequences[:, inputs["input_ids"].shape[1]:].tolist()
    got = [answer_tokens(row, tokenizer.eos_id) for row in new]  # then pads
    print("plugin:", expected, "transformers:", got)
    assert got == expected and sum(map(len, expected)) >= 8
    for step, (ours, theirs) in enumerate(zip(scores, output.logits)):
        active = [i for i, answer in enumerate(expected) if step <= len(answer)]  # rows that had not ended
        torch.testing.assert_close(theirs[active], ours[active], rtol=1e-5, atol=1e-5 * ours.abs().max().item())
    assert processor.decode(output.sequences[0, inputs["input_ids"].shape[1]:]) == tokenizer.decode(expected[0])


def test_generate_cli_reads_an_export(exported, tmp_path):
    """python -m nemo_pixellm.generate checkpoint=<export dir>: the streamed single answer and the JSONL batch
    are the Megatron model's greedy answers to the same image files."""
    import io
    import json

    from nemo_pixellm.generate import GenerateArgs, RequestError, run

    model, tokenizer, out = exported
    files = []
    for number, (_, images) in enumerate(REQUESTS):
        files.append([str(tmp_path / f"{number}_{i}.png") for i in range(len(images))])
        for image, path in zip(images, files[-1]):
            image.save(path)
    prompts = [prompt_from_request(tokenizer, text, images, LAYOUT) for text, images in REQUESTS]
    expected = [tokenizer.decode(tokens).strip() for tokens in
                generate(model, prompts, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, max_new_tokens=8)]
    streamed = io.StringIO()
    said = run(GenerateArgs(checkpoint=str(out), prompt=REQUESTS[0][0], image=files[0], max_new_tokens=8,
                            greedy=True), out=streamed)
    assert said == [expected[0]] and streamed.getvalue().strip() == expected[0]
    asks = tmp_path / "asks.jsonl"
    asks.write_text("".join(json.dumps({"prompt": text, "images": paths}) + "\n"
                            for (text, _), paths in zip(REQUESTS, files)))
    lines = io.StringIO()
    assert run(GenerateArgs(checkpoint=str(out), requests=str(asks), max_new_tokens=8, batch_size=2), out=lines) == expected
    assert [json.loads(line)["answer"] for line in lines.getvalue().splitlines()] == expected
    # Requests that do not fit the context (seq_length 256) are refused before decoding.
    with pytest.raises(RequestError, match=r"\d+ positions \(\d+ for images\) \+ max_new_tokens=250 exceed the "
                                           r"model's context of 256 \(seq_length\)"):
        run(GenerateArgs(checkpoint=str(out), prompt="what colour", image=files[0], max_new_tokens=250))
    with pytest.raises(RequestError, match=r"images .* need 260 positions, more than the model's context of 256"):
        run(GenerateArgs(checkpoint=str(out), prompt="how many", image=files[0] * 20, max_new_tokens=1))
    print("answers:", expected)


def test_chat_on_an_export_keeps_its_cache(exported, tmp_path):
    """chat=true on an export directory: transformers' generate continues the conversation's KV cache; each turn's
    answer and every step's logits equal the Megatron model's Chat (itself equal to uncached decoding of the whole
    conversation), and only the new turn's tokens run through the language model."""
    import io

    from nemo_pixellm.generate import Chat, ExportedChat, GenerateArgs, run

    model, tokenizer, out = exported
    hf = PixelLMForConditionalGeneration.from_pretrained(out)
    turns = [("what colour is the square", [picture(90, 60, 1)]), ("how many circle", []),
             ("what text say", [picture(40, 130, 2)])]
    our_logits, their_logits, fed = [], [], []
    ours = Chat(model, tokenizer, LAYOUT, context=256, max_new_tokens=6, scores=our_logits)
    theirs = ExportedChat(hf, PixelLMProcessor.from_pretrained(out), context=256, max_new_tokens=6)
    hooks = [hf.language_model.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["inputs_embeds"].shape[1]),
                                                         with_kwargs=True),
             hf.language_model.register_forward_hook(lambda m, a, output: their_logits.append(output.logits[:, -1]))]
    answers = []
    for text, images in turns:
        fed.clear()
        pending = len(theirs.tokens) - theirs.cached()
        answers.append(theirs.ask(text, images))
        turn = prompt_from_request(tokenizer, text, images, LAYOUT)
        assert answers[-1] == ours.ask(text, images)
        assert fed[0] == pending + len(turn.tokens) and set(fed[1:]) <= {1}  # this turn, then one token a step
    for hook in hooks:
        hook.remove()
    assert len(their_logits) == len(our_logits) == sum(len(a) + 1 if len(a) < 6 else 6 for a in answers)
    for step, (a, b) in enumerate(zip(their_logits, our_logits)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=f"step {step}")
    assert theirs.tokens == ours.tokens and sum(map(len, answers)) >= 8
    print("chat answers:", answers)
    # the CLI: one turn per line, the picture with the first
    path = tmp_path / "first.png"
    turns[0][1][0].save(path)
    streamed = io.StringIO()
    said = run(GenerateArgs(checkpoint=str(out), chat=True, image=str(path), max_new_tokens=6, greedy=True),
               out=streamed, turns=[turns[0][0], turns[1][0], ""])
    assert said == [tokenizer.decode(a).strip() for a in answers[:2]] == streamed.getvalue().split("\n")[:2]


def test_an_export_imports_back(exported, megatron_single_process, tmp_path):
    """model.pretrained_export_path=<export dir> starts the whole Megatron VLM from an export: every tensor equals
    the exported model's (from another seed's start), and exporting it again writes the same bytes; a misfit is
    refused naming the tensor or the key."""
    model, tokenizer, out = exported
    kind = "mla" if model.config.multi_latent_attention else "gqa"
    assert json.loads((out / "language_model" / "config.json").read_text())["architectures"] == [
        {"mla": "DeepseekV3ForCausalLM", "gqa": "LlamaForCausalLM"}[kind]]
    sizes = model_sizes(kind, tokenizer)
    back = build_pixellm(megatron_single_process, seed=99, pretrained_export_path=str(out), **sizes)
    ours, theirs = back.state_dict(), model.state_dict()
    assert set(ours) == set(theirs)
    differ = [k for k in theirs if not k.endswith("_extra_state") and not torch.equal(ours[k], theirs[k])]
    assert not differ, differ
    export_model(back, tmp_path / "again", tokenizer, LAYOUT)  # export -> import -> export
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    assert [f for f in files if (out / f).read_bytes() != (tmp_path / "again" / f).read_bytes()] == []
    with pytest.raises(ValueError, match=r"projector.safetensors: mlp.encoder.linear_fc1.\w+ has the shape \(64.*, the "
                                         r"projector's is \(48.*model.projector_ffn_hidden_size"):
        build_pixellm(megatron_single_process, pretrained_export_path=str(out), projector_ffn_hidden_size=48, **sizes)
    with pytest.raises(ValueError, match=r"exported with image token id \d+, the tokenizer's is 3: .*\(dataset.tokenizer_path="):
        build_pixellm(megatron_single_process, pretrained_export_path=str(out), **{**sizes, "image_token_id": 3})


def test_not_an_export_is_refused(tmp_path):
    from nemo_pixellm.training.validate import ConfigError, validate_model_keys

    with pytest.raises(FileNotFoundError, match="not a PixelLM export .*pixellm.json.*python -m nemo_pixellm.export"):
        PixelLMForConditionalGeneration.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"model.pretrained_export_path=.* \(no pixellm.json there\).*nemo_pixellm.export"):
        validate_model_keys({"pretrained_export_path": str(tmp_path)})
