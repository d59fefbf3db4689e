"""VQA-style questions (VQAv2, TextVQA, ChartQA, DocVQA JSONL exports) -> webdataset shards for training
(``dataset.task=vqa``) and for ``python -m nemo_pixellm.evaluate ... data=DIR`` (VQA accuracy).

    python -m data_prep.vqa --input questions.jsonl --images DIR --out DIR [--type textvqa] \
        [--shard-size 1000] [--workers 8]

Input: JSONL (or a JSON list), one question per entry, the field names of the common exports:
- question: ``question`` (``query`` in ChartQA);
- answers: ``answers``, a list of strings or of {"answer": ...} (VQAv2's ten annotators), else ``answer``
  or ``label`` (ChartQA), a string or a list; ``multiple_choice_answer`` (VQAv2) is the reference answer
  (what training teaches) when present, else the most frequent one after the VQA normalisation (its first
  spelling; the first of ties);
- image(s): ``image`` / ``image_path`` / ``imgname`` / ``file_name`` (a path relative to --images, or a
  {"path": ...} dict), or ``images``, a list of such paths (a multi-image question);
- type (the row of evaluate's table): ``type``, else ``answer_type`` (VQAv2), else ``--type``;
- id: ``question_id`` / ``questionId`` / ``id``, kept.
Questions on the same image(s) become one sample, in the order their images first appear, so each image is
stored once. json: {"images": [paths], "qa": [{"q", "a", "answers", "type", "id"}]}; the images as ``jpg``,
``1.jpg``, ``2.jpg``... Skipped and listed in the manifest: malformed entries (no question, no answer, no
image) and images that are missing or do not decode (with every question on them).
"""

import argparse
from collections import Counter
from functools import partial
from pathlib import Path

from data_prep import common
from nemo_pixellm.data.samples import image_member
from nemo_pixellm.vqa_score import normalize_answer

IMAGE_FIELDS = ("image", "image_path", "imgname", "file_name")
ID_FIELDS = ("question_id", "questionId", "id")


def answers_of(entry: dict) -> list[str]:
    for name in ("answers", "answer", "label"):
        if name in entry:
            value = entry[name]
            values = value if isinstance(value, list) else [value]
            answers = [v.get("answer") if isinstance(v, dict) else v for v in values]
            answers = [str(a).strip() for a in answers if isinstance(a, (str, int, float)) and str(a).strip()]
            if not answers:
                raise common.Skip(f"field {name!r} holds no answer")
            return answers
    raise common.Skip("no answers (fields answers, answer or label)")


def question_of(entry: dict, default_type: str) -> tuple[tuple[str, ...], dict]:
    """(the entry's image paths, its qa) or Skip."""
    question = next((entry[f] for f in ("question", "query") if isinstance(entry.get(f), str) and entry[f].strip()), None)
    if question is None:
        raise common.Skip("no question (fields question, query)")
    answers = answers_of(entry)
    reference = entry.get("multiple_choice_answer")
    if not isinstance(reference, str) or not reference.strip():
        counts = Counter(map(normalize_answer, answers))
        reference = max(answers, key=lambda a: counts[normalize_answer(a)])  # max keeps the first of ties
    listed = entry.get("images")
    if listed is not None:
        if not isinstance(listed, list) or not listed:
            raise common.Skip("field 'images' is not a non-empty list of image paths")
        images = tuple(common.image_path({"images": path}, "images") for path in listed)
    else:
        image = common.image_path(entry, *IMAGE_FIELDS)
        if image is None:
            raise common.Skip(f"no image (fields images, {', '.join(IMAGE_FIELDS)})")
        images = (image,)
    kind = next((entry[f] for f in ("type", "answer_type") if isinstance(entry.get(f), str) and entry[f]), default_type)
    qa = {"q": question, "a": reference.strip(), "answers": answers, "type": kind}
    qid = next((entry[f] for f in ID_FIELDS if f in entry), None)
    return images, {**qa, **({"id": qid} if qid is not None else {})}


def group_by_images(entries: list[tuple[str, dict]], default_type: str):
    """``(where, (images, qa list))`` per distinct image tuple, plus the entries skipped while reading."""
    groups, skipped = {}, []
    for where, entry in entries:
        try:
            images, qa = question_of(entry, default_type)
        except common.Skip as reason:
            skipped.append({"item": where, "reason": str(reason)})
            continue
        groups.setdefault(images, ([], []))
        groups[images][0].append(where)
        groups[images][1].append(qa)
    return [(", ".join(wheres), (images, qa)) for images, (wheres, qa) in groups.items()], skipped


def convert(payload, images_dir: Path) -> dict:
    images, qa = payload
    record = {"json": common.json_bytes({"images": list(images), "qa": qa})}
    for number, path in enumerate(images):
        record[image_member(number)] = common.load_jpeg(images_dir, path)
    return record


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="JSONL file or JSON list of questions")
    parser.add_argument("--images", help="directory the image paths are relative to (default: the input file's)")
    parser.add_argument("--type", default="vqa", help="question type of entries without type / answer_type")
    common.add_output_args(parser)
    args = parser.parse_args(argv)
    path = common.input_file(parser, args.input)
    images_dir = common.input_dir(parser, args.images) if args.images else path.parent
    entries, skipped = common.read_json_records(parser, path)
    items, malformed = group_by_images(entries, args.type)
    job = common.Job(tool="vqa", items=items, convert=partial(convert, images_dir=images_dir),
                     settings={"input": {path.name: common.file_sha256(path)}, "type": args.type},
                     skipped=skipped + malformed)
    return common.run(job, args)


if __name__ == "__main__":
    main()
