"""GRPO's data: the prompts each step draws, the answers sampled for them, their rewards, and the training
rows built from both.

Sequence index i of the run (Megatron's sampler hands them out in order, global_batch_size per step) is
answer i % G of prompt group i // G. A group's question is drawn from the stage-4 split by (seed, group)
alone, and so is the random stream its G answers are sampled with: a resumed run, or one on another
parallel layout, draws the same questions and, with the same weights, the same answers.
"""

import random
from dataclasses import dataclass

import torch

from nemo_pixellm import tiling
from nemo_pixellm.data.dataset import trimmed_width
from nemo_pixellm.data.samples import ShardSamples
from nemo_pixellm.data.shards import BadRecord
from nemo_pixellm.generate import Prompt, prompt_from_sample

MAX_DRAWS = 100  # a group whose first draws all hit bad records gives up (the data is mostly broken)


@dataclass
class PromptGroup:
    group: int  # the run's group number (sequence index // G)
    key: str  # the record's __key__
    prompt: Prompt
    answer: str  # the known answer (exact match is the reward)
    kind: str  # question type
    skipped: list[dict]  # bad records met while drawing it


class PromptGroups(torch.utils.data.Dataset):
    """Item i -> the group number i // G; ``collate_fn`` turns a micro-batch's items into its prompt groups
    (each micro-batch holds whole groups: micro_batch_size is a multiple of G)."""

    def __init__(self, questions: ShardSamples, generations: int, num_sequences: int, image_size: int,
                 seq_length: int, seed: int, question_types: list[str] | None = None):
        self.questions, self.generations, self.num_sequences = questions, generations, num_sequences
        self.image_size, self.seq_length, self.seed = image_size, seq_length, seed
        self.question_types = set(question_types) if question_types else None

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, index: int) -> int:
        return index // self.generations

    def draw(self, group: int) -> PromptGroup:
        rng, skipped, types_seen = random.Random(f"pixellm-grpo-{self.seed}-{group}"), [], set()
        n = len(self.questions)
        for _ in range(MAX_DRAWS):
            record, pick = rng.randrange(n), rng.randrange(1 << 20)
            try:
                qa_list = self.questions.meta(record)["qa"]
                kinds = [qa.get("type", "vqa") for qa in qa_list]
                wanted = [i for i, kind in enumerate(kinds) if self.question_types is None or kind in self.question_types]
                if not wanted:  # stage.question_types: this record asks none of them
                    types_seen.update(kinds)
                    continue
                index = wanted[pick % len(wanted)] * n + record  # ShardSamples asks qa[index // n % len(qa)]
                sample = self.questions.sample(index, self.image_size, self.seq_length)
                sample.decode()
            except BadRecord as error:
                skipped.append({"source": 0, "index": record, "reason": str(error)})
                continue
            asked = index // n
            return PromptGroup(group, sample.key, prompt_from_sample(sample), qa_list[asked]["a"], kinds[asked], skipped)
        if self.question_types is not None and len(skipped) < MAX_DRAWS:
            raise BadRecord(f"group {group}: {MAX_DRAWS} draws from {self.questions.reader.dir} found no question of "
                            f"stage.question_types={sorted(self.question_types)}; its records ask {sorted(types_seen)}")
        raise BadRecord(f"group {group}: {MAX_DRAWS} draws from {self.questions.reader.dir} all hit bad records")

    def collate_fn(self, items: list[int]) -> dict:
        groups = list(dict.fromkeys(items))
        if any(items.count(g) != self.generations for g in groups):
            raise ValueError(f"a micro-batch holds part of a prompt group ({items}): make train.micro_batch_size "
                             f"a multiple of stage.generations={self.generations}")
        return {"groups": [self.draw(g) for g in groups]}


def answer_seeds(seed: int, group: int, generations: int) -> list[int]:
    """One sampling seed per answer of a group: independent of the layout and of the batch it is decoded in."""
    return [random.Random(f"pixellm-grpo-answer-{seed}-{group}-{i}").getrandbits(62) for i in range(generations)]


def reward(said: str, answer: str, ended: bool, format_weight: float = 0.0) -> float:
    """Exact match of the answer, optionally mixed with a format term: the answer ended (the end token
    within stage.max_new_tokens), as NeMo-RL's VLM recipe mixes 0.8 accuracy with 0.2 format."""
    return (1.0 - format_weight) * float(said.strip() == answer.strip()) + format_weight * float(ended)


def rollout_batch(prompts: list[Prompt], answers: list[list[int]], seq_length: int, pad_id: int) -> dict:
    """Training rows for (prompt, answer) pairs: tokens, next-token labels, a loss mask on the positions that
    predict an answer token, M-RoPE positions continuing the prompt's text positions (as decoding did), views
    and grids: what ``TrainingSequences.collate_fn`` gives the model for a sample whose answer carries loss.
    Rows are as wide as the longest pair needs (``trimmed_width``): padding to seq_length cost 3x the compute."""
    rows, lengths = len(prompts), [len(prompt.tokens) + len(answer) for prompt, answer in zip(prompts, answers)]
    if max(lengths) > seq_length:
        row = lengths.index(max(lengths))
        raise ValueError(f"a prompt of {len(prompts[row].tokens)} tokens and an answer of {len(answers[row])} exceed "
                         f"seq_length={seq_length}: lower stage.max_new_tokens or raise seq_length")
    width = trimmed_width(max(lengths), seq_length)
    tokens = torch.full((rows, width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(rows, width)
    positions = []
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        ids = prompt.tokens + answer
        tokens[i, :len(ids)] = torch.tensor(ids)
        loss_mask[i, len(prompt.tokens) - 1:len(ids) - 1] = 1.0  # position t predicts token t + 1
        positions.append(tiling.mrope_positions(prompt.blocks + [tiling.TextBlock(width - len(prompt.tokens))]))
    labels = torch.cat([tokens[:, 1:], torch.full((rows, 1), pad_id, dtype=torch.long)], dim=1)
    return {
        "tokens": tokens, "labels": labels, "loss_mask": loss_mask,
        "position_ids": torch.stack(positions, dim=1),  # [3, b, s]
        "images": torch.cat([p.views for p in prompts]),
        "image_grids": torch.cat([p.grids for p in prompts]),
    }
