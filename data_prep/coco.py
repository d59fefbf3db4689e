"""Image-caption pairs in COCO captions format -> webdataset shards.

    python -m data_prep.coco --captions annotations/captions_train2017.json --images train2017 --out DIR \
        [--shard-size 1000] [--workers 8]

One sample per image with all of its captions, so each image is stored once: ``caption`` is its first
caption in annotation order (what the caption task trains on) and ``captions`` lists them all, stripped
of surrounding whitespace. json: {"caption", "captions", "image_id", "file_name"}; jpg: the image.
Skipped and listed in the manifest: malformed image entries or annotations, annotations of unknown
images, images without captions, and images that are missing or do not decode.
"""

import argparse
import json
from functools import partial
from pathlib import Path

from data_prep import common


def read_items(data: dict) -> tuple[list, list[dict]]:
    """``(where, (image_id, file_name, captions))`` per captioned image, in the order of ``images``."""
    images, skipped = {}, []
    for i, entry in enumerate(data["images"]):
        where = f"images[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), (int, str)) \
                or not isinstance(entry.get("file_name"), str) or not entry["file_name"]:
            skipped.append({"item": where, "reason": "image entry without an id and a file_name"})
        elif entry["id"] in images:
            skipped.append({"item": where, "reason": f"duplicate image id {entry['id']}"})
        else:
            images[entry["id"]] = (where, entry["file_name"], [])
    for j, annotation in enumerate(data["annotations"]):
        where = f"annotations[{j}]"
        caption = annotation.get("caption") if isinstance(annotation, dict) else None
        if not isinstance(caption, str) or not caption.strip():
            skipped.append({"item": where, "reason": "annotation without a caption"})
        elif annotation.get("image_id") not in images:
            skipped.append({"item": where, "reason": f"caption of unknown image id {annotation.get('image_id')}"})
        else:
            images[annotation["image_id"]][2].append(caption.strip())
    items = []
    for image_id, (where, file_name, captions) in images.items():
        if captions:
            items.append((where, (image_id, file_name, captions)))
        else:
            skipped.append({"item": where, "reason": f"image {file_name} has no captions"})
    return items, skipped


def convert(payload, images_dir: Path) -> dict:
    image_id, file_name, captions = payload
    jpg = common.load_jpeg(images_dir, file_name)
    meta = {"caption": captions[0], "captions": captions, "image_id": image_id, "file_name": file_name}
    return {"jpg": jpg, "json": common.json_bytes(meta)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", required=True, help="COCO captions JSON (images + annotations)")
    parser.add_argument("--images", required=True, help="directory the images' file_name is relative to")
    common.add_output_args(parser)
    args = parser.parse_args(argv)
    captions_file = common.input_file(parser, args.captions)
    images_dir = common.input_dir(parser, args.images)
    try:
        data = json.loads(captions_file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        parser.error(f"{captions_file}: not valid JSON ({error})")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        parser.error(f"{captions_file}: expected an object with 'images' and 'annotations' lists (COCO captions)")
    items, skipped = read_items(data)
    job = common.Job(tool="coco", items=items, convert=partial(convert, images_dir=images_dir),
                     settings={"captions": {captions_file.name: common.file_sha256(captions_file)}}, skipped=skipped)
    return common.run(job, args)


if __name__ == "__main__":
    main()
