"""Pretrain a checkpoint's vision tower to name what its images show; save it as a Hugging Face SigLIP directory.

The real variants start their tower from pretrained SigLIP (``model.vision_pretrained_path``). The tiny variant has
no such tower, and its random 2-layer one never learns to read the synthetic words through the decoder's answers
(issue 20: OCR 2-13% in every chain; with a tower that reads, the decoder learned OCR). This is its stand-in for
SigLIP's pretraining: the tower and a linear map of all its patch features predict which tokens each image's
caption holds (multi-label; each token's positive loss weighted by its rarity, as balanced BCE does, so the
rare words count as much as the common colours). ``ocr_share`` of the images show text, as SigLIP's web data
often does (at the generator's 20% the tower read 26% of held-out words after 1,500 steps, at 60% 80%). The map
is dropped; the tower is written as a ``SiglipVisionModel`` directory for ``model.vision_pretrained_path``.

    python -m nemo_pixellm.vision_pretrain checkpoint=<a checkpoint of the variant> out=<dir> [steps=2000]
        [images=16000] [ocr_share=0.6] [batch=64] [lr=1e-3]

The checkpoint gives the tower to start from and its data config (view size, tokenizer, seed); the images are
the synthetic generator's training split (the held-out split, seed + 1, only measures: the share of one-line
text images whose word the map ranks first among the generator's words).
"""

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import MISSING

from nemo_pixellm import compat

compat.enable(quiet=True)

from nemo_pixellm import tiling  # noqa: E402
from nemo_pixellm.data import sources, synthetic  # noqa: E402


@dataclass
class TowerPretrainArgs:
    checkpoint: str = MISSING     # a nemo_pixellm.train checkpoint: the tower to start from and its data config
    out: str = MISSING            # the SiglipVisionModel directory to write (must not hold files yet)
    steps: int = 2000
    batch: int = 64
    lr: float = 1e-3              # AdamW, 100 warm-up steps, cosine to 0
    images: int = 16000           # from the synthetic training split
    ocr_share: float = 0.6        # of them, images of text (the generator draws 20%)
    max_token_weight: float = 100.0  # cap on a caption token's rarity weight
    heldout_images: int = 300     # one-line text images of the held-out split, for the printed reading figure
    log_interval: int = 250


def caption_token_targets(token_ids: list[list[int]], vocab_size: int) -> torch.Tensor:
    """[images, vocab] multi-hot: which tokens each caption holds."""
    targets = torch.zeros(len(token_ids), vocab_size)
    for row, ids in enumerate(token_ids):
        targets[row, ids] = 1.0
    return targets


def rarity_weights(targets: torch.Tensor, max_weight: float) -> torch.Tensor:
    """Balanced BCE's positive weight per token: its negatives over its positives, in [1, max_weight]."""
    positives = targets.sum(0)
    return ((len(targets) - positives) / positives.clamp(min=1)).clamp(1.0, max_weight)


def pretrain_tower(tower, views: torch.Tensor, targets: torch.Tensor, args: TowerPretrainArgs, log=print):
    """Train ``tower`` (in place) and a linear map of its flattened patch features to predict ``targets`` from
    ``views`` (uint8 [n, 3, H, W]). Returns (the map, the loss of every step)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        features = tower(tiling.normalise(views[:1])).numel()
    token_map = torch.nn.Linear(features, targets.shape[1])
    weights = rarity_weights(targets, args.max_token_weight)
    optimizer = torch.optim.AdamW([*tower.parameters(), *token_map.parameters()], lr=args.lr, weight_decay=0.0)
    warmup = min(100, args.steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    tower.train()
    losses, start = [], time.time()
    for step in range(1, args.steps + 1):
        rows = torch.randint(0, len(views), (args.batch,), generator=generator)
        logits = token_map(tower(tiling.normalise(views[rows])).flatten(1))
        loss = F.binary_cross_entropy_with_logits(logits, targets[rows], pos_weight=weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % args.log_interval == 0 or step == args.steps:
            recent = losses[-args.log_interval:]
            log(f"[vision_pretrain] step {step}/{args.steps}: loss {sum(recent) / len(recent):.4f} "
                f"({time.time() - start:.0f} s)")
    return token_map.eval(), losses


def training_scenes(seed: int, count: int, size: int, ocr_share: float) -> list:
    """``count`` scenes of the synthetic training split, ``ocr_share`` of them text images."""
    scenes, texts, index = [], 0, 0
    while len(scenes) < count:
        scene = synthetic.render_scene(seed, index, size)
        index += 1
        if (scene.kind == "ocr") == (texts < ocr_share * (len(scenes) + 1)):
            scenes.append(scene)
            texts += scene.kind == "ocr"
    return scenes


def words_read(tower, token_map, tokenizer, seed: int, count: int, size: int) -> float:
    """Share of the held-out split's one-line text images whose word the map ranks first among the words."""
    views, answers, index = [], [], 0
    while len(views) < count:
        scene = synthetic.render_scene(seed + synthetic.HELDOUT_SEED_OFFSET, index, size)
        index += 1
        said = [qa["a"] for qa in scene.qa if qa["type"] == "ocr"]
        if scene.kind == "ocr" and len(said) == 1:
            views.append(tiling.to_pixels(scene.image.convert("RGB")))
            answers.append(synthetic.WORDS.index(said[0]))
    word_tokens = [tokenizer.encode(word) for word in synthetic.WORDS]
    tower.eval()
    with torch.no_grad():
        scores = F.logsigmoid(token_map(tower(tiling.normalise(torch.stack(views))).flatten(1)))
        per_word = torch.stack([scores[:, ids].mean(1) for ids in word_tokens], dim=1)
    return (per_word.argmax(1) == torch.tensor(answers)).float().mean().item()


def main(argv=None) -> None:
    from nemo_pixellm.evaluate import load, parse_args
    from nemo_pixellm.hf.siglip import save_siglip_tower

    args = parse_args(TowerPretrainArgs, sys.argv[1:] if argv is None else argv, required=("checkpoint", "out"))
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"error: out={out} already holds files; give an empty or new directory")
    if not 0.0 <= args.ocr_share <= 1.0:
        sys.exit(f"error: ocr_share={args.ocr_share}: give a share in [0, 1]")
    torch.manual_seed(0)
    model, data_config, _ = load(args.checkpoint)
    tokenizer = sources.load_tokenizer(data_config)
    size, seed = data_config.image_size, data_config.seed
    start = time.time()
    scenes = training_scenes(seed, args.images, size, args.ocr_share)
    views = torch.stack([tiling.to_pixels(scene.image.convert("RGB")) for scene in scenes])
    targets = caption_token_targets([tokenizer.encode(scene.caption) for scene in scenes], tokenizer.vocab_size)
    print(f"[vision_pretrain] {len(scenes)} {size}-pixel training images ({args.ocr_share:.0%} text) in "
          f"{time.time() - start:.0f} s", flush=True)
    tower = model.vision_model
    token_map, _ = pretrain_tower(tower, views, targets, args, log=lambda line: print(line, flush=True))
    read = words_read(tower, token_map, tokenizer, seed, args.heldout_images, size)
    print(f"[vision_pretrain] held-out one-line text images whose word the map ranks first: {read:.1%} of "
          f"{args.heldout_images} (chance {1 / len(synthetic.WORDS):.1%})")
    save_siglip_tower(tower, out)
    print(f"[vision_pretrain] wrote {out}: start a run's tower from it with model.vision_pretrained_path={out}")


if __name__ == "__main__":
    main()
