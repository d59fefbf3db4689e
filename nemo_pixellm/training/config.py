"""Hydra config -> Megatron-Bridge ConfigContainer.

Every section maps onto the Bridge dataclass of the same name, key for key; a key the dataclass does
not have is an error that names the closest valid keys, before anything is built.
"""

import dataclasses
import difflib
import os
import signal
from pathlib import Path

import torch
from megatron.bridge.training.config import (
    CheckpointConfig,
    ConfigContainer,
    DistributedDataParallelConfig,
    DistributedInitConfig,
    LoggerConfig,
    OptimizerConfig,
    OptimizerConfigOverrideProvider,
    RNGConfig,
    SchedulerConfig,
    TrainingConfig,
    ValidationConfig,
)
from megatron.bridge.training.tokenizers.config import TokenizerConfig
from megatron.core.optimizer import ParamKey
from omegaconf import DictConfig, OmegaConf

from nemo_pixellm.data import sources
from nemo_pixellm.data.provider import PixelLMDataConfig
from nemo_pixellm.stages import STAGES
from nemo_pixellm.models.provider import PixelLMProvider
from nemo_pixellm.preference import check_stage4
from nemo_pixellm.training.validate import (
    ConfigError,
    check_same_model,
    validate_data,
    validate_layout,
    validate_model_keys,
    validate_run,
    validate_stage,
)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

SECTIONS = {
    "train": TrainingConfig,
    "model": PixelLMProvider,
    "dataset": PixelLMDataConfig,
    "optimizer": OptimizerConfig,
    "scheduler": SchedulerConfig,
    "checkpoint": CheckpointConfig,
    "logger": LoggerConfig,
    "ddp": DistributedDataParallelConfig,
    "dist": DistributedInitConfig,
    "rng": RNGConfig,
    "validation": ValidationConfig,
}
TOP_LEVEL = set(SECTIONS) | {"stage", "seq_length", "run_dir", "mixed_precision", "variant_name", "lr_scale", "progressive_resolution", "ema", "vqa_eval"}

if not OmegaConf.has_resolver("mul"):
    OmegaConf.register_new_resolver("mul", lambda a, b: float(a) * float(b))


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def _unknown_key_error(section: str, key: str, valid: set[str]) -> ConfigError:
    close = difflib.get_close_matches(key, sorted(valid), n=3)
    hint = f" Did you mean {', '.join(f'{section}.{c}' for c in close)}?" if close else ""
    return ConfigError(f"unknown config key '{section}.{key}'.{hint}")


def _section(cfg: DictConfig, name: str) -> dict:
    values = OmegaConf.to_container(cfg[name], resolve=True) if name in cfg and cfg[name] is not None else {}
    valid = _fields(SECTIONS[name])
    for key in values:
        if key not in valid:
            raise _unknown_key_error(name, key, valid)
    return values


@dataclasses.dataclass
class VisionLearningRate(OptimizerConfigOverrideProvider):
    """Bridge's parameter groups, the vision tower's at ``mult`` x the learning rate (``stage.vision_lr_mult``;
    DeepSeek-VL2 trains its vision encoder at 0.1 x)."""

    mult: float = 1.0

    def build_config_overrides(self, context):
        overrides = super().build_config_overrides(context) or {}
        if self.mult != 1.0:
            optimizer = context.optimizer_config
            overrides[ParamKey(name="*vision_model.*")] = {"max_lr": optimizer.lr * self.mult,
                                                           "min_lr": optimizer.min_lr * self.mult}
        return overrides or None


def check_stage(cfg: DictConfig) -> DictConfig:
    if "stage" not in cfg or cfg.stage is None:
        raise ConfigError(f"no stage selected: add +stage=<one of {', '.join(STAGES)}>")
    name = cfg.stage.name
    if name not in STAGES:
        raise ConfigError(f"unknown stage '{name}': choose one of {', '.join(STAGES)}")
    return cfg.stage


def build_config(cfg: DictConfig, world_size: int | None = None, init_from_pending: bool = False) -> ConfigContainer:
    """Validate the composed Hydra config and turn it into Bridge's ConfigContainer. ``init_from_pending``: the
    stage will start from the previous stage of a chain, whose checkpoint does not exist yet (launch)."""
    for key in cfg:
        if key not in TOP_LEVEL:
            close = difflib.get_close_matches(str(key), sorted(TOP_LEVEL), n=3)
            raise ConfigError(f"unknown top-level config key '{key}'." + (f" Did you mean {', '.join(close)}?" if close else ""))
    stage = check_stage(cfg)
    sections = {name: _section(cfg, name) for name in SECTIONS}

    dataset = PixelLMDataConfig(**sections["dataset"])
    if stage.name == "stage4" and stage.get("algorithm") == "dpo":
        dataset.task = "preference"  # DPO reads pairs whatever dataset.task says: check the shards for pairs
    validate_data(dataset)
    validate_stage(stage)
    model_values = sections["model"]
    validate_model_keys(model_values)
    tokenizer = sources.load_tokenizer(dataset)
    if dataset.tokenizer_path is None:  # the saved config names the exact BPE file the model learned
        dataset.tokenizer_path = str(sources.synthetic_tokenizer_file(
            sources.cache_dir(dataset), dataset.tokenizer_vocab_size, dataset.seed).absolute())

    if model_values.get("vocab_size") is None:
        # Round up once, here, so the embedding is the same at every TP size (Megatron's own padding
        # depends on TP, which would change the model between layouts).
        model_values["vocab_size"] = -(-tokenizer.vocab_size // 256) * 256
    elif model_values["vocab_size"] < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_values['vocab_size']} is smaller than the tokenizer's {tokenizer.vocab_size} tokens"
        )
    model = PixelLMProvider(
        **model_values,
        image_token_id=tokenizer.image_id,
        trainable_modules=list(stage.trainable) if stage.get("trainable") is not None else None,
        vision_patch_size=dataset.patch_size,
        projector_downsample=dataset.downsample,
    )
    if stage.get("init_from") and not init_from_pending:
        check_same_model(stage.init_from, model)
    cpu = not torch.cuda.is_available()
    if cpu:
        model.disable_cuda_fusions()
    if dataset.num_workers is None:  # a data worker helps only with a core of its own: on CPUs the step's threads
        dataset.num_workers = 0 if cpu else 2  # use every core (2 cores: 76 ms per tiny stage-2 step vs 95 with one)

    dist_values = sections["dist"]
    if dist_values.get("distributed_backend") is None:
        dist_values["distributed_backend"] = "gloo" if cpu else "nccl"

    train_values = sections["train"]
    if isinstance(train_values.get("exit_signal"), str):  # a name in the YAML; Bridge installs a handler for the number
        if train_values["exit_signal"] not in signal.Signals.__members__:
            raise ConfigError(f"train.exit_signal={train_values['exit_signal']} is not a signal name (e.g. SIGUSR1)")
        train_values["exit_signal"] = signal.Signals[train_values["exit_signal"]]
    train = TrainingConfig(**train_values)
    dataset.global_batch_size = train.global_batch_size
    if stage.name == "stage4":
        check_stage4(stage, train, model, dataset, init_from_pending)
    decay = sections["scheduler"].get("lr_decay_iters")
    if decay is not None and train.train_iters > decay:
        print(f"note: the learning rate reaches optimizer.min_lr at step {decay} (scheduler.lr_decay_iters) and "
              f"stays there until train.train_iters={train.train_iters}", flush=True)
    checkpoint_values = sections["checkpoint"]
    if stage.get("init_from"):
        checkpoint_values["pretrained_checkpoint"] = str(stage.init_from)
    if checkpoint_values.get("save") and checkpoint_values.get("save_interval") is None:
        checkpoint_values["save_interval"] = train.train_iters
    load = checkpoint_values.get("load")
    first_run = load and checkpoint_values.get("save") and Path(load).absolute() == Path(checkpoint_values["save"]).absolute()
    if load and not first_run and not Path(load).exists():  # load = save: a first run starts fresh (Slurm jobs)
        raise ConfigError(f"checkpoint.load={checkpoint_values['load']} does not exist: give a checkpoint.save "
                          "directory (an empty one starts fresh), or drop checkpoint.load")

    logger_values = sections["logger"]
    if logger_values.get("tensorboard_dir"):
        logger_values["tensorboard_dir"] = str(Path(logger_values["tensorboard_dir"]).absolute())

    container = ConfigContainer(
        train=train,
        model=model,
        dataset=dataset,
        optimizer=OptimizerConfig(**sections["optimizer"]),
        scheduler=SchedulerConfig(**sections["scheduler"]),
        checkpoint=CheckpointConfig(**checkpoint_values),
        logger=LoggerConfig(**logger_values),
        ddp=DistributedDataParallelConfig(**sections["ddp"]),
        dist=DistributedInitConfig(**dist_values),
        rng=RNGConfig(**sections["rng"]),
        validation=ValidationConfig(**sections["validation"]),
        tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=tokenizer.vocab_size),
        mixed_precision=cfg.get("mixed_precision"),
        optimizer_config_override_provider=VisionLearningRate(mult=float(stage.get("vision_lr_mult", 1.0))),
    )
    validate_layout(container, world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1")))
    validate_run(cfg, container)
    return container
