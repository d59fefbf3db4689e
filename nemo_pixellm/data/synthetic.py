"""Procedurally generated vision-language data with known answers (the embedded default data set).

Each scene is a few coloured shapes on a plain background. Its caption and question/answer pairs are
derived from the scene description, so answers are exact: counts, colours and positions.
Deterministic by (seed, index): sample i is the same on every machine and in every worker.
"""

import io
import json
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
    "purple": (140, 60, 180), "orange": (240, 130, 20), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


@dataclass
class Scene:
    image: Image.Image
    caption: str
    qa: list[dict]


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _plural(word: str, n: int) -> str:
    return word if n == 1 else word + "s"


def render_scene(seed: int, index: int, size: int = 224) -> Scene:
    """One scene: 1-2 kinds of shape, 1-4 of each kind in one colour, placed in a 4x4 cell grid."""
    rng = random.Random(seed * 1_000_003 + index)
    background = rng.choice(["white", "black"])
    image = Image.new("RGB", (size, size), COLOURS[background])
    draw = ImageDraw.Draw(image)
    cells = rng.sample(range(16), 8)
    cell = size // 4
    kinds = rng.sample(SHAPES, rng.choice([1, 2]))
    colours = rng.sample([c for c in COLOURS if c != background], len(kinds))
    groups, used = [], 0
    for shape, colour in zip(kinds, colours):
        count = rng.randint(1, 4)
        xs = []
        for c in cells[used:used + count]:
            row, col = divmod(c, 4)
            pad = rng.randint(cell // 16, cell // 5)
            _draw(draw, shape, (col * cell + pad, row * cell + pad, (col + 1) * cell - pad, (row + 1) * cell - pad),
                  COLOURS[colour])
            xs.append(col)
        used += count
        side = "left" if sum(xs) / len(xs) < 1.5 else "right"
        groups.append({"shape": shape, "colour": colour, "count": count, "side": side})

    parts = [f"{NUMBER_WORDS[g['count']]} {g['colour']} {_plural(g['shape'], g['count'])}" for g in groups]
    caption = f"{' and '.join(parts)} on a {background} background."
    qa = []
    for g in groups:
        qa.append({"type": "count", "q": f"How many {g['shape']}s are there?", "a": NUMBER_WORDS[g["count"]]})
        qa.append({"type": "colour", "q": f"What colour are the {g['shape']}s?", "a": g["colour"]})
        qa.append({"type": "position", "q": f"Are the {g['shape']}s mostly on the left or the right?", "a": g["side"]})
    return Scene(image=image, caption=caption, qa=qa)


def scene_record(seed: int, index: int, size: int, quality: int = 90) -> dict:
    """A webdataset record: key, jpg bytes, json metadata."""
    scene = render_scene(seed, index, size)
    buf = io.BytesIO()
    scene.image.save(buf, format="JPEG", quality=quality)
    meta = {"caption": scene.caption, "qa": scene.qa, "seed": seed, "index": index}
    return {"__key__": f"{seed:04d}_{index:08d}", "jpg": buf.getvalue(), "json": json.dumps(meta).encode()}
