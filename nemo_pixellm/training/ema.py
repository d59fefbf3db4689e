"""Exponential moving average of the trainable weights, as a Bridge callback (Bridge has no EMA).

ema = decay * ema + (1 - decay) * weight after every optimizer step from ``start_step`` on (a copy before).
Each rank keeps its own shard (fp32). The average is saved beside the checkpoint as a distributed checkpoint of
its own (``iter_NNNNNNN/ema/``), sharded exactly as the weights are: the model's own sharded state dict with the
averages in place of the weights. So a resume, or ``evaluate`` / ``export`` / ``generate``, reads it back at any
parallel layout (Megatron's dist checkpointing reshards), as they read the weights.
"""

import dataclasses
from pathlib import Path

import torch
from megatron.bridge.training.callbacks import Callback
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.utils import unwrap_model

from nemo_pixellm.training.checkpoints import EMA, has_ema
from nemo_pixellm.training.run_state import finished_step


def unwrapped_name(name: str) -> str:
    while name.startswith("module."):  # DDP / Float16Module wrappers
        name = name[len("module."):]
    return name


def ema_dir(iteration_dir) -> Path:
    return Path(iteration_dir) / EMA


def trainable_parameters(model_chunks) -> dict[str, torch.nn.Parameter]:
    return {unwrapped_name(n): p for chunk in model_chunks for n, p in chunk.named_parameters() if p.requires_grad}


def sharded_averages(model_chunks, tensor_for) -> dict:
    """The model chunks' sharded state dict entries of the parameters ``tensor_for(name, param)`` gives a tensor
    for, holding that tensor instead (same shape, same sharding), by parameter name (the checkpoint keys are
    the entries' own: one key can hold the shards of several layers)."""
    names = {id(p): unwrapped_name(n) for chunk in model_chunks for n, p in chunk.named_parameters()}
    entries = {}
    for chunk in unwrap_model(list(model_chunks)):
        for entry in nested_values(chunk.sharded_state_dict()):
            if not isinstance(entry, (ShardedTensor, ShardedTensorFactory)) or id(entry.data) not in names:
                continue  # extra state, buffers (the expert bias): not averaged
            tensor = tensor_for(names[id(entry.data)], entry.data)
            if tensor is not None:
                entries[names[id(entry.data)]] = dataclasses.replace(entry, data=tensor)
    return entries


def _saved_keys(iteration_dir) -> set[str]:
    return set(dist_checkpointing.load_tensors_metadata(str(ema_dir(iteration_dir))))


def _load(entries: dict, iteration_dir) -> dict:
    return dist_checkpointing.load(entries, str(ema_dir(iteration_dir)))


class EMACallback(Callback):
    def __init__(self, decay: float, start_step: int = 0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema.decay={decay}: give a value in (0, 1), e.g. 0.999")
        self.decay, self.start_step = decay, start_step
        self.shadow: dict[str, torch.Tensor] = {}

    def on_train_start(self, context) -> None:
        params = trainable_parameters(context.model)
        self.shadow = {n: p.detach().float().clone() for n, p in params.items()}
        load_dir, step = context.state.cfg.checkpoint.load, context.state.train_state.step
        if not load_dir or step == 0:
            return
        saved = Path(load_dir) / f"iter_{step:07d}"
        if not has_ema(saved):
            raise FileNotFoundError(f"{saved} has no EMA ({ema_dir(saved)} is missing or incomplete), so the average "
                                    "cannot continue: resume with ema.enabled=false, or from a checkpoint of an EMA run")
        entries = sharded_averages(context.model, lambda name, p: self.shadow.get(name))
        missing = sorted({entry.key for entry in entries.values()} - _saved_keys(saved))
        if missing:
            raise ValueError(f"{ema_dir(saved)} holds EMA for other parameters ({missing[:3]} missing): resume with "
                             "the same stage (its stage.trainable)")
        for name, value in _load(entries, saved).items():
            self.shadow[name].copy_(value)

    @torch.no_grad()
    def on_train_step_end(self, context) -> None:
        if context.skipped_iter:
            return
        step = finished_step(context)
        decay = self.decay if step > self.start_step else 0.0
        for name, param in trainable_parameters(context.model).items():
            self.shadow[name].mul_(decay).add_(param.detach().float(), alpha=1.0 - decay)

    def on_checkpoint_save(self, context) -> None:
        """Every rank takes part (a collective save); a kill inside it leaves no metadata.json: incomplete."""
        save, step = context.state.cfg.checkpoint.save, context.state.train_state.step
        target = ema_dir(Path(save) / f"iter_{step:07d}")
        target.mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(sharded_averages(context.model, lambda name, p: self.shadow.get(name)), str(target))


def load_ema_into(model: torch.nn.Module, iteration_dir) -> bool:
    """Replace ``model``'s weights with a checkpoint's EMA, at the model's own parallel layout (whatever the
    saving run's was); False if the checkpoint has none."""
    if not has_ema(iteration_dir):
        return False
    saved = _saved_keys(iteration_dir)  # the parameters the run trained (stage.trainable)
    entries = sharded_averages([model], lambda name, p: torch.empty_like(p, dtype=torch.float32))
    params = {unwrapped_name(n): p for n, p in model.named_parameters()}
    with torch.no_grad():
        for name, value in _load({n: e for n, e in entries.items() if e.key in saved}, iteration_dir).items():
            params[name].copy_(value.to(params[name].dtype))
    return True
