"""Shared machinery of the data_prep builders: parallel, resumable shard writing, input reading, images.

A builder turns its input into a list of items ``(where, payload)`` in the main process (parsing JSON is
cheap) and names a ``convert(payload) -> {ext: bytes}`` function for the expensive part (decoding and
encoding images), which worker processes run. A sample's key is its item's position (``000000042``)
unless convert sets ``__key__``; ``where`` locates the item in the input for the skip list.

- A shard holds ``--shard-size`` consecutive items, so the shard an item lands in does not depend on
  the number of workers, and each worker writes whole shards.
- A shard is written as NAME.tar.tmp and renamed, then its completion record ``.progress/NAME.json`` is
  written. A rerun keeps each shard whose record matches the run's settings and writes the others, so
  an interrupted run resumes and ends with the manifest an uninterrupted run writes.
- An item that cannot become a sample (missing or corrupt image, malformed record) raises
  ``Skip(reason)``: it is left out and listed in the manifest's ``skipped`` as ``{"item", "reason"}``;
  items dropped while reading the input come first, then those dropped while converting, in input order.
- The manifest is written last: a directory without one is unfinished.
"""

import argparse
from functools import partial
import hashlib
import io
import json
import math
import multiprocessing
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from nemo_pixellm.data.shards import MANIFEST, build_manifest, write_json, write_shard

PROGRESS = ".progress"
JPEG_QUALITY = 95  # re-encoding quality for images that are not JPEG files already


class Skip(Exception):
    """An input item that cannot become a sample; the message says why."""


@dataclass
class Job:
    tool: str
    items: list[tuple[str, Any]]
    convert: Callable[[Any], dict]  # a module-level function or functools.partial: workers receive it pickled
    settings: dict  # what determines the output besides the items (input hashes, options)
    skipped: list[dict] = field(default_factory=list)  # items dropped while reading the input


def _write_shard_task(task) -> dict:
    convert, out, name, first_index, items, settings_sha256 = task
    skipped = []

    def records():
        for index, (where, payload) in enumerate(items, first_index):
            try:
                record = convert(payload)
            except Skip as reason:
                skipped.append({"item": where, "reason": str(reason)})
                continue
            yield {"__key__": f"{index:09d}", **record}

    done = {**write_shard(records(), out / name), "skipped": skipped, "settings_sha256": settings_sha256}
    write_json(out / PROGRESS / f"{name}.json", done)
    return done


def build(job: Job, out_dir, shard_size: int, workers: int = 1, prefix: str = "shard") -> dict:
    """Write ``job`` as shards plus manifest into ``out_dir``, keeping shards a previous run finished."""
    if shard_size < 1 or workers < 1:
        raise ValueError("shard_size and workers must be at least 1")
    if "/" in prefix or prefix.startswith("."):
        raise ValueError(f"shard prefix {prefix!r} would write outside the output directory: give a plain name")
    out = Path(out_dir)
    (out / PROGRESS).mkdir(parents=True, exist_ok=True)
    settings = {"tool": job.tool, "input_items": len(job.items), "shard_size": shard_size, "prefix": prefix,
                **job.settings}
    settings_sha256 = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    done = {}
    for path in sorted((out / PROGRESS).glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("settings_sha256") != settings_sha256:
            raise SystemExit(f"{out} holds shards written with other settings ({path.name}): "
                             "write to a new --out directory or delete this one")
        shard = out / record["name"]
        if shard.parent != out:
            raise SystemExit(f"{path} names {record['name']!r}, outside {out}: delete {out / PROGRESS} and rerun")
        if shard.is_file() and shard.stat().st_size == record["bytes"]:
            done[record["name"]] = record
    (out / MANIFEST).unlink(missing_ok=True)  # until this run finishes

    names = [f"{prefix}-{k:06d}.tar" for k in range(math.ceil(len(job.items) / shard_size))]
    tasks = [(job.convert, out, name, k * shard_size, job.items[k * shard_size:(k + 1) * shard_size], settings_sha256)
             for k, name in enumerate(names) if name not in done]
    if done:
        print(f"[data_prep] resuming: {len(done)} of {len(names)} shards already written", file=sys.stderr)

    def finished(record):
        done[record["name"]] = record
        print(f"[data_prep] {record['name']}: {record['samples']} samples, {len(record['skipped'])} skipped "
              f"({len(done)}/{len(names)} shards)", file=sys.stderr)

    if workers == 1 or len(tasks) <= 1:
        for task in tasks:
            finished(_write_shard_task(task))
    else:
        # fork: workers run PIL code only, and forking spares each one re-importing torch (nemo_pixellm imports it)
        with multiprocessing.get_context("fork").Pool(min(workers, len(tasks))) as pool:
            for record in pool.imap_unordered(_write_shard_task, tasks):
                finished(record)

    shards = [{key: done[name][key] for key in ("name", "samples", "bytes", "sha256")} for name in names]
    skipped = job.skipped + [item for name in names for item in done[name]["skipped"]]
    manifest = build_manifest(shards, skipped, settings=settings)
    write_json(out / MANIFEST, manifest)
    return manifest


# --- command line -----------------------------------------------------------------------------------

def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory (shards, manifest.json)")
    parser.add_argument("--shard-size", type=int, default=1000, help="input items per shard (default 1000)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")


def input_file(parser: argparse.ArgumentParser, path: str) -> Path:
    if not Path(path).is_file():
        parser.error(f"input file not found: {path}")
    return Path(path)


def input_dir(parser: argparse.ArgumentParser, path: str) -> Path:
    if not Path(path).is_dir():
        parser.error(f"images directory not found: {path}")
    return Path(path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def run(job: Job, args: argparse.Namespace) -> dict:
    """Build the job as the command line asks and print a one-line JSON summary."""
    start = time.time()
    manifest = build(job, args.out, args.shard_size, args.workers)
    seconds = time.time() - start
    print(json.dumps({"out": str(args.out), "samples": manifest["samples"], "shards": len(manifest["shards"]),
                      "skipped": len(manifest["skipped"]), "seconds": round(seconds, 2),
                      "samples_per_s": round(manifest["samples"] / max(seconds, 1e-9), 1),
                      "sha256": manifest["sha256"]}))
    return manifest


# --- input records ----------------------------------------------------------------------------------

def read_json_records(parser: argparse.ArgumentParser, path: Path) -> tuple[list[tuple[str, dict]], list[dict]]:
    """The objects of a JSON list file or of a JSONL file (one object per line, blank lines ignored).

    Returns ``(items, skipped)``: a JSONL line that is not a JSON object is skipped (and listed), while a
    JSON file that does not parse is an error, since nothing in it can be trusted.
    """
    raw = path.read_bytes()
    items, skipped = [], []
    if raw.lstrip()[:1] == b"[":
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            parser.error(f"{path}: not valid JSON ({error})")
        for i, element in enumerate(data):
            if isinstance(element, dict):
                items.append((f"[{i}]", element))
            else:
                skipped.append({"item": f"[{i}]", "reason": f"not a JSON object: {str(element)[:80]}"})
        return items, skipped
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            element = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            skipped.append({"item": f"line {number}", "reason": f"invalid JSON: {error}"})
            continue
        if isinstance(element, dict):
            items.append((f"line {number}", element))
        else:
            skipped.append({"item": f"line {number}", "reason": "not a JSON object"})
    return items, skipped


def text_field(entry: dict, name: str) -> str:
    """``entry[name]`` if it is a non-blank string, else Skip."""
    value = entry.get(name)
    if not isinstance(value, str) or not value.strip():
        raise Skip(f"field {name!r} missing or not a non-empty string")
    return value


def record_with_image(meta: dict, images_dir: Path, image: str | None) -> dict:
    """A record: the metadata as json, plus the image as jpg when the entry has one."""
    record = {"json": json_bytes(meta)}
    if image:
        record["jpg"] = load_jpeg(images_dir, image)
    return record


def json_records_main(argv, description: str, tool: str, input_flag: str, input_help: str, convert) -> dict:
    """The CLI of a converter from a JSON / JSONL file of entries with optional image paths:
    ``convert(entry, images_dir) -> record`` (raising Skip for entries to leave out)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(f"--{input_flag}", required=True, help=input_help)
    parser.add_argument("--images", help="directory the image paths are relative to (default: the input file's)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    path = input_file(parser, getattr(args, input_flag))
    images_dir = input_dir(parser, args.images) if args.images else path.parent
    items, skipped = read_json_records(parser, path)
    job = Job(tool=tool, items=items, convert=partial(convert, images_dir=images_dir),
              settings={input_flag: {path.name: file_sha256(path)}}, skipped=skipped)
    return run(job, args)


def json_bytes(meta: dict) -> bytes:
    return json.dumps(meta, ensure_ascii=False).encode()


# --- images -----------------------------------------------------------------------------------------

def load_jpeg(images_dir: Path, relative: str) -> bytes:
    """The image at ``images_dir/relative`` as JPEG bytes, checked by decoding it fully.

    A JPEG file is stored as it is; other formats are converted to RGB (transparent areas on white)
    and encoded at quality 95. A missing or undecodable image raises Skip.
    """
    path = images_dir / relative
    if not path.resolve().is_relative_to(images_dir.resolve()):  # an absolute or ../ path in the input record
        raise Skip(f"image path {relative} is outside the images directory {images_dir}: point --images at a "
                   "directory that holds it")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise Skip(f"missing image: {relative}") from None
    except OSError as error:
        raise Skip(f"unreadable image {relative}: {error}") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes every pixel: truncated and corrupt files fail here
            if image.format == "JPEG":
                return data
            buf = io.BytesIO()
            _to_rgb(image).save(buf, format="JPEG", quality=JPEG_QUALITY)
            return buf.getvalue()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        raise Skip(f"corrupt image {relative}: {error}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        white.alpha_composite(image.convert("RGBA"))
        return white.convert("RGB")
    return image.convert("RGB")


def image_path(entry: dict, *names: str) -> str | None:
    """The relative image path under the first of ``names`` present (a string, or a {"path": ...} dict)."""
    for name in names:
        if name in entry and entry[name] is not None:
            value = entry[name]
            if isinstance(value, dict):
                value = value.get("path")
            if not isinstance(value, str) or not value:
                raise Skip(f"field {name!r} is not an image path")
            return value
    return None
