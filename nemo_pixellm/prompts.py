"""A request (text, images) laid out as training laid out its samples: the prompt's tokens, M-RoPE blocks, views
and tile grids. Shared by ``nemo_pixellm.generate`` (Megatron model) and ``nemo_pixellm.hf`` (transformers)."""

from dataclasses import dataclass

import torch
from PIL import Image

from nemo_pixellm import tiling
from nemo_pixellm.data.samples import ImageSegment, Sample, TextSegment, chat_segments


@dataclass
class Prompt:
    tokens: list[int]
    blocks: list[tiling.Block]  # M-RoPE blocks of the prompt (tiling.mrope_positions)
    views: torch.Tensor  # [v, 3, T, T]
    grids: torch.Tensor  # [images, 2]
    start: int = 0  # M-RoPE id of the first token (a turn continuing a conversation)


def prompt_from_sample(sample: Sample) -> Prompt:
    """The segments of ``sample`` up to its first loss-carrying segment (the answer)."""
    tokens, _, blocks, views, grids = sample.flatten(sample.num_tokens, prompt_only=True)
    tile = sample.tile or 1
    return Prompt(tokens, blocks, tiling.normalise(torch.stack(views)) if views else torch.zeros(0, 3, tile, tile),
                  torch.tensor(grids, dtype=torch.long).view(-1, 2))


def prompt_from_request(tokenizer, text: str, images: list[Image.Image], data_config) -> Prompt:
    """A user turn (``text``, the images where its <image> placeholders stand, else before it) and the
    assistant's start, laid out as the checkpoint's training data was (``data_config``: its dataset section)."""
    tile = data_config.image_size
    segments = [ImageSegment(tiling.image_layout(*image.size, tile=tile, patch=data_config.patch_size,
                                                 downsample=data_config.downsample, max_tiles=data_config.max_tiles,
                                                 images_in_sample=len(images)), tokenizer.image_id, image)
                for image in images]
    turn = chat_segments(tokenizer, [{"from": "human", "value": text}], segments)
    return prompt_from_sample(Sample("request", turn + [TextSegment([tokenizer.assistant_id], False)], tile))

