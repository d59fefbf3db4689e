"""The synthetic generator: deterministic, a disjoint held-out split, and answers that the pixels confirm.

The answer checks measure the rendered image (connected components, bar heights, re-rendered text)
instead of trusting the generator's own bookkeeping.
"""

import hashlib
import io
import json
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from nemo_pixellm.data import sources
from nemo_pixellm.data.provider import PixelLMDataConfig
from nemo_pixellm.data.shards import ShardReader
from nemo_pixellm.data.synthetic import (COLOURS, HELDOUT_SEED_OFFSET, render_scene, render_scene_wh,
                                         scene_record)

SEED = 1234
WORD_NUMBERS = {w: n for n, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                            "nine", "ten", "eleven", "twelve"])}
QA_TYPES = {"count", "colour", "position", "relation", "ocr", "chart"}


def samples_of(kind: str, n: int, size=(224, 224)):
    found, index = [], 0
    while len(found) < n:
        scene = render_scene_wh(SEED, index, *size)
        if scene.kind == kind:
            found.append(scene)
        index += 1
    return found


def answer(scene, pattern: str) -> str:
    matches = [qa["a"] for qa in scene.qa if re.fullmatch(pattern, qa["q"])]
    assert len(matches) == 1, (pattern, scene.qa)
    return matches[0]


def colour_mask(array: np.ndarray, colour: str) -> np.ndarray:
    return (array == np.array(COLOURS[colour], dtype=np.uint8)).all(axis=-1)


def shape_of(component: np.ndarray) -> str:
    """Classify a filled shape by how much of its bounding box it covers: 1 square, pi/4 circle, 1/2 triangle."""
    ys, xs = np.nonzero(component)
    fill = component.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    return "square" if fill > 0.93 else "circle" if fill > 0.7 else "triangle"


def objects_in(image: Image.Image) -> list[dict]:
    """Every shape in a scene image, found from its pixels: colour, shape and centre."""
    array = np.asarray(image)
    objects = []
    for colour in COLOURS:
        labels, n = ndimage.label(colour_mask(array, colour))
        if colour_mask(array, colour)[0, 0]:  # the background's colour
            continue
        for i in range(1, n + 1):
            component = labels == i
            ys, xs = np.nonzero(component)
            objects.append({"colour": colour, "shape": shape_of(component), "x": xs.mean(), "y": ys.mean()})
    return objects


def test_same_seed_and_index_give_identical_bytes():
    for index in range(20):
        assert scene_record(SEED, index, 224) == scene_record(SEED, index, 224)
    assert scene_record(SEED, 0, 224)["jpg"] != scene_record(SEED, 1, 224)["jpg"]


def test_text_does_not_depend_on_the_image_size():
    for index in range(30):
        big, small = render_scene(SEED, index, 224), render_scene(SEED, index, 32)
        wide = render_scene_wh(SEED, index, 320, 160)
        assert (big.caption, big.qa, big.conversations) == (small.caption, small.qa, small.conversations)
        assert (big.caption, big.qa) == (wide.caption, wide.qa)
        assert wide.image.size == (320, 160)


def test_heldout_split_shares_no_key_or_image_with_train():
    train = [scene_record(SEED, i, 64) for i in range(300)]
    heldout = [scene_record(SEED + HELDOUT_SEED_OFFSET, i, 64) for i in range(300)]
    assert not {r["__key__"] for r in train} & {r["__key__"] for r in heldout}
    images = [{hashlib.sha256(r["jpg"]).digest() for r in split} for split in (train, heldout)]
    assert not images[0] & images[1]


def test_records_cover_every_kind_and_question_type_with_short_answers():
    kinds, types = set(), set()
    for index in range(200):
        record = scene_record(SEED, index, 64)
        meta = json.loads(record["json"])
        kinds.add(meta["kind"])
        assert meta["caption"] and meta["qa"]
        for qa in meta["qa"]:
            types.add(qa["type"])
            assert 1 <= len(qa["a"].split()) <= 2, qa
        turns = meta["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and len(turns) >= 4
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
        description = meta["caption"][0].upper() + meta["caption"][1:]
        pairs = {(q["q"], q["a"]) for q in meta["qa"]} | {("Describe the image.", description)}
        for human, gpt in zip(turns[::2], turns[1::2]):
            question = human["value"].removeprefix("<image>\n")
            assert (question, gpt["value"]) in pairs
        assert Image.open(io.BytesIO(record["jpg"])).size == (64, 64)
    assert kinds == {"scene", "ocr", "chart"}
    assert types == QA_TYPES


def kind_counts(path) -> dict:
    counts = {"scene": 0, "ocr": 0, "chart": 0}
    reader = ShardReader(path)
    for i in range(len(reader)):
        counts[json.loads(reader[i]["json"])["kind"]] += 1
    return counts


def test_kind_shares_set_the_training_mix_and_leave_the_heldout_split_alone(tmp_path):
    n = 400
    config = dict(cache_dir=str(tmp_path), image_size=32, synthetic_train_samples=n, synthetic_valid_samples=60)
    default_train, default_heldout = sources.data_paths(PixelLMDataConfig(**config))
    train, heldout = sources.data_paths(PixelLMDataConfig(**config, synthetic_kind_shares=[0.2, 0.6, 0.2]))
    assert train != default_train and heldout == default_heldout  # the mix is in the training cache key only
    counts, default_counts = kind_counts(train), kind_counts(default_train)
    assert sum(counts.values()) == n
    # 0.6 of 400 has a binomial sd of 10 (0.024); the default's OCR share is 0.2
    assert abs(counts["ocr"] / n - 0.6) < 0.075 and abs(counts["scene"] / n - 0.2) < 0.075, counts
    assert abs(default_counts["ocr"] / n - 0.2) < 0.075, default_counts
    explicit_default = PixelLMDataConfig(**config, synthetic_kind_shares=[0.6, 0.2, 0.2])
    assert sources.data_paths(explicit_default)[0] == default_train


@pytest.mark.parametrize("size", [(224, 224), (320, 192)])
def test_scene_answers_match_the_shapes_in_the_image(size):
    for scene in samples_of("scene", 25, size):
        objects = objects_in(scene.image)
        assert WORD_NUMBERS[answer(scene, "How many shapes are there\\?")] == len(objects)
        for qa in scene.qa:
            q, a = qa["q"], qa["a"]
            if m := re.fullmatch(r"How many (\w+)s are there\?", q):
                if m[1] != "shape":
                    assert WORD_NUMBERS[a] == sum(o["shape"] == m[1] for o in objects), (q, a)
            elif m := re.fullmatch(r"What colour (?:is|are) the (\w+?)s?\?", q):
                assert {o["colour"] for o in objects if o["shape"] == m[1]} == {a}
            elif m := re.fullmatch(r"(?:Which side is|On which side is|How high is|How high up is) the (\w+) (\w+)"
                                   r"(?: on)?\?", q):
                [ref] = [o for o in objects if (o["colour"], o["shape"]) == (m[1], m[2])]
                horizontal = "side" in q
                centre = size[0] / 2 if horizontal else size[1] / 2
                position = ref["x"] if horizontal else ref["y"]
                expected = ("left" if position < centre else "right") if horizontal else \
                    ("top" if position < centre else "bottom")
                assert a == expected, (q, a)
            elif m := re.fullmatch(r"What is (to the left of|to the right of|above|below) the (\w+) (\w+)\?", q):
                [ref] = [o for o in objects if (o["colour"], o["shape"]) == (m[2], m[3])]
                axis, sign = {"to the left of": ("x", -1), "to the right of": ("x", 1), "above": ("y", -1),
                              "below": ("y", 1)}[m[1]]
                cell = (size[0] if axis == "x" else size[1]) / 4
                beyond = [o for o in objects if sign * (o[axis] - ref[axis]) > cell / 2]
                assert [f"{o['colour']} {o['shape']}" for o in beyond] == [a], (q, a)
            else:
                raise AssertionError(f"no check for the question {q!r}")


def rendered_text_mask(text: str, size: int) -> np.ndarray:
    image = Image.new("L", (4 * size * len(text) + 20, 2 * size + 20))
    draw = ImageDraw.Draw(image)
    draw.fontmode = "1"
    draw.text((10, 10), text, font=ImageFont.load_default(size=size), fill=255)
    return crop(np.asarray(image) > 0)


def crop(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def drawn_text_is(mask: np.ndarray, text: str) -> bool:
    """Whether the pixels are exactly ``text`` in Pillow's default font at some size."""
    return any(np.array_equal(rendered_text_mask(text, size), mask) for size in range(4, 160))


def test_ocr_answers_are_the_text_drawn():
    for scene in samples_of("ocr", 12):
        array = np.asarray(scene.image)
        lines = WORD_NUMBERS[answer(scene, "How many lines of text are there\\?")]
        wheres = [""] if lines == 1 else [" at the top", " at the bottom"]
        for where in wheres:
            text = answer(scene, "What does the text say\\?" if lines == 1 else f"What is written{where}\\?")
            mask = crop(colour_mask(array, answer(scene, f"What colour is the text{where}\\?")))
            assert drawn_text_is(mask, text), (scene.caption, text)
            assert not drawn_text_is(mask, text + "x")


def test_chart_values_match_the_bar_heights():
    for scene in samples_of("chart", 12):
        array = np.asarray(scene.image)
        bars = WORD_NUMBERS[answer(scene, "How many bars are there\\?")]
        labels = "ABCDE"[:bars]
        heights, centres = [], []
        for label in labels:
            ys, xs = np.nonzero(colour_mask(array, answer(scene, f"What colour is bar {label}\\?")))
            heights.append(np.ptp(ys) + 1)
            centres.append(xs.mean())
        assert centres == sorted(centres)  # bars A, B, C ... from left to right
        values = [int(answer(scene, f"What is the value of bar {label}\\?")) for label in labels]
        unit = sum(heights) / sum(values)
        assert all(abs(h - v * unit) <= 1.5 for h, v in zip(heights, values)), (heights, values)
        for word, pick in (("tallest", max), ("shortest", min)):
            if heights.count(pick(heights)) == 1:
                assert answer(scene, f"Which bar is the {word}\\?") == labels[heights.index(pick(heights))]
