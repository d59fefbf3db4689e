"""The forward step Megatron-Bridge's training loop calls for every micro-batch."""

from functools import partial

import torch
from megatron.core import parallel_state
from megatron.bridge.training.losses import masked_next_token_loss
from megatron.bridge.training.state import GlobalState
from megatron.bridge.training.utils.packed_seq_utils import get_packed_seq_params

from nemo_pixellm.models import context_parallel
from nemo_pixellm.training.run_state import RunState


def next_batch(data_iterator, device: torch.device) -> dict:
    batch = next(data_iterator)
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def packed_seq_params(batch: dict):
    """A packed batch's THD parameters (its rows as one sequence; ``TrainingSequences.collate_fn``), else None."""
    return get_packed_seq_params(batch) if "cu_seqlens_q" in batch else None


class ForwardStep:
    """Tokens + images -> per-token losses; the loss function averages them over ``loss_mask``. Records what
    each training batch held in the run's shared state (the progress callback logs it)."""

    def __init__(self, run_state: RunState):
        self.run_state = run_state

    def __call__(self, state: GlobalState, data_iterator, model, return_schedule_plan: bool = False):
        timers = state.timers
        timers("batch-generator", log_level=2).start()
        device = next(model.parameters()).device
        batch = next_batch(data_iterator, device) if data_iterator is not None else None
        timers("batch-generator").stop()
        # context parallelism: this rank's part of the targets; the tokens stay whole for the images' sake
        cp_group = parallel_state.get_context_parallel_group()
        labels, loss_mask = (context_parallel.cut(batch[k], 1, cp_group) for k in ("labels", "loss_mask"))
        output = model(
            input_ids=batch["tokens"],
            position_ids=context_parallel.cut(batch["position_ids"], 2, cp_group),
            labels=labels,
            loss_mask=loss_mask,
            images=batch.get("images"),
            image_grids=batch.get("image_grids"),
            packed_seq_params=packed_seq_params(batch),
        )
        if model.training:
            if (change := self.run_state.view_size_change(batch.get("images"))) is not None:
                print(f"[pixellm] step {state.train_state.step + 1}: {change}", flush=True)
            self.run_state.record_batch(batch)
        rerun = state.cfg.rerun_state_machine
        loss_fn = partial(
            masked_next_token_loss, loss_mask,
            check_for_nan_in_loss=rerun.check_for_nan_in_loss, check_for_spiky_loss=rerun.check_for_spiky_loss,
        )
        return output, loss_fn
