"""Megatron-Bridge dataset provider for PixelLM: resolves the data directory (building the synthetic
set into the cache on first use), the tokenizer, and the train / validation datasets."""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from megatron.bridge.data.base import DatasetBuildContext, DatasetProvider

from nemo_pixellm.data.dataset import TrainingSequences
from nemo_pixellm.data.samples import ShardSamples
from nemo_pixellm.data.shards import MANIFEST, write_shards
from nemo_pixellm.data.synthetic import render_scene, scene_record
from nemo_pixellm.data.tokenizer import PixelTokenizer, train_bpe

SYNTHETIC_VERSION = 2  # bump when the generator's output changes, so caches rebuild


def default_cache_dir() -> Path:
    return Path(os.environ.get("NEMO_PIXELLM_CACHE", Path.home() / ".cache" / "nemo_pixellm"))


def synthetic_dir(cache_dir, split: str, num_samples: int, seed: int, image_size: int) -> Path:
    key = hashlib.sha1(json.dumps([SYNTHETIC_VERSION, split, num_samples, seed, image_size]).encode()).hexdigest()[:12]
    return Path(cache_dir) / "synthetic" / f"{split}-{num_samples}-{key}"


def build_once(path: Path, done: Path, build) -> None:
    """Run ``build()`` unless ``done`` exists; a file lock makes concurrent ranks build it only once."""
    if done.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not done.exists():
            build()


def ensure_synthetic(cache_dir, split: str, num_samples: int, seed: int, image_size: int, shard_size: int = 1000) -> Path:
    """The synthetic shards, built into the cache on first use (written aside, then moved in place)."""
    out = synthetic_dir(cache_dir, split, num_samples, seed, image_size)

    def build():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        write_shards((scene_record(seed, i, image_size) for i in range(num_samples)), tmp, shard_size)
        os.replace(tmp, out)

    build_once(out, out / MANIFEST, build)
    return out


def text_record(seed: int, index: int) -> dict:
    """A text-only document for the synthetic set's text share: a scene's description and its Q&A, as prose."""
    scene = render_scene(seed, index, 32)
    text = " ".join([scene.caption] + [f"{qa['q']} {qa['a']}." for qa in scene.qa])
    return {"__key__": f"text_{seed:04d}_{index:08d}", "json": json.dumps({"text": text}).encode()}


def ensure_synthetic_text(cache_dir, num_samples: int, seed: int, shard_size: int = 1000) -> Path:
    out = synthetic_dir(cache_dir, "text", num_samples, seed, 0)

    def build():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        write_shards((text_record(seed, i) for i in range(num_samples)), tmp, shard_size)
        os.replace(tmp, out)

    build_once(out, out / MANIFEST, build)
    return out


def ensure_tokenizer(cache_dir, vocab_size: int, seed: int) -> PixelTokenizer:
    """The tiny default's BPE, trained once on synthetic captions and questions and cached."""
    path = Path(cache_dir) / "tokenizer" / f"synthetic-bpe-v{SYNTHETIC_VERSION}-{vocab_size}-{seed}.json"

    def build():
        texts = []
        for i in range(2000):
            scene = render_scene(seed, i, 32)
            texts.append(scene.caption)
            texts.extend(f" {qa['q']} {qa['a']}" for qa in scene.qa)
            texts.extend(" " + turn["value"].replace("<image>", "") for turn in scene.conversations)
        train_bpe(texts, vocab_size, path)

    build_once(path, path, build)
    return PixelTokenizer.from_dir(path)


@dataclass(kw_only=True)
class PixelLMDataConfig(DatasetProvider):
    """``dataset`` section of the ConfigContainer. ``path=None`` selects the synthetic set."""

    seq_length: int = 128
    task: str = "caption"
    path: str | None = None
    valid_path: str | None = None
    image_size: int = 224  # view (tile) size; with a resolution_schedule, the size for validation
    patch_size: int = 14
    downsample: int = 2
    max_tiles: int = 9  # DeepSeek-VL2 grids cols * rows <= max_tiles; 0 = the global view only
    resolution_schedule: list | None = None  # [[fraction of training, view size], ...], e.g. 224 -> 384 -> 512
    global_batch_size: int = 1  # set from train.global_batch_size: the schedule's step = sample index // this
    text_path: str | None = None  # text-only shards (json {"text"}); None with path=None: synthetic text
    text_ratio: float = 0.0  # share of training tokens from text_path (stage 2: 0.3, i.e. 70:30)
    pack: bool = False  # several samples per sequence, attention isolated between them
    cache_dir: str | None = None
    synthetic_train_samples: int = 4000
    synthetic_valid_samples: int = 200
    synthetic_text_samples: int = 2000
    seed: int = 1234
    tokenizer_path: str | None = None
    tokenizer_vocab_size: int = 512
    max_bad_fraction: float = 0.01  # bad records (skipped and counted) above this share of those read stop the run

    def cache(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()

    def load_tokenizer(self) -> PixelTokenizer:
        if self.tokenizer_path:
            return PixelTokenizer.from_dir(self.tokenizer_path)
        return ensure_tokenizer(self.cache(), self.tokenizer_vocab_size, self.seed)

    def resolve_paths(self) -> tuple[Path, Path | None]:
        if self.path is None:
            train = ensure_synthetic(self.cache(), "train", self.synthetic_train_samples, self.seed, self.image_size)
            valid = ensure_synthetic(self.cache(), "heldout", self.synthetic_valid_samples, self.seed + 1, self.image_size)
            return train, valid
        return Path(self.path), Path(self.valid_path) if self.valid_path else None

    def _samples(self, path, tokenizer, task, key: str = "dataset.path") -> ShardSamples:
        return ShardSamples(path, tokenizer, task, self.patch_size, self.downsample, self.max_tiles, key)

    def train_dataset(self, tokenizer, num_sequences: int) -> TrainingSequences:
        train_path, _ = self.resolve_paths()
        sources, shares = [self._samples(train_path, tokenizer, self.task)], [1.0 - self.text_ratio]
        if self.text_ratio > 0:
            text_path = self.text_path or (
                ensure_synthetic_text(self.cache(), self.synthetic_text_samples, self.seed + 2) if self.path is None
                else None)
            sources.append(self._samples(text_path, tokenizer, "text", "dataset.text_path"))
            shares.append(self.text_ratio)
        return TrainingSequences(sources, shares, tokenizer, self.seq_length, num_sequences, self.image_size,
                                 self.resolution_schedule, self.global_batch_size, self.pack, self.seed,
                                 plan_cache=self.cache() / "plans", max_bad_fraction=self.max_bad_fraction)

    def valid_dataset(self, tokenizer) -> TrainingSequences | None:
        _, valid_path = self.resolve_paths()
        if valid_path is None:
            return None
        key = "dataset.valid_path" if self.path else "dataset.path"
        return TrainingSequences([self._samples(valid_path, tokenizer, self.task, key)], [1.0], tokenizer,
                                 self.seq_length, None, self.image_size, seed=self.seed,
                                 max_bad_fraction=self.max_bad_fraction)

    def build_datasets(self, context: DatasetBuildContext):
        tokenizer = self.load_tokenizer()
        train = self.train_dataset(tokenizer, max(context.train_samples, 1))
        valid = self.valid_dataset(tokenizer) if context.valid_samples > 0 else None
        return train, valid, None
