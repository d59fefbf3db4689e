"""DPO for Megatron-Bridge's loop: preference pairs as data, and the forward step that scores each pair's
chosen and rejected answers under the policy and the frozen reference.

Pairs come from ``data_prep.preference`` shards (RLAIF-V's question / chosen / rejected) or, on the synthetic
set, from the known answers of its stage-4 split (``sources.stage4_path``): chosen = the answer, rejected = a
wrong one of the same type. Reference log-probs are computed beside the policy's, micro-batch by micro-batch,
with the reference weights swapped into the same modules (NeMo-RL's way): nothing to precompute or store,
and the pairs stay a pure function of the index, so resume and layouts need nothing extra; the cost is one
no-grad forward per micro-batch.
"""

import random
from functools import partial

import torch

from nemo_pixellm.data.dataset import TrainingSequences, build_sequence, trimmed_width
from nemo_pixellm.data.samples import ShardSamples
from nemo_pixellm.data.shards import BadRecord
from nemo_pixellm.preference.losses import chosen_nll, dpo_loss
from nemo_pixellm.preference.reference import ReferenceWeights, eval_mode
from nemo_pixellm.training.run_state import RunState
from nemo_pixellm.training.step import packed_seq_params

MAX_DRAWS = 100


class PreferencePairs(torch.utils.data.Dataset):
    """Item i -> the pair of record i % len (in a seeded per-epoch order): two training sequences with the
    loss mask on their answers. A bad record is skipped (the next one is taken) and reported."""

    def __init__(self, records: ShardSamples, num_pairs: int, image_size: int, seq_length: int, seed: int):
        self.records, self.num_pairs, self.image_size = records, num_pairs, image_size
        self.seq_length, self.seed = seq_length, seed
        self._order = (-1, [])

    def __len__(self) -> int:
        return self.num_pairs

    def _record_index(self, index: int) -> int:
        n = len(self.records)
        epoch, position = divmod(index, n)
        if self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1000 + epoch)
            self._order = (epoch, torch.randperm(n, generator=generator).tolist())
        return epoch * n + self._order[1][position]  # >= n: the record's next question (synthetic pairs)

    def __getitem__(self, index: int) -> dict:
        skipped = []
        for attempt in range(MAX_DRAWS):
            record = self._record_index(index + attempt)
            rng = random.Random(f"pixellm-dpo-{self.seed}-{record}")
            try:
                chosen, rejected = self.records.pair(record, self.image_size, self.seq_length, rng)
                chosen.decode()
            except BadRecord as error:
                skipped.append({"source": 0, "index": record, "reason": str(error)})
                continue
            pad = self.records.tokenizer.pad_id
            return {"chosen": build_sequence([(0, chosen)], self.seq_length, pad, self.image_size),
                    "rejected": build_sequence([(0, rejected)], self.seq_length, pad, self.image_size),
                    "skipped": skipped}
        raise BadRecord(f"pair {index}: {MAX_DRAWS} records in a row from {self.records.reader.dir} are bad")

    @staticmethod
    def collate_fn(items: list[dict]) -> dict:
        """Chosen rows first, then the rejected rows in the same order (TRL's layout), cut to the columns the
        longest needs (``trimmed_width``: a pair fills a third of seq_length)."""
        rows = [item["chosen"] for item in items] + [item["rejected"] for item in items]
        width = trimmed_width(max(int((row["segment_ids"] >= 0).sum()) for row in rows), len(rows[0]["tokens"]))
        per_token = ("tokens", "labels", "loss_mask", "segment_ids", "position_ids")
        batch = TrainingSequences.collate_fn([{**row, **{k: row[k][..., :width] for k in per_token}} for row in rows])
        batch["skipped"] = [record for item in items for record in item["skipped"]]
        batch["pairs"] = len(items)
        return batch


def answer_logprobs(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's answer tokens from the model's per-token cross-entropy."""
    return -(per_token_loss.float() * loss_mask).sum(dim=1)


class DPOStep:
    def __init__(self, run_state: RunState, beta: float, reference: ReferenceWeights, sft_weight: float = 0.0):
        self.run_state, self.beta, self.reference = run_state, beta, reference
        self.sft_weight = sft_weight  # RPO: weight of the chosen answers' per-token NLL beside the DPO loss

    def __call__(self, state, data_iterator, model, return_schedule_plan: bool = False):
        timers = state.timers
        timers("batch-generator", log_level=2).start()
        batch = next(data_iterator)
        device = next(model.parameters()).device
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        timers("batch-generator").stop()
        inputs = dict(input_ids=batch["tokens"], position_ids=batch["position_ids"], labels=batch["labels"],
                      packed_seq_params=packed_seq_params(batch), images=batch["images"],
                      image_grids=batch["image_grids"])
        with eval_mode(model), self.reference.swapped_in(model):
            reference = answer_logprobs(model(**inputs), batch["loss_mask"])
        output = model(**inputs)
        if model.training:
            self.run_state.record_batch(batch)
        return output, partial(self.loss, batch["loss_mask"], reference, batch["pairs"])

    def loss(self, loss_mask: torch.Tensor, reference: torch.Tensor, pairs: int, output_tensor: torch.Tensor):
        policy = answer_logprobs(output_tensor, loss_mask)
        losses, margin = dpo_loss(policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:], self.beta)
        nll = chosen_nll(policy[:pairs], loss_mask[:pairs].sum(dim=1))
        total = losses + self.sft_weight * nll
        count = torch.tensor(float(pairs), device=losses.device)

        def mean(summed):
            return torch.stack([summed.detach().float(), count])

        report = {
            "lm loss": mean(total.sum()),
            "dpo_loss": mean(losses.sum()),
            "chosen_nll": mean(nll.sum()),  # per token: what the SFT term of stage.sft_weight pulls down
            "reward_margin": mean(margin.sum()),
            "preference_accuracy": mean((margin > 0).float().sum()),  # implicit rewards prefer chosen (TRL's)
            "policy_prefers_chosen": mean((policy[:pairs] > policy[pairs:]).float().sum()),
        }
        return total.sum(), count.to(torch.int), report
