"""Stage 4's objectives on plain tensors: GRPO's group advantages, clipped policy loss and KL penalty, and
DPO's sigmoid loss. No model in here: the forward steps (grpo.py, dpo.py) feed them log-probs.

The formulas are NeMo-RL's (``ClippedPGLossFn``, ``calculate_baseline_and_std_per_prompt``, ``calculate_kl``)
and TRL's sigmoid DPO (with RPO's SFT term on the chosen answers); tests/test_preference_losses.py checks them
against TRL's trainers on the same tensors.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOG_RATIO_CLAMP = 20.0  # NeMo-RL's clamps on the reference log-ratio (input) and on the k3 value (output)
KL_CLAMP = 10.0
STD_EPSILON = 1e-6


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """[groups, G] rewards -> [groups, G] advantages: reward minus the mean of the group's *other* answers
    (leave-one-out), divided by the others' standard deviation (+1e-6) where that is non-zero. A group whose
    answers all score the same gets zero advantages: it carries no signal."""
    groups, size = rewards.shape
    if size < 2:
        raise ValueError(f"a group needs at least 2 answers to compare, got {size}")
    rewards = rewards.double()
    others = size - 1
    baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / others
    mean_square = ((rewards ** 2).sum(dim=1, keepdim=True) - rewards ** 2) / others
    std = (mean_square - baseline ** 2).clamp(min=0).sqrt()
    advantages = rewards - baseline
    scaled = torch.where(std > 0, advantages / (std + STD_EPSILON), advantages)
    return scaled.float()


def k3_kl(logprobs: torch.Tensor, reference_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate k3 = e^x - 1 - x, x = log pi_ref - log pi (Schulman 2020),
    x clamped to +-20 and the result to +-10 (NeMo-RL's guards against the spikes users report)."""
    log_ratio = (reference_logprobs - logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (log_ratio.exp() - 1 - log_ratio).clamp(-KL_CLAMP, KL_CLAMP)


@dataclass
class PolicyLossTerms:
    per_token: torch.Tensor  # [b, s] the loss of every position (zero where mask is 0)
    kl: torch.Tensor  # [b, s] the k3 estimate
    ratio: torch.Tensor  # [b, s] pi / pi_old
    clipped: torch.Tensor  # [b, s] 1.0 where the clipped term is the one that counts (no gradient)


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, reference_logprobs: torch.Tensor,
                        advantages: torch.Tensor, mask: torch.Tensor, epsilon: float, beta: float) -> PolicyLossTerms:
    """PPO's clipped surrogate plus beta * k3 KL, per token. ``advantages``: [b] (one per answer), broadcast over
    its tokens; ``mask``: [b, s] 1.0 on answer tokens. Callers reduce ``per_token`` over the answer tokens of
    the whole global batch (a token-level mean)."""
    advantages = advantages[:, None]
    ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - epsilon, 1 + epsilon)
    kl = k3_kl(logprobs, reference_logprobs)
    per_token = (torch.max(unclipped, clipped) + beta * kl) * mask
    return PolicyLossTerms(per_token, kl * mask, ratio, (clipped > unclipped).float() * mask)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid DPO per pair from summed answer log-probs [pairs]: -log sigmoid(beta * ((c - c_ref) - (r - r_ref))).
    Returns (loss [pairs], margin [pairs] = beta * that difference: the implicit reward margin)."""
    margin = beta * ((chosen - reference_chosen) - (rejected - reference_rejected))
    return -F.logsigmoid(margin), margin


def chosen_nll(chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """RPO's SFT term per pair: the chosen answer's negative log-probability per token [pairs], from its summed
    log-prob and its token count (NeMo-RL's ``sft_loss_weight`` with averaged log-probs; TRL's "sft" loss type
    pools the batch's tokens instead, the same value when the chosen answers have one length)."""
    return -chosen / chosen_tokens.clamp(min=1)
