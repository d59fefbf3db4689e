"""Where a data config's data comes from: its shard directories, or the embedded default (the synthetic set
and its BPE tokenizer, built into ``$NEMO_PIXELLM_CACHE`` or ``~/.cache/nemo_pixellm`` on first use), and the
train / validation datasets made from them. ``PixelLMDataConfig`` only describes the data; this builds it."""

import hashlib
import json
import os
from pathlib import Path

from filelock import FileLock

from nemo_pixellm.data.dataset import TrainingSequences
from nemo_pixellm.data.samples import ShardSamples
from nemo_pixellm.data.shards import MANIFEST, write_shards
from nemo_pixellm.data.synthetic import (COLOURS, NUMBER_WORDS, SHAPES, WORDS, kind_weights, render_scene,
                                         scene_record)
from nemo_pixellm.data.tokenizer import PixelTokenizer, train_bpe

SYNTHETIC_VERSION = 7  # bump when the generator's output changes, so caches rebuild (3-5 were used by experiments)
OCR_WORD_WEIGHT = 50  # copies of each answer word in the BPE corpus: with 768 tokens every one is merged whole (512 runs out)


def default_cache_dir() -> Path:
    return Path(os.environ.get("NEMO_PIXELLM_CACHE", Path.home() / ".cache" / "nemo_pixellm"))


def synthetic_dir(cache_dir, split: str, num_samples: int, seed: int, image_size: int, kind_shares=None) -> Path:
    fields = [SYNTHETIC_VERSION, split, num_samples, seed, image_size]
    if kind_shares is not None and kind_weights(kind_shares) != kind_weights():  # the default mix keeps its old key
        fields.append(kind_weights(kind_shares))
    key = hashlib.sha1(json.dumps(fields).encode()).hexdigest()[:12]
    return Path(cache_dir) / "synthetic" / f"{split}-{num_samples}-{key}"


def build_once(path: Path, done: Path, build) -> None:
    """Run ``build()`` unless ``done`` exists; a file lock makes concurrent ranks build it only once."""
    if done.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not done.exists():
            build()


def ensure_synthetic(cache_dir, split: str, num_samples: int, seed: int, image_size: int, shard_size: int = 1000,
                     kind_shares=None) -> Path:
    """The synthetic shards, built into the cache on first use (written aside, then moved in place)."""
    out = synthetic_dir(cache_dir, split, num_samples, seed, image_size, kind_shares)

    def build():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        records = (scene_record(seed, i, image_size, kind_shares=kind_shares) for i in range(num_samples))
        write_shards(records, tmp, shard_size)
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


def synthetic_tokenizer_file(cache_dir, vocab_size: int, seed: int) -> Path:
    """Where this generator version's BPE lives: a training run names it in its saved config (build_config),
    so a checkpoint keeps decoding with the BPE it learned even after a later version trains another one."""
    return Path(cache_dir) / "tokenizer" / f"synthetic-bpe-v{SYNTHETIC_VERSION}-{vocab_size}-{seed}.json"


def ensure_tokenizer(cache_dir, vocab_size: int, seed: int) -> PixelTokenizer:
    """The tiny default's BPE, trained once on synthetic captions and questions and cached."""
    path = synthetic_tokenizer_file(cache_dir, vocab_size, seed)

    def build():
        texts = []
        for i in range(2000):
            scene = render_scene(seed, i, 32)
            texts.append(scene.caption)
            texts.extend(f" {qa['q']} {qa['a']}" for qa in scene.qa)
            texts.extend(" " + turn["value"].replace("<image>", "") for turn in scene.conversations)
        # Every word an OCR image may show becomes one token (an answer the model gives in one step), as do
        # the other answer words: counts, colours, shapes (BPE merges the most frequent pairs first).
        answers = [*WORDS, *NUMBER_WORDS, *COLOURS, *SHAPES]
        texts.extend(f" {word}" for word in answers for _ in range(OCR_WORD_WEIGHT))
        train_bpe(texts, vocab_size, path)

    build_once(path, path, build)
    return PixelTokenizer.from_dir(path)


def cache_dir(config) -> Path:
    return Path(config.cache_dir) if config.cache_dir else default_cache_dir()


def load_tokenizer(config) -> PixelTokenizer:
    """``dataset.tokenizer_path``'s tokenizer, or the synthetic set's BPE (trained once into the cache)."""
    if config.tokenizer_path:
        return PixelTokenizer.from_dir(config.tokenizer_path)
    return ensure_tokenizer(cache_dir(config), config.tokenizer_vocab_size, config.seed)


def data_paths(config) -> tuple[Path, Path | None]:
    """(training shards, held-out shards or None); the synthetic set's are built on first use."""
    if config.path is None:
        cache = cache_dir(config)
        # The kind mix is a training choice; the held-out split keeps the generator's default mix, so scores compare.
        train = ensure_synthetic(cache, "train", config.synthetic_train_samples, config.seed, config.image_size,
                                 kind_shares=config.synthetic_kind_shares)
        valid = ensure_synthetic(cache, "heldout", config.synthetic_valid_samples, config.seed + 1, config.image_size)
        return train, valid
    return Path(config.path), Path(config.valid_path) if config.valid_path else None


def stage4_path(config) -> Path:
    """Stage 4's data: dataset.path, or for the synthetic set a split of its own (seed + 3), apart from the SFT
    data as an RL prompt set is: GRPO's questions and DPO's pairs are about images no earlier stage trained on
    (on memorised training images DPO's held-out chosen NLL rose 0.001 -> 2.4 while the training one stayed 0.02)."""
    if config.path is not None:
        return Path(config.path)
    return ensure_synthetic(cache_dir(config), "prompts", config.synthetic_prompt_samples, config.seed + 3,
                            config.image_size)


def _samples(config, path, tokenizer, task, key: str = "dataset.path") -> ShardSamples:
    return ShardSamples(path, tokenizer, task, config.patch_size, config.downsample, config.max_tiles, key)


def train_dataset(config, tokenizer, num_sequences: int):
    if config.generations:  # stage-4 GRPO: questions in groups, answered by the policy during training
        from nemo_pixellm.preference.rollouts import PromptGroups

        return PromptGroups(_samples(config, stage4_path(config), tokenizer, "vqa"), config.generations, num_sequences,
                            config.image_size, config.seq_length, config.seed, config.question_types)
    if config.task == "preference":
        from nemo_pixellm.preference.dpo import PreferencePairs

        return PreferencePairs(_samples(config, stage4_path(config), tokenizer, "preference"), num_sequences,
                               config.image_size, config.seq_length, config.seed)
    train_path, _ = data_paths(config)
    image_share = 1.0 - config.text_ratio
    sources, shares = [_samples(config, train_path, tokenizer, config.task)], [image_share * (1.0 - config.chat_ratio)]
    if config.chat_ratio > 0:  # the same records read a second way: their conversations
        sources.append(_samples(config, train_path, tokenizer, "chat"))
        shares.append(image_share * config.chat_ratio)
    if config.text_ratio > 0:
        text_path = config.text_path or (
            ensure_synthetic_text(cache_dir(config), config.synthetic_text_samples, config.seed + 2)
            if config.path is None else None)
        sources.append(_samples(config, text_path, tokenizer, "text", "dataset.text_path"))
        shares.append(config.text_ratio)
    return TrainingSequences(sources, shares, tokenizer, config.seq_length, num_sequences, config.image_size,
                             config.resolution_schedule, config.global_batch_size, config.pack, config.seed,
                             plan_cache=cache_dir(config) / "plans", max_bad_fraction=config.max_bad_fraction)


def valid_dataset(config, tokenizer, num_sequences: int | None = None):
    _, valid_path = data_paths(config)
    if valid_path is None or config.generations:  # GRPO's held-out reward: vqa_eval.interval
        return None
    key = "dataset.valid_path" if config.path else "dataset.path"
    if config.task == "preference":
        from nemo_pixellm.preference.dpo import PreferencePairs

        records = _samples(config, valid_path, tokenizer, "preference", key)
        return PreferencePairs(records, num_sequences or len(records), config.image_size, config.seq_length,
                               config.seed + 1)
    return TrainingSequences([_samples(config, valid_path, tokenizer, config.task, key)], [1.0], tokenizer,
                             config.seq_length, None, config.image_size, seed=config.seed,
                             max_bad_fraction=config.max_bad_fraction)
