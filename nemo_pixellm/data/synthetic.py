"""Procedurally generated vision-language data with known answers (the embedded default data set).

Three kinds of sample, each with a caption, question/answer pairs and a multi-turn conversation:
- "scene": 1-3 groups of coloured shapes in a 4x4 grid: counts, colours, positions (left/right,
  top/bottom; the caption names each lone shape's quarter) and relations ("what is to the left of the red
  circle?", CLEVR's half-plane sense).
- "ocr": one or two short words in a large font (words the tiny BPE holds as single tokens, see
  ``sources.ensure_tokenizer``: an answer is one token; three-digit numbers at 112 px were never read).
- "chart": a bar chart with lettered bars: bar values, tallest / shortest bar, bar colours.
Each answer is one or two words, so exact match is a meaningful accuracy and a verifiable reward.
Question types: count, colour, position, relation, ocr, chart.

Deterministic by (seed, index): sample i is the same on every machine and in every worker. Geometry
is drawn as fractions of the image, so the text of a sample does not depend on the image size either.
"""

import functools
import io
import json
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
    "purple": (140, 60, 180), "orange": (240, 130, 20), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve")
WORDS = ("cat", "dog", "sun", "tree", "book", "fish", "star", "moon", "cake", "ship", "bird", "lamp", "rain",
         "door", "milk", "apple", "river", "house", "train", "music", "cloud", "bread", "chair", "smile",
         "light", "plant", "stone", "water", "zebra", "pixel")
CHART_LABELS = "ABCDE"
CHART_GRID = (200, 200, 200)
KINDS = (("scene", 0.6), ("ocr", 0.2), ("chart", 0.2))  # (kind, default share)
HELDOUT_SEED_OFFSET = 1  # the held-out split is the same generator at seed + 1 (as the data provider does)


@dataclass
class Scene:
    image: Image.Image
    caption: str
    qa: list[dict]
    kind: str = "scene"
    conversations: list[dict] = field(default_factory=list)


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(size, 4))  # Pillow's embedded font: no font files needed


def _fit_font(text: str, max_w: float, max_h: float) -> ImageFont.FreeTypeFont:
    """The largest font (at most max_h pixels) in which ``text`` fits the box."""
    size = max(int(max_h), 4)
    while size > 4:
        left, top, right, bottom = _font(size).getbbox(text)
        if right - left <= max_w and bottom - top <= max_h:
            break
        size = int(size * 0.9)
    return _font(size)


def _draw_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font, fill) -> None:
    """Draw text with its ink's top-left corner at ``xy`` (not the font's origin)."""
    left, top, _, _ = font.getbbox(text)
    draw.text((round(xy[0]) - left, round(xy[1]) - top), text, font=font, fill=fill)


def _text_size(text: str, font) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom - top


def _foreground(background: str) -> list[str]:
    """Colours that stand out on the background (yellow on white is too faint)."""
    return [c for c in COLOURS if c != background and not (background == "white" and c == "yellow")]


def _canvas(background: str, width: int, height: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (width, height), COLOURS[background])
    draw = ImageDraw.Draw(image)
    draw.fontmode = "1"  # no anti-aliasing: text pixels keep their exact colour
    return image, draw


def _plural(word: str, n: int) -> str:
    return word if n == 1 else word + "s"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


# A relation question names the one object in the half-plane on that side of a reference object.
RELATIONS = (
    ("to the left of", lambda o, ref: o["col"] < ref["col"]),
    ("to the right of", lambda o, ref: o["col"] > ref["col"]),
    ("above", lambda o, ref: o["row"] < ref["row"]),
    ("below", lambda o, ref: o["row"] > ref["row"]),
)


def _shapes(rng: random.Random, width: int, height: int):
    """Groups of one shape in one colour (1-4 each); shapes fill 60-90% of a grid cell, so never touch."""
    background = rng.choice(["white", "black"])
    image, draw = _canvas(background, width, height)
    n_groups = rng.choice([1, 2, 3])
    kinds = rng.sample(SHAPES, n_groups)
    colours = rng.sample(_foreground(background), n_groups)
    counts = [rng.randint(1, 4) for _ in kinds]
    cells = rng.sample(range(16), sum(counts))
    cell_w, cell_h = width / 4, height / 4
    objects = []
    for shape, colour, count in zip(kinds, colours, counts):
        for _ in range(count):
            row, col = divmod(cells[len(objects)], 4)
            side = min(cell_w, cell_h) * (0.6 + 0.3 * rng.random())
            cx, cy = (col + 0.5) * cell_w, (row + 0.5) * cell_h
            box = (round(cx - side / 2), round(cy - side / 2), round(cx + side / 2) - 1, round(cy + side / 2) - 1)
            _draw_shape(draw, shape, box, COLOURS[colour])
            objects.append({"shape": shape, "colour": colour, "row": row, "col": col, "single": count == 1})

    def place(shape: str) -> str:  # a lone shape's place: writing it needs the shape token's own position
        lone = next(o for o in objects if o["shape"] == shape)
        return f" at the {'top' if lone['row'] < 2 else 'bottom'} {'left' if lone['col'] < 2 else 'right'}"

    parts = [f"{NUMBER_WORDS[n]} {c} {_plural(s, n)}" + (place(s) if n == 1 else "")
             for s, c, n in zip(kinds, colours, counts)]
    caption = f"{_join(parts)} on a {background} background."
    qa = [{"type": "count", "q": "How many shapes are there?", "a": NUMBER_WORDS[len(objects)]}]
    for shape, colour, count in zip(kinds, colours, counts):
        qa.append({"type": "count", "q": f"How many {shape}s are there?", "a": NUMBER_WORDS[count]})
        verb, noun = ("is", shape) if count == 1 else ("are", shape + "s")
        qa.append({"type": "colour", "q": f"What colour {verb} the {noun}?", "a": colour})
    for ref in (o for o in objects if o["single"]):
        name = f"{ref['colour']} {ref['shape']}"
        # The question names no answer word: with "left or the right?" offered, the decoder copied an offered
        # option instead of looking the object up (benchmarks/answer_attention.py). Two phrasings per axis.
        object_last = rng.random() < 0.5
        qa.append({"type": "position", "q": f"On which side is the {name}?" if object_last else
                   f"Which side is the {name} on?", "a": "left" if ref["col"] < 2 else "right"})
        qa.append({"type": "position", "q": f"How high up is the {name}?" if object_last else
                   f"How high is the {name}?", "a": "top" if ref["row"] < 2 else "bottom"})
        for phrase, holds in RELATIONS:
            others = [o for o in objects if o is not ref and holds(o, ref)]
            if len(others) == 1:
                qa.append({"type": "relation", "q": f"What is {phrase} the {name}?",
                           "a": f"{others[0]['colour']} {others[0]['shape']}"})
    return image, caption, qa


def _ocr(rng: random.Random, width: int, height: int):
    """One or two words (top and bottom half), in different colours, the ink 60-90% of the line's height."""
    background = rng.choice(["white", "black"])
    image, draw = _canvas(background, width, height)
    n_lines = rng.choice([1, 2])
    texts = rng.sample(WORDS, n_lines)
    colours = rng.sample(_foreground(background), n_lines)
    band_h = height / n_lines
    for line, (text, colour) in enumerate(zip(texts, colours)):
        font = _fit_font(text, 0.95 * width, band_h * (0.6 + 0.3 * rng.random()))
        text_w, text_h = _text_size(text, font)
        x = (width - text_w) * rng.random()
        y = line * band_h + 1 + max(band_h - text_h - 2, 0) * rng.random()
        _draw_text(draw, (x, y), text, font, COLOURS[colour])

    lines = NUMBER_WORDS[n_lines]
    qa = [{"type": "count", "q": "How many lines of text are there?", "a": lines}]
    if n_lines == 1:
        caption = f'the word "{texts[0]}" written in {colours[0]} on a {background} background.'
        qa += [{"type": "ocr", "q": "What does the text say?", "a": texts[0]},
               {"type": "colour", "q": "What colour is the text?", "a": colours[0]}]
    else:
        caption = (f'the word "{texts[0]}" in {colours[0]} above the word "{texts[1]}" in {colours[1]}, '
                   f"on a {background} background.")
        for where, text, colour in zip(("top", "bottom"), texts, colours):
            qa += [{"type": "ocr", "q": f"What is written at the {where}?", "a": text},
                   {"type": "colour", "q": f"What colour is the text at the {where}?", "a": colour}]
    return image, caption, qa


def _chart(rng: random.Random, width: int, height: int):
    """3-5 lettered bars with integer values 1-10 on a 0-10 axis with grid lines every 2."""
    n_bars = rng.randint(3, 5)
    labels = CHART_LABELS[:n_bars]
    values = [rng.randint(1, 10) for _ in labels]
    colours = rng.sample([c for c in COLOURS if c not in ("white", "black")], n_bars)
    image, draw = _canvas("white", width, height)
    left, right, top, bottom = 0.16 * width, 0.96 * width, 0.08 * height, 0.84 * height
    unit = (bottom - top) / 10
    font = _font(round(0.07 * height))
    for tick in range(0, 11, 2):
        y = round(bottom - tick * unit)
        draw.line([(round(left), y), (round(right), y)], fill=CHART_GRID)
        tick_w, tick_h = _text_size(str(tick), font)
        _draw_text(draw, (left - tick_w - 0.03 * width, y - tick_h / 2), str(tick), font, COLOURS["black"])
    slot = (right - left) / n_bars
    for i, (label, value, colour) in enumerate(zip(labels, values, colours)):
        x0, x1 = left + slot * (i + 0.2), left + slot * (i + 0.8)
        draw.rectangle([round(x0), round(bottom - value * unit), round(x1) - 1, round(bottom) - 1],
                       fill=COLOURS[colour])
        label_w, _ = _text_size(label, font)
        _draw_text(draw, ((x0 + x1 - label_w) / 2, bottom + 0.04 * height), label, font, COLOURS["black"])
    draw.line([(round(left), round(top)), (round(left), round(bottom))], fill=COLOURS["black"])
    draw.line([(round(left), round(bottom)), (round(right), round(bottom))], fill=COLOURS["black"])

    parts = [f"{label} is {value}" for label, value in zip(labels, values)]
    caption = f"a bar chart with {NUMBER_WORDS[n_bars]} bars: {_join(parts)}."
    qa = [{"type": "count", "q": "How many bars are there?", "a": NUMBER_WORDS[n_bars]}]
    for label, value, colour in zip(labels, values, colours):
        qa.append({"type": "chart", "q": f"What is the value of bar {label}?", "a": str(value)})
        qa.append({"type": "colour", "q": f"What colour is bar {label}?", "a": colour})
    for word, extreme in (("tallest", max(values)), ("shortest", min(values))):
        if values.count(extreme) == 1:
            qa.append({"type": "chart", "q": f"Which bar is the {word}?", "a": labels[values.index(extreme)]})
    return image, caption, qa


def _conversation(rng: random.Random, caption: str, qa: list[dict]) -> list[dict]:
    """A LLaVA-style multi-turn chat: 2-4 of the questions, sometimes after a request for a description."""
    turns = [(t["q"], t["a"]) for t in rng.sample(qa, min(len(qa), rng.randint(2, 4)))]
    if rng.random() < 0.5:
        turns.insert(0, ("Describe the image.", caption[0].upper() + caption[1:]))
    conversation = []
    for i, (question, answer) in enumerate(turns):
        conversation.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + question})
        conversation.append({"from": "gpt", "value": answer})
    return conversation


RENDERERS = {"scene": _shapes, "ocr": _ocr, "chart": _chart}


def kind_weights(shares=None) -> list[float]:
    """The draw weights of scene / ocr / chart: ``shares`` (``dataset.synthetic_kind_shares``) or the defaults."""
    if shares is None:
        return [share for _, share in KINDS]
    shares = [float(s) for s in shares]
    if len(shares) != len(KINDS) or min(shares) < 0 or sum(shares) <= 0:
        raise ValueError(f"dataset.synthetic_kind_shares={shares}: give {len(KINDS)} non-negative shares of "
                         f"{' / '.join(name for name, _ in KINDS)} with a positive sum, e.g. "
                         f"{[share for _, share in KINDS]}, or null for those defaults")
    return shares


def render_scene_wh(seed: int, index: int, width: int, height: int, kind_shares=None) -> Scene:
    """Sample ``index`` of the set ``seed`` at any image size (non-square too); its text does not depend on the size.
    ``kind_shares`` reweights the kinds (scene, ocr, chart); the rest of the draw follows the same random stream."""
    rng = random.Random(f"pixellm-synthetic-{seed}-{index}")  # str seeds hash with SHA-512: stable everywhere
    kind = rng.choices([name for name, _ in KINDS], weights=kind_weights(kind_shares))[0]
    image, caption, qa = RENDERERS[kind](rng, width, height)
    return Scene(image=image, caption=caption, qa=qa, kind=kind, conversations=_conversation(rng, caption, qa))


def render_scene(seed: int, index: int, size: int = 224, kind_shares=None) -> Scene:
    """Sample ``index`` of the set ``seed`` as a square image."""
    return render_scene_wh(seed, index, size, size, kind_shares)


def scene_record(seed: int, index: int, size: int, quality: int = 90, kind_shares=None) -> dict:
    """A webdataset record: key, jpg bytes, json metadata (kind, caption, qa, conversations, seed, index)."""
    scene = render_scene(seed, index, size, kind_shares)
    buf = io.BytesIO()
    scene.image.save(buf, format="JPEG", quality=quality)
    meta = {"kind": scene.kind, "caption": scene.caption, "qa": scene.qa, "conversations": scene.conversations,
            "seed": seed, "index": index}
    return {"__key__": f"{seed:04d}_{index:08d}", "jpg": buf.getvalue(), "json": json.dumps(meta).encode()}


def distractor(qa: dict, rng: random.Random) -> str:
    """A wrong answer of the question's own type (a colour for a colour question, the other side for a
    position): the rejected answer of a synthetic preference pair."""
    answer, kind = qa["a"], qa["type"]
    if kind == "position":
        return {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}[answer]
    if kind == "relation":
        choices = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    elif kind == "colour":
        choices = list(COLOURS)
    elif kind == "count":
        choices = list(NUMBER_WORDS[1:])
    elif kind == "chart":
        choices = list(CHART_LABELS) if answer in CHART_LABELS else [str(v) for v in range(1, 11)]
    else:  # ocr: another word
        choices = list(WORDS)
    return rng.choice([c for c in choices if c != answer])
