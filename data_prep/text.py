"""Text-only documents (JSONL, ``{"text": ...}`` per line) -> webdataset shards, for the text share of stage 2.

    python -m data_prep.text --input corpus.jsonl --out DIR [--field text] [--shard-size 1000] [--workers 2]

json: {"text"} (the text as given). Skipped and listed in the manifest: lines that are not JSON objects
and records whose field is missing, not a string or blank.
"""

import argparse
from functools import partial

from data_prep import common


def convert(entry: dict, field: str) -> dict:
    return {"json": common.json_bytes({"text": common.text_field(entry, field)})}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="JSONL file (a JSON list works too)")
    parser.add_argument("--field", default="text", help="field holding the text (default: text)")
    common.add_output_args(parser)
    args = parser.parse_args(argv)
    input_file = common.input_file(parser, args.input)
    items, skipped = common.read_json_records(parser, input_file)
    job = common.Job(tool="text", items=items, convert=partial(convert, field=args.field),
                     settings={"input": {input_file.name: common.file_sha256(input_file)}, "field": args.field},
                     skipped=skipped)
    return common.run(job, args)


if __name__ == "__main__":
    main()
