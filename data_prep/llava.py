"""Instruction conversations in LLaVA-Instruct format -> webdataset shards.

    python -m data_prep.llava --data llava_instruct_150k.json --images coco/train2017 --out DIR \
        [--shard-size 1000] [--workers 8]

Input: a JSON list (or JSONL) of {"id", "image" (optional, relative to --images),
"conversations": [{"from": "human" | "gpt", "value"}, ...]}, turns alternating from human to gpt
(after an optional first "system" turn).
json: {"id", "image" (when there is one), "conversations"}; jpg: the image (absent for text-only entries).
An image entry needs exactly one ``<image>`` placeholder in a human turn; when it has none,
``<image>\\n`` is put before the first question (as LLaVA's own preprocessing does).
Skipped and listed in the manifest: malformed entries or turns, placeholders without an image or more
than one, and images that are missing or do not decode.
"""

from pathlib import Path

from data_prep import common

IMAGE = "<image>"


def check_conversations(entry: dict, has_image: bool) -> list[dict]:
    turns = entry.get("conversations")
    if not isinstance(turns, list):
        raise common.Skip("'conversations' is not a list")
    system = 1 if turns and isinstance(turns[0], dict) and turns[0].get("from") == "system" else 0
    if len(turns) == system or (len(turns) - system) % 2:
        raise common.Skip("'conversations' is not human/gpt pairs (after an optional system turn)")
    for i, turn in enumerate(turns):
        expected = "system" if i < system else "human" if (i - system) % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != expected or not isinstance(turn.get("value"), str):
            raise common.Skip(f"turn {i} is not a {expected} turn with a string value")
    turns = [{"from": turn["from"], "value": turn["value"]} for turn in turns]
    human = turns[system::2]
    if any(IMAGE in turn["value"] for turn in turns if turn["from"] != "human"):
        raise common.Skip(f"{IMAGE} placeholder outside a human turn")
    placeholders = sum(turn["value"].count(IMAGE) for turn in human)
    if not has_image and placeholders:
        raise common.Skip(f"{IMAGE} placeholder but no image")
    if has_image and placeholders > 1:
        raise common.Skip(f"{placeholders} {IMAGE} placeholders for one image")
    if has_image and not placeholders:
        human[0]["value"] = f"{IMAGE}\n{human[0]['value']}"
    return turns


def convert(entry: dict, images_dir: Path) -> dict:
    image = common.image_path(entry, "image")
    conversations = check_conversations(entry, has_image=image is not None)
    meta = {"id": entry.get("id"), **({"image": image} if image else {}), "conversations": conversations}
    return common.record_with_image(meta, images_dir, image)


def main(argv=None) -> dict:
    return common.json_records_main(argv, __doc__.splitlines()[0], "llava", "data", "LLaVA-Instruct JSON list or JSONL",
                                    convert)


if __name__ == "__main__":
    main()
