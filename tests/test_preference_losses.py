"""Stage 4's loss formulas on fixed tensors against implementations nobody here wrote: TRL's GRPO and DPO
trainers (their ``_compute_loss`` on the same log-probs / logits, the trainer object replaced by the few
attributes those methods read) and NeMo-RL's leave-one-out baseline written out from its definition."""

import math
import statistics
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import trl.trainer.dpo_trainer as trl_dpo
import trl.trainer.grpo_trainer as trl_grpo

from nemo_pixellm.preference.losses import chosen_nll, clipped_policy_loss, dpo_loss, group_advantages, k3_kl

IDENTITY = SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction="sum": x, gather_for_metrics=lambda x: x,
                           device=torch.device("cpu"), num_processes=1, sync_gradients=True)


def nemo_rl_advantages(rewards: list[list[float]]) -> list[list[float]]:
    """NeMo-RL's GRPO advantage (calculate_baseline_and_std_per_prompt + normalize_rewards), loop by loop:
    baseline = mean of the other answers' rewards, std = their population std; divided where std > 0."""
    out = []
    for group in rewards:
        row = []
        for i, reward in enumerate(group):
            others = group[:i] + group[i + 1:]
            baseline, std = statistics.fmean(others), statistics.pstdev(others)
            row.append((reward - baseline) / (std + 1e-6) if std > 0 else reward - baseline)
        out.append(row)
    return out


def test_group_advantages_equal_nemo_rl_leave_one_out():
    rewards = [[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0], [0.3, 0.9, 0.1, 0.5]]
    ours = group_advantages(torch.tensor(rewards))
    expected = torch.tensor(nemo_rl_advantages(rewards))
    assert torch.allclose(ours, expected, atol=1e-6, rtol=0)
    assert (ours[1] == 0).all()  # all right: no signal
    assert (ours < 0).any()
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.ones(3, 1))


def fixed_rollout(seed=0):
    g = torch.Generator().manual_seed(seed)
    rows, length = 8, 6
    logprobs = -torch.rand(rows, length, generator=g) * 3
    old = logprobs + (torch.rand(rows, length, generator=g) - 0.5) * 1.5  # ratios 0.47..2.1: both clips active
    reference = logprobs + (torch.rand(rows, length, generator=g) - 0.5) * 2.0
    mask = torch.ones(rows, length)
    mask[:, -2:] = 0.0
    mask[3, 2:] = 0.0  # a short answer
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])  # the second group has zero variance
    return logprobs, old, reference, mask, group_advantages(rewards).view(-1)


def trl_grpo_loss(logprobs, old, reference, mask, advantages, epsilon, beta):
    trainer = SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None), loss_type="bnpo", epsilon_low=epsilon,
        epsilon_high=epsilon, use_vllm=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        accelerator=IDENTITY, _metrics=defaultdict(lambda: defaultdict(list)),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logprobs, torch.zeros_like(logprobs), None),
    )
    rows = logprobs.shape[0]
    inputs = {"prompt_ids": torch.zeros(rows, 1, dtype=torch.long), "prompt_mask": torch.ones(rows, 1),
              "completion_ids": torch.zeros_like(mask, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": reference}
    loss = trl_grpo.GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, trainer._metrics["train"]


def test_grpo_loss_and_kl_equal_trl():
    logprobs, old, reference, mask, advantages = fixed_rollout()
    epsilon, beta = 0.2, 0.04
    terms = clipped_policy_loss(logprobs, old, reference, advantages, mask, epsilon, beta)
    ours = terms.per_token.sum() / mask.sum()  # the token-level mean over the (here: one) global batch
    theirs, metrics = trl_grpo_loss(logprobs, old, reference, mask, advantages, epsilon, beta)
    assert abs(float(ours) - float(theirs)) < 1e-6
    assert abs(float(terms.kl.sum() / mask.sum()) - metrics["kl"][0]) < 1e-6
    assert abs(float(terms.clipped.sum() / mask.sum()) - metrics["clip_ratio/region_mean"][0]) < 1e-6
    assert metrics["clip_ratio/region_mean"][0] > 0.05  # clipping is active in the case
    assert (advantages < 0).any() and (advantages == 0).any()


def test_grpo_gradient_equals_trl():
    logprobs, old, reference, mask, advantages = fixed_rollout(1)
    ours_in = logprobs.clone().requires_grad_(True)
    (clipped_policy_loss(ours_in, old, reference, advantages, mask, 0.2, 0.01).per_token.sum() / mask.sum()).backward()
    theirs_in = logprobs.clone().requires_grad_(True)
    trl_grpo_loss(theirs_in, old, reference, mask, advantages, 0.2, 0.01)[0].backward()
    assert torch.allclose(ours_in.grad, theirs_in.grad, atol=1e-7, rtol=0)


def test_k3_clamps_like_nemo_rl():
    logprobs = torch.tensor([0.0, -30.0, 0.0, -1.0, -5.0])
    reference = torch.tensor([-30.0, 0.0, 0.0, -2.0, -8.0])
    kl = k3_kl(logprobs, reference)
    assert kl[2] == 0
    assert float(kl[0]) == 10.0 and float(kl[1]) == 10.0  # log-ratio clamped to -+20, then the value to 10
    assert math.isclose(float(kl[3]), math.exp(-1), rel_tol=1e-6)  # e^-1 - 1 + 1
    assert math.isclose(float(kl[4]), math.exp(-3) + 2, rel_tol=1e-6)


def trl_dpo_loss(logits, labels, completion_mask, ref_chosen, ref_rejected, beta, sft_weight=0.0):
    loss_types, loss_weights = (["sigmoid", "sft"], [1.0, sft_weight]) if sft_weight else (["sigmoid"], [1.0])
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=IDENTITY, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=loss_types, loss_weights=loss_weights,
        beta=beta, label_smoothing=0.0, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"input_ids": labels, "attention_mask": torch.ones_like(labels), "completion_mask": completion_mask,
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = trl_dpo.DPOTrainer._compute_loss(trainer, lambda **kw: SimpleNamespace(logits=logits), inputs, False)
    return loss, trainer._metrics["train"]


def dpo_case(seed: int, shorter_row: int, pairs: int = 4, length: int = 7, vocab: int = 11):
    """Random logits and ids for ``pairs`` chosen then rejected rows, answers from position 3 (``shorter_row``
    ends at 5), their summed answer log-probs and reference log-probs near them."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * pairs, length, vocab, generator=g)
    ids = torch.randint(0, vocab, (2 * pairs, length), generator=g)
    completion = torch.zeros(2 * pairs, length)
    completion[:, 3:] = 1.0
    completion[shorter_row, 5:] = 0.0
    per_token = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1) * completion[:, 1:]
    summed = per_token.sum(dim=1)
    chosen, rejected = summed[:pairs], summed[pairs:]
    ref_chosen, ref_rejected = chosen - torch.randn(pairs, generator=g), rejected + torch.randn(pairs, generator=g)
    return logits, ids, completion, chosen, rejected, ref_chosen, ref_rejected


def test_dpo_loss_equals_trl_and_ln2_at_the_reference():
    pairs, beta = 4, 0.1
    logits, ids, completion, chosen, rejected, ref_chosen, ref_rejected = dpo_case(3, shorter_row=1)
    loss, margin = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
    theirs, metrics = trl_dpo_loss(logits, ids, completion, ref_chosen, ref_rejected, beta)
    assert abs(float(loss.mean()) - float(theirs)) < 1e-6
    assert abs(float(margin.mean()) - metrics["rewards/margins"][0]) < 1e-6
    assert abs(float((margin > 0).float().mean()) - metrics["rewards/accuracies"][0]) < 1e-6
    at_reference, _ = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta)
    assert torch.equal(at_reference, torch.full((pairs,), math.log(2)))


def test_dpo_with_the_sft_term_equals_trl_s_sigmoid_plus_sft():
    """RPO (stage.sft_weight): the DPO loss plus w x the chosen answers' per-token NLL equals TRL's
    loss_type=["sigmoid", "sft"] with weights [1, w] (chosen answers of one length: TRL pools their tokens)."""
    pairs, weight = 4, 0.7
    # the shorter answer is a rejected one: the chosen answers have one length
    logits, ids, completion, chosen, rejected, ref_chosen, ref_rejected = dpo_case(5, shorter_row=pairs + 1)
    loss, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.1)
    ours = loss + weight * chosen_nll(chosen, completion[:pairs, 1:].sum(dim=1))
    theirs, _ = trl_dpo_loss(logits, ids, completion, ref_chosen, ref_rejected, 0.1, sft_weight=weight)
    plain, _ = trl_dpo_loss(logits, ids, completion, ref_chosen, ref_rejected, 0.1)
    assert float(theirs - plain) > 0.5  # the SFT term counts in TRL's figure
    assert abs(float(ours.mean()) - float(theirs)) < 1e-6
