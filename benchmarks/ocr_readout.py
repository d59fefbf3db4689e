"""Can a checkpoint's vision tower learn to read the synthetic OCR words when the word is its only target?
Trains the tower and the projector with a small readout on one-line OCR images (30 words) and prints held-out
accuracy every 250 steps; nothing is saved.

    .venv/bin/python benchmarks/ocr_readout.py CHECKPOINT [--readout flat|attention|mean] [--steps 1500]
        [--lr 1e-3] [--train 8000] [--test 500] [--frozen]

``--frozen`` trains the readout alone: whether the tokens a checkpoint already makes can be read that way (with
``attention``, what a decoder's attention could take from them).

Readouts of the projector's tokens: ``flat`` a linear map of all of them (each token's place its own weights),
``attention`` four learned queries attending over them, then an MLP (what a decoder's attention can do), ``mean``
their average, then a linear map (order lost). Issue 20, item 3, measured apart from the decoder: the untrained
tiny tower reads the words here (flat 98% in 1,500 steps) but never learns to through the decoder's answers, and a
tower trained here first let the decoder learn OCR (README). ocr_probe.py reads what a checkpoint's tokens already
hold; this asks what its tower can learn.
"""

import argparse
import random
import time

import torch
from position_probe import PROBE_SEED  # enables the compat layer first

from nemo_pixellm import tiling
from nemo_pixellm.data.synthetic import RENDERERS, WORDS
from nemo_pixellm.evaluate import load


def one_line_words(count: int, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` one-line OCR views (normalised pixels) and their word ids, drawn from the OCR renderer itself
    (ocr_probe.one_line_words renders whole scenes and keeps the OCR ones: ~10x slower for 8,000 images)."""
    views, words, index = [], [], 0
    while len(views) < count:
        image, _, qa = RENDERERS["ocr"](random.Random(f"ocr-readout-{seed}-{index}"), size, size)
        index += 1
        said = [q["a"] for q in qa if q["type"] == "ocr"]
        if len(said) == 1:
            views.append(tiling.normalise(tiling.to_pixels(image.convert("RGB"))))
            words.append(WORDS.index(said[0]))
    return torch.stack(views), torch.tensor(words)


class AttentionReadout(torch.nn.Module):
    """Learned queries, one per head, over the image tokens; the heads' outputs side by side, then an MLP."""

    def __init__(self, width: int, classes: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.queries = torch.nn.Parameter(torch.randn(heads, width // heads) * (width // heads) ** -0.5)
        self.key, self.value = torch.nn.Linear(width, width), torch.nn.Linear(width, width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU(),
                                       torch.nn.Linear(2 * width, classes))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [n, t, width]
        n, t, width = tokens.shape
        keys = self.key(tokens).view(n, t, self.heads, -1)
        values = self.value(tokens).view(n, t, self.heads, -1)
        weights = torch.einsum("hd,nthd->nht", self.queries, keys).softmax(-1)
        return self.mlp(torch.einsum("nht,nthd->nhd", weights, values).reshape(n, width))


class TokenMean(torch.nn.Module):
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.mean(1)


def readout_head(kind: str, tokens: int, width: int) -> torch.nn.Module:
    if kind == "flat":
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(tokens * width, len(WORDS)))
    if kind == "attention":
        return AttentionReadout(width, len(WORDS))
    return torch.nn.Sequential(TokenMean(), torch.nn.Linear(width, len(WORDS)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--readout", choices=("flat", "attention", "mean"), default="attention")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--train", type=int, default=8000, help="training images (one-line OCR)")
    parser.add_argument("--test", type=int, default=500, help="held-out images")
    parser.add_argument("--frozen", action="store_true", help="train the readout only, the tower and projector fixed")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, data_config, _ = load(args.checkpoint)
    tower, projector = model.vision_model.train(not args.frozen), model.projector.train(not args.frozen)
    encoder = [*tower.parameters(), *projector.parameters()]
    for param in encoder:
        param.requires_grad_(not args.frozen)
    size = data_config.image_size
    x_train, y_train = one_line_words(args.train, PROBE_SEED, size)
    x_test, y_test = one_line_words(args.test, PROBE_SEED + 1, size)

    def tokens(views: torch.Tensor) -> torch.Tensor:  # [n, rows * cols, hidden]
        return projector.project(tower(views)).float().flatten(1, 2)

    with torch.no_grad():
        shape = tokens(x_test[:1]).shape
    head = readout_head(args.readout, shape[1], shape[2])
    optimizer = torch.optim.AdamW([*([] if args.frozen else encoder), *head.parameters()], lr=args.lr,
                                  weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    start = time.time()
    print(f"{args.checkpoint}: {args.readout} readout{' (frozen tokens)' if args.frozen else ''} of "
          f"{shape[1]} tokens x {shape[2]}, {size}-pixel views, "
          f"{len(WORDS)} words (chance {1 / len(WORDS):.1%})")
    for step in range(args.steps + 1):
        if step % 250 == 0:
            with torch.no_grad():
                right = sum((head(tokens(x_test[i:i + 100])).argmax(-1) == y_test[i:i + 100]).sum().item()
                            for i in range(0, len(x_test), 100))
            print(f"step {step:5d}  held-out {right / len(x_test):6.1%}  ({time.time() - start:.0f} s)", flush=True)
        if step == args.steps:
            break
        batch = torch.randint(0, len(x_train), (args.batch,), generator=generator)
        loss = torch.nn.functional.cross_entropy(head(tokens(x_train[batch])), y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


if __name__ == "__main__":
    main()
