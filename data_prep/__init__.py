"""Builders of webdataset shards (plus manifest.json) from raw sources: ``python -m data_prep.<name> --help``.

coco (image-caption pairs), llava (instruction conversations), text (text-only JSONL), preference
(RLAIF-V style pairs), synthetic (the generated set). The machinery they share (parallel workers,
resumable shards, skip list) is in ``common``.
"""
