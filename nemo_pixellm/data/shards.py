"""Webdataset tar shards on disk: writing (with a manifest) and random access by sample index.

Training reads shards as a map-style dataset so Megatron's samplers give each data-parallel rank
disjoint samples and resume exactly from ``consumed_train_samples`` stored in the checkpoint.
webdataset's TarWriter writes the shards; reading needs random access, which its streaming
reader does not offer, so an index of member offsets is built once per shard.
"""

import hashlib
import itertools
import json
import os
import tarfile
from pathlib import Path

import webdataset as wds

MANIFEST = "manifest.json"


def _hash_record(digest, record: dict) -> None:
    digest.update(record["__key__"].encode() + b"\n")
    for ext in sorted(k for k in record if not k.startswith("__")):
        digest.update(f"{ext} {len(record[ext])}\n".encode())
        digest.update(record[ext])


def write_shard(records, path: str | os.PathLike) -> dict:
    """Write records into one tar shard; returns ``{"name", "samples", "bytes", "sha256"}``.

    The tar is written aside and renamed, so a shard that exists is complete. ``sha256`` hashes the
    records (keys, extensions, bytes), not the tar layout.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    digest, samples = hashlib.sha256(), 0
    with wds.TarWriter(str(tmp), encoder=False, mtime=0) as writer:  # fixed mtime: same records, same bytes
        for record in records:
            key = record["__key__"]
            if "." in key or "/" in key:
                raise ValueError(f"sample key {key!r} must not contain '.' or '/' (readers split names at the dot)")
            writer.write(record)
            _hash_record(digest, record)
            samples += 1
    os.replace(tmp, path)
    return {"name": path.name, "samples": samples, "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def build_manifest(shards: list[dict], skipped: list[dict] | None = None, **extra) -> dict:
    """The manifest of a shard set; its ``sha256`` hashes the shards' hashes in order."""
    digest = hashlib.sha256("".join(shard["sha256"] for shard in shards).encode())
    return {"samples": sum(shard["samples"] for shard in shards), "shards": shards, "sha256": digest.hexdigest(),
            "skipped": skipped or [], **extra}


def write_json(path: str | os.PathLike, data) -> None:
    """Write JSON aside and rename, so readers never see half a file."""
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def write_shards(records, out_dir: str | os.PathLike, shard_size: int, prefix: str = "shard") -> dict:
    """Write an iterable of webdataset records into ``out_dir/prefix-NNNNNN.tar`` plus a manifest.

    For the same records this writes the shards (and content hash) that ``data_prep`` writes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records, shards = iter(records), []
    while batch := list(itertools.islice(records, shard_size)):
        shards.append(write_shard(batch, out / f"{prefix}-{len(shards):06d}.tar"))
    manifest = build_manifest(shards)
    write_json(out / MANIFEST, manifest)
    return manifest


class ShardReader:
    """Random access to the samples of a shard directory: ``reader[i] -> {"__key__", ext: bytes, ...}``."""

    def __init__(self, shard_dir: str | os.PathLike):
        self.dir = Path(shard_dir)
        manifest_path = self.dir / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"no {MANIFEST} in {self.dir}: point data.path at a directory written by data_prep "
                "(or leave data.path unset to use the synthetic set)"
            )
        self.manifest = json.loads(manifest_path.read_text())
        self._index = None  # [(shard_path, {ext: (offset, size)}, key)], built lazily per process

    def __len__(self) -> int:
        return self.manifest["samples"]

    def _build_index(self):
        index = []
        for shard in self.manifest["shards"]:
            path = self.dir / shard["name"]
            samples = {}
            with tarfile.open(path) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, ext = member.name.partition(".")
                    samples.setdefault(key, {})[ext] = (member.offset_data, member.size)
            index.extend((path, exts, key) for key, exts in samples.items())
        if len(index) != len(self):
            raise ValueError(f"{self.dir}: manifest lists {len(self)} samples but the shards hold {len(index)}")
        return index

    def __getitem__(self, i: int) -> dict:
        if self._index is None:
            self._index = self._build_index()
        path, exts, key = self._index[i]
        sample = {"__key__": key}
        with open(path, "rb") as f:
            for ext, (offset, size) in exts.items():
                f.seek(offset)
                sample[ext] = f.read(size)
        return sample
