"""Webdataset tar shards on disk: writing (with a manifest) and random access by sample index.

Training reads shards as a map-style dataset so Megatron's samplers give each data-parallel rank
disjoint samples and resume exactly from ``consumed_train_samples`` stored in the checkpoint.
webdataset's TarWriter writes the shards; reading needs random access, which its streaming
reader does not offer, so an index of member offsets is built once per shard.
"""

import hashlib
import json
import os
import tarfile
from pathlib import Path

import webdataset as wds

MANIFEST = "manifest.json"


def write_shards(records, out_dir: str | os.PathLike, shard_size: int, prefix: str = "shard") -> dict:
    """Write an iterable of webdataset records into ``out_dir/prefix-NNNNNN.tar`` plus a manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards, count, digest = [], 0, hashlib.sha256()
    writer = None
    for record in records:
        if count % shard_size == 0:
            if writer is not None:
                writer.close()
            name = f"{prefix}-{len(shards):06d}.tar"
            shards.append({"name": name, "samples": 0})
            writer = wds.TarWriter(str(out / name))
        writer.write(record)
        shards[-1]["samples"] += 1
        digest.update(record["__key__"].encode())
        for ext in sorted(k for k in record if not k.startswith("__")):
            digest.update(record[ext])
        count += 1
    if writer is not None:
        writer.close()
    for shard in shards:
        shard["bytes"] = (out / shard["name"]).stat().st_size
    manifest = {"samples": count, "shards": shards, "sha256": digest.hexdigest(), "skipped": []}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
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
