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


class BadRecord(ValueError):
    """A record that cannot become a sample (damaged shard, malformed JSON, corrupt or missing image):
    training skips it and counts it."""


def _check_member_name(shard: Path, name: str) -> None:
    """Shards hold flat ``key.ext`` members; an absolute or ``..`` name marks a tar not written by data_prep."""
    if name.startswith("/") or ".." in Path(name).parts:
        raise ValueError(f"{shard}: tar member {name!r} is an absolute or '..' path; shards hold flat 'key.ext' "
                         "members: rebuild the shard set with data_prep")


def _index_shard(path: Path, expected: int, first_only: bool = False) -> list[tuple]:
    """``(path, {ext: (offset, size)}, key)`` per sample, or ``(None, reason, key)`` for the samples a damaged
    shard no longer holds, so every later shard keeps its sample indices. A tar cut short (a truncated member,
    an interrupted copy, an empty file) keeps the samples before the damage."""
    samples, damage = {}, None
    try:
        size = path.stat().st_size
        if size == 0:
            raise EOFError("empty file")
        with tarfile.open(path) as tar:
            for member in tar:
                _check_member_name(path, member.name)
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if first_only and samples and key not in samples:
                    return [(path, exts, k) for k, exts in samples.items()]
                if member.offset_data + member.size > size:
                    damage = f"truncated tar member {member.name}"
                    samples.pop(key, None)  # the sample the cut went through is incomplete
                    break
                samples.setdefault(key, {})[ext] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError, EOFError) as error:
        damage = f"unreadable shard ({str(error).splitlines()[0]})"
        if samples:  # the last sample read may have lost members to the damage
            samples.pop(next(reversed(samples)))
    index = [(path, exts, key) for key, exts in samples.items()]
    if len(index) > expected:
        raise ValueError(f"{path}: the manifest lists {expected} samples but the shard holds {len(index)}: "
                         "the manifest belongs to other shards; rebuild the set with data_prep")
    reason = damage or "sample missing from the shard"
    index += [(None, f"{path.name}: {reason}", f"{path.stem}#{i}") for i in range(len(index), expected)]
    return index


class ShardReader:
    """Random access to the samples of a shard directory: ``reader[i] -> {"__key__", ext: bytes, ...}``.

    A sample a damaged shard lost raises ``BadRecord``; every other index still finds its sample."""

    def __init__(self, shard_dir: str | os.PathLike, key: str = "dataset.path"):
        self.dir = Path(shard_dir)
        manifest_path = self.dir / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"no {MANIFEST} in {self.dir}: point {key} at a directory written by data_prep"
                + (" (or leave dataset.path unset to use the synthetic set)" if key == "dataset.path" else "")
            )
        try:
            self.manifest = json.loads(manifest_path.read_text())
            self.manifest["samples"], self.manifest["shards"]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{manifest_path} is not a data_prep manifest ({error}): rebuild {self.dir} with data_prep")
        self._index = None  # [(shard_path, {ext: (offset, size)}, key)], built lazily per process

    def __len__(self) -> int:
        return self.manifest["samples"]

    def first_record(self) -> dict | None:
        """The first sample of the first non-empty shard, read from that shard alone (no index of the set);
        None when it cannot be read (training then skips it like any bad record)."""
        shard = next((shard for shard in self.manifest["shards"] if shard["samples"]), None)
        if shard is None:
            return None
        entries = _index_shard(self.dir / shard["name"], shard["samples"], first_only=True)
        path, exts, key = entries[0]
        if path is None:
            return None
        with open(path, "rb") as f:
            record = {"__key__": key}
            for ext, (offset, size) in exts.items():
                f.seek(offset)
                record[ext] = f.read(size)
        return record

    def _build_index(self):
        index = []
        for shard in self.manifest["shards"]:
            index.extend(_index_shard(self.dir / shard["name"], shard["samples"]))
        return index

    def __getitem__(self, i: int) -> dict:
        if self._index is None:
            self._index = self._build_index()
        path, exts, key = self._index[i]
        if path is None:
            raise BadRecord(exts)
        sample = {"__key__": key}
        try:
            with open(path, "rb") as f:
                for ext, (offset, size) in exts.items():
                    f.seek(offset)
                    sample[ext] = f.read(size)
                    if len(sample[ext]) != size:
                        raise BadRecord(f"{path.name}: truncated tar member {key}.{ext}")
        except OSError as error:
            raise BadRecord(f"{path.name}: unreadable ({error})") from None
        return sample
