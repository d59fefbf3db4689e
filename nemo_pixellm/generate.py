"""Batched generation with a PixelLMModel: greedy or sampled (temperature, top-k, top-p), stopping at the
end-of-turn token. With ``use_cache`` (the default) the prompt runs once and every new token attends to
MLA's latent KV cache (``PixelMLASelfAttention.latent_cache``); without it every step reruns the whole
sequence (the reference the cached path is tested against). The cache is for 1-process (TP=1) decoding.

A prompt is what ``TrainingSequences`` would build for the prompt part of a sample (segments from
``nemo_pixellm.data.samples``); generated tokens continue the M-RoPE text positions at max + 1.
"""

import contextlib
from dataclasses import dataclass

import torch

from nemo_pixellm import tiling
from nemo_pixellm.data.samples import Sample
from nemo_pixellm.models.mla import LatentCache, PixelMLASelfAttention


@dataclass
class Prompt:
    tokens: list[int]
    blocks: list[tiling.Block]  # M-RoPE blocks of the prompt (tiling.mrope_positions)
    views: torch.Tensor  # [v, 3, T, T]
    grids: torch.Tensor  # [images, 2]


def prompt_from_sample(sample: Sample) -> Prompt:
    """The segments of ``sample`` up to its first loss-carrying segment (the answer)."""
    tokens, _, blocks, views, grids = sample.flatten(sample.num_tokens, prompt_only=True)
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


@contextlib.contextmanager
def latent_kv_cache(model):
    layers = [m for m in model.modules() if isinstance(m, PixelMLASelfAttention)]
    for layer in layers:
        layer.latent_cache = LatentCache()
    try:
        yield
    finally:
        for layer in layers:
            layer.latent_cache = None


class _Decoder:
    """Collects each row's new tokens until its end token."""

    def __init__(self, rows: int, eos_id: int, temperature: float, top_k: int, top_p: float, seed: int, scores,
                 image_id: int | None = None):
        self.outputs, self.done, self.scores = [[] for _ in range(rows)], [False] * rows, scores
        self.eos_id, self.sampling, self.image_id = eos_id, (temperature, top_k, top_p), image_id
        self.generator = torch.Generator().manual_seed(seed)

    def step(self, last_logits: torch.Tensor) -> torch.Tensor:
        if self.scores is not None:
            self.scores.append(last_logits.float())
        logits = last_logits.float()
        if self.image_id is not None:  # an image placeholder has no image behind it: never emit one
            logits = logits.index_fill(1, torch.tensor([self.image_id]), float("-inf"))
        tokens = sample_next(logits, *self.sampling, self.generator)
        for i, token in enumerate(tokens.tolist()):
            if not self.done[i]:
                if token == self.eos_id:
                    self.done[i] = True
                else:
                    self.outputs[i].append(token)
        return tokens


@torch.no_grad()
def generate(model, prompts: list[Prompt], eos_id: int, pad_id: int, max_new_tokens: int = 8,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             use_cache: bool = True, scores: list | None = None) -> list[list[int]]:
    """New tokens per prompt (without the end token). Right-padded batch; each row reads its own last logit.
    ``scores``: a list that receives each step's next-token logits [b, vocab]."""
    decoder = _Decoder(len(prompts), eos_id, temperature, top_k, top_p, seed, scores,
                       getattr(model, "image_token_id", None))
    images = torch.cat([p.views for p in prompts])
    images = images if images.shape[0] else None
    grids = torch.cat([p.grids for p in prompts])
    rows = torch.arange(len(prompts))
    if not use_cache:
        for _ in range(max_new_tokens):
            seqs = [p.tokens + out for p, out in zip(prompts, decoder.outputs)]
            length = max(map(len, seqs))
            tokens = torch.tensor([r + [pad_id] * (length - len(r)) for r in seqs])
            positions = torch.stack([tiling.mrope_positions(p.blocks + [tiling.TextBlock(length - len(p.tokens))])
                                     for p in prompts], dim=1)  # [3, b, length]
            logits = model(tokens, positions, images=images, image_grids=grids)
            decoder.step(logits[rows, torch.tensor([len(r) - 1 for r in seqs])])
            if all(decoder.done):
                break
        return decoder.outputs

    lengths = torch.tensor([len(p.tokens) for p in prompts])
    length = int(lengths.max())
    tokens = torch.tensor([p.tokens + [pad_id] * (length - len(p.tokens)) for p in prompts])
    prompt_positions = [tiling.mrope_positions(p.blocks + [tiling.TextBlock(length - len(p.tokens) + max_new_tokens)])
                        for p in prompts]
    real = torch.arange(length)[None] < lengths[:, None]  # [b, slots]: cache slots holding real tokens
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    with latent_kv_cache(model):
        mask = ~(real[:, None, None, :] & causal)  # True = masked (Megatron)
        positions = torch.stack([ids[:, :length] for ids in prompt_positions], dim=1)
        logits = model(tokens, positions, attention_mask=mask, images=images, image_grids=grids)
        next_tokens = decoder.step(logits[rows, lengths - 1])
        for k in range(1, max_new_tokens):
            if all(decoder.done):
                break
            real = torch.cat([real, torch.ones(len(prompts), 1, dtype=torch.bool)], dim=1)
            # The k-th new token of row i sits at text position (prompt end + k - 1) of that row.
            positions = torch.stack([ids[:, int(n) + k - 1: int(n) + k] for ids, n in zip(prompt_positions, lengths)],
                                    dim=1)
            logits = model(next_tokens[:, None], positions, attention_mask=~real[:, None, None, :])
            next_tokens = decoder.step(logits[:, -1])
    return decoder.outputs
