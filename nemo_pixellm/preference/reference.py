"""Frozen copies of the stage-4 policy, kept beside it and swapped in for forward passes:

- ``ReferenceWeights``: the trainable weights as stage 4 starts (the stage-3 checkpoint named by
  ``stage.init_from``), for the KL term and DPO's reference log-probs. Written once into ``checkpoint.save``
  as ``reference/rank00000.pt`` when training starts; a resumed run reads it back from ``checkpoint.load``.
- ``RolloutPolicy``: GRPO's pi_old with ``stage.updates_per_rollout`` = k > 1: the weights at the first step of
  each cycle of k steps, which samples the cycle's answers and gives their old log-probs. A checkpoint saved
  inside a cycle holds it (``iter_N/rollout_policy_rank00000.pt``), so a resume continues the cycle exactly.

Like NeMo-RL's ``use_reference_model`` neither is a second model: the same modules run with the frozen tensors
put in place of the policy's (``Parameter.data`` swapped, nothing copied). Each rank keeps its own shard in a
file of its own (a resume needs the same parallel layout; EMA's sharded format, training/ema.py, would lift that).
"""

import contextlib
import os
from pathlib import Path

import torch
from megatron.bridge.training.callbacks import Callback

from nemo_pixellm.training.ema import trainable_parameters


def global_rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def save_aside(tensors: dict, path: Path) -> None:
    """torch.save written aside and renamed: a kill leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    aside = path.with_name(path.name + ".tmp")
    torch.save(tensors, aside)
    os.replace(aside, path)


def reference_file(checkpoint_dir, rank: int) -> Path:
    return Path(checkpoint_dir) / "reference" / f"rank{rank:05d}.pt"


class FrozenWeights(Callback):
    """A snapshot of the trainable weights that forward passes can run with (``swapped_in``)."""

    def __init__(self):
        self.weights: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def swapped_in(self, model_chunk):
        """Run ``model_chunk`` with the frozen weights in place of its trainable ones (no copies)."""
        params = trainable_parameters([model_chunk])
        policy = {n: p.data for n, p in params.items()}
        for name, param in params.items():
            param.data = self.weights[name]
        try:
            yield
        finally:
            for name, param in params.items():
                param.data = policy[name]

    def _load(self, saved: Path, params: dict, what: str) -> None:
        self.weights = torch.load(saved, weights_only=True)
        if set(self.weights) != set(params):
            raise ValueError(f"{saved} holds {what} for other parameters: resume with the same layout")


class ReferenceWeights(FrozenWeights):
    def on_train_start(self, context) -> None:
        cfg, step = context.state.cfg.checkpoint, context.state.train_state.step
        params = trainable_parameters(context.model)
        if step > 0:  # resumed: the reference is the one this run started from, not today's weights
            saved = reference_file(cfg.load, global_rank())
            if not saved.is_file():
                raise FileNotFoundError(f"{saved} is missing: checkpoint.load={cfg.load} holds stage-4 weights at "
                                        f"step {step} but not the reference policy they started from; resume from "
                                        "the directory that run saved into, or start again from stage.init_from")
            self._load(saved, params, "a reference")
        else:
            self.weights = {n: p.detach().clone() for n, p in params.items()}
        if cfg.save:
            path = reference_file(cfg.save, global_rank())
            if not path.is_file():
                save_aside(self.weights, path)


def rollout_policy_file(iteration_dir, rank: int) -> Path:
    return Path(iteration_dir) / f"rollout_policy_rank{rank:05d}.pt"


class RolloutPolicy(FrozenWeights):
    """pi_old for ``updates_per_rollout`` = k optimizer steps per rollout policy: steps i with i % k == 0 (i the
    steps done before it) sample with the policy itself and take a snapshot; the next k - 1 steps sample and
    score their old log-probs with that snapshot swapped in."""

    def __init__(self, updates_per_rollout: int):
        super().__init__()
        self.updates_per_rollout = updates_per_rollout

    def is_current(self, step: int) -> bool:
        """Whether the policy itself is pi_old at the step that follows ``step`` done steps."""
        return step % self.updates_per_rollout == 0

    def on_train_start(self, context) -> None:
        cfg, step = context.state.cfg.checkpoint, context.state.train_state.step
        if not self.is_current(step):  # resumed inside a cycle: its pi_old was saved with the checkpoint
            saved = rollout_policy_file(Path(cfg.load) / f"iter_{step:07d}", global_rank())
            if not saved.is_file():
                raise FileNotFoundError(f"{saved} is missing: the checkpoint at step {step} lies inside a cycle of "
                                        f"stage.updates_per_rollout={self.updates_per_rollout} steps and needs "
                                        "the policy that sampled it")
            self._load(saved, trainable_parameters(context.model), "a rollout policy")

    def on_train_step_start(self, context) -> None:
        if self.is_current(context.state.train_state.step):
            self.weights = {n: p.detach().clone() for n, p in trainable_parameters(context.model).items()}

    def on_checkpoint_save(self, context) -> None:
        save, step = context.state.cfg.checkpoint.save, context.state.train_state.step
        if not self.is_current(step):
            save_aside(self.weights, rollout_policy_file(Path(save) / f"iter_{step:07d}", global_rank()))


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """No dropout, no MoE load statistics, no gradients: for rollouts and reference passes."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)
