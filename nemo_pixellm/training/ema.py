"""Exponential moving average of the trainable weights, as a Bridge callback (Bridge has no EMA).

ema = decay * ema + (1 - decay) * weight after every optimizer step from ``start_step`` on (a copy before).
Each rank keeps its own shard (fp32) and writes it next to the checkpoint, into the checkpoint's iteration
directory (``iter_NNNNNNN/ema_rank00000.pt``); a resumed run reads it back, so EMA survives resume
exactly. Resuming the EMA needs the same parallel layout; evaluation reads rank 0's file (1-process runs).
"""

import os
from pathlib import Path

import torch
from megatron.bridge.training.callbacks import Callback

from nemo_pixellm.training.run_state import finished_step


def global_rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def unwrapped_name(name: str) -> str:
    while name.startswith("module."):  # DDP / Float16Module wrappers
        name = name[len("module."):]
    return name


def save_aside(tensors: dict, path: Path) -> None:
    """torch.save written aside and renamed: a kill leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    aside = path.with_name(path.name + ".tmp")
    torch.save(tensors, aside)
    os.replace(aside, path)


def ema_file(iteration_dir: Path, rank: int) -> Path:
    return Path(iteration_dir) / f"ema_rank{rank:05d}.pt"


def trainable_parameters(model_chunks) -> dict[str, torch.nn.Parameter]:
    return {unwrapped_name(n): p for chunk in model_chunks for n, p in chunk.named_parameters() if p.requires_grad}


class EMACallback(Callback):
    def __init__(self, decay: float, start_step: int = 0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema.decay={decay}: give a value in (0, 1), e.g. 0.999")
        self.decay, self.start_step = decay, start_step
        self.shadow: dict[str, torch.Tensor] = {}

    def on_train_start(self, context) -> None:
        params = trainable_parameters(context.model)
        load_dir, step = context.state.cfg.checkpoint.load, context.state.train_state.step
        saved = ema_file(Path(load_dir) / f"iter_{step:07d}", global_rank()) if load_dir and step > 0 else None
        if saved is not None and saved.is_file():
            self.shadow = torch.load(saved, weights_only=True)
            if set(self.shadow) != set(params):
                raise ValueError(f"{saved} holds EMA for other parameters: resume with the same stage and layout")
        else:
            self.shadow = {n: p.detach().float().clone() for n, p in params.items()}

    @torch.no_grad()
    def on_train_step_end(self, context) -> None:
        if context.skipped_iter:
            return
        step = finished_step(context)
        decay = self.decay if step > self.start_step else 0.0
        for name, param in trainable_parameters(context.model).items():
            self.shadow[name].mul_(decay).add_(param.detach().float(), alpha=1.0 - decay)

    def on_checkpoint_save(self, context) -> None:
        save, step = context.state.cfg.checkpoint.save, context.state.train_state.step
        path = ema_file(Path(save) / f"iter_{step:07d}", global_rank())
        save_aside(self.shadow, path)


def load_ema_into(model: torch.nn.Module, iteration_dir) -> bool:
    """Replace ``model``'s trainable weights with rank 0's EMA from a checkpoint; False if it has none."""
    path = ema_file(iteration_dir, 0)
    if not path.is_file():
        return False
    shadow = torch.load(path, weights_only=True)
    params = {unwrapped_name(n): p for n, p in model.named_parameters()}
    missing = set(shadow) - set(params)
    if missing:
        raise KeyError(f"{path} has EMA for parameters the model lacks: {sorted(missing)[:3]}")
    with torch.no_grad():
        for name, value in shadow.items():
            params[name].copy_(value.to(params[name].dtype))
    return True
