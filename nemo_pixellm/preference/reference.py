"""The frozen reference policy of stage 4: the trainable weights as stage 4 starts (the stage-3 checkpoint
named by ``stage.init_from``), kept beside the policy and swapped in for the reference forward passes.

Like NeMo-RL's ``use_reference_model`` the reference is not a second model: the same modules run with the
reference tensors put in place of the policy's (``Parameter.data`` swapped, nothing copied). Each rank keeps
its own shard, written once into ``checkpoint.save`` as ``reference/rank00000.pt`` when training starts;
a resumed run reads it back from ``checkpoint.load`` (the same parallel layout, as for EMA).
"""

import contextlib
from pathlib import Path

import torch
from megatron.bridge.training.callbacks import Callback

from nemo_pixellm.training.ema import global_rank, save_aside, trainable_parameters


def reference_file(checkpoint_dir, rank: int) -> Path:
    return Path(checkpoint_dir) / "reference" / f"rank{rank:05d}.pt"


class ReferenceWeights(Callback):
    def __init__(self):
        self.weights: dict[str, torch.Tensor] = {}

    def on_train_start(self, context) -> None:
        cfg, step = context.state.cfg.checkpoint, context.state.train_state.step
        params = trainable_parameters(context.model)
        if step > 0:  # resumed: the reference is the one this run started from, not today's weights
            saved = reference_file(cfg.load, global_rank())
            if not saved.is_file():
                raise FileNotFoundError(f"{saved} is missing: checkpoint.load={cfg.load} holds stage-4 weights at "
                                        f"step {step} but not the reference policy they started from; resume from "
                                        "the directory that run saved into, or start again from stage.init_from")
            self.weights = torch.load(saved, weights_only=True)
            if set(self.weights) != set(params):
                raise ValueError(f"{saved} holds a reference for other parameters: resume with the same layout")
        else:
            self.weights = {n: p.detach().clone() for n, p in params.items()}
        if cfg.save:
            path = reference_file(cfg.save, global_rank())
            if not path.is_file():
                save_aside(self.weights, path)

    @contextlib.contextmanager
    def swapped_in(self, model_chunk):
        """Run ``model_chunk`` with the reference weights in place of its trainable ones (no copies)."""
        params = trainable_parameters([model_chunk])
        policy = {n: p.data for n, p in params.items()}
        for name, param in params.items():
            param.data = self.weights[name]
        try:
            yield
        finally:
            for name, param in params.items():
                param.data = policy[name]


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
