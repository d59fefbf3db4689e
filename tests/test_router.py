"""DeepSeek-V3 routing on the plugin's MoE layers, against reference.md section 2: sigmoid scores,
selection by score + expert bias, weights = the unbiased scores of the chosen experts normalised to 1
(times the route scale), and the aux-loss-free update bias_i += gamma * sign(mean_load - load_i)."""

import pytest
import torch

from conftest import build_pixellm

EXPERTS, TOP_K, HIDDEN, GAMMA = 8, 2, 64, 1e-3


def build_router_model(pg, **routing):
    return build_pixellm(
        pg, seed=11,
        num_layers=2, moe_layer_freq=[0, 1], hidden_size=HIDDEN, ffn_hidden_size=128, num_attention_heads=4,
        q_lora_rank=32, kv_lora_rank=16, qk_head_dim=16, qk_pos_emb_head_dim=16, v_head_dim=16,
        num_moe_experts=EXPERTS, moe_router_topk=TOP_K, moe_ffn_hidden_size=32,
        moe_shared_expert_intermediate_size=64, moe_router_bias_update_rate=GAMMA, vocab_size=256, seq_length=32,
        vision_hidden_size=32, vision_num_layers=1, vision_num_attention_heads=2, vision_ffn_hidden_size=64,
        vision_image_size=224, image_token_id=5, **routing,
    )


@pytest.fixture(scope="module")
def router(megatron_single_process):
    model = build_router_model(megatron_single_process)
    return model, model.language_model.decoder.layers[1].mlp.router


def reference_routing(x, weight, bias, k=TOP_K, scale=1.0):
    scores = torch.sigmoid(x @ weight.T)
    chosen = torch.topk(scores + bias, k, dim=-1).indices
    picked = scores.gather(1, chosen)
    weights = torch.zeros_like(scores).scatter(1, chosen, picked / picked.sum(-1, keepdim=True) * scale)
    return chosen, weights


def test_bias_changes_selection_never_the_weights(router):
    _, r = router
    x = torch.randn(64, HIDDEN, generator=torch.Generator().manual_seed(0))
    bias = torch.linspace(-0.3, 0.3, EXPERTS)
    with torch.no_grad():
        r.expert_bias.zero_()
        probs_unbiased, map_unbiased = r(x.view(64, 1, HIDDEN))
        r.expert_bias.copy_(bias)
        probs, routing_map = r(x.view(64, 1, HIDDEN))
        r.expert_bias.zero_()
    chosen, weights = reference_routing(x, r.weight.detach(), bias)
    expected_map = torch.zeros(64, EXPERTS, dtype=torch.bool).scatter(1, chosen, True)
    assert torch.equal(routing_map, expected_map)
    torch.testing.assert_close(probs, weights, rtol=1e-6, atol=1e-7)
    assert not torch.equal(routing_map, map_unbiased)  # the bias moved tokens to other experts
    # Where a token keeps its experts, its gate weights are exactly the unbiased ones.
    same = (routing_map == map_unbiased).all(dim=1)
    assert same.any()
    torch.testing.assert_close(probs[same], probs_unbiased[same], rtol=0, atol=0)


def test_bias_update_follows_the_sign_rule(router):
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

    model, r = router
    model.train()
    r.expert_bias.copy_(torch.linspace(-0.01, 0.01, EXPERTS))
    r.local_tokens_per_expert.zero_()
    before = r.expert_bias.clone()
    x = torch.randn(96, 1, HIDDEN, generator=torch.Generator().manual_seed(1), requires_grad=True)
    _, routing_map = r(x)  # training forward: counts tokens per expert
    load = routing_map.sum(dim=0).float()
    _update_router_expert_bias([model], model.config)
    model.eval()
    expected = before + GAMMA * torch.sign(load.mean() - load)
    torch.testing.assert_close(r.expert_bias, expected, rtol=0, atol=1e-9)
    assert (r.expert_bias != before).any()


def test_group_limited_routing(megatron_single_process):
    """Experts in 4 groups of 2; each token keeps the group with the largest sum of its top-2 biased scores
    (reference.md section 2) and takes its top-2 experts there; weights stay the unbiased scores."""
    model = build_router_model(megatron_single_process, moe_router_num_groups=4, moe_router_group_topk=1)
    r = model.language_model.decoder.layers[1].mlp.router
    x = torch.randn(64, HIDDEN, generator=torch.Generator().manual_seed(2))
    bias = torch.linspace(-0.2, 0.2, EXPERTS)
    with torch.no_grad():
        r.expert_bias.copy_(bias)
        probs, routing_map = r(x.view(64, 1, HIDDEN))
    scores = torch.sigmoid(x @ r.weight.detach().T)
    biased = (scores + bias).view(64, 4, 2)
    group = biased.topk(2, dim=-1).values.sum(-1).argmax(dim=-1)  # [tokens]
    in_group = torch.zeros(64, 4, 2, dtype=torch.bool)
    in_group[torch.arange(64), group] = True
    chosen = (scores + bias).masked_fill(~in_group.view(64, EXPERTS), float("-inf")).topk(TOP_K, dim=-1).indices
    expected_map = torch.zeros(64, EXPERTS, dtype=torch.bool).scatter(1, chosen, True)
    assert torch.equal(routing_map, expected_map)
    picked = scores.gather(1, chosen)
    expected = torch.zeros_like(scores).scatter(1, chosen, picked / picked.sum(-1, keepdim=True))
    torch.testing.assert_close(probs, expected, rtol=1e-6, atol=1e-7)


def test_sequence_wise_aux_loss_equals_the_formula(megatron_single_process):
    """alpha * sum_i f_i * P_i per sequence (reference.md section 2), averaged over the micro-batch:
    f_i = N_r / (K_r T) * tokens of the sequence whose top-K unbiased scores include i (DeepSeek-V3 eq. 18:
    the indicator is on s, not s + bias), P_i = mean over the sequence of s_i / sum_j s_j. Checked on the loss
    Megatron logs and on the router-weight gradient it feeds back."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    alpha, seq, batch = 1e-4, 16, 3
    model = build_router_model(megatron_single_process, moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=alpha)
    r = model.language_model.decoder.layers[1].mlp.router
    x = torch.randn(seq, batch, HIDDEN, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        r.expert_bias.copy_(torch.linspace(-0.5, 0.5, EXPERTS))  # large enough to change selections
    clear_aux_losses_tracker()
    r.train()
    probs, _ = r(x)
    (probs * 0).sum().backward()  # only the attached aux loss sends gradient to the router weight
    r.eval()
    # Megatron logs the loss divided by its coefficient.
    logged = get_moe_layer_wise_logging_tracker()["seq_load_balancing_loss"]["values"][r.layer_number - 1] * alpha

    weight = r.weight.detach().clone().requires_grad_(True)
    losses = []
    for b in range(batch):
        scores = torch.sigmoid(x[:, b] @ weight.T)  # [T, E]
        routed = torch.zeros(seq, EXPERTS).scatter(1, scores.topk(TOP_K, dim=-1).indices, 1.0)
        f = routed.sum(0) * EXPERTS / (TOP_K * seq)
        p = (scores / scores.sum(-1, keepdim=True)).mean(0)
        losses.append(alpha * (f * p).sum())
    expected = torch.stack(losses).mean()
    expected.backward()
    torch.testing.assert_close(logged, expected.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(r.weight.grad, weight.grad, rtol=1e-5, atol=1e-12)
    assert weight.grad.abs().max() > 0


def test_aux_loss_router_equals_mixtral(megatron_single_process):
    """The Switch / GShard / Mixtral router as an option (model.moe_router_score_function=softmax,
    moe_router_load_balancing_type=aux_loss, moe_router_pre_softmax=false, no expert bias): its routing equals
    Mixtral's (softmax over the top-k logits), and its load-balancing loss and the router-weight gradient it
    feeds back equal transformers' load_balancing_loss_func on the same router logits. Megatron normalises the
    loss by top-k (a balanced router scores 1, Mixtral's k): logged value x k = Mixtral's, so
    moe_aux_loss_coeff = Mixtral's router_aux_loss_coef x top-k trains as a Mixtral config does."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    mixtral_coef, seq, batch = 0.02, 16, 3
    model = build_router_model(megatron_single_process, moe_router_score_function="softmax",
                               moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=mixtral_coef * TOP_K,
                               moe_router_pre_softmax=False, moe_router_enable_expert_bias=False)
    r = model.language_model.decoder.layers[1].mlp.router
    x = torch.randn(seq, batch, HIDDEN, generator=torch.Generator().manual_seed(5))
    clear_aux_losses_tracker()
    r.train()
    probs, routing_map = r(x)
    (probs * 0).sum().backward()  # only the attached aux loss sends gradient to the router weight
    r.eval()
    logged = get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"][r.layer_number - 1]

    weight = r.weight.detach().clone().requires_grad_(True)
    logits = x.reshape(-1, HIDDEN) @ weight.T  # Megatron's token order: [s, b] flattened
    top = torch.softmax(logits, dim=-1).topk(TOP_K, dim=-1)  # Mixtral: softmax, top-k, renormalised
    expected_probs = torch.zeros_like(logits).scatter(1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    torch.testing.assert_close(probs, expected_probs.detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(routing_map, expected_probs.detach() > 0)
    mixtral = load_balancing_loss_func((logits,), num_experts=EXPERTS, top_k=TOP_K)
    (mixtral_coef * mixtral).backward()
    print(f"Mixtral load-balancing loss {mixtral.item():.6f}, Megatron's x top-k {(logged * TOP_K).item():.6f}")
    torch.testing.assert_close(logged * TOP_K, mixtral.detach(), rtol=1e-6, atol=0)
    # float32 sums in another order: compared at 1e-5 of the largest gradient entry
    torch.testing.assert_close(r.weight.grad, weight.grad, rtol=1e-5, atol=1e-5 * weight.grad.abs().max().item())
    assert weight.grad.abs().max() > 0


def test_input_jitter_noises_training_only(megatron_single_process):
    """Switch Transformer's router input jitter (model.moe_input_jitter_eps): in training the router sees its input
    times Uniform(1 - eps, 1 + eps) per element (the same routing as Megatron's jitter computed by hand from the
    same random state), in evaluation exactly the un-jittered routing, so decoding and log-probs stay deterministic."""
    eps = 0.3
    model = build_router_model(megatron_single_process, moe_router_score_function="softmax",
                               moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.0,
                               moe_router_pre_softmax=False, moe_router_enable_expert_bias=False,
                               moe_input_jitter_eps=eps)
    r = model.language_model.decoder.layers[1].mlp.router
    x = torch.randn(32, 2, HIDDEN, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        clean = torch.softmax(x.reshape(-1, HIDDEN) @ r.weight.T, -1).topk(TOP_K, -1)
        expected_clean = torch.zeros(64, EXPERTS).scatter(1, clean.indices, clean.values / clean.values.sum(-1, keepdim=True))
        r.eval()
        torch.testing.assert_close(r(x)[0], expected_clean, rtol=1e-6, atol=1e-7)
        r.train()
        torch.manual_seed(3)
        jittered = r(x)[0]
        torch.manual_seed(3)
        noise = torch.distributions.Uniform(torch.tensor(1.0 - eps), torch.tensor(1.0 + eps)).rsample(x.shape)
        top = torch.softmax((x * noise).reshape(-1, HIDDEN) @ r.weight.T, -1).topk(TOP_K, -1)
        expected = torch.zeros(64, EXPERTS).scatter(1, top.indices, top.values / top.values.sum(-1, keepdim=True))
        r.eval()
    torch.testing.assert_close(jittered, expected, rtol=1e-6, atol=1e-7)
    changed = (jittered > 0).ne(expected_clean > 0).any(-1).float().mean().item()
    print(f"input jitter eps={eps}: {changed:.0%} of tokens routed to other experts in training, none in evaluation")
    assert changed > 0
