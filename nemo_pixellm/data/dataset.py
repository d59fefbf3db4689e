"""From shard samples to training tensors: image tiling, prompt templates, M-RoPE positions, collate.

A sample becomes ``tokens`` / ``labels`` / ``loss_mask`` of length seq_length, ``position_ids`` [3, seq]
(M-RoPE t / h / w, see ``nemo_pixellm.tiling``), its image views [v, 3, T, T] and their tile grids
[images, 2]. Only answer (or caption) tokens carry loss; prompt, image and padding positions do not.

Progressive resolution: ``resolution_schedule`` [[fraction of training, view size], ...] picks the view
size from the sample index (Megatron's sampler hands out global sample indices in order, so index //
global_batch_size is the step): deterministic, the same after a resume, and one size per global batch.
"""

import io
import json

import torch
from PIL import Image

from nemo_pixellm import tiling
from nemo_pixellm.data.shards import ShardReader
from nemo_pixellm.data.tokenizer import PixelTokenizer


def decode_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def resolution_at(schedule: list, step: int, total_steps: int) -> int:
    """The view size of the last schedule entry whose start (a fraction of training) is at or before step."""
    size = schedule[0][1]
    for fraction, entry_size in schedule:
        if step >= round(float(fraction) * total_steps):
            size = entry_size
    return int(size)


def segment_length(segment: tuple) -> int:
    return segment[1].tokens if segment[0] == "image" else len(segment[1])


def encode_segments(segments: list[tuple], seq_length: int, pad_id: int) -> dict:
    """Segments ("text", ids, carries_loss) / ("image", ImageLayout, image_token_id) -> the model's tensors."""
    ids, loss, blocks = [], [], []
    for segment in segments:
        if segment[0] == "text":
            _, text_ids, carries_loss = segment
            ids += text_ids
            loss += [float(carries_loss)] * len(text_ids)
            blocks.append(("text", len(text_ids)))
        else:
            _, layout, image_token_id = segment
            ids += [image_token_id] * layout.tokens
            loss += [0.0] * layout.tokens
            blocks += layout.blocks
    pad = seq_length + 1 - len(ids)
    if pad > 0:
        ids += [pad_id] * pad
        loss += [0.0] * pad
        blocks.append(("text", pad))
    ids_t = torch.tensor(ids[: seq_length + 1], dtype=torch.long)
    return {
        "tokens": ids_t[:-1],
        "labels": ids_t[1:],
        "loss_mask": torch.tensor(loss[1: seq_length + 1], dtype=torch.float),  # loss on predicting token t+1
        "position_ids": tiling.mrope_positions(blocks)[:, :seq_length],
    }


class VisionLanguageDataset(torch.utils.data.Dataset):
    """Map-style dataset over a shard directory. ``task``: "caption" (stage 1/2) or "vqa" (stage 3 chat)."""

    def __init__(self, shard_dir, tokenizer: PixelTokenizer, seq_length: int, image_size: int,
                 patch_size: int, downsample: int, task: str = "caption", num_samples: int | None = None,
                 max_tiles: int = tiling.MAX_TILES, resolution_schedule: list | None = None,
                 global_batch_size: int = 1):
        if task not in ("caption", "vqa"):
            raise ValueError(f"unknown task {task!r}: use 'caption' or 'vqa'")
        self.reader = ShardReader(shard_dir)
        self.tokenizer = tokenizer
        self.seq_length = seq_length
        self.patch_size, self.downsample, self.max_tiles = patch_size, downsample, max_tiles
        self.task = task
        self.num_samples = num_samples or len(self.reader)
        self.schedule = [list(entry) for entry in resolution_schedule] if resolution_schedule else [[0.0, image_size]]
        self.total_steps = max(self.num_samples // max(global_batch_size, 1), 1)
        self.global_batch_size = max(global_batch_size, 1)
        for _, size in self.schedule:
            smallest = tiling.image_layout(size, size, tile=size, patch=patch_size, downsample=downsample, max_tiles=0)
            if smallest.tokens + 8 > seq_length:
                raise ValueError(f"seq_length {seq_length} cannot hold a {size}px view ({smallest.tokens} tokens) "
                                 f"plus text: raise seq_length to at least {smallest.tokens + 8}")

    def __len__(self) -> int:
        return self.num_samples

    def view_size(self, index: int) -> int:
        return resolution_at(self.schedule, index // self.global_batch_size, self.total_steps)

    def _layout(self, image: Image.Image, tile: int, max_tiles: int, images_in_sample: int) -> tiling.ImageLayout:
        return tiling.image_layout(*image.size, tile=tile, patch=self.patch_size, downsample=self.downsample,
                                   max_tiles=max_tiles, images_in_sample=images_in_sample)

    def _segments(self, meta: dict, index: int, image_segment) -> list[tuple]:
        tok = self.tokenizer
        if self.task == "caption":
            return [image_segment, ("text", tok.encode(meta["caption"]) + [tok.eos_id], True)]
        qa = meta["qa"][index // len(self.reader) % len(meta["qa"])]  # epochs cycle through the questions
        return [("text", [tok.user_id], False), image_segment,
                ("text", tok.encode(" " + qa["q"]) + [tok.assistant_id], False),
                ("text", tok.encode(" " + qa["a"]) + [tok.eos_id], True)]

    def __getitem__(self, index: int) -> dict:
        raw = self.reader[index % len(self.reader)]
        meta = json.loads(raw["json"])
        image = decode_image(raw["jpg"])
        tile = self.view_size(index)
        # Fewer tiles when the full tiling does not leave room for the text (DeepSeek-VL2 would truncate).
        for max_tiles in dict.fromkeys((self.max_tiles, min(self.max_tiles, 1), 0)):
            layout = self._layout(image, tile, max_tiles, images_in_sample=1)
            segments = self._segments(meta, index, ("image", layout, self.tokenizer.image_id))
            prompt = sum(segment_length(s) for s in segments if s[0] == "image" or not s[2])
            if prompt < self.seq_length:
                break
        sample = encode_segments(segments, self.seq_length, self.tokenizer.pad_id)
        sample["images"] = torch.stack([tiling.to_tensor(v) for v in tiling.tile_image(image, layout, tile)])
        sample["image_grids"] = torch.tensor([layout.grid], dtype=torch.long)
        return sample

    @staticmethod
    def collate_fn(samples: list[dict]) -> dict:
        batch = {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask")}
        batch["position_ids"] = torch.stack([s["position_ids"] for s in samples], dim=1)  # [3, b, s]
        # Views and grids in sample order = image-token order.
        batch["images"] = torch.cat([s["images"] for s in samples])
        batch["image_grids"] = torch.cat([s["image_grids"] for s in samples])
        return batch
