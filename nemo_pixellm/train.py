"""Entry point: ``python -m nemo_pixellm.train +stage=stage2 [variant=tiny] [key=value ...]``.

Hydra composes conf/ (variant, data, parallel, stage), ``training.config`` turns it into Megatron-Bridge's
ConfigContainer, and Bridge's ``pretrain`` runs the loop with PixelLM's forward step.
"""

import sys

import hydra
from omegaconf import DictConfig

import nemo_pixellm  # noqa: F401  (installs the CPU layer when CUDA is absent)
from nemo_pixellm.training.config import CONF_DIR, build_config
from nemo_pixellm.training.validate import ConfigError


def run(cfg: DictConfig) -> None:
    from megatron.bridge.training.pretrain import pretrain

    from nemo_pixellm.training.progress import ProgressCallback
    from nemo_pixellm.training.step import forward_step

    container = build_config(cfg)
    pretrain(container, forward_step, callbacks=[ProgressCallback(cfg.run_dir)])


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ConfigError, NotImplementedError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":  # Bridge's checkpoint path spawns processes that re-import __main__
    main()
