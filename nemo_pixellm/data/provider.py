"""The ``dataset`` section of Bridge's ConfigContainer: what the training data is (paths, task, sequence and
image layout, mixing, the synthetic default's sizes). It builds nothing: ``nemo_pixellm.data.sources`` resolves it
to shards, a tokenizer and datasets (Bridge calls ``build_datasets``, which hands over to it)."""

from dataclasses import dataclass

from megatron.bridge.data.base import DatasetBuildContext, DatasetProvider

from nemo_pixellm.data import sources


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
    chat_ratio: float = 0.0  # share of the vision-language tokens from the same images' conversations (task chat),
    #                          e.g. VQA mixed into stage 2's captions as DeepSeek-VL2's pretraining does
    pack: bool = False  # several samples per sequence, attention isolated between them
    cache_dir: str | None = None
    synthetic_train_samples: int = 4000
    synthetic_valid_samples: int = 200
    synthetic_text_samples: int = 2000
    synthetic_prompt_samples: int = 4000
    synthetic_kind_shares: list | None = None  # training split's scene / ocr / chart mix (None: 0.6 / 0.2 / 0.2)
    seed: int = 1234
    tokenizer_path: str | None = None
    tokenizer_vocab_size: int = 768
    max_bad_fraction: float = 0.01  # bad records (skipped and counted) above this share of those read stop the run
    generations: int = 0  # stage-4 GRPO: sequences are answers, drawn in groups of this many per question
    question_types: list | None = None  # stage-4 GRPO: ask only questions of these qa types (None: all)

    def build_datasets(self, context: DatasetBuildContext):
        """Bridge's hook: the datasets are made by ``nemo_pixellm.data.sources`` from this description."""
        tokenizer = sources.load_tokenizer(self)
        train = sources.train_dataset(self, tokenizer, max(context.train_samples, 1))
        valid = sources.valid_dataset(self, tokenizer, context.valid_samples) if context.valid_samples > 0 else None
        return train, valid, None
