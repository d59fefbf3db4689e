"""Training sequences from samples: mixing sources by token share, packing, positions, collate.

The whole path from shard to model input: ``ShardSamples`` (samples.py) turns a record into token
segments and an image; ``TrainingSequences`` decides deterministically which samples make up each
sequence (the *plan*, decided in sequence order, a block at a time), then builds sequence i:

    tokens / labels / loss_mask [seq]   labels are next tokens *within* a sample; the last token of a sample
                                        and padding carry no loss, nor do prompt and image positions
    position_ids [3, seq]               M-RoPE ids (nemo_pixellm.tiling), restarting at 0 for every sample
    segment_ids [seq]                   which packed sample a position belongs to (padding: -1)
    images [views, 3, T, T], image_grids [images, 2], samples [(source, key, tokens)]

- Mixing: each next sample comes from the source furthest below its target share of tokens so far
  (e.g. 70:30 vision-language : text), each source in a seeded per-epoch shuffle: deterministic by seed.
- Packing: first fit in stream order: a sample longer than the room left waits for a later sequence (up to
  ``PACK_LOOKAHEAD`` wait at once) while later ones fill the room; collate turns segment ids
  into THD boundaries (``cu_seqlens_q``, Megatron's PackedSeqParams: both backends attend within each sample),
  so packed samples never see each other.
- Progressive resolution: ``resolution_schedule`` [[fraction of training, view size], ...] picks the view
  size from the sequence index (Megatron's sampler hands out global indices in order, so index //
  global_batch_size is the step): the same after a resume, and one size per global batch.
- Bad records (a damaged shard, malformed JSON, a corrupt, truncated or missing image) are skipped where the
  plan meets them: the stream draws the next sample instead, so the plan stays a pure function of the config
  and the data. Each skip is reported with the sequence it was met in (``skipped``); more than
  ``max_bad_fraction`` of the records read (counting at least 100) stops the run with ``BadDataError``.
  An image whose pixels fail to decode when its sequence is built is dropped from that sequence, reported too.
- Exact resume: a map-style dataset under Megatron's sampler continues from ``consumed_train_samples``
  in the checkpoint; the plan is a pure function of the config, so nothing else needs saving. Where the
  plan's blocks start is cached on disk (``plan_cache``), so reaching step N does not replay N steps.
"""

import hashlib
import json
import os
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from nemo_pixellm import tiling
from nemo_pixellm.data.samples import Sample, ShardSamples
from nemo_pixellm.data.shards import BadRecord

MIN_RECORDS_FOR_CEILING = 100  # the bad-record ceiling counts at least this many records read


class BadDataError(RuntimeError):
    """More bad records than ``dataset.max_bad_fraction`` allows: the run stops."""


def resolution_at(schedule: list, step: int, total_steps: int) -> int:
    """The view size of the last schedule entry whose start (a fraction of training) is at or before step."""
    size = schedule[0][1]
    for fraction, entry_size in schedule:
        if step >= round(float(fraction) * total_steps):
            size = entry_size
    return int(size)


PLAN_VERSION = 3  # bump when planning changes, so cached block starts are not reused
# Samples drawn ahead to fill a packed sequence's room; the ones that did not fit start the next sequences.
# In-order packing (stop at the first misfit) left 28% of stage 3's positions empty on the tiny recipe.
PACK_LOOKAHEAD = 8


class MixtureStream:
    """Samples from several sources, each next one from the source furthest below its token share."""

    def __init__(self, sources: list[ShardSamples], shares: list[float], seed: int):
        total = sum(shares)
        self.sources, self.shares, self.seed = sources, [s / total for s in shares], seed
        self.taken = [0] * len(sources)  # samples drawn per source
        self.tokens = [0] * len(sources)
        self._order = [(-1, [])] * len(sources)  # (epoch, shuffled indices) per source

    def _index(self, source: int) -> int:
        n = len(self.sources[source])
        epoch, position = divmod(self.taken[source], n)
        if self._order[source][0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1000 + source * 100 + epoch)
            self._order[source] = (epoch, torch.randperm(n, generator=generator).tolist())
        return epoch * n + self._order[source][1][position]  # index >= n: e.g. the next question, by epoch

    def next(self) -> tuple[int, int]:
        total = sum(self.tokens)
        source = max(range(len(self.sources)), key=lambda s: self.shares[s] * total - self.tokens[s])
        index = self._index(source)
        self.taken[source] += 1
        return source, index

    def account(self, source: int, tokens: int) -> None:
        self.tokens[source] += tokens


class TrainingSequences(torch.utils.data.Dataset):
    def __init__(self, sources: list[ShardSamples], shares: list[float], tokenizer, seq_length: int,
                 num_sequences: int | None, image_size: int, resolution_schedule: list | None = None,
                 global_batch_size: int = 1, pack: bool = False, seed: int = 1234, plan_cache=None,
                 plan_block: int = 1024, max_bad_fraction: float = 0.01):
        self.sources, self.tokenizer, self.seq_length, self.pack = sources, tokenizer, seq_length, pack
        self.num_sequences = num_sequences or len(sources[0])
        self.schedule = [list(e) for e in resolution_schedule] if resolution_schedule else [[0.0, image_size]]
        self.global_batch_size = max(global_batch_size, 1)
        self.total_steps = max(self.num_sequences // self.global_batch_size, 1)
        self._stream, self._pending = MixtureStream(sources, shares, seed), []  # drawn, not yet placed
        self._lengths = {}  # (source, index, tile) -> tokens, for the samples waiting in _pending
        self.max_bad_fraction, self._bad, self._skipped = max_bad_fraction, 0, []
        self.plan_block = plan_block
        self._starts = {0: self._state()}  # block -> the stream's state where that block's plan starts
        self._block, self._block_plan = -1, []  # the one block of the plan held in memory
        self._plan_dir = Path(plan_cache) / self._fingerprint() if plan_cache else None

    def __len__(self) -> int:
        return self.num_sequences

    def view_size(self, index: int) -> int:
        return resolution_at(self.schedule, index // self.global_batch_size, self.total_steps)

    def _sample(self, source: int, index: int, tile: int) -> Sample:
        return self.sources[source].sample(index, tile, self.seq_length)

    def members(self, index: int) -> list[tuple[int, int]]:
        """The (source, index) samples of sequence ``index``. The plan is decided in sequence order and held
        one block at a time; the stream's state at each block start is kept (in memory, and on disk under
        ``plan_cache``), so any sequence costs at most one block of replay from a known start, and a resumed
        run jumps to its position instead of replaying every sequence before it. Lengths need no image
        decoding."""
        if not 0 <= index < self.num_sequences:
            raise IndexError(f"sequence {index} of {self.num_sequences}")
        block, offset = divmod(index, self.plan_block)
        if block != self._block:
            self._hold_block(block)
        return self._block_plan[offset][0]

    def skipped(self, index: int) -> list[dict]:
        """The bad records the plan met (and skipped) while filling sequence ``index``."""
        self.members(index)
        return self._block_plan[index % self.plan_block][1]

    def _hold_block(self, block: int) -> None:
        start = max(b for b in self._starts if b <= block)
        for b in range(block, start, -1):  # a start another process (an earlier run) already wrote
            if (state := self._read_start(b)) is not None:
                start, self._starts[b] = b, state
                break
        self._restore(self._starts[start])
        for b in range(start, block + 1):
            first = b * self.plan_block
            plan = [self._next_members(self.view_size(i))
                    for i in range(first, min(first + self.plan_block, self.num_sequences))]
            if first + self.plan_block <= self.num_sequences:  # a cut-short last block is no block's start
                self._remember_start(b + 1)
        self._block, self._block_plan = block, plan

    def _state(self) -> dict:
        return {"taken": list(self._stream.taken), "tokens": list(self._stream.tokens), "pending": list(self._pending),
                "bad": self._bad}

    def _restore(self, state: dict) -> None:
        self._stream.taken, self._stream.tokens = list(state["taken"]), list(state["tokens"])
        self._pending, self._lengths = [tuple(c) for c in state["pending"]], {}
        self._bad = state["bad"]

    def _remember_start(self, block: int) -> None:
        self._starts[block] = self._state()
        path = self._plan_dir / f"start-{block:08d}.json" if self._plan_dir else None
        if path is None or path.exists():
            return
        try:  # written aside, then renamed: other ranks and workers may write the same file at once
            path.parent.mkdir(parents=True, exist_ok=True)
            aside = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
            aside.write_text(json.dumps(self._starts[block]))
            os.replace(aside, path)
        except OSError as error:  # the cache only saves time
            warnings.warn(f"plan cache {self._plan_dir} not written ({error}); resumes replay the plan")
            self._plan_dir = None

    def _read_start(self, block: int) -> dict | None:
        if self._plan_dir is None:
            return None
        try:
            return json.loads((self._plan_dir / f"start-{block:08d}.json").read_text())
        except (OSError, ValueError):  # absent or unreadable: replay instead
            return None

    def _fingerprint(self) -> str:
        """Everything the plan depends on: a changed config or data set never reads another's cache."""
        what = {
            "version": PLAN_VERSION, "block": self.plan_block, "seq_length": self.seq_length, "pack": self.pack,
            "schedule": self.schedule, "global_batch_size": self.global_batch_size, "total_steps": self.total_steps,
            "shares": self._stream.shares, "seed": self._stream.seed, "max_bad_fraction": self.max_bad_fraction,
            "tokenizer": hashlib.sha256(self.tokenizer.tok.to_str().encode()).hexdigest(),
            "sources": [[s.reader.manifest.get("sha256") or str(s.reader.dir.resolve()), len(s), s.task,
                         s.patch_size, s.downsample, s.max_tiles] for s in self.sources],
        }
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

    def _next_members(self, tile: int) -> tuple[list[tuple[int, int]], list[dict]]:
        members, skipped, used, waiting = [], [], 0, []
        queue, self._pending = self._pending, []
        while True:
            candidate = queue.pop(0) if queue else self._stream.next()
            try:
                length = self._length(candidate, tile)
            except BadRecord as error:
                skipped.append(self._skip(candidate, error))
                continue
            if members and used + length > self.seq_length:
                waiting.append(candidate)  # starts a later sequence
                if len(waiting) >= PACK_LOOKAHEAD:
                    break
                continue
            members.append(candidate)
            self._lengths.pop((*candidate, tile), None)
            self._stream.account(candidate[0], length)
            used += length
            if not self.pack or used >= self.seq_length:
                break
        self._pending = waiting + queue
        return members, skipped

    def _length(self, candidate: tuple[int, int], tile: int) -> int:
        key = (*candidate, tile)
        if key not in self._lengths:
            self._lengths[key] = min(self._sample(*candidate, tile).num_tokens, self.seq_length)
        return self._lengths[key]

    def _skip(self, candidate: tuple[int, int], error: BadRecord) -> dict:
        self._bad += 1
        read = sum(self._stream.taken)
        source = self.sources[candidate[0]]
        if self._bad > self.max_bad_fraction * max(read, MIN_RECORDS_FOR_CEILING):
            raise BadDataError(
                f"{self._bad} bad records in the first {read} read from {source.reader.dir} and the other sources, "
                f"more than dataset.max_bad_fraction={self.max_bad_fraction} allows (counting at least "
                f"{MIN_RECORDS_FOR_CEILING} records); the latest: {error}. Repair or rebuild the shards with "
                "data_prep, or raise dataset.max_bad_fraction")
        return {"source": candidate[0], "index": candidate[1], "reason": str(error)}

    def __getitem__(self, index: int) -> dict:
        tile = self.view_size(index)
        samples, skipped = [], list(self.skipped(index))
        for source, i in self.members(index):
            try:
                sample = self._sample(source, i, tile)
                sample.decode()
            except BadRecord as error:  # the header read but the pixels did not: dropped from this sequence
                skipped.append({"source": source, "index": i, "reason": str(error)})
                continue
            samples.append((source, sample))
        item = build_sequence(samples, self.seq_length, self.tokenizer.pad_id, tile)
        item["skipped"] = skipped
        return item

    @staticmethod
    def collate_fn(items: list[dict]) -> dict:
        batch = {k: torch.stack([item[k] for item in items]) for k in ("tokens", "labels", "loss_mask")}
        batch["position_ids"] = torch.stack([item["position_ids"] for item in items], dim=1)  # [3, b, s]
        segments = torch.stack([item["segment_ids"] for item in items])
        if (segments.amax(dim=1) > 0).any():  # packed: the rows as one THD sequence, cut at every sample
            batch.update(packed_segments(segments))
        # Views and grids in sample order = image-token order.
        batch["images"] = torch.cat([item["images"] for item in items])
        batch["image_grids"] = torch.cat([item["image_grids"] for item in items])
        batch["samples"] = [item["samples"] for item in items]
        batch["skipped"] = [record for item in items for record in item.get("skipped", [])]
        return batch


def trimmed_width(longest: int, seq_length: int) -> int:
    """Columns a batch of unpacked rows needs: its longest row rounded up to 16 tokens (what FP8 GEMMs need),
    at most seq_length. Padding after a row's end changes none of its outputs (causal attention)."""
    return min(seq_length, -(-longest // 16) * 16)


def packed_segments(segment_ids: torch.Tensor) -> dict:
    """Segment ids [b, s] -> Megatron's THD boundaries over the b * s tokens read row after row:
    ``cu_seqlens_q`` (int32; a segment per sample, and per row's padding run) and ``max_seqlen_q``."""
    flat = segment_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[:: segment_ids.shape[1]] = True  # a row's first token starts a segment even if its id repeats
    bounds = torch.cat([starts.nonzero().flatten(), torch.tensor([flat.numel()])]).to(torch.int32)
    return {"cu_seqlens_q": bounds, "max_seqlen_q": int((bounds[1:] - bounds[:-1]).max())}


@dataclass(frozen=True)
class PackedSample:
    """One sample's place in a training sequence (``batch["samples"]``: per sequence, in order)."""

    source: int  # index of the data source (image-text, text-only)
    key: str  # the record's __key__
    tokens: int  # positions it fills (cut at the sequence end)


def build_sequence(samples: list[tuple[int, Sample]], seq_length: int, pad_id: int, tile: int) -> dict:
    """Concatenate samples (cut at seq_length, never inside an image), then pad; see the module docstring."""
    tokens, labels, loss, positions, segment_ids, views, grids, info = [], [], [], [], [], [], [], []
    for number, (source, sample) in enumerate(samples):
        ids, carries, blocks, sample_views, sample_grids = sample.flatten(seq_length - len(tokens))
        if not ids:
            break
        tokens += ids
        labels += ids[1:] + [pad_id]  # next token within the sample; the last one predicts nothing
        loss += carries[1:] + [0.0]
        positions.append(tiling.mrope_positions(blocks))
        segment_ids += [number] * len(ids)
        views += sample_views
        grids += sample_grids
        info.append(PackedSample(source, sample.key, len(ids)))
    pad = seq_length - len(tokens)
    positions.append(tiling.mrope_positions([tiling.TextBlock(pad)], start=len(tokens)))
    return {
        "tokens": torch.tensor(tokens + [pad_id] * pad, dtype=torch.long),
        "labels": torch.tensor(labels + [pad_id] * pad, dtype=torch.long),
        "loss_mask": torch.tensor(loss + [0.0] * pad, dtype=torch.float),
        "position_ids": torch.cat(positions, dim=1),
        "segment_ids": torch.tensor(segment_ids + [-1] * pad, dtype=torch.long),
        "images": torch.stack(views) if views else torch.zeros(0, 3, tile, tile, dtype=torch.uint8),  # uint8 pixels
        "image_grids": torch.tensor(grids, dtype=torch.long).view(-1, 2),
        "samples": info,
    }
