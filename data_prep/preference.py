"""Preference pairs (RLAIF-V style) -> webdataset shards, for stage 4 (DPO / GRPO).

    python -m data_prep.preference --input rlaif_v.jsonl --images DIR --out DIR [--shard-size 1000] [--workers 8]

Input: JSONL (or a JSON list) with RLAIF-V's fields: ``question`` (``prompt`` also accepted), ``chosen``,
``rejected``, and ``image`` (a path relative to --images, or a {"path": ...} dict; ``image_path`` is used
when ``image`` is absent; with neither the pair is text-only). RLAIF-V's ``ds_name``, ``idx``,
``origin_dataset`` and ``origin_split`` are kept when present.
json: {"question", "chosen", "rejected", "image" (when there is one), those kept fields}; jpg: the image.
Skipped and listed in the manifest: malformed records, pairs whose chosen and rejected answers are the
same, and images that are missing or do not decode.
"""

import argparse
from functools import partial
from pathlib import Path

from data_prep import common

KEPT_FIELDS = ("ds_name", "idx", "origin_dataset", "origin_split")


def convert(entry: dict, images_dir: Path) -> dict:
    question = common.text_field(entry, "question" if "question" in entry else "prompt")
    chosen, rejected = common.text_field(entry, "chosen"), common.text_field(entry, "rejected")
    if chosen == rejected:
        raise common.Skip("chosen and rejected answers are the same")
    image = common.image_path(entry, "image", "image_path")
    meta = {"question": question, "chosen": chosen, "rejected": rejected, **({"image": image} if image else {}),
            **{name: entry[name] for name in KEPT_FIELDS if name in entry}}
    record = {"json": common.json_bytes(meta)}
    if image:
        record["jpg"] = common.load_jpeg(images_dir, image)
    return record


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="JSONL file or JSON list of preference pairs")
    parser.add_argument("--images", help="directory the image paths are relative to (default: the input file's)")
    common.add_output_args(parser)
    args = parser.parse_args(argv)
    input_file = common.input_file(parser, args.input)
    images_dir = common.input_dir(parser, args.images) if args.images else input_file.parent
    items, skipped = common.read_json_records(parser, input_file)
    job = common.Job(tool="preference", items=items, convert=partial(convert, images_dir=images_dir),
                     settings={"input": {input_file.name: common.file_sha256(input_file)}}, skipped=skipped)
    return common.run(job, args)


if __name__ == "__main__":
    main()
