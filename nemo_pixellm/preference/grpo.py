"""GRPO's forward step for Megatron-Bridge's loop: for each micro-batch of prompt groups, sample G answers
per prompt with the current weights (temperature 1, MLA's latent cache), score them by exact match, turn
the scores into leave-one-out group advantages, and return the clipped policy loss + beta * KL to the
reference policy over the answer tokens.

One optimizer step per rollout policy by default (NeMo-RL's default: train_global_batch_size = prompts x
generations): every micro-batch of a step samples with the weights of that step, so pi_old is the policy
itself and the ratio is 1 in value (its gradient is the policy gradient). ``updates_per_rollout`` = k > 1
takes k optimizer steps per rollout policy (NeMo-RL's rollout batch of k train batches): the steps of a cycle
sample with the weights of its first step (``RolloutPolicy``, swapped in), whose log-probs are pi_old, and
the ratio moves away from 1 as the policy does; the clip bounds it. The loss is a sum over answer tokens; with
``calculate_per_token_loss`` Megatron divides the gradients by the answer tokens of the whole global batch.
Rollouts run the plugin's own decoding (``nemo_pixellm.generate``) on the very modules being trained.
"""

import contextlib
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core.utils import unwrap_model

from nemo_pixellm.generate import generate
from nemo_pixellm.preference.losses import clipped_policy_loss, group_advantages
from nemo_pixellm.preference.reference import ReferenceWeights, RolloutPolicy, eval_mode
from nemo_pixellm.preference.rollouts import answer_seeds, reward, rollout_batch
from nemo_pixellm.training.run_state import RunState


@dataclass(frozen=True)
class GRPOSettings:
    generations: int = 8  # G answers per prompt
    epsilon: float = 0.2  # ratio clip
    beta: float = 0.01  # KL coefficient
    max_new_tokens: int = 6
    format_weight: float = 0.0  # share of the reward for an answer that ends (rollouts.reward)
    seq_length: int = 128
    seed: int = 1234
    use_cache: bool = True  # MLA latent cache for rollouts (tensor-parallel size 1)
    all_steps: bool = False  # decode max_new_tokens steps whatever the answers (expert parallel)
    updates_per_rollout: int = 1  # optimizer steps per rollout policy (k)


def _answer_log_softmax(scores: list[torch.Tensor], answers: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-softmax of the decoder's scores over the answers' steps, [rows, steps, vocab], and which steps each
    row's answer holds, [rows, steps] (scores[k] is step k's [rows, vocab])."""
    steps = max(len(answer) for answer in answers)
    logp = F.log_softmax(torch.stack(scores[:steps], dim=1), dim=-1)
    lengths = torch.tensor([len(answer) for answer in answers])
    return logp, torch.arange(steps) < lengths[:, None]


def answer_logprobs(scores: list[torch.Tensor], answers: list[list[int]]) -> list[torch.Tensor]:
    """The decoder's log-probabilities (temperature 1, no filtering) of each row's answer tokens."""
    logp, _ = _answer_log_softmax(scores, answers)
    tokens = torch.tensor([answer + [0] * (logp.shape[1] - len(answer)) for answer in answers])
    picked = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return [picked[row, :len(answer)] for row, answer in enumerate(answers)]


def answer_entropy(scores: list[torch.Tensor], answers: list[list[int]]) -> torch.Tensor:
    """Summed entropy of the sampling distribution at each row's answer tokens."""
    logp, held = _answer_log_softmax(scores, answers)
    return (-(logp.exp() * logp).sum(-1) * held).sum()


class GRPOStep:
    def __init__(self, run_state: RunState, settings: GRPOSettings, reference: ReferenceWeights, tokenizer,
                 rollout_policy: RolloutPolicy | None = None):
        self.run_state, self.settings, self.reference, self.tokenizer = run_state, settings, reference, tokenizer
        self.rollout_policy = rollout_policy  # None: the policy itself samples (updates_per_rollout 1)

    def rollouts(self, model_chunk, groups, old_policy: bool = False) -> dict:
        """Sample, score and lay out the micro-batch's answers; reference log-probs of the answer tokens.
        ``old_policy``: sample with the rollout policy's snapshot and score the answers' old log-probs with it."""
        s, tok, G = self.settings, self.tokenizer, self.settings.generations
        prompts = [group.prompt for group in groups for _ in range(G)]
        seeds = [seed for group in groups for seed in answer_seeds(s.seed, group.group, G)]
        scores: list[torch.Tensor] = []
        module = unwrap_model(model_chunk)
        sampler = self.rollout_policy.swapped_in(model_chunk) if old_policy else contextlib.nullcontext()
        with eval_mode(module), sampler:
            said = generate(module, prompts, tok.eos_id, tok.pad_id, s.max_new_tokens, temperature=1.0, seed=seeds,
                            use_cache=s.use_cache, scores=scores, all_steps=s.all_steps)
        ended = [len(out) < s.max_new_tokens for out in said]  # an answer that ended carries its end token
        answers = [out + [tok.eos_id] * stop for out, stop in zip(said, ended)]
        known = [group.answer for group in groups for _ in range(G)]
        rewards = torch.tensor([reward(tok.decode(out), answer, stop, s.format_weight)
                                for out, answer, stop in zip(said, known, ended)])
        batch = rollout_batch(prompts, answers, s.seq_length, tok.pad_id)
        device = next(model_chunk.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}

        def logprobs_with(weights):
            with eval_mode(module), weights.swapped_in(model_chunk):
                return -model_chunk(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                                    labels=batch["labels"], images=batch["images"],
                                    image_grids=batch["image_grids"]).float()

        reference = logprobs_with(self.reference)
        old = {"old_logprobs": logprobs_with(self.rollout_policy)} if old_policy else {}
        rollout_logprobs = torch.zeros_like(batch["loss_mask"])
        for row, logprobs in enumerate(answer_logprobs(scores, answers)):
            start = len(prompts[row].tokens) - 1
            rollout_logprobs[row, start:start + len(logprobs)] = logprobs.to(device)
        grouped = rewards.view(len(groups), G)
        return {**batch, **old, "reference_logprobs": reference, "rollout_logprobs": rollout_logprobs,
                "rewards": rewards.to(device), "advantages": group_advantages(grouped).view(-1).to(device),
                "signal": (grouped.max(dim=1).values > grouped.min(dim=1).values).float().to(device),
                "entropy": answer_entropy(scores, answers).to(device)}

    def __call__(self, state, data_iterator, model, return_schedule_plan: bool = False):
        timers = state.timers
        timers("batch-generator", log_level=2).start()
        groups = next(data_iterator)["groups"]
        for group in groups:
            self.run_state.sample_keys.append(group.key)
            self.run_state.skipped.extend(group.skipped)
        old_policy = self.rollout_policy is not None and not self.rollout_policy.is_current(state.train_state.step)
        batch = self.rollouts(model, groups, old_policy)
        timers("batch-generator").stop()
        output = model(input_ids=batch["tokens"], position_ids=batch["position_ids"], labels=batch["labels"],
                       images=batch["images"], image_grids=batch["image_grids"])
        return output, partial(self.loss, batch)

    def loss(self, batch: dict, output_tensor: torch.Tensor):
        mask = batch["loss_mask"]
        logprobs = -output_tensor.float()
        old = batch.get("old_logprobs", logprobs.detach())  # pi_old: the rollout policy's, else the policy's own
        terms = clipped_policy_loss(logprobs, old, batch["reference_logprobs"], batch["advantages"],
                                    mask, self.settings.epsilon, self.settings.beta)
        loss = terms.per_token.sum()
        tokens = mask.sum()
        rows = torch.tensor(float(mask.shape[0]), device=mask.device)
        groups = torch.tensor(float(batch["signal"].numel()), device=mask.device)

        def mean(total, count):
            return torch.stack([total.detach().float(), count.float()])

        report = {
            "lm loss": mean(loss, tokens),
            "reward": mean(batch["rewards"].sum(), rows),
            "kl": mean(terms.kl.sum(), tokens),
            "clip_fraction": mean(terms.clipped.sum(), tokens),
            "ratio": mean((terms.ratio * mask).sum(), tokens),
            "groups_with_signal": mean(batch["signal"].sum(), groups),
            "answer_tokens": mean(tokens, rows),
            "entropy": mean(batch["entropy"], tokens),
            # the sampler's log-probs against the training forward's for the same weights (pi_old)
            "logprob_gap": mean(((old - batch["rollout_logprobs"]).abs() * mask).sum(), tokens),
        }
        return loss, tokens.to(torch.int), report
