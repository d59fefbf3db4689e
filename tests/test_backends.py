"""One distributed checkpoint for both backends: the local (pure PyTorch) layers store every tensor under the
name Transformer Engine's spec gives it, so a checkpoint trained with TE on GPUs loads on a CPU box and back.

Expected names: Megatron-Core's get_gpt_layer_with_transformer_engine_submodules (MLA with qk_layernorm):
q_layernorm / kv_layernorm are IdentityOp and TELayerNormColumnParallelLinear fills linear_q_up_proj /
linear_kv_up_proj (their norm weight is ``layer_norm_weight``); a dense layer's pre_mlp_layernorm is
IdentityOp and its linear_fc1 a TELayerNormColumnParallelLinear; an MoE layer keeps a separate TENorm;
experts are stored as ``experts.experts.*`` by both SequentialMLP and TEGroupedMLP. On TE the plugin's layer
builder gives Megatron's TE layer slot for slot."""

import torch

from conftest import TINY_LM, TINY_VISION_56, build_pixellm

ATTENTION = ["input_layernorm.weight", "self_attention.linear_q_down_proj.weight",
             "self_attention.linear_q_up_proj.layer_norm_weight", "self_attention.linear_q_up_proj.weight",
             "self_attention.linear_kv_down_proj.weight", "self_attention.linear_kv_up_proj.layer_norm_weight",
             "self_attention.linear_kv_up_proj.weight", "self_attention.linear_proj.weight"]
DENSE_MLP = ["mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
MOE_MLP = ["pre_mlp_layernorm.weight", "mlp.router.weight", "mlp.router.expert_bias",
           "mlp.experts.experts.linear_fc1.weight", "mlp.experts.experts.linear_fc2.weight",
           "mlp.shared_experts.linear_fc1.weight", "mlp.shared_experts.linear_fc2.weight"]
# Where the local layer keeps each renamed tensor.
LOCAL_NAME = {"self_attention.linear_q_up_proj.layer_norm_weight": "self_attention.q_layernorm.weight",
              "self_attention.linear_kv_up_proj.layer_norm_weight": "self_attention.kv_layernorm.weight",
              "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}


def tiny_model(pg, seed):
    return build_pixellm(pg, seed=seed, vocab_size=256, seq_length=32, image_token_id=5, **TINY_LM, **TINY_VISION_56)


def test_local_checkpoint_uses_transformer_engine_names(megatron_single_process, tmp_path):
    from megatron.core import dist_checkpointing

    model = tiny_model(megatron_single_process, seed=3)
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path))
    stored = {k: v for k, v in dist_checkpointing.load_plain_tensors(str(tmp_path)).items()
              if k.startswith("language_model.decoder.layers.") and isinstance(v, torch.Tensor)}
    expected = {f"language_model.decoder.layers.{layer}.{name}"
                for layer, mlp in enumerate([DENSE_MLP, MOE_MLP]) for name in ATTENTION + mlp}
    assert set(stored) == expected

    params = dict(model.named_parameters()) | dict(model.named_buffers())
    for key, tensor in stored.items():
        layer, name = key.removeprefix("language_model.decoder.layers.").split(".", 1)
        local = f"language_model.decoder.layers.{layer}.{LOCAL_NAME.get(name, name)}"
        if "experts.experts." in name:  # stored stacked over experts: [experts, ...]
            experts = model.language_model.decoder.layers[int(layer)].mlp.experts.local_experts
            fc = name.split(".")[-2]
            local_tensor = torch.stack([getattr(e, fc).weight for e in experts])
        else:
            local_tensor = params[local]
        torch.testing.assert_close(tensor, local_tensor.detach(), rtol=0, atol=0)

    # And it loads back: a model from another seed ends up with the same weights and logits.
    restored = tiny_model(megatron_single_process, seed=4)
    restored.load_state_dict(dist_checkpointing.load(restored.sharded_state_dict(), str(tmp_path)))
    for (name, p), (_, q) in zip(model.state_dict().items(), restored.state_dict().items()):
        if isinstance(p, torch.Tensor):
            torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


def _slots(spec):
    """A spec as nested plain values: partials by function and keywords, dataclasses by field."""
    import dataclasses
    import functools

    if isinstance(spec, functools.partial):
        return ("partial", _slots(spec.func), {k: _slots(v) for k, v in spec.keywords.items()})
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return (type(spec).__name__, {f.name: _slots(getattr(spec, f.name)) for f in dataclasses.fields(spec)})
    if isinstance(spec, dict):
        return {k: _slots(v) for k, v in spec.items()}
    return spec


def test_te_decoder_layer_is_megatron_s_te_layer(monkeypatch):
    """On Transformer Engine the plugin's layer builder gives exactly Megatron's TE MLA layer (norms fused into
    the up projections and the dense fc1, TELinear down projections, TE attention), and with
    multi_latent_attention=false Megatron's TE GQA layer (the input norm fused into qkv), with only the attention
    class changed to PixelLM's (and the MoE router to PixelLM's, which jitters in training only). Without TE installed Megatron binds TE's classes as distinct placeholders, so the
    slot-by-slot comparison still tells them apart."""
    from types import SimpleNamespace

    import megatron.core.models.gpt.gpt_layer_specs as megatron_specs
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    from nemo_pixellm.models.mla import PixelMLASelfAttention
    from nemo_pixellm.models.specs import decoder_layer_submodules

    monkeypatch.setattr(megatron_specs, "TESpecProvider", TESpecProvider)  # Megatron binds None without TE
    from nemo_pixellm.models.gqa import PixelSelfAttention

    for mla, attention in ((True, PixelMLASelfAttention), (False, PixelSelfAttention)):  # MLA, grouped-query
        for moe in (False, True):
            config = SimpleNamespace(multi_latent_attention=mla, qk_layernorm=True, num_moe_experts=8,
                                     moe_grouped_gemm=True, use_te_activation_func=False)
            ours = decoder_layer_submodules(TESpecProvider(), config, moe)
            megatron = megatron_specs.get_gpt_layer_with_transformer_engine_submodules(
                num_experts=8 if moe else None, moe_grouped_gemm=moe, qk_layernorm=True, multi_latent_attention=mla)
            assert megatron.self_attention.module is not attention
            megatron.self_attention.module = attention
            if moe:  # the two MoE classes the plugin puts in Megatron's slots (router.py, moe_layer.py)
                from functools import partial

                from nemo_pixellm.models.moe_layer import PixelMoELayer
                from nemo_pixellm.models.router import PixelTopKRouter

                assert megatron.mlp.keywords["submodules"].router is not PixelTopKRouter
                megatron.mlp.keywords["submodules"].router = PixelTopKRouter
                assert megatron.mlp.func is not PixelMoELayer and issubclass(PixelMoELayer, megatron.mlp.func)
                megatron.mlp = partial(PixelMoELayer, *megatron.mlp.args, **megatron.mlp.keywords)
            if not mla:  # Megatron's GQA layer also renames its TE op-fuser MLP's keys (mlp.0, mlp.1.basic_ops...),
                # which exist only with use_te_op_fuser, an MLP the plugin does not build
                assert all(k.startswith(("mlp.0.", "mlp.1.", "mlp.3.")) for k in megatron.sharded_state_dict_keys_map)
                megatron.sharded_state_dict_keys_map = {}
            assert _slots(ours) == _slots(megatron), (mla, moe)
            assert ours.sharded_state_dict_keys_map == {}  # TE's own names: nothing to rename


def test_grouped_experts_equal_megatron_sequential_mlp(megatron_single_process, monkeypatch):
    """The local backend's grouped-GEMM experts compute Megatron's SequentialMLP loop exactly: outputs, input
    gradients and every expert weight's gradient, with experts that get no token; without autograd too, both
    through the stacked weights (small experts, as the tiny model's) and the loop over experts with tokens."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    from nemo_pixellm.models import grouped_experts
    from nemo_pixellm.models.grouped_experts import GroupedLocalExperts

    model = tiny_model(megatron_single_process, seed=3)
    experts = model.language_model.decoder.layers[1].mlp.experts
    assert isinstance(experts, GroupedLocalExperts)
    generator = torch.Generator().manual_seed(0)
    for counts in ([3, 0, 5, 1, 0, 2, 4, 1], [0] * 8, [16, 0, 0, 0, 0, 0, 0, 0]):
        tokens = torch.tensor(counts)
        hidden = torch.randn(sum(counts), TINY_LM["hidden_size"], generator=generator)
        probs = torch.rand(sum(counts), generator=generator)
        upstream = torch.randn(sum(counts), TINY_LM["hidden_size"], generator=generator)
        results = []
        for forward in (GroupedLocalExperts.forward, SequentialMLP.forward):
            experts.zero_grad(set_to_none=True)
            x, p = hidden.clone().requires_grad_(), probs.clone().requires_grad_()
            out, _ = forward(experts, x, tokens, p)
            (out * upstream).sum().backward()
            no_grad_outs = []
            for stacked_limit in (grouped_experts.STACKED_DECODE_MAX_ELEMENTS, 0):  # stacked, then the loop
                monkeypatch.setattr(grouped_experts, "STACKED_DECODE_MAX_ELEMENTS", stacked_limit)
                with torch.no_grad():
                    no_grad_outs.append(forward(experts, hidden, tokens, probs)[0])
            grads = [torch.zeros_like(w) if w.grad is None else w.grad.clone() for w in experts.parameters()]
            results.append([out.detach(), *no_grad_outs, x.grad, p.grad, *grads])
        for grouped, loop in zip(*results):
            assert torch.equal(grouped, loop)


def test_moe_inference_without_the_dispatcher_equals_megatron_s_layer(megatron_single_process):
    """Without autograd the MoE layer skips the token dispatcher (moe_layer.py): its output equals Megatron's
    MoELayer forward (router, alltoall dispatcher, experts, combine, shared expert) bit for bit, with experts that
    get no token, padding rows the router leaves out, and one token per row as in decoding."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from nemo_pixellm.models.moe_layer import PixelMoELayer

    model = tiny_model(megatron_single_process, seed=3).eval()
    layer = model.language_model.decoder.layers[1].mlp
    assert isinstance(layer, PixelMoELayer) and layer._dispatch_free()
    calls = []
    by_expert_index = layer.experts.by_expert_index
    layer.experts.by_expert_index = lambda *args: (
        calls.append(torch.bincount(args[2].flatten(), minlength=TINY_LM["num_moe_experts"])) or by_expert_index(*args))
    generator = torch.Generator().manual_seed(0)
    for seq, batch, padded in ((1, 1, False), (1, 5, False), (12, 3, False), (12, 3, True)):
        hidden = torch.randn(seq, batch, TINY_LM["hidden_size"], generator=generator)
        padding = (torch.rand(batch, seq, generator=generator) < 0.7) if padded else None
        with torch.no_grad():
            ours, _ = layer(hidden, padding_mask=padding)
            megatrons, _ = MoELayer.forward(layer, hidden, padding_mask=padding)
        assert torch.equal(ours, megatrons), (seq, batch, padded)
    assert len(calls) == 4 and any((n == 0).any() for n in calls) and any((n > 1).any() for n in calls)


def test_moe_training_without_the_dispatcher_equals_megatron_s_layer(megatron_single_process):
    """In training, on one rank, the MoE layer routes by index instead of through the token dispatcher: output,
    input gradient, every weight's gradient and the router's expert-bias token counts equal those of Megatron's
    MoELayer forward (router, alltoall dispatcher, experts, combine, shared expert). (No padding mask: Megatron
    0.19.2's expert-bias count cannot broadcast one, in either path.)"""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    model = tiny_model(megatron_single_process, seed=3).train()
    layer = model.language_model.decoder.layers[1].mlp
    assert layer._dispatch_free() and layer.router.expert_bias is not None
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(12, 3, TINY_LM["hidden_size"], generator=generator)
    upstream = torch.randn(hidden.shape, generator=generator)
    results = []
    for forward in (layer.forward, lambda x: MoELayer.forward(layer, x)):
        layer.zero_grad(set_to_none=True)
        layer.router.local_tokens_per_expert.zero_()
        x = hidden.clone().requires_grad_()
        out, _ = forward(x)
        (out * upstream).sum().backward()
        grads = [p.grad for p in layer.parameters()]
        assert all(g is not None for g in grads)
        results.append([out.detach(), x.grad, layer.router.local_tokens_per_expert.clone(), *grads])
    assert results[0][2].sum() == 12 * 3 * layer.router.topk
    for ours, megatrons in zip(*results):
        torch.testing.assert_close(ours, megatrons, rtol=1e-6, atol=1e-7)


def test_plain_inference_linears_equal_megatron_s(megatron_single_process, monkeypatch):
    """On one rank the local backend's parallel linears are one product (parallel_linear.py): without autograd
    the model's logits equal those through Megatron's linear forwards bit for bit (MLA, dense MLP, MoE shared
    expert, vision tower, projector), and each linear's output with a bias, added or returned; in training the
    loss and every gradient equal those through Megatron's autograd function (to rounding)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from nemo_pixellm.models import parallel_linear
    from nemo_pixellm.models.parallel_linear import LocalColumnParallelLinear, LocalRowParallelLinear

    model = tiny_model(megatron_single_process, seed=3)
    linears = [m for m in model.modules() if isinstance(m, (LocalColumnParallelLinear, LocalRowParallelLinear))]
    assert {type(m) for m in linears} == {LocalColumnParallelLinear, LocalRowParallelLinear}
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(6, 256, (2, 32), generator=generator)
    ids[:, 1:1 + 6] = 5  # one 56-pixel view: 6 image tokens per row
    images = torch.randint(0, 256, (2, 3, 56, 56), generator=generator, dtype=torch.uint8)
    positions = torch.arange(32).expand(2, -1)
    calls = []
    plain = parallel_linear._plain
    monkeypatch.setattr(parallel_linear, "_plain", lambda linear: calls.append(plain(linear)) or calls[-1])
    with torch.no_grad():
        ours = model(ids, positions, images=images)
        assert len(calls) >= len(linears) and all(calls)
        monkeypatch.setattr(parallel_linear, "_plain", lambda linear: False)
        megatrons = model(ids, positions, images=images)
    assert torch.equal(ours, megatrons)

    config, x = model.language_model.config, torch.randn(5, 2, 64, generator=generator)
    for local, megatron in ((LocalColumnParallelLinear, ColumnParallelLinear), (LocalRowParallelLinear, RowParallelLinear)):
        for skip_bias_add in (False, True):
            extra = {"gather_output": False} if megatron is ColumnParallelLinear else {"input_is_parallel": True}
            linear = local(64, 48, config=config, init_method=torch.nn.init.normal_, bias=True,
                           skip_bias_add=skip_bias_add, tp_group=megatron_single_process.tp, **extra)
            torch.nn.init.normal_(linear.bias)
            monkeypatch.setattr(parallel_linear, "_plain", plain)
            with torch.no_grad():
                got, expected = linear(x), megatron.forward(linear, x)
            assert torch.equal(got[0], expected[0]) and got[1] is expected[1], (local, skip_bias_add)
    # Training on one rank: the plain product under torch's autograd; the same loss and gradients as Megatron's
    # autograd function (which computes the weight gradient itself).
    model.train()
    targets = torch.randint(6, 256, (2, 32), generator=generator)
    results = []
    for use_plain in (plain, lambda linear: False):
        monkeypatch.setattr(parallel_linear, "_plain", use_plain)
        model.zero_grad(set_to_none=True)
        loss = model(ids, positions, images=images, labels=targets).mean()
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in model.parameters() if p.grad is not None])
    assert len(results[0]) == len(results[1]) > len(linears)
    for ours, megatrons in zip(*results):
        torch.testing.assert_close(ours, megatrons, rtol=1e-5, atol=1e-7)


def test_fp8_reaches_the_language_model_only_unless_asked():
    """Precision scope: model.fp8 configures the language model's layers; the vision tower's and projector's
    configs keep bf16 (fp8 unset) unless model.fp8_vision=true, which gives them the same FP8 settings."""
    from nemo_pixellm.models.provider import FP8_KEYS, PixelLMProvider

    fp8 = dict(fp8="hybrid", fp8_recipe="delayed", fp8_amax_history_len=16, bf16=True)
    provider = PixelLMProvider(num_layers=2, hidden_size=64, num_attention_heads=4, **fp8)
    assert provider.fp8 == "hybrid"
    for config in (provider.vision_config(), provider.projector_config()):
        assert config.fp8 is None and config.bf16 and config.fp8_amax_history_len != 16
    shared = PixelLMProvider(num_layers=2, hidden_size=64, num_attention_heads=4, fp8_vision=True, **fp8)
    for config in (shared.vision_config(), shared.projector_config()):
        assert all(getattr(config, key) == getattr(shared, key) for key in FP8_KEYS) and config.fp8 == "hybrid"


def test_packed_attention_equals_softmax_attention_per_sample(megatron_single_process):
    """The local backend's THD attention (samples batched by length class, padded at their ends) gives every token
    what plain causal softmax attention within its own sample gives, values and gradients, for samples of mixed
    lengths: length 1, lengths sharing a class with padding, a class whose samples are all of one length."""
    from megatron.core.packed_seq_params import PackedSeqParams

    model = tiny_model(megatron_single_process, seed=3)
    attention = model.language_model.decoder.layers[0].self_attention.core_attention
    lengths = [1, 2, 5, 7, 8, 3, 16, 9, 1, 12, 12]
    bounds = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    tokens, heads, qk, v = int(bounds[-1]), 4, 32, 16
    generator = torch.Generator().manual_seed(0)
    q, k, value = (torch.randn(tokens, heads, d, generator=generator, requires_grad=True) for d in (qk, qk, v))
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=bounds, cu_seqlens_kv=bounds,
                             max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
    ours = attention(q, k, value, None, packed_seq_params=params)  # [tokens, heads * v]
    expected = []
    for start, end in zip(bounds.tolist(), bounds[1:].tolist()):
        scores = torch.einsum("qhd,khd->hqk", q[start:end], k[start:end]) * attention.softmax_scale
        later = torch.ones(end - start, end - start, dtype=torch.bool).triu(1)
        weights = scores.masked_fill(later, float("-inf")).softmax(-1)
        expected.append(torch.einsum("hqk,khd->qhd", weights, value[start:end]).reshape(end - start, heads * v))
    expected = torch.cat(expected)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    upstream = torch.randn(ours.shape, generator=generator)
    grads = torch.autograd.grad((ours * upstream).sum(), (q, k, value))
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (q, k, value))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_short_causal_attention_equals_sdpa(megatron_single_process, monkeypatch):
    """Short causal self-attention on a CPU is batched products over the score matrix in query blocks
    (core_attention.py): values and q / k / v gradients equal torch SDPA's (the path longer sequences take), with
    MLA's narrower v."""
    from nemo_pixellm.models import core_attention

    model = tiny_model(megatron_single_process, seed=3)
    attention = model.language_model.decoder.layers[0].self_attention.core_attention
    short_calls = []
    short = core_attention.SDPACoreAttention._short_causal
    monkeypatch.setattr(core_attention.SDPACoreAttention, "_short_causal",
                        lambda self, *a: short_calls.append(a[0].shape) or short(self, *a))
    generator, short_limit = torch.Generator().manual_seed(0), core_attention.SHORT_CAUSAL
    for seq in (1, 7, 40, 300):  # 300: three query blocks
        q, k, v = (torch.randn(seq, 3, 4, d, generator=generator) for d in (32, 32, 16))  # [s, b, heads, dim]
        upstream = torch.randn(seq, 3, 4 * 16, generator=generator)
        results = []
        for longest in (short_limit, 0):
            monkeypatch.setattr(core_attention, "SHORT_CAUSAL", longest)
            inputs = [t.clone().requires_grad_() for t in (q, k, v)]
            out = attention(*inputs, None)
            results.append([out, *torch.autograd.grad((out * upstream).sum(), inputs)])
        for ours, sdpa in zip(*results):
            torch.testing.assert_close(ours, sdpa, rtol=1e-5, atol=1e-6)
    assert len(short_calls) == 4


def test_local_rms_norm_equals_torch_s():
    """The local backend's RMSNorm (one autograd function, norms.py): values and input / weight gradients equal
    torch.nn.functional.rms_norm's op chain, in fp32 and fp64, for [s, b, h] activations and a non-contiguous
    upstream gradient; other dtypes, and calls without autograd, take torch's path."""
    from nemo_pixellm.models.norms import RMSNorm

    generator = torch.Generator().manual_seed(0)
    for dtype, shape in ((torch.float32, (7, 3, 64)), (torch.float64, (5, 2, 512)), (torch.float32, (1, 1, 8))):
        norm = RMSNorm(shape[-1], eps=1e-6).to(dtype)
        torch.nn.init.normal_(norm.weight, generator=generator)
        x = torch.randn(shape, generator=generator, dtype=dtype, requires_grad=True)
        upstream = torch.randn(shape[::-1], generator=generator, dtype=dtype).transpose(0, 2)
        ours = norm(x)
        torch_s = torch.nn.functional.rms_norm(x, shape[-1:], norm.weight, 1e-6)
        assert type(ours.grad_fn).__name__ == "_RMSNormFunctionBackward"
        torch.testing.assert_close(ours, torch_s, rtol=1e-6, atol=1e-6)
        grads = torch.autograd.grad(ours, (x, norm.weight), upstream)
        torch_grads = torch.autograd.grad(torch_s, (x, norm.weight), upstream)
        for got, want in zip(grads, torch_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    half = RMSNorm(16).to(torch.bfloat16)
    assert type(half(torch.ones(2, 16, dtype=torch.bfloat16)).grad_fn).__name__ != "_RMSNormFunctionBackward"
    with torch.no_grad():  # torch's path: less call overhead when decoding
        torch.testing.assert_close(norm(x), torch.nn.functional.rms_norm(x, x.shape[-1:], norm.weight, 1e-6))


def test_losses_at_masked_tokens_equal_every_tokens_losses(megatron_single_process):
    """With a ``loss_mask`` the output layer and cross-entropy run only at the tokens it selects (SFT's answers):
    the per-token losses there, and every parameter's gradient of the masked mean, equal those of the full
    output, plain and packed (THD); the other tokens' losses are 0."""
    from megatron.core.packed_seq_params import PackedSeqParams

    model = tiny_model(megatron_single_process, seed=3).train()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(6, 256, (2, 24), generator=generator)
    labels = torch.randint(6, 256, (2, 24), generator=generator)
    mask = (torch.rand(2, 24, generator=generator) < 0.3).float()
    positions = torch.arange(24).expand(2, -1)
    bounds = torch.tensor([0, 10, 24, 31, 48], dtype=torch.int32)  # two samples a row
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=bounds, cu_seqlens_kv=bounds, max_seqlen_q=17,
                             max_seqlen_kv=17)
    rows_seen = []
    model.language_model.output_layer.register_forward_hook(
        lambda module, inputs, out: rows_seen.append(inputs[0].shape[:-1].numel()))
    for params in (None, packed):
        results = []
        for loss_mask in (mask, None):
            model.zero_grad(set_to_none=True)
            losses = model(ids, positions, labels=labels, loss_mask=loss_mask, packed_seq_params=params)
            ((losses * mask).sum() / mask.sum()).backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results.append((losses.detach(), grads))
        (selected, selected_grads), (full, full_grads) = results
        assert rows_seen[-2:] == [int(mask.sum()), 48]
        torch.testing.assert_close(selected, full * mask, rtol=1e-6, atol=1e-6)
        assert selected_grads.keys() == full_grads.keys()
        for name, grad in full_grads.items():
            torch.testing.assert_close(selected_grads[name], grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
