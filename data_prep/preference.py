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
    return common.record_with_image(meta, images_dir, image)


def main(argv=None) -> dict:
    return common.json_records_main(argv, __doc__.splitlines()[0], "preference", "input",
                                    "JSONL file or JSON list of preference pairs", convert)


if __name__ == "__main__":
    main()
