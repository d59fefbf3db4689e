"""One shard record -> one training sample: token segments with their loss flags, and its image.

Tasks (a source's ``task``):
- ``caption``: image, then the caption; loss on the caption.
- ``vqa``: one question/answer turn of the record's ``qa`` list (epochs cycle through them).
- ``chat``: the record's LLaVA-style ``conversations`` through the chat template.
- ``text``: the record's ``text`` (text-only data); loss on all of it.
- ``preference``: a (chosen, rejected) pair of samples (``pair``): stage-4 DPO.

Chat template (the tokenizer's special tokens; loss only on assistant tokens and their end token):

    [<|system|> system text]  <|user|> user text (the image where <image> stands)  <|assistant|> answer <|end|>  ...
"""

import io
import json
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from nemo_pixellm import tiling
from nemo_pixellm.data.shards import BadRecord, ShardReader
from nemo_pixellm.data.tokenizer import PixelTokenizer

TASKS = ("caption", "vqa", "chat", "text", "preference")
IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class TextSegment:
    ids: list[int]
    carries_loss: bool  # the answer / caption / text: trained on; prompts and template tokens: not

    @property
    def tokens(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class ImageSegment:
    layout: tiling.ImageLayout
    token_id: int  # the placeholder id each of the image's positions holds (the model puts features there)
    image: Image.Image | None = field(default=None, compare=False)  # the picture (None only while planning)

    @property
    def tokens(self) -> int:
        return self.layout.tokens


Segment = TextSegment | ImageSegment


@dataclass
class Sample:
    """One record as the model reads it: its segments in order (each ImageSegment with its picture), cut into
    ``tile``-pixel views."""

    key: str
    segments: list[Segment]
    tile: int = 0

    def decode(self) -> None:
        """Decode the images' pixels now (planning read only their headers): a corrupt image raises BadRecord."""
        for segment in self.segments:
            if isinstance(segment, ImageSegment):
                try:
                    segment.image.load()
                except (OSError, SyntaxError, ValueError, EOFError) as error:
                    raise BadRecord(f"{self.key}: corrupt image ({error})") from None

    @property
    def num_tokens(self) -> int:
        return sum(s.tokens for s in self.segments)

    @property
    def prompt_tokens(self) -> int:
        """Positions that carry no loss: images, prompts, chat-template tokens."""
        return sum(s.tokens for s in self.segments if not (isinstance(s, TextSegment) and s.carries_loss))

    def flatten(self, room: int, prompt_only: bool = False):
        """(ids, loss flags, M-RoPE blocks, view tensors, tile grids) of at most ``room`` tokens, never cut
        inside an image; ``prompt_only`` stops before the first loss-carrying segment (the answer)."""
        ids, carries, blocks, views, grids = [], [], [], [], []
        for segment in self.segments:
            if prompt_only and isinstance(segment, TextSegment) and segment.carries_loss:
                break
            left = room - len(ids)
            if isinstance(segment, ImageSegment):
                layout = segment.layout
                if layout.tokens > left:
                    break
                ids += [segment.token_id] * layout.tokens
                carries += [0.0] * layout.tokens
                blocks += layout.blocks
                views += [tiling.to_pixels(v) for v in tiling.tile_image(segment.image, layout, self.tile)]
                grids.append(layout.grid)
            else:
                part = segment.ids[:left]
                ids += part
                carries += [float(segment.carries_loss)] * len(part)
                blocks.append(tiling.TextBlock(len(part)))
                if len(part) < len(segment.ids):
                    break
        return ids, carries, blocks, views, grids


class ShardSamples:
    """The samples of one shard directory for one task; index i >= len wraps (epochs)."""

    def __init__(self, shard_dir, tokenizer: PixelTokenizer, task: str, patch_size: int = 14, downsample: int = 2,
                 max_tiles: int = tiling.MAX_TILES, key: str = "dataset.path"):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
        self.reader = ShardReader(shard_dir, key)
        self.tokenizer, self.task = tokenizer, task
        self.patch_size, self.downsample, self.max_tiles = patch_size, downsample, max_tiles

    def __len__(self) -> int:
        return len(self.reader)

    def sample(self, index: int, tile: int, max_tokens: int) -> Sample:
        """The sample with its image laid out for ``tile``-pixel views, within ``max_tokens`` if tiling allows.
        The image is opened lazily: computing lengths decodes only its header. A record that cannot become
        a sample raises BadRecord."""
        if self.task == "preference":
            raise ValueError("a preference record makes two samples: use ShardSamples.pair")
        key, raw, meta = self._record(index, self.task)
        tok = self.tokenizer
        if self.task == "text":
            return Sample(key, [TextSegment(tok.encode(meta["text"]) + [tok.eos_id], True)])
        images = record_images(key, raw, meta)
        if not images and (self.task != "chat" or any(IMAGE_PLACEHOLDER in t["value"] for t in meta["conversations"])):
            raise BadRecord(f"{key}: missing image (no jpg member)")
        return self._fit(key, images, tile, max_tokens, lambda images: self._segments(meta, index, images))

    def pair(self, index: int, tile: int, max_tokens: int, rng) -> tuple[Sample, Sample]:
        """(chosen, rejected) samples of one prompt: a preference record's own answers (data_prep.preference:
        question, chosen, rejected), or for a record with known answers (the synthetic set) question
        index // len's answer and a wrong one of the same type (``synthetic.distractor``, drawn with ``rng``)."""
        from nemo_pixellm.data.synthetic import distractor

        key, raw, meta = self._record(index, "preference")
        if "chosen" in meta:
            question, answers = meta["question"], (meta["chosen"], meta["rejected"])
        else:
            qa = meta["qa"][index // len(self.reader) % len(meta["qa"])]
            question, answers = qa["q"], (qa["a"], distractor(qa, rng))
        images = record_images(key, raw, meta)
        tok = self.tokenizer

        def segments(answer):
            turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
            return lambda images: chat_segments(tok, turns, images)

        chosen, rejected = (self._fit(key, images, tile, max_tokens, segments(a)) for a in answers)
        return chosen, rejected

    def meta(self, index: int) -> dict:
        """The json of record ``index``, checked for the task's fields (BadRecord otherwise)."""
        return self._record(index, self.task)[2]

    def _record(self, index: int, task: str) -> tuple[str, dict, dict]:
        raw = self.reader[index % len(self.reader)]
        key = raw["__key__"]
        try:
            meta = json.loads(raw["json"])
            check_fields(meta, task)
        except KeyError:
            raise BadRecord(f"{key}: no json member") from None
        except (ValueError, UnicodeDecodeError, TypeError) as error:  # JSONDecodeError is a ValueError
            raise BadRecord(f"{key}: malformed record ({error})") from None
        return key, raw, meta

    def _fit(self, key: str, images: list, tile: int, max_tokens: int, segments_for) -> Sample:
        """``segments_for(image segments)`` laid out with the full tiling, or with fewer tiles when that leaves
        no room for the text (DeepSeek-VL2 would truncate); 3+ images are never tiled (tiling.image_layout)."""
        for max_tiles in dict.fromkeys((self.max_tiles, min(self.max_tiles, 1), 0)):
            segments = [ImageSegment(tiling.image_layout(*image.size, tile=tile, patch=self.patch_size,
                                                         downsample=self.downsample, max_tiles=max_tiles,
                                                         images_in_sample=len(images)), self.tokenizer.image_id, image)
                        for image in images]
            try:
                sample = Sample(key, segments_for(segments), tile)
            except ValueError as error:  # more <image> placeholders than the record's images
                raise BadRecord(f"{key}: {error}") from None
            if sample.prompt_tokens < max_tokens:
                break
        return sample

    def _segments(self, meta: dict, index: int, images: list[ImageSegment]) -> list[Segment]:
        tok = self.tokenizer
        if self.task == "caption":
            return images + [TextSegment(tok.encode(meta["caption"]) + [tok.eos_id], True)]
        if self.task == "vqa":  # the images go before the question unless it places them with <image>
            qa = meta["qa"][index // len(self.reader) % len(meta["qa"])]
            turns = [{"from": "human", "value": qa["q"]}, {"from": "gpt", "value": qa["a"]}]
        else:
            turns = meta["conversations"]
        return chat_segments(tok, turns, images)


# The field each task reads: (name, type, the string fields of each entry of a list).
TASK_FIELDS = {"caption": ("caption", str, ()), "vqa": ("qa", list, ("q", "a")),
               "chat": ("conversations", list, ("from", "value")), "text": ("text", str, ())}
PREFERENCE_FIELDS = ("question", "chosen", "rejected")  # data_prep.preference's records


def check_fields(meta, task: str) -> None:
    """ValueError naming what the task needs that the record lacks."""
    if not isinstance(meta, dict):
        raise ValueError("not a JSON object")
    if task == "preference":  # a pair of its own, or known answers to build one from
        if "qa" in meta and "chosen" not in meta:
            return check_fields(meta, "vqa")
        if not all(isinstance(meta.get(f), str) and meta[f] for f in PREFERENCE_FIELDS):
            raise ValueError(f"a preference record needs non-empty string fields {', '.join(PREFERENCE_FIELDS)} "
                             f"(or a 'qa' list); the record has {sorted(meta)}")
        return None
    name, kind, entry_fields = TASK_FIELDS[task]
    value = meta.get(name)
    if not isinstance(value, kind) or not value:
        raise ValueError(f"dataset.task={task} needs a non-empty {kind.__name__} field {name!r}; the record has "
                         f"{sorted(meta)}")
    for entry in value if entry_fields else ():
        if not isinstance(entry, dict) or not all(isinstance(entry.get(f), str) for f in entry_fields):
            raise ValueError(f"every entry of {name!r} needs string fields {', '.join(entry_fields)}")


# What a complete file of each format ends with: a truncated image fails this without decoding its pixels.
IMAGE_ENDS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}


def open_image(key: str, data: bytes) -> Image.Image:
    """The image, header read and end checked (pixels decode later, when the sequence is built)."""
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadRecord(f"{key}: corrupt image (not a format PIL reads)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise BadRecord(f"{key}: corrupt image ({error})") from None
    end = IMAGE_ENDS.get(image.format)
    if end is not None and end not in data[-64:]:
        raise BadRecord(f"{key}: truncated {image.format} image ({len(data)} bytes, no end marker)")
    return image


def image_member(number: int) -> str:
    """The shard member that holds a record's image ``number``: ``jpg``, then ``1.jpg``, ``2.jpg``, ..."""
    return "jpg" if number == 0 else f"{number}.jpg"


def image_members(raw: dict) -> list[str]:
    """The image members a shard record holds, in order."""
    members = []
    while image_member(len(members)) in raw:
        members.append(image_member(len(members)))
    return members


def record_images(key: str, raw: dict, meta: dict) -> list[Image.Image]:
    """The record's images in order (headers read); as many as its json's ``images`` list names, when it has one."""
    members = image_members(raw)
    listed = meta.get("images")
    if isinstance(listed, list) and len(listed) != len(members):
        raise BadRecord(f"{key}: the record lists {len(listed)} images and holds {len(members)} "
                        f"({', '.join(members) or 'no image members'})")
    return [open_image(key, raw[member]) for member in members]


def chat_segments(tok: PixelTokenizer, turns: list[dict], images: list[ImageSegment]) -> list[Segment]:
    """LLaVA turns ({"from": system|human|gpt, "value"}) -> template segments; the images go where the
    placeholders stand, in order (those without one before the first turn's text). More placeholders than
    images: ValueError."""
    placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
    if placeholders > len(images):
        raise ValueError(f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {len(images)} image(s)")
    if placeholders < len(images):
        missing = IMAGE_PLACEHOLDER * (len(images) - placeholders)
        turns = [dict(turns[0], value=missing + "\n" + turns[0]["value"])] + list(turns[1:])
    segments, pending = [], list(images)
    for turn in turns:
        role = turn["from"]
        if role == "gpt":
            segments += [TextSegment([tok.assistant_id], False), TextSegment(tok.encode(" " + turn["value"]) + [tok.eos_id], True)]
            continue
        segments.append(TextSegment([tok.system_id if role == "system" else tok.user_id], False))
        parts = turn["value"].split(IMAGE_PLACEHOLDER)
        for i, part in enumerate(parts):
            if i:
                segments.append(pending.pop(0))
            if part.strip():
                segments.append(TextSegment(tok.encode(" " + part.strip()), False))
    return segments
