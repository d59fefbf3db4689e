"""From shard samples to training tensors: the image processor, prompt templates and the collate function.

A sample becomes ``tokens`` / ``labels`` / ``loss_mask`` / ``position_ids`` of length seq_length plus
its images. Only answer (or caption) tokens carry loss; prompt, image and padding positions do not.
"""

import io
import json
import math

import numpy as np
import torch
from PIL import Image

from nemo_pixellm.data.shards import ShardReader
from nemo_pixellm.data.tokenizer import PixelTokenizer


def image_grid_tokens(image_size: int, patch_size: int, downsample: int) -> int:
    """LLM positions of one view: rows x (cols + 1 newline) after pixel-unshuffle (384/14 -> 14 x 15 = 210)."""
    side = math.ceil(image_size // patch_size / downsample)
    return side * (side + 1)


def load_image(data: bytes, size: int) -> torch.Tensor:
    """JPEG bytes -> [3, size, size] in [-1, 1] (SigLIP normalisation: mean 0.5, std 0.5)."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class VisionLanguageDataset(torch.utils.data.Dataset):
    """Map-style dataset over a shard directory. ``task``: "caption" (stage 1/2) or "vqa" (stage 3 chat)."""

    def __init__(self, shard_dir, tokenizer: PixelTokenizer, seq_length: int, image_size: int,
                 patch_size: int, downsample: int, task: str = "caption", num_samples: int | None = None):
        if task not in ("caption", "vqa"):
            raise ValueError(f"unknown task {task!r}: use 'caption' or 'vqa'")
        self.reader = ShardReader(shard_dir)
        self.tokenizer = tokenizer
        self.seq_length = seq_length
        self.image_size = image_size
        self.task = task
        self.image_tokens = image_grid_tokens(image_size, patch_size, downsample)
        self.num_samples = num_samples or len(self.reader)
        if self.image_tokens + 8 > seq_length:
            raise ValueError(f"seq_length {seq_length} cannot hold an image of {self.image_tokens} tokens plus text")

    def __len__(self) -> int:
        return self.num_samples

    def _segments(self, meta: dict, index: int) -> list[tuple[list[int], bool]]:
        """(token ids, carries loss) segments of one sample."""
        tok = self.tokenizer
        image = [tok.image_id] * self.image_tokens
        if self.task == "caption":
            return [(image, False), (tok.encode(meta["caption"]) + [tok.eos_id], True)]
        qa = meta["qa"][index // len(self.reader) % len(meta["qa"])]  # epochs cycle through the questions
        prompt = [tok.user_id] + image + tok.encode(" " + qa["q"]) + [tok.assistant_id]
        return [(prompt, False), (tok.encode(" " + qa["a"]) + [tok.eos_id], True)]

    def __getitem__(self, index: int) -> dict:
        raw = self.reader[index % len(self.reader)]
        meta = json.loads(raw["json"])
        ids, loss = [], []
        for seg, carries_loss in self._segments(meta, index):
            ids += seg
            loss += [float(carries_loss)] * len(seg)
        ids, loss = ids[: self.seq_length + 1], loss[: self.seq_length + 1]
        pad = self.seq_length + 1 - len(ids)
        ids += [self.tokenizer.pad_id] * pad
        loss += [0.0] * pad
        ids_t = torch.tensor(ids, dtype=torch.long)
        return {
            "tokens": ids_t[:-1],
            "labels": ids_t[1:],
            "loss_mask": torch.tensor(loss[1:], dtype=torch.float),  # loss on predicting token t+1
            "position_ids": torch.arange(self.seq_length, dtype=torch.long),
            "images": load_image(raw["jpg"], self.image_size).unsqueeze(0),
        }

    @staticmethod
    def collate_fn(samples: list[dict]) -> dict:
        batch = {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
        batch["images"] = torch.cat([s["images"] for s in samples])  # sample order = image-token order
        return batch
