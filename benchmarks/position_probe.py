"""How much of its own place an image token carries into the language model: a linear probe of each image token's
column and row (of the scenes' 4x4 grid) from its features at the projector output, on held-out scenes.

    .venv/bin/python benchmarks/position_probe.py CHECKPOINT [CHECKPOINT ...] [--train 300] [--test 200]

CHECKPOINT is a checkpoint.save directory (e.g. runs/stage_chain/stage3/checkpoints); its view size must give one
token per grid cell (112-pixel views: 8x8 patches, 2x2 unshuffled). The probe is multinomial logistic regression
on standardised features (LBFGS), fitted on the tokens of --train scenes and scored on --test others. Printed per
checkpoint: column and row accuracy over all tokens and over the cells holding a shape (what position questions
ask about); chance is 25 %. Issue 20's diagnosis of weak position answers reads these figures.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from nemo_pixellm import compat

compat.enable(quiet=True)

from nemo_pixellm import tiling  # noqa: E402
from nemo_pixellm.data.synthetic import render_scene  # noqa: E402
from nemo_pixellm.evaluate import load  # noqa: E402

PROBE_SEED = 97  # a scene set no training split uses
GRID = 4  # the scenes' cells per side


def scenes(count: int, first: int, size: int):
    """``count`` shape scenes (not OCR or charts) from PROBE_SEED, starting the search at index ``first``."""
    found, index = [], first
    while len(found) < count:
        scene = render_scene(PROBE_SEED, index, size)
        index += 1
        if scene.kind == "scene":
            found.append(scene.image)
    return found, index


def occupied_cells(image) -> torch.Tensor:
    """[GRID, GRID] True where a cell holds a shape (pixels other than its background colour)."""
    pixels = tiling.normalise(tiling.to_pixels(image.convert("RGB")))  # [3, H, W]
    _, height, width = pixels.shape
    cells = pixels.reshape(3, GRID, height // GRID, GRID, width // GRID)
    background = pixels[:, 0, 0].view(3, 1, 1, 1, 1)
    return (cells - background).abs().amax(dim=(0, 2, 4)) > 0.2


@torch.no_grad()
def token_features(model, images, tile: int) -> torch.Tensor:
    """[images, GRID, GRID, hidden]: each image's global view through the tower and the projector."""
    views = torch.stack([tiling.to_pixels(image.convert("RGB").resize((tile, tile))) for image in images])
    views = tiling.normalise(views)
    features = model.projector.project(model.vision_model(views))
    if features.shape[1:3] != (GRID, GRID):
        raise SystemExit(f"{tile}-pixel views give {features.shape[1]}x{features.shape[2]} tokens, not one per cell "
                         f"of the {GRID}x{GRID} grid: probe a checkpoint trained at 112-pixel views")
    return features.float()


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int) -> torch.nn.Linear:
    probe = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(x), y) + 1e-4 * probe.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe


def probe_checkpoint(checkpoint: Path, train: int, test: int) -> dict:
    model, data_config, _ = load(str(checkpoint))
    tile = data_config.image_size
    train_images, next_index = scenes(train, 0, tile)
    test_images, _ = scenes(test, next_index, tile)
    rows, cols = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    out = {"checkpoint": str(checkpoint)}
    split = {}
    for name, images in (("train", train_images), ("test", test_images)):
        features = token_features(model, images, tile)
        split[name] = (features.reshape(-1, features.shape[-1]),
                       torch.stack([occupied_cells(image) for image in images]).reshape(-1))
    mean, std = split["train"][0].mean(0), split["train"][0].std(0) + 1e-6
    n_train, n_test = len(train_images), len(test_images)
    for axis, labels in (("column", cols), ("row", rows)):
        y_train, y_test = labels.reshape(-1).repeat(n_train), labels.reshape(-1).repeat(n_test)
        probe = fit_probe((split["train"][0] - mean) / std, y_train, GRID)
        with torch.no_grad():
            right = probe((split["test"][0] - mean) / std).argmax(-1) == y_test
        shapes = split["test"][1]
        out[f"{axis}_all"] = right.float().mean().item()
        out[f"{axis}_shapes"] = right[shapes].float().mean().item()
    out["test_tokens"], out["test_shape_tokens"] = int(shapes.numel()), int(shapes.sum())
    return out


def probe_arguments(doc: str, train: int, test: int, images: str) -> argparse.Namespace:
    """A probe benchmark's command line: checkpoints, --train / --test image counts."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--train", type=int, default=train, help=f"{images} whose tokens fit the probe")
    parser.add_argument("--test", type=int, default=test, help=f"other {images} whose tokens score it")
    return parser.parse_args()


def main() -> None:
    args = probe_arguments(__doc__, 300, 200, "scenes")
    results = [probe_checkpoint(c, args.train, args.test) for c in args.checkpoints]
    print(f"\nlinear probe of each image token's place in the {GRID}x{GRID} grid, projector output, held-out scenes "
          f"(chance 25%)")
    print(f"{'checkpoint':60s}{'column':>9s}{'col@shape':>11s}{'row':>9s}{'row@shape':>11s}")
    for r in results:
        print(f"{r['checkpoint'][-60:]:60s}{r['column_all']:9.1%}{r['column_shapes']:11.1%}{r['row_all']:9.1%}"
              f"{r['row_shapes']:11.1%}")
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
