"""Whether each image token says which shape its cell holds: a linear probe of the shape (circle / square /
triangle) from the token's features at the projector output, over the cells of held-out scenes that hold one.

    .venv/bin/python benchmarks/shape_probe.py CHECKPOINT [CHECKPOINT ...] [--train 300] [--test 200]

Issue 20: "How many circles are there?" is the question type that fails by seed (50-61% in five chains, 99-100% in
two), while "How many shapes are there?" is right in every chain. If the tokens hold the shape, the decoder's
lookup is what fails; if not, the tower is. Chance is about a third. Same probe as ``position_probe.py``
(logistic regression on standardised features, LBFGS); the shapes are recorded as the generator draws them.
"""

import json
import sys
from unittest import mock

import torch
from position_probe import GRID, PROBE_SEED, fit_probe, probe_arguments, token_features  # enables compat first

from nemo_pixellm.data import synthetic
from nemo_pixellm.evaluate import load


def scenes_with_shapes(count: int, first: int, size: int):
    """``count`` shape scenes from PROBE_SEED: (images, [count, GRID, GRID] shape ids, -1 where empty, next index)."""
    images, labels, index = [], [], first
    draw_shape = synthetic._draw_shape
    while len(images) < count:
        cells = torch.full((GRID, GRID), -1)

        def recording(draw, shape, box, fill):
            col, row = int((box[0] + box[2]) / 2 * GRID / size), int((box[1] + box[3]) / 2 * GRID / size)
            cells[row, col] = synthetic.SHAPES.index(shape)
            draw_shape(draw, shape, box, fill)

        with mock.patch.object(synthetic, "_draw_shape", recording):
            scene = synthetic.render_scene(PROBE_SEED, index, size)
        index += 1
        if scene.kind == "scene":
            images.append(scene.image)
            labels.append(cells)
    return images, torch.stack(labels), index


def probe_checkpoint(checkpoint, train: int, test: int) -> dict:
    model, data_config, _ = load(str(checkpoint))
    tile = data_config.image_size
    train_images, train_shapes, next_index = scenes_with_shapes(train, 0, tile)
    test_images, test_shapes, _ = scenes_with_shapes(test, next_index, tile)
    split = {}
    for name, images, shapes in (("train", train_images, train_shapes), ("test", test_images, test_shapes)):
        features = token_features(model, images, tile)
        features = features.reshape(-1, features.shape[-1])
        held = shapes.reshape(-1) >= 0
        split[name] = (features[held], shapes.reshape(-1)[held])
    mean, std = split["train"][0].mean(0), split["train"][0].std(0) + 1e-6
    probe = fit_probe((split["train"][0] - mean) / std, split["train"][1], len(synthetic.SHAPES))
    with torch.no_grad():
        right = probe((split["test"][0] - mean) / std).argmax(-1) == split["test"][1]
    return {"checkpoint": str(checkpoint), "shape_test": right.float().mean().item(),
            "test_shape_tokens": int(right.numel())}


def main() -> None:
    args = probe_arguments(__doc__, 300, 200, "scenes")
    results = [probe_checkpoint(c, args.train, args.test) for c in args.checkpoints]
    print(f"\nlinear probe of the shape in each occupied cell's token, projector output, held-out scenes "
          f"(chance ~33%)")
    for r in results:
        print(f"{r['checkpoint'][-60:]:60s}{r['shape_test']:9.1%} of {r['test_shape_tokens']} tokens")
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
