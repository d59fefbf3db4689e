"""Batched generation with a PixelLMModel: greedy or sampled (temperature, top-k, top-p), stopping at the
end-of-turn token. Every step runs the whole sequence again (no KV cache yet): right for the short answers
of evaluation, not for long outputs.

A prompt is what ``TrainingSequences`` would build for the prompt part of a sample (segments from
``nemo_pixellm.data.samples``); generated tokens continue the M-RoPE text positions at max + 1.
"""

from dataclasses import dataclass

import torch

from nemo_pixellm import tiling
from nemo_pixellm.data.samples import Sample


@dataclass
class Prompt:
    tokens: list[int]
    blocks: list[tuple]  # M-RoPE blocks of the prompt (tiling.mrope_positions)
    views: torch.Tensor  # [v, 3, T, T]
    grids: torch.Tensor  # [images, 2]


def prompt_from_sample(sample: Sample) -> Prompt:
    """The segments of ``sample`` up to its first loss-carrying segment (the answer)."""
    tokens, blocks, views, grids = [], [], [], []
    for segment in sample.segments:
        if segment[0] == "text" and segment[2]:
            break
        if segment[0] == "image":
            layout = segment[1]
            tokens += [segment[2]] * layout.tokens
            blocks += layout.blocks
            views += [tiling.to_tensor(v) for v in tiling.tile_image(sample.image, layout, sample.tile)]
            grids.append(layout.grid)
        else:
            tokens += segment[1]
            blocks.append(("text", len(segment[1])))
    tile = sample.tile or 1
    return Prompt(tokens, blocks, torch.stack(views) if views else torch.zeros(0, 3, tile, tile),
                  torch.tensor(grids, dtype=torch.long).view(-1, 2))


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    """[b, vocab] -> [b] token ids: argmax at temperature 0, else sampling from the filtered distribution."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompts: list[Prompt], eos_id: int, pad_id: int, max_new_tokens: int = 8,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[list[int]]:
    """New tokens per prompt (without the end token). Right-padded batch; each row reads its own last logit."""
    generator = torch.Generator().manual_seed(seed)
    outputs = [[] for _ in prompts]
    done = [False] * len(prompts)
    images = torch.cat([p.views for p in prompts])
    grids = torch.cat([p.grids for p in prompts])
    for _ in range(max_new_tokens):
        rows = [p.tokens + out for p, out in zip(prompts, outputs)]
        length = max(map(len, rows))
        tokens = torch.tensor([r + [pad_id] * (length - len(r)) for r in rows])
        positions = torch.stack([
            tiling.mrope_positions(p.blocks + [("text", len(out) + length - len(r))])
            for p, out, r in zip(prompts, outputs, rows)], dim=1)  # [3, b, length]
        logits = model(tokens, positions, images=images if images.shape[0] else None, image_grids=grids)
        last = torch.tensor([len(r) - 1 for r in rows])
        next_tokens = sample_next(logits[torch.arange(len(rows)), last].float(), temperature, top_k, top_p, generator)
        for i, token in enumerate(next_tokens.tolist()):
            if done[i]:
                continue
            if token == eos_id:
                done[i] = True
            else:
                outputs[i].append(token)
        if all(done):
            break
    return outputs
