"""Grouped-query attention as a PixelLM option (model.multi_latent_attention=false, model.num_query_groups):
logits equal transformers' Qwen2-VL language model (GQA + M-RoPE) on the same weights and position ids, and
LlamaForCausalLM's with plain 1D positions; cached decoding equals uncached decoding."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2VLTextConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel
from megatron.bridge.training.utils.packed_seq_utils import get_packed_seq_params

from nemo_pixellm.data.dataset import packed_segments
from nemo_pixellm.hf.llama import gqa_to_hf

from conftest import build_pixellm
from test_export import randomize
from test_mrope import image_ids

HIDDEN, HEADS, GROUPS, HEAD_DIM, FFN, LAYERS, VOCAB, SECTIONS = 64, 4, 2, 16, 128, 2, 256, [2, 3, 3]
GQA = dict(num_layers=LAYERS, hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=HEADS,
           multi_latent_attention=False, num_query_groups=GROUPS, kv_channels=HEAD_DIM, qk_layernorm=False,
           num_moe_experts=None, moe_layer_freq=1, rotary_base=10000, vocab_size=VOCAB, seq_length=64,
           image_token_id=5, vision_hidden_size=32, vision_num_layers=1, vision_num_attention_heads=2,
           vision_ffn_hidden_size=64, vision_image_size=56)


def load_into(hf_model, model) -> None:
    state = gqa_to_hf(model.language_model.state_dict(), model.language_model.config)
    prefix = "" if isinstance(hf_model, LlamaForCausalLM) else "model."
    theirs = {k.removeprefix(prefix): v for k, v in state.items() if prefix or True}
    if not isinstance(hf_model, LlamaForCausalLM):
        theirs = {k: v for k, v in theirs.items() if not k.startswith("lm_head")}
    missing, unexpected = hf_model.load_state_dict(theirs, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k], (missing, unexpected)


@pytest.fixture(scope="module")
def qwen_like(megatron_single_process):
    model = build_pixellm(megatron_single_process, add_qkv_bias=True, mrope_section=SECTIONS, **GQA)
    randomize(model, seed=4)
    return model


def test_gqa_with_mrope_equals_qwen2_vl(qwen_like):
    model = qwen_like
    attention = model.language_model.decoder.layers[0].self_attention
    assert attention.linear_qkv.weight.shape[0] == (HEADS + 2 * GROUPS) * HEAD_DIM  # 4 query, 2 key/value heads
    config = Qwen2VLTextConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                               num_attention_heads=HEADS, num_key_value_heads=GROUPS, rms_norm_eps=1e-6,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": SECTIONS})
    config._attn_implementation = "eager"
    hf = Qwen2VLTextModel(config).eval()
    load_into(hf, model)
    ids = torch.randint(6, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    positions = image_ids(2, 40, torch.Generator().manual_seed(2))  # a 4x6 image grid inside text
    with torch.no_grad():
        hidden = hf(input_ids=ids, position_ids=positions).last_hidden_state
        expected = hidden @ model.language_model.output_layer.weight.T
        got = model(ids, positions)
        shifted = model(ids, torch.arange(40).expand(3, 2, 40))
    print(f"GQA + M-RoPE vs Qwen2-VL: max |logit diff| {(got - expected).abs().max():.2e} of {expected.abs().max():.2f}")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert (shifted - got).abs().max() > 1e-3  # the image ids reached the attention


def test_gqa_with_1d_positions_equals_llama(megatron_single_process):
    model = build_pixellm(megatron_single_process, **GQA)
    randomize(model, seed=6)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=GROUPS, rms_norm_eps=1e-6, head_dim=HEAD_DIM,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    hf = LlamaForCausalLM(config).eval()
    load_into(hf, model)
    ids = torch.randint(6, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(40).expand(2, 40) + torch.tensor([[0], [7]])  # explicit, per-sample offsets
    with torch.no_grad():
        expected = hf(input_ids=ids, position_ids=positions).logits
        got = model(ids, positions)
    print(f"GQA + RoPE vs Llama: max |logit diff| {(got - expected).abs().max():.2e} of {expected.abs().max():.2f}")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_gqa_cached_decoding_equals_uncached(qwen_like, monkeypatch):
    from nemo_pixellm.generate import generate
    from test_generate import _prompts, follow_transformer_engines_mask_rules

    prompts = _prompts(torch.Generator().manual_seed(4))
    cached_scores, uncached_scores = [], []
    cached = generate(qwen_like, prompts, eos_id=1, pad_id=0, max_new_tokens=6, scores=cached_scores)
    uncached = generate(qwen_like, prompts, eos_id=1, pad_id=0, max_new_tokens=6, use_cache=False,
                        scores=uncached_scores)
    assert cached == uncached and sum(map(len, cached)) >= 6
    for a, b in zip(cached_scores, uncached_scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    # The same tokens when masks are applied as Transformer Engine applies them (test_generate.py).
    announced = follow_transformer_engines_mask_rules(monkeypatch)
    assert generate(qwen_like, prompts, eos_id=1, pad_id=0, max_new_tokens=6) == cached and announced and all(announced)


@pytest.mark.slow
def test_paligemma_cpu_variant_trains_stage2(cache_dir, tmp_path):
    """variant=paligemma_cpu (paligemma_tiny's shape at CPU sizes: one key / value head, dense, tied embeddings)
    trains stage 2 through the entry point: the loss falls and the checkpoint holds one embedding matrix and
    grouped-query projections."""
    from conftest import QUICK, losses, run_train
    from test_training import checkpoint_tensors

    run_train(["+stage=stage2", "variant=paligemma_cpu", *QUICK, "train.train_iters=6", "scheduler.lr_warmup_iters=1",
               f"checkpoint.save={tmp_path / 'ckpt'}", f"run_dir={tmp_path / 'run'}"], cache_dir)
    loss = losses(tmp_path / "run")
    print("paligemma_cpu stage 2 losses:", loss)
    assert loss[6] < loss[1]
    tensors = checkpoint_tensors(tmp_path / "ckpt", tmp_path)
    assert not [n for n in tensors if "output_layer" in n]  # tied: the embedding is the output layer
    qkv = tensors["language_model.decoder.layers.self_attention.linear_qkv.weight"]  # the layers stacked
    assert qkv.shape == (2, (4 + 2 * 1) * 16, 64)  # 4 query heads, 1 key and 1 value head of 16


def test_irope_with_chunked_attention_equals_llama4(megatron_single_process):
    """LLaMA 4's iRoPE (model.no_rope_freq=4: every 4th layer without rotary and with full causal attention, the
    others rotary and attending within chunks of model.attention_chunk_size tokens): logits equal transformers'
    Llama4ForCausalLM (dense layers, interleaved rotary pairs as LLaMA 4 rotates) on a sequence five chunks long,
    for a batch whose rows are right-padded to different lengths; chunking changes the logits; packed samples are
    chunked each from its own start."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    chunk, seq, layers = 8, 40, 4
    sizes = {**GQA, "num_layers": layers, "no_rope_freq": 4, "rotary_interleaved": True, "mrope_section": SECTIONS}
    model = build_pixellm(megatron_single_process, attention_chunk_size=chunk, **sizes)
    randomize(model, seed=8)
    config = Llama4TextConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, intermediate_size_mlp=FFN,
                              num_hidden_layers=layers, num_attention_heads=HEADS, num_key_value_heads=GROUPS,
                              head_dim=HEAD_DIM, rms_norm_eps=1e-6, moe_layers=[], no_rope_layers=[1, 1, 1, 0],
                              attention_chunk_size=chunk, use_qk_norm=False, attn_temperature_tuning=False,
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    hf = Llama4ForCausalLM(config).eval()
    state = {k.replace(".mlp.", ".feed_forward."): v
             for k, v in gqa_to_hf(model.language_model.state_dict(), model.language_model.config).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k], (missing, unexpected)

    ids = torch.randint(6, VOCAB, (2, seq), generator=torch.Generator().manual_seed(1))
    lengths = [seq, 29]  # the second row right-padded: its padding is no token of any chunk
    padding = torch.tensor([[i >= n for i in range(seq)] for n in lengths])
    mask = (torch.ones(seq, seq, dtype=torch.bool).tril()[None] & ~padding[:, None, :])[:, None]
    with torch.no_grad():
        got = model(ids, torch.arange(seq).expand(2, seq), attention_mask=~mask)
        unchunked = build_pixellm(megatron_single_process, **sizes)
        unchunked.load_state_dict(model.state_dict())
        full = unchunked(ids, torch.arange(seq).expand(2, seq), attention_mask=~mask)
        for row, n in enumerate(lengths):
            expected = hf(input_ids=ids[row:row + 1, :n]).logits[0]
            diff = (got[row, :n] - expected).abs().max()
            print(f"iRoPE, chunks of {chunk}, row of {n} tokens: max |logit diff| {diff:.2e} of {expected.abs().max():.2f}")
            torch.testing.assert_close(got[row, :n], expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert torch.equal(got[:, :chunk], full[:, :chunk]) and (got[:, chunk:] - full[:, chunk:]).abs().max() > 1e-3

    # Two samples packed in one row (block-diagonal mask, positions from 0 in each): each counts its chunks from
    # its own first token, so the row's logits are the samples' logits alone.
    def causal(n):
        return ~torch.ones(n, n, dtype=torch.bool).tril()[None, None]

    first = 21  # neither sample a whole number of chunks
    packed_mask = causal(seq)
    packed_mask[..., first:, :first] = True
    positions = torch.cat([torch.arange(first), torch.arange(seq - first)])[None]
    with torch.no_grad():
        packed = model(ids[:1], positions, attention_mask=packed_mask)[0]
        alone = torch.cat([model(part, torch.arange(part.shape[1])[None], attention_mask=causal(part.shape[1]))[0]
                           for part in (ids[:1, :first], ids[:1, first:])])
        segments = (torch.arange(seq) >= first).long()[None]  # the same row as THD (PackedSeqParams)
        thd = model(ids[:1], positions, packed_seq_params=get_packed_seq_params(packed_segments(segments)))[0]
    print(f"iRoPE packed row of {first} + {seq - first} tokens vs alone: mask {(packed - alone).abs().max():.2e}, "
          f"THD {(thd - alone).abs().max():.2e}")
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5 * alone.abs().max().item())
    torch.testing.assert_close(thd, alone, rtol=1e-5, atol=1e-5 * alone.abs().max().item())

    # Cached decoding of right-padded prompts longer than a chunk: each step's logits as without the cache.
    from nemo_pixellm.generate import generate
    from test_generate import _prompts

    prompts = _prompts(torch.Generator().manual_seed(4))
    assert max(len(p.tokens) for p in prompts) > chunk and len({len(p.tokens) for p in prompts}) > 1
    cached_scores, uncached_scores = [], []
    cached = generate(model, prompts, eos_id=1, pad_id=0, max_new_tokens=10, scores=cached_scores)
    uncached = generate(model, prompts, eos_id=1, pad_id=0, max_new_tokens=10, use_cache=False, scores=uncached_scores)
    assert cached == uncached
    for a, b in zip(cached_scores, uncached_scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.slow
def test_llama4_cpu_variant_trains_stage2(cache_dir, tmp_path):
    """variant=llama4_cpu (llama4_tiny's shape: GQA, iRoPE 3:1 with chunks of 32 of the 128 positions, MoE 8
    experts top-2 + shared) trains stage 2 through the entry point and its loss falls."""
    from conftest import QUICK, losses, run_train

    run_train(["+stage=stage2", "variant=llama4_cpu", *QUICK, "train.train_iters=6", "scheduler.lr_warmup_iters=1",
               f"run_dir={tmp_path / 'run'}"], cache_dir)
    loss = losses(tmp_path / "run")
    print("llama4_cpu stage 2 losses:", loss)
    assert loss[6] < loss[1]


def test_gqa_language_model_exports_as_qwen2_and_imports_back(qwen_like, megatron_single_process, tmp_path):
    """A grouped-query language model with q / k / v biases is written as transformers' Qwen2ForCausalLM (the
    export's language_model/), which AutoModelForCausalLM loads with equal logits at text positions, and
    model.language_pretrained_path starts a model from it tensor for tensor; a MoE grouped-query model and a
    checkpoint of the other attention kind are refused by name."""
    from transformers import AutoModelForCausalLM

    from nemo_pixellm.hf.language_model import write_hf_language_model

    language_model = qwen_like.language_model
    write_hf_language_model(language_model.state_dict(), language_model.config, VOCAB, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, attn_implementation="eager").eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    ids = torch.randint(6, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = hf(input_ids=ids).logits, qwen_like(ids, torch.arange(40).expand(3, 2, 40))
    print(f"export as Qwen2ForCausalLM: max |logit diff| {(got - expected).abs().max():.2e} of {expected.abs().max():.2f}")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())

    sizes = dict(add_qkv_bias=True, mrope_section=SECTIONS, **GQA)
    back = build_pixellm(megatron_single_process, seed=11, language_pretrained_path=str(tmp_path / "hf"), **sizes)
    theirs = back.language_model.state_dict()
    assert all(torch.equal(t, theirs[k]) for k, t in language_model.state_dict().items() if "_extra_state" not in k)

    moe = build_pixellm(megatron_single_process, **{**GQA, "num_moe_experts": 4, "moe_router_topk": 2,
                                                    "moe_ffn_hidden_size": 32})
    with pytest.raises(ValueError, match="model.num_moe_experts=4 cannot be exported to Hugging Face: transformers has no "
                                         "class with this MoE"):
        write_hf_language_model(moe.language_model.state_dict(), moe.language_model.config, VOCAB, tmp_path / "moe")
    from conftest import TINY_LM

    with pytest.raises(ValueError, match=r"holds a qwen2 model; the configured model has multi-latent attention, which "
                                         r"starts from deepseek_v3"):
        build_pixellm(megatron_single_process, language_pretrained_path=str(tmp_path / "hf"),
                      **{**TINY_LM, "vocab_size": VOCAB, "seq_length": 64, "image_token_id": 5})
