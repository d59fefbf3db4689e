"""Entry point: ``python -m nemo_pixellm.train +stage=stage2 [variant=tiny] [key=value ...]``.

Hydra composes conf/ (variant, data, parallel, stage), ``training.config`` turns it into Megatron-Bridge's
ConfigContainer, and Bridge's ``pretrain`` runs the loop with PixelLM's forward step.
"""

import os
import socket
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from nemo_pixellm import compat

compat.enable(entry_point=True)  # version check and CPU layer, before Megatron loads

from nemo_pixellm.data.dataset import BadDataError
from nemo_pixellm.training.checkpoints import CheckpointSaveError, failed_save, newest_complete, recover
from nemo_pixellm.training.validate import ConfigError

# Megatron-Bridge is imported inside run(): the checkpoint writer spawns a process that re-imports this module,
# and keeping Bridge out of that import saves about 20 s per checkpoint on a CPU.
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def prepare_resume(container, ema: bool) -> int | None:
    """Rank 0 makes checkpoint.load consistent (a save cut short by a kill or a full disk is removed, the
    trackers name the newest complete checkpoint); returns that step when it already reached train.train_iters
    (a finished run launched again, e.g. a Slurm requeue after the final save), else None. Every rank reaches
    the same answer: complete checkpoints are never touched."""
    load = container.checkpoint.load
    if not load or container.checkpoint.ckpt_step is not None:
        return None
    if os.environ.get("RANK", "0") == "0":
        for line in recover(load, ema):
            print(f"[pixellm] checkpoint.load={load}: {line}", flush=True)
    step = newest_complete(load, ema)
    if step is None or container.train.train_iters is None or step < container.train.train_iters:
        return None
    return step


def run(cfg: DictConfig) -> None:
    from megatron.bridge.training.pretrain import pretrain
    from torch.distributed.checkpoint.api import CheckpointException

    if "WORLD_SIZE" not in os.environ and "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())  # one process: not the default 29500 another run may hold

    from nemo_pixellm.training.config import build_config
    from nemo_pixellm.training.ema import EMACallback
    from nemo_pixellm.training.fused_adam import FusedCPUAdam
    from nemo_pixellm.training.vqa_eval import VQAEvalCallback
    from nemo_pixellm.training.progress import ProgressCallback
    from nemo_pixellm.training.run_state import RunState
    from nemo_pixellm.training.step import ForwardStep

    container = build_config(cfg)
    if (step := prepare_resume(container, cfg.ema.enabled)) is not None:
        if os.environ.get("RANK", "0") == "0":
            print(f"[pixellm] nothing to train: checkpoint.load={container.checkpoint.load} is at step {step}, "
                  f"train.train_iters={container.train.train_iters} is reached (raise train.train_iters to continue)",
                  flush=True)
        return
    run_state = RunState()  # what the forward step and the callbacks share
    callbacks = [ProgressCallback(run_state, cfg.run_dir), FusedCPUAdam()]
    if cfg.stage.name == "stage4":
        from nemo_pixellm.data import sources
        from nemo_pixellm.preference import stage4_step

        forward_step, stage_callbacks = stage4_step(cfg, container, run_state,
                                                    sources.load_tokenizer(container.dataset))
        callbacks += stage_callbacks
    else:
        forward_step = ForwardStep(run_state)
    ema = EMACallback(cfg.ema.decay, cfg.ema.start_step) if cfg.ema.enabled else None
    if ema is not None:
        callbacks.append(ema)
    if cfg.vqa_eval.interval:
        callbacks.append(VQAEvalCallback(cfg.vqa_eval.interval, cfg.vqa_eval.samples, ema, cfg.run_dir))
    try:
        pretrain(container, forward_step, callbacks=callbacks)
    except (Exception, CheckpointException) as error:  # torch's CheckpointException is a BaseException
        if (what := failed_save(container.checkpoint.save)) is None:
            raise
        raise CheckpointSaveError(f"{what} ({type(error).__name__}: {str(error).strip().splitlines()[0][:200]})") from error


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ConfigError, NotImplementedError, FileNotFoundError, BadDataError) as err:
        # A data loader worker's error arrives with the worker's traceback in its text: keep the message.
        message = str(err).strip().splitlines()[-1] if "Original Traceback" in str(err) else str(err)
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
    except CheckpointSaveError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":  # Bridge's checkpoint path spawns processes that re-import __main__
    main()
