"""Whether the image tokens hold the word an OCR image shows: a linear probe of the word (30 classes) from the
projector output of one-line OCR images (all of the view's tokens, concatenated), on held-out images.

    .venv/bin/python benchmarks/ocr_probe.py CHECKPOINT [CHECKPOINT ...] [--train 900] [--test 300]

Issue 20, item 3 measured apart from the decoder: if the probe reads the word and the chain's OCR answers stay
near chance, the decoder's mapping is what fails; if the probe cannot read it either, the tower (its size, the
view size, the font) is. Chance is 1/30 (3.3 %). Same probe as ``position_probe.py`` (logistic regression, LBFGS).
"""

import json
import sys
from pathlib import Path

import torch
from position_probe import PROBE_SEED, fit_probe, probe_arguments, token_features  # enables the compat layer first

from nemo_pixellm.data.synthetic import WORDS, render_scene
from nemo_pixellm.evaluate import load


def one_line_words(count: int, first: int, size: int):
    """``count`` one-line OCR images of the probe set from index ``first``: (images, word ids, next index)."""
    images, words, index = [], [], first
    while len(images) < count:
        scene = render_scene(PROBE_SEED, index, size)
        index += 1
        said = [qa["a"] for qa in scene.qa if qa["type"] == "ocr"]
        if scene.kind == "ocr" and len(said) == 1:
            images.append(scene.image)
            words.append(WORDS.index(said[0]))
    return images, torch.tensor(words), index


def probe_checkpoint(checkpoint: Path, train: int, test: int) -> dict:
    model, data_config, _ = load(str(checkpoint))
    tile = data_config.image_size
    train_images, y_train, next_index = one_line_words(train, 0, tile)
    test_images, y_test, _ = one_line_words(test, next_index, tile)
    x_train = token_features(model, train_images, tile).flatten(1)
    x_test = token_features(model, test_images, tile).flatten(1)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    probe = fit_probe((x_train - mean) / std, y_train, len(WORDS))
    with torch.no_grad():
        test_right = (probe((x_test - mean) / std).argmax(-1) == y_test).float().mean().item()
        train_right = (probe((x_train - mean) / std).argmax(-1) == y_train).float().mean().item()
    return {"checkpoint": str(checkpoint), "word_test": test_right, "word_train": train_right,
            "test_images": len(test_images)}


def main() -> None:
    args = probe_arguments(__doc__, 900, 300, "one-line OCR images")
    results = [probe_checkpoint(c, args.train, args.test) for c in args.checkpoints]
    print(f"\nlinear probe of the word ({len(WORDS)} classes, chance {1 / len(WORDS):.1%}) from one-line OCR "
          "images' tokens, projector output")
    print(f"{'checkpoint':60s}{'held-out':>10s}{'train':>8s}")
    for r in results:
        print(f"{r['checkpoint'][-60:]:60s}{r['word_test']:10.1%}{r['word_train']:8.1%}")
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
